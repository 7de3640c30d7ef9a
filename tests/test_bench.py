"""scripts/bench.py: a --quick smoke run on the bundled digits writes the documented JSON."""

import json
import os
import sys

import pytest

from tests.conftest import REPO

REQUIRED_CASES = ["keras_fit", "trainer_dense", "trainer_masked", "keras_constraint", "keras_masked_layer",
                  "keras_masked_optimizer"]
REQUIRED_RATIOS = ["masked_vs_unmasked", "trainer_vs_keras_fit", "trainer_vs_constraint", "trainer_vs_tfmot"]


@pytest.mark.slow
def test_quick_bench_writes_cases_ratios_and_mfu(tmp_path, monkeypatch, capsys):
    # scripts/bench.py's main() in this process (a process of its own cost about 6 s of CPU importing TensorFlow)
    out = tmp_path / "bench.json"
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.setattr(sys, "path", [os.path.join(REPO, "scripts"), *sys.path])  # as `python scripts/bench.py`
    monkeypatch.chdir(tmp_path)
    import bench

    bench.main(["--quick", "--data", "digits", "--no-wide", "--no-tfmot", "--rounds", "1", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert "| trainer_masked |" in stdout and "masked_vs_unmasked" in stdout
    result = json.loads(out.read_text())

    for name in REQUIRED_CASES:
        case = result["cases"][name]
        for key in ("examples_per_sec", "ms_per_step", "first_step_s"):
            assert case[key] > 0, (name, key, case[key])
        assert result["mfu"][name] > 0
    assert result["matmul_flops_per_sec"] > 0

    ratios = result["ratios"]
    assert set(REQUIRED_RATIOS) <= set(ratios)
    for key in REQUIRED_RATIOS[:3]:
        assert ratios[key] > 0, key
    assert ratios["masked_optimizer_fit_vs_trainer"] > 0  # model.fit + MaskedOptimizer / the trainer
    assert ratios["trainer_vs_tfmot"] is None  # --no-tfmot: reported as not run, not as a number
    assert result["settings"]["tfmot_skipped"] == "--no-tfmot"

    memory = result["registry_memory"]["lenet"]
    assert memory["zero"]["within_bound"]  # a zero-pinned mask costs 1 byte per element
    assert all(row["bytes_per_element"] == 1.0 for row in memory["zero"]["variables"].values())


def test_tfmot_worker_reports_a_failure_to_the_parent():
    """The tfmot case's worker process (scripts/_bench_tfmot.py) answers on its protocol: a failure there
    is raised in the benchmark's process with its cause, and closing the case ends the worker."""
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import _bench_tfmot
    from _measure import MemoryProbe

    if _bench_tfmot.tfmot_available() is None:
        pytest.skip("tfmot is installed: the worker would train; the full benchmark covers it")
    case = _bench_tfmot.TfmotCase("tfmot", "tfmot", model="lenet", k=2, jit=False, flops=1.0, batch=8,
                                  data="digits", limit=64, hidden=[8])
    try:
        with pytest.raises(RuntimeError, match="the tfmot worker failed: ModuleNotFoundError"):
            case.setup(2, MemoryProbe())
    finally:
        case.close()
    assert case.proc.wait(timeout=30) == 0
