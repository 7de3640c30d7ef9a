"""Importance scores and the trainable-masks they select: top-k (per variable or global) and N:M.

Scores (higher = more important, kept first), each ``{variable path: float64
array of the variable's shape}``:

- random, uniform in ``[0, 1)`` (with per-layer counts: random ER/ERK masks);
- magnitude ``|w|``;
- SNIP ``|g * w|`` (Lee et al. 2019, "SNIP: Single-shot Network Pruning based
  on Connection Sensitivity"), ``g`` the gradient of the loss averaged over a
  few batches at initialisation;
- Fisher ``mean_b g_b ** 2`` (Sung et al. 2021, "Training Neural Networks with
  Fixed Sparse Masks", FISH masks), squared batch gradients averaged over
  ``N`` batches;
- ``w ** 2 * v`` with ``v`` Adam's second-moment estimate: an Optimal Brain
  Damage saliency (LeCun et al. 1990: ``w ** 2`` times the Hessian diagonal)
  with Adam's running mean of squared gradients standing in for the diagonal
  Fisher.

Selections return boolean *trainable*-masks (``True`` = kept, may change).
Tie rule, everywhere: elements are ranked by score, highest first; among equal
scores the element that comes first is kept first, "first" meaning the lower
C-order flat index within a variable and, for a global ranking, the variable
whose path sorts first (string order). Scores must not be NaN.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from trainer.masks.allocation import kept_count
from trainer.masks.checks import is_whole, positive_int
from trainer.masks.errors import FreezeConfigError
from trainer.masks.slots import slots_by_path

ArrayLike = Any


def _scores(path: str, scores: ArrayLike) -> np.ndarray:
    try:
        array = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError):
        raise FreezeConfigError(f"scores of {path!r} must be a numeric array, got {type(scores).__name__}") from None
    if np.isnan(array).any():
        raise FreezeConfigError(
            f"scores of {path!r} contain {int(np.isnan(array).sum())} NaN value(s); scores must be numbers"
        )
    return array


def _same_shapes(first: Mapping[str, ArrayLike], second: Mapping[str, ArrayLike], what: str) -> None:
    if set(first) != set(second):
        raise FreezeConfigError(
            f"{what} must have the same variable paths as the weights; "
            f"missing {sorted(set(first) - set(second))}, extra {sorted(set(second) - set(first))}"
        )
    for path in first:
        a, b = np.shape(first[path]), np.shape(second[path])
        if a != b:
            raise FreezeConfigError(f"{what} of {path!r} has shape {b}, the weights have shape {a}")


def magnitude_scores(weights: Mapping[str, ArrayLike]) -> Dict[str, np.ndarray]:
    """``{path: |w|}`` as float64 arrays of each variable's shape."""
    return {p: np.abs(np.asarray(w, dtype=np.float64)) for p, w in weights.items()}


def random_scores(shapes: Mapping[str, Sequence[int]], *, seed: int) -> Dict[str, np.ndarray]:
    """Uniform ``[0, 1)`` float64 scores, independent per variable (a random mask with top-k).

    With :func:`layerwise_topk_masks` and ``LayerAllocation.counts`` this
    gives the random Erdős–Rényi / ERK initial masks of SET and RigL. Each
    variable draws from ``np.random.default_rng([seed, crc32(path)])``, so its
    scores do not depend on the other variables or their order.

    Args:
      shapes: ``{path: shape}``.
      seed: a non-negative integer.

    Raises:
      FreezeConfigError: ``seed`` not a non-negative integer.
    """
    if not is_whole(seed, 0):
        raise FreezeConfigError(f"seed must be a non-negative integer, got {seed!r}")
    return {
        p: np.random.default_rng([int(seed), zlib.crc32(p.encode())]).random(tuple(s)) for p, s in shapes.items()
    }


def snip_scores(weights: Mapping[str, ArrayLike], gradients: Mapping[str, ArrayLike]) -> Dict[str, np.ndarray]:
    """SNIP connection sensitivity ``|g * w|`` (Lee et al. 2019), float64.

    Args:
      weights: ``{path: w}``, the weights at initialisation.
      gradients: ``{path: g}``, the loss gradient at those weights, same shapes
        (e.g. ``GradientScores.mean_gradient`` from :func:`gradient_scores`).

    Raises:
      FreezeConfigError: paths or shapes differ.
    """
    _same_shapes(weights, gradients, "gradients")
    return {
        p: np.abs(np.asarray(gradients[p], dtype=np.float64) * np.asarray(w, dtype=np.float64))
        for p, w in weights.items()
    }


