"""The device side of prune-and-regrow rules: RigL's gradient buffers and the compiled mask update.

A :class:`Regrower` belongs to one :class:`~trainer.masks.MaskRegistry`. For
each variable a ``regrow`` rule covers it keeps, on the device, only what the
update needs beyond the variable's dense trainable-mask: for RigL a float
buffer of the variable's shape that the train step fills with the dense
(unmasked) gradient of the last step before an update
(:meth:`Regrower.capture`). An update (:meth:`Regrower.apply`) runs one
``tf.function`` per variable, traced once (the drop fraction and the seed are
tensors), that computes :func:`~trainer.masks.regrow.drop_and_grow` from the
variable, its mask and the grow scores, writes the new mask and value and sets
the optimizer slots of every element that changed state to 0 (as RigL's
``reset_momentum``; kept with ``regrow.reset_slots: false``). A ``momentum``
rule (Sparse Momentum) updates all its variables together: the regrowth is
split across them by their mean momentum (:meth:`Regrower.momentum`). A
compact update keeps its size ``k``: its indices move, and the ``[k]`` values
and slots of the elements that stay trainable move with them. Nothing is read
back to the host but three counts (and, for ``momentum``, each variable's
active count and mean ``|momentum|``, reduced on the device).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import keras
import tensorflow as tf

from trainer.masks import sparse_momentum
from trainer.masks.group_regrow import group_update
from trainer.masks.regrow import rigl_update, set_update
from trainer.masks.regrow_spec import RegrowSpec
from trainer.masks.slots import zero_slots


class Regrower:
    """Per variable path, the gradient buffer (RigL) and the compiled update of a ``regrow`` rule."""

    def __init__(self):
        self.buffers: Dict[str, tf.Variable] = {}
        self._fns: Dict[str, Callable] = {}

    def add(self, path: str, variable: keras.Variable, spec: RegrowSpec) -> None:
        """Prepares ``variable`` for ``spec``'s updates (a gradient buffer for RigL)."""
        if spec.method == "rigl" and path not in self.buffers:
            self.buffers[path] = tf.Variable(tf.zeros(variable.shape, tf.float32), trainable=False,
                                             name="rigl_gradient")

    def forget_compiled(self) -> None:
        """Drops the compiled updates (they hold the optimizer's slots: call when the optimizer changes)."""
        self._fns.clear()

    def capture(self, grads: Sequence[Any], variables: Sequence[keras.Variable]) -> None:
        """Stores the dense gradients of RigL variables (inside the compiled step; others are ignored).

        Args:
          grads: raw (unmasked) gradients, one per variable: tensors,
            ``tf.IndexedSlices`` (made dense) or ``None`` (stored as 0);
            non-finite entries (a skipped step) are stored as 0.
          variables: the model variables, in the same order.
        """
        for grad, variable in zip(grads, variables):
            buffer = self.buffers.get(variable.path)
            if buffer is not None:
                dense = tf.zeros(buffer.shape, tf.float32) if grad is None else tf.cast(
                    tf.convert_to_tensor(grad), tf.float32)
                buffer.assign(tf.where(tf.math.is_finite(dense), dense, tf.zeros_like(dense)))  # a skipped step

    @staticmethod
    def gradients_due(states: Iterable[Any], step: int) -> bool:
        """True when a RigL rule of ``states`` (:class:`~trainer.masks.plan.RuleState`) updates at ``step``."""
        return any(s.rule.regrow is not None and s.rule.regrow.method == "rigl"
                   and s.rule.regrow.due(step, s.last_update_step) for s in states)

    def run(self, step: int, store: Any, gradients: Optional[Mapping[str, Any]] = None) -> List[Dict[str, Any]]:
        """Every update due at ``step`` of the rules of a :class:`~trainer.masks.state.MaskState`.

        Args:
          step: the optimizer step.
          store: the registry's store (its rule states, updates and optimizer slots).
          gradients: RigL only, ``{variable path: dense gradient}`` instead of the buffers.

        Returns:
          One dict per updated variable (see :meth:`apply`).
        """
        events = []
        for state in store.rules.values():
            spec = state.rule.regrow
            if spec is None or not spec.due(step, state.last_update_step):
                continue
            if spec.method == "momentum":
                events += self.momentum(state, store, step)
            else:
                for path in state.paths:
                    update = store.update(path)
                    slots = store.slots(update.optimizer_variable)  # of the model variable, or the compact [k] one
                    events.append(self.apply(path, update, slots, spec, step,
                                             None if gradients is None else gradients.get(path),
                                             elements=state.rule.elements))
            state.last_update_step = step
        return events

    def apply(self, path: str, update: Any, slots: List[tf.Variable], spec: RegrowSpec, step: int,
              gradient: Optional[Any] = None, elements: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """One drop-and-grow update of a variable at optimizer ``step``.

        Args:
          path: the variable path.
          update: its :class:`~trainer.masks.updates.DenseUpdate` (the bool
            mask is rewritten) or :class:`~trainer.masks.updates.CompactUpdate`
            (the ``[k]`` indices and values are rewritten; ``k`` stays).
          slots: the optimizer slots of ``update.optimizer_variable``: zeroed
            where an element changed state; compact slots follow their
            elements to their new positions.
          spec: the rule's :class:`RegrowSpec`.
          step: the optimizer step of the update (drop fraction, SET's seed).
          gradient: RigL only: the dense gradient to grow by; ``None`` uses
            the buffer :meth:`capture` filled.
          elements: the rule's ``elements``; with ``groups`` (``units`` /
            ``inputs``) whole groups move (:mod:`trainer.masks.group_regrow`).

        Returns:
          ``{"step", "path", "drop_fraction", "dropped", "grown", "active"}``
          (Python numbers).
        """
        if path not in self._fns:
            self._fns[path] = self._compile(path, update, slots, spec, elements)
        if spec.method == "rigl" and gradient is not None:
            self.buffers[path].assign(tf.cast(tf.convert_to_tensor(gradient), tf.float32))
        fraction = spec.drop_fraction(step)
        dropped, grown, active = self._fns[path](fraction, tf.constant([spec.seed, step], tf.int64))
        return {"step": int(step), "path": path, "drop_fraction": float(fraction), "dropped": int(dropped),
                "grown": int(grown), "active": int(active)}

    def _compile(self, path: str, update: Any, slots: List[tf.Variable], spec: RegrowSpec,
                 elements: Optional[Mapping[str, Any]] = None) -> Callable:
        buffer = self.buffers.get(path)
        grouped = elements is not None and "groups" in elements
        variable = update.variable
        compact = update.mode == "compact"

        @tf.function
        def regrow(drop_fraction, seed):
            value = tf.convert_to_tensor(variable.value)
            mask = update.dense_mask() if compact else tf.convert_to_tensor(update.mask)
            if grouped:
                new = group_update(value, mask, elements, spec.method, drop_fraction=drop_fraction, seed=seed,
                                   gradient=buffer)
            elif spec.method == "rigl":
                new = rigl_update(value, mask, buffer, drop_fraction=drop_fraction)
            else:
                new = set_update(value, mask, drop_fraction=drop_fraction, seed=seed)
            if compact:
                variable.assign(new.value)
                update.move(new.mask, tf.logical_or(new.grown, new.dropped), slots)
                return counts(new)
            return write_dense(new, variable, update, slots, spec.reset_slots)

        return regrow

    def attached(self, store: Any, optimizer: Any) -> None:
        """A new optimizer: drops the compiled updates, refuses one without the momentum a ``momentum`` rule needs.

        Raises:
          FreezeConfigError: one line naming the variable and the optimizer.
        """
        self.forget_compiled()
        for state in store.rules.values():
            if state.rule.regrow is not None and state.rule.regrow.method == "momentum":
                for path in state.paths:
                    slots = store.slots(store.update(path).optimizer_variable)
                    sparse_momentum.momentum_slot(slots, path, type(optimizer).__name__)

    def momentum(self, state: Any, store: Any, step: int) -> List[Dict[str, Any]]:
        """One Sparse Momentum update of every variable of a rule (:mod:`trainer.masks.sparse_momentum`).

        Per variable (host side, once per update): the active count, the
        mean ``|momentum|`` over active elements and the drop count; the
        regrowth split across the rule's variables; then one compiled update
        per variable (new mask and value; slots of changed elements zeroed
        unless ``reset_slots`` is false).

        Returns:
          One dict per variable, as :meth:`apply`.
        """
        spec = state.rule.regrow
        fraction = float(spec.drop_fraction(step))
        paths, updates, slots, drops, capacities, shares = list(state.paths), [], [], [], [], []
        for path in paths:
            updates.append(store.update(path))
            slots.append(store.slots(updates[-1].optimizer_variable))
            mask = updates[-1].mask
            active = int(tf.reduce_sum(tf.cast(mask, tf.int64)))
            drops.append(sparse_momentum.drop_count(fraction, active))
            capacities.append(mask.shape.num_elements() - active + drops[-1])
            shares.append(sparse_momentum.mean_magnitude(sparse_momentum.momentum_slot(slots[-1], path), mask))
        grows = sparse_momentum.growth_counts(drops, capacities, shares)
        events = []
        for path, update, slots, drop, grow in zip(paths, updates, slots, drops, grows):
            if path not in self._fns:
                self._fns[path] = self._compile_momentum(update, slots, spec)
            dropped, grown, active = self._fns[path](tf.constant(drop, tf.int32), tf.constant(grow, tf.int32))
            events.append({"step": int(step), "path": path, "drop_fraction": fraction, "dropped": int(dropped),
                           "grown": int(grown), "active": int(active)})
        return events

    @staticmethod
    def _compile_momentum(update: Any, slots: List[tf.Variable], spec: RegrowSpec) -> Callable:
        variable = update.variable
        path = variable.path

        @tf.function
        def regrow(drop, grow):
            new = sparse_momentum.momentum_drop_and_grow(
                variable.value, update.mask, sparse_momentum.momentum_slot(slots, path), drop=drop, grow=grow)
            return write_dense(new, variable, update, slots, spec.reset_slots)

        return regrow

    def memory_bytes(self, path: str) -> int:
        """Bytes of the RigL gradient buffer of ``path`` (0 for SET)."""
        buffer = self.buffers.get(path)
        return 0 if buffer is None else int(buffer.shape.num_elements()) * 4


def counts(new: Any) -> tuple:
    """``(dropped, grown, active)`` int64 scalar tensors of a drop-and-grow result (bool masks)."""
    return tuple(tf.reduce_sum(tf.cast(m, tf.int64)) for m in (new.dropped, new.grown, new.mask))


def write_dense(new: Any, variable: Any, update: Any, slots: List[tf.Variable], reset_slots: bool) -> tuple:
    """Writes a drop-and-grow result into a dense update: value, mask, and (``reset_slots``) zeroed slots of changed
    elements. Returns :func:`counts`. Inside the update's ``tf.function``."""
    variable.assign(new.value)
    update.mask.assign(new.mask)
    if reset_slots:
        zero_slots(slots, tf.logical_or(new.grown, new.dropped))
    return counts(new)
