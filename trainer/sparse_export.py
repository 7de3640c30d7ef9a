"""Compressed export of sparse weights (``export.sparse=true``): COO arrays that load back bit-exactly.

``sparse_weights.npz`` (written with ``np.savez_compressed``) holds, for every
variable some freeze rule covers, three arrays keyed by its variable path:
``<path>:indices`` (flat row-major indices of the elements whose bit pattern
is not +0.0, int32, or int64 past 2**31 elements), ``<path>:values`` (those
elements, the variable's dtype; -0.0 and NaN keep their bits) and
``<path>:shape`` (int64). Every other variable is stored dense under its path,
as in ``weights.npz``. :func:`load_sparse_weights` rebuilds the dense arrays.

Unstructured sparsity saves storage, not time: TensorFlow's dense kernels
(matmul, convolution) run as fast on a matrix of zeros as on any other, so a
model loaded from this file computes exactly as the dense one does.
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, Mapping

import numpy as np

__all__ = ["load_sparse_weights", "sparse_arrays", "write_sparse_weights"]

INDICES, VALUES, SHAPE = ":indices", ":values", ":shape"


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


def load_sparse_weights(path: str) -> Dict[str, np.ndarray]:
    """``{variable path: dense array}`` from a ``sparse_weights.npz``, bit-exact (the format of ``weights.npz``).

    Raises:
      ValueError: a variable's indices, values and shape do not fit together.
    """
    out: Dict[str, np.ndarray] = {}
    with np.load(path, allow_pickle=False) as data:
        names = set(data.files)
        for name in sorted(names):
            if name.endswith(SHAPE):
                base = name[: -len(SHAPE)]
                shape = tuple(int(d) for d in data[name])
                index, values = data[base + INDICES], data[base + VALUES]
                size = int(np.prod(shape, dtype=np.int64))
                if index.shape != values.shape or (index.size and (index.min() < 0 or index.max() >= size)):
                    raise ValueError(f"{path}: the indices and values of {base!r} do not fit its shape {shape}")
                dense = np.zeros(size, dtype=values.dtype)
                dense[index] = values
                out[base] = dense.reshape(shape)
            elif not name.endswith((INDICES, VALUES)):
                out[name] = data[name]
    return out
