"""Finding and zeroing a Keras 3 optimizer's slot variables (momentum, velocity...)."""

from __future__ import annotations

from typing import Dict, List

import keras
import numpy as np


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


def zero_slot_elements(slots: list, elements: np.ndarray) -> None:
    """Sets the given elements (``True`` in a bool array of the slot's shape) of every slot to 0."""
    if not slots or not elements.any():
        return
    keep = ~elements
    for slot in slots:
        value = np.asarray(slot.numpy())
        slot.assign(np.where(keep, value, np.zeros_like(value)))
