"""Pre-update copies for the plain Keras loop: ``mask_gradients`` → any ``apply_gradients`` → ``reproject``.

Masked gradients alone do not keep a frozen element still: decoupled weight
decay (AdamW, SGD/Lion ``weight_decay``) and momentum or Adam slots filled
before a rule was added move elements whose gradient is 0. The registry does
not keep the values of ``value: current`` pins (only a digest), so
:meth:`~trainer.masks.registry.MaskRegistry.mask_gradients` takes a device
copy of every covered variable it masks a gradient of, before the optimizer
runs, and :meth:`~trainer.masks.registry.MaskRegistry.reproject` writes the
frozen elements back from it (``tf.where(trainable, variable, copy)``,
bit-exact), eagerly or inside a ``tf.function`` (with or without XLA).

Memory: one copy per covered variable passed to ``mask_gradients`` (its
element count × its dtype's bytes, e.g. 4 bytes per element of a float32
kernel), on the variable's device, created on the first call and kept while
the registry lives (``MaskRegistry.memory_bytes`` does not count it; :meth:`HeldValues.memory_bytes`
does). The :class:`~trainer.Trainer`'s step, ``registry.apply_gradients`` and
:class:`~trainer.MaskedOptimizer` never call ``mask_gradients``, so they never allocate it
(``Trainer.masked_gradients`` does). Not for a replica context of a ``tf.distribute`` strategy: the
copies are plain variables written per call.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import keras
import numpy as np
import tensorflow as tf

from trainer.masks import audit
from trainer.masks.plan import VariablePlan
from trainer.masks.updates import keep_where

__all__ = ["HeldValues", "changed_current", "reproject", "uncopied"]


class HeldValues:
    """The copies taken by ``mask_gradients`` and written back by ``reproject``, keyed by variable path."""

    def __init__(self):
        self.copies: Dict[str, tf.Variable] = {}

    def take(self, state, variables: Sequence[keras.Variable]) -> None:
        """Copies the value of every covered trainable variable among ``variables`` (usable in a ``tf.function``)."""
        for variable in variables:
            path = variable.path
            if path not in state.covered or not state.by_path[path].trainable:
                continue
            if path not in self.copies:
                with tf.init_scope():  # created eagerly, also from a traced step (once)
                    self.copies[path] = tf.Variable(variable.value, trainable=False, name="held")
            self.copies[path].assign(variable.value)

    def refresh(self, state) -> None:
        """Re-reads every copy from its variable (eagerly): a rule changed which elements are frozen, or their pins."""
        for path, copy in self.copies.items():
            copy.assign(state.by_path[path].variable.value)

    def restore(self, state) -> None:
        """Sets every frozen element of each copied variable back to its copy, then refreshes compact ``[k]`` values."""
        for path, copy in self.copies.items():
            update, full = state.lookup(path)
            variable = state.by_path[path].variable
            if full or update is None:  # frozen entirely (or uncovered now): every element back
                keep_where(variable, tf.constant(not full), copy)
            elif update.mode == "compact":
                keep_where(variable, update.dense_mask(), copy)
                update.sync()
            else:
                keep_where(variable, update.mask, copy)

    def memory_bytes(self) -> Dict[str, int]:
        """Bytes of each copy, per variable path."""
        return {p: int(np.prod(c.shape, dtype=np.int64)) * c.dtype.size for p, c in self.copies.items()}


def uncopied(state, held: HeldValues) -> List[str]:
    """Covered variables with frozen elements that no ``mask_gradients`` call has copied."""
    return [p for p, c in state.covered.items()
            if c.frozen_elements and state.by_path[p].trainable and p not in held.copies]


def changed_current(state, combine: Callable[[str], VariablePlan]) -> List[str]:
    """The variables whose ``value: current`` frozen elements no longer have their pinned bit patterns."""
    out = []
    for path, covered in state.covered.items():
        digest = state.digests.get(path, "")
        if covered.frozen_elements and digest:
            plan = combine(path)
            live = np.asarray(state.by_path[path].variable.numpy())
            if audit.digest(live, plan.frozen & ~plan.derivable) != digest:
                out.append(path)
    return out


def reproject(state, held: HeldValues, combine: Callable[[str], VariablePlan]) -> None:
    """``MaskRegistry.reproject``: copies written back; eagerly, derivable pins rebuilt and ``current`` ones checked.

    Raises:
      RuntimeError: inside a ``tf.function``, a covered variable with frozen
        elements was never given to ``mask_gradients``; eagerly, a
        ``current``-pinned frozen element changed where no copy could restore it.
    """
    if not tf.executing_eagerly():
        missing = uncopied(state, held)
        if missing:
            raise RuntimeError(f"MaskRegistry.reproject() inside a tf.function needs the pre-update copies "
                               f"mask_gradients takes, and it has none of {missing}: call "
                               "registry.mask_gradients(grads, variables) with these variables before "
                               "optimizer.apply_gradients")
        held.restore(state)
        return
    held.restore(state)
    state.reproject(combine)  # zero, constant and initial pins written by a write outside the step
    moved = changed_current(state, combine)
    if moved:
        raise RuntimeError(f"frozen elements pinned with value 'current' changed outside a masked step in "
                           f"{moved}: their values are not kept, so reproject() cannot rebuild them (call "
                           "registry.mask_gradients before optimizer.apply_gradients, which keeps a copy, "
                           "and change frozen elements only through the registry)")