def second_moment_scores(weights: Mapping[str, ArrayLike], second_moments: Mapping[str, ArrayLike]) -> Dict[str, np.ndarray]:
    """``w ** 2 * v`` per element, float64, ``v`` an Adam second-moment estimate.

    Args:
      weights: ``{path: w}``.
      second_moments: ``{path: v}``, same shapes (:func:`adam_second_moments`).

    Raises:
      FreezeConfigError: paths or shapes differ.
    """
    _same_shapes(weights, second_moments, "second_moments")
    return {
        p: np.square(np.asarray(w, dtype=np.float64)) * np.asarray(second_moments[p], dtype=np.float64)
        for p, w in weights.items()
    }


def adam_second_moments(optimizer: keras.optimizers.Optimizer, variables: Sequence[keras.Variable]) -> Dict[str, np.ndarray]:
    """Adam's second-moment slot ``v`` of each variable, as NumPy arrays.

    Works for the Keras 3 optimizers with a ``velocity`` slot (Adam, AdamW,
    Nadam, Lamb); Adamax keeps an infinity norm instead and is refused.

    Args:
      optimizer: a built Keras 3 optimizer.
      variables: the model variables, keyed by ``variable.path`` in the result.

    Raises:
      FreezeConfigError: the optimizer is not built yet, or has no second-moment
        (``velocity``) slot for a variable.
    """
    if not getattr(optimizer, "built", False):
        raise FreezeConfigError(
            f"{type(optimizer).__name__} is not built yet; w^2*v scores need Adam's second moments "
            f"(build the optimizer or train a few steps first)"
        )
    result = {}
    for path, slots in slots_by_path(optimizer, list(variables)).items():
        velocity = [s for s in slots if s.name.split("/")[-1].endswith("_velocity")]
        if not velocity:
            raise FreezeConfigError(
                f"{type(optimizer).__name__} keeps no second moment ('velocity' slot) for {path!r}; "
                f"w^2*v scores need Adam, AdamW, Nadam or Lamb"
            )
        result[path] = np.asarray(velocity[0].numpy())
    return result


def topk_mask(scores: ArrayLike, count: int, *, path: str = "scores") -> np.ndarray:
    """Keeps the ``count`` highest-scoring elements of one variable.

    Args:
      scores: an array of any shape, no NaN.
      count: how many to keep, an integer in [0, scores.size].
      path: the variable's path, for error messages.

    Returns:
      A bool array of ``scores``' shape with exactly ``count`` ``True``; ties
      keep the lower flat index first.

    Raises:
      FreezeConfigError: NaN scores or ``count`` out of range.
    """
    array = _scores(path, scores)
    if not is_whole(count, 0, array.size + 1):
        raise FreezeConfigError(f"count for {path!r} must be an integer in [0, {array.size}], got {count!r}")
    keep = np.zeros(array.size, dtype=bool)
    keep[np.argsort(-array.reshape(-1), kind="stable")[: int(count)]] = True
    return keep.reshape(array.shape)


def layerwise_topk_masks(scores: Mapping[str, ArrayLike], counts: Mapping[str, int]) -> Dict[str, np.ndarray]:
    """:func:`topk_mask` per variable, e.g. with ``LayerAllocation.counts`` from ERK.

    Args:
      scores: ``{path: scores}``.
      counts: ``{path: kept count}`` with the same paths.

    Returns:
      ``{path: bool trainable-mask}``.

    Raises:
      FreezeConfigError: the paths differ, NaN scores or a count out of range.
    """
    if set(scores) != set(counts):
        raise FreezeConfigError(
            f"counts must name the same variables as scores; missing {sorted(set(scores) - set(counts))}, "
            f"extra {sorted(set(counts) - set(scores))}"
        )
    return {p: topk_mask(s, counts[p], path=p) for p, s in scores.items()}


