"""Pinned values: what a frozen element is held at."""

from __future__ import annotations

import math
from typing import Any, Union

import numpy as np

from trainer.masks.errors import FreezeConfigError

NAMED_VALUES = ("current", "initial", "zero")
PinnedValue = Union[str, float]


def normalize_value(value: Any) -> PinnedValue:
    """Validates a pinned-value spec.

    Args:
      value: ``"current"`` (the value when the rule is applied), ``"initial"``
        (the value when the registry was created, before any training),
        ``"zero"``, or a finite number (an int is taken as a float).

    Returns:
      The name, or the number as a Python ``float``.

    Raises:
      FreezeConfigError: anything else; the message lists what is allowed.
    """
    if isinstance(value, str):
        if value in NAMED_VALUES:
            return value
        try:
            number = float(value)
        except ValueError:
            raise FreezeConfigError(
                f"value must be one of {list(NAMED_VALUES)} or a number, got {value!r}"
            ) from None
        value = number
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise FreezeConfigError(f"value must be one of {list(NAMED_VALUES)} or a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise FreezeConfigError(f"value must be a finite number, got {value!r}")
    return float(value)


def is_zero(value: PinnedValue) -> bool:
    """True when the value pins elements to exactly 0 (``"zero"`` or ``0.0``)."""
    return value == "zero" or (not isinstance(value, str) and float(value) == 0.0)


def constant_pin(value: float, dtype: np.dtype, where: str) -> np.ndarray:
    """A constant pin as a 0-d array of ``dtype``, bit-exact (``-0.0`` stays ``-0.0``).

    Raises:
      FreezeConfigError: the value overflows ``dtype`` (``1e39`` for float32) or underflows to 0 (``1e-46``).
    """
    dtype = np.dtype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        pin = np.asarray(value, dtype=np.float64).astype(dtype)
    if np.issubdtype(dtype, np.floating) and (not np.isfinite(pin) or (pin == 0) != (float(value) == 0)):
        raise FreezeConfigError(f"{where}: value {value!r} is not representable in {dtype.name} "
                                f"(it would become {float(pin)}); use a value within {dtype.name}'s range")
    return pin


def resolve_value(value: PinnedValue, current: np.ndarray, initial: np.ndarray) -> np.ndarray:
    """The pinned values for every element of one variable.

    Args:
      value: a normalized value spec.
      current: the variable's value now; its dtype and shape are kept.
      initial: the variable's value when the registry was created.

    Returns:
      A new array with ``current``'s shape and dtype.
    """
    if value == "current":
        return np.array(current, copy=True)
    if value == "initial":
        return np.array(initial, dtype=current.dtype, copy=True)
    if value == "zero":
        return np.zeros_like(current)
    return np.full_like(current, float(value))


def rescaled(value: np.ndarray, trainable: np.ndarray) -> np.ndarray:
    """``value`` with its trainable elements scaled by ``sqrt(fan_in / kept)`` per output unit (last axis).

    ``fan_in`` is the product of all axes but the last and ``kept`` the number
    of trainable elements of each unit (at least 1), so that a sparse kernel
    keeps the scale of its dense initialisation; frozen elements keep their bits.

    Args:
      value: a kernel of at least two axes.
      trainable: bool array of its shape, ``True`` = may change.

    Returns:
      A new array of ``value``'s shape and dtype.
    """
    shape = value.shape
    kept = trainable.reshape(-1, shape[-1]).sum(axis=0)
    fan_in = float(np.prod(shape[:-1]))
    scale = np.sqrt(fan_in / np.maximum(kept, 1)).astype(value.dtype)
    return np.where(trainable, value * scale, value)
