"""The mask registry: a thin facade over the plan, the per-variable updates, slots and the audit.

Usable in any ``tf.GradientTape`` loop::

    registry = MaskRegistry(model)
    registry.freeze("*/kernel", elements={"random": 0.9, "seed": 0}, value="zero")
    registry.attach_optimizer(optimizer)        # builds it (on compact variables where compact)
    variables = registry.trainable_variables()  # fully frozen ones left out
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grads = registry.update_gradients(tape.gradient(loss, variables), variables)
    registry.apply_gradients(optimizer, grads, variables)  # frozen elements never change

Polarity: a *trainable-mask* is ``True`` where an element may change; rules
declare *frozen* elements. Per covered variable the plan
(:mod:`trainer.masks.plan`) decides a dense or a compact update
(:mod:`trainer.masks.updates`); ``update="auto"`` picks compact when at most
:data:`COMPACT_CROSSOVER` of a variable's elements train and its mask never
changes. The design follows RigL's ``mask_gradients`` and Optax's
``masked``/``set_to_zero`` composition; compact updates follow the sparse
fine-tuning literature (e.g. Ansell et al., "Composable Sparse Fine-Tuning",
ACL 2022), where only the chosen few elements and their optimizer state exist.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from trainer.masks import audit
from trainer.masks.errors import FreezeConfigError
from trainer.masks.plan import Planner, RuleState, VariablePlan, bits
from trainer.masks.regrow_updates import Regrower
from trainer.masks.rules import FreezeRule
from trainer.masks.slots import slots_by_path, zero_slot_elements
from trainer.masks.state import RuleStateTrackable
from trainer.masks.updates import UPDATE_MODES, choose_mode, keep_where, make_update
from trainer.masks.variables import index_variables, select_variables

# ``update="auto"`` uses a compact update where at most this fraction of a variable trains
# (measured on the 100.7M MLP, see README "Scale").
COMPACT_CROSSOVER = 0.5


class _Covered:
    """What the registry keeps for one covered variable (no per-element host arrays)."""

    def __init__(self):
        self.rules: List[str] = []
        self.static_full = False
        self.frozen_elements = 0
        self.digest = ""  # of the `current`-pinned elements' bit patterns
        self.update = None  # DenseUpdate | CompactUpdate | None (fully frozen)


class _Refs:
    """Plain holder, so that tf.Module does not track the model, optimizer and updates as dependencies."""

    def __init__(self, model):
        self.model = model
        self.optimizer = None
        self.covered: Dict[str, _Covered] = {}
        self.initial: Dict[str, np.ndarray] = {}
        self.regrower = Regrower()  # not checkpointed: its buffers are filled and used within one execution


class MaskRegistry(tf.Module):
    """Element-level freezing for the variables of one Keras model.

    Creating a registry copies nothing: it indexes the model's variables.
    Per covered variable it keeps only what its update needs on the device (a
    bool mask, 1 byte per element, or the int32 indices and values of the
    trainable elements), plus, on the host, the initial values of variables a
    ``value: initial`` rule pins (read when that rule is added) and the
    selections of ``magnitude`` / ``mask_file`` rules as packed bits.
    Everything is keyed by ``variable.path``.

    Args:
      model: a built ``keras.Model`` (or layer).
      initial_values: optional ``{variable path: array}`` used by
        ``value="initial"`` instead of the values when the rule is added.
      update: ``"auto"`` (default), ``"dense"`` or ``"compact"``: how
        partly frozen variables are updated (see :mod:`trainer.masks.updates`).
      name: the ``tf.Module`` name.

    Raises:
      FreezeConfigError: the model has no variables, two share a path, or
        ``update`` is unknown.
    """

    def __init__(self, model: keras.layers.Layer, *, initial_values: Optional[Mapping[str, Any]] = None,
                 update: str = "auto", name: str = "mask_registry"):
        super().__init__(name=name)
        if update not in UPDATE_MODES:
            raise FreezeConfigError(f"update must be one of {list(UPDATE_MODES)}, got {update!r}")
        self.update_mode = update
        self._refs = _Refs(model)
        self._infos = index_variables(model)
        self._by_path = {i.path: i for i in self._infos}
        self._initial_values = initial_values  # a reference, read lazily
        self._planner = Planner(
            shapes={i.path: (tuple(int(d) for d in i.variable.shape), np.dtype(i.variable.dtype))
                    for i in self._infos},
            read=lambda path: np.asarray(self._by_path[path].variable.numpy()),
            initial=lambda path: self._refs.initial[path],
            trainable_now=self._trainable_now,
        )
        self._states: Dict[str, RuleState] = {}
        # Checkpointed variables, keyed by variable path.
        self.masks: Dict[str, tf.Variable] = {}
        self.pins: Dict[str, tf.Variable] = {}  # only non-trainable variables held by `non_trainable: pin`
        self.indices: Dict[str, tf.Variable] = {}
        self.compact: Dict[str, keras.Variable] = {}
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
          value: ``"current"``, ``"initial"``, ``"zero"`` or a number (cast
            to each variable's dtype bit-exactly; one that overflows it is refused).
          name: the rule's name (default ``"rule<N>"``).
          **options: ``layer_type``, ``exclude``, ``start_step``, ``end_step``,
            ``start_epoch``, ``end_epoch``, ``update_every_n_steps``,
            ``schedule``, ``non_trainable`` (see :class:`FreezeRule`).

        Returns:
          The :class:`FreezeRule` added.

        Raises:
          FreezeConfigError: the rule is malformed, matches nothing, does not
            fit a variable, pins a value its dtype cannot hold, or pins an
            element another rule pins differently. The registry is unchanged
            when this is raised.
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
        if rule.dynamic and rule.regrow is None and self.update_mode == "compact":
            raise FreezeConfigError(
                f"rule {rule.name!r} changes how many elements it freezes during training (start/end bounds or "
                "update_every_n_steps), which update 'compact' does not support; use update 'auto' (dense where "
                "masks change) or 'dense'"
            )
        paths = [t.path for t in targets]
        self._check_regrow_alone(rule, paths)
        state = RuleState(rule, paths)
        added_initial = []
        try:
            if rule.value != "initial":  # refuse a constant the dtype cannot hold, before anything changes
                for path in paths:
                    self._planner.pins(rule, path, None)
            else:
                added_initial = [p for p in paths if p not in self._refs.initial]
                for path in added_initial:
                    self._refs.initial[path] = self._initial_value(path)
            # Resolve once against every target now so that bad specs fail before training.
            if not rule.dynamic or rule.window.active(self._step, self._epoch):
                self._planner.activate(state, self._step)
            else:
                for path in paths:
                    self._planner.select(state, path, self._step)
            self._states[rule.name] = state
            self._apply(paths)
            if rule.regrow is not None:
                for path in paths:
                    self._refs.regrower.add(path, self._by_path[path].variable, rule.regrow)
        except FreezeConfigError:
            self._planner.fresh.clear()
            self._states.pop(rule.name, None)
            for path in added_initial:
                del self._refs.initial[path]
            raise
        if rule.rescale_trainable and state.active:
            self._rescale_trainable(paths)
        return rule

    def _check_regrow_alone(self, rule: FreezeRule, paths: Sequence[str]) -> None:
        """A variable a ``regrow`` rule moves is covered by that rule only (its mask is the rule's state)."""
        for state in self._states.values():
            shared = [p for p in paths if p in state.paths]
            if shared and (rule.regrow is not None or state.rule.regrow is not None):
                mover = rule.name if rule.regrow is not None else state.rule.name
                raise FreezeConfigError(
                    f"rules {state.rule.name!r} and {rule.name!r} both cover {shared}, but {mover!r} regrows "
                    "its elements, which needs a variable to itself; narrow 'select' or add 'exclude'"
                )
        if rule.regrow is not None:
            not_float = [p for p in paths if not np.issubdtype(self._planner.shapes[p][1], np.floating)]
            scalars = [p for p in paths if len(self._planner.shapes[p][0]) == 0]
            if not_float or scalars:
                raise FreezeConfigError(f"rule {rule.name!r}: regrow needs float variables with at least one "
                                        f"axis, got {not_float + scalars}")

    def _trainable_now(self, path: str) -> Optional[np.ndarray]:
        covered = self._refs.covered.get(path)
        return None if covered is None or covered.update is None else covered.update.trainable_mask()

    def _initial_value(self, path: str) -> np.ndarray:
        info = self._by_path[path]
        given = (self._initial_values or {}).get(path)
        value = np.asarray(info.variable.numpy() if given is None else given)
        if value.shape != tuple(info.variable.shape):
            raise FreezeConfigError(f"initial_values[{path!r}] has shape {value.shape}, the variable "
                                    f"{tuple(info.variable.shape)}")
        return value

    def _rescale_trainable(self, paths: Sequence[str]) -> None:
        for path in paths:
            info = self._by_path[path]
            shape = tuple(info.variable.shape)
            if len(shape) < 2:
                continue
            trainable = self.trainable_mask(path)
            kept = trainable.reshape(-1, shape[-1]).sum(axis=0)
            fan_in = float(np.prod(shape[:-1]))
            value = np.asarray(info.variable.numpy())
            scale = np.sqrt(fan_in / np.maximum(kept, 1)).astype(value.dtype)
            info.variable.assign(np.where(trainable, value * scale, value))
        self._sync_compact()

    # ----------------------------------------------------------------- applying
    def _states_for(self, path: str) -> List[RuleState]:
        return [s for s in self._states.values() if path in s.paths]

    def _combine(self, path: str) -> VariablePlan:
        return self._planner.combine(self._states_for(path), path)

    def _apply(self, paths: Sequence[str]) -> bool:
        """Writes the combined plan of ``paths`` into the variables and their updates.

        Variables targeted by several rules are checked for conflicting pins
        first, so a refused rule changes nothing.
        """
        try:
            for path in paths:
                if len(self._states_for(path)) > 1:
                    self._combine(path)  # raises on conflicting pins
            changed = False
            for path in paths:
                changed |= self._apply_one(path, self._combine(path))
            return changed
        finally:
            self._planner.fresh.clear()

    def _apply_one(self, path: str, plan: VariablePlan) -> bool:
        info = self._by_path[path]
        covered = self._refs.covered.get(path)
        if covered is None:
            covered = self._refs.covered[path] = _Covered()
            self.structure_version += 1
        covered.rules = list(plan.rules)
        live, frozen = plan.live, plan.frozen
        moved = False
        if plan.derivable.any():
            pins_move = plan.derivable & (bits(plan.target) != bits(live))
            if pins_move.any():
                info.variable.assign(plan.target)  # target is the live value with the pins written in
                live, moved = plan.target, True
        trainable = ~frozen
        old = covered.update.trainable_mask() if covered.update is not None else None
        changed = moved or old is None or not np.array_equal(old, trainable)
        covered.frozen_elements = int(np.count_nonzero(frozen))
        current = frozen & ~plan.derivable if plan.derivable.any() else frozen
        covered.digest = audit.digest(live, current) if current.any() else ""
        if plan.static_full != covered.static_full:
            covered.static_full = plan.static_full
            self.structure_version += 1
        if plan.static_full and info.trainable:
            self._drop_update(path, covered)
            return changed
        size = max(int(trainable.size), 1)
        mode = choose_mode(self.update_mode, trainable_fraction=1.0 - covered.frozen_elements / size,
                           dynamic=plan.dynamic, rank=len(trainable.shape), crossover=COMPACT_CROSSOVER)
        if not info.trainable:
            mode = "pinned"
        update = covered.update
        if self._refs.optimizer is not None and update is None and mode == "compact" and self.update_mode == "auto":
            mode = "dense"  # the optimizer has slots for the model variable already
        if update is not None and update.mode == mode and mode in ("dense", "pinned"):
            if old is not None and not np.array_equal(old, trainable):
                update.set_trainable(trainable)
                self._zero_slots(path, old != trainable)
            return changed
        if update is not None and update.mode == mode and np.array_equal(old, trainable):
            return changed
        if self._refs.optimizer is not None and update is not None:
            raise FreezeConfigError(
                f"variable {path!r} would change its {update.mode} update to a {mode} one with another mask "
                "after the optimizer was built; add every rule before attach_optimizer (or the Trainer)"
            )
        self._drop_update(path, covered)
        covered.update = make_update(mode, variable=info.variable, trainable=trainable,
                                     name=f"{mode}_{len(self.masks) + len(self.compact)}")
        if mode in ("dense", "pinned"):
            self.masks[path] = covered.update.mask
            self._zero_slots(path, frozen)
            if mode == "pinned":
                self.pins[path] = covered.update.pins
        else:
            self.indices[path], self.compact[path] = covered.update.indices, covered.update.compact
        self.structure_version += 1
        return True

    def _drop_update(self, path: str, covered: _Covered) -> None:
        if covered.update is not None:
            self.masks.pop(path, None)
            self.pins.pop(path, None)
            self.indices.pop(path, None)
            self.compact.pop(path, None)
            covered.update = None
            self.structure_version += 1

    def _zero_slots(self, path: str, changed: np.ndarray) -> None:
        optimizer = self._refs.optimizer
        if optimizer is None or not changed.any():
            return
        slots = slots_by_path(optimizer, [self._by_path[path].variable])
        zero_slot_elements(slots.get(path, []), changed)

    def _sync_compact(self) -> None:
        for covered in self._refs.covered.values():
            if covered.update is not None and covered.update.mode == "compact":
                covered.update.sync()

    def optimizer_variables(self) -> List[keras.Variable]:
        """The variables the optimizer updates: compact variables in place of compactly updated ones.

        Variables frozen entirely by static rules are left out (they never train).
        """
        out = []
        for info in self._infos:
            covered = self._refs.covered.get(info.path)
            if not info.trainable or (covered is not None and covered.static_full):
                continue
            out.append(covered.update.optimizer_variable if covered is not None and covered.update else info.variable)
        return out

    def attach_optimizer(self, optimizer: keras.optimizers.Optimizer) -> None:
        """Builds ``optimizer`` with :meth:`optimizer_variables` and remembers it.

        From now on, when a (dense) mask changes, the optimizer's slot entries
        (momentum, velocity, ...) of the elements that changed are set to 0, so
        nothing stale moves newly frozen elements and unfrozen ones start fresh.

        Raises:
          ValueError: the optimizer was built already on other variables while
            some variable has a compact update.
        """
        if not optimizer.built:
            optimizer.build(self.optimizer_variables())
        elif self.compact:
            raise ValueError("the optimizer is built already, but compact updates need it built on their compact "
                             "variables: pass an unbuilt optimizer (the registry builds it)")
        self._refs.optimizer = optimizer
        self._refs.regrower.forget_compiled()
        for path, covered in self._refs.covered.items():
            if covered.update is not None and covered.update.mode == "dense":
                self._zero_slots(path, ~covered.update.trainable_mask())

    def update(self, step: int, epoch: int = 0) -> bool:
        """Switches scheduled rules on or off and re-selects gradual-pruning masks.

        Call between compiled executions with the optimizer step (from 0) and
        the epoch (from 0). Newly active rules capture ``"current"`` values now.
        Compact variables are refreshed from the model first, so a write to a
        model variable between executions (e.g. ``set_weights``) is kept.

        Returns:
          True when any mask or pinned value changed.

        Raises:
          FreezeConfigError: two active rules pin an element differently.
        """
        self._step, self._epoch = int(step), int(epoch)
        self._sync_compact()
        touched: List[str] = []
        for state in self._states.values():
            rule = state.rule
            if not rule.dynamic:
                continue
            active = rule.window.active(self._step, self._epoch)
            if active and not state.active:
                self._planner.activate(state, self._step)
            elif not active and state.active:
                state.active, state.captured = False, {}
            elif active and rule.update_every_n_steps is not None:
                end = rule.schedule.end_step if rule.schedule is not None else None
                due = self._step - state.last_update_step >= rule.update_every_n_steps
                if not (due and (end is None or state.last_update_step < end)):
                    continue
                self._planner.activate(state, min(self._step, end) if end is not None else self._step)
                state.last_update_step = self._step
            else:
                continue
            touched += [p for p in state.paths if p not in touched]
        return self._apply(touched) if touched else False

    # ------------------------------------------------------ prune and regrow
    def gradients_due(self, step: int) -> bool:
        """True when a RigL rule updates at optimizer ``step``: the step before it must :meth:`capture_gradients`."""
        return any(s.rule.regrow is not None and s.rule.regrow.method == "rigl"
                   and s.rule.regrow.due(step, s.last_update_step) for s in self._states.values())

    def capture_gradients(self, grads: Sequence[Any], variables: Sequence[keras.Variable]) -> None:
        """Keeps the dense (unmasked) gradients of RigL variables for the next :meth:`regrow` (compiled-step API).

        Args:
          grads: the raw gradients from ``tape.gradient``, one per variable
            (before :meth:`update_gradients` masks them).
          variables: the model variables, in the same order.
        """
        self._refs.regrower.capture(grads, variables)

    def regrow(self, step: int, gradients: Optional[Mapping[str, Any]] = None) -> List[Dict[str, Any]]:
        """Runs every prune-and-regrow update due at optimizer ``step`` (eagerly, between steps).

        Each variable of a due ``regrow`` rule drops its smallest-``|w|``
        active elements (to exactly 0) and grows as many (SET: at random;
        RigL: largest ``|g|``), on the device; the optimizer slots of the
        elements that changed are set to 0. The trainable count of every
        variable stays the same, so a compact update keeps its ``[k]``
        variables: their indices move, and the slots of the elements that
        stay trainable move with them.

        Args:
          step: the optimizer step (``optimizer.iterations``).
          gradients: RigL only, ``{variable path: dense gradient}``; by default
            the gradients the last step stored with :meth:`capture_gradients`.

        Returns:
          One dict per updated variable: ``step``, ``path``, ``drop_fraction``,
          ``dropped``, ``grown``, ``active`` (trainable elements).

        Raises:
          RuntimeError: called inside a ``tf.function``.
        """
        if not tf.executing_eagerly():
            raise RuntimeError("MaskRegistry.regrow() runs eagerly, between steps")
        step, events = int(step), []
        for state in self._states.values():
            spec = state.rule.regrow
            if spec is None or not spec.due(step, state.last_update_step):
                continue
            for path in state.paths:
                update = self._refs.covered[path].update
                target = update.optimizer_variable  # the model variable, or the compact [k] one
                optimizer = self._refs.optimizer
                slots = slots_by_path(optimizer, [target]).get(target.path, []) if optimizer is not None else []
                events.append(self._refs.regrower.apply(path, update, slots, spec, step,
                                                        None if gradients is None else gradients.get(path)))
            state.last_update_step = step
        return events

    def after_restore(self) -> None:
        """Checks the restored registry after a checkpoint restored it.

        The restored masks and indices must be those the restored rule state
        gives; the digests of ``current`` pins come from the checkpoint.

        Raises:
          ValueError: the restored variables disagree with the restored rule
            state (a checkpoint of another configuration).
        """
        for path, covered in self._refs.covered.items():
            plan = self._combine(path)
            covered.rules = list(plan.rules)
            covered.frozen_elements = int(plan.frozen.sum())
            if covered.update is not None and not np.array_equal(covered.update.trainable_mask(), ~plan.frozen):
                raise ValueError(f"the checkpoint's mask of {path!r} disagrees with its rule state; "
                                 "was it written by another freeze configuration?")
            if path in self.rule_state.digests:
                covered.digest = self.rule_state.digests[path]

    def next_update_step(self, step: int) -> Optional[int]:
        """The first step after ``step`` at which :meth:`update` can change a mask because of a step.

        That is the nearest ``start_step`` / ``end_step`` bound of a rule, the
        next due re-selection of a gradual-pruning rule, or the next
        prune-and-regrow update (:meth:`regrow`). A loop that runs
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
            if rule.regrow is not None:
                due = rule.regrow.next_due(step)
                candidates += [due] if due is not None else []
            if rule.update_every_n_steps is not None and state.active and state.last_update_step is not None:
                end = rule.schedule.end_step if rule.schedule is not None else None
                if end is None or state.last_update_step < end:
                    candidates.append(max(state.last_update_step + rule.update_every_n_steps, step + 1))
        return min(candidates) if candidates else None

    # --------------------------------------------------------- compiled-step API
    def trainable_variables(self) -> List[keras.Variable]:
        """The model's trainable variables minus those frozen entirely by static rules."""
        covered = self._refs.covered
        return [i.variable for i in self._infos
                if i.trainable and not (i.path in covered and covered[i.path].static_full)]

    def _update_of(self, variable):
        covered = self._refs.covered.get(variable.path)
        if covered is None:
            return None, False
        return covered.update, covered.static_full

    @staticmethod
    def _zeros(grad, variable):
        if isinstance(grad, tf.IndexedSlices):
            return tf.IndexedSlices(tf.zeros_like(grad.values), grad.indices, grad.dense_shape)
        return tf.zeros_like(variable.value)

    def mask_gradients(self, grads: Sequence[Any], variables: Sequence[keras.Variable]) -> List[Any]:
        """Returns the gradients with every frozen element set to exactly 0, in the variables' shapes.

        Args:
          grads: one gradient per variable: a dense ``tf.Tensor`` of the
            variable's shape, a ``tf.IndexedSlices`` (e.g. an ``Embedding``
            gradient), or ``None``.
          variables: the variables, in the same order.

        Returns:
          A list of the same structure; gradients of uncovered variables are
          returned unchanged.
        """
        out = []
        for grad, variable in zip(grads, variables):
            update, full = self._update_of(variable)
            if grad is None or (update is None and not full):
                out.append(grad)
            else:
                out.append(self._zeros(grad, variable) if full else update.mask_gradient(grad))
        return out

    def update_gradients(self, grads: Sequence[Any], variables: Sequence[keras.Variable]) -> List[Any]:
        """The gradients :meth:`apply_gradients` takes: masked (dense updates) or gathered ``[k]`` (compact).

        Args:
          grads: one gradient per variable (tensor, ``IndexedSlices`` or ``None``).
          variables: the model variables, in the same order.

        Returns:
          A list of the same length; the global norm of the result equals
          that of :meth:`mask_gradients`.
        """
        out = []
        for grad, variable in zip(grads, variables):
            update, full = self._update_of(variable)
            if grad is None or (update is None and not full):
                out.append(grad)
            else:
                out.append(self._zeros(grad, variable) if full else update.gradient(grad))
        return out

    def apply_gradients(self, optimizer: keras.optimizers.Optimizer, grads: Sequence[Any],
                        variables: Sequence[keras.Variable], *, apply_if: Optional[tf.Tensor] = None) -> None:
        """One optimizer update from :meth:`update_gradients`; frozen elements are never changed.

        Dense updates restore every frozen element after the optimizer (after
        weight decay and momentum, which move elements whatever their
        gradient); compact updates scatter the compact values into the model
        variable. Works in a replica or cross-replica context of a strategy.

        Args:
          optimizer: the optimizer given to :meth:`attach_optimizer`.
          grads: the output of :meth:`update_gradients`.
          variables: the model variables, in the same order.
          apply_if: ``None``, or a scalar bool tensor: when it is ``False``
            the call writes nothing (bit-exact) although the optimizer runs:
            every variable the optimizer writes (compact ``[k]`` variables,
            uncovered variables, slots, ``iterations``) is selected back to
            its value before the update (``tf.where``) before the compact
            values are scattered, and dense updates restore every element
            (the non-finite guard of :class:`trainer.Trainer` without a
            ``tf.cond``; it holds a copy of what the optimizer writes for the
            length of the step). The alternative is to call this method in one
            branch of a ``tf.cond``.

        Raises:
          ValueError: ``apply_if`` with an optimizer that is not built yet
            (call :meth:`attach_optimizer` first: an unbuilt optimizer's
            slots are not known before the update).
        """
        if apply_if is not None and not optimizer.built:
            raise ValueError("apply_gradients(apply_if=...) needs a built optimizer: call "
                             "registry.attach_optimizer(optimizer) first")
        pairs, held, selected = [], [], []
        for grad, variable in zip(grads, variables):
            update, full = self._update_of(variable)
            target = update.optimizer_variable if update is not None else variable
            pairs.append((grad, target))
            held.append((update, update.hold()) if update is not None and grad is not None else None)
            if apply_if is not None and grad is not None and (update is None or update.mode != "dense"):
                selected.append(target)  # a dense update's release restores it from what it holds
        if apply_if is not None:
            selected += optimizer.variables  # slots, iterations (the optimizer's own variables)
            before = [tf.identity(v.value) for v in selected]
        optimizer.apply_gradients(pairs)
        if apply_if is not None:
            for variable, value in zip(selected, before):
                keep_where(variable, apply_if, value)
        for item in held:
            if item is not None:
                item[0].release(item[1], apply_if)
        for covered in self._refs.covered.values():
            if covered.update is not None and covered.update.mode == "pinned":
                covered.update.restore()  # the forward pass moved it (e.g. BatchNorm statistics)

    def reproject(self) -> None:
        """Writes every rebuildable pin (zero, constant, initial) back into its frozen elements, eagerly.

        The step never changes a frozen element (:meth:`apply_gradients`), so
        this only repairs writes made outside it. A ``current`` pin is the
        variable's own value and cannot be rebuilt: if one was changed,
        :meth:`exact` reports it.

        Raises:
          RuntimeError: called inside a ``tf.function`` (it reads values on the host).
        """
        if not tf.executing_eagerly():
            raise RuntimeError("MaskRegistry.reproject() runs eagerly, between steps; in a compiled step use "
                               "registry.update_gradients and registry.apply_gradients, which never change a "
                               "frozen element")
        for path, covered in self._refs.covered.items():
            plan = self._combine(path)
            variable = self._by_path[path].variable
            live = np.asarray(variable.numpy())
            move = plan.frozen & plan.derivable & (bits(plan.target) != bits(live))
            if move.any():
                variable.assign(np.where(move, plan.target, live))
        self._sync_compact()

    # ------------------------------------------------------------------ audits
    def drift(self) -> Dict[str, float]:
        """Per covered variable path, the max ``|value - pinned|`` over its frozen elements.

        0.0 is expected everywhere; a variable without frozen elements gives
        0.0. NaN in a frozen element, or a changed ``current`` pin (whose size
        is unknown: no copy is kept), gives ``inf``.
        """
        result = {}
        for path, covered in self._refs.covered.items():
            if not covered.frozen_elements:
                result[path] = 0.0
                continue
            value = np.asarray(self._by_path[path].variable.numpy())
            result[path] = audit.variable_drift(self._combine(path), value, covered.digest)
        return result

    def exact(self) -> bool:
        """True when every frozen element has its pin's exact bit pattern."""
        for path, covered in self._refs.covered.items():
            if covered.frozen_elements:
                value = np.asarray(self._by_path[path].variable.numpy())
                if not audit.variable_exact(self._combine(path), value, covered.digest):
                    return False
        return True

    def trainable_mask(self, path: str) -> np.ndarray:
        """The trainable-mask of one variable (all True for uncovered ones).

        Raises:
          KeyError: no variable has that path (the message lists the paths).
        """
        if path not in self._by_path:
            raise KeyError(f"no variable {path!r}; the variable paths are: {', '.join(self._by_path)}")
        shape = tuple(self._by_path[path].variable.shape)
        covered = self._refs.covered.get(path)
        if covered is None:
            return np.ones(shape, dtype=bool)
        if covered.update is None:
            return np.zeros(shape, dtype=bool) if covered.static_full else np.ones(shape, dtype=bool)
        return covered.update.trainable_mask()

    def trainable_masks(self) -> Dict[str, np.ndarray]:
        """``{variable path: bool trainable-mask}`` for every trainable variable."""
        return {i.path: self.trainable_mask(i.path) for i in self._infos if i.trainable}

    def update_modes(self) -> Dict[str, str]:
        """``{variable path: "dense" | "compact" | "pinned" | "frozen"}`` for every covered variable.

        ``pinned``: a non-trainable variable held at its pins (``non_trainable: pin``);
        ``frozen``: frozen entirely by static rules, left out of the step.
        """
        return {p: (c.update.mode if c.update is not None else "frozen") for p, c in self._refs.covered.items()}

    def plan(self) -> List[Dict[str, Any]]:
        """The resolved freeze plan: one row per trainable (or pinned) variable.

        Each row has ``path``, ``shape``, ``dtype``, ``frozen_elements``,
        ``frozen_fraction``, ``value`` (the value specs of the rules covering
        it, e.g. ``"zero"``) and ``rules`` (their names); :meth:`update_modes`
        tells how each is updated.
        """
        rows = []
        for info in self._infos:
            covered = self._refs.covered.get(info.path)
            if not info.trainable and covered is None:
                continue
            size = int(np.prod(info.variable.shape, dtype=np.int64))
            frozen = covered.frozen_elements if covered is not None else 0
            rules = list(covered.rules) if covered is not None else []
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
        """Bytes of per-element state the registry keeps (host and device), per covered variable path.

        That is the dense mask (1 byte per element) or the compact indices and
        values (8 bytes per trainable element in float32), the initial values
        kept for ``value: initial`` rules, captured selections (1 bit per
        element) and RigL's dense gradient buffers (4 bytes per element). The optimizer's slots and O(1) bookkeeping per variable (a
        16-byte digest, Python objects) are not included.
        """
        out = {}
        for path, covered in self._refs.covered.items():
            total = covered.update.memory_bytes() if covered.update is not None else 0
            total += self._refs.regrower.memory_bytes(path)
            if path in self._refs.initial:
                total += int(self._refs.initial[path].nbytes)
            total += sum(int(s.captured[path].nbytes) for s in self._states.values() if path in s.captured)
            out[path] = total
        return out

    def describe(self) -> str:
        """A Markdown table of :meth:`plan` with each variable's update (:meth:`update_modes`)."""
        modes = self.update_modes()
        lines = ["| variable | shape | frozen | fraction | value | rules | update |",
                 "|---|---|---|---|---|---|---|"]
        for row in self.plan():
            lines.append(
                f"| {row['path']} | {tuple(row['shape'])} | {row['frozen_elements']:,} | "
                f"{row['frozen_fraction']:.4f} | {row['value'] or '-'} | {', '.join(row['rules']) or '-'} | "
                f"{modes.get(row['path'], '-')} |"
            )
        return "\n".join(lines)

    def covered_paths(self) -> List[str]:
        """The paths of the variables some rule targets, in the order they were first covered."""
        return list(self._refs.covered)

    def is_dynamic(self) -> bool:
        """True when some rule switches on or off, or re-selects, during training."""
        return any(s.rule.dynamic for s in self._states.values())