def global_topk_masks(scores: Mapping[str, ArrayLike], density: float) -> Dict[str, np.ndarray]:
    """Keeps the highest scores across all the variables together (global ranking).

    ``round(density * N)`` elements are kept (``N`` = elements of all the
    variables; :func:`trainer.masks.allocation.kept_count`), wherever they are:
    a variable may end up dense or empty.

    Args:
      scores: ``{path: scores}``, arrays of any shapes, no NaN. Magnitudes of
        different layers are compared as they are: the caller chooses scores
        that are comparable (e.g. SNIP's ``|g * w|`` of one loss).
      density: the global density, a number in (0, 1].

    Returns:
      ``{path: bool trainable-mask}``, keyed like ``scores``.

    Raises:
      FreezeConfigError: empty ``scores``, NaN scores, ``density`` outside
        (0, 1] or keeping nothing.
    """
    if not isinstance(scores, Mapping) or not scores:
        raise FreezeConfigError(f"scores must be a non-empty mapping of variable path to array, got {scores!r}")
    arrays = {p: _scores(p, s) for p, s in scores.items()}
    order = sorted(arrays)
    flat = np.concatenate([arrays[p].reshape(-1) for p in order])
    keep = np.zeros(flat.size, dtype=bool)
    keep[np.argsort(-flat, kind="stable")[: kept_count(density, flat.size)]] = True
    result, start = {}, 0
    for p in order:
        size = arrays[p].size
        result[p] = keep[start : start + size].reshape(arrays[p].shape)
        start += size
    return {p: result[p] for p in scores}


def check_n_m(n: Any, m: Any) -> None:
    """Checks an N:M pattern: integers with ``1 <= n <= m``.

    Raises:
      FreezeConfigError: otherwise.
    """
    for v in (n, m):
        if not is_whole(v):
            raise FreezeConfigError(f"N:M sparsity needs integers 1 <= N <= M, got N={n!r}, M={m!r}")
    if not 1 <= n <= m:
        raise FreezeConfigError(f"N:M sparsity needs integers 1 <= N <= M, got N={n!r}, M={m!r}")


