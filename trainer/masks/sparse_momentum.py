"""Sparse Momentum (Dettmers & Zettlemoyer 2019): grow where the momentum is largest, redistribute by mean momentum.

"Sparse Networks from Scratch: Faster Training without Losing Performance"
(arXiv:1907.04840), code ``TimDettmers/sparse_learning``
(``sparselearning/core.py`` ``Masking.truncate_weights``,
``sparselearning/funcs.py`` ``magnitude_prune``, ``momentum_growth``,
``momentum_redistribution``). At each mask update (once per epoch there):

1. per variable, the mean momentum magnitude over its active elements, divided
   by the sum over the rule's variables: the share of the regrowth it gets;
2. per variable, drop the ``ceil(drop_fraction * active)`` active elements of
   smallest ``|w|`` (:func:`momentum_drop_and_grow`);
3. regrow the total dropped across the variables by those shares
   (:func:`growth_counts`), in each variable where ``|momentum|`` is largest
   among the elements inactive after the drop (so an element dropped now may be
   regrown at once: it then keeps its value, as ``sparse_learning``'s mask
   product leaves it).

The momentum of an element that has been frozen at 0 is only meaningful if its
gradient reached the optimizer: a rule with ``regrow.method: momentum`` passes
the true gradient of its frozen elements to the optimizer
(``regrow.frozen_gradients: pass``, :class:`PassingDenseUpdate`) and re-projects
the weights to exactly 0 after each step, as ``sparse_learning`` (which never
masks gradients and multiplies the weights by the mask after each step).

Differences from ``sparse_learning``: the total regrown equals the total
dropped exactly (largest-remainder rounding, capped at what each variable can
hold), where ``sparse_learning`` floors each share, caps at 0.99 of the
capacity and corrects the total over later updates with a smoothed
``adjusted_growth``; ties are broken by the lower flat index; Keras SGD keeps
``m = mu * m - lr * g`` where PyTorch keeps ``buf = mu * buf + g``: the same
ranking within a variable and the same shares while the learning rate is
constant (right after a learning-rate step the Keras momentum still carries the
old rate for a few steps).
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from trainer.masks.errors import FreezeConfigError
from trainer.masks.regrow import RegrowUpdate, _select
from trainer.masks.updates import DenseUpdate

TensorLike = Any


def drop_count(drop_fraction: float, active: int) -> int:
    """``sparse_learning``'s ``num_remove``: ``ceil(drop_fraction * active)`` (float64), at most ``active``."""
    return int(min(math.ceil(float(drop_fraction) * int(active)), int(active)))


