"""SET and RigL drop-and-grow: exact density, exact zeros and inits, RigL against NumPy, no retracing, schedules."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.masks import FreezeConfigError
from trainer.masks.regrow import (
    ConstantDropFraction,
    CosineDropFraction,
    drop_and_grow,
    make_drop_fraction_schedule,
    rigl_update,
    set_update,
    zero_slots,
)


def bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


def exact(tensor):
    """Bit patterns of a float32 tensor, the values of a bool one."""
    array = tensor.numpy()
    return array.view(np.uint32) if array.dtype == np.float32 else array


def oracle_rigl(w, mask, g, drop_fraction):
    """NumPy: drop the n active of smallest |w| (lower index first), grow the n inactive of largest |g|."""
    w, mask, g = (np.asarray(a).reshape(-1) for a in (w, mask, g))
    active = int(mask.sum())
    n = min(int(round(drop_fraction * active)), mask.size - active)
    drop = sorted((abs(float(w[i])), i) for i in range(mask.size) if mask[i])[:n]
    grow = sorted((-abs(float(g[i])), i) for i in range(mask.size) if not mask[i])[:n]
    dropped = np.zeros(mask.size, bool)
    grown = np.zeros(mask.size, bool)
    dropped[[i for _, i in drop]] = True
    grown[[i for _, i in grow]] = True
    return (mask & ~dropped) | grown, dropped, grown


def layer(seed, shape=(7, 5), density=0.4, ties=False):
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    mask = np.zeros(size, bool)
    mask[rng.permutation(size)[: round(density * size)]] = True
    mask = mask.reshape(shape)
    w = rng.normal(size=shape).astype(np.float32)
    g = rng.normal(size=shape).astype(np.float32)
    if ties:
        w = np.round(w).astype(np.float32)
        g = np.round(g).astype(np.float32)
    w = np.where(mask, w, np.float32(0.0))
    init = rng.normal(size=shape).astype(np.float32)
    return w, mask, g, init


@pytest.mark.parametrize("static_shapes", [False, True], ids=["partial_sort", "static_shapes"])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "tied"])
@pytest.mark.parametrize("drop_fraction", [0.0, 0.1, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rigl_equals_numpy(seed, drop_fraction, ties, static_shapes):
    w, mask, g, init = layer(seed, ties=ties)
    update = rigl_update(w, mask, g, drop_fraction=drop_fraction, grow_init=init, static_shapes=static_shapes)
    expected_mask, dropped, grown = oracle_rigl(w, mask, g, drop_fraction)
    np.testing.assert_array_equal(update.mask.numpy().reshape(-1), expected_mask)
    np.testing.assert_array_equal(update.dropped.numpy().reshape(-1), dropped)
    np.testing.assert_array_equal(update.grown.numpy().reshape(-1), grown)
    value = update.value.numpy()
    assert update.mask.numpy().sum() == mask.sum()
    # Dropped: +0.0 exactly; grown: exactly their init; everything else: the same bits.
    assert (bits(value)[update.dropped.numpy()] == 0).all()
    np.testing.assert_array_equal(bits(value)[update.grown.numpy()], bits(init)[update.grown.numpy()])
    untouched = ~(update.dropped.numpy() | update.grown.numpy())
    np.testing.assert_array_equal(bits(value)[untouched], bits(w)[untouched])


def test_drop_count_is_rounded_half_to_even_and_bounded_by_the_inactive():
    w, mask, g, _ = layer(0, shape=(10,), density=0.5)  # 5 active
    assert int(rigl_update(w, mask, g, drop_fraction=0.5).dropped.numpy().sum()) == 2  # round(2.5) = 2
    assert int(rigl_update(w, mask, g, drop_fraction=0.7).dropped.numpy().sum()) == 4  # round(3.5) = 4
    w, mask, g, _ = layer(0, shape=(10,), density=0.9)  # 9 active, 1 inactive
    update = rigl_update(w, mask, g, drop_fraction=0.5)
    assert int(update.dropped.numpy().sum()) == int(update.grown.numpy().sum()) == 1


@pytest.mark.parametrize("static_shapes", [False, True])
def test_ties_drop_the_lower_index_and_grow_the_lower_index_first(static_shapes):
    w = tf.constant([0.5, -0.5, 0.5, 0.0, 0.0, 0.0])
    mask = tf.constant([True, True, True, False, False, False])
    g = tf.constant([9.0, 9.0, 9.0, 1.0, -1.0, 1.0])
    update = rigl_update(w, mask, g, drop_fraction=0.5, static_shapes=static_shapes)
    np.testing.assert_array_equal(update.dropped.numpy(), [True, True, False, False, False, False])
    np.testing.assert_array_equal(update.grown.numpy(), [False, False, False, True, True, False])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_set_keeps_the_count_and_grows_only_previously_inactive_elements(seed):
    w, mask, _, init = layer(seed, shape=(12, 10), density=0.3)
    update = set_update(w, mask, drop_fraction=0.3, seed=[seed, 7], grow_init=init)
    new_mask, dropped, grown = (t.numpy() for t in (update.mask, update.dropped, update.grown))
    n = round(0.3 * mask.sum())
    assert new_mask.sum() == mask.sum() and dropped.sum() == grown.sum() == n
    assert not (grown & mask).any() and not (dropped & ~mask).any()
    # SET drops exactly as RigL does: the smallest |w|.
    np.testing.assert_array_equal(dropped.reshape(-1), oracle_rigl(w, mask, np.zeros_like(w), 0.3)[1])
    assert (bits(update.value.numpy())[dropped] == 0).all()
    np.testing.assert_array_equal(bits(update.value.numpy())[grown], bits(init)[grown])
    again = set_update(w, mask, drop_fraction=0.3, seed=[seed, 7], grow_init=init)
    np.testing.assert_array_equal(again.grown.numpy(), grown)
    other = set_update(w, mask, drop_fraction=0.3, seed=[seed, 8], grow_init=init)
    assert (other.grown.numpy() != grown).any()


def test_static_shapes_compile_with_xla_and_match_the_default_path():
    w, mask, g, init = layer(4, shape=(40, 30), density=0.2, ties=True)

    def both(w, mask, g, df, seed):
        return (rigl_update(w, mask, g, drop_fraction=df, grow_init=init, static_shapes=True),
                set_update(w, mask, drop_fraction=df, seed=seed, static_shapes=True))

    args = (w, mask, g, tf.constant(0.3), tf.constant([1, 2]))
    rigl_xla, _ = tf.function(both, jit_compile=True)(*args)
    rigl_static, set_static = tf.function(both)(*args)
    rigl_default = rigl_update(w, mask, g, drop_fraction=0.3, grow_init=init)
    set_default = set_update(w, mask, drop_fraction=0.3, seed=tf.constant([1, 2]))
    for xla, static, default in zip(rigl_xla, rigl_static, rigl_default):
        np.testing.assert_array_equal(exact(xla), exact(default))
        np.testing.assert_array_equal(exact(static), exact(default))
    for static, default in zip(set_static, set_default):  # the same random scores outside XLA: the same selection
        np.testing.assert_array_equal(exact(static), exact(default))


def test_set_grows_uniformly_over_the_inactive_elements():
    mask = np.zeros(20, bool)
    mask[:4] = True
    w = np.where(mask, np.arange(1, 21, dtype=np.float32), 0.0).astype(np.float32)
    grow = tf.function(lambda seed: set_update(w, mask, drop_fraction=0.5, seed=seed).grown)
    counts = sum(grow(tf.constant([s, 0])).numpy().astype(int) for s in range(400))
    assert counts[:4].sum() == 0 and counts.sum() == 800
    # 2 of 16 inactive per draw: each is grown 50 times on average; binomial sd ~6.6.
    assert counts[4:].min() > 25 and counts[4:].max() < 75


def test_updates_inside_one_tf_function_keep_density_and_do_not_retrace():
    rng = np.random.default_rng(0)
    shapes = {"k1": (20, 12), "k2": (12, 4)}
    values = {p: tf.Variable(rng.normal(size=s).astype(np.float32)) for p, s in shapes.items()}
    masks = {}
    for p, s in shapes.items():
        m = rng.random(s) < 0.25
        masks[p] = tf.Variable(m)
        values[p].assign(np.where(m, values[p].numpy(), 0.0))
    counts = {p: int(m.numpy().sum()) for p, m in masks.items()}

    @tf.function
    def update(grads, drop_fraction, seed, use_rigl):
        grown = {}
        for p in shapes:
            if use_rigl:
                u = rigl_update(values[p], masks[p], grads[p], drop_fraction=drop_fraction)
            else:
                u = set_update(values[p], masks[p], drop_fraction=drop_fraction, seed=seed)
            values[p].assign(u.value)
            masks[p].assign(u.mask)
            grown[p] = u.grown
        return grown

    schedule = CosineDropFraction(initial=0.5, end_step=10)
    ever_dropped = {p: np.zeros(s, bool) for p, s in shapes.items()}
    for step in range(8):
        before = {p: m.numpy().copy() for p, m in masks.items()}
        grads = {p: tf.constant(rng.normal(size=s).astype(np.float32)) for p, s in shapes.items()}
        grown = update(grads, schedule(tf.constant(step)), tf.constant([3, step]), tf.constant(step % 2 == 0))
        for p in shapes:
            after = masks[p].numpy()
            assert after.sum() == counts[p]
            ever_dropped[p] |= before[p] & ~after
            ever_dropped[p] &= ~after  # an element grown again is no longer "dropped"
            assert (bits(values[p].numpy())[ever_dropped[p]] == 0).all()
            assert (bits(values[p].numpy())[grown[p].numpy()] == 0).all()
        assert any((before[p] != masks[p].numpy()).any() for p in shapes)
    assert update.experimental_get_tracing_count() == 1


def test_grown_elements_get_zero_slots_inside_the_compiled_update():
    keras.utils.set_random_seed(0)
    dense = keras.layers.Dense(6, name="fc")
    dense.build((None, 8))
    optimizer = keras.optimizers.Adam(name="regrow_adam")
    rng = np.random.default_rng(0)
    mask = tf.Variable(rng.random((8, 6)) < 0.3)
    for _ in range(2):  # non-zero momentum and velocity everywhere
        optimizer.apply_gradients([(tf.constant(rng.normal(size=(8, 6)).astype(np.float32)), dense.kernel)])
    slots = [v for v in optimizer.variables if v.name in ("fc_kernel_momentum", "fc_kernel_velocity")]
    assert len(slots) == 2 and all((s.numpy() != 0).all() for s in slots)
    before = [s.numpy().copy() for s in slots]

    @tf.function
    def update(gradient):
        u = rigl_update(dense.kernel, mask, gradient, drop_fraction=0.5)
        dense.kernel.assign(u.value)
        mask.assign(u.mask)
        zero_slots(slots, u.grown)
        return u.grown

    grown = update(tf.constant(rng.normal(size=(8, 6)).astype(np.float32))).numpy()
    assert grown.sum() > 0
    for slot, old in zip(slots, before):
        assert (bits(slot.numpy())[grown] == 0).all()
        np.testing.assert_array_equal(bits(slot.numpy())[~grown], bits(old)[~grown])
    with pytest.raises(FreezeConfigError) as info:
        zero_slots(slots, np.zeros((6, 8), bool))
    assert str(info.value) == "slot 'regrow_adam/fc_kernel_momentum' has shape [8, 6], the elements to zero have shape [6, 8]"


def test_a_tensor_drop_fraction_out_of_range_fails_at_run_time():
    w, mask, g, _ = layer(0)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"drop_fraction must be a number in \[0, 1\)"):
        rigl_update(w, mask, g, drop_fraction=tf.constant(1.0))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda w, m, g: rigl_update(w, m, g, drop_fraction=1.0), "drop_fraction must be a number in [0, 1), got 1.0"),
        (lambda w, m, g: rigl_update(w, m, g, drop_fraction=-0.1), "drop_fraction must be a number in [0, 1), got -0.1"),
        (lambda w, m, g: set_update(w, m, drop_fraction=True, seed=[0, 0]), "drop_fraction must be a number in [0, 1), got True"),
        (lambda w, m, g: rigl_update(w, m.astype(np.float32), g, drop_fraction=0.1),
         "mask must be a bool tensor of the value's shape [7, 5], got float32 [7, 5]"),
        (lambda w, m, g: rigl_update(w, m[:3], g, drop_fraction=0.1),
         "mask must be a bool tensor of the value's shape [7, 5], got bool [3, 5]"),
        (lambda w, m, g: rigl_update(w, m, g.T, drop_fraction=0.1), "grow scores must have the value's shape [7, 5], got [5, 7]"),
        (lambda w, m, g: set_update(w, m, drop_fraction=0.1, seed=3), "seed must be two integers (a shape [2] int32/int64 tensor), got 3"),
        (lambda w, m, g: drop_and_grow(w, m, g, drop_fraction=0.1, grow_init=np.zeros(3)),
         "grow_init must have the value's shape [7, 5], got [3]"),
    ],
)
def test_bad_update_arguments_are_refused_with_one_line(call, message):
    w, mask, g, _ = layer(0)
    with pytest.raises(FreezeConfigError) as info:
        call(w, mask, g)
    assert str(info.value) == message


# --- drop-fraction schedules --------------------------------------------------------------------------------


def test_cosine_schedule_is_rigls_formula():
    schedule = CosineDropFraction(initial=0.3, end_step=1000)
    for t in (0, 1, 250, 500, 999, 1000, 5000):
        expected = 0.3 / 2 * (1 + math.cos(math.pi * min(t, 1000) / 1000))
        assert float(schedule(t)) == pytest.approx(expected, abs=1e-15)
    assert float(schedule(1000)) == 0.0 and float(schedule(0)) == 0.3
    late = CosineDropFraction(initial=0.3, end_step=300, begin_step=100)
    assert float(late(50)) == 0.3 and float(late(200)) == pytest.approx(0.15, abs=1e-15) and float(late(300)) == 0.0


def test_schedules_accept_a_step_tensor_without_retracing():
    schedule = make_drop_fraction_schedule({"kind": "cosine", "initial": 0.5, "end_step": 100})

    @tf.function
    def value(step):
        return schedule(step)

    results = [float(value(tf.constant(t, tf.int64))) for t in range(0, 120, 10)]
    assert results[0] == 0.5 and results[-1] == 0.0 and results == sorted(results, reverse=True)
    assert value.experimental_get_tracing_count() == 1


def test_make_drop_fraction_schedule_builds_both_kinds():
    assert make_drop_fraction_schedule(0.3) == ConstantDropFraction(value=0.3)
    assert make_drop_fraction_schedule({"kind": "constant", "value": 0.1}) == ConstantDropFraction(value=0.1)
    assert float(ConstantDropFraction(value=0.1)(123)) == 0.1
    assert make_drop_fraction_schedule({"kind": "cosine", "initial": 0.3, "end_step": 10}) == CosineDropFraction(
        initial=0.3, end_step=10, begin_step=0
    )


@pytest.mark.parametrize(
    "spec, message",
    [
        (1.0, "drop_fraction.value must be a number in [0, 1), got 1.0"),
        ("0.3", "drop_fraction must be a number in [0, 1) or a mapping with kind ['constant', 'cosine'], got '0.3'"),
        ({"kind": "linear", "value": 0.1}, "drop_fraction.kind must be one of ['constant', 'cosine'], got 'linear'"),
        ({"kind": "cosine", "initial": 0.3}, "drop_fraction of kind 'cosine' is missing ['end_step']"),
        ({"kind": "cosine", "initial": 0.3, "end_step": 10, "alpha": 1},
         "unknown drop_fraction key(s) ['alpha'] for kind 'cosine'; allowed: ['begin_step', 'end_step', 'final', 'initial', 'kind']"),
        ({"kind": "cosine", "initial": 0.3, "end_step": 10, "begin_step": 10},
         "drop_fraction.end_step (10) must be greater than begin_step (10)"),
        ({"kind": "cosine", "initial": 0.3, "end_step": -1}, "drop_fraction.end_step must be a non-negative integer, got -1"),
        ({"kind": "cosine", "initial": 1.2, "end_step": 10}, "drop_fraction.initial must be a number in [0, 1), got 1.2"),
    ],
)
def test_bad_schedules_are_refused_with_one_line(spec, message):
    with pytest.raises(FreezeConfigError) as info:
        make_drop_fraction_schedule(spec)
    assert str(info.value) == message
