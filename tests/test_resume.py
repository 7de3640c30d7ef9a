"""Nothing lost: SIGKILL + resume is bit-exact, SIGINT checkpoints, corrupted checkpoints are skipped."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from hydra import compose, initialize_config_dir

from tests.conftest import CONFIGS, REPO
from tests.inprocess import run_trainer
from trainer.config import register
from trainer.run import run

register()

COMMON = ["trainer.deterministic=true", "trainer.epochs=6", "trainer.checkpoint_every_n_steps=25",
          "trainer.keep_checkpoints=50", "optimizer=adamw", "freeze=random_90", "export.keras=false",
          "log.summary_every_n_steps=50"]


def first_run(run_dir, args):
    """The run a test then resumes, in this process (one process start less); not deterministic, so this
    worker's TensorFlow keeps its default kernels (the resumed process gets the same ``args``)."""
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(args))
    return run(cfg, run_dir=str(run_dir))


def cli(args, env=None):
    return [sys.executable, "-m", "trainer", *args]


def env():
    # PYTHONPATH: a run started outside the repository (cwd=tmp_path) imports this checkout, not an installed copy.
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)


def final_state(run_dir):
    """Every tensor of the latest checkpoint except the save counter and the run record, by checkpoint key."""
    path = tf.train.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    reader = tf.train.load_checkpoint(path)
    return path, {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
                  if "save_counter" not in k and not k.startswith(("_CHECKPOINTABLE_OBJECT_GRAPH", "run_record"))}


def wait_for_log(run_dir, proc, text, timeout=240):
    """Waits until the run's log file contains ``text``; returns the log file's path."""
    log_file = run_dir / "__main__.log"
    deadline = time.time() + timeout
    while time.time() < deadline and text not in (log_file.read_text() if log_file.exists() else ""):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    assert text in log_file.read_text(), f"{text!r} never appeared in {log_file}"
    return log_file


def wait_for_checkpoint(run_dir, proc, min_step, timeout=240):
    index = os.path.join(run_dir, "checkpoints", "checkpoint")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isfile(index):
            latest = tf.train.latest_checkpoint(os.path.dirname(index))
            if latest and int(latest.rsplit("-", 1)[1]) >= min_step:
                return latest
        if proc.poll() is not None:
            raise AssertionError(f"run ended before a checkpoint at step {min_step}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.01)
    raise AssertionError("no checkpoint in time")


def kill_and_resume(tmp_path, args, min_step=50):
    """Runs ``args`` in a process killed by SIGKILL after the checkpoint of ``min_step``, then resumes it
    (``killed/``) and runs it straight (``straight/``), both in this process (two process starts less); returns
    both final checkpoints' tensors ``(straight, killed)``, by key.

    Asserts that the kill landed mid-run, that the resume restored a checkpoint and that both runs end at the
    same step with the same checkpoint keys.
    """
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = subprocess.Popen(cli([f"hydra.run.dir={killed}", *args]), cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(str(killed), proc, min_step=min_step)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "report.json").exists()  # it really died mid-run
    resumed = run_trainer([f"resume={killed}", *args])  # python -m trainer, in this process
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "restored" in resumed.stderr + resumed.stdout
    reference = run_trainer([f"hydra.run.dir={straight}", *args])  # the uninterrupted reference
    assert reference.returncode == 0, reference.stderr[-3000:]
    path_a, a = final_state(str(straight))
    path_b, b = final_state(str(killed))
    assert os.path.basename(path_a) == os.path.basename(path_b)  # same final step
    assert sorted(a) == sorted(b)
    return a, b


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["trainer.steps_per_execution=5", "trainer.jit_compile=true"]], ids=["xla_spe5"])
def test_sigkill_then_resume_is_bit_exact(tmp_path, extra):
    # 6 epochs of 21 steps, checkpoints every 25; killed after the checkpoint of step 50, with 76 steps to go.
    # The plain case (no XLA, K = 1) is tests/test_kill_loop.py: a deterministic AdamW random_90 run killed 4 times.
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    a, b = kill_and_resume(tmp_path, [*COMMON, *extra])
    assert sum(k.startswith("optimizer/_variables/") for k in a) >= 12  # AdamW slots of 6 variables
    assert any(k.startswith(("registry/masks/", "registry/indices/")) for k in a)  # dense or compact state
    assert "registry/rule_state/.ATTRIBUTES/py_state" in a
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    report = json.loads((killed / "report.json").read_text())
    assert report["status"] == "completed" and report["frozen_exact"] is True
    assert report["history"] == json.loads((straight / "report.json").read_text())["history"]  # the whole run
    assert [s["status"] for s in report["segments"]] == ["killed", "completed"]


