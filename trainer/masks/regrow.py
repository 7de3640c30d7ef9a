"""Drop-and-grow updates of a trainable-mask (SET, RigL) and their drop-fraction schedules.

Dynamic sparse training keeps the number of trainable (*active*) elements of a
variable fixed while moving them: at each mask update it *drops* the
``n = round(drop_fraction * active)`` active elements with the smallest
``|w|`` and *grows* (regrowth) ``n`` elements that were inactive before the
drop:

- SET (Mocanu et al. 2018, "Scalable training of artificial neural networks
  with adaptive sparse connectivity ..."): grows uniformly at random.
- RigL (Evci et al. 2020, "Rigging the Lottery: Making All Tickets Winners"):
  grows where the dense gradient ``|g|`` is largest.

Dropped elements become exactly 0 (``+0.0``); grown elements start at zero or
at a given init; all other elements keep their bits (``tf.where``). The
functions are pure TensorFlow on tensors of static shape: call them inside a
``tf.function`` with the drop fraction and seed as tensors and changing masks
do not retrace. Grown elements are returned so the caller can zero their
optimizer slots (:func:`trainer.masks.slots.zero_slots`, as RigL's ``reset_momentum``).

Differences from google-research/rigl (``sparse_optimizers_base.py``): the
drop count is rounded (half to even), not truncated; growth candidates exclude
the elements dropped in the same update (RigL may regrow them), so dropped and
grown elements are disjoint and ``n`` is at most the number of inactive
elements; ties are broken by index instead of by adding noise.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import tensorflow as tf

from trainer.masks.errors import FreezeConfigError
from trainer.masks.regrow_spec import (  # noqa: F401  (re-exported: the schedules belong to the rule's spec)
    ConstantDropFraction,
    CosineDropFraction,
    RegrowSpec,
    check_drop_fraction,
    make_drop_fraction_schedule,
)
from trainer.masks.slots import zero_slots  # noqa: F401  (re-exported: the one slot zeroing)

TensorLike = Any


class RegrowUpdate(NamedTuple):
    """The result of one drop-and-grow update of one variable; all tensors of the variable's shape.

    Attributes:
      mask: bool, the new trainable-mask (``True`` = active).
      value: the new value, the variable's dtype.
      grown: bool, elements inactive before and active now (zero their slots).
      dropped: bool, elements active before and inactive now (now exactly 0).
    """

    mask: tf.Tensor
    value: tf.Tensor
    grown: tf.Tensor
    dropped: tf.Tensor


def _check_seed(seed: TensorLike) -> None:
    if isinstance(seed, (tf.Tensor, tf.Variable)):
        ok = seed.dtype in (tf.int32, tf.int64) and seed.shape.is_compatible_with([2])
    else:
        ok = (
            isinstance(seed, (list, tuple))
            and len(seed) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in seed)
        )
    if not ok:
        raise FreezeConfigError(f"seed must be two integers (a shape [2] int32/int64 tensor), got {seed!r}")


def _drop_fraction_tensor(drop_fraction: TensorLike) -> tf.Tensor:
    if isinstance(drop_fraction, (tf.Tensor, tf.Variable)):
        df = tf.cast(drop_fraction, tf.float64)
        tf.debugging.Assert(
            tf.logical_and(df >= 0.0, df < 1.0), ["drop_fraction must be a number in [0, 1), got", df]
        )
        return df
    return tf.constant(check_drop_fraction(drop_fraction), tf.float64)


def _select(scores: tf.Tensor, candidates: tf.Tensor, n: tf.Tensor, static_shapes: bool) -> tf.Tensor:
    """The ``n`` candidates of highest score (ties: lower index), as a bool vector; 1-D inputs."""
    size = tf.size(scores)
    if static_shapes:
        # Full sorts only (XLA needs static shapes): by score, then a stable sort on the candidate flag.
        order = tf.argsort(scores, direction="DESCENDING", stable=True)
        flag = tf.gather(tf.cast(candidates, tf.int32), order)
        order = tf.gather(order, tf.argsort(flag, direction="DESCENDING", stable=True))
        ranks = tf.scatter_nd(order[:, None], tf.range(size), tf.reshape(size, [1]))
        return tf.logical_and(candidates, ranks < n)
    # Faster: a partial sort of the candidates only (top_k keeps the lower index first on ties).
    index = tf.where(candidates)
    top = tf.math.top_k(tf.gather_nd(scores, index), k=n, sorted=True).indices
    hits = tf.scatter_nd(tf.gather(index, top), tf.ones_like(top), tf.reshape(tf.cast(size, tf.int64), [1]))
    return hits > 0


def drop_and_grow(
    value: TensorLike,
    mask: TensorLike,
    grow_scores: TensorLike,
    *,
    drop_fraction: TensorLike,
    grow_init: Optional[TensorLike] = None,
    static_shapes: bool = False,
) -> RegrowUpdate:
    """Drops the smallest-``|w|`` active elements and grows as many with the highest ``grow_scores``.

    ``active = sum(mask)``; ``n = min(round(drop_fraction * active), size -
    active)`` (round half to even, in float64). Dropped: the ``n`` active
    elements of smallest ``|value|`` (ties: lower flat index dropped first).
    Grown: the ``n`` elements inactive before the drop with the largest
    ``grow_scores`` (ties: lower flat index first). The number of active
    elements is unchanged.

    Args:
      value: the variable's value, float tensor of any static shape ``S``.
      mask: bool tensor of shape ``S``, ``True`` = active (trainable).
      grow_scores: real tensor of shape ``S``, higher grows first (no NaN).
      drop_fraction: a Python number in [0, 1), or a scalar float tensor
        (checked at run time with ``tf.debugging.Assert``, which XLA
        (``jit_compile=True``) drops: build tensors from a validated schedule
        such as :class:`CosineDropFraction`).
      grow_init: values for grown elements, shape ``S`` (cast to the value's
        dtype); ``None`` = zeros.
      static_shapes: ``False`` (default): partial sorts of the candidates,
        whose number varies (``tf.where``), fast but not XLA-compilable;
        ``True``: full sorts with static shapes, for a ``tf.function`` with
        ``jit_compile=True`` (several times slower on CPU). Both give the same
        result.

    Returns:
      A :class:`RegrowUpdate`.

    Raises:
      FreezeConfigError: a Python drop fraction outside [0, 1), shapes that
        differ or are not static, or a mask that is not bool (at trace time).
    """
    value = tf.convert_to_tensor(value)
    mask = tf.convert_to_tensor(mask)
    grow_scores = tf.convert_to_tensor(grow_scores)
    shape = value.shape
    if not shape.is_fully_defined():
        raise FreezeConfigError(f"drop-and-grow needs a value of static shape, got {shape}")
    if mask.dtype != tf.bool or mask.shape != shape:
        raise FreezeConfigError(
            f"mask must be a bool tensor of the value's shape {shape.as_list()}, got {mask.dtype.name} "
            f"{mask.shape.as_list()}"
        )
    if grow_scores.shape != shape:
        raise FreezeConfigError(
            f"grow scores must have the value's shape {shape.as_list()}, got {grow_scores.shape.as_list()}"
        )
    init = tf.zeros_like(value) if grow_init is None else tf.cast(tf.convert_to_tensor(grow_init), value.dtype)
    if init.shape != shape:
        raise FreezeConfigError(f"grow_init must have the value's shape {shape.as_list()}, got {init.shape.as_list()}")
    df = _drop_fraction_tensor(drop_fraction)

    flat_value = tf.reshape(value, [-1])
    active = tf.reshape(mask, [-1])
    size = tf.size(active)
    num_active = tf.reduce_sum(tf.cast(active, tf.int32))
    n = tf.cast(tf.round(df * tf.cast(num_active, tf.float64)), tf.int32)
    n = tf.clip_by_value(n, 0, tf.minimum(num_active, size - num_active))

    dropped = _select(-tf.abs(flat_value), active, n, static_shapes)
    grown = _select(tf.reshape(grow_scores, [-1]), tf.logical_not(active), n, static_shapes)

    new_mask = tf.logical_or(tf.logical_and(active, tf.logical_not(dropped)), grown)
    new_value = tf.where(dropped, tf.zeros_like(flat_value), tf.where(grown, tf.reshape(init, [-1]), flat_value))
    return RegrowUpdate(
        mask=tf.reshape(new_mask, shape),
        value=tf.reshape(new_value, shape),
        grown=tf.reshape(grown, shape),
        dropped=tf.reshape(dropped, shape),
    )


def set_update(
    value: TensorLike,
    mask: TensorLike,
    *,
    drop_fraction: TensorLike,
    seed: TensorLike,
    grow_init: Optional[TensorLike] = None,
    static_shapes: bool = False,
) -> RegrowUpdate:
    """SET: drop the smallest-``|w|`` active elements, grow as many uniformly at random (Mocanu et al. 2018).

    The random choice is ``tf.random.stateless_uniform(shape, seed)`` scores
    ranked by :func:`drop_and_grow`: a uniformly random subset of the
    inactive elements, the same for the same seed, TensorFlow version and
    compilation (XLA draws other numbers from the same seed). Pass a new seed
    per update (e.g. ``[base_seed, step]``) as a tensor to avoid retracing.

    Args:
      value: the variable's value, float tensor of static shape ``S``.
      mask: bool tensor of shape ``S``, ``True`` = active.
      drop_fraction: a Python number in [0, 1) or a scalar float tensor.
      seed: a shape ``[2]`` int32/int64 tensor or a pair of Python ints, the
        stateless RNG seed.
      grow_init: values for grown elements, shape ``S``; ``None`` = zeros.
      static_shapes: ``True`` inside ``jit_compile=True`` (see :func:`drop_and_grow`).

    Returns:
      A :class:`RegrowUpdate`.

    Raises:
      FreezeConfigError: as :func:`drop_and_grow`, or a seed that is not two
        integers.
    """
    shape = tf.convert_to_tensor(value).shape
    _check_seed(seed)
    scores = tf.random.stateless_uniform(shape, seed=seed, dtype=tf.float32)
    return drop_and_grow(
        value, mask, scores, drop_fraction=drop_fraction, grow_init=grow_init, static_shapes=static_shapes
    )


def rigl_update(
    value: TensorLike,
    mask: TensorLike,
    gradient: TensorLike,
    *,
    drop_fraction: TensorLike,
    grow_init: Optional[TensorLike] = None,
    static_shapes: bool = False,
) -> RegrowUpdate:
    """RigL: drop the smallest-``|w|`` active elements, grow as many where ``|g|`` is largest (Evci et al. 2020).

    Args:
      value: the variable's value, float tensor of static shape ``S``.
      mask: bool tensor of shape ``S``, ``True`` = active.
      gradient: the dense (unmasked) loss gradient, shape ``S``: inactive
        elements need their true gradient, so it must be taken before the
        gradients are masked.
      drop_fraction: a Python number in [0, 1) or a scalar float tensor.
      grow_init: values for grown elements, shape ``S``; ``None`` = zeros.
      static_shapes: ``True`` inside ``jit_compile=True`` (see :func:`drop_and_grow`).

    Returns:
      A :class:`RegrowUpdate`.

    Raises:
      FreezeConfigError: as :func:`drop_and_grow`.
    """
    gradient = tf.convert_to_tensor(gradient)  # IndexedSlices (embeddings) become dense
    return drop_and_grow(
        value, mask, tf.abs(gradient), drop_fraction=drop_fraction, grow_init=grow_init, static_shapes=static_shapes
    )
