"""Element selectors: which elements of one variable a rule freezes, resolved against that variable.

:func:`select_elements` takes a spec (validated by
:func:`trainer.masks.elements.normalize_elements`) and an
:class:`~trainer.masks.elements.ElementContext` and returns a boolean array of
the variable's shape where ``True`` means *frozen*. Pure NumPy; arrays from
files are read safely by :mod:`trainer.npfiles`.
"""

from __future__ import annotations

import os
import zlib
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from trainer.masks.elements import SELECTORS, ElementContext, int_list, normalize_elements, selector_name
from trainer.masks.errors import FreezeConfigError
from trainer.masks.groups import DEFAULT_NORM, _input_axis, fan_in_keep, smallest_groups
from trainer.masks.scores import n_m_mask
from trainer.masks.slicing import parse_slice
from trainer.npfiles import NpzReader, check_file, check_values, load_npy, path_is_npz


def load_array_file(path: str, what: str, key: Optional[str] = None) -> np.ndarray:
    """Loads a ``.npy`` array safely (checked by :mod:`trainer.npfiles`, never unpickled).

    With ``key``, an ``.npz`` archive is accepted too and its array ``key``
    is returned (e.g. a run's ``masks.npz``, keyed by variable path).

    Raises:
      FreezeConfigError: the path is missing, a directory, not a regular file
        (FIFO, device), over the size limit, not a ``.npy`` file (or an
        ``.npz`` without ``key``), a header claiming more data than the file
        holds, or an object dtype.
    """
    expected = ".npy file saved with np.save(path, bool_array)"
    path = check_file(path, what, FreezeConfigError, expected=expected)
    if key is None or not path_is_npz(path):
        return load_npy(path, what, FreezeConfigError, expected=expected)
    with NpzReader(path, what, FreezeConfigError, expected=expected) as archive:
        if key not in archive.files:
            raise FreezeConfigError(
                f"{what} {path!r} is an .npz archive without an array for variable {key!r} (it holds "
                f"{sorted(archive.files)[:10]}); pass a run's masks.npz, whose arrays are keyed by variable "
                "path, or one array saved with np.save(path, bool_array) (.npy)"
            )
        return archive.array(key)


def load_weights(path: str, variable_path: str) -> np.ndarray:
    """The array of ``variable_path`` in a ``weights.npz`` (``elements.weights_file``).

    Raises:
      FreezeConfigError: the file is unreadable, has no such array (the message lists what it holds), or
        the array is not numbers, or holds NaN or infinity (the checks of ``model.init_from``).
    """
    with NpzReader(path, "elements.weights_file", FreezeConfigError) as data:
        if variable_path not in data.files:
            raise FreezeConfigError(
                f"elements.weights_file {os.fspath(path)!r} has no array for variable {variable_path!r}; "
                f"it holds {sorted(data.files)}"
            )
        where = f"elements.weights_file {os.fspath(path)!r}"
        return check_values(variable_path, data.array(variable_path), "float64", where, FreezeConfigError)


def _path_seed(seed: int, path: str) -> int:
    # A stable per-variable seed, so two kernels get different random masks.
    return (int(seed) * 1_000_003 + zlib.crc32(path.encode("utf-8"))) % (2**32)


def _check_shape(array: np.ndarray, ctx: ElementContext, what: str) -> np.ndarray:
    if tuple(array.shape) != tuple(ctx.shape):
        raise FreezeConfigError(
            f"{what} has shape {tuple(array.shape)} but variable {ctx.path!r} has shape {tuple(ctx.shape)}; "
            f"give an array of shape {tuple(ctx.shape)}"
        )
    return array


def _smallest(magnitudes: np.ndarray, count: int) -> np.ndarray:
    frozen = np.zeros(magnitudes.size, dtype=bool)
    if count > 0:
        order = np.argsort(magnitudes.reshape(-1), kind="stable")
        frozen[order[:count]] = True
    return frozen.reshape(magnitudes.shape)


def _axis_selection(ctx: ElementContext, key: str, positions: list, axis: int) -> np.ndarray:
    if not ctx.shape:
        raise FreezeConfigError(f"elements.{key} needs a variable with at least one axis; {ctx.path!r} is a scalar")
    axis = axis % len(ctx.shape)
    length = ctx.shape[axis]
    bad = [p for p in positions if not 0 <= p < length]
    if bad:  # as elements.indices: no negative positions
        raise FreezeConfigError(
            f"elements.{key} {bad} out of range for variable {ctx.path!r} of shape {tuple(ctx.shape)}: "
            f"axis {axis} has {length} entries, so positions must lie in [0, {length - 1}]"
        )
    frozen = np.zeros(ctx.shape, dtype=bool)
    index = [slice(None)] * len(ctx.shape)
    index[axis] = np.asarray(positions, dtype=np.int64)
    frozen[tuple(index)] = True
    return frozen


