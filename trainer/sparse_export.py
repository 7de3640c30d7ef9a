"""Compressed export of sparse weights (``export.sparse=true``): COO arrays that load back bit-exactly.

``sparse_weights.npz`` (written with ``np.savez_compressed``) holds, for every
variable some freeze rule covers, three arrays keyed by its variable path:
``<path>:indices`` (flat row-major indices of the elements whose bit pattern
is not +0.0, int32, or int64 past 2**31 elements), ``<path>:values`` (those
elements, the variable's dtype; -0.0 and NaN keep their bits) and
``<path>:shape`` (int64). Every other variable is stored dense under its path,
as in ``weights.npz``. :func:`load_sparse_weights` rebuilds the dense arrays,
refusing (one line each) any file or array that does not fit this format.

Unstructured sparsity saves storage, not time: TensorFlow's dense kernels
(matmul, convolution) run as fast on a matrix of zeros as on any other, so a
model loaded from this file computes exactly as the dense one does.
"""

from __future__ import annotations

import math
import os
from typing import Dict, Iterable, Mapping, Tuple

import numpy as np

from trainer.npfiles import MAX_BYTES, NpzReader

__all__ = ["load_sparse_weights", "sparse_arrays", "write_sparse_weights"]

INDICES, VALUES, SHAPE = ":indices", ":values", ":shape"
PARTS = (INDICES, VALUES, SHAPE)
MAX_RANK = 64  # NumPy's own limit on dimensions
WHAT = "sparse weights"
EXPECTED = ".npz archive saved with trainer.sparse_export.write_sparse_weights (export.sparse=true)"


def sparse_arrays(weights: Mapping[str, np.ndarray], sparse_paths: Iterable[str]) -> Dict[str, np.ndarray]:
    """The arrays of ``sparse_weights.npz``: COO for ``sparse_paths``, dense for the rest.

    Args:
      weights: ``{variable path: array}`` of every variable.
      sparse_paths: the paths stored as indices and values.

    Returns:
      ``{name: array}`` ready for ``np.savez_compressed``.

    Raises:
      KeyError: a sparse path that ``weights`` does not hold.
    """
    sparse = set(sparse_paths)
    missing = sorted(sparse - set(weights))
    if missing:
        raise KeyError(f"no weights for {missing}")
    out: Dict[str, np.ndarray] = {}
    for path, value in weights.items():
        value = np.asarray(value)
        if path not in sparse:
            out[path] = value
            continue
        flat = value.reshape(-1)
        nonzero = flat.view(np.dtype(f"u{flat.dtype.itemsize}")) != 0  # +0.0 is the only all-zero bit pattern
        index = np.flatnonzero(nonzero).astype(np.int64 if flat.size >= 2**31 else np.int32)
        out[path + INDICES] = index
        out[path + VALUES] = flat[index]
        out[path + SHAPE] = np.asarray(value.shape, dtype=np.int64)
    return out


def write_sparse_weights(weights: Mapping[str, np.ndarray], sparse_paths: Iterable[str], path: str) -> Dict[str, int]:
    """Writes ``sparse_weights.npz`` to ``path`` (a file object or name) and returns its sizes.

    Returns:
      ``{"bytes": size of the file, "dense_bytes": size of the same arrays
      stored dense, "nonzero": stored elements of the sparse variables,
      "elements": all elements of the sparse variables}``.
    """
    arrays = sparse_arrays(weights, sparse_paths)
    np.savez_compressed(path, **arrays)
    sparse = set(sparse_paths)
    return {
        "bytes": int(os.path.getsize(path)),
        "dense_bytes": int(sum(np.asarray(v).nbytes for v in weights.values())),
        "nonzero": int(sum(arrays[p + INDICES].size for p in sparse)),
        "elements": int(sum(np.asarray(weights[p]).size for p in sparse)),
    }


def _header(data: NpzReader, name: str, where: str, kinds: str, what: str) -> Tuple[int, np.dtype]:
    """``(length, dtype)`` of the 1-D array ``name`` from its header; refuses another rank or dtype kind."""
    shape, dtype = data.header(name)
    if len(shape) != 1 or dtype.kind not in kinds:
        raise ValueError(f"{where} array {name!r} must be a 1-D array of {what}, got a {shape} {dtype} array")
    return int(shape[0]), dtype


