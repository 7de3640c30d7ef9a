"""keras-hub decoders in configs (model=causal_lm), text data (data=text), perplexity and trainer.remat (issue 29).

Tiny decoders (one or two blocks, hidden 16) on short sequences: the file runs in seconds.
"""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing import event_accumulator as ea

from tests.conftest import CONFIGS
from trainer import MaskRegistry
from trainer.causal_lm import PresetError, causal_lm
from trainer.config import register
from trainer.models import mlp
from trainer.remat import RematError, apply_remat
from trainer.report import export_weights
from trainer.run import build, run
from trainer.text_data import load_text, windows

register()

TINY = ["data=text", "model=causal_lm", "model.backbone.num_layers=2", "model.backbone.hidden_dim=16",
        "model.backbone.intermediate_dim=32", "model.backbone.num_query_heads=2",
        "model.backbone.num_key_value_heads=1",
        "data.sequence_length=16", "data.max_bytes=12000", "trainer.batch_size=16", "trainer.eval_batch_size=128",
        "export.keras=false"]
TINY_ARGS = dict(num_layers=2, hidden_dim=16, intermediate_dim=32, num_query_heads=2, num_key_value_heads=1)
PRESET_REFUSAL = ("model.preset='llama2_7b_en' is not a local directory; presets cannot be downloaded here: pass the "
                  "path of a preset directory (saved with save_to_preset(dir), holding config.json)")


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog.\n" * 40)
    return path


@pytest.mark.parametrize("architecture,extra,first_block", [
    ("llama", [], "transformer_layer_0/self_attention/query/kernel"),
    ("gemma", ["+model.backbone.head_dim=8"], "decoder_block_0/attention/query/kernel"),
])
def test_builds_keras_hub_decoders_from_config(text_file, architecture, extra, first_block):
    keras.backend.clear_session()
    cfg = compose_cfg(TINY + [f"data.path={text_file}", f"model.architecture={architecture}", *extra])
    splits, model, _, _ = build(cfg)
    paths = [v.path for v in model.trainable_variables]
    assert paths[0] == "token_embedding/embeddings" and first_block in paths
    logits = model(splits.x_train[:2])
    assert tuple(logits.shape) == (2, 16, 256) and logits.dtype == "float32"


def test_preset_name_is_refused_before_anything_is_built():
    with pytest.raises(PresetError) as info:
        causal_lm((16,), 256, preset="llama2_7b_en")
    assert str(info.value) == PRESET_REFUSAL


def test_local_preset_directory_round_trip_and_model_keras(tmp_path, text_file):
    import keras_hub

    keras.backend.clear_session()
    keras.utils.set_random_seed(3)
    saved = keras_hub.models.LlamaBackbone(vocabulary_size=256, **TINY_ARGS)
    saved.save_to_preset(str(tmp_path / "preset"))
    cfg = compose_cfg(TINY + [f"data.path={text_file}", f"model.preset={tmp_path / 'preset'}"])
    _, model, _, _ = build(cfg)
    loaded = {v.path: v.numpy() for v in model.variables}
    assert sorted(loaded) == sorted(v.path for v in saved.variables)
    for v in saved.variables:
        np.testing.assert_array_equal(loaded[v.path], v.numpy())
    apply_remat(model)  # remat changes no weight, path or file: model.keras loads back with plain Keras
    model.save(tmp_path / "model.keras")
    again = keras.saving.load_model(tmp_path / "model.keras", compile=False)
    tokens = np.arange(1, 33, dtype=np.int32).reshape(2, 16)
    np.testing.assert_array_equal(again(tokens).numpy(), model(tokens).numpy())


