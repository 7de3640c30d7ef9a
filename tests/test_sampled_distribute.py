"""Sampled kernel gradients under MirroredStrategy over 2 logical CPUs: the same training as one device."""

import numpy as np
import pytest

from tests.test_distribute import run_cli


@pytest.mark.slow
def test_mirrored_over_two_cpu_devices_with_sampled_gradients_matches_compact_on_one_device(tmp_path):
    single = run_cli(tmp_path / "single", "freeze.update=compact")
    mirrored = run_cli(tmp_path / "mirrored", "freeze.update=sampled", "distribute.strategy=mirrored",
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
            np.testing.assert_array_equal(b[key][~masks[key]].view(np.uint32), 0)  # +0.0 on the replicas' copy
