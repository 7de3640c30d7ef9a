"""tf.distribute and mixed precision: frozen elements stay bit-exact, results match one device."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO
from tests.inprocess import run_trainer

COMMON = ["freeze=random_90", "optimizer=sgd", "trainer.epochs=3", "export.keras=false", "trainer.batch_size=64"]


def run_cli(run_dir, *args, extra_env=None):
    """A run in a process of its own: two logical CPU devices can only be made before TensorFlow starts."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(extra_env or {}))
    proc = subprocess.run([sys.executable, "-m", "trainer", f"hydra.run.dir={run_dir}", *COMMON, *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "report.json").read_text())


def run_here(run_dir, *args):
    """A run on this process's one device, in this process (tests/inprocess.py): no process start."""
    proc = run_trainer([f"hydra.run.dir={run_dir}", *COMMON, *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "report.json").read_text())


@pytest.mark.slow
def test_mirrored_over_two_cpu_devices_matches_one_device(tmp_path):
    """Compact updates under MirroredStrategy over 2 logical CPUs against dense updates on one device (at 10 %
    trainable ``auto`` would pick compact anyway: both modes are named here)."""
    single = run_here(tmp_path / "single", "freeze.update=dense")
    mirrored = run_cli(tmp_path / "mirrored", "freeze.update=compact", "distribute.strategy=mirrored",
                       "distribute.logical_cpu_devices=2")
    assert mirrored["steps"] == single["steps"] == 3 * 20  # 1,257 images / global batch 64
    assert single["frozen_exact"] and mirrored["frozen_exact"]
    assert [v["drift"] for v in mirrored["variables"]] == [0.0] * len(mirrored["variables"])
    losses_single = [h["loss"] for h in single["history"]]
    losses_mirrored = [h["loss"] for h in mirrored["history"]]
    np.testing.assert_allclose(losses_mirrored, losses_single, rtol=1e-4)
    a, b = np.load(tmp_path / "single" / "weights.npz"), np.load(tmp_path / "mirrored" / "weights.npz")
    masks = np.load(tmp_path / "mirrored" / "masks.npz")
    for key in a.files:
        np.testing.assert_allclose(b[key], a[key], atol=1e-5)
        if key in masks.files:
            np.testing.assert_array_equal(b[key][~masks[key]].view(np.uint32), 0)  # +0.0 on the replicas' copy
        if key.endswith("/kernel"):
            assert masks[key].mean() == pytest.approx(0.1, abs=0.01)


@pytest.mark.slow
def test_two_process_multi_worker_ends_identical(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join("scripts", "multiworker_check.py"), "--run-dir",
                           str(tmp_path / "mw")], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["identical_weights"] and result["frozen_exact"] and result["steps"] == [10, 10]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_float32_variables_and_exact_frozen_elements(tmp_path, policy):
    report = run_here(tmp_path, f"trainer.mixed_precision={policy}", "trainer.epochs=1")  # the policy is put back
    assert report["frozen_exact"] is True
    assert report["steps"] == 20 and report["test_accuracy"] > 0.2  # one epoch of SGD: well above chance (0.1)
    weights = np.load(tmp_path / "weights.npz")
    assert {str(weights[k].dtype) for k in weights.files if "kernel" in k or "bias" in k} == {"float32"}


