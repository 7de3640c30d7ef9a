"""trainer.strip of attention models: heads and FFN units removed, equal outputs, refusals by exact text."""

import keras
import numpy as np
import pytest

import trainer
from trainer import MaskRegistry
from trainer.models import transformer
from trainer.stripping import StripError, strip_for_export

L = keras.layers


def randomize(model, seed=0):
    """Every weight random, so biases (and the constants folded from them) are non-zero."""
    rng = np.random.default_rng(seed)
    for v in model.variables:
        v.assign(rng.standard_normal(v.shape).astype(np.float32) * 0.3)
    return model


def block(seed=0):
    """A post-norm transformer block: attention + residual + LayerNorm + FFN (Dense, Dropout, Dense) + residual."""
    x = keras.Input((6, 16))
    h = L.MultiHeadAttention(num_heads=4, key_dim=4, name="mha")(x, x)
    h = L.LayerNormalization(name="ln1")(L.Add(name="add1")([x, h]))
    f = L.Dense(32, activation="relu", name="ffn1")(h)
    f = L.Dense(16, name="ffn2")(L.Dropout(0.1, name="drop")(f))
    h = L.LayerNormalization(name="ln2")(L.Add(name="add2")([h, f]))
    return randomize(keras.Model(x, L.Dense(3, name="out")(L.GlobalAveragePooling1D(name="pool")(h)), name="blk"),
                     seed)


def encoder_model(normalize_first=False):
    keras_hub = pytest.importorskip("keras_hub")
    x = keras.Input((6, 32))
    h = keras_hub.layers.TransformerEncoder(64, 4, normalize_first=normalize_first, dropout=0.1, name="enc")(x)
    return randomize(keras.Model(x, L.Dense(3, name="out")(L.GlobalAveragePooling1D(name="pool")(h)), name="bert"))


def max_diff(a, b, x):
    return float(np.max(np.abs(np.asarray(a(x, training=False)) - np.asarray(b(x, training=False)))))