def test_text_file_becomes_shifted_right_padded_sequences(text_file):
    splits = load_text(str(text_file), sequence_length=16, validation_fraction=0.1, test_fraction=0.1)
    raw = np.frombuffer(text_file.read_bytes(), np.uint8).astype(np.int32)
    x, y = windows(raw, 16, 0)
    assert len(x) == -(-(len(raw) - 1) // 16) and splits.files == 1 and splits.num_classes == 256
    np.testing.assert_array_equal(np.concatenate([splits.x_train, splits.x_val, splits.x_test]), x)
    np.testing.assert_array_equal(x[0, 1:], y[0, :-1])  # labels are the inputs shifted by one
    assert (y[-1] == 0).any() and splits.tokens == len(raw) - 1  # the last window is padded; pads are not tokens
    assert len(splits.x_val) == len(splits.x_test) == round(0.1 * len(x))


def bits(a):
    return np.asarray(a).view(np.uint32)


def test_sparse_finetune_on_stdlib_sources_lowers_loss_keeps_frozen_bits_and_reports_perplexity(tmp_path):
    overrides = TINY + ["sft.method=random", "sft.k=0.005", "optimizer.learning_rate=0.05", "trainer.epochs=2",
                        "data.max_bytes=8000", "log.summary_every_n_steps=10"]
    keras.backend.clear_session()
    _, model, _, _ = build(compose_cfg(overrides))
    export_weights(model, str(tmp_path / "init.npz"))  # the starting point the fine-tune reads back
    keras.backend.clear_session()
    report = run(compose_cfg(overrides + [f"model.init_from={tmp_path / 'init.npz'}"]), run_dir=str(tmp_path / "run"))
    history = report["history"]
    assert history[-1]["loss"] < history[0]["loss"] and history[-1]["val_loss"] < history[0]["val_loss"]
    init, final = np.load(tmp_path / "init.npz"), np.load(tmp_path / "run" / "weights.npz")
    masks = np.load(tmp_path / "run" / "masks.npz")
    kept = sum(int(masks[p].sum()) for p in masks.files)
    assert kept == round(0.005 * sum(masks[p].size for p in masks.files)) and report["frozen_exact"]
    for path in masks.files:
        frozen = ~masks[path]
        np.testing.assert_array_equal(bits(final[path])[frozen], bits(init[path])[frozen])
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["test_perplexity"] == pytest.approx(report["test_perplexity"]) and saved["test_perplexity"] > 1
    assert saved["val_perplexity"] == pytest.approx(history[-1]["val_perplexity"])
    assert np.exp(history[-1]["val_loss"]) == pytest.approx(history[-1]["val_perplexity"], rel=0.05)
    for folder in ("train", "validation"):
        acc = ea.EventAccumulator(str(tmp_path / "run" / "tb" / folder), size_guidance={ea.TENSORS: 0})
        acc.Reload()
        assert "perplexity" in acc.Tags()["tensors"], folder


def gradients(remat, update=None):
    """The loss's gradients of a tiny decoder; with ``update``, of a registry's variables (90 % of each frozen)."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(5)
    model = causal_lm((16,), 256, backbone=TINY_ARGS)
    variables = model.trainable_variables
    if update:
        registry = MaskRegistry(model, update=update)
        registry.freeze("*", elements={"random": 0.9, "seed": 0})
        variables = registry.trainable_variables()
    if remat:
        assert apply_remat(model) == ["transformer_layer_0", "transformer_layer_1"]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0)
    x = np.random.default_rng(0).integers(1, 256, (4, 16)).astype(np.int32)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            value = loss(x[:, 1:], model(x, training=True)[:, :-1])
        return tape.gradient(value, variables)

    return [tf.convert_to_tensor(g).numpy() for g in step(x)]


def test_remat_gives_the_same_gradients_and_refuses_a_model_without_blocks():
    for plain, recomputed in zip(gradients(False), gradients(True)):
        np.testing.assert_allclose(recomputed, plain, rtol=1e-6, atol=1e-9)
    sampled, sampled_remat = gradients(False, "sampled"), gradients(True, "sampled")
    assert len(sampled) == len(sampled_remat) > 0 and all(g.ndim == 1 for g in sampled)  # compact [k]
    for plain, recomputed in zip(sampled, sampled_remat):
        np.testing.assert_allclose(recomputed, plain, rtol=1e-6, atol=1e-9)
    with pytest.raises(RematError) as info:
        apply_remat(mlp((8,), 3))
    assert str(info.value) == ("trainer.remat=true: model 'lenet' has no transformer blocks to recompute (no keras-hub "
                               "backbone transformer_layers found); use model=causal_lm with at least one layer, or "
                               "set trainer.remat=false")
