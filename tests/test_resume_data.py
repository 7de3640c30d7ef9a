"""Issue 26, item 8: a resume on other data (another mnist.npz, a replaced file) is refused, and changes no byte."""

import hashlib
import json
import os

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from tests.conftest import CONFIGS
from trainer.config import register
from trainer.data_digest import data_digest
from trainer.run import run
from trainer.rundir import RunDirError

register()


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def small_mnist(path, seed):
    rng = np.random.default_rng(seed)
    np.savez(path, x_train=rng.integers(0, 256, (120, 28, 28), dtype=np.uint8),
             y_train=rng.integers(0, 10, 120, dtype=np.uint8),
             x_test=rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), y_test=rng.integers(0, 10, 40, dtype=np.uint8))


def tree_hashes(root):
    out = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return out


ARGS = ["data=mnist", "data.validation_size=20", "trainer.max_steps=2", "trainer.epochs=10", "export.keras=false",
        "log.summary_every_n_steps=50", "model=mlp"]


@pytest.fixture()
def trained(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    small_mnist(data_dir / "mnist.npz", seed=0)
    monkeypatch.setenv("TRAINER_DATA_DIR", str(data_dir))
    run_dir = tmp_path / "run"
    run(compose_cfg(ARGS), run_dir=str(run_dir))
    return data_dir, run_dir


def test_the_fingerprint_holds_the_size_and_hash_of_the_file_read(tmp_path):
    small_mnist(tmp_path / "a.npz", seed=0)
    content = (tmp_path / "a.npz").read_bytes()
    assert data_digest({"name": "mnist", "path": str(tmp_path / "a.npz")}) == {
        "data.digest.bytes": len(content), "data.digest.sha256": hashlib.sha256(content).hexdigest()}


def test_a_resume_on_another_mnist_file_is_refused_and_changes_no_byte(trained, monkeypatch, tmp_path):
    data_dir, run_dir = trained
    old = data_digest({"name": "mnist"})
    other = tmp_path / "other"
    other.mkdir()
    small_mnist(other / "mnist.npz", seed=1)
    monkeypatch.setenv("TRAINER_DATA_DIR", str(other))
    new = data_digest({"name": "mnist"})
    before = tree_hashes(run_dir)
    with pytest.raises(RunDirError) as caught:
        run(compose_cfg([*ARGS, "trainer.max_steps=4", f"resume={run_dir}"]), run_dir=str(run_dir))
    changed = "; ".join(f"data.digest.{k}: {json.dumps(old['data.digest.' + k])} -> {json.dumps(new['data.digest.' + k])}"
                        for k in ("bytes", "sha256") if old["data.digest." + k] != new["data.digest." + k])
    keys = ",".join(f"data.digest.{k}" for k in ("bytes", "sha256") if old["data.digest." + k] != new["data.digest." + k])
    assert str(caught.value) == (
        f"resume={run_dir} was trained with another config ({changed}); start a new run without resume= (or in "
        f"another hydra.run.dir), or continue with the changed values by adding 'resume_allow_changes=[{keys}]'")
    assert tree_hashes(run_dir) == before


def test_the_same_data_resumes_and_a_replaced_file_at_data_path_is_refused(trained):
    data_dir, run_dir = trained
    result = run(compose_cfg([*ARGS, "trainer.max_steps=3", f"resume={run_dir}"]), run_dir=str(run_dir))
    assert result["status"] == "completed" and result["steps"] == 3 and result["config_changes"] == []
    small_mnist(data_dir / "mnist.npz", seed=2)
    with pytest.raises(RunDirError, match=r"was trained with another config \(data\.digest\.sha256: "):
        run(compose_cfg([*ARGS, "trainer.max_steps=4", f"resume={run_dir}"]), run_dir=str(run_dir))
