"""Sweeps that meet failures: a NaN or failed Optuna trial is recorded as failed, a killed job process fails alone.

Before, hydra-optuna-sweeper's ``study.tell(values=nan)`` raised (and so did its fallback) at the first failed
trial, and one SIGKILLed joblib worker ended the whole multirun with ``TerminatedWorkerError``: no further jobs,
no results table. The configs are ``hydra/sweeper=optuna_safe`` and ``hydra/launcher=processes``
(``hydra_plugins/trainer_sweep/``).
"""

import csv
import glob
import math
import os
import signal
import threading
import time

import pytest
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

import hydra_plugins.trainer_sweep.optuna_sweeper as optuna_sweeper  # Hydra's plugin scan may load it again
from hydra_plugins.trainer_sweep.process_launcher import how_it_ended
from tests.inprocess import run_trainer

NAN_TRIAL = ("completed; failed: TrialFailed: returned nan for optimized_metric=val_accuracy (a failed run, or one "
             "that ended before the metric's first value); recorded as a failed trial")


def cli(args):
    """``python -m trainer *args`` in this process (tests/inprocess.py), without ``HYDRA_FULL_ERROR``."""
    return run_trainer(args, env={"HYDRA_FULL_ERROR": None})


def table(sweep, key):
    """The rows of sweep_results.csv by each job's override of ``key`` (``seed=0``)."""
    with open(sweep / "sweep_results.csv") as f:
        return {next(o for o in row["overrides"].split() if o.startswith(key + "=")): row
                for row in csv.DictReader(f)}


def test_a_dead_process_is_named_by_its_signal_or_exit_code():
    assert how_it_ended(123, -signal.SIGKILL) == (
        "JobProcessDied: the job's process (pid 123) was killed by SIGKILL (the out-of-memory killer, or kill -9); "
        "the other jobs went on")
    assert how_it_ended(7, -signal.SIGSEGV) == (
        "JobProcessDied: the job's process (pid 7) was killed by SIGSEGV; the other jobs went on")
    assert how_it_ended(7, 130) == "JobProcessDied: the job's process (pid 7) exited with code 130 before the job ended"


def job_return(folder, value=None, error=None):
    ret = JobReturn(overrides=["x=1"], cfg=OmegaConf.create({"optimized_metric": "val_accuracy"}),
                    hydra_cfg=OmegaConf.create({"hydra": {"runtime": {"output_dir": str(folder)}}}))
    ret.status = JobStatus.FAILED if error else JobStatus.COMPLETED
    ret.return_value = error or value
    return ret


class FakeLauncher:
    def __init__(self, returns):
        self.returns = returns

    def launch(self, job_overrides, initial_job_idx):
        return self.returns


def test_every_unusable_return_becomes_a_failed_trial_with_its_reason_in_the_job_folder(tmp_path):
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "error.txt").write_text("FreezeConfigError: kept\n")
    returns = [job_return(tmp_path / "0", 0.75), job_return(tmp_path / "1", float("nan")),
               job_return(tmp_path / "2", error=RuntimeError("boom\nmore")), job_return(tmp_path / "3", None),
               job_return(tmp_path / "4", float("inf"))]
    recorder = optuna_sweeper._RecordingLauncher(FakeLauncher(returns))
    out = recorder.launch([["x=1"]] * 5, initial_job_idx=0)
    assert out[0].status == JobStatus.COMPLETED and out[0].return_value == 0.75
    assert (recorder.completed, recorder.failed) == (1, 4)
    reasons = {
        "1": NAN_TRIAL.split("failed: ", 1)[1],
        "2": "RuntimeError: boom",
        "3": "FreezeConfigError: kept",  # a job's own error is kept
        "4": NAN_TRIAL.split("failed: ", 1)[1].replace("nan", "inf"),
    }
    for ret, (name, reason) in zip(out[1:], reasons.items()):
        assert ret.status == JobStatus.FAILED
        with pytest.raises(optuna_sweeper.TrialFailed):  # JobReturn raises what the sweeper records as FAIL
            ret.return_value
        assert (tmp_path / name / "error.txt").read_text() == reason + "\n"
        assert (tmp_path / name / ".hydra" / "overrides.yaml").is_file() or name == "3"
    failure = optuna_sweeper.failure
    assert failure(returns[0]) is None and failure(job_return(tmp_path, True)) is not None
    assert failure(job_return(tmp_path, [0.5, 2])) is None and failure(job_return(tmp_path, [0.5, None])) is not None