@pytest.mark.slow
def test_sigint_finishes_step_writes_checkpoint_and_interrupted_report(tmp_path):
    run_dir = tmp_path / "run"
    args = [f"hydra.run.dir={run_dir}", *COMMON, "trainer.epochs=2000", "trainer.checkpoint_every_n_steps=100000",
            "trainer.log_every_n_steps=20"]
    proc = subprocess.Popen(cli(args), cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_log(run_dir, proc, "train | step")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "interrupted"
    assert report["frozen_exact"] is True
    latest = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    assert latest is not None and int(latest.rsplit("-", 1)[1]) == report["steps"]


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_to_previous(tmp_path):
    run_dir, common = tmp_path / "run", COMMON[1:]  # COMMON without trainer.deterministic=true
    first_run(run_dir, [*common, "trainer.epochs=3"])
    ckpt_dir = run_dir / "checkpoints"
    latest = tf.train.latest_checkpoint(str(ckpt_dir))
    data = [p for p in os.listdir(ckpt_dir) if p.startswith(os.path.basename(latest) + ".data")][0]
    with open(ckpt_dir / data, "r+b") as f:
        f.truncate(os.path.getsize(ckpt_dir / data) // 2)
    resumed = run_trainer([f"resume={run_dir}", *common, "trainer.epochs=4"])  # python -m trainer, in this process
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    text = resumed.stdout + resumed.stderr
    assert f"checkpoint {latest} is unreadable" in text and "falling back to" in text
    assert json.loads((run_dir / "report.json").read_text())["steps"] == 4 * 21


@pytest.mark.slow
def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
    run_dir, common = tmp_path / "run", COMMON[1:]  # COMMON without trainer.deterministic=true
    first_run(run_dir, [*common, "trainer.epochs=1", "trainer.keep_checkpoints=1"])
    ckpt_dir = run_dir / "checkpoints"
    for name in os.listdir(ckpt_dir):
        if ".data" in name:
            with open(ckpt_dir / name, "r+b") as f:
                f.truncate(10)
    report_before = (run_dir / "report.json").read_text()
    resumed = run_trainer([f"resume={run_dir}", *common, "trainer.epochs=2"])  # python -m trainer, in this process
    assert resumed.returncode != 0
    assert "no readable checkpoint in" in resumed.stderr
    assert (run_dir / "report.json").read_text() == report_before  # nothing already written is lost


def test_resume_of_missing_directory_is_refused(tmp_path):
    proc = run_trainer([f"resume={tmp_path / 'nope'}"])  # python -m trainer, in this process
    assert proc.returncode == 2
    assert "is not a directory" in proc.stderr


@pytest.mark.slow
def test_resume_true_continues_the_latest_run_of_the_experiment(tmp_path):
    first_run(tmp_path / "outputs" / "default" / "2026-01-01_00-00-00", ["trainer.epochs=1", "export.keras=false"])
    runs = list((tmp_path / "outputs" / "default").iterdir())
    assert len(runs) == 1
    again = run_trainer(["resume=true", "trainer.epochs=2", "export.keras=false"], cwd=tmp_path)  # in this process
    assert again.returncode == 0, again.stderr[-3000:]
    assert list((tmp_path / "outputs" / "default").iterdir()) == runs  # continued in place
    report = json.loads((runs[0] / "report.json").read_text())
    assert report["steps"] == 2 * 21 and report["status"] == "completed"


@pytest.mark.slow
def test_second_sigint_exits_at_once(tmp_path):
    run_dir = tmp_path / "run"
    # one execution = a whole epoch of 1,257 single-example steps: the first SIGINT waits for it. The wider MLP
    # makes that execution last seconds, not the 0.9 s LeNet-300-100 takes, so the second SIGINT lands inside it.
    args = [f"hydra.run.dir={run_dir}", "trainer.batch_size=1", "trainer.steps_per_execution=1257",
            "trainer.epochs=50", "export.keras=false", "model.hidden=[1024,1024]"]
    proc = subprocess.Popen(cli(args), cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # After epoch 1's checkpoint comes epoch 2's execution. Python runs a signal handler only when that compiled
    # execution returns, and two SIGINTs that arrive during it are one: the second is sent once the first was seen,
    # while the run finishes (validation, checkpoint, test evaluation, report).
    log_file = wait_for_log(run_dir, proc, "checkpoints/ckpt-1257")
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    wait_for_log(run_dir, proc, "SIGINT received")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "second interrupt: exiting now" in out + err + log_file.read_text()
    assert not (run_dir / "report.json").exists()  # it did not wait for the step, the checkpoint or the report