def growth_counts(dropped: Sequence[int], capacity: Sequence[int], shares: Sequence[float]) -> List[int]:
    """How many elements each variable regrows: the total dropped, split by ``shares``, capped by ``capacity``.

    Each variable first gets ``share_i / sum(shares) * total`` (a real
    number); what exceeds its capacity is split again among the others by
    their shares, until nothing exceeds; the real counts are then rounded by
    largest remainder (ties: the lower index), so the counts sum to
    ``min(total, sum(capacity))`` exactly.

    Args:
      dropped: per variable, the elements dropped at this update (ints >= 0).
      capacity: per variable, the elements it may grow (inactive after the drop).
      shares: per variable, a number >= 0 (the mean momentum magnitude);
        non-finite counts as 0; all 0: split by ``dropped``.

    Returns:
      A list of ints, one per variable, each in ``[0, capacity_i]``.

    Raises:
      FreezeConfigError: lists of different lengths, or a negative count.

    Examples:
      >>> growth_counts([10, 10], [100, 100], [3.0, 1.0])
      [15, 5]
      >>> growth_counts([10, 10], [100, 4], [1.0, 3.0])
      [16, 4]
    """
    if not len(dropped) == len(capacity) == len(shares):
        raise FreezeConfigError(f"growth_counts needs lists of one length, got {len(dropped)}, {len(capacity)} "
                                f"and {len(shares)}")
    if any(int(d) < 0 for d in dropped) or any(int(c) < 0 for c in capacity):
        raise FreezeConfigError(f"growth_counts needs counts >= 0, got dropped {list(dropped)}, "
                                f"capacity {list(capacity)}")
    cap = np.asarray(capacity, np.int64)
    w = np.nan_to_num(np.asarray(shares, np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0.0)
    if not w.sum():
        w = np.asarray(dropped, np.float64)
    total = int(min(int(np.sum(dropped)), int(cap.sum())))
    real = np.zeros(len(cap))
    open_ = cap > 0
    left = float(total)
    while left > 1e-9 and open_.any():
        weights = np.where(open_, w, 0.0)
        if not weights.sum():
            weights = open_.astype(np.float64)
        real = real + left * weights / weights.sum()
        over = real > cap
        left = float(np.sum(real[over] - cap[over]))
        real = np.minimum(real, cap)
        open_ = real < cap
    counts = np.floor(real + 1e-9).astype(np.int64)
    rest = total - int(counts.sum())
    order = sorted(range(len(cap)), key=lambda i: (-(real[i] - counts[i]), i))
    for i in order:
        if rest <= 0:
            break
        if counts[i] < cap[i]:
            counts[i] += 1
            rest -= 1
    return [int(c) for c in counts]


def momentum_drop_and_grow(value: TensorLike, mask: TensorLike, momentum: TensorLike, *, drop: TensorLike,
                           grow: TensorLike) -> RegrowUpdate:
    """Drops ``drop`` active elements of smallest ``|w|``, grows ``grow`` where ``|momentum|`` is largest.

    Growth candidates are the elements inactive after the drop, the ones just
    dropped included (``sparse_learning``'s ``momentum_growth``); an element
    dropped and regrown keeps its value and counts as neither dropped nor
    grown. Every element inactive at the end is exactly 0 (``tf.where``); the
    others keep their bits. Ties: the lower flat index first.

    Args:
      value: the variable's value, float tensor of static shape ``S``.
      mask: bool tensor of shape ``S``, ``True`` = active.
      momentum: real tensor of shape ``S``, the optimizer's momentum (no NaN).
      drop: int32 scalar (tensor or int), ``0 <= drop <= sum(mask)``.
      grow: int32 scalar, ``0 <= grow <=`` the elements inactive after the drop.

    Returns:
      A :class:`~trainer.masks.regrow.RegrowUpdate`; ``sum(mask)`` changes by ``grow - drop``.

    Raises:
      FreezeConfigError: shapes that differ or are not static, or a mask that is not bool.
    """
    value, mask, momentum = (tf.convert_to_tensor(t) for t in (value, mask, momentum))
    shape = value.shape
    if not shape.is_fully_defined() or mask.dtype != tf.bool or mask.shape != shape or momentum.shape != shape:
        raise FreezeConfigError(f"momentum drop-and-grow needs a value of static shape, a bool mask and a momentum "
                                f"of that shape; got {shape}, {mask.dtype.name} {mask.shape}, {momentum.shape}")
    flat = tf.reshape(value, [-1])
    active = tf.reshape(mask, [-1])
    removed = _select(-tf.abs(flat), active, tf.cast(drop, tf.int32), False)
    kept = tf.logical_and(active, tf.logical_not(removed))
    added = _select(tf.abs(tf.cast(tf.reshape(momentum, [-1]), tf.float32)), tf.logical_not(kept),
                    tf.cast(grow, tf.int32), False)
    new_mask = tf.logical_or(kept, added)
    new_value = tf.where(new_mask, flat, tf.zeros_like(flat))
    grown = tf.logical_and(new_mask, tf.logical_not(active))
    dropped = tf.logical_and(active, tf.logical_not(new_mask))
    return RegrowUpdate(mask=tf.reshape(new_mask, shape), value=tf.reshape(new_value, shape),
                        grown=tf.reshape(grown, shape), dropped=tf.reshape(dropped, shape))


def momentum_slot(slots: Sequence[tf.Variable], path: str, optimizer_name: str = "the optimizer") -> tf.Tensor:
    """The momentum of a variable from its optimizer slots: SGD's ``momentum``, or Adam's ``m / (sqrt(v) + 1e-8)``.

    As ``sparse_learning``'s ``get_momentum_for_weight``. Slots are found by
    name (Keras 3 names them ``<path>_momentum`` / ``<path>_velocity``).

    Raises:
      FreezeConfigError: no ``momentum`` slot (e.g. SGD with ``momentum=0``).
    """
    by_kind = {getattr(s, "name", "").rsplit("_", 1)[-1]: s for s in slots}
    if "momentum" not in by_kind:
        raise FreezeConfigError(f"regrow method 'momentum' grows where the optimizer's momentum is largest, but "
                                f"{optimizer_name} keeps no momentum for {path!r}; use SGD with momentum > 0 "
                                "(e.g. optimizer.options.momentum=0.9) or Adam")
    m = tf.convert_to_tensor(by_kind["momentum"])
    if "velocity" in by_kind:
        return m / (tf.sqrt(tf.convert_to_tensor(by_kind["velocity"])) + 1e-8)
    return m


class PassingDenseUpdate(DenseUpdate):
    """A dense update whose frozen elements get their true gradient (``regrow.frozen_gradients: pass``).

    The optimizer then moves their slots (momentum) and their values as for
    any element; :meth:`release` (after the optimizer) sets every frozen
    element back to its value before the step (``tf.where``, bit-exact), so
    frozen-at-zero weights stay exactly 0 while their momentum accumulates.
    A gradient clip by global norm sees these gradients too.
    """

    def mask_gradient(self, grad):
        """``grad`` unchanged (an ``IndexedSlices`` made dense)."""
        return tf.convert_to_tensor(grad) if isinstance(grad, tf.IndexedSlices) else grad

    gradient = mask_gradient


def passes_gradients(rules: Sequence[Any]) -> bool:
    """Whether one of ``rules`` (:class:`~trainer.masks.rules.FreezeRule`) regrows with ``frozen_gradients: pass``."""
    return any(r.regrow is not None and r.regrow.frozen_gradients == "pass" for r in rules)


def mean_magnitude(momentum: tf.Tensor, mask: tf.Tensor) -> float:
    """``mean(|momentum|)`` over the active elements (``sparse_learning``'s ``momentum_redistribution``); 0 if none.

    Reduced on the device (float64): only the mean reaches the host.
    """
    active = tf.boolean_mask(tf.abs(tf.cast(momentum, tf.float64)), tf.convert_to_tensor(mask))
    return float(tf.reduce_mean(active)) if int(tf.size(active)) else 0.0