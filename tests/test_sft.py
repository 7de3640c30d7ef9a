"""Sparse fine-tuning selectors (trainer/sft.py) against NumPy oracles, LT-SFT's driver, and LoRA through run()."""

import json
import os
import subprocess
import sys
import zlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from hydra import compose, initialize_config_dir

from tests.conftest import CONFIGS, REPO
from trainer.config import ConfigError, register
from trainer.data import make_dataset
from trainer.masks import MaskRegistry
from trainer.models import mlp
from trainer.run import build, run
from trainer.sft import apply_sft, kept_masks

sys.path.insert(0, os.path.join(REPO, "scripts"))
import lt_sft  # noqa: E402

register()

TINY_TRANSFORMER = ["model=transformer", "model.dim=16", "model.heads=2", "model.mlp_dim=32", "model.depth=1",
                    "log.progress=lines"]


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def small_problem(seed=0):
    keras.utils.set_random_seed(seed)
    model = mlp((6,), 3, hidden=(5,))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=40).astype(np.int32)
    return model, x, y


def numpy_gradients(model, x, y):
    """Hand backprop of LeNet-style relu MLP + mean softmax cross-entropy, float64."""
    w = {"/".join(v.path.split("/")[-2:]): v.numpy().astype(np.float64) for v in model.variables}
    h_pre = x @ w["fc1/kernel"] + w["fc1/bias"]
    h = np.maximum(h_pre, 0)
    logits = h @ w["out/kernel"] + w["out/bias"]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d = (p - np.eye(3)[y]) / len(y)
    dh = (d @ w["out/kernel"].T) * (h_pre > 0)
    grads = {"out/kernel": h.T @ d, "out/bias": d.sum(0), "fc1/kernel": x.T @ dh, "fc1/bias": dh.sum(0)}
    return {v.path: grads["/".join(v.path.split("/")[-2:])] for v in model.trainable_variables}


def topk_oracle(scores, count):
    order = sorted(scores)
    flat = np.concatenate([scores[p].reshape(-1) for p in order])
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[:count]] = True
    out, start = {}, 0
    for p in order:
        out[p] = keep[start:start + scores[p].size].reshape(scores[p].shape)
        start += scores[p].size
    return out


def batches(x, y, batch_size, seed, n):
    keras.utils.set_random_seed(seed)  # the global seed that build() sets, so the same data order
    return [(bx.numpy(), by.numpy()) for bx, by in make_dataset(x, y, batch_size, shuffle=True, seed=seed).take(n)]


@pytest.mark.parametrize("k", [7, 0.2])
def test_fish_keeps_exactly_the_top_k_of_accumulated_squared_gradients(k):
    model, x, y = small_problem()
    registry = MaskRegistry(model)
    data = batches(x, y, 8, 3, 4)
    tape_grads, numpy_fisher = [], {}
    for bx, by in data:
        with tf.GradientTape() as tape:
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(by, model(bx))
        grads = tape.gradient(loss, model.trainable_variables)
        tape_grads.append({v.path: g.numpy().astype(np.float64) for v, g in zip(model.trainable_variables, grads)})
        for p, g in numpy_gradients(model, bx, by).items():
            numpy_fisher[p] = numpy_fisher.get(p, 0) + g ** 2 / len(data)
    fisher = {p: sum(g[p] ** 2 for g in tape_grads) / len(data) for p in tape_grads[0]}
    for p in fisher:  # the gradients themselves agree with hand backprop
        np.testing.assert_allclose(fisher[p], numpy_fisher[p], rtol=1e-4, atol=1e-12)
    before = {v.path: v.numpy().copy() for v in model.variables}
    kept = apply_sft({"method": "fish", "k": k, "batches": 4, "batch_size": 8}, model=model, registry=registry,
                     x=x, y=y, batch_size=60, seed=3)
    total = sum(a.size for a in fisher.values())
    count = k if isinstance(k, int) else int(round(k * total))
    assert kept == count
    expected = topk_oracle(fisher, count)
    for path, mask in expected.items():
        np.testing.assert_array_equal(registry.trainable_mask(path), mask)
    for v in model.variables:  # selecting changes no weight
        assert v.numpy().tobytes() == before[v.path].tobytes()


