"""A new user's terminal: quiet start-up, a banner, one-line user errors, TRAINER_DATA_DIR mistakes named."""

import os
import subprocess
import sys

import keras
import pytest

from tests.conftest import REPO
from tests.inprocess import run_trainer
from trainer.banner import freeze_summary, plural
from trainer.data import DataError, load_mnist, resolve_mnist_path
from trainer.logs import NATIVE_NOISE, error_lines, verbose_requested
from trainer.masks import FreezeConfigError


def cli(args, **env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "HYDRA_FULL_ERROR", "CI")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_a_run_starts_quietly_with_a_banner(tmp_path):
    proc = cli([f"hydra.run.dir={tmp_path}", "trainer.max_steps=3", "trainer.checkpoint_every_n_steps=1",
                "export.keras=false", "freeze=random_90"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    for noise in ("oneDNN", "cuda drivers", "cuInit", "absl::InitializeLog", "Sharding callback", "cpu_feature_guard"):
        assert noise not in text
    assert f"run      {tmp_path}" in text
    assert ("data     digits from scikit-learn's bundled digits (no download) | train 1,257 | validation 180 | "
            "test 360 | inputs (8, 8, 1) | 10 classes") in text
    assert "model    mlp | 50,610 parameters (50,610 trainable)" in text
    assert "freeze   rules sparse | 45,180 of 50,610 elements frozen (89.3 %) in 3 variables" in text
    assert "train    10 epochs x 21 steps (capped at step 3), batch 60 | adam lr 0.0012 constant" in text


def test_a_user_error_is_one_line_and_a_hint(tmp_path):
    args = [f"hydra.run.dir={tmp_path / 'new' / 'run'}", "+experiment=sparse_mlp", "data=digits",
            "freeze.rules.sparse.elements.random=1.5"]
    quiet = {"HYDRA_FULL_ERROR": None, "CI": None}  # as cli() above, but in this process (no start-up is tested)
    proc = run_trainer(args, env=quiet)
    assert proc.returncode == 2
    assert not (tmp_path / "new").exists()  # refused inside the run: the directories Hydra made are removed
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-2:] == [
        "Error: FreezeConfigError: rule 'sparse': elements.random must be a fraction in [0, 1], got 1.5",
        "Hint: check freeze.rules; add dry_run=true to list the variable paths and what each rule selects "
        "(add log.verbose=true or set HYDRA_FULL_ERROR=1 for the traceback)",
    ]
    full = run_trainer(args, env={**quiet, "HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 1 and "Traceback" in full.stderr
    assert "FreezeConfigError: rule 'sparse': elements.random must be a fraction in [0, 1], got 1.5" in full.stderr


def test_error_lines_and_verbose_switch(monkeypatch):
    err = DataError("data.path '/x' is not a file; pass the path of mnist.npz")
    assert error_lines(err).splitlines()[0] == "Error: DataError: data.path '/x' is not a file; pass the path of mnist.npz"
    assert error_lines(FreezeConfigError("rule 'a': bad\nmore")).splitlines()[0] == "Error: FreezeConfigError: rule 'a': bad"
    monkeypatch.delenv("TRAINER_VERBOSE", raising=False)
    assert verbose_requested(["log.verbose=true"]) and not verbose_requested(["log.verbose=false", "x=1"])
    monkeypatch.setenv("TRAINER_VERBOSE", "1")
    assert verbose_requested([])


def test_native_noise_pattern_keeps_real_messages():
    noise = ["WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
             "I0000 00:00:1795350442.310296    4449 port.cc:153] oneDNN custom operations are on.",
             "E0000 00:00:1795350886.422787    9823 cuda_platform.cc:52] failed call to cuInit: INTERNAL",
             "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the flags."]
    kept = ["E0000 00:00:1795350886.422787    9823 some_kernel.cc:52] real error",
            "Traceback (most recent call last):", "ImportError: libfoo.so"]
    assert all(NATIVE_NOISE.search(line) for line in noise)
    assert not any(NATIVE_NOISE.search(line) for line in kept)


def test_data_dir_pointing_at_the_file_is_named(tmp_path, monkeypatch):
    file = tmp_path / "mnist.npz"
    file.write_bytes(b"")
    monkeypatch.setenv("TRAINER_DATA_DIR", str(file))
    with pytest.raises(DataError) as info:
        resolve_mnist_path(None)
    assert str(info.value) == (f"TRAINER_DATA_DIR='{file}' is a file, not a directory: set TRAINER_DATA_DIR="
                               f"'{tmp_path}' (the directory holding mnist.npz), or pass data.path={file}")


def test_wrong_data_dir_is_named_and_nothing_is_downloaded(tmp_path, monkeypatch):
    def no_download():
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(keras.datasets.mnist, "load_data", no_download)
    (tmp_path / "notes.txt").write_text("x")
    monkeypatch.setenv("TRAINER_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError) as info:
        load_mnist()
    assert str(info.value) == (f"TRAINER_DATA_DIR='{tmp_path}' has no mnist.npz (it holds notes.txt): set it to the "
                               "directory holding mnist.npz, pass data.path=/path/to/mnist.npz, or unset it to "
                               "download MNIST")
    monkeypatch.setenv("TRAINER_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(DataError) as info:
        load_mnist()
    assert str(info.value) == (f"TRAINER_DATA_DIR='{tmp_path / 'missing'}' does not exist: set it to the directory "
                               "holding mnist.npz, or unset it to download MNIST")


def test_mnist_source_is_recorded(mnist_dir, monkeypatch):
    monkeypatch.setenv("TRAINER_DATA_DIR", mnist_dir)
    assert load_mnist().source == os.path.join(mnist_dir, "mnist.npz")


def test_freeze_summary_counts_in_words():
    plan = [{"frozen_elements": 30, "rules": ["sparse"]}, {"frozen_elements": 0, "rules": []}]
    assert freeze_summary(plan, 100) == "rules sparse | 30 of 100 elements frozen (30.0 %) in 1 variable"
    assert freeze_summary([{"frozen_elements": 0, "rules": []}], 10) == "nothing frozen"
    assert plural(1, "variable") == "1 variable" and plural(1200, "step") == "1,200 steps"
