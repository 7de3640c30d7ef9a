"""Finding and zeroing a Keras 3 optimizer's slot variables (momentum, velocity...)."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import keras
import numpy as np
import tensorflow as tf

from trainer.masks.errors import FreezeConfigError


def _slot_prefix(path: str) -> str:
    # Keras 3 names a slot f"{reference.path.replace('/', '_')}_{slot_name}"
    # (BaseOptimizer.add_variable_from_reference).
    return path.replace("/", "_") + "_"


def slots_by_path(optimizer: keras.optimizers.Optimizer, variables: List[keras.Variable]) -> Dict[str, list]:
    """Maps each variable path to the optimizer variables that are its slots.

    A slot is an optimizer variable of the same shape whose name starts with
    the variable's path with ``/`` replaced by ``_``; of several candidate
    variables the longest path wins. Returns empty lists before the optimizer
    is built.
    """
    result: Dict[str, list] = {v.path: [] for v in variables}
    if not getattr(optimizer, "built", False):
        return result
    prefixes = sorted(((_slot_prefix(v.path), v) for v in variables), key=lambda p: -len(p[0]))
    for slot in optimizer.variables:
        name = slot.name.split("/")[-1]
        for prefix, v in prefixes:
            if name.startswith(prefix) and tuple(slot.shape) == tuple(v.shape):
                result[v.path].append(slot)
                break
    return result


def zero_slots(slots: Sequence[tf.Variable], elements: Any) -> None:
    """Sets ``elements`` of every optimizer slot to 0 in place, with ``tf.where``: the one slot zeroing.

    Used when elements change state (a mask changes, an optimizer is attached
    to frozen elements, prune-and-regrow grows or drops them, as RigL's
    ``reset_momentum``), eagerly or inside a ``tf.function``. Other elements
    keep their bits.

    Args:
      slots: the variable's slot variables (e.g. Adam's momentum and
        velocity), each of the shape of ``elements``.
      elements: bool array or tensor, ``True`` = set to 0; a NumPy array with
        no ``True`` writes nothing.

    Raises:
      FreezeConfigError: a slot whose shape is not the shape of ``elements``.
    """
    for slot in slots:
        if tuple(slot.shape) != tuple(elements.shape):
            raise FreezeConfigError(
                f"slot {getattr(slot, 'path', slot.name)!r} has shape {list(tuple(slot.shape))}, "
                f"the elements to zero have shape {list(tuple(elements.shape))}"
            )
    if isinstance(elements, np.ndarray) and not elements.any():
        return
    elements = tf.convert_to_tensor(elements)
    for slot in slots:
        slot.assign(tf.where(elements, tf.zeros_like(slot), slot))
