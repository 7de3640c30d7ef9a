"""Sweeps: main returns optimized_metric, the Optuna / joblib / submitit configs run, a results table ends a multirun."""

import csv
import json
import math
import re

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import CONFIGS
from tests.inprocess import run_trainer
from trainer.config import register
from trainer.sweep import job_rows, optimized_value, rank, summarize_sweep

register()


def compose_with_hydra(overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


REPORT = {"status": "completed", "test_accuracy": 0.91, "test_loss": 0.3, "steps": 42, "wall_seconds": 3.5,
          "history": [{"loss": 1.0, "val_loss": 0.5, "val_accuracy": 0.8}, {"loss": 0.4, "val_loss": 0.35,
                                                                              "val_accuracy": 0.9}]}


def test_optimized_value_reads_the_report():
    cfg = OmegaConf.create({"optimized_metric": "val_accuracy"})
    assert optimized_value(cfg, REPORT) == 0.9  # the last epoch's
    assert optimized_value(OmegaConf.create({"optimized_metric": "test_loss"}), REPORT) == 0.3
    assert optimized_value(OmegaConf.create({"optimized_metric": None}), REPORT) is None
    assert math.isnan(optimized_value(cfg, None))  # a failed job
    assert math.isnan(optimized_value(cfg, {**REPORT, "history": []}))  # stopped before the first validation
    with pytest.raises(ValueError) as info:
        optimized_value(OmegaConf.create({"optimized_metric": "test_acc"}), REPORT)
    assert str(info.value) == ("optimized_metric='test_acc' is not in the run's report; use a report.json key such "
                               "as test_accuracy, or val_accuracy / val_loss (the last epoch's)")


def fake_job(sweep, name, overrides, report=None, error=None):
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if report is not None:
        (job / "report.json").write_text(json.dumps(report))
    if error is not None:
        (job / "error.txt").write_text(error + "\n")


def test_results_table_lists_every_job_best_first(tmp_path, capsys):
    fake_job(tmp_path, "0_lr=0.1", ["lr=0.1", "data=digits"], {**REPORT, "history": [{"val_accuracy": 0.7}]})
    fake_job(tmp_path, "1_lr=0.01", ["lr=0.01", "data=digits"], REPORT)
    fake_job(tmp_path, "2_lr=9", ["lr=9", "data=digits"], error="FreezeConfigError: rule 'x': bad")
    fake_job(tmp_path, "10_lr=0.001", ["lr=0.001", "data=digits"], {**REPORT, "history": [{"val_accuracy": 0.85}]})
    assert [r["job"] for r in job_rows(str(tmp_path))] == ["0_lr=0.1", "1_lr=0.01", "2_lr=9", "10_lr=0.001"]
    rows = summarize_sweep(str(tmp_path), "val_accuracy", "maximize")
    assert [r["job"] for r in rows] == ["1_lr=0.01", "10_lr=0.001", "0_lr=0.1", "2_lr=9"]
    out = capsys.readouterr().out
    assert "sweep results (4 jobs, best val_accuracy first)" in out and "every job: data=digits" in out
    assert "best: val_accuracy 0.9000 | lr=0.01 |" in out
    with open(tmp_path / "sweep_results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["overrides"] for r in table] == ["lr=0.01 data=digits", "lr=0.001 data=digits", "lr=0.1 data=digits",
                                               "lr=9 data=digits"]
    assert table[0]["val_accuracy"] == "0.9" and table[0]["test_accuracy"] == "0.91" and table[0]["steps"] == "42.0"
    assert table[3]["status"] == "failed: FreezeConfigError: rule 'x': bad" and table[3]["val_accuracy"] == ""
    md = (tmp_path / "sweep_results.md").read_text().splitlines()
    assert md[0].startswith("| job | overrides | status | test_accuracy") and len(md) == 6
    assert rank(rows, None) == rows


def test_optuna_search_config_composes():
    cfg = compose_with_hydra(["hparams_search=sparse_mlp_optuna"])
    assert cfg.name == "sparse_mlp_optuna" and cfg.optimized_metric == "val_accuracy"
    assert cfg.data.name == "mnist" and "sparse" in cfg.freeze.rules  # on top of +experiment=sparse_mlp
    sweeper, launcher = cfg.hydra.sweeper, cfg.hydra.launcher
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert dict(sweeper.params) == {"optimizer.learning_rate": "tag(log, interval(1e-4, 1e-2))",
                                    "freeze.rules.sparse.elements.random": "interval(0.5, 0.98)"}
    assert launcher._target_.endswith("ProcessLauncher") and launcher.n_jobs == 2  # each trial its own process
    assert cfg.hydra.callbacks.sweep_results._target_ == "trainer.sweep.SweepResults"


def test_slurm_launcher_config_composes():
    cfg = compose_with_hydra(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1
    assert launcher.submitit_folder.endswith("/.submitit/%j") and launcher.submitit_folder.startswith("multirun/")


@pytest.mark.slow
def test_optuna_search_runs_parallel_jobs_and_prints_the_table(tmp_path):
    sweep = tmp_path / "sweep"
    # The sweep's own process is this one (tests/inprocess.py); its launcher starts a process per job.
    proc = run_trainer(["-m", "hparams_search=sparse_mlp_optuna", "hydra.sweeper.n_trials=2",
                        f"hydra.sweep.dir={sweep}", "data=digits", "trainer.epochs=1", "trainer.jit_compile=false",
                        "trainer.steps_per_execution=7", "export.keras=false"], env={"HYDRA_FULL_ERROR": None})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(sweep / "sweep_results.csv")))
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows)
    for row in rows:  # folders named <job number>_<hash of the overrides>; the values Optuna chose in the table
        number, digest = row["job"].split("_")
        assert number in ("0", "1") and re.fullmatch("[0-9a-f]{8}", digest), row["job"]
        assert "freeze.rules.sparse.elements.random=" in row["overrides"]
        assert "optimizer.learning_rate=" in row["overrides"]
    best = yaml_best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == pytest.approx(max(float(r["val_accuracy"]) for r in rows))
    assert yaml_best.name == "optuna"
    assert "sweep results (2 jobs, best val_accuracy first)" in proc.stdout and "best: val_accuracy" in proc.stdout
    assert len({line for line in proc.stderr.splitlines() if "Launching jobs" in line}) <= 1


@pytest.mark.slow
def test_submitit_local_sweep_records_a_failed_job_and_goes_on(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    # The sweep in this process (tests/inprocess.py); submitit starts a process per job.
    proc = run_trainer(["-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}", "freeze=random_90",
                        "freeze.rules.sparse.elements.random=0.5,1.5", "trainer.max_steps=3", "trainer.epochs=1",
                        "export.keras=false", "hydra.launcher.timeout_min=10"], env={"HYDRA_FULL_ERROR": None})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {next(o for o in r["overrides"].split() if o.startswith("freeze.rules")): r
            for r in csv.DictReader(open(sweep / "sweep_results.csv"))}
    assert rows["freeze.rules.sparse.elements.random=0.5"]["status"] == "completed"
    assert rows["freeze.rules.sparse.elements.random=1.5"]["status"] == (
        "failed: FreezeConfigError: rule 'sparse': elements.random must be a fraction in [0, 1], got 1.5")
    assert (sweep / ".submitit").is_dir()
