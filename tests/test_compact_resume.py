"""Compact updates end to end: SIGKILL + resume is bit-exact, and MirroredStrategy over 2 CPUs is exact."""

import json

import numpy as np
import pytest

from tests.test_distribute import run_cli
from tests.test_resume import kill_and_resume

COMMON = ["trainer.deterministic=true", "trainer.epochs=6", "trainer.checkpoint_every_n_steps=25",
          "trainer.keep_checkpoints=50", "optimizer=adamw", "freeze=random_90", "freeze.update=compact",
          "export.keras=false", "log.summary_every_n_steps=50"]


@pytest.mark.slow
def test_sigkill_then_resume_in_compact_mode_is_bit_exact(tmp_path):
    # 6 epochs of 21 steps, checkpoints every 25; killed after the checkpoint of step 50, with 76 steps to go.
    a, b = kill_and_resume(tmp_path, COMMON)
    killed = tmp_path / "killed"
    indices = [k for k in a if k.startswith("registry/indices/")]
    assert len(indices) == 3 and not any(k.startswith("registry/masks/") for k in a)  # the 3 kernels, compact
    # The compact values are saved once, where the checkpoint meets them first: as the optimizer's variables.
    optimized = sorted(a[k].size for k in a if k.startswith("optimizer/_trainable_variables/"))
    assert all(a[k].size in optimized for k in indices) and max(optimized) < 64 * 300 // 2  # no dense kernel
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    report = json.loads((killed / "report.json").read_text())
    assert report["status"] == "completed" and report["frozen_exact"] is True


@pytest.mark.slow
def test_mirrored_over_two_cpu_devices_in_compact_mode_is_exact(tmp_path):
    single = run_cli(tmp_path / "single", "freeze.update=dense")
    mirrored = run_cli(tmp_path / "mirrored", "freeze.update=compact", "distribute.strategy=mirrored",
                       "distribute.logical_cpu_devices=2")
    assert mirrored["steps"] == single["steps"] == 3 * 20
    assert mirrored["frozen_exact"] and [v["drift"] for v in mirrored["variables"]] == [0.0] * 6
    np.testing.assert_allclose([h["loss"] for h in mirrored["history"]], [h["loss"] for h in single["history"]],
                               rtol=1e-4)
    a, b = np.load(tmp_path / "single" / "weights.npz"), np.load(tmp_path / "mirrored" / "weights.npz")
    masks = np.load(tmp_path / "mirrored" / "masks.npz")
    for key in a.files:
        np.testing.assert_allclose(b[key], a[key], atol=1e-5)
        if key.endswith("/kernel"):
            assert masks[key].mean() == pytest.approx(0.1, abs=0.01)
            np.testing.assert_array_equal(b[key][~masks[key]].view(np.uint32), 0)  # +0.0 on the replicas' copy
