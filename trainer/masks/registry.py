"""The mask registry: per variable, which elements train and what frozen ones are pinned to.

Usable in any ``tf.GradientTape`` loop::

    registry = MaskRegistry(model)
    registry.freeze("*/kernel", elements={"random": 0.9, "seed": 0}, value="zero")
    registry.attach_optimizer(optimizer)        # builds it, zeroes stale slots later
    variables = registry.trainable_variables()  # fully frozen ones left out
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grads = registry.mask_gradients(tape.gradient(loss, variables), variables)
    optimizer.apply_gradients(zip(grads, variables))
    registry.reproject()                        # must run last, after the optimizer

Polarity: a *trainable-mask* is ``True`` where an element may change; rules
declare *frozen* elements. Re-projection uses ``tf.where(mask, value, pinned)``,
which is bit-exact (a blend ``value * m + pinned * (1 - m)`` is not: NaN * 0 is
NaN and -0.0 becomes +0.0). The design follows RigL's ``mask_gradients`` and
Optax's ``masked``/``set_to_zero`` composition.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from trainer.masks.elements import ElementContext, select_elements, selector_name
from trainer.masks.errors import FreezeConfigError
from trainer.masks.rules import FreezeRule
from trainer.masks.slots import slots_by_path, zero_slot_elements
from trainer.masks.state import RuleStateTrackable
from trainer.masks.values import is_zero, resolve_value
from trainer.masks.variables import VariableInfo, index_variables, select_variables


@dataclasses.dataclass
class _RuleState:
    """What an active rule froze: per variable path, a frozen mask and pinned values."""

    rule: FreezeRule
    targets: List[VariableInfo]
    active: bool = False
    last_update_step: Optional[int] = None
    frozen: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    pinned: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


class _Entry:
    """The registry's state for one covered variable."""

    def __init__(self, info: VariableInfo):
        self.info = info
        self.mask: Optional[tf.Variable] = None  # trainable-mask, bool; None when statically all frozen
        self.pinned: Optional[tf.Variable] = None  # None when every pinned value is 0
        self.fully_frozen = False  # all elements frozen by rules that never switch off
        self.frozen = np.zeros(tuple(info.variable.shape), dtype=bool)  # host copy of ~mask
        self.pinned_host = np.zeros(tuple(info.variable.shape), dtype=info.variable.dtype)
        self.rules: List[str] = []

    @property
    def path(self) -> str:
        return self.info.path


