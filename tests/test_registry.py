"""MaskRegistry and the masked step: frozen elements exact, gradients exactly 0."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import MaskRegistry, Trainer
from trainer.masks import FreezeConfigError


def dense_model(inputs=5, units=3, activation=None, name="net"):
    return keras.Sequential([keras.Input((inputs,)), keras.layers.Dense(units, activation=activation, name="fc")],
                            name=name)


def mlp(name="mlp"):
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh", name="fc1"),
                             keras.layers.Dense(4, name="fc2")], name=name)


def masked_step(model, registry, optimizer, hold_frozen=True):
    """The public custom-loop step; ``hold_frozen=False`` only masks gradients (the control)."""
    variables = registry.trainable_variables()

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        grads = tape.gradient(loss, variables)
        if hold_frozen:
            registry.apply_gradients(optimizer, registry.update_gradients(grads, variables), variables)
        else:
            optimizer.apply_gradients(zip(registry.mask_gradients(grads, variables), variables))

    return step


OPTIMIZERS = {
    "sgd_momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
}


def test_frozen_gradients_are_exactly_zero(seeded):
    model = dense_model()
    registry = MaskRegistry(model)
    registry.freeze("fc/kernel", elements={"indices": [0, 2, 5, 10]}, value="zero")
    x = tf.constant(seeded.normal(size=(4, 5)), tf.float32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x) ** 2)
    variables = model.trainable_variables
    raw = tape.gradient(loss, variables)
    masked = registry.mask_gradients(raw, variables)
    flat = masked[0].numpy().ravel()
    assert np.all(flat[[0, 2, 5, 10]] == 0.0)
    keep = np.setdiff1d(np.arange(15), [0, 2, 5, 10])
    np.testing.assert_array_equal(flat[keep], raw[0].numpy().ravel()[keep])
    np.testing.assert_array_equal(masked[1].numpy(), raw[1].numpy())


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("value", ["current", "zero", 0.25])
def test_frozen_elements_bit_exact_after_50_steps(seeded, opt_name, value):
    model = mlp()
    registry = MaskRegistry(model)
    registry.freeze("*/kernel", elements={"random": 0.5, "seed": 0}, value=value, name="half")  # seed 0: no unit is cut off
    registry.freeze("fc1/bias", elements={"indices": [1, 4]}, value=value, name="bias")
    optimizer = OPTIMIZERS[opt_name]()
    registry.attach_optimizer(optimizer)
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    masks = registry.trainable_masks()
    pinned = {p: np.where(masks[p], 0, before[p]) for p in masks}
    step = masked_step(model, registry, optimizer)
    x = tf.constant(seeded.normal(size=(16, 6)), tf.float32)
    y = tf.constant(seeded.normal(size=(16, 4)), tf.float32)
    for _ in range(50):
        step(x, y)
    for v in model.trainable_variables:
        after, frozen = v.numpy(), ~masks[v.path]
        # Pinned values are exact bit patterns (assert_array_equal on views treats -0.0 != 0.0).
        np.testing.assert_array_equal(after[frozen].view(np.uint32), pinned[v.path][frozen].view(np.uint32))
        assert np.all(after[~frozen] != before[v.path][~frozen]), f"{v.path}: trainable elements did not move"
    assert registry.exact()
    assert set(registry.drift().values()) == {0.0}


def test_without_reprojection_adamw_moves_frozen_elements(seeded):
    """Control: masking gradients alone is not enough under decoupled weight decay; reproject() repairs."""
    model = mlp()
    registry = MaskRegistry(model, update="dense")
    registry.freeze("*/kernel", elements={"random": 0.5, "seed": 3}, value=0.25)
    optimizer = keras.optimizers.AdamW(0.01, weight_decay=0.1)
    registry.attach_optimizer(optimizer)
    step = masked_step(model, registry, optimizer, hold_frozen=False)
    x = tf.constant(seeded.normal(size=(16, 6)), tf.float32)
    y = tf.constant(seeded.normal(size=(16, 4)), tf.float32)
    for _ in range(20):
        step(x, y)
    assert max(registry.drift().values()) > 1e-4
    assert not registry.exact()
    registry.reproject()
    assert registry.exact()


def test_dense3_flat_indices_pinned_to_zero_in_trainer(seeded):
    model = dense_model(5, 3)
    registry = MaskRegistry(model)
    registry.freeze("fc/kernel", elements={"indices": [0, 2, 5, 10]}, value="zero")
    assert np.all(model.layers[0].kernel.numpy().ravel()[[0, 2, 5, 10]] == 0.0)  # pinned before step 1
    x = seeded.normal(size=(64, 5)).astype(np.float32)
    y = seeded.integers(0, 3, size=64).astype(np.int32)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    trainer = Trainer(model, keras.optimizers.AdamW(0.05, weight_decay=0.2),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True), registry=registry)
    before = model.layers[0].kernel.numpy().copy()
    trainer.fit(ds, epochs=5)
    kernel = model.layers[0].kernel.numpy().ravel()
    assert trainer.step == 20
    assert kernel[[0, 2, 5, 10]].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert np.all(np.signbit(kernel[[0, 2, 5, 10]]) == False)  # noqa: E712 - +0.0, not -0.0
    others = np.setdiff1d(np.arange(15), [0, 2, 5, 10])
    assert np.all(kernel[others] != before.ravel()[others])


def test_sigmoid_2_2_2_element_pinned_to_constant_has_zero_gradient(seeded):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="sigmoid", name="h"),
                              keras.layers.Dense(2, activation="sigmoid", name="o")], name="xor")
    registry = MaskRegistry(model)
    registry.freeze("h/kernel", elements={"indices": [[0, 1]]}, value=0.5)
    assert model.layers[0].kernel.numpy()[0, 1] == np.float32(0.5)
    x = tf.constant([[0, 0], [0, 1], [1, 0], [1, 1]], tf.float32)
    y = tf.constant([[0, 1], [1, 0], [1, 0], [0, 1]], tf.float32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((model(x) - y) ** 2)
    raw = tape.gradient(loss, model.trainable_variables)
    assert raw[0].numpy()[0, 1] != 0.0  # the element would move without the mask
    grads = registry.mask_gradients(raw, model.trainable_variables)
    assert grads[0].numpy()[0, 1] == 0.0
    optimizer = keras.optimizers.SGD(0.5, momentum=0.9)
    registry.attach_optimizer(optimizer)
    step = masked_step(model, registry, optimizer)
    for _ in range(50):
        step(x, y)
    assert model.layers[0].kernel.numpy()[0, 1] == np.float32(0.5)


def test_kernel_frozen_bias_trains(seeded):
    model = dense_model()
    registry = MaskRegistry(model)
    registry.freeze("fc/kernel", value="current")
    kernel, bias = model.layers[0].kernel, model.layers[0].bias
    # A fully frozen variable is left out of the gradient computation entirely.
    assert [v.path for v in registry.trainable_variables()] == ["net/fc/bias"]
    k0, b0 = kernel.numpy().copy(), bias.numpy().copy()
    optimizer = keras.optimizers.AdamW(0.05, weight_decay=0.5)
    registry.attach_optimizer(optimizer)
    step = masked_step(model, registry, optimizer)
    x = tf.constant(seeded.normal(size=(8, 5)), tf.float32)
    y = tf.constant(seeded.normal(size=(8, 3)), tf.float32)
    for _ in range(30):
        step(x, y)
    np.testing.assert_array_equal(kernel.numpy(), k0)
    assert np.all(bias.numpy() != b0)


def test_embedding_rows_frozen_through_indexed_slices(seeded):
    model = keras.Sequential([keras.Input((4,), dtype="int32"), keras.layers.Embedding(10, 3, name="emb"),
                              keras.layers.Flatten(), keras.layers.Dense(2, name="out")], name="text")
    registry = MaskRegistry(model)
    registry.freeze("emb/embeddings", elements={"indices": list(range(0, 15))}, value="current")  # rows 0-4
    table = model.get_layer("emb").embeddings
    t0 = table.numpy().copy()
    x = tf.constant(seeded.integers(0, 10, size=(32, 4)), tf.int32)
    y = tf.constant(seeded.normal(size=(32, 2)), tf.float32)
    variables = registry.trainable_variables()
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((model(x) - y) ** 2)
    grads = tape.gradient(loss, variables)
    assert isinstance(grads[0], tf.IndexedSlices)
    masked = registry.mask_gradients(grads, variables)
    assert isinstance(masked[0], tf.IndexedSlices)
    dense = tf.convert_to_tensor(masked[0]).numpy()
    assert np.all(dense[:5] == 0.0) and np.any(dense[5:] != 0.0)
    optimizer = keras.optimizers.Adam(0.05)
    registry.attach_optimizer(optimizer)
    step = masked_step(model, registry, optimizer)
    for _ in range(20):
        step(x, y)
    np.testing.assert_array_equal(table.numpy()[:5], t0[:5])
    assert np.all(table.numpy()[5:] != t0[5:])


def test_freezing_zeroes_optimizer_slots_of_newly_frozen_elements(seeded):
    model = dense_model()
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    registry = MaskRegistry(model)
    registry.attach_optimizer(optimizer)
    step = masked_step(model, registry, optimizer)
    x = tf.constant(seeded.normal(size=(8, 5)), tf.float32)
    y = tf.constant(seeded.normal(size=(8, 3)), tf.float32)
    for _ in range(5):
        step(x, y)
    slot = [v for v in optimizer.variables if v.name == "net_fc_kernel_momentum"][0]
    assert np.all(slot.numpy() != 0)
    registry.freeze("fc/kernel", elements={"indices": [1, 7]}, value="current")
    flat = slot.numpy().ravel()
    assert flat[1] == 0.0 and flat[7] == 0.0 and np.all(np.delete(flat, [1, 7]) != 0)
    pinned = model.layers[0].kernel.numpy().ravel()[[1, 7]].copy()
    step = masked_step(model, registry, optimizer)
    for _ in range(10):
        step(x, y)
    np.testing.assert_array_equal(model.layers[0].kernel.numpy().ravel()[[1, 7]], pinned)


def test_unfrozen_variable_can_train_later_with_same_optimizer(seeded):
    model = mlp()
    registry = MaskRegistry(model)
    registry.freeze("fc1/*", value="current", name="backbone", end_step=5)
    optimizer = keras.optimizers.Adam(0.01)
    x = seeded.normal(size=(40, 6)).astype(np.float32)
    y = seeded.integers(0, 4, size=40).astype(np.int32)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    trainer = Trainer(model, optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      registry=registry)
    k0 = model.get_layer("fc1").kernel.numpy().copy()
    trainer.fit(ds, epochs=1)  # steps 0-4: frozen
    np.testing.assert_array_equal(model.get_layer("fc1").kernel.numpy(), k0)
    trainer.fit(ds, epochs=2)  # steps 5-9: the rule switched off
    assert np.all(model.get_layer("fc1").kernel.numpy() != k0)


def test_drift_reports_moved_frozen_elements(seeded):
    model = dense_model()
    registry = MaskRegistry(model)
    registry.freeze("fc/kernel", elements={"indices": [3]}, value="zero")
    assert registry.drift() == {"net/fc/kernel": 0.0}
    kernel = model.layers[0].kernel
    kernel.assign(kernel.numpy() + 0.5)
    assert registry.drift()["net/fc/kernel"] == pytest.approx(0.5)
    registry.reproject()
    assert registry.drift()["net/fc/kernel"] == 0.0


def test_glob_matching_nothing_lists_variable_paths():
    model = dense_model()
    with pytest.raises(FreezeConfigError, match=r"matches no variable.*net/fc/kernel, net/fc/bias"):
        MaskRegistry(model).freeze("conv*/kernel")


def test_trailing_subpath_globs():
    model = dense_model(name="lenet")
    for pattern in ("lenet/fc/kernel", "fc/kernel", "*/kernel", "kernel"):
        registry = MaskRegistry(model)
        registry.freeze(pattern)
        assert registry.covered_paths() == ["lenet/fc/kernel"], pattern
