"""Bool masks at billion-element scale: the few False entries of a mostly True mask, found from its packed bits.

At 99.9 % frozen, the trainable elements of a variable are the few False entries of its frozen mask. Finding them
with ``np.flatnonzero(~frozen)`` makes a second full-size mask and scans it byte by byte; here the mask is packed
(``np.packbits``, one pass, an eighth of the size), only the packed bytes that are not ``0xFF`` are unpacked, and
the positions come out sorted, as ``np.flatnonzero`` gives them.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def false_positions(mask: np.ndarray, packed: Optional[np.ndarray] = None) -> np.ndarray:
    """The sorted flat positions of the False entries of a bool mask: ``np.flatnonzero(~mask)``.

    O(size / 8 + found) beyond the packing, and no full-size temporary: fast when few entries are False.

    Args:
      mask: a bool array (any shape; C order).
      packed: ``np.packbits(mask.reshape(-1))`` when the caller has it already.

    Returns:
      An ``int64`` array of flat positions, ascending.
    """
    size = int(mask.size)
    packed = np.packbits(mask.reshape(-1)) if packed is None else packed
    partial = np.flatnonzero(packed != 0xFF)  # bytes holding at least one False (or the last byte's padding)
    rows, cols = np.nonzero(np.unpackbits(packed[partial]).reshape(-1, 8) == 0)
    positions = partial[rows] * 8 + cols  # packbits is big-endian: bit c of byte b is entry 8 b + c
    return positions[positions < size]
