"""The registry and the Trainer on Sequential, Functional and subclassed models, with Dense, Conv2D,
Embedding and BatchNormalization layers, nested models included.

Every test trains a few steps and checks frozen elements by exact equality,
and that the elements left trainable did move. The layer tests train without
XLA (compiling costs more than their six steps); the embedding and transformer
tests keep the Trainer's default XLA step, so gathered rows, attention and
compact updates are checked compiled as well.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import MaskRegistry, Trainer
from trainer.masks import FreezeConfigError
from trainer.models import cnn, embedding_classifier


def sequential():
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh", name="fc1"),
                             keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(4, name="out")],
                            name="seq")


def functional():
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8, activation="tanh", name="fc1")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="out")(x), name="fun")


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.fc1 = keras.layers.Dense(8, activation="tanh", name="fc1")
        self.bn = keras.layers.BatchNormalization(name="bn")
        self.head = keras.layers.Dense(4, name="out")

    def call(self, x, training=False):
        return self.head(self.bn(self.fc1(x), training=training))


def subclassed():
    model = Subclassed(name="sub")
    model(np.zeros((1, 6), np.float32))
    return model


def train(model, registry, x, y, steps=6, optimizer=None, batch=8, jit_compile=False):
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
    trainer = Trainer(model, optimizer or keras.optimizers.AdamW(0.02, weight_decay=0.1),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True), registry=registry,
                      jit_compile=jit_compile)
    trainer.fit(ds, epochs=100, max_steps=steps)
    assert trainer.step == steps
    return trainer


def data(seed=0, n=32, shape=(6,), classes=4):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *shape)).astype(np.float32), rng.integers(0, classes, size=n).astype(np.int32)


def values(model):
    return {v.path: v.numpy().copy() for v in model.variables}


def by_suffix(model, suffix):
    (variable,) = [v for v in model.variables if v.path.endswith(suffix)]
    return variable


@pytest.mark.parametrize("build", [sequential, functional, subclassed], ids=["sequential", "functional", "subclassed"])
def test_same_rules_on_sequential_functional_and_subclassed_models(build):
    keras.utils.set_random_seed(0)
    model = build()
    prefix = {"seq": "seq/", "fun": "", "sub": "sub/"}[model.name]
    registry = MaskRegistry(model)
    registry.freeze("fc1/kernel", elements={"indices": [0, 7, 20]}, value="zero", name="zeros")
    registry.freeze("out/bias", name="head_bias")
    registry.freeze(layer_type="BatchNormalization", non_trainable="skip", name="bn")
    assert registry.covered_paths() == [prefix + p for p in ("fc1/kernel", "out/bias", "bn/gamma", "bn/beta")]
    before = values(model)
    train(model, registry, *data())
    after = values(model)
    kernel = after[prefix + "fc1/kernel"].ravel()
    np.testing.assert_array_equal(kernel[[0, 7, 20]].view(np.uint32), np.zeros(3, np.uint32))
    assert np.all(np.delete(kernel, [0, 7, 20]) != np.delete(before[prefix + "fc1/kernel"].ravel(), [0, 7, 20]))
    for path in ("out/bias", "bn/gamma", "bn/beta"):
        np.testing.assert_array_equal(after[prefix + path], before[prefix + path])
    for path in ("fc1/bias", "out/kernel", "bn/moving_mean", "bn/moving_variance"):
        assert np.all(after[prefix + path] != before[prefix + path]), path
    assert registry.exact()
    assert set(registry.drift().values()) == {0.0}


def test_conv2d_layers_frozen_by_type_only_the_head_trains():
    keras.utils.set_random_seed(1)
    model = cnn((8, 8, 1), 10, filters=(4, 6), dense=(16,), batch_norm=True)
    registry = MaskRegistry(model)
    registry.freeze(layer_type="Conv2D", value="current", name="conv")
    conv = ["conv1/kernel", "conv1/bias", "conv2/kernel", "conv2/bias"]
    assert registry.covered_paths() == conv
    # Statically frozen whole variables leave the compiled step altogether.
    assert [v.path for v in registry.trainable_variables()] == [
        "bn1/gamma", "bn1/beta", "bn2/gamma", "bn2/beta", "fc1/kernel", "fc1/bias", "out/kernel", "out/bias"]
    before = values(model)
    train(model, registry, *data(shape=(8, 8, 1), classes=10), optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    after = values(model)
    for path in conv:
        np.testing.assert_array_equal(after[path], before[path])
    for path in ("fc1/kernel", "out/kernel", "out/bias", "bn1/gamma", "bn2/beta"):
        assert np.any(after[path] != before[path]), path  # ReLU: some units get no gradient
    planned = {r["path"]: r["frozen_elements"] for r in registry.plan() if r["frozen_elements"]}
    assert planned == {"conv1/kernel": 4 * 25, "conv1/bias": 4, "conv2/kernel": 4 * 6 * 25, "conv2/bias": 6}


def test_conv_kernel_input_channels_and_filters():
    keras.utils.set_random_seed(2)
    model = cnn((8, 8, 1), 10, filters=(4, 6), dense=(16,), batch_norm=False)
    registry = MaskRegistry(model)
    registry.freeze("conv2/kernel", elements={"inputs": [1, 3]}, value="zero", name="channels")
    registry.freeze("conv2/kernel", elements={"units": [5]}, value="zero", name="filter")
    before = model.get_layer("conv2").kernel.numpy().copy()  # (5, 5, 4, 6)
    train(model, registry, *data(shape=(8, 8, 1), classes=10))
    kernel = model.get_layer("conv2").kernel.numpy()
    frozen = np.zeros((5, 5, 4, 6), bool)
    frozen[:, :, [1, 3], :] = True
    frozen[..., 5] = True
    np.testing.assert_array_equal(~registry.trainable_mask("conv2/kernel"), frozen)
    assert not kernel[frozen].any()
    assert np.all(kernel[~frozen] != before[~frozen])


def test_embedding_rows_frozen_in_a_functional_model():
    keras.utils.set_random_seed(3)
    model = embedding_classifier((10,), 5, vocab_size=12, embedding_dim=4, hidden=8)
    registry = MaskRegistry(model)
    registry.freeze("tokens/embeddings", elements={"rows": [0, 1, 2, 3, 4, 5]}, name="pretrained")
    table = model.get_layer("tokens").embeddings
    before = table.numpy().copy()
    rng = np.random.default_rng(3)
    x = rng.integers(0, 12, size=(32, 10)).astype(np.int32)
    y = rng.integers(0, 5, size=32).astype(np.int32)
    variables = registry.trainable_variables()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x))
    assert isinstance(tape.gradient(loss, variables)[0], tf.IndexedSlices)  # the sparse gradient path
    train(model, registry, x, y, optimizer=keras.optimizers.Adam(0.05), jit_compile=True)
    np.testing.assert_array_equal(table.numpy()[:6], before[:6])
    assert np.all(table.numpy()[6:] != before[6:])
    assert registry.exact()


# ------------------------------------------------------------ BatchNormalization
def bn_net():
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="fc"),
                             keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(4, name="out")],
                            name="net")


BN_STATS = ["net/bn/moving_mean", "net/bn/moving_variance"]


def test_batchnorm_moving_statistics_are_refused_by_default():
    with pytest.raises(FreezeConfigError) as info:
        MaskRegistry(bn_net()).freeze(layer_type="BatchNormalization", name="bn")
    message = str(info.value)
    assert f"rule 'bn' selects non-trainable variables {BN_STATS}" in message
    assert "non_trainable: skip (leave them out) or non_trainable: pin (hold them at the pinned value)" in message


@pytest.mark.parametrize("policy", ["skip", "pin"])
def test_batchnorm_moving_statistics_skip_or_pin(policy):
    keras.utils.set_random_seed(4)
    model = bn_net()
    registry = MaskRegistry(model)
    registry.freeze(layer_type="BatchNormalization", non_trainable=policy, name="bn")
    frozen = ["net/bn/gamma", "net/bn/beta"] + (BN_STATS if policy == "pin" else [])
    assert registry.covered_paths() == frozen
    planned = {r["path"]: r["frozen_elements"] for r in registry.plan()}
    assert planned == {"net/fc/kernel": 0, "net/fc/bias": 0, "net/bn/gamma": 8, "net/bn/beta": 8,
                       "net/out/kernel": 0, "net/out/bias": 0, **({p: 8 for p in BN_STATS} if policy == "pin" else {})}
    before = values(model)
    train(model, registry, *data(seed=4))
    after = values(model)
    for path in frozen:
        np.testing.assert_array_equal(after[path], before[path])
    for path in BN_STATS if policy == "skip" else []:
        assert np.all(after[path] != before[path])  # the forward pass in training mode updated them
    assert registry.exact()


# ------------------------------------------------------------ nested models
def nested_functional():
    backbone = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu", name="d1"),
                                 keras.layers.BatchNormalization(name="bn"),
                                 keras.layers.Dense(5, activation="relu", name="d2")], name="backbone")
    inputs = keras.Input((6,))
    return keras.Model(inputs, keras.layers.Dense(4, name="head")(backbone(inputs)), name="outer")


class Backbone(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.d1 = keras.layers.Dense(8, activation="relu", name="d1")
        self.bn = keras.layers.BatchNormalization(name="bn")

    def call(self, x, training=False):
        return self.bn(self.d1(x), training=training)


class WithBackbone(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.backbone = Backbone(name="backbone")
        self.head = keras.layers.Dense(4, name="head")

    def call(self, x, training=False):
        return self.head(self.backbone(x, training=training))


def nested_subclassed():
    model = WithBackbone(name="outer")
    model(np.zeros((1, 6), np.float32))
    return model


@pytest.mark.parametrize("build, rule, covered, trains", [
    (nested_functional, {"layer_type": "Dense"},
     ["backbone/d1/kernel", "backbone/d1/bias", "backbone/d2/kernel", "backbone/d2/bias", "head/kernel", "head/bias"],
     ["backbone/bn/gamma", "backbone/bn/beta"]),
    (nested_functional, {"layer_type": "BatchNormalization", "non_trainable": "pin"},
     ["backbone/bn/gamma", "backbone/bn/beta", "backbone/bn/moving_mean", "backbone/bn/moving_variance"],
     ["backbone/d1/kernel", "backbone/d2/kernel", "head/kernel", "head/bias"]),
    (nested_functional, {"layer_type": "Dense", "select": "backbone/*"},
     ["backbone/d1/kernel", "backbone/d1/bias", "backbone/d2/kernel", "backbone/d2/bias"],
     ["head/kernel", "head/bias", "backbone/bn/gamma"]),
    (nested_subclassed, {"layer_type": "Backbone", "non_trainable": "skip"},  # a nested model by its class
     ["outer/backbone/d1/kernel", "outer/backbone/d1/bias", "outer/backbone/bn/gamma", "outer/backbone/bn/beta"],
     ["outer/head/kernel", "outer/head/bias", "outer/backbone/bn/moving_mean"]),
    (nested_subclassed, {"layer_type": "Dense", "exclude": "head/*"},
     ["outer/backbone/d1/kernel", "outer/backbone/d1/bias"],
     ["outer/head/kernel", "outer/backbone/bn/gamma", "outer/backbone/bn/beta"]),
], ids=["functional_dense", "functional_bn_pin", "functional_dense_in_backbone", "subclassed_backbone_type",
        "subclassed_dense_exclude_head"])
def test_layer_type_finds_layers_inside_nested_models(build, rule, covered, trains):
    keras.utils.set_random_seed(5)
    model = build()
    registry = MaskRegistry(model)
    registry.freeze(name="r", value="current", **rule)
    assert registry.covered_paths() == covered
    before = values(model)
    train(model, registry, *data(seed=5), optimizer=keras.optimizers.Adam(0.02))
    after = values(model)
    for path in covered:
        np.testing.assert_array_equal(after[path], before[path])
    for path in trains:
        assert np.any(after[path] != before[path]), path
    assert registry.exact()


@pytest.mark.parametrize("update", ["dense", "compact"])
def test_transformer_patches_every_kernel_frozen_exactly_attention_included(update, tmp_path):
    from trainer.models import transformer

    keras.utils.set_random_seed(0)
    model = transformer((8, 8), 4, patch_size=4, dim=16, depth=1, heads=2, mlp_dim=32)
    registry = MaskRegistry(model, update=update)
    registry.freeze("*/kernel", elements={"random": 0.9, "seed": 0}, value="current")
    attention = [f"block1_attn/{p}/kernel" for p in ("query", "key", "value", "attention_output")]
    assert set(attention) <= set(registry.covered_paths())
    assert set(registry.update_modes().values()) == {update}
    masks = {p: registry.trainable_mask(p) for p in registry.covered_paths()}
    before = values(model)
    x, y = data(seed=1, n=32, shape=(8, 8))
    train(model, registry, x, y, steps=6, jit_compile=True)
    after = values(model)
    for path, trainable in masks.items():
        np.testing.assert_array_equal(after[path][~trainable].view(np.uint32), before[path][~trainable].view(np.uint32))
        assert np.any(after[path][trainable] != before[path][trainable]), path
    assert registry.exact()
    model.save(tmp_path / "t.keras")  # a plain Keras model: loads without this package
    reloaded = keras.models.load_model(tmp_path / "t.keras")
    np.testing.assert_array_equal(reloaded(x[:2]), model(x[:2]))


def test_transformer_tokens_embedding_rows_frozen():
    from trainer.models import transformer

    keras.utils.set_random_seed(0)
    model = transformer((6,), 3, vocab_size=12, dim=8, depth=1, heads=2, mlp_dim=16)
    registry = MaskRegistry(model)
    registry.freeze("tokens/embeddings", elements={"rows": [0, 1, 2, 3]}, value="current")
    before = values(model)["tokens/embeddings"]
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 12, size=(32, 6)).astype(np.int32), rng.integers(0, 3, size=32).astype(np.int32)
    train(model, registry, x, y, steps=5, jit_compile=True)
    after = values(model)["tokens/embeddings"]
    np.testing.assert_array_equal(after[:4].view(np.uint32), before[:4].view(np.uint32))
    assert np.all(after[4:] != before[4:])


def test_transformer_refuses_patches_that_do_not_tile():
    from trainer.models import transformer

    with pytest.raises(ValueError, match=r"^image sides \(8, 8\) must be multiples of patch_size \(3\)$"):
        transformer((8, 8), 4, patch_size=3)