def _key(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", path)


class _Refs:
    """Plain holder, so that tf.Module does not track the model and optimizer as checkpoint dependencies."""

    def __init__(self, model):
        self.model = model
        self.optimizer = None


class MaskRegistry(tf.Module):
    """Element-level freezing for the variables of one Keras model.

    Per covered variable the registry keeps a boolean trainable-mask and the
    pinned values as non-trainable ``tf.Variable`` s (checkpointed with the
    registry; they change without retracing a compiled step). A pinned value
    of 0 needs no stored copy; a variable frozen entirely by rules that never
    switch off needs no mask and is left out of :meth:`trainable_variables`.

    Args:
      model: a built ``keras.Model`` (or layer).
      initial_values: optional ``{variable path: array}`` used by
        ``value="initial"`` instead of the values the model has now.
      name: the ``tf.Module`` name.

    Raises:
      FreezeConfigError: the model has no variables, or two share a path.
    """

    def __init__(self, model: keras.layers.Layer, *, initial_values: Optional[Mapping[str, Any]] = None,
                 name: str = "mask_registry"):
        super().__init__(name=name)
        self._refs = _Refs(model)
        self._infos = index_variables(model)
        self._by_path = {i.path: i for i in self._infos}
        initial_values = dict(initial_values or {})
        self._initial = {
            i.path: np.array(initial_values.get(i.path, i.variable.numpy())) for i in self._infos
        }
        self._states: Dict[str, _RuleState] = {}
        self._entries: Dict[str, _Entry] = {}
        # Checkpointed variables, keyed by a sanitized variable path.
        self.masks: Dict[str, tf.Variable] = {}
        self.pinned: Dict[str, tf.Variable] = {}
        self._step = 0
        self._epoch = 0
        self.structure_version = 0
        self.rule_state = RuleStateTrackable(self)

    # ------------------------------------------------------------------ rules
    @property
    def rules(self) -> List[FreezeRule]:
        """The rules in the order they were added."""
        return [s.rule for s in self._states.values()]

    @property
    def model(self) -> keras.layers.Layer:
        return self._refs.model

    def freeze(self, select: Any = None, elements: Any = "all", value: Any = "current",
               name: Optional[str] = None, **options: Any) -> FreezeRule:
        """Adds a rule and applies it now if it is active at the current step.

        Args:
          select: a glob or list of globs over variable paths (``re:`` for a
            regex); a pattern also matches a trailing sub-path.
          elements: ``"all"`` or a selector mapping such as
            ``{"random": 0.9, "seed": 0}``, ``{"indices": [0, 2]}``,
            ``{"slice": "[:, :10]"}``, ``{"magnitude": 0.8}``, ``{"units": [3]}``.
          value: ``"current"``, ``"initial"``, ``"zero"`` or a float.
          name: the rule's name (default ``"rule<N>"``).
          **options: ``layer_type``, ``exclude``, ``start_step``, ``end_step``,
            ``start_epoch``, ``end_epoch``, ``update_every_n_steps``,
            ``schedule``, ``non_trainable`` (see :class:`FreezeRule`).

        Returns:
          The :class:`FreezeRule` added.

        Raises:
          FreezeConfigError: the rule is malformed, matches nothing, does not
            fit a variable, or pins an element another rule pins differently.
            The registry is unchanged when this is raised.
        """
        name = name or f"rule{len(self._states)}"
        unknown = sorted(set(options) - set(FreezeRule.KEYS))
        if unknown:  # the same message as a config's unknown key, not Python's TypeError
            raise FreezeConfigError(f"rule {name!r}: unknown key(s) {unknown}; allowed: {list(FreezeRule.KEYS)}")
        rule = FreezeRule.create(name, select, elements, value, **options)
        return self.add_rule(rule)

    def add_rule(self, rule: FreezeRule) -> FreezeRule:
        """Adds a prebuilt :class:`FreezeRule`; see :meth:`freeze` for errors."""
        if rule.name in self._states:
            raise FreezeConfigError(f"a rule named {rule.name!r} exists already; rule names: {list(self._states)}")
        targets = select_variables(self._infos, rule.select, rule.layer_type, rule.exclude, rule.name)
        non_trainable = [t.path for t in targets if not t.trainable]
        if non_trainable and rule.non_trainable == "error":
            raise FreezeConfigError(
                f"rule {rule.name!r} selects non-trainable variables {non_trainable}: gradients do not train "
                "them, so freezing has no effect there. Narrow 'select' / add 'exclude', or set "
                "non_trainable: skip (leave them out) or non_trainable: pin (hold them at the pinned value)"
            )
        if rule.non_trainable == "skip":
            targets = [t for t in targets if t.trainable]
            if not targets:
                raise FreezeConfigError(f"rule {rule.name!r} selects only non-trainable variables {non_trainable}")
        state = _RuleState(rule, targets)
        # Resolve once against every target now so that bad specs fail before training.
        if not rule.dynamic or rule.window.active(self._step, self._epoch):
            self._activate(state, self._step)
        else:
            for info in targets:
                self._resolve(state, info)
        self._states[rule.name] = state
        try:
            self._apply(self._combine())
        except FreezeConfigError:
            del self._states[rule.name]
            raise
        if rule.rescale_trainable and state.active:
            self._rescale_trainable(state)
        return rule

    def _rescale_trainable(self, state: _RuleState) -> None:
        for info in state.targets:
            shape = tuple(info.variable.shape)
            if len(shape) < 2:
                continue
            trainable = ~self._entries[info.path].frozen
            kept = trainable.reshape(-1, shape[-1]).sum(axis=0)
            fan_in = float(np.prod(shape[:-1]))
            scale = np.sqrt(fan_in / np.maximum(kept, 1)).astype(np.asarray(info.variable.numpy()).dtype)
            value = np.asarray(info.variable.numpy())
            info.variable.assign(np.where(trainable, value * scale, value))

    # --------------------------------------------------------------- resolving
    def _context(self, info: VariableInfo) -> ElementContext:
        return ElementContext(info.path, tuple(info.variable.shape), np.asarray(info.variable.numpy()),
                              self._initial[info.path])

    def _resolve(self, state: _RuleState, info: VariableInfo, step: int = 0):
        rule = state.rule
        fraction = rule.schedule(step) if rule.schedule is not None else None
        ctx = self._context(info)
        try:
            frozen = select_elements(rule.elements, ctx, fraction=fraction)
        except FreezeConfigError as err:
            raise FreezeConfigError(f"rule {rule.name!r}, variable {info.path!r}: {err}") from None
        pinned = resolve_value(rule.value, ctx.value, ctx.initial)
        return frozen, pinned

    def _activate(self, state: _RuleState, step: int) -> None:
        frozen, pinned = {}, {}
        for info in state.targets:
            frozen[info.path], pinned[info.path] = self._resolve(state, info, step)
        state.frozen, state.pinned = frozen, pinned
        state.active = True
        state.last_update_step = step

    def _combine(self) -> Dict[str, tuple]:
        """Per covered path: (frozen, pinned, rule names, fully frozen by static rules)."""
        combined: Dict[str, tuple] = {}
        owner: Dict[str, np.ndarray] = {}
        for state in self._states.values():
            for info in state.targets:
                shape = tuple(info.variable.shape)
                if info.path not in combined:
                    combined[info.path] = (np.zeros(shape, bool), np.zeros(shape, info.variable.dtype), [], False)
                    owner[info.path] = np.full(shape, -1, dtype=np.int32)
                frozen, pinned, names, static_full = combined[info.path]
                if state.rule.name not in names:
                    names.append(state.rule.name)
                if not state.active:
                    continue
                f, p = state.frozen[info.path], state.pinned[info.path]
                overlap = f & frozen
                if overlap.any():
                    same = (p == pinned) | (np.isnan(p) & np.isnan(pinned))
                    differs = overlap & ~same
                    if differs.any():
                        other = list(self._states)[int(owner[info.path][differs][0])]
                        idx = np.unravel_index(int(np.flatnonzero(differs)[0]), shape)
                        first, second = self._states[other].rule.value, state.rule.value
                        raise FreezeConfigError(
                            f"rules {other!r} (value {first}) and {state.rule.name!r} (value {second}) pin "
                            f"{int(differs.sum())} element(s) of variable {info.path!r} to different values, "
                            f"e.g. element {tuple(int(i) for i in idx)}: {float(pinned[idx])!r} and "
                            f"{float(p[idx])!r}; give them the same value or make their element selections "
                            "disjoint (e.g. with 'exclude' or 'invert')"
                        )
                pinned = np.where(f, p, pinned)
                owner[info.path] = np.where(f & ~frozen, list(self._states).index(state.rule.name), owner[info.path])
                frozen = frozen | f
                static_full = static_full or (not state.rule.dynamic and bool(f.all()))
                combined[info.path] = (frozen, pinned, names, static_full)
        return combined

    # ----------------------------------------------------------------- applying
    def _entry(self, info: VariableInfo) -> _Entry:
        if info.path not in self._entries:
            self._entries[info.path] = _Entry(info)
            self.structure_version += 1
        return self._entries[info.path]

    def _apply(self, combined: Dict[str, tuple]) -> bool:
        """Writes the combined plan into the registry's variables and pins weights."""
        changed_any = False
        slots = None
        for path, (frozen, pinned, names, static_full) in combined.items():
            info = self._by_path[path]
            entry = self._entry(info)
            entry.rules = list(names)
            needs_pinned = any(
                not is_zero(s.rule.value) for s in self._states.values() if any(t.path == path for t in s.targets)
            )
            key = _key(path)
            if needs_pinned and entry.pinned is None:
                entry.pinned = self.pinned[key] = tf.Variable(
                    pinned, trainable=False, name=f"pinned_{key}", dtype=info.variable.dtype)
                self.structure_version += 1
            needs_mask = not static_full
            if needs_mask and entry.mask is None:
                entry.mask = self.masks[key] = tf.Variable(~frozen, trainable=False, name=f"mask_{key}")
                self.structure_version += 1
            if static_full != entry.fully_frozen:
                entry.fully_frozen = static_full
                self.structure_version += 1
            newly = frozen != entry.frozen
            if not newly.any() and np.array_equal(pinned, entry.pinned_host):
                continue
            changed_any = True
            entry.frozen, entry.pinned_host = frozen.copy(), pinned.copy()
            if entry.mask is not None:
                entry.mask.assign(~frozen)
            if entry.pinned is not None:
                entry.pinned.assign(pinned)
            value = np.asarray(info.variable.numpy())
            info.variable.assign(np.where(frozen, pinned, value))
            if self._refs.optimizer is not None and newly.any():
                if slots is None:
                    slots = slots_by_path(self._refs.optimizer, [i.variable for i in self._infos if i.trainable])
                zero_slot_elements(slots.get(path, []), newly)
        return changed_any

    def attach_optimizer(self, optimizer: keras.optimizers.Optimizer) -> None:
        """Builds ``optimizer`` with every trainable variable of the model and remembers it.

        From now on, when a mask changes, the optimizer's slot entries
        (momentum, velocity, ...) of the elements that changed are set to 0, so
        nothing stale moves newly frozen elements and unfrozen ones start fresh.
        Building with every variable lets a later unfreeze pass any subset to
        ``apply_gradients``.
        """
        if not optimizer.built:
            optimizer.build([i.variable for i in self._infos if i.trainable])
        self._refs.optimizer = optimizer
        frozen = {p: e.frozen for p, e in self._entries.items() if e.frozen.any()}
        if frozen:
            slots = slots_by_path(optimizer, [i.variable for i in self._infos if i.trainable])
            for path, f in frozen.items():
                zero_slot_elements(slots.get(path, []), f)

    def update(self, step: int, epoch: int = 0) -> bool:
        """Switches scheduled rules on or off and re-selects gradual-pruning masks.

        Call between compiled executions with the optimizer step (from 0) and
        the epoch (from 0). Newly active rules capture ``"current"`` values now.

        Returns:
          True when any mask or pinned value changed.

        Raises:
          FreezeConfigError: two active rules pin an element differently.
        """
        self._step, self._epoch = int(step), int(epoch)
        touched = False
        for state in self._states.values():
            rule = state.rule
            if not rule.dynamic:
                continue
            active = rule.window.active(self._step, self._epoch)
            if active and not state.active:
                self._activate(state, self._step)
                touched = True
            elif not active and state.active:
                state.active, state.frozen, state.pinned = False, {}, {}
                touched = True
            elif active and rule.update_every_n_steps is not None:
                end = rule.schedule.end_step if rule.schedule is not None else None
                due = self._step - state.last_update_step >= rule.update_every_n_steps
                if due and (end is None or state.last_update_step < end):
                    self._activate(state, min(self._step, end) if end is not None else self._step)
                    state.last_update_step = self._step
                    touched = True
        return self._apply(self._combine()) if touched else False

    def after_restore(self) -> None:
        """Re-synchronizes host copies after a checkpoint restored the registry.

        The restored mask and pinned variables are the truth; this recomputes
        the plan from the restored rule states and checks that both agree.

        Raises:
          ValueError: the restored variables disagree with the restored rule
            state (a checkpoint of another configuration).
        """
        for path, (frozen, pinned, names, static_full) in self._combine().items():
            entry = self._entries[path]
            if entry.mask is not None and not np.array_equal(~entry.mask.numpy(), frozen):
                raise ValueError(f"the checkpoint's mask of {path!r} disagrees with its rule state; "
                                 "was it written by another freeze configuration?")
            entry.frozen, entry.pinned_host, entry.rules = frozen.copy(), pinned.copy(), list(names)

    def next_update_step(self, step: int) -> Optional[int]:
        """The first step after ``step`` at which :meth:`update` can change a mask because of a step.

        That is the nearest ``start_step`` / ``end_step`` bound of a rule, or
        the next due re-selection of a gradual-pruning rule. A loop that runs
        several steps per compiled call should end a call there (and at epoch
        ends, for epoch bounds), so that rules switch at the step they name.

        Returns:
          An ``int`` greater than ``step``, or ``None`` when no step-based
          change is ahead.
        """
        candidates = []
        for state in self._states.values():
            rule, window = state.rule, state.rule.window
            candidates += [b for b in (window.start_step, window.end_step) if b is not None and b > step]
            if rule.update_every_n_steps is not None and state.active and state.last_update_step is not None:
                end = rule.schedule.end_step if rule.schedule is not None else None
                if end is None or state.last_update_step < end:
                    candidates.append(max(state.last_update_step + rule.update_every_n_steps, step + 1))
        return min(candidates) if candidates else None

    # --------------------------------------------------------- compiled-step API
    def trainable_variables(self) -> List[keras.Variable]:
        """The model's trainable variables minus those frozen entirely by static rules."""
        return [
            i.variable for i in self._infos
            if i.trainable and not (i.path in self._entries and self._entries[i.path].fully_frozen)
        ]

    def _entry_for(self, variable) -> Optional[_Entry]:
        return self._entries.get(variable.path)

    def mask_gradients(self, grads: Sequence[Any], variables: Sequence[keras.Variable]) -> List[Any]:
        """Returns the gradients with every frozen element set to exactly 0.

        Args:
          grads: one gradient per variable: a dense ``tf.Tensor`` of the
            variable's shape, a ``tf.IndexedSlices`` (e.g. an ``Embedding``
            gradient: frozen rows are gathered from the mask), or ``None``.
          variables: the variables, in the same order.

        Returns:
          A list of the same structure; gradients of uncovered variables are
          returned unchanged.
        """
        out = []
        for grad, variable in zip(grads, variables):
            entry = self._entry_for(variable)
            if grad is None or entry is None:
                out.append(grad)
            elif entry.mask is None:
                out.append(tf.zeros_like(variable.value) if not isinstance(grad, tf.IndexedSlices)
                           else tf.IndexedSlices(tf.zeros_like(grad.values), grad.indices, grad.dense_shape))
            elif isinstance(grad, tf.IndexedSlices):
                rows = tf.gather(entry.mask, grad.indices)
                out.append(tf.IndexedSlices(tf.where(rows, grad.values, tf.zeros_like(grad.values)),
                                            grad.indices, grad.dense_shape))
            else:
                out.append(tf.where(entry.mask, grad, tf.zeros_like(grad)))
        return out

    def reproject(self) -> None:
        """Assigns the pinned values to every frozen element (run after the optimizer).

        Decoupled weight decay and momentum move an element whatever its
        gradient (Keras applies them in ``apply``), so this must run last.
        Under a ``tf.distribute`` strategy, called in a replica context, the
        projection runs on every replica's copy of each variable (through
        ``strategy.extended.update``, as Keras applies optimizer updates).
        """
        if tf.distribute.has_strategy() and tf.distribute.get_strategy().num_replicas_in_sync > 1:
            if tf.distribute.in_cross_replica_context():
                self._reproject_replicas(tf.distribute.get_strategy())
            else:
                tf.distribute.get_replica_context().merge_call(self._reproject_replicas)
            return
        for entry in self._entries.values():
            variable = entry.info.variable
            variable.assign(self._projected(entry, variable.value))

    @staticmethod
    def _projected(entry: "_Entry", value):
        pinned = entry.pinned if entry.pinned is not None else tf.zeros(value.shape, value.dtype)
        return tf.identity(pinned) if entry.mask is None else tf.where(entry.mask, value, pinned)

    def _reproject_replicas(self, strategy) -> None:
        for entry in self._entries.values():
            strategy.extended.update(
                entry.info.variable.value, lambda v, e=entry: v.assign(self._projected(e, v)), group=False)

    # ------------------------------------------------------------------ audits
    def drift(self) -> Dict[str, float]:
        """Per covered variable path, the max ``|value - pinned|`` over its frozen elements.

        0.0 is expected everywhere; a variable without frozen elements gives 0.0.
        NaN in a frozen element gives ``inf``.
        """
        result = {}
        for path, entry in self._entries.items():
            if not entry.frozen.any():
                result[path] = 0.0
                continue
            value = np.asarray(entry.info.variable.numpy())[entry.frozen].astype(np.float64)
            pinned = entry.pinned_host[entry.frozen].astype(np.float64)
            diff = np.abs(value - pinned)
            result[path] = float(np.inf) if not np.isfinite(diff).all() else float(diff.max())
        return result

    def exact(self) -> bool:
        """True when every frozen element is bit-for-bit equal to its pinned value."""
        for entry in self._entries.values():
            value = np.asarray(entry.info.variable.numpy())
            if not np.array_equal(value[entry.frozen].view(np.uint8), entry.pinned_host[entry.frozen].view(np.uint8)):
                return False
        return True

    def trainable_mask(self, path: str) -> np.ndarray:
        """The trainable-mask of one variable (all True for uncovered ones).

        Raises:
          KeyError: no variable has that path (the message lists the paths).
        """
        if path not in self._by_path:
            raise KeyError(f"no variable {path!r}; the variable paths are: {', '.join(self._by_path)}")
        entry = self._entries.get(path)
        shape = tuple(self._by_path[path].variable.shape)
        return ~entry.frozen if entry is not None else np.ones(shape, dtype=bool)

    def trainable_masks(self) -> Dict[str, np.ndarray]:
        """``{variable path: bool trainable-mask}`` for every trainable variable."""
        return {i.path: self.trainable_mask(i.path) for i in self._infos if i.trainable}

    def plan(self) -> List[Dict[str, Any]]:
        """The resolved freeze plan: one row per trainable (or pinned) variable.

        Each row has ``path``, ``shape``, ``dtype``, ``frozen_elements``,
        ``frozen_fraction``, ``value`` (the value specs of the rules covering
        it, e.g. ``"zero"``) and ``rules`` (their names).
        """
        rows = []
        for info in self._infos:
            entry = self._entries.get(info.path)
            if not info.trainable and entry is None:
                continue
            size = int(np.prod(info.variable.shape, dtype=np.int64))
            frozen = int(entry.frozen.sum()) if entry is not None else 0
            rules = list(entry.rules) if entry is not None else []
            values = sorted({str(self._states[r].rule.value) for r in rules})
            rows.append({
                "path": info.path,
                "shape": [int(d) for d in info.variable.shape],
                "dtype": str(info.variable.dtype),
                "frozen_elements": frozen,
                "frozen_fraction": frozen / size if size else 0.0,
                "value": ", ".join(values) if values else None,
                "rules": rules,
            })
        return rows

    def memory_bytes(self) -> Dict[str, int]:
        """Bytes held by the registry's device variables, per covered variable path."""
        out = {}
        for path, entry in self._entries.items():
            total = 0
            for v in (entry.mask, entry.pinned):
                if v is not None:
                    total += int(np.prod(v.shape, dtype=np.int64)) * v.dtype.size
            out[path] = total
        return out

    def describe(self) -> str:
        """A Markdown table of :meth:`plan`."""
        lines = ["| variable | shape | frozen | fraction | value | rules |", "|---|---|---|---|---|---|"]
        for row in self.plan():
            lines.append(
                f"| {row['path']} | {tuple(row['shape'])} | {row['frozen_elements']:,} | "
                f"{row['frozen_fraction']:.4f} | {row['value'] or '-'} | {', '.join(row['rules']) or '-'} |"
            )
        return "\n".join(lines)

    def covered_paths(self) -> List[str]:
        return list(self._entries)

    def is_dynamic(self) -> bool:
        """True when some rule switches on or off, or re-selects, during training."""
        return any(s.rule.dynamic for s in self._states.values())