def test_snip_layerwise_magnitude_and_random_match_numpy():
    model, x, y = small_problem()
    w = {v.path: v.numpy().astype(np.float64) for v in model.trainable_variables}
    (bx, by), = batches(x, y, 40, 0, 1)
    grads = numpy_gradients(model, bx, by)
    snip = kept_masks({p: np.abs(grads[p] * w[p]) for p in w}, 0.4, "layerwise")
    registry = MaskRegistry(model)
    apply_sft({"method": "snip", "k": 0.4, "batches": 1, "batch_size": 40, "ranking": "layerwise"},
              model=model, registry=registry, x=x, y=y, seed=0)
    for p in w:
        oracle = np.zeros(w[p].size, bool)
        oracle[np.argsort(-np.abs(grads[p] * w[p]).reshape(-1), kind="stable")[:round(0.4 * w[p].size)]] = True
        np.testing.assert_array_equal(snip[p], oracle.reshape(w[p].shape))  # kept_masks' layerwise ranking
        np.testing.assert_array_equal(registry.trainable_mask(p), oracle.reshape(w[p].shape))
    for method, scores in (("magnitude", {p: np.abs(a) for p, a in w.items()}),
                           ("random", {p: np.random.default_rng([5, zlib.crc32(p.encode())]).random(a.shape)
                                       for p, a in w.items()})):
        registry = MaskRegistry(model)
        apply_sft({"method": method, "k": 11, "seed": 5}, model=model, registry=registry)
        for path, mask in topk_oracle(scores, 11).items():
            np.testing.assert_array_equal(registry.trainable_mask(path), mask)


@pytest.mark.parametrize("override,message", [
    ("sft.method=fisher", "sft.method must be one of ['fish', 'snip', 'random', 'magnitude', 'delta'] or null, "
                          "got 'fisher'"),
    ("sft.k=1.5", "sft.k must be a fraction in (0, 1) or a positive integer count, got 1.5"),
    ("sft.k=0", "sft.k must be a fraction in (0, 1) or a positive integer count, got 0"),
    ("sft.ranking=local", "sft.ranking must be one of ['global', 'layerwise'], got 'local'"),
    ("sft.batches=0", "sft.batches must be a positive integer, got 0"),
    ("model.lora_rank=0", "model.lora_rank must be a positive integer or null, got 0"),
])
def test_bad_values_are_one_line_before_anything_is_written(override, message, tmp_path):
    method = [] if override.startswith(("sft.method", "model")) else ["sft.method=fish"]
    cfg = compose_cfg([*method, override])
    with pytest.raises(ConfigError) as err:
        run(cfg, run_dir=str(tmp_path / "run"))
    assert str(err.value) == message
    assert not (tmp_path / "run").exists()


def test_sft_select_matching_nothing_is_refused():
    cfg = compose_cfg(["sft.method=magnitude", "sft.select=[nothing/*]"])
    with pytest.raises(ValueError, match=r"^sft.select 'nothing/\*' matches no trainable variable"):
        build(cfg)


def test_fish_run_on_a_transformer_keeps_every_other_element_bit_exact(tmp_path):
    overrides = [*TINY_TRANSFORMER, "sft.method=fish", "sft.k=0.02", "sft.batches=2", "sft.exclude=[out/*]",
                 "trainer.max_steps=6"]
    _, model, _, _ = build(compose_cfg(overrides))
    w0 = {v.path: v.numpy().copy() for v in model.variables}
    result = run(compose_cfg(overrides), run_dir=str(tmp_path))
    assert result["frozen_exact"]
    masks, weights = np.load(tmp_path / "masks.npz"), np.load(tmp_path / "weights.npz")
    selected = [p for p in masks.files if not p.startswith("out/")]
    assert "block1_attn/query/kernel" in selected and "pos/embeddings" in selected  # EinsumDense, Embedding
    kept = sum(int(masks[p].sum()) for p in selected)
    assert kept == round(0.02 * sum(masks[p].size for p in selected))
    assert result["trainable_elements"] == kept + masks["out/kernel"].size + masks["out/bias"].size
    changed = 0
    for p in selected:
        frozen = ~masks[p]
        assert weights[p][frozen].tobytes() == w0[p][frozen].tobytes()
        changed += int((weights[p][masks[p]] != w0[p][masks[p]]).sum())
    assert changed > 0