def data(shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def refusal(model, registry=None):
    with pytest.raises(StripError) as err:
        trainer.strip(model, registry)
    return str(err.value)


def test_heads_and_ffn_units_removed():
    model = block()
    registry = MaskRegistry(model)
    registry.freeze("mha/attention_output/kernel", elements={"magnitude": 0.5, "groups": "heads"}, value="zero")
    registry.freeze("ffn1/kernel", elements={"magnitude": 0.75, "groups": "units"}, value="zero", name="units")
    frozen_heads = (~registry.trainable_mask("mha/attention_output/kernel")).all(axis=(1, 2))
    small = trainer.strip(model, registry)
    mha = small.get_layer("mha")
    assert mha.num_heads == 2 and mha.key_dim == 4 and small.get_layer("ffn1").units == 8
    kept = np.flatnonzero(~frozen_heads)
    old = {v.path: np.asarray(v) for v in model.get_layer("mha").weights}
    new = {v.path: np.asarray(v) for v in mha.weights}
    np.testing.assert_array_equal(new["mha/query/kernel"], old["mha/query/kernel"][:, kept])
    np.testing.assert_array_equal(new["mha/value/bias"], old["mha/value/bias"][kept])
    np.testing.assert_array_equal(new["mha/attention_output/kernel"], old["mha/attention_output/kernel"][kept])
    np.testing.assert_array_equal(new["mha/attention_output/bias"], old["mha/attention_output/bias"])
    assert small.get_layer("ffn2").kernel.shape == (8, 16)
    assert max_diff(model, small, data((8, 6, 16))) <= 1e-5
    assert small.count_params() == model.count_params() - 2 * 3 * (16 * 4 + 4) - 2 * 4 * 16 - 24 * (16 + 1 + 16)


def test_value_zero_heads_fold_their_bias():
    """A head whose value kernel is frozen at zero outputs value_bias @ W_O[h] everywhere: folded, then removed."""
    model = block(seed=3)
    registry = MaskRegistry(model)
    registry.freeze("mha/value/kernel", elements={"magnitude": 0.25, "groups": "heads"}, value="zero")
    small = trainer.strip(model, registry)
    assert small.get_layer("mha").num_heads == 3
    output_bias = [np.asarray(m.get_layer("mha").weights[-1]) for m in (model, small)]
    assert not np.array_equal(*output_bias)  # the removed head's constant went into the output bias
    assert max_diff(model, small, data((8, 6, 16), 2)) <= 1e-5


@pytest.mark.parametrize("normalize_first", [False, True])
def test_keras_hub_encoder_block(normalize_first, tmp_path):
    model = encoder_model(normalize_first)
    registry = MaskRegistry(model)
    registry.freeze("*/attention_output/kernel", elements={"magnitude": 0.5, "groups": "heads"}, value="zero")
    registry.freeze("enc/feedforward_intermediate_dense/kernel", elements={"magnitude": 0.75, "groups": "units"},
                    value="zero", name="units")
    small, summary = strip_for_export(model, registry)
    assert summary["heads"] == {"enc/self_attention_layer": [2, 4]}
    assert summary["units"]["enc/feedforward_intermediate_dense"] == [16, 64]
    assert summary["params"] == small.count_params() < summary["params_before"] / 2
    assert small.get_layer("enc_self_attention").num_heads == 2
    x = data((8, 6, 32), 4)
    assert max_diff(model, small, x) <= 1e-5
    small.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")  # no custom_objects
    assert {type(op).__module__.split(".")[0] for op in loaded.operations} == {"keras"}  # no trainer, no keras_hub
    assert max_diff(model, loaded, x) <= 1e-5


def test_refuses_units_that_feed_a_residual_addition():
    model = block()
    registry = MaskRegistry(model)
    registry.freeze("ffn2/kernel", elements={"units": [1, 4]}, value="zero")
    assert refusal(model, registry) == (
        "trainer.strip: units [1, 4] of 'ffn2' are frozen at zero, but 'ffn2' feeds 'add2' (Add); a residual "
        "addition's two sides must keep the hidden size, and strip removes units only of a Dense read by exactly "
        "one Dense (through activations and Dropout): unfreeze them")
    model = encoder_model()
    registry = MaskRegistry(model)
    registry.freeze("enc/feedforward_output_dense/kernel", elements={"units": [0]}, value="zero")
    assert refusal(model, registry) == (
        "trainer.strip: units [0] of 'enc/feedforward_output_dense' are frozen at zero, but "
        "'enc/feedforward_output_dense' feeds the residual addition in 'enc'; a residual addition's two sides must "
        "keep the hidden size, and strip removes units only of a Dense read by exactly one Dense (through "
        "activations and Dropout): unfreeze them")


class Scale(L.Layer):
    """A layer from outside Keras: its model.keras would need this code."""

    def call(self, x):
        return 2.0 * x


def test_the_projects_transformer_with_keras_ops_residuals():
    """trainer.models.transformer: patches, keras.ops residuals and positions; heads and mlp1 units go."""
    model = randomize(transformer((8, 8), 3, dim=16, depth=2, heads=4, mlp_dim=32))
    registry = MaskRegistry(model)
    registry.freeze("*_attn/attention_output/kernel", elements={"magnitude": 0.5, "groups": "heads"}, value="zero")
    registry.freeze("*_mlp1/kernel", elements={"magnitude": 0.5, "groups": "units"}, value="zero", name="units")
    small = trainer.strip(model, registry)
    assert [small.get_layer(f"block{i}_attn").num_heads for i in (1, 2)] == [2, 2]
    assert [small.get_layer(f"block{i}_mlp1").units for i in (1, 2)] == [16, 16]
    assert max_diff(model, small, data((4, 8, 8), 5)) <= 1e-5


def test_refuses_unknown_layers_masks_and_every_head():
    x = keras.Input((6, 16))
    h = L.MultiHeadAttention(num_heads=2, key_dim=4, name="mha")(x, x)
    assert refusal(keras.Model(x, Scale(name="scale")(h))) == (
        "trainer.strip: layer 'scale' is of type Scale, which strip does not know: in a model with attention it "
        "copies Keras' own layers and keras.ops calls unchanged and rebuilds keras-hub's TransformerEncoder, so "
        "that the stripped model.keras needs no other code")
    model = block()
    registry = MaskRegistry(model)
    registry.freeze("mha/attention_output/kernel", value="zero")
    assert refusal(model, registry) == (
        "trainer.strip: every head of 'mha' would be removed (its output or value slices are frozen at zero): the "
        "layer would output only its bias, so there is no smaller attention layer to build")
    keras_hub = pytest.importorskip("keras_hub")
    x, mask = keras.Input((6, 32)), keras.Input((6,), dtype="bool")
    h = keras_hub.layers.TransformerEncoder(64, 4, name="enc")(x, padding_mask=mask)
    assert refusal(keras.Model([x, mask], h)) == (
        "trainer.strip: layer 'enc' (TransformerEncoder) is called with a padding_mask; strip rebuilds an encoder "
        "only without masks")


def test_refuses_attention_with_lora():
    from trainer.models import enable_lora

    model = transformer((8, 8), 3, dim=16, depth=1, heads=4, mlp_dim=32)
    enable_lora(model, rank=2)
    assert refusal(model) == ("trainer.strip: layer 'block1_attn' has LoRA enabled; merge it into the kernels before "
                              "stripping")