def n_m_mask(scores: ArrayLike, *, n: int, m: int, axis: int = 0, path: str = "scores") -> np.ndarray:
    """N:M structured selection: keeps the ``n`` highest of every ``m`` consecutive elements along ``axis``.

    2:4 along the input axis of a Dense kernel ``(in, out)`` is ``n=2, m=4,
    axis=0``: for every output unit, each block of 4 consecutive inputs keeps
    2 (the pattern of NVIDIA's sparse tensor cores; Mishra et al. 2021,
    "Accelerating Sparse Deep Neural Networks"). For a Conv2D kernel
    ``(h, w, in, out)`` the input axis is ``-2``. Density is ``n / m``.
    Ties within a block keep the lower index first.

    Args:
      scores: an array of rank >= 1, no NaN.
      n: elements kept per block, ``1 <= n <= m``.
      m: block length; must divide ``scores.shape[axis]``.
      axis: the axis along which blocks run (negative counts from the end).
      path: the variable's path, for error messages.

    Returns:
      A bool array of ``scores``' shape.

    Raises:
      FreezeConfigError: bad ``n``/``m``, ``axis`` out of range, ``m`` not
        dividing the axis, or NaN scores.
    """
    check_n_m(n, m)
    array = _scores(path, scores)
    if not is_whole(axis, -array.ndim, array.ndim):
        raise FreezeConfigError(
            f"N:M axis must be an integer in [{-array.ndim}, {array.ndim - 1}] for {path!r} of shape "
            f"{array.shape}, got {axis!r}"
        )
    length = array.shape[axis]
    if length % m:
        raise FreezeConfigError(
            f"N:M {n}:{m} needs axis {axis} of {path!r} (shape {array.shape}) to be a multiple of M={m}, "
            f"got length {length}"
        )
    moved = np.moveaxis(array, axis, -1)
    blocks = moved.reshape(moved.shape[:-1] + (length // m, m))
    order = np.argsort(-blocks, axis=-1, kind="stable")
    keep = np.zeros(blocks.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


@dataclasses.dataclass(frozen=True)
class GradientScores:
    """Gradient statistics of a model over a few batches, keyed by variable path.

    Attributes:
      num_batches: ``B``, the batches seen.
      mean_gradient: ``{path: (1/B) sum_b g_b}``, float64.
      fisher: ``{path: (1/B) sum_b g_b ** 2}``, float64 (FISH's Fisher
        estimate, from batch gradients).
      snip: ``{path: |mean_gradient * w|}``, float64, ``w`` the weights when
        the scores were computed (SNIP).
    """

    num_batches: int
    mean_gradient: Dict[str, np.ndarray]
    fisher: Dict[str, np.ndarray]
    snip: Dict[str, np.ndarray]


def _loss_value(loss: Callable, model: keras.Model, batch: Sequence, training: bool) -> tf.Tensor:
    x, y = batch[0], batch[1]
    y_pred = model(x, training=training)
    value = loss(y, y_pred, batch[2]) if len(batch) > 2 else loss(y, y_pred)
    if model.losses:
        value = value + tf.add_n(model.losses)
    return value


def gradient_scores(
    model: keras.Model,
    dataset: tf.data.Dataset,
    *,
    loss: Callable,
    num_batches: int,
    variables: Optional[Iterable[keras.Variable]] = None,
    training: bool = False,
) -> GradientScores:
    """Accumulates gradients and squared gradients of a Keras model over ``num_batches`` batches.

    Each batch ``b`` gives ``g_b``, the gradient of ``loss(y, model(x)) (+
    model.losses)`` with respect to each variable; the result holds their mean
    (for SNIP, Lee et al. 2019, who use one batch) and the mean of their
    squares (Fisher, as FISH masks, Sung et al. 2021, who use per-example
    gradients: batches of size 1 give exactly theirs). Weights are not changed.
    One ``tf.function`` computes the gradients of a batch (traced once per
    input signature); the sums are kept in float64.

    Args:
      model: a built Keras 3 model.
      dataset: a ``tf.data.Dataset`` of ``(x, y)`` or ``(x, y, sample_weight)``
        batches.
      loss: ``loss(y_true, y_pred[, sample_weight]) -> scalar``, e.g. a
        ``keras.losses.Loss`` instance.
      num_batches: how many batches to use, a positive integer; the dataset
        must yield at least that many.
      variables: the variables to score (default ``model.trainable_variables``);
        a variable that does not affect the loss scores 0.
      training: passed to ``model(x, training=...)`` (dropout, batch norm).

    Returns:
      A :class:`GradientScores`.

    Raises:
      FreezeConfigError: ``num_batches`` not a positive integer, the dataset
        yields fewer batches, or a batch is not ``(x, y[, sample_weight])``.
    """
    num_batches = positive_int("num_batches", num_batches, error=FreezeConfigError)
    variables = list(model.trainable_variables if variables is None else variables)
    if not variables:
        raise FreezeConfigError(f"model {model.name!r} has no variables to score")

    @tf.function(reduce_retracing=True)
    def batch_gradients(batch):
        with tf.GradientTape() as tape:
            value = _loss_value(loss, model, batch, training)
        return tape.gradient(value, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    sums = [tf.zeros(v.shape, tf.float64) for v in variables]
    squares = [tf.zeros(v.shape, tf.float64) for v in variables]
    seen = 0
    for batch in dataset.take(num_batches):
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise FreezeConfigError(
                f"dataset must yield (x, y) or (x, y, sample_weight) batches, got {type(batch).__name__}"
            )
        for i, g in enumerate(batch_gradients(tuple(batch))):
            g = tf.cast(g, tf.float64)
            sums[i] += g
            squares[i] += tf.square(g)
        seen += 1
    if seen < num_batches:
        raise FreezeConfigError(f"num_batches={num_batches} but the dataset yields only {seen} batch(es)")
    mean = {v.path: s.numpy() / seen for v, s in zip(variables, sums)}
    fisher = {v.path: s.numpy() / seen for v, s in zip(variables, squares)}
    weights = {v.path: np.asarray(v.numpy()) for v in variables}
    return GradientScores(num_batches=seen, mean_gradient=mean, fisher=fisher, snip=snip_scores(weights, mean))