def test_lt_sft_resets_to_w0_bit_exactly_and_trains_only_the_top_k_delta(tmp_path):
    overrides = ["model.hidden=[16]", "trainer.max_steps=5", "sft.exclude=[out/*]", "log.progress=lines"]
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        reports = lt_sft.lt_sft(overrides, str(tmp_path), k=40, dense_steps=8)
    w0, dense = np.load(tmp_path / "w0.npz"), np.load(tmp_path / "dense" / "weights.npz")
    sparse, masks = np.load(tmp_path / "sparse" / "weights.npz"), np.load(tmp_path / "sparse" / "masks.npz")
    assert reports["dense"]["steps"] == 8 and reports["sparse"]["steps"] == 5  # a new optimizer: from step 0
    selected = ["lenet/fc1/kernel", "lenet/fc1/bias"]
    delta = {p: np.abs(dense[p].astype(np.float64) - w0[p].astype(np.float64)) for p in selected}
    expected = topk_oracle(delta, 40)
    for p in selected:
        np.testing.assert_array_equal(masks[p], expected[p])
        assert sparse[p][~masks[p]].tobytes() == w0[p][~masks[p]].tobytes()
    assert sum(int(masks[p].sum()) for p in selected) == 40
    with open(tmp_path / "sparse" / "report.json") as f:
        assert json.load(f)["frozen_exact"]
    cfg = compose_cfg([*overrides, f"model.init_from={tmp_path / 'w0.npz'}", "model.init_exclude=[]"])
    _, restarted, optimizer, _ = build(cfg)  # what the sparse phase started from: w0 itself, step 0
    assert all(v.numpy().tobytes() == w0[v.path].tobytes() for v in restarted.variables)
    assert int(optimizer.iterations.numpy()) == 0


