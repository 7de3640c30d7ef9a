"""Drop-and-grow of whole groups: SET and RigL on the units or input features of a kernel.

A ``regrow`` rule whose ``elements`` are ``{magnitude: f, groups: units|inputs, norm: l1|l2}`` moves whole
groups instead of single elements: at each update, among the groups that are trainable (every element
trainable) it drops the ``n = round(drop_fraction * active_groups)`` groups of smallest norm (the rule's
``norm``, as :func:`trainer.masks.groups.group_scores`) and grows ``n`` groups that were frozen:

- SET (Mocanu et al. 2018, "Scalable training of artificial neural networks with adaptive sparse
  connectivity ..."): uniformly at random from the rule's seed;
- RigL (Evci et al. 2020, "Rigging the Lottery: Making All Tickets Winners"): the groups whose dense
  gradient has the largest norm (the rule's ``norm`` again).

Growing and dropping whole output units is the neuron-level regrowth that Lasby et al. (2023), *Dynamic
Sparse Training with Structured Sparsity* (SRigL), ablate. The number of frozen groups never changes; every
group stays entirely frozen or entirely trainable. The result is a :class:`~trainer.masks.regrow.RegrowUpdate`
of the element-wise shape, so :class:`~trainer.masks.regrow_updates.Regrower` writes masks, values, compact
indices and optimizer slots exactly as for element-wise regrowth. Pure TensorFlow with static shapes.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import tensorflow as tf

from trainer.masks.errors import FreezeConfigError
from trainer.masks.groups import DEFAULT_NORM
from trainer.masks.regrow import RegrowUpdate, _check_seed, _drop_fraction_tensor, _select

TensorLike = Any
REGROW_GROUPS = ("units", "inputs")
REGROW_GROUP_METHODS = ("set", "rigl")


def check_group_regrow(groups: str, method: str) -> None:
    """Refuses a ``regrow`` rule with ``elements.groups`` that group-wise regrowth does not support.

    Raises:
      FreezeConfigError: ``groups`` other than ``units`` / ``inputs`` or ``method`` other than ``set`` / ``rigl``.
    """
    if groups not in REGROW_GROUPS or method not in REGROW_GROUP_METHODS:
        raise FreezeConfigError(f"regrow keeps groups whole only for elements.groups {list(REGROW_GROUPS)} with "
                                f"regrow.method {list(REGROW_GROUP_METHODS)}, got groups {groups!r} and method "
                                f"{method!r}; remove regrow or groups")


def _group_axis(rank: int, groups: str) -> int:
    if groups == "units":
        return rank - 1
    if rank < 2:
        raise FreezeConfigError(f"elements.groups: {groups} needs a kernel with an input axis, got rank {rank}")
    return 0 if rank == 2 else rank - 2


def group_norms(values: TensorLike, groups: str, norm: str = DEFAULT_NORM) -> tf.Tensor:
    """The L1 or L2 norm of every group of ``values`` (TensorFlow twin of :func:`~trainer.masks.groups.group_scores`).

    Args:
      values: a float tensor of static rank: ``(in, out)`` Dense, ``(..., in, out)`` conv kernel.
      groups: ``"units"`` (last axis) or ``"inputs"`` (axis 0 of a Dense kernel, -2 of a conv kernel).
      norm: ``"l1"`` or ``"l2"``.

    Returns:
      float64 vector, one entry per group (as the NumPy ranking of the initial selection).

    Raises:
      FreezeConfigError: ``inputs`` of a tensor with fewer than two axes.
    """
    w = tf.abs(tf.cast(tf.convert_to_tensor(values), tf.float64))
    if norm == "l2":
        w = w * w
    rank = w.shape.rank
    axis = _group_axis(rank, groups)
    perm = [axis] + [a for a in range(rank) if a != axis]
    scores = tf.reduce_sum(tf.reshape(tf.transpose(w, perm), [w.shape[axis], -1]), axis=1)
    return tf.sqrt(scores) if norm == "l2" else scores


def _spread(flags: tf.Tensor, shape: tf.TensorShape, groups: str) -> tf.Tensor:
    axis = _group_axis(shape.rank, groups)
    index = [1] * shape.rank
    index[axis] = shape[axis]
    return tf.broadcast_to(tf.reshape(flags, index), shape)


def _group_all(mask: tf.Tensor, groups: str) -> tf.Tensor:
    rank = mask.shape.rank
    axis = _group_axis(rank, groups)
    perm = [axis] + [a for a in range(rank) if a != axis]
    return tf.reduce_all(tf.reshape(tf.transpose(mask, perm), [mask.shape[axis], -1]), axis=1)


def group_drop_and_grow(value: TensorLike, mask: TensorLike, grow_scores: TensorLike, *, groups: str,
                        norm: str = DEFAULT_NORM, drop_fraction: TensorLike,
                        static_shapes: bool = False) -> RegrowUpdate:
    """Drops the smallest-norm trainable groups and grows as many frozen groups with the highest ``grow_scores``.

    A group is trainable when all its elements are. ``active`` = trainable groups; ``n = min(round(drop_fraction
    * active), groups - active)`` (half to even, float64). Dropped: the ``n`` trainable groups of smallest norm
    of ``value`` (ties: lower position first). Grown: ``n`` groups not trainable before the drop, highest
    ``grow_scores`` first (ties: lower position). Dropped and grown elements become exactly 0; all others keep
    their bits.

    Args:
      value: the variable's value, float tensor of static shape ``S``.
      mask: bool tensor of shape ``S``, ``True`` = trainable.
      grow_scores: real vector, one score per group (no NaN).
      groups: ``"units"`` or ``"inputs"``.
      norm: ``"l1"`` or ``"l2"``, ranking the drop.
      drop_fraction: a Python number in [0, 1) or a scalar float tensor.
      static_shapes: full sorts only, for ``jit_compile=True`` (as :func:`~trainer.masks.regrow.drop_and_grow`).

    Returns:
      A :class:`~trainer.masks.regrow.RegrowUpdate` of shape ``S``; ``grown`` / ``dropped`` hold only elements
      that changed state.

    Raises:
      FreezeConfigError: a value of non-static shape, a mask that is not bool of shape ``S``, grow scores that
        are not one per group, a Python drop fraction outside [0, 1).
    """
    value, mask = tf.convert_to_tensor(value), tf.convert_to_tensor(mask)
    grow_scores = tf.reshape(tf.convert_to_tensor(grow_scores), [-1])
    shape = value.shape
    if not shape.is_fully_defined() or mask.dtype != tf.bool or mask.shape != shape:
        raise FreezeConfigError(f"group drop-and-grow needs a value of static shape and a bool mask of that shape, "
                                f"got {shape} and {mask.dtype.name} {mask.shape}")
    n_groups = shape[_group_axis(shape.rank, groups)]
    if grow_scores.shape[0] != n_groups:
        raise FreezeConfigError(f"grow scores must have one entry per group ({n_groups}), got {grow_scores.shape[0]}")
    df = _drop_fraction_tensor(drop_fraction)
    active = _group_all(mask, groups)
    num_active = tf.reduce_sum(tf.cast(active, tf.int32))
    n = tf.cast(tf.round(df * tf.cast(num_active, tf.float64)), tf.int32)
    n = tf.clip_by_value(n, 0, tf.minimum(num_active, n_groups - num_active))
    drop_g = _select(-group_norms(value, groups, norm), active, n, static_shapes)
    grow_g = _select(tf.cast(grow_scores, tf.float64), tf.logical_not(active), n, static_shapes)
    dropped = tf.logical_and(_spread(drop_g, shape, groups), mask)
    grown = tf.logical_and(_spread(grow_g, shape, groups), tf.logical_not(mask))
    new_mask = tf.logical_or(tf.logical_and(mask, tf.logical_not(dropped)), grown)
    new_value = tf.where(tf.logical_or(dropped, grown), tf.zeros_like(value), value)
    return RegrowUpdate(mask=new_mask, value=new_value, grown=grown, dropped=dropped)


def group_update(value: TensorLike, mask: TensorLike, elements: Mapping[str, Any], method: str, *,
                 drop_fraction: TensorLike, seed: TensorLike = (0, 0), gradient: Optional[TensorLike] = None,
                 static_shapes: bool = False) -> RegrowUpdate:
    """One group-wise SET or RigL update of a variable, for a rule's ``elements`` (its ``groups`` and ``norm``).

    SET grows the frozen groups of highest ``tf.random.stateless_uniform([groups], seed)`` score (Mocanu et
    al. 2018); RigL those whose dense ``gradient`` has the largest norm (Evci et al. 2020; per output unit,
    the neuron-level regrowth of Lasby et al. 2023).

    Args:
      value: the variable's value, float tensor of static shape ``S``.
      mask: bool tensor of shape ``S``, ``True`` = trainable.
      elements: the rule's ``elements`` mapping, with ``groups`` (``units`` / ``inputs``) and optional ``norm``.
      method: ``"set"`` or ``"rigl"``.
      drop_fraction: a Python number in [0, 1) or a scalar float tensor.
      seed: SET: a shape ``[2]`` int tensor or two ints.
      gradient: RigL: the dense (unmasked) gradient, shape ``S``.
      static_shapes: as :func:`group_drop_and_grow`.

    Returns:
      A :class:`~trainer.masks.regrow.RegrowUpdate`.

    Raises:
      FreezeConfigError: an unsupported ``groups`` or ``method`` (:func:`check_group_regrow`), a bad seed, or
        as :func:`group_drop_and_grow`.
    """
    groups, norm = elements["groups"], elements.get("norm", DEFAULT_NORM)
    check_group_regrow(groups, method)
    shape = tf.convert_to_tensor(value).shape
    n_groups = shape[_group_axis(shape.rank, groups)]
    if method == "rigl":
        scores = group_norms(tf.convert_to_tensor(gradient), groups, norm)
    else:
        _check_seed(seed)
        scores = tf.random.stateless_uniform([n_groups], seed=seed, dtype=tf.float32)
    return group_drop_and_grow(value, mask, scores, groups=groups, norm=norm, drop_fraction=drop_fraction,
                               static_shapes=static_shapes)
