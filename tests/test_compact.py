"""Compact updates: the same training as dense ones, frozen elements never written, small state."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import MaskRegistry, Trainer
from trainer.masks import FreezeConfigError


def mlp(name="mlp"):
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="tanh", name="fc1"),
                             keras.layers.Dense(4, name="fc2")], name=name)


def embedder(name="emb"):
    return keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(10, 4, name="tok"),
                             keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2, name="head")], name=name)


OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.05),
    "sgd_momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(0.01),
}


def bits(a):
    return np.asarray(a).view(np.uint32)


def train(update, optimizer, build=mlp, steps=50, value="current", data=None, jit=False, select="*/kernel"):
    """50 steps of the public custom loop on one fixed batch; returns (model, registry, before)."""
    keras.utils.set_random_seed(7)
    model = build()
    registry = MaskRegistry(model, update=update)
    registry.freeze(select, elements={"random": 0.9, "seed": 1}, value=value)
    registry.attach_optimizer(optimizer)
    variables = registry.trainable_variables()
    x, y = data if data is not None else (tf.constant(np.random.default_rng(0).normal(size=(16, 6)), tf.float32),
                                          tf.constant(np.random.default_rng(1).normal(size=(16, 4)), tf.float32))
    before = {v.path: v.numpy().copy() for v in model.variables}

    @tf.function(jit_compile=jit)
    def step():
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            loss = tf.reduce_mean(tf.square(out - tf.cast(y, out.dtype)))
        grads = registry.update_gradients(tape.gradient(loss, variables), variables)
        registry.apply_gradients(optimizer, grads, variables)

    for _ in range(steps):
        step()
    return model, registry, before


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_compact_and_dense_train_the_same_values(name):
    dense, dense_registry, before = train("dense", OPTIMIZERS[name]())
    compact, compact_registry, _ = train("compact", OPTIMIZERS[name]())
    assert set(compact_registry.update_modes().values()) == {"compact"}
    assert set(dense_registry.update_modes().values()) == {"dense"}
    for a, b in zip(dense.variables, compact.variables):
        trainable = dense_registry.trainable_mask(a.path)
        np.testing.assert_array_equal(compact_registry.trainable_mask(a.path), trainable)
        np.testing.assert_allclose(b.numpy()[trainable], a.numpy()[trainable], rtol=1e-6, atol=0)
        np.testing.assert_array_equal(bits(b.numpy()[~trainable]), bits(before[a.path][~trainable]))
        assert np.all(b.numpy()[trainable] != before[a.path][trainable]), a.path
    assert compact_registry.exact() and dense_registry.exact()


def test_compact_adamw_decays_trainable_elements_only():
    keras.utils.set_random_seed(3)
    model = mlp()
    registry = MaskRegistry(model, update="compact")
    registry.freeze("*/kernel", elements={"random": 0.9, "seed": 0}, value="current")
    optimizer = keras.optimizers.AdamW(0.1, weight_decay=0.5)
    registry.attach_optimizer(optimizer)
    variables = registry.trainable_variables()
    before = {v.path: v.numpy().copy() for v in variables}
    zero = [tf.zeros_like(v.value) for v in variables]  # no gradient: only the decoupled decay moves values
    registry.apply_gradients(optimizer, registry.update_gradients(zero, variables), variables)
    for v in variables:
        trainable = registry.trainable_mask(v.path)
        expected = before[v.path] - before[v.path] * np.float32(0.5) * np.float32(0.1)
        np.testing.assert_allclose(v.numpy()[trainable], expected[trainable], rtol=1e-6)
        np.testing.assert_array_equal(bits(v.numpy()[~trainable]), bits(before[v.path][~trainable]))
    assert registry.exact()


def test_embedding_gradients_compact_equal_dense():
    """SGD: Keras applies an IndexedSlices gradient row by row (Adam's moments too, lazily), compact densifies it."""
    tokens = tf.constant([[1, 2, 3], [3, 4, 4], [0, 9, 1]], tf.int32)
    labels = tf.constant([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    dense, dense_registry, _ = train("dense", keras.optimizers.SGD(0.1), build=embedder, steps=20,
                                     data=(tokens, labels), select="tok/embeddings")
    compact, compact_registry, before = train("compact", keras.optimizers.SGD(0.1), build=embedder, steps=20,
                                              data=(tokens, labels), select="tok/embeddings")
    path = "emb/tok/embeddings"
    assert compact_registry.update_modes()[path] == "compact"
    trainable = compact_registry.trainable_mask(path)
    a, b = dense.get_layer("tok").embeddings.numpy(), compact.get_layer("tok").embeddings.numpy()
    np.testing.assert_allclose(b[trainable], a[trainable], rtol=1e-6)
    np.testing.assert_array_equal(bits(b[~trainable]), bits(before[path][~trainable]))


def test_trainer_compact_with_xla_matches_dense_and_keeps_frozen_bits():
    rng = np.random.default_rng(0)
    ds = tf.data.Dataset.from_tensor_slices((rng.normal(size=(64, 6)).astype(np.float32),
                                             rng.integers(0, 4, size=64))).batch(16)
    results = {}
    for update in ("dense", "compact"):
        keras.utils.set_random_seed(5)
        model = mlp()
        registry = MaskRegistry(model, update=update)
        registry.freeze("*/kernel", elements={"random": 0.95, "seed": 2}, value="zero")
        before = {v.path: v.numpy().copy() for v in model.variables}
        trainer = Trainer(model, keras.optimizers.AdamW(0.01, weight_decay=0.1),
                          keras.losses.SparseCategoricalCrossentropy(from_logits=True), registry=registry,
                          steps_per_execution=3, jit_compile=True)
        trainer.fit(ds, epochs=3)
        assert trainer.step == 12 and registry.exact()
        results[update] = (model, registry, before)
    (dense, dense_registry, before), (compact, _, _) = results["dense"], results["compact"]
    for a, b in zip(dense.variables, compact.variables):
        trainable = dense_registry.trainable_mask(a.path)
        np.testing.assert_allclose(b.numpy()[trainable], a.numpy()[trainable], rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(bits(b.numpy()[~trainable]), bits(np.zeros_like(before[a.path])[~trainable]))


def test_auto_picks_compact_for_few_trainable_and_dense_for_many_or_changing_masks():
    model = mlp()
    registry = MaskRegistry(model)
    registry.freeze("fc1/kernel", elements={"random": 0.99, "seed": 0}, name="few")
    registry.freeze("fc2/kernel", elements={"random": 0.3, "seed": 0}, name="most_train")
    registry.freeze("fc1/bias", elements={"magnitude": 0.5}, update_every_n_steps=10, name="pruned")
    assert registry.update_modes() == {"mlp/fc1/kernel": "compact", "mlp/fc2/kernel": "dense",
                                       "mlp/fc1/bias": "dense"}
    assert registry.describe().splitlines()[2] == "| mlp/fc1/kernel | (6, 16) | 95 | 0.9896 | current | few | compact |"


def test_compact_refuses_a_rule_whose_frozen_count_changes():
    registry = MaskRegistry(mlp(), update="compact")
    with pytest.raises(FreezeConfigError) as err:
        registry.freeze("fc1/kernel", elements={"random": 0.5}, start_step=5, name="late")
    assert str(err.value) == (
        "rule 'late' changes how many elements it freezes during training (start/end bounds or "
        "update_every_n_steps), which update 'compact' does not support; use update 'auto' (dense where masks "
        "change) or 'dense'")
    assert registry.covered_paths() == []


def test_unknown_update_mode_is_refused():
    with pytest.raises(FreezeConfigError,
                       match=r"^update must be one of \['auto', 'dense', 'compact', 'sampled'\], got 'sparse'$"):
        MaskRegistry(mlp(), update="sparse")


@pytest.mark.parametrize("value", ["zero", 0.5, "current"])
def test_memory_per_covered_element_dense(value):
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(256, name="fc")], name="m")
    registry = MaskRegistry(model, update="dense")
    registry.freeze("fc/kernel", elements={"random": 0.5, "seed": 0}, value=value)
    assert registry.memory_bytes() == {"m/fc/kernel": 64 * 256}  # the 1-byte mask, no pinned copy
    assert registry.memory_bytes()["m/fc/kernel"] / (64 * 256) <= 1.2


def test_memory_per_trainable_element_compact():
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(256, name="fc")], name="m")
    registry = MaskRegistry(model, update="compact")
    registry.freeze("fc/kernel", elements={"random": 0.99, "seed": 0}, value="current")
    trainable = int(registry.trainable_mask("m/fc/kernel").sum())
    assert trainable == 64 * 256 - round(0.99 * 64 * 256)
    assert registry.memory_bytes() == {"m/fc/kernel": 8 * trainable}  # int32 index + float32 value


