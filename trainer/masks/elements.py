"""Element selector specs: what a selector may name, and its validation without a variable.

A selector spec is ``"all"`` or a mapping with exactly one selector key and its
options, for example ``{"random": 0.9, "seed": 0}`` or ``{"slice": "[:, :10]"}``.
:func:`validate_elements` checks a spec without a variable (so bad configs fail
before a model is built); :func:`trainer.masks.selectors.select_elements`
resolves it against one variable, as a pure NumPy function of an
:class:`ElementContext`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import numpy as np

from trainer.masks.allocation import DISTRIBUTIONS
from trainer.masks.checks import check_known, is_whole
from trainer.masks.errors import FreezeConfigError
from trainer.masks.groups import check_fan_in, check_groups
from trainer.masks.scores import check_n_m
from trainer.masks.slicing import parse_slice


@dataclasses.dataclass(frozen=True)
class ElementContext:
    """What a selector may look at for one variable.

    Attributes:
      path: the Keras variable path, e.g. ``"lenet/fc1/kernel"``.
      shape: the variable's shape.
      value: the variable's current value, a NumPy array of ``shape``, or
        ``None`` for selectors that do not read values (all but ``magnitude``
        and ``magnitude_threshold``): the registry keeps no host copy.
      initial: the value ``value: initial`` pins to, or ``None``.
      heads_axis: the axis indexing attention heads (:mod:`trainer.masks.heads`), or ``None``.
    """

    path: str
    shape: tuple
    value: Optional[np.ndarray]
    initial: Optional[np.ndarray] = None
    heads_axis: Optional[int] = None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


# Options that may accompany a selector key, by selector.
_OPTIONS: Dict[str, tuple] = {
    "all": (),
    "indices": (),
    "slice": (),
    "mask": (),
    "mask_file": (),
    "random": ("seed", "allocation", "erk_power_scale"),
    "magnitude": ("weights_file", "allocation", "erk_power_scale", "groups", "norm", "block"),
    "magnitude_threshold": ("weights_file",),
    "units": (),
    "inputs": (),
    "rows": (),
    "n_m": ("axis", "weights_file"),
    "fan_in": ("weights_file",),
}
_COMMON_OPTIONS = ("invert",)
SELECTORS = tuple(_OPTIONS)


def _fraction(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FreezeConfigError(f"elements.{key} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise FreezeConfigError(f"elements.{key} must be a fraction in [0, 1], got {value!r}")
    return float(value)


def int_list(value: Any, key: str) -> list:
    """``value`` (an integer or a sequence of integers) as a list of Python ints, for ``elements.<key>``.

    Raises:
      FreezeConfigError: not integers, or one outside the int64 range.
    """
    if is_whole(value):
        value = [value]
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise FreezeConfigError(f"elements.{key} must be a list of integers, got {value!r}")
    out = []
    for item in value:
        if not is_whole(item):
            raise FreezeConfigError(f"elements.{key} must be a list of integers, got {value!r}")
        if not -2**63 <= int(item) < 2**63:
            raise FreezeConfigError(f"elements.{key} {int(item)} is out of range: an index must lie in "
                                    "[0, size - 1] of its variable")
        out.append(int(item))
    return out


def normalize_elements(spec: Any) -> Dict[str, Any]:
    """Returns the spec as a plain dict with one selector key, validated.

    Args:
      spec: ``"all"``, or a mapping such as ``{"random": 0.9, "seed": 0}``.

    Returns:
      A new ``dict``; ``"all"`` becomes ``{"all": True}``.

    Raises:
      FreezeConfigError: unknown or missing selector key, an option that does
        not belong to the selector, or a value of the wrong type or range.
    """
    if isinstance(spec, str):
        if spec == "all":
            return {"all": True}
        raise FreezeConfigError(
            f"elements must be 'all' or a mapping with one of {list(SELECTORS)}, got {spec!r}"
        )
    if not isinstance(spec, Mapping):
        raise FreezeConfigError(
            f"elements must be 'all' or a mapping with one of {list(SELECTORS)}, got {spec!r}"
        )
    spec = dict(spec)
    keys = [k for k in spec if k in _OPTIONS]
    if len(keys) != 1:
        raise FreezeConfigError(
            f"elements must name exactly one selector of {list(SELECTORS)}, got keys {sorted(spec)}"
        )
    key = keys[0]
    allowed = set(_OPTIONS[key]) | set(_COMMON_OPTIONS) | {key}
    check_known(spec, allowed, error=FreezeConfigError, what=f"unknown option(s) {{unknown}} for selector {key!r}",
                shown=sorted(allowed - {key}))
    if "invert" in spec and not isinstance(spec["invert"], bool):
        raise FreezeConfigError(f"elements.invert must be true or false, got {spec['invert']!r}")
    value = spec[key]
    if key == "all":
        if value is not True:
            raise FreezeConfigError(f"elements.all must be true, got {value!r}")
    elif key in ("random", "magnitude"):
        _fraction(value, key)
        _check_allocation(spec, key)
        if key == "magnitude":
            check_groups(spec)  # groups: units | inputs | blocks | heads (trainer.masks.groups)
        if key == "random" and "seed" in spec:
            seed = spec["seed"]
            if not is_whole(seed, 0):
                raise FreezeConfigError(f"elements.seed must be a non-negative integer, got {seed!r}")
    elif key == "magnitude_threshold":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise FreezeConfigError(
                f"elements.magnitude_threshold must be a non-negative number, got {value!r}"
            )
    elif key == "indices":
        if isinstance(value, Sequence) and value and all(
            isinstance(v, Sequence) and not isinstance(v, str) for v in value
        ):
            for index in value:
                int_list(index, "indices")
        else:
            int_list(value, "indices")
    elif key == "slice":
        parse_slice(value)
    elif key in ("units", "inputs", "rows"):
        int_list(value, key)
    elif key == "n_m":
        if not (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2):
            raise FreezeConfigError(f"elements.n_m must be [N, M] (N of every M consecutive elements train, "
                                    f"e.g. [2, 4]), got {value!r}")
        check_n_m(value[0], value[1])
        axis = spec.get("axis")
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise FreezeConfigError(f"elements.axis must be an integer, got {axis!r}")
    elif key == "fan_in":
        check_fan_in(value)
    elif key in ("mask_file",):
        if not isinstance(value, (str, os.PathLike)):
            raise FreezeConfigError(f"elements.mask_file must be a path to a .npy file, got {value!r}")
    elif key == "mask":
        try:
            array = np.asarray(value)
        except ValueError as err:
            raise FreezeConfigError(f"elements.mask is not a rectangular array: {err}") from None
        if array.dtype == object or not np.isin(array, (0, 1)).all():
            raise FreezeConfigError(
                f"elements.mask must hold only 0 and 1 (1 = trainable), got {value!r}"
            )
    if "weights_file" in spec and not isinstance(spec["weights_file"], (str, os.PathLike)):
        raise FreezeConfigError(f"elements.weights_file must be a path, got {spec['weights_file']!r}")
    return spec


def _check_allocation(spec: Mapping[str, Any], key: str) -> None:
    """Checks ``allocation`` / ``erk_power_scale`` of a ``random`` or ``magnitude`` selector."""
    allocation = spec.get("allocation")
    allowed = list(DISTRIBUTIONS) + (["global"] if key == "magnitude" else [])
    if allocation is not None and allocation not in allowed:
        raise FreezeConfigError(f"elements.allocation of a {key} selector must be one of {allowed}, "
                                f"got {allocation!r}")
    if allocation is not None and not float(spec[key]) < 1.0:
        raise FreezeConfigError(f"elements.{key} with an allocation must be below 1 (the fraction frozen over all "
                                f"selected variables; some elements must stay trainable), got {spec[key]!r}")
    if "erk_power_scale" in spec:
        power = spec["erk_power_scale"]
        if allocation != "erk":
            raise FreezeConfigError("elements.erk_power_scale needs allocation: erk, got allocation "
                                    f"{allocation!r}")
        if isinstance(power, bool) or not isinstance(power, (int, float)) or not power > 0:
            raise FreezeConfigError(f"elements.erk_power_scale must be a positive number (1 in RigL), got {power!r}")


def selector_name(spec: Mapping[str, Any]) -> str:
    """The selector key of a normalized spec, e.g. ``"random"``."""
    return next(k for k in spec if k in _OPTIONS)


validate_elements: Callable[[Any], Dict[str, Any]] = normalize_elements
