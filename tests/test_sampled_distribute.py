"""Sampled kernel gradients under MirroredStrategy over 2 logical CPUs: the same training as one device."""

import numpy as np
import pytest

from tests.test_distribute import run_cli, run_here


@pytest.mark.slow
def test_mirrored_over_two_cpu_devices_with_sampled_gradients_matches_compact_on_one_device(tmp_path):
    # One epoch of 20 steps, the last a partial batch (1,257 digits / 64). A step of sampled gradients under
    # MirroredStrategy costs about 0.25 s of CPU on this MLP: two more epochs cost 11 s and met no other case.
    runs = {"single": ["freeze.update=compact", "trainer.epochs=1"],
            "mirrored": ["freeze.update=sampled", "distribute.strategy=mirrored", "distribute.logical_cpu_devices=2",
                         "trainer.epochs=1"]}
    # one device in this process, two logical CPUs in a process of their own (made before TensorFlow starts)
    reports = {name: (run_cli if name == "mirrored" else run_here)(tmp_path / name, *args)
               for name, args in runs.items()}
    weights = {name: np.load(tmp_path / name / "weights.npz") for name in runs}
    trainable = np.load(tmp_path / "mirrored" / "masks.npz")
    assert [r["steps"] for r in reports.values()] == [20, 20] and reports["mirrored"]["frozen_exact"]
    assert {v["drift"] for v in reports["mirrored"]["variables"]} == {0.0}
    losses = {name: [h["loss"] for h in r["history"]] for name, r in reports.items()}
    np.testing.assert_allclose(losses["mirrored"], losses["single"], rtol=1e-4)
    assert sorted(weights["mirrored"].files) == sorted(weights["single"].files)
    for key in weights["single"].files:
        got = weights["mirrored"][key]
        np.testing.assert_allclose(got, weights["single"][key], atol=1e-5, err_msg=key)
        frozen = ~trainable[key] if key.endswith("/kernel") else np.zeros(got.shape, bool)
        assert not got[frozen].view(np.uint32).any(), key  # random_90 pins +0.0, on the replicas' copy too