@pytest.mark.slow
def test_mirrored_with_xla_and_a_partial_batch_inside_an_execution_matches_one_device(tmp_path):
    # 1,257 digits at batch 60: 20 full batches and one of 57 (29 + 28 examples on the two replicas), all
    # inside executions of 8 steps; XLA compiles each replica's step on its own device.
    settings = ["trainer.epochs=1", "trainer.batch_size=60", "trainer.steps_per_execution=8",
                "trainer.jit_compile=true"]
    single = run_here(tmp_path / "single", *settings)
    mirrored = run_cli(tmp_path / "mirrored", *settings, "distribute.strategy=mirrored",
                       "distribute.logical_cpu_devices=2")
    assert mirrored["status"] == single["status"] == "completed"
    assert mirrored["steps"] == single["steps"] == 21
    assert mirrored["frozen_exact"] is True
    np.testing.assert_allclose(mirrored["history"][0]["loss"], single["history"][0]["loss"], rtol=1e-4)
    np.testing.assert_allclose(mirrored["history"][0]["accuracy"], single["history"][0]["accuracy"], atol=1e-6)
    a, b = np.load(tmp_path / "single" / "weights.npz"), np.load(tmp_path / "mirrored" / "weights.npz")
    masks = np.load(tmp_path / "mirrored" / "masks.npz")
    for key in a.files:
        np.testing.assert_allclose(b[key], a[key], atol=1e-5)
        if key in masks.files:
            assert np.all(b[key][~masks[key]].view(np.uint32) == 0)  # +0.0 exactly on the replicas' copy


@pytest.mark.slow
def test_a_failed_run_writes_no_model_and_prints_no_test_accuracy(tmp_path):
    proc = run_trainer([f"hydra.run.dir={tmp_path}", *COMMON, "trainer.epochs=1", "optimizer.learning_rate=1e30",
                        "export.keras=true"])  # python -m trainer, in this process
    assert proc.returncode != 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "failed"
    assert report["error"].startswith("NonFiniteLossError: non-finite loss or gradient at step ")
    assert report["test_accuracy"] is None and report["test_loss"] is None
    assert not (tmp_path / "model.keras").exists() and not (tmp_path / "weights.npz").exists()
    assert "accuracy" not in proc.stdout + proc.stderr.replace("no test evaluation", "")
    assert "run failed at step" in proc.stdout + proc.stderr


SKIP_UNDER_MIRRORED = r'''
import json, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from trainer import MaskRegistry, Trainer

rng = np.random.default_rng(0)
good = [(rng.normal(size=(8, 4)).astype(np.float32), rng.integers(0, 3, size=8).astype(np.int32)) for _ in range(3)]
bad = (np.full((8, 4), np.nan, np.float32), good[0][1])


def train(batches, policy, guard):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        keras.utils.set_random_seed(7)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(16, activation="relu", name="fc1"),
                                  keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(3, name="out")],
                                 name="small")
        registry = MaskRegistry(model, update="compact")
        registry.freeze("*/kernel", elements={"random": 0.9, "seed": 1}, value="zero")
        trainer = Trainer(model, keras.optimizers.AdamW(0.01, weight_decay=0.1),
                          keras.losses.SparseCategoricalCrossentropy(from_logits=True), registry=registry,
                          nan_policy=policy, guard=guard, steps_per_execution=2, strategy=strategy)
    xs = np.concatenate([x for x, _ in batches])
    ys = np.concatenate([y for _, y in batches])
    trainer.fit(tf.data.Dataset.from_tensor_slices((xs, ys)).batch(8), epochs=1)
    bits = [v.numpy().tobytes().hex() for v in list(model.variables) + list(trainer.optimizer.variables)]
    return trainer, bits


results = []
for guard in ("select", "cond"):
    # An epoch is 4 optimizer steps: the skipping run draws one batch more (the repeated dataset's first).
    reference, expected = train(good + good[:1], "stop", guard)
    skipping, got = train(good[:2] + [bad] + good[2:], "skip_step", guard)
    results.append({"guard": skipping.guard_in_use, "equal": got == expected, "steps": skipping.step,
                    "skipped": skipping.skipped_steps, "exact": skipping.registry.exact()})
print(json.dumps(results))
'''


@pytest.mark.slow
def test_mirrored_skip_step_leaves_every_copy_as_if_the_bad_batch_never_came():
    """Under MirroredStrategy (2 logical CPUs), a NaN batch changes no weight, slot, BatchNorm statistic or step.

    Both guards, in one process (one TensorFlow start).
    """
    proc = subprocess.run([sys.executable, "-c", SKIP_UNDER_MIRRORED], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results == [{"guard": guard, "equal": True, "steps": 4, "skipped": 1, "exact": True}
                       for guard in ("select", "cond")]