@pytest.mark.slow
def test_an_optuna_sweep_records_a_nan_trial_as_failed_and_runs_every_trial(tmp_path):
    """The finding's case: a run shorter than one epoch optimizing val_accuracy returns nan."""
    sweep = tmp_path / "sweep"
    proc = cli(["-m", "hydra/sweeper=optuna_safe", "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=1",
                "optimized_metric=val_accuracy", "hydra.sweeper.direction=maximize",  # seed 1 draws 25, 10, 30
                "trainer.max_steps=choice(10,25,30)", "trainer.epochs=2",
                "hydra.sweeper.n_trials=3", "trainer.jit_compile=false", "export.keras=false",
                f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    with open(sweep / "sweep_results.csv") as f:
        assert sorted(row["job"].split("_")[0] for row in csv.DictReader(f)) == ["0", "1", "2"]
    rows = table(sweep, "trainer.max_steps")
    assert sorted(rows) == ["trainer.max_steps=10", "trainer.max_steps=25", "trainer.max_steps=30"]
    assert rows["trainer.max_steps=10"]["job"].split("_")[0] == "1"  # the failed trial was not the last
    assert os.path.isdir(sweep / rows["trainer.max_steps=10"]["job"])
    assert rows["trainer.max_steps=10"]["status"] == NAN_TRIAL and rows["trainer.max_steps=10"]["val_accuracy"] == ""
    assert rows["trainer.max_steps=25"]["status"] == rows["trainer.max_steps=30"]["status"] == "completed"
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == max(float(rows[k]["val_accuracy"]) for k in ["trainer.max_steps=25",
                                                                          "trainer.max_steps=30"])
    assert best.best_params["trainer.max_steps"] in (25, 30)
    assert "sweep results (3 jobs, best val_accuracy first)" in proc.stdout


@pytest.mark.slow
def test_an_optuna_sweep_with_no_completed_trial_still_writes_its_results(tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli(["-m", "hydra/sweeper=optuna_safe", "hydra/sweeper/sampler=random", "optimized_metric=val_accuracy",
                "freeze=random_90", "freeze.rules.sparse.elements.random=choice(1.5,2.0)", "hydra.sweeper.n_trials=2",
                f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(sweep / "sweep_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for row in rows:
        value = row["overrides"].split("freeze.rules.sparse.elements.random=")[1].split()[0]
        assert row["status"] == (
            f"failed: FreezeConfigError: rule 'sparse': elements.random must be a fraction in [0, 1], got {value}")
    assert OmegaConf.to_container(OmegaConf.load(sweep / "optimization_results.yaml")) == {
        "name": "optuna", "best_params": None, "best_value": None, "failed_trials": 2,
        "error": "No trials are completed yet."}
    assert "no trial completed (2 failed: see each job's error.txt and sweep_results.md)" in proc.stdout + proc.stderr


def job_pid(sweep, prefix, deadline):
    """The PID in job ``prefix``'s run.lock (written by the process running the job) once it is there."""
    while time.monotonic() < deadline:
        for lock in glob.glob(str(sweep / f"{prefix}_*" / "run.lock")):
            text = open(lock).read().strip()
            if text.isdigit():
                return int(text)
        time.sleep(0.02)
    raise AssertionError(f"no run.lock with a PID in {sweep}/{prefix}_*")


@pytest.mark.slow
def test_a_killed_job_process_fails_alone_and_the_table_lists_both_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    killed_pids = []

    def kill_job_0():  # beside the sweep, which runs in this process; its launcher starts a process per job
        pid = job_pid(sweep, "0", time.monotonic() + 240)
        os.kill(pid, signal.SIGKILL)
        killed_pids.append(pid)

    killer = threading.Thread(target=kill_job_0, daemon=True)
    killer.start()
    proc = cli(["-m", "data=digits", "seed=0,1", "hydra/launcher=processes", "hydra.launcher.n_jobs=2",
                "trainer.epochs=2", "export.keras=false", f"hydra.sweep.dir={sweep}"])
    killer.join(timeout=10)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(killed_pids) == 1 and killed_pids[0] != os.getpid(), killed_pids  # a job's own process was killed
    pid = killed_pids[0]
    rows = table(sweep, "seed")
    killed = ("failed: JobProcessDied: the job's process (pid %d) was killed by SIGKILL (the out-of-memory killer, "
              "or kill -9); the other jobs went on" % pid)
    assert {seed: row["status"] for seed, row in rows.items()} == {"seed=0": killed, "seed=1": "completed"}
    assert not math.isnan(float(rows["seed=1"]["test_accuracy"])) and rows["seed=0"]["test_accuracy"] == ""
    logs = proc.stdout + proc.stderr
    assert f"job #0 (data=digits seed=0 trainer.epochs=2 export.keras=False) failed: {killed[8:]}" in logs