def test_initial_values_kept_only_for_initial_rules():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="fc")], name="m")
    registry = MaskRegistry(model, update="dense")
    registry.freeze("fc/kernel", elements={"indices": [0, 1]}, value="initial")
    registry.freeze("fc/bias", elements={"indices": [0]}, value="zero")
    assert registry.memory_bytes() == {"m/fc/kernel": 32 + 32 * 4, "m/fc/bias": 4}


def test_trainer_without_registry_builds_and_copies_nothing():
    model = mlp()
    trainer = Trainer(model, keras.optimizers.Adam(), "mse")
    assert trainer.registry.covered_paths() == [] and trainer.registry.memory_bytes() == {}
    assert trainer.registry.masks == {} and trainer.registry.compact == {}
    assert len(trainer.optimizer.variables) == 2 + 2 * len(model.trainable_variables)  # Adam's slots only


@pytest.mark.parametrize("update", ["compact", "auto"])
def test_a_compact_rule_added_after_the_optimizer_was_built_is_refused_or_updates_densely(update):
    # issue 26, item 10: a new [k] variable would be unknown to the optimizer already built on the model's variables
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="fc"), keras.layers.Dense(2, name="out")],
                             name="net")
    registry = MaskRegistry(model, update=update)
    trainer = Trainer(model, keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      registry=registry, jit_compile=False)
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    trainer.fit(x, y, batch_size=16, epochs=1, verbose=False)
    before = {v.path: v.numpy().copy() for v in model.variables}
    version = registry.structure_version
    rule = dict(select="fc/kernel", elements={"random": 0.9, "seed": 0}, value="current", name="late")
    if update == "compact":
        with pytest.raises(FreezeConfigError) as info:
            registry.freeze(**rule)
        assert str(info.value) == (
            "variable 'net/fc/kernel' would get a compact update after the optimizer was built on the model's "
            "variables; add such rules before the optimizer is attached (the Trainer's construction), or create the "
            "MaskRegistry with update='auto' (rules added later then update densely)")
        assert registry.covered_paths() == [] and registry.structure_version == version  # nothing changed
        assert all(np.array_equal(v.numpy(), before[v.path]) for v in model.variables)
    else:
        registry.freeze(**rule)
        assert registry.update_modes() == {"net/fc/kernel": "dense"}
    trainer.fit(x, y, batch_size=16, epochs=1, verbose=False)  # trains on, and the late rule (if any) holds
    assert registry.exact()
    assert not np.array_equal(model.get_layer("out").kernel.numpy(), before["net/out/kernel"])
