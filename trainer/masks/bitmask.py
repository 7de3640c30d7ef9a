"""Bool masks at billion-element scale: a mask kept packed, and the few False entries of a mostly True one.

At 99.9 % frozen, the trainable elements of a variable are the few False entries of its frozen mask. A rule's
selection is kept as ``np.packbits`` (1 bit per element) until it is applied; set-up of a compact update reads it
as a :class:`PackedMask` without unpacking it: its count by a popcount, its False entries by unpacking only the
packed bytes that are not ``0xFF`` (O(size / 8 + found), no full-size temporary), sorted as ``np.flatnonzero``
gives them, and its packed bytes are what the digest checksums (:func:`trainer.masks.audit.digest`).
"""

from __future__ import annotations

import functools
from typing import Tuple

import numpy as np

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)  # where NumPy < 2 has no bitwise_count


def false_positions(packed: np.ndarray, size: int) -> np.ndarray:
    """The sorted flat positions of the False entries among the first ``size`` bits of ``np.packbits(mask)``.

    Equal to ``np.flatnonzero(~mask)`` for ``packed = np.packbits(mask.reshape(-1))``; fast when few are False.

    Returns:
      An ``int64`` array of flat positions, ascending.
    """
    partial = np.flatnonzero(packed != 0xFF)  # bytes holding at least one False (or the last byte's padding)
    rows, cols = np.nonzero(np.unpackbits(packed[partial]).reshape(-1, 8) == 0)
    positions = partial[rows].astype(np.int64) * 8 + cols  # packbits is big-endian: bit c of byte b is entry 8 b + c
    return positions[positions < size]


class PackedMask:
    """A bool mask held as ``np.packbits`` of its flat (C-order) entries, with its shape.

    Args:
      packed: the packed bits (``uint8``, ``ceil(size / 8)`` bytes; the padding bits 0).
      shape: the mask's shape.
    """

    def __init__(self, packed: np.ndarray, shape: Tuple[int, ...]):
        self.packed, self.shape = packed, tuple(int(d) for d in shape)
        self.size = int(np.prod(self.shape, dtype=np.int64))
        self.ndim = len(self.shape)

    @classmethod
    def pack(cls, mask: np.ndarray) -> "PackedMask":
        """Packs a bool array."""
        return cls(np.packbits(np.asarray(mask, bool).reshape(-1)), np.shape(mask))

    def unpack(self) -> np.ndarray:
        """The bool array (a new one each call)."""
        return np.unpackbits(self.packed, count=self.size).view(bool).reshape(self.shape)  # 0 / 1 bytes

    @functools.cached_property
    def count(self) -> int:
        """How many entries are True."""
        ones = np.bitwise_count(self.packed) if hasattr(np, "bitwise_count") else _POPCOUNT[self.packed]
        return int(ones.sum(dtype=np.int64))

    def all(self) -> bool:
        """True when every entry is True (as ``ndarray.all``)."""
        return self.count == self.size

    def false_positions(self) -> np.ndarray:
        """:func:`false_positions` of this mask."""
        return false_positions(self.packed, self.size)