def _budget(used: int, nbytes: int, where: str, name: str, shape: tuple, dtype: np.dtype, limit: int) -> int:
    """``used + nbytes``, refused past ``limit`` (before the array is allocated)."""
    if used + nbytes > limit:
        raise ValueError(f"{where}: {name!r} would be a {shape} {dtype} array ({nbytes:,} bytes); the arrays loaded "
                         f"may hold {limit:,} bytes together (max_bytes)")
    return used + nbytes


def _dense(data: NpzReader, base: str, where: str, used: int, limit: int) -> Tuple[np.ndarray, int]:
    """The dense array of sparse variable ``base`` and the bytes used so far; every check before allocating."""
    length, _ = _header(data, base + SHAPE, where, "iu", "non-negative integers (the variable's shape)")
    if length > MAX_RANK:
        raise ValueError(f"{where} array {base + SHAPE!r} has {length} dimensions, at most {MAX_RANK} are allowed")
    dims = data.array(base + SHAPE)
    if (dims < 0).any():
        raise ValueError(f"{where} array {base + SHAPE!r} must hold non-negative integers, got {dims.tolist()}")
    shape = tuple(int(d) for d in dims)
    size = math.prod(shape)
    count, _ = _header(data, base + INDICES, where, "iu", "integers (flat row-major element indices)")
    values, dtype = _header(data, base + VALUES, where, "biufc", "numbers")
    if count != values:
        raise ValueError(f"{where}: {base!r} has {count} indices but {values} values; they must pair one to one")
    if count > size:
        raise ValueError(f"{where} array {base + INDICES!r} holds {count} indices for a {shape} array of {size} "
                         "elements; each element is stored at most once")
    used = _budget(used, size * dtype.itemsize, where, base, shape, dtype, limit)
    index = data.array(base + INDICES)
    if count:
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= size:
            raise ValueError(f"{where} array {base + INDICES!r} holds indices in [{low}, {high}], outside [0, {size}) "
                             f"for shape {shape}")
        ordered = np.sort(index)
        repeated = ordered[1:][ordered[1:] == ordered[:-1]]
        if repeated.size:
            raise ValueError(f"{where} array {base + INDICES!r} holds index {int(repeated[0])} more than once "
                             f"({np.unique(repeated).size} indices repeated); each element is stored at most once")
    dense = np.zeros(size, dtype=dtype)
    dense[index] = data.array(base + VALUES)
    return dense.reshape(shape), used


def load_sparse_weights(path: str, *, max_bytes: int = MAX_BYTES) -> Dict[str, np.ndarray]:
    """``{variable path: dense array}`` from a ``sparse_weights.npz``, bit-exact (the format of ``weights.npz``).

    The file is read through :class:`trainer.npfiles.NpzReader` (a regular
    file only, nothing unpickled, every array's header checked against the
    archive before it is read) and every array is checked before the dense
    ones are allocated.

    Args:
      path: the ``sparse_weights.npz`` written by ``export.sparse=true``.
      max_bytes: the limit for the file, for each array in it, and for the
        arrays returned, together (4 GiB by default).

    Returns:
      Every variable path mapped to its array: each sparse variable of the
      shape in ``<path>:shape`` and the dtype of ``<path>:values``.

    Raises:
      ValueError: one line naming the file, the array and what is allowed:
        a missing path, a directory, FIFO or device, a file over
        ``max_bytes``, not an ``.npz`` (a ``.npy``, a text file, a pickle),
        an object array; a sparse variable without one of its three arrays;
        a shape that is not a 1-D array of non-negative integers; indices that
        are not 1-D integers, not as many as the values, outside the shape or
        repeated; arrays that together would exceed ``max_bytes``.
    """
    out: Dict[str, np.ndarray] = {}
    with NpzReader(path, WHAT, ValueError, expected=EXPECTED, max_bytes=max_bytes) as data:
        where = f"{WHAT} {data.path!r}"
        names = set(data.files)
        bases = sorted({name[: -len(part)] for name in names for part in PARTS if name.endswith(part)})
        for base in bases:
            missing = [base + part for part in PARTS if base + part not in names]
            if missing:
                raise ValueError(f"{where}: {base!r} has no {' or '.join(map(repr, missing))}; a sparse variable needs "
                                 "<path>:indices, <path>:values and <path>:shape")
        used = 0
        for name in sorted(n for n in names if not n.endswith(PARTS)):
            shape, dtype = data.header(name)
            used = _budget(used, math.prod(shape) * dtype.itemsize, where, name, shape, dtype, max_bytes)
            out[name] = data.array(name)
        for base in bases:
            out[base], used = _dense(data, base, where, used, max_bytes)
    return {name: out[name] for name in sorted(out)}