def _random_subset(size: int, count: int, rng: np.random.Generator, packed: bool = False) -> np.ndarray:
    """A flat bool array with exactly ``count`` of ``size`` entries True, uniformly at random.

    Vectorised and O(size) at most: the smaller side (the ``count`` chosen or
    the ``size - count`` left) is drawn, by ``Generator.choice`` without
    replacement when it is small, else as the smallest of ``size`` uniform
    float32 keys (``np.argpartition``). The draws are those of earlier versions:
    the same seed selects the same elements (checkpoints store the selection).
    With ``packed``, the result is ``np.packbits`` of that array, built from the
    drawn positions alone when they are few (no bool array of ``size``).
    """
    small = min(count, size - count)
    if small <= size // 20:
        picked = rng.choice(size, small, replace=False) if small else np.empty(0, np.int64)
        if packed:
            return _packed_at(size, picked, small == count)
    else:
        picked = np.argpartition(rng.random(size, dtype=np.float32), small - 1)[:small]
    chosen = np.zeros(size, dtype=bool) if small == count else np.ones(size, dtype=bool)  # one pass either way
    chosen[picked] = small == count
    return np.packbits(chosen) if packed else chosen


def _packed_at(size: int, positions: np.ndarray, value: bool) -> np.ndarray:
    """``np.packbits`` of a flat bool array of ``size`` entries that are ``value`` at ``positions``, else not."""
    out = np.zeros((size + 7) // 8, np.uint8) if value else _padded(np.full((size + 7) // 8, 0xFF, np.uint8), size)
    masks = np.right_shift(0x80, positions & 7).astype(np.uint8)  # packbits is big-endian: entry 8 b + c is bit c
    if value:
        np.bitwise_or.at(out, positions >> 3, masks)
    else:
        np.bitwise_and.at(out, positions >> 3, ~masks)
    return out


def _padded(packed: np.ndarray, size: int) -> np.ndarray:
    """``packed`` with the padding bits past ``size`` entries set to 0, as ``np.packbits`` leaves them."""
    if size % 8:
        packed[-1] &= np.uint8((0xFF << (8 - size % 8)) & 0xFF)
    return packed


def _select_indices(ctx: ElementContext, value: Any) -> np.ndarray:
    frozen = np.zeros(ctx.size, dtype=bool)
    if isinstance(value, Sequence) and value and isinstance(value[0], Sequence):
        rows = [list(v) for v in value]
        if any(len(r) != len(ctx.shape) for r in rows):
            raise FreezeConfigError(
                f"elements.indices {value!r}: each multi-dimensional index needs {len(ctx.shape)} "
                f"entries for variable {ctx.path!r} of shape {tuple(ctx.shape)}"
            )
        coords = np.asarray(rows, dtype=np.int64).T
        for axis, (c, n) in enumerate(zip(coords, ctx.shape)):
            if ((c < 0) | (c >= n)).any():
                raise FreezeConfigError(
                    f"elements.indices {value!r} out of range for variable {ctx.path!r} of shape "
                    f"{tuple(ctx.shape)} (axis {axis} has {n} entries)"
                )
        frozen[np.ravel_multi_index(tuple(coords), ctx.shape)] = True
    else:
        flat = np.asarray(int_list(value, "indices"), dtype=np.int64)
        bad = flat[(flat < 0) | (flat >= ctx.size)]
        if bad.size:
            raise FreezeConfigError(
                f"elements.indices {bad.tolist()} out of range for variable {ctx.path!r} of shape "
                f"{tuple(ctx.shape)} and size {ctx.size}: flat indices must lie in [0, {ctx.size - 1}]"
            )
        frozen[flat] = True
    return frozen.reshape(ctx.shape)


def _random(spec: Mapping[str, Any], ctx: ElementContext, packed: bool = False) -> np.ndarray:
    return _random_subset(ctx.size, int(round(float(spec["random"]) * ctx.size)),
                          np.random.default_rng(_path_seed(spec.get("seed", 0), ctx.path)), packed)


def _select(spec: Mapping[str, Any], ctx: ElementContext) -> np.ndarray:
    key = selector_name(spec)
    value = spec[key]
    if key == "all":
        return np.ones(ctx.shape, dtype=bool)
    if key == "indices":
        return _select_indices(ctx, value)
    if key == "slice":
        index = parse_slice(value)
        frozen = np.zeros(ctx.shape, dtype=bool)
        try:
            frozen[index] = True
        except IndexError as err:
            raise FreezeConfigError(
                f"elements.slice {value!r} does not fit variable {ctx.path!r} of shape {tuple(ctx.shape)}: {err}"
            ) from None
        if not frozen.any():
            raise FreezeConfigError(f"elements.slice {value!r} selects no element of variable {ctx.path!r} "
                                    f"of shape {tuple(ctx.shape)}")
        return frozen
    if key == "mask":
        trainable = _check_shape(np.asarray(value), ctx, f"elements.mask for {ctx.path!r}")
        return ~trainable.astype(bool)
    if key == "mask_file":
        array = load_array_file(value, "elements.mask_file", key=ctx.path)
        if array.dtype != bool and (array.dtype.kind not in "iuf" or not np.isin(array, (0, 1)).all()):
            raise FreezeConfigError(
                f"elements.mask_file {value!r} must hold booleans or 0/1 (1 = trainable), got dtype {array.dtype}"
            )
        return ~_check_shape(array, ctx, f"elements.mask_file {value!r}").astype(bool)
    if key == "random":
        return _random(spec, ctx).reshape(ctx.shape)
    if key in ("magnitude", "magnitude_threshold"):
        weights = ctx.value
        if "weights_file" in spec:
            weights = _check_shape(
                load_weights(spec["weights_file"], ctx.path), ctx, f"weights for {ctx.path!r}"
            )
        magnitudes = np.abs(np.asarray(weights, dtype=np.float64))
        if key == "magnitude_threshold":
            return magnitudes < float(value)
        if "groups" in spec:  # whole units / inputs / blocks / heads by their norm (trainer.masks.groups)
            return smallest_groups(magnitudes, float(value), spec["groups"], spec.get("norm", DEFAULT_NORM),
                                   spec.get("block"), path=ctx.path, heads_axis=ctx.heads_axis)
        return _smallest(magnitudes, int(round(float(value) * ctx.size)))
    if key == "n_m":  # the N largest |w| of every M along the input axis train (Mishra et al. 2021)
        weights = ctx.value
        if "weights_file" in spec:
            weights = _check_shape(load_weights(spec["weights_file"], ctx.path), ctx, f"weights for {ctx.path!r}")
        if len(ctx.shape) < 1:
            raise FreezeConfigError(f"elements.n_m needs a variable with at least one axis; {ctx.path!r} is a scalar")
        axis = spec.get("axis", _input_axis(ctx.shape))
        keep = n_m_mask(np.abs(np.asarray(weights, dtype=np.float64)), n=int(value[0]), m=int(value[1]), axis=axis,
                        path=ctx.path)
        return ~keep
    if key == "fan_in":  # constant fan-in: the k largest |w| of every output unit train (SRigL)
        weights = ctx.value
        if "weights_file" in spec:
            weights = _check_shape(load_weights(spec["weights_file"], ctx.path), ctx, f"weights for {ctx.path!r}")
        return ~fan_in_keep(weights, int(value), path=ctx.path)
    if key == "units":
        return _axis_selection(ctx, key, int_list(value, key), -1)
    if key == "rows":
        return _axis_selection(ctx, key, int_list(value, key), 0)
    if key == "inputs":
        # First axis of a Dense kernel (in, out); input channels (axis -2) of a conv kernel.
        # A vector (a bias, a BatchNorm scale) has no input axis: its one axis is the units'.
        if len(ctx.shape) < 2:
            raise FreezeConfigError(
                f"elements.inputs needs a kernel with an input axis; {ctx.path!r} has shape {tuple(ctx.shape)}. "
                "Select only kernels (e.g. select: '*/kernel') or use elements.units for a vector"
            )
        return _axis_selection(ctx, key, int_list(value, key), _input_axis(ctx.shape))
    raise FreezeConfigError(f"unknown selector {key!r}; allowed: {list(SELECTORS)}")


def select_elements(spec: Any, ctx: ElementContext, fraction: Optional[float] = None, *,
                    packed: bool = False) -> np.ndarray:
    """Resolves an element selector against one variable.

    Args:
      spec: an elements spec (see :func:`normalize_elements`).
      ctx: the variable's :class:`ElementContext`.
      fraction: for ``magnitude`` and ``random`` selectors only, a fraction
        that replaces the spec's (used by gradual-pruning schedules and by
        layer-wise allocations, which give each variable its own fraction).
      packed: return ``np.packbits`` of the flat result instead (a ``random``
        selector builds it without a bool array of the variable's size).

    Returns:
      ``np.ndarray`` of dtype bool and shape ``ctx.shape``; ``True`` = frozen
      (with ``packed``, its packed bits: ``uint8``, ``ceil(ctx.size / 8)`` bytes).

    Raises:
      FreezeConfigError: the spec does not fit this variable (indices out of
        range, a mask or slice of the wrong shape, a missing file).
    """
    spec = normalize_elements(spec)
    if fraction is not None:
        key = selector_name(spec)
        if key not in ("magnitude", "random"):
            raise FreezeConfigError(f"a fraction can replace only a magnitude or random selector's, not {key!r}'s")
        spec = dict(spec, **{key: fraction})
    invert = spec.get("invert", False)
    if packed and selector_name(spec) == "random":
        frozen = _random(spec, ctx, packed=True)
        return _padded(~frozen, ctx.size) if invert else frozen
    frozen = _select(spec, ctx)
    frozen = ~frozen if invert else frozen
    return np.packbits(frozen.reshape(-1)) if packed else frozen
