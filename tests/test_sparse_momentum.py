"""Sparse Momentum (``regrow.method: momentum``), ``reset_slots`` and ``frozen_gradients: pass``, through public names.

Exact checks: the split of the regrowth across variables (a table), the drop and
growth of one variable (hand-computed), the registry's update against a NumPy
oracle (masks, values and slots bit for bit), frozen-at-zero elements bit-exact
while their momentum accumulates, and one-line refusals.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import MaskRegistry
from trainer.masks import FreezeConfigError
from trainer.masks.regrow_spec import CosineDropFraction, make_drop_fraction_schedule
from trainer.masks.sparse_momentum import growth_counts, momentum_drop_and_grow
from tests.test_sparse_training import bits, data, mlp  # the same 12-16-4 net and data

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def train(registry, model, optimizer, steps, regrow=False):
    """Plain GradientTape steps (batch = all of ``data(64)``); with ``regrow``, ``registry.regrow`` after each."""
    variables = registry.trainable_variables()
    x, y = data(64)
    events = []
    for step in range(1, steps + 1):
        with tf.GradientTape() as tape:
            loss = LOSS(y, model(x, training=True))
        grads = registry.update_gradients(tape.gradient(loss, variables), variables)
        registry.apply_gradients(optimizer, grads, variables)
        if regrow:
            events += registry.regrow(step)
    return events


GROWTH = {  # dropped, capacity, shares -> counts
    "by shares": ([10, 10], [100, 100], [3.0, 1.0], [15, 5]),
    "capped, the rest to the other": ([10, 10], [100, 4], [1.0, 3.0], [16, 4]),
    "equal shares": ([3, 0, 0], [10, 10, 10], [1.0, 1.0, 1.0], [1, 1, 1]),
    "all shares 0: by dropped": ([5, 3], [100, 100], [0.0, 0.0], [5, 3]),
    "less room than dropped": ([7, 0], [3, 2], [1.0, 1.0], [3, 2]),
    "NaN share counts 0, tie to the lower index": ([1, 1, 1], [10, 10, 10], [math.nan, 1.0, 1.0], [0, 2, 1]),
}


@pytest.mark.parametrize("case", sorted(GROWTH))
def test_growth_counts_split_the_total_by_shares_within_capacity(case):
    dropped, capacity, shares, expected = GROWTH[case]
    assert growth_counts(dropped, capacity, shares) == expected
    assert sum(expected) == min(sum(dropped), sum(capacity))


def test_growth_counts_refuse_bad_input_with_one_line():
    with pytest.raises(FreezeConfigError) as err:
        growth_counts([1, 2], [3], [1.0, 1.0])
    assert str(err.value) == "growth_counts needs lists of one length, got 2, 1 and 2"
    with pytest.raises(FreezeConfigError) as err:
        growth_counts([-1], [3], [1.0])
    assert str(err.value) == "growth_counts needs counts >= 0, got dropped [-1], capacity [3]"


def test_momentum_drop_and_grow_drops_smallest_w_grows_largest_momentum_and_may_regrow_a_dropped_element():
    value = np.array([[0.5, -0.1, 0.0, 0.0], [0.3, 0.0, 0.0, 0.05]], np.float32)
    mask = value != 0
    momentum = np.array([[0.0, 9.0, 1.0, 2.0], [0.0, 3.0, 0.5, 0.1]], np.float32)
    new = momentum_drop_and_grow(value, mask, momentum, drop=2, grow=3)
    # dropped: 0.05 and -0.1 (smallest |w|); grown among the rest: -0.1's place (|m| 9, regrown: keeps -0.1), 3, 2
    np.testing.assert_array_equal(new.mask.numpy(), [[True, True, False, True], [True, True, False, False]])
    np.testing.assert_array_equal(bits(new.value.numpy()), bits([[0.5, -0.1, 0.0, 0.0], [0.3, 0.0, 0.0, 0.0]]))
    np.testing.assert_array_equal(new.grown.numpy(), [[False, False, False, True], [False, True, False, False]])
    np.testing.assert_array_equal(new.dropped.numpy(), [[False, False, False, False], [False, False, False, True]])


def sparse_registry(model, *, update="auto", **regrow):
    registry = MaskRegistry(model, update=update)
    spec = dict({"method": "momentum", "drop_fraction": 0.5, "update_every_n_steps": 3}, **regrow)
    registry.freeze("*/kernel", elements={"random": 0.75, "seed": 1}, value="zero", name="sparse", regrow=spec)
    return registry


def test_frozen_gradients_pass_accumulates_momentum_of_frozen_elements_which_stay_bit_exact_zero():
    weights, momenta = {}, {}
    for frozen in ("pass", "mask"):
        model = mlp(2)
        registry = sparse_registry(model, method="set", frozen_gradients=frozen)
        optimizer = keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True)
        registry.attach_optimizer(optimizer)
        train(registry, model, optimizer, 4)
        assert registry.exact()
        frozen_mask = ~registry.trainable_mask("net/fc1/kernel")
        weights[frozen] = {v.path: v.numpy().copy() for v in model.weights}
        np.testing.assert_array_equal(bits(weights[frozen]["net/fc1/kernel"][frozen_mask]), 0)  # +0.0, not -0.0
        slot = [v for v in optimizer.variables if v.name == "net_fc1_kernel_momentum"][0].numpy()
        momenta[frozen] = slot[frozen_mask]
    assert np.count_nonzero(momenta["pass"]) > momenta["pass"].size // 4  # accumulated (dead ReLU units: 0)
    np.testing.assert_array_equal(bits(momenta["mask"]), 0)  # the control: masked gradients, zero momentum
    for path in weights["mask"]:  # the model itself trains bit for bit the same
        np.testing.assert_array_equal(bits(weights["pass"][path]), bits(weights["mask"][path]))


def oracle(w, mask, m, drop, grow):
    """NumPy: drop the ``drop`` smallest |w| of the active, grow the ``grow`` largest |m| of the rest (stable)."""
    flat_w, active, flat_m = w.ravel(), mask.ravel(), np.abs(m.ravel())
    act = np.flatnonzero(active)
    removed = act[np.argsort(np.abs(flat_w[act]), kind="stable")[:drop]]
    kept = active.copy()
    kept[removed] = False
    cand = np.flatnonzero(~kept)
    added = cand[np.argsort(-flat_m[cand], kind="stable")[:grow]]
    new = kept.copy()
    new[added] = True
    return new.reshape(w.shape)


@pytest.mark.parametrize("reset_slots", [True, False])
def test_momentum_update_matches_the_oracle_keeps_the_total_and_resets_slots_only_when_asked(reset_slots):
    model = mlp(4)
    registry = sparse_registry(model, reset_slots=reset_slots)
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    registry.attach_optimizer(optimizer)
    train(registry, model, optimizer, 2)
    paths = ["net/fc1/kernel", "net/out/kernel"]
    variables = {v.path: v for v in model.weights}
    slots = {p: [v for v in optimizer.variables if v.name == p.replace("/", "_") + "_momentum"][0] for p in paths}
    w0 = {p: variables[p].numpy().copy() for p in paths}
    m0 = {p: slots[p].numpy().copy() for p in paths}
    k0 = {p: registry.trainable_mask(p) for p in paths}
    events = registry.regrow(3)
    drops = [math.ceil(0.5 * k0[p].sum()) for p in paths]
    shares = [float(np.abs(m0[p][k0[p]].astype(np.float64)).mean()) for p in paths]
    grows = growth_counts(drops, [k0[p].size - k0[p].sum() + d for p, d in zip(paths, drops)], shares)
    assert [e["path"] for e in events] == paths and {e["step"] for e in events} == {3}
    assert sum(e["active"] for e in events) == sum(int(k0[p].sum()) for p in paths)  # the total stays
    for p, drop, grow, event in zip(paths, drops, grows, events):
        mask = oracle(w0[p], k0[p], m0[p], drop, grow)
        np.testing.assert_array_equal(registry.trainable_mask(p), mask)
        changed = mask != k0[p]
        assert event["active"] == mask.sum() and event["grown"] == (mask & ~k0[p]).sum()
        w1, m1 = variables[p].numpy(), slots[p].numpy()
        np.testing.assert_array_equal(bits(w1[~mask]), 0)
        np.testing.assert_array_equal(bits(w1[mask]), bits(w0[p][mask]))  # kept (and regrown) keep their bits
        if reset_slots:
            np.testing.assert_array_equal(bits(m1[changed]), 0)
            np.testing.assert_array_equal(bits(m1[~changed]), bits(m0[p][~changed]))
        else:  # grown elements start with the momentum accumulated at their position
            np.testing.assert_array_equal(bits(m1), bits(m0[p]))
            assert np.count_nonzero(m1[mask & ~k0[p]]) == (mask & ~k0[p]).sum() > 0
    train(registry, model, optimizer, 2)  # trains on, frozen elements exact
    assert registry.exact()


def test_momentum_rules_train_through_registry_regrow_and_move_weight_between_layers():
    model = mlp(5)
    registry = sparse_registry(model, drop_fraction={"kind": "cosine", "initial": 0.5, "final": 0.005,
                                                     "end_step": 12})
    optimizer = keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True)
    registry.attach_optimizer(optimizer)
    start = {p: int(m.sum()) for p, m in registry.trainable_masks().items() if p.endswith("kernel")}
    events = train(registry, model, optimizer, 12, regrow=True)
    assert sorted({e["step"] for e in events}) == [3, 6, 9, 12]
    end = {p: int(m.sum()) for p, m in registry.trainable_masks().items() if p.endswith("kernel")}
    assert sum(end.values()) == sum(start.values()) and end != start  # redistributed, total kept
    assert registry.exact()


REFUSALS = [
    ({"reset_slots": "yes"}, "auto", "rule 'sparse': regrow.reset_slots must be true or false, got 'yes'"),
    ({"frozen_gradients": "keep"}, "auto",
     "rule 'sparse': regrow.frozen_gradients must be one of ['mask', 'pass'], got 'keep'"),
    ({"drop_fraction": {"kind": "cosine", "initial": 0.5, "final": 1.0, "end_step": 9}}, "auto",
     "rule 'sparse': drop_fraction.final must be a number in [0, 1), got 1.0"),
    ({}, "compact", "rule 'sparse': regrow method 'momentum' needs the optimizer's slots of frozen elements, which "
                    "update 'compact' does not keep; use update 'auto' or 'dense'"),
    ({"method": "set", "frozen_gradients": "pass"}, "compact",
     "rule 'sparse': regrow frozen_gradients 'pass' needs the optimizer's slots of frozen elements, which update "
     "'compact' does not keep; use update 'auto' or 'dense'"),
]


@pytest.mark.parametrize("regrow,update,message", REFUSALS, ids=[str(i) for i in range(len(REFUSALS))])
def test_bad_momentum_rules_are_refused_with_one_line(regrow, update, message):
    with pytest.raises(FreezeConfigError) as err:
        sparse_registry(mlp(), update=update, **regrow)
    assert str(err.value) == message


def test_an_optimizer_without_momentum_is_refused_when_attached():
    registry = sparse_registry(mlp())
    with pytest.raises(FreezeConfigError) as err:
        registry.attach_optimizer(keras.optimizers.SGD(0.1))
    assert str(err.value) == ("regrow method 'momentum' grows where the optimizer's momentum is largest, but SGD "
                              "keeps no momentum for 'net/fc1/kernel'; use SGD with momentum > 0 (e.g. "
                              "optimizer.options.momentum=0.9) or Adam")


def test_cosine_drop_fraction_with_a_final_value_and_without_it_bit_for_bit_as_before():
    schedule = make_drop_fraction_schedule({"kind": "cosine", "initial": 0.5, "final": 0.005, "end_step": 54000})
    assert float(schedule(0)) == 0.5 and float(schedule(54000)) == 0.005 and float(schedule(60000)) == 0.005
    assert float(schedule(27000)) == 0.005 + 0.5 * (0.5 - 0.005) * (1.0 + math.cos(math.pi * 0.5))
    plain = CosineDropFraction(initial=0.3, end_step=100)
    for step in (0, 1, 37, 99, 100):
        assert float(plain(step)) == float(0.5 * 0.3 * (1.0 + tf.cos(math.pi * tf.constant(float(step),
                                                                                          tf.float64) / 100.0)))


def test_a_momentum_rule_pinning_anything_but_zero_is_refused_with_one_line():
    registry = MaskRegistry(mlp())
    with pytest.raises(FreezeConfigError) as err:
        registry.freeze("*/kernel", elements={"random": 0.75, "seed": 1}, value="current", name="sparse",
                        regrow={"method": "momentum", "drop_fraction": 0.5, "update_every_n_steps": 3})
    assert str(err.value) == "rule 'sparse': regrow drops elements to zero, so it needs value: zero, got value 'current'"
    assert registry.rules == []
