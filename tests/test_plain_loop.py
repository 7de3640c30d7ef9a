"""The plain Keras loop: ``mask_gradients`` -> any ``optimizer.apply_gradients`` -> ``reproject()``, bit-exact."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import MaskRegistry

OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.1),
    "sgd_momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    "sgd_weight_decay": lambda: keras.optimizers.SGD(0.1, weight_decay=0.1),
    "adam": lambda: keras.optimizers.Adam(0.05),
    "adamw": lambda: keras.optimizers.AdamW(0.05, weight_decay=0.1),
    "lion": lambda: keras.optimizers.Lion(0.01, weight_decay=0.1),
}
# Four pins on separate elements of a Dense kernel (flat indices) and of an Embedding (rows).
PINS = {"current": "current", "initial": "initial", "zero": "zero", "constant": 0.25}
KERNEL = {"current": [0, 1], "initial": [2, 3], "zero": [4, 5], "constant": [6, 7]}
ROWS = {"current": "[0:2, :]", "initial": "[2:4, :]", "zero": "[4:6, :]", "constant": "[6:8, :]"}


@pytest.fixture(scope="module")
def setup():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(10, 4, name="emb"),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(3, name="fc")], name="net")
    rng = np.random.default_rng(0)
    x = tf.constant(rng.integers(0, 10, size=(16, 3)), tf.int32)
    y = tf.constant(rng.normal(size=(16, 3)), tf.float32)
    return model, [v.numpy().copy() for v in model.variables], x, y


def expected(name, initial, at_rule):
    return {"current": at_rule, "initial": initial, "zero": np.zeros_like(initial),
            "constant": np.full_like(initial, 0.25)}[name]


def run(setup, optimizer, compile_mode, steps=3):
    """Two unmasked steps (the optimizer gets state), then the four rules, then ``steps`` masked steps."""
    model, start, x, y = setup
    model.set_weights(start)
    variables = model.trainable_variables

    def loss():
        return tf.reduce_mean(tf.square(model(x, training=True) - y))

    def plain(registry=None):
        with tf.GradientTape() as tape:
            value = loss()
        grads = tape.gradient(value, variables)
        if registry is not None:
            grads = registry.mask_gradients(grads, variables)
        optimizer.apply_gradients(zip(grads, variables))
        if registry is not None:
            registry.reproject()

    for _ in range(2):
        plain()
    initial = {v.path: s for v, s in zip(model.variables, start)}
    registry = MaskRegistry(model, initial_values=initial)
    at_rule = {v.path: v.numpy().copy() for v in variables}
    for name, pin in PINS.items():
        registry.freeze("fc/kernel", elements={"indices": KERNEL[name]}, value=pin, name=f"k_{name}")
        registry.freeze("emb/embeddings", elements={"slice": ROWS[name]}, value=pin, name=f"e_{name}")
    step = {"eager": plain, "function": tf.function(plain),
            "xla": tf.function(plain, jit_compile=True)}[compile_mode]
    moved = {v.path: v.numpy().copy() for v in variables}
    for _ in range(steps):
        step(registry)
    kernel, table = model.get_layer("fc").kernel, model.get_layer("emb").embeddings
    for name in PINS:
        k = KERNEL[name]
        want = expected(name, initial[kernel.path], at_rule[kernel.path]).reshape(-1)[k]
        np.testing.assert_array_equal(kernel.numpy().reshape(-1)[k].view(np.uint32), want.view(np.uint32),
                                      err_msg=f"{compile_mode} {name} kernel")
        rows = slice(*(int(i) for i in ROWS[name][1:-4].split(":")))
        want = expected(name, initial[table.path], at_rule[table.path])[rows]
        np.testing.assert_array_equal(table.numpy()[rows].view(np.uint32), want.view(np.uint32),
                                      err_msg=f"{compile_mode} {name} rows")
    assert np.all(kernel.numpy().reshape(-1)[8:] != moved[kernel.path].reshape(-1)[8:])  # trainable ones moved
    assert np.all(table.numpy()[8:] != moved[table.path][8:])
    assert registry.exact()


@pytest.mark.parametrize("compile_mode", ["eager", "function", "xla"])
def test_plain_loop_exact_for_every_pin_and_optimizer(setup, compile_mode):
    # Plain SGD (no state, no decay) eagerly only; the compiled ones trace per optimizer (XLA: the four slowest).
    names = {"eager": list(OPTIMIZERS), "function": list(OPTIMIZERS)[1:],
             "xla": ["sgd_momentum", "adam", "adamw", "lion"]}[compile_mode]
    for name in names:
        run(setup, OPTIMIZERS[name](), compile_mode)


def test_masked_gradients_alone_move_frozen_elements(setup):
    """Control: the same loop without reproject() lets AdamW move frozen elements."""
    model, start, x, y = setup
    model.set_weights(start)
    registry = MaskRegistry(model)
    registry.freeze("fc/kernel", elements={"indices": KERNEL["current"]}, name="k")
    optimizer, variables = keras.optimizers.AdamW(0.05, weight_decay=0.1), model.trainable_variables
    for _ in range(2):
        with tf.GradientTape() as tape:
            value = tf.reduce_mean(tf.square(model(x, training=True) - y))
        optimizer.apply_gradients(zip(registry.mask_gradients(tape.gradient(value, variables), variables), variables))
    assert not registry.exact()


def test_reproject_refuses_a_current_pin_changed_outside_a_step(setup):
    model, start, _, _ = setup
    model.set_weights(start)
    registry = MaskRegistry(model)
    registry.freeze("fc/kernel", elements={"indices": [0]}, name="k")
    registry.freeze("emb/embeddings", elements={"slice": "[0:1, :]"}, value="zero", name="e")
    kernel = model.get_layer("fc").kernel
    kernel.assign(kernel.numpy() + 1.0)
    model.get_layer("emb").embeddings.assign(np.ones((10, 4), np.float32))
    with pytest.raises(RuntimeError) as error:
        registry.reproject()
    assert str(error.value) == (
        "frozen elements pinned with value 'current' changed outside a masked step in ['net/fc/kernel']: their "
        "values are not kept, so reproject() cannot rebuild them (call registry.mask_gradients before "
        "optimizer.apply_gradients, which keeps a copy, and change frozen elements only through the registry)")
    assert model.get_layer("emb").embeddings.numpy()[0].tolist() == [0.0] * 4  # the zero pin was rebuilt


def test_compiled_reproject_needs_the_copies_of_mask_gradients(setup):
    model, start, _, _ = setup
    model.set_weights(start)
    registry = MaskRegistry(model)
    registry.freeze("fc/kernel", elements={"indices": [0]}, name="k")
    with pytest.raises(RuntimeError) as error:
        tf.function(registry.reproject, autograph=False)()
    assert str(error.value) == (
        "MaskRegistry.reproject() inside a tf.function needs the pre-update copies mask_gradients takes, and it "
        "has none of ['net/fc/kernel']: call registry.mask_gradients(grads, variables) with these variables "
        "before optimizer.apply_gradients")
