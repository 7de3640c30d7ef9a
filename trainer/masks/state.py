"""The one store of what the compiled step touches.

:class:`MaskState` holds, keyed by ``variable.path``, the device variables of
every covered variable's update (dense masks, pins of pinned non-trainable
variables, compact indices and values: the dicts the registry tracks as its
checkpoint keys ``masks``, ``pins``, ``indices``, ``compact``), the rule
states, the pin digests and the clock (step, epoch). Updates are views built
from those variables when asked (:meth:`MaskState.update`), never kept beside
them. Exactly two methods change what the step sees and bump
:attr:`MaskState.version`: :meth:`MaskState.set_plan` and
:meth:`MaskState.drop_update`.

What a rule captured when it was applied and the digests of ``current`` pins
live in NumPy; :class:`~trainer.masks.rule_state.RuleStateTrackable` stores
them in the same ``tf.train.Checkpoint``. Every key is a variable path, never
a sanitized string. Set-up reads each variable once, as a read-only view (no
copy), and finds the few trainable elements of a mostly frozen one from its
packed mask (:mod:`~trainer.masks.bitmask`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, MutableMapping, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from trainer.masks import audit
from trainer.masks.conflicts import late_initial
from trainer.masks.errors import FreezeConfigError
from trainer.masks.plan import RuleState, VariablePlan, bits
from trainer.masks import sampled_layers
from trainer.masks.precision import check_mode, is_reduced
from trainer.masks.rule_state import RuleStateTrackable  # noqa: F401  (re-exported: the registry imports it here)
from trainer.masks.sparse_momentum import PassingDenseUpdate, passes_gradients
from trainer.masks.slots import slots_by_path, zero_slots
from trainer.masks.updates import CompactUpdate, DenseUpdate, PinUpdate, choose_mode, make_update
from trainer.masks.values import rescaled
from trainer.masks.variables import VariableInfo


@dataclasses.dataclass
class Covered:
    """The host bookkeeping of one covered variable (no per-element arrays).

    Attributes:
      rules: the names of the rules targeting it.
      static_full: every element is frozen by rules that never switch off.
      frozen_elements: how many elements are frozen now.
    """

    rules: List[str] = dataclasses.field(default_factory=list)
    static_full: bool = False
    frozen_elements: int = 0


class MaskState:
    """The store of one registry: updates' variables, rule states, digests, clock.

    Args:
      infos: the model's variables (:func:`trainer.masks.variables.index_variables`).
      masks, pins, indices, compact: the (empty) dicts the registry tracks
        as checkpoint keys; only this store writes them.
      requested: the registry's ``update`` mode (``auto``, ``dense``, ``compact``, ``sampled``).
      crossover: ``auto`` uses a compact update where at most this fraction trains.
      model: the model, whose served layers ``sampled`` intercepts (:mod:`~trainer.masks.sampled_layers`).
    """

    def __init__(self, infos: Sequence[VariableInfo], *, masks: MutableMapping, pins: MutableMapping,
                 indices: MutableMapping, compact: MutableMapping, requested: str, crossover: float, model=None):
        self.infos = list(infos)
        self.by_path: Dict[str, VariableInfo] = {i.path: i for i in self.infos}
        self.masks, self.pins, self.indices, self.compact = masks, pins, indices, compact
        self.requested, self.crossover = requested, crossover
        self.rules: Dict[str, RuleState] = {}
        self.covered: Dict[str, Covered] = {}
        self.digests: Dict[str, str] = {}  # of the `current`-pinned elements' bit patterns, per path
        self.step = 0
        self.epoch = 0
        self.version = 0
        self.optimizer: Optional[keras.optimizers.Optimizer] = None
        self.owners = sampled_layers.owners(model) if requested == "sampled" and model is not None else {}
        self.sampled: Dict[str, str] = {}  # compact variable path -> model variable path, where served

    # ------------------------------------------------------------------ reading
    def shapes(self) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
        """``{path: (shape, numpy dtype)}`` of every variable (what the planner resolves rules against)."""
        return {i.path: (tuple(int(d) for d in i.variable.shape), np.dtype(i.variable.dtype)) for i in self.infos}

    def heads(self) -> Dict[str, int]:
        """``{path: heads axis}`` of the attention projections' variables (``groups: heads``)."""
        return {i.path: i.heads_axis for i in self.infos if i.heads_axis is not None}

    def read(self, path: str) -> np.ndarray:
        """The value of the variable ``path`` now, on the host: a read-only view of its buffer, no copy.

        Hold it only while using it: an in-place update of the variable copies the buffer while a view is alive.
        """
        return np.asarray(tf.convert_to_tensor(self.by_path[path].variable.value))

    def update(self, path: str):
        """The :class:`DenseUpdate`, :class:`CompactUpdate` or :class:`PinUpdate` of ``path``, or ``None``."""
        variable = self.by_path[path].variable
        if path in self.indices:
            cls = sampled_layers.SampledUpdate if self.compact[path].path in self.sampled else CompactUpdate
            return cls(variable, self.indices[path], self.compact[path])
        if path in self.pins:
            return PinUpdate(variable, self.masks[path], self.pins[path])
        if path in self.masks and passes_gradients([s.rule for s in self.rules_for(path)]):
            return PassingDenseUpdate(variable, self.masks[path])  # regrow.frozen_gradients: pass
        return DenseUpdate(variable, self.masks[path]) if path in self.masks else None

    def lookup(self, path: str) -> Tuple[Any, bool]:
        """``(update or None, frozen entirely)`` of a variable path (uncovered: ``(None, False)``).

        The path of a compact variable whose gradient is sampled gives its model variable's.
        """
        covered = self.covered.get(self.sampled.get(path, path))
        return (None, False) if covered is None else (self.update(self.sampled.get(path, path)), covered.static_full)

    def updates(self) -> Dict[str, Any]:
        """``{path: update}`` of every covered variable that has one, in the order they were covered."""
        return {p: u for p, u in ((p, self.update(p)) for p in self.covered) if u is not None}

    def rules_for(self, path: str) -> List[RuleState]:
        """The states of the rules targeting ``path``, in the order they were added."""
        return [s for s in self.rules.values() if path in s.paths]

    def trainable_now(self, path: str) -> Optional[np.ndarray]:
        """The trainable-mask the device holds for ``path``, or ``None`` without an update."""
        update = self.update(path) if path in self.covered else None
        return None if update is None else update.trainable_mask()

    def trainable_mask(self, path: str) -> np.ndarray:
        """The trainable-mask of one variable (all True uncovered, all False frozen entirely)."""
        update, full = self.lookup(path)
        if update is not None:
            return update.trainable_mask()
        return np.full(tuple(self.by_path[path].variable.shape), not full, dtype=bool)

    def trainable_variables(self) -> List[keras.Variable]:
        """The trainable model variables, less those frozen entirely by static rules.

        Where the gradient is sampled, the compact ``[k]`` variable stands in for
        the model variable: the served layer gives its gradient to it.
        """
        out = [i.variable for i in self.infos if i.trainable and not self.lookup(i.path)[1]]
        return [self.compact[v.path] if v.path in self.compact and self.compact[v.path].path in self.sampled else v
                for v in out]

    def optimizer_variables(self) -> List[keras.Variable]:
        """:meth:`trainable_variables` with each compactly updated variable replaced by its ``[k]`` variable."""
        out = []
        for variable in self.trainable_variables():
            update = self.lookup(variable.path)[0]
            out.append(update.optimizer_variable if update is not None else variable)
        return out

    def initial_value(self, path: str, given: Optional[Dict[str, Any]]) -> np.ndarray:
        """What a ``value: initial`` rule pins ``path`` to: ``given[path]``, else the value now (before training).

        Raises:
          FreezeConfigError: the given array's shape is not the variable's, or
            no array is given and the optimizer has trained (:func:`~trainer.masks.conflicts.late_initial`).
        """
        variable = self.by_path[path].variable
        value = (given or {}).get(path)
        late_initial(path, value is None, self.optimizer)
        value = np.asarray(variable.numpy() if value is None else value)
        if value.shape != tuple(variable.shape):
            raise FreezeConfigError(f"initial_values[{path!r}] has shape {value.shape}, the variable "
                                    f"{tuple(variable.shape)}")
        return value

    def slots(self, variable: keras.Variable) -> list:
        """The attached optimizer's slots of ``variable`` (none before :meth:`attach`)."""
        if self.optimizer is None:
            return []
        return slots_by_path(self.optimizer, [variable]).get(variable.path, [])

    # ----------------------------------------------------------------- changing
    def apply(self, paths: Sequence[str], combine: Callable[[str], VariablePlan]) -> bool:
        """:meth:`set_plan` for each path; variables covered by several rules are checked for conflicting pins
        first, so a refused rule changes nothing.

        Returns:
          True when any mask or pinned value changed.

        Raises:
          FreezeConfigError: conflicting pins, a dense update of a bfloat16 / float16 variable, or a new
            compact update after the optimizer was built.
        """
        for path in paths:
            info = self.by_path[path]
            reduced = info.trainable and is_reduced(info.variable.dtype)
            late = info.trainable and self.optimizer is not None and self.update(path) is None
            if len(self.rules_for(path)) > 1 or reduced or late:
                plan = combine(path)  # raises on conflicting pins
                if (reduced or late) and not plan.static_full:
                    self._mode(info, plan, self.update(path))  # raises on a dense update of a bfloat16 variable
        changed = False
        for path in paths:
            changed |= self.set_plan(path, combine(path))
        return changed

    def set_plan(self, path: str, plan: VariablePlan) -> bool:
        """Writes the combined plan of one variable into it and into its update (one of the two writers).

        Derivable pins are written into the model variable; the update is
        created, given its new mask (slots of changed elements zeroed) or
        replaced; :attr:`version` is bumped when what the step sees changes.

        Returns:
          True when a mask or a pinned value changed.

        Raises:
          FreezeConfigError: the variable would need another update after the
            optimizer was attached.
        """
        changed, structural = self._set(path, plan)
        if structural:
            self.version += 1
        return changed

    def drop_update(self, path: str) -> None:
        """Removes the update of ``path`` (frozen entirely: left out of the step); the other writer."""
        if self._remove(path):
            self.version += 1

    def _remove(self, path: str) -> bool:
        had = any(path in d for d in (self.masks, self.pins, self.indices, self.compact))
        if path in self.compact and self.sampled.pop(self.compact[path].path, None) is not None:
            sampled_layers.unserve(self.owners[path])
        for tracked in (self.masks, self.pins, self.indices, self.compact):
            tracked.pop(path, None)
        return had

    def _set(self, path: str, plan: VariablePlan) -> Tuple[bool, bool]:
        info = self.by_path[path]
        structural = path not in self.covered
        covered = self.covered.setdefault(path, Covered())
        covered.rules = list(plan.rules)
        live, moved = plan.live, False
        if plan.has_derivable and (plan.derivable & (bits(plan.target) != bits(live))).any():
            info.variable.assign(plan.target)  # target is the live value with the pins written in
            live, moved = plan.target, True
        update = self.update(path)
        old = update.trainable_mask() if update is not None else None
        trainable = None if old is None else ~plan.frozen  # made where it is compared with the device's mask
        changed = moved or old is None or not np.array_equal(old, trainable)
        covered.frozen_elements = plan.frozen_count
        # At most 1 in audit.RUNS trainable: their positions, found once, serve the digest and the compact indices.
        size = plan.selection.size
        few = size and (size - plan.frozen_count) * audit.RUNS <= size
        trainable_at = plan.packed.false_positions() if few else None
        if plan.has_derivable:
            current = plan.frozen & ~plan.derivable
            self.digests[path] = audit.digest(live, current) if current.any() else ""
        else:  # every frozen element is pinned to its own value: the digest reads the packed selection
            self.digests[path] = audit.digest(live, plan.packed, trainable_at) if plan.frozen_count else ""
        if plan.static_full != covered.static_full:
            covered.static_full, structural = plan.static_full, True
        if plan.static_full and info.trainable:
            self.drop_update(path)
            return changed, structural
        mode = self._mode(info, plan, update)
        same = update is not None and update.mode == mode
        if same and mode in ("dense", "pinned"):
            if not np.array_equal(old, trainable):
                update.set_trainable(trainable)
                zero_slots(self.slots(info.variable), old != trainable)
            return changed, structural
        if same and np.array_equal(old, trainable):
            return changed, structural
        if self.optimizer is not None and update is not None:
            raise FreezeConfigError(
                f"variable {path!r} would change its {update.mode} update to a {mode} one with another mask "
                "after the optimizer was built; add every rule before attach_optimizer (or the Trainer)"
            )
        self._remove(path)
        if trainable is None and (mode != "compact" or trainable_at is None):
            trainable = ~plan.frozen
        new = make_update(mode, variable=info.variable, trainable=trainable, positions=trainable_at,
                          name=f"{mode}_{len(self.masks) + len(self.compact)}")
        if mode == "compact":
            self.indices[path], self.compact[path] = new.indices, new.compact
            if self.owners.get(path) is not None and self.owners[path].reason is None:
                self.sampled[new.compact.path] = path
                sampled_layers.serve(self.owners[path], lambda: self.lookup(path)[0])
        else:
            self.masks[path] = new.mask
            if mode == "pinned":
                self.pins[path] = new.pins
            zero_slots(self.slots(info.variable), plan.frozen)
        return True, True

    def _mode(self, info: VariableInfo, plan: VariablePlan, update: Any) -> str:
        if not info.trainable:
            return "pinned"
        size = max(int(plan.selection.size), 1)
        reduced = is_reduced(info.variable.dtype)  # compact with float32 masters at any fraction
        mode = choose_mode(self.requested, trainable_fraction=1.0 - plan.frozen_count / size,
                           dynamic=plan.dynamic, rank=plan.selection.ndim, crossover=1.0 if reduced else self.crossover)
        mode = "compact" if mode == "sampled" else mode  # the layers say where the gradient is sampled
        if self.optimizer is not None and update is None and mode == "compact":
            if self.requested != "auto":  # its [k] values would be a variable the built optimizer does not know
                raise FreezeConfigError(
                    f"variable {info.path!r} would get a {self.requested} update after the optimizer was built on "
                    "the model's variables; add such rules before the optimizer is attached (the Trainer's "
                    "construction), or create the MaskRegistry with update='auto' (rules added later then update "
                    "densely)")
            mode = "dense"  # the optimizer has slots for the model variable already
        check_mode(info.path, info.variable.dtype, mode)
        return mode

    def add_rule(self, state: RuleState) -> None:
        """Stores an admitted rule's state (last in the rule order)."""
        self.rules[state.rule.name] = state

    def remove_rule(self, name: str) -> None:
        """Forgets a rule whose admission failed (nothing if it is not stored)."""
        self.rules.pop(name, None)

    def set_clock(self, step: int, epoch: int) -> None:
        """Sets the optimizer step and the epoch rules are resolved at."""
        self.step, self.epoch = int(step), int(epoch)

    def attach(self, optimizer: keras.optimizers.Optimizer) -> None:
        """Remembers the optimizer and zeroes the slots of every frozen element of a dense update."""
        self.optimizer = optimizer
        for update in self.updates().values():
            if update.mode == "dense":
                zero_slots(self.slots(update.variable), ~update.trainable_mask())

    def sync_compact(self) -> None:
        """Reads the trainable elements of every compactly updated variable into its ``[k]`` variable."""
        for update in self.updates().values():
            if update.mode == "compact":
                update.sync()

    def reproject(self, combine: Callable[[str], VariablePlan]) -> None:
        """Writes every derivable pin that moved back into its frozen elements (eagerly), then syncs compact."""
        for path in self.covered:
            plan, variable = combine(path), self.by_path[path].variable
            if not plan.has_derivable:
                continue
            live = plan.live
            move = plan.frozen & plan.derivable & (bits(plan.target) != bits(live))
            if move.any():
                variable.assign(np.where(move, plan.target, live))
        self.sync_compact()

    def rescale_trainable(self, paths: Sequence[str], trainable: Callable[[str], np.ndarray]) -> None:
        """Scales the trainable elements of each kernel by ``sqrt(fan_in / kept)`` (``rescale_trainable``)."""
        for path in paths:
            variable = self.by_path[path].variable
            if len(variable.shape) >= 2:
                variable.assign(rescaled(self.read(path), trainable(path)))
        self.sync_compact()

    def restored(self, step: int, epoch: int, digests: Dict[str, str]) -> None:
        """Takes the clock and the digests of covered variables from a checkpoint's rule state."""
        self.set_clock(step, epoch)
        self.digests.update({p: d for p, d in digests.items() if p in self.covered})

    def check_restored(self, combine: Callable[[str], VariablePlan]) -> None:
        """Recomputes the bookkeeping from the restored rule states and checks the restored masks against it.

        Raises:
          ValueError: a restored mask disagrees with the restored rule state.
        """
        for path, covered in self.covered.items():
            plan = combine(path)
            covered.rules, covered.frozen_elements = list(plan.rules), plan.frozen_count
            update = self.update(path)
            if update is not None and not np.array_equal(update.trainable_mask(), ~plan.frozen):
                raise ValueError(f"the checkpoint's mask of {path!r} disagrees with its rule state; "
                                 "was it written by another freeze configuration?")