def test_lora_trains_adapters_only_and_exports_a_plain_keras_model(tmp_path):
    overrides = [*TINY_TRANSFORMER, "model.lora_rank=2", "trainer.max_steps=4",
                 "+freeze.rules.backbone.select=[patch_proj/*,pos/*,block*,ln/*]",
                 "+freeze.rules.backbone.exclude=[*lora_kernel*]", "+freeze.rules.backbone.non_trainable=skip"]
    _, model, _, _ = build(compose_cfg(overrides))
    w0 = {v.path: v.numpy().copy() for v in model.variables}
    result = run(compose_cfg(overrides), run_dir=str(tmp_path))
    lora = [v for v in model.trainable_variables if "lora_kernel" in v.path]
    assert len(lora) == 2 * 6  # query, key, value, output, mlp1, mlp2
    assert result["trainable_elements"] == sum(int(np.prod(v.shape)) for v in lora) + 16 * 10 + 10
    weights = np.load(tmp_path / "weights.npz")
    for path, before in w0.items():
        if "lora_kernel" not in path and not path.startswith("out/"):
            assert weights[path].tobytes() == before.tobytes(), path
    assert np.any(weights["block1_mlp1/lora_kernel_b"] != 0)
    probe = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "probe.npy", probe)
    code = ("import sys, numpy as np, keras; m = keras.saving.load_model(sys.argv[1]); "
            "assert 'trainer' not in sys.modules; assert m.get_layer('block1_mlp1').lora_rank == 2; "
            "np.save(sys.argv[3], np.asarray(m(np.load(sys.argv[2]))))")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "model.keras"), str(tmp_path / "probe.npy"),
                    str(tmp_path / "out.npy")], check=True, cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": ""})
    for v in model.variables:
        v.assign(weights[v.path])
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), np.asarray(model(probe)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("experiment", ["transformer_task_a", "transformer_sft", "transformer_lora",
                                        "transformer_full"])
def test_transformer_experiments_compose(experiment):
    cfg = compose_cfg([f"+experiment={experiment}"])
    assert cfg.model.name == "transformer" and cfg.name == experiment


def test_study_stored_size_counts_values_and_indices_of_kept_elements(tmp_path):
    import sft_study

    kernel, lora = np.ones((4, 3), np.float32), np.ones((4, 2), np.float32)
    np.savez(tmp_path / "weights.npz", **{"fc/kernel": kernel, "fc/lora_kernel_a": lora, "out/kernel": kernel})
    mask = np.zeros((4, 3), bool)
    mask[0, :2] = True
    np.savez(tmp_path / "masks.npz", **{"fc/kernel": mask, "fc/lora_kernel_a": np.ones((4, 2), bool),
                                        "out/kernel": np.ones((4, 3), bool)})
    head = 12 * 4
    assert sft_study.stored_bytes(str(tmp_path), "fish") == 2 * (4 + 4) + 8 * (4 + 4) + head
    assert sft_study.stored_bytes(str(tmp_path), "lora") == 8 * 4 + head
    assert sft_study.stored_bytes(str(tmp_path), "full") == 12 * 4 + 8 * 4 + head


def test_sft_and_lora_keys_are_part_of_the_resume_fingerprint():
    from trainer.run import run_fingerprint

    fingerprint = run_fingerprint(compose_cfg([*TINY_TRANSFORMER, "sft.method=fish", "sft.k=0.01",
                                               "model.lora_rank=2"]))
    assert fingerprint["sft.method"] == "fish" and fingerprint["sft.k"] == 0.01
    assert fingerprint["model.lora_rank"] == 2


@pytest.mark.slow
def test_study_runs_each_run_in_a_subprocess_and_keeps_its_peak_rss(tmp_path):
    import sft_study

    spec = {"kind": "phase", "overrides": ["model.hidden=[16]", "trainer.max_steps=3", "log.progress=lines"],
            "run_dir": str(tmp_path / "run")}
    measured = sft_study.run_measured(spec)
    assert measured["peak_rss_mib"] > 50  # the child's own ru_maxrss (TensorFlow alone is more)
    with open(tmp_path / "run" / "report.json") as f:
        assert json.load(f)["steps"] == 3
    assert sft_study.run_measured(spec) == measured  # done: not run again, the kept peak is returned


def test_study_lora_rank_table_and_plot_summarize_over_seeds(tmp_path):
    import sft_study

    assert sft_study.lora_rank(0.001, {"backbone": 71296, "lora_per_rank": 2656}) == 1  # at least 1
    assert sft_study.lora_rank(0.1, {"backbone": 71296, "lora_per_rank": 2656}) == 3  # 7,130 / 2,656 = 2.68
    rows = []
    for seed, acc in ((0, 0.5), (1, 0.7)):
        for key, method, budgets in (("fish_0.005", "fish", [0.005]), ("lora_r1", "lora", [0.005, 0.05])):
            rows.append({"seed": seed, "method": method, "budget": budgets[0], "budgets": budgets, "key": key,
                         "rank": 1 if method == "lora" else None, "trainable": 10, "trainable_percent": 0.5,
                         "task_b_accuracy": acc, "task_a_accuracy_after_b": 0.9, "wall_seconds": 10.0,
                         "ms_per_step": None, "peak_rss_mib": 1000.0 + seed, "stored_kib": 4.0,
                         "frozen_exact": True})
    summary = {e["key"]: e for e in sft_study.summarize(rows)}
    assert summary["fish_0.005"]["seeds"] == [0, 1]
    assert summary["fish_0.005"]["task_b_accuracy"] == pytest.approx(0.6)
    assert summary["fish_0.005"]["task_b_accuracy_std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert summary["fish_0.005"]["ms_per_step"] is None
    text = sft_study.table(rows)
    assert "| fish | 0.5 % |" in text and "| lora | 0.5 % / 5 % (rank 1) |" in text
    assert "60.00 ± 14.14" in text and "1000 ± 1" in text
    sft_study.plot(rows, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_bench_scale_table_has_the_trainable_count():
    import bench_scale

    assert {"transformer_lora", "transformer_dense", "transformer_995_backbone_auto"} <= set(bench_scale.CASES)
    case = {"update_modes": ["compact"], "trainable": 444682, "ms_per_step": 1.0, "peak_growth_mib": 2.0,
            "setup_s": None, "steps_equal_asked": True, "frozen_exact": True}
    assert "| transformer_lora | compact | 444,682 |" in bench_scale.format_table({"cases": {"transformer_lora": case}})


@pytest.mark.parametrize("vocab, layers", [(None, None), (50, ["tokens", "pos", "block1_attn/query", "block1_mlp1"])])
def test_lora_elements_per_rank_is_the_adapter_count_that_enable_lora_adds(vocab, layers):
    from trainer.models import enable_lora, lora_elements_per_rank, nearest_lora_rank, transformer

    keras.utils.set_random_seed(0)
    model = transformer((8,) if vocab else (8, 8), 10, vocab_size=vocab, dim=16, depth=1, heads=2, mlp_dim=32)
    per_rank = lora_elements_per_rank(model, layers)
    enable_lora(model, rank=3, layers=layers)
    adapters = sum(int(np.prod(v.shape)) for v in model.trainable_variables if "lora_" in v.path)
    assert adapters == 3 * per_rank
    assert nearest_lora_rank(2.4 * per_rank, per_rank) == 2 and nearest_lora_rank(1, per_rank) == 1
