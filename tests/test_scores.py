"""Scores and selections (global/per-variable top-k, N:M, SNIP, Fisher, w^2*v) against independent NumPy oracles."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.masks import FreezeConfigError
from trainer.masks.scores import (
    adam_second_moments,
    global_topk_masks,
    gradient_scores,
    layerwise_topk_masks,
    magnitude_scores,
    n_m_mask,
    random_scores,
    second_moment_scores,
    snip_scores,
    topk_mask,
)


def oracle_global(scores, kept):
    """Python sort of (-score, path, flat index) tuples: the documented tie rule, written out."""
    items = sorted(
        (-float(s), path, i) for path, a in scores.items() for i, s in enumerate(np.asarray(a, float).reshape(-1))
    )
    out = {p: np.zeros(np.size(a), bool) for p, a in scores.items()}
    for _, path, i in items[:kept]:
        out[path][i] = True
    return {p: out[p].reshape(np.shape(a)) for p, a in scores.items()}


def oracle_n_m(scores, n, m, axis):
    """Loops over every block of ``m`` along ``axis`` and keeps the ``n`` largest (lower index on ties)."""
    moved = np.moveaxis(np.asarray(scores, float), axis, 0)
    keep = np.zeros(moved.shape, bool)
    for rest in itertools.product(*(range(d) for d in moved.shape[1:])):
        for start in range(0, moved.shape[0], m):
            block = [(-moved[(start + j,) + rest], j) for j in range(m)]
            for _, j in sorted(block)[:n]:
                keep[(start + j,) + rest] = True
    return np.moveaxis(keep, 0, axis)


def tied_scores(rng, shapes):
    """Small integers, so many scores tie."""
    return {p: rng.integers(0, 5, size=s).astype(np.float32) for p, s in shapes.items()}


SHAPES = {"m/fc2/kernel": (6, 4), "m/fc1/kernel": (5, 6), "m/fc1/bias": (6,)}


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.97, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_global_topk_equals_the_oracle_with_ties(seed, density):
    scores = tied_scores(np.random.default_rng(seed), SHAPES)
    masks = global_topk_masks(scores, density)
    kept = round(density * 60)
    expected = oracle_global(scores, kept)
    assert list(masks) == list(SHAPES)
    for p in SHAPES:
        assert masks[p].dtype == bool and masks[p].shape == SHAPES[p]
        np.testing.assert_array_equal(masks[p], expected[p])
    assert sum(int(m.sum()) for m in masks.values()) == kept


def test_global_ranking_is_across_variables_not_within():
    masks = global_topk_masks({"a": np.array([1.0, 2.0, 3.0]), "b": np.array([10.0, 20.0, 0.5])}, 0.5)
    np.testing.assert_array_equal(masks["a"], [False, False, True])
    np.testing.assert_array_equal(masks["b"], [True, True, False])


def test_topk_and_layerwise_topk_equal_the_oracle():
    scores = tied_scores(np.random.default_rng(3), SHAPES)
    counts = {"m/fc2/kernel": 7, "m/fc1/kernel": 0, "m/fc1/bias": 6}
    masks = layerwise_topk_masks(scores, counts)
    for p, s in scores.items():
        np.testing.assert_array_equal(masks[p], oracle_global({p: s}, counts[p])[p])
        np.testing.assert_array_equal(topk_mask(s, counts[p]), masks[p])


def test_random_scores_with_layer_counts_give_exact_random_masks():
    shapes = {"a": (30, 20), "b": (20, 10)}
    counts = {"a": 61, "b": 17}
    masks = layerwise_topk_masks(random_scores(shapes, seed=5), counts)
    assert {p: int(m.sum()) for p, m in masks.items()} == counts
    again = random_scores({"b": (20, 10)}, seed=5)  # per variable: the other variables do not matter
    np.testing.assert_array_equal(again["b"], random_scores(shapes, seed=5)["b"])
    assert not np.array_equal(random_scores(shapes, seed=6)["a"], random_scores(shapes, seed=5)["a"])
    with pytest.raises(FreezeConfigError) as info:
        random_scores(shapes, seed=-1)
    assert str(info.value) == "seed must be a non-negative integer, got -1"


@pytest.mark.parametrize(
    "shape, n, m, axis",
    [((8, 3), 2, 4, 0), ((8, 3), 1, 4, 0), ((3, 8), 2, 4, 1), ((2, 2, 8, 3), 2, 4, -2), ((6, 2), 3, 3, 0), ((4, 5), 4, 4, 0)],
)
def test_n_m_equals_the_oracle_with_ties(shape, n, m, axis):
    for seed in range(3):
        scores = np.random.default_rng(seed).integers(0, 3, size=shape).astype(np.float64)
        mask = n_m_mask(scores, n=n, m=m, axis=axis)
        np.testing.assert_array_equal(mask, oracle_n_m(scores, n, m, axis))
        assert mask.sum() == scores.size * n // m


def test_two_four_on_a_dense_kernel_keeps_two_of_every_four_inputs_per_unit():
    kernel = np.arange(16, dtype=np.float32).reshape(8, 2) * np.array([1, -1], np.float32)
    mask = n_m_mask(magnitude_scores({"k": kernel})["k"], n=2, m=4, axis=0)
    np.testing.assert_array_equal(mask.reshape(2, 4, 2).sum(axis=1), np.full((2, 2), 2))
    np.testing.assert_array_equal(mask[:, 0], [False, False, True, True] * 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n=2, m=3, axis=0), "N:M 2:3 needs axis 0 of 'fc/kernel' (shape (8, 2)) to be a multiple of M=3, got length 8"),
        (dict(n=5, m=4, axis=0), "N:M sparsity needs integers 1 <= N <= M, got N=5, M=4"),
        (dict(n=0, m=4, axis=0), "N:M sparsity needs integers 1 <= N <= M, got N=0, M=4"),
        (dict(n=2.0, m=4, axis=0), "N:M sparsity needs integers 1 <= N <= M, got N=2.0, M=4"),
        (dict(n=2, m=4, axis=2), "N:M axis must be an integer in [-2, 1] for 'fc/kernel' of shape (8, 2), got 2"),
    ],
)
def test_n_m_errors_name_the_value(kwargs, message):
    with pytest.raises(FreezeConfigError) as info:
        n_m_mask(np.ones((8, 2)), path="fc/kernel", **kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: global_topk_masks({"a": np.ones(4)}, 0.0), "density must be a number in (0, 1] (fraction of elements kept), got 0.0"),
        (lambda: global_topk_masks({}, 0.5), "scores must be a non-empty mapping of variable path to array, got {}"),
        (lambda: global_topk_masks({"a": np.array([1.0, np.nan])}, 0.5), "scores of 'a' contain 1 NaN value(s); scores must be numbers"),
        (lambda: topk_mask(np.ones(4), 5, path="a"), "count for 'a' must be an integer in [0, 4], got 5"),
        (lambda: layerwise_topk_masks({"a": np.ones(2)}, {"b": 1}), "counts must name the same variables as scores; missing ['a'], extra ['b']"),
        (lambda: snip_scores({"a": np.ones(2)}, {"a": np.ones(3)}), "gradients of 'a' has shape (3,), the weights have shape (2,)"),
    ],
)
def test_selection_errors_name_the_value(call, message):
    with pytest.raises(FreezeConfigError) as info:
        call()
    assert str(info.value) == message


# --- gradient scores of a real Keras model against NumPy gradients -------------------------------------------


def linear_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, name="fc")], name="lin")


def data(batches=4, batch=6, seed=0, weights=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batches * batch, 5)).astype(np.float32)
    y = rng.normal(size=(batches * batch, 4)).astype(np.float32)
    parts = (x, y, np.ones(len(x), np.float32)) if weights else (x, y)
    return x, y, tf.data.Dataset.from_tensor_slices(parts).batch(batch)


def numpy_gradients(kernel, bias, x, y):
    """Mean squared error ``mean_b mean_j (x W + c - y)^2``: dL/dW = x^T 2 (p - y) / (B J)."""
    k, c, x, y = (np.asarray(a, np.float64) for a in (kernel, bias, x, y))
    d = 2.0 * (x @ k + c - y) / y.size
    return {"lin/fc/kernel": x.T @ d, "lin/fc/bias": d.sum(axis=0)}


def numpy_scores(model, x, y, num_batches, batch):
    kernel, bias = (v.numpy() for v in model.trainable_variables)
    grads = [numpy_gradients(kernel, bias, x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch])
             for i in range(num_batches)]
    mean = {p: sum(g[p] for g in grads) / num_batches for p in grads[0]}
    fisher = {p: sum(g[p] ** 2 for g in grads) / num_batches for p in grads[0]}
    weights = {"lin/fc/kernel": kernel.astype(np.float64), "lin/fc/bias": bias.astype(np.float64)}
    snip = {p: np.abs(mean[p] * weights[p]) for p in mean}
    return mean, fisher, snip


def boundary_gap(scores, kept):
    flat = np.sort(np.concatenate([s.reshape(-1) for s in scores.values()]))[::-1]
    return flat[kept - 1] - flat[kept]


@pytest.mark.parametrize("weights", [False, True], ids=["xy", "xy_sample_weight"])
def test_gradient_scores_and_their_masks_equal_numpy(weights):
    model = linear_model()
    before = [v.numpy().copy() for v in model.variables]
    x, y, ds = data(weights=weights)
    result = gradient_scores(model, ds, loss=keras.losses.MeanSquaredError(), num_batches=3)
    mean, fisher, snip = numpy_scores(model, x, y, 3, 6)
    assert result.num_batches == 3
    for p in mean:
        np.testing.assert_allclose(result.mean_gradient[p], mean[p], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(result.fisher[p], fisher[p], rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(result.snip[p], snip[p], rtol=1e-5, atol=1e-9)
    for theirs, ours in ((snip, result.snip), (fisher, result.fisher)):
        for density in (0.1, 0.25, 0.5):
            kept = round(density * 24)
            assert boundary_gap(theirs, kept) > 1e-4 * abs(max(s.max() for s in theirs.values()))
            expected = oracle_global(theirs, kept)
            for p, mask in global_topk_masks(ours, density).items():
                np.testing.assert_array_equal(mask, expected[p])
    for v, b in zip(model.variables, before):
        np.testing.assert_array_equal(v.numpy(), b)


def test_gradient_scores_refuses_a_short_dataset_and_bad_counts():
    model = linear_model()
    _, _, ds = data(batches=2)
    with pytest.raises(FreezeConfigError) as info:
        gradient_scores(model, ds, loss=keras.losses.MeanSquaredError(), num_batches=3)
    assert str(info.value) == "num_batches=3 but the dataset yields only 2 batch(es)"
    with pytest.raises(FreezeConfigError) as info:
        gradient_scores(model, ds, loss=keras.losses.MeanSquaredError(), num_batches=0)
    assert str(info.value) == "num_batches must be a positive integer, got 0"


def test_adam_second_moment_scores_equal_numpy_after_one_step():
    model = linear_model()
    x, y, _ = data(batches=1)
    optimizer = keras.optimizers.Adam(learning_rate=1e-3)
    weights0 = {v.path: v.numpy().astype(np.float64) for v in model.trainable_variables}
    grads = numpy_gradients(weights0["lin/fc/kernel"], weights0["lin/fc/bias"], x, y)
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, model(x))
    optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    v = adam_second_moments(optimizer, model.trainable_variables)
    for p, g in grads.items():  # Keras Adam: v = beta_2 * 0 + (1 - beta_2) * g^2
        np.testing.assert_allclose(v[p], (1 - 0.999) * g**2, rtol=1e-4, atol=1e-12)
    weights = {p: model.get_layer("fc").kernel.numpy() if p.endswith("kernel") else model.get_layer("fc").bias.numpy()
               for p in v}
    scores = second_moment_scores(weights, v)
    for p in v:
        np.testing.assert_array_equal(scores[p], weights[p].astype(np.float64) ** 2 * v[p].astype(np.float64))


def test_second_moments_need_an_optimizer_that_keeps_them():
    model = linear_model()
    sgd = keras.optimizers.SGD(momentum=0.9)
    with pytest.raises(FreezeConfigError) as info:
        adam_second_moments(sgd, model.trainable_variables)
    assert str(info.value) == (
        "SGD is not built yet; w^2*v scores need Adam's second moments (build the optimizer or train a few steps first)"
    )
    sgd.build(model.trainable_variables)
    with pytest.raises(FreezeConfigError) as info:
        adam_second_moments(sgd, model.trainable_variables)
    assert str(info.value) == (
        "SGD keeps no second moment ('velocity' slot) for 'lin/fc/kernel'; w^2*v scores need Adam, AdamW, Nadam or Lamb"
    )
