"""Prune-and-regrow that keeps groups whole (``regrow`` with ``elements.groups: units|inputs``).

Exact checks against a NumPy oracle: after an update every group is entirely frozen or entirely trainable,
the number of frozen groups is unchanged, the dropped groups are the smallest-norm trainable ones, grown
groups were frozen and start at +0.0 with zero optimizer slots, and frozen elements keep their bits while
training.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import MaskRegistry, Trainer
from trainer.masks import FreezeConfigError, FreezeRule
from trainer.masks.group_regrow import group_update

from tests.test_sparse_training import LOSS, bits, data, mlp  # the same 12-16-4 net, data and bit view


def columns(a, groups):
    """Groups as the rows of a 2-D array: units are the columns of a Dense kernel, inputs its rows."""
    return a.T if groups == "units" else a


def oracle_drop(w, mask, fraction, groups, norm):
    """By a loop over groups: the round(fraction * trainable) trainable groups of smallest norm (ties: position)."""
    w, mask = columns(np.asarray(w, np.float64), groups), columns(mask, groups)
    trainable = [g for g in range(len(w)) if mask[g].all()]
    score = {g: (np.abs(w[g]).sum() if norm == "l1" else np.sqrt((w[g] ** 2).sum())) for g in trainable}
    n = min(int(round(fraction * len(trainable))), len(w) - len(trainable))
    return sorted(sorted(trainable, key=lambda g: (score[g], g))[:n]), n


def train(model, registry, optimizer, steps, x, y):
    variables = registry.trainable_variables()
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = LOSS(y, model(x, training=True))
        grads = registry.update_gradients(tape.gradient(loss, variables), variables)
        registry.apply_gradients(optimizer, grads, variables)


@pytest.mark.parametrize("groups, norm, method", [("units", "l1", "set"), ("units", "l2", "rigl"),
                                                  ("inputs", "l2", "set"), ("inputs", "l1", "rigl")])
def test_an_update_moves_whole_groups_and_matches_the_oracle(groups, norm, method):
    model = mlp(1)
    registry = MaskRegistry(model)
    registry.freeze("fc1/kernel", elements={"magnitude": 0.5, "groups": groups, "norm": norm}, value="zero",
                    name="g", regrow={"method": method, "drop_fraction": 0.5, "update_every_n_steps": 1, "seed": 3})
    optimizer = keras.optimizers.Adam(0.05)
    registry.attach_optimizer(optimizer)
    kernel = model.get_layer("fc1").kernel
    path = kernel.path
    m0 = registry.trainable_mask(path)
    g0 = columns(m0, groups)
    assert all(row.all() or not row.any() for row in g0)
    frozen_groups = int((~g0.any(axis=1)).sum())
    assert frozen_groups == round(0.5 * len(g0))
    x, y = data(64)
    w_start = kernel.numpy().copy()
    train(model, registry, optimizer, 3, x, y)
    np.testing.assert_array_equal(bits(kernel.numpy()[~m0]), bits(w_start[~m0]))  # frozen: bits kept (+0.0)
    np.testing.assert_array_equal(bits(kernel.numpy()[~m0]), 0)
    w0 = kernel.numpy().copy()
    slots = [v for v in optimizer.variables if v.name.startswith("net_fc1_kernel_")]
    s0 = [s.numpy().copy() for s in slots]
    gradient = np.random.default_rng(7).normal(size=w0.shape).astype(np.float32)
    expected_drop, n = oracle_drop(w0, m0, 0.5, groups, norm)
    assert n > 0
    events = registry.regrow(1, gradients={path: gradient} if method == "rigl" else None)
    m1 = registry.trainable_mask(path)
    g1 = columns(m1, groups)
    assert all(row.all() or not row.any() for row in g1)  # every group whole
    assert int((~g1.any(axis=1)).sum()) == frozen_groups  # the frozen count is unchanged
    dropped = sorted(int(g) for g in np.flatnonzero(g0.all(axis=1) & ~g1.any(axis=1)))
    grown = sorted(int(g) for g in np.flatnonzero(~g0.any(axis=1) & g1.all(axis=1)))
    assert dropped == expected_drop and len(grown) == n
    if method == "rigl":  # the frozen groups whose gradient norm is largest
        gc = columns(gradient.astype(np.float64), groups)
        score = [np.abs(r).sum() if norm == "l1" else np.sqrt((r ** 2).sum()) for r in gc]
        frozen = [g for g in range(len(g0)) if not g0[g].any()]
        assert grown == sorted(sorted(frozen, key=lambda g: (-score[g], g))[:n])
    changed = m0 != m1
    w1 = kernel.numpy()
    np.testing.assert_array_equal(bits(w1[changed]), 0)  # dropped and grown: +0.0
    np.testing.assert_array_equal(bits(w1[~changed]), bits(w0[~changed]))
    for before, slot in zip(s0, slots):
        np.testing.assert_array_equal(bits(slot.numpy()[changed]), 0)
        np.testing.assert_array_equal(bits(slot.numpy()[~changed]), bits(before[~changed]))
    size = g0.shape[1]
    assert events == [{"step": 1, "path": path, "drop_fraction": 0.5, "dropped": n * size, "grown": n * size,
                       "active": int(m0.sum())}]
    train(model, registry, optimizer, 2, x, y)  # frozen elements keep their bits through training
    np.testing.assert_array_equal(bits(kernel.numpy()[~m1]), 0)
    assert registry.exact()


@pytest.mark.parametrize("mode", ["dense", "compact"])
def test_the_trainer_keeps_groups_whole_in_dense_and_compact_updates(mode):
    x, y = data(160, 3)
    model = mlp(2)
    registry = MaskRegistry(model, update=mode)
    registry.freeze("fc1/kernel", elements={"magnitude": 0.75, "groups": "units"}, value="zero", name="g",
                    regrow={"method": "set", "drop_fraction": 0.5, "update_every_n_steps": 5})
    start = registry.trainable_mask("net/fc1/kernel")
    trainer = Trainer(model, keras.optimizers.Adam(0.01), LOSS, registry=registry, steps_per_execution=3,
                      jit_compile=False)
    trainer.fit(x, y, batch_size=16, epochs=2, shuffle=False)  # 20 steps, 4 updates
    assert registry.update_modes()["net/fc1/kernel"] == mode
    mask = registry.trainable_mask("net/fc1/kernel")
    assert (mask != start).any() and mask.sum() == start.sum()
    assert set(mask.all(axis=0) | ~mask.any(axis=0)) == {True}
    assert int((~mask.any(axis=0)).sum()) == 12  # 0.75 of 16 units
    np.testing.assert_array_equal(bits(model.get_layer("fc1").kernel.numpy()[~mask]), 0)
    assert registry.exact()


def test_static_shapes_give_the_same_update():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 8)).astype(np.float32)
    mask = np.broadcast_to(rng.random(8) < 0.5, w.shape)
    elements = {"magnitude": 0.5, "groups": "units", "norm": "l2"}
    a = group_update(w, mask, elements, "set", drop_fraction=0.5, seed=(1, 2))
    b = group_update(w, mask, elements, "set", drop_fraction=0.5, seed=(1, 2), static_shapes=True)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


@pytest.mark.parametrize("elements, method, got", [
    ({"magnitude": 0.5, "groups": "blocks", "block": [2, 2]}, "set", "groups 'blocks' and method 'set'"),
    ({"magnitude": 0.5, "groups": "heads"}, "rigl", "groups 'heads' and method 'rigl'"),
    ({"magnitude": 0.5, "groups": "units"}, "momentum", "groups 'units' and method 'momentum'"),
])
def test_unsupported_group_regrowth_is_refused_with_one_line(elements, method, got):
    with pytest.raises(FreezeConfigError) as err:
        FreezeRule.create("g", select="*/kernel", elements=elements, value="zero",
                          regrow={"method": method, "drop_fraction": 0.3, "update_every_n_steps": 10})
    assert str(err.value) == (f"rule 'g': regrow keeps groups whole only for elements.groups ['units', 'inputs'] "
                              f"with regrow.method ['set', 'rigl'], got {got}; remove regrow or groups")


@pytest.mark.parametrize("mode", ["dense", "compact"])
def test_a_checkpoint_between_updates_resumes_bit_exact(mode, tmp_path):
    x, y = data(160, 4)

    def make():
        model = mlp(5)
        registry = MaskRegistry(model, update=mode)
        registry.freeze("fc1/kernel", elements={"magnitude": 0.5, "groups": "inputs", "norm": "l2"}, value="zero",
                        name="g", regrow={"method": "rigl", "drop_fraction": 0.5, "update_every_n_steps": 5})
        return Trainer(model, keras.optimizers.Adam(0.01), LOSS, registry=registry, steps_per_execution=5,
                       jit_compile=False)

    straight = make()
    straight.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=False)  # updates at 5, 10, 15, 20
    first = make()
    first.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=False)
    path = tf.train.Checkpoint(**first.state().checkpoint_objects).save(str(tmp_path / "ckpt"))
    resumed = make()
    resumed.fit(x, y, batch_size=16, epochs=1, max_steps=3, shuffle=False, verbose=False)
    tf.train.Checkpoint(**resumed.state().checkpoint_objects).restore(path).assert_existing_objects_matched()
    resumed.registry.after_restore()
    resumed.fit(x, y, batch_size=16, epochs=2, initial_epoch=1, shuffle=False, verbose=False)
    mask = resumed.registry.trainable_mask("net/fc1/kernel")
    np.testing.assert_array_equal(mask, straight.registry.trainable_mask("net/fc1/kernel"))
    assert set(mask.all(axis=1) | ~mask.any(axis=1)) == {True} and int((~mask.any(axis=1)).sum()) == 6
    assert (mask != make().registry.trainable_mask("net/fc1/kernel")).any()  # the updates moved inputs
    for a, b in zip(straight.model.variables, resumed.model.variables):
        np.testing.assert_array_equal(bits(a.numpy()), bits(b.numpy()), err_msg=a.path)


@pytest.mark.parametrize("groups, axis", [("units", 3), ("inputs", 2)])
def test_a_conv_kernel_moves_whole_filters_or_input_channels(groups, axis):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 3, 4, 8)).astype(np.float32)
    flags = np.arange(w.shape[axis]) % 2 == 0
    index = [1, 1, 1, 1]
    index[axis] = w.shape[axis]
    mask = np.broadcast_to(flags.reshape(index), w.shape)
    new = group_update(w, mask, {"magnitude": 0.5, "groups": groups}, "set", drop_fraction=0.5, seed=(0, 1))
    moved = np.moveaxis(new.mask.numpy(), axis, 0).reshape(w.shape[axis], -1)
    assert set(moved.all(axis=1) | ~moved.any(axis=1)) == {True}
    assert moved.all(axis=1).sum() == flags.sum() and new.grown.numpy().any()
    l1 = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).sum(axis=1)
    active = np.flatnonzero(flags)
    expected = sorted(active[np.argsort(l1[active], kind="stable")[:round(0.5 * active.size)]].tolist())
    dropped = np.moveaxis(new.dropped.numpy(), axis, 0).reshape(w.shape[axis], -1).all(axis=1)
    assert np.flatnonzero(dropped).tolist() == expected
