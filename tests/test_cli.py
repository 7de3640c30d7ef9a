"""The Hydra CLI and run(): configs compose, the main job runs on real MNIST, outputs are written."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from tests.conftest import CONFIGS
from tests.inprocess import run_trainer
from trainer.config import register
from trainer.run import run

register()

EXPERIMENTS = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(CONFIGS, "experiment", "*.yaml")))


def compose_cfg(overrides, run_dir=None):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=False)
    return cfg


def cli(args, run_dir, env_extra=None, check=True):
    """``python -m trainer hydra.run.dir=<run_dir> *args``, in this process (tests/inprocess.py)."""
    proc = run_trainer([f"hydra.run.dir={run_dir}", *args], env=env_extra)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = compose_cfg([f"+experiment={experiment}"])
    assert cfg.name == experiment
    assert "rules" in cfg.freeze


def test_freeze_rule_reachable_from_command_line():
    cfg = compose_cfg(["+experiment=sparse_mlp", "freeze.rules.sparse.elements.random=0.95"])
    assert cfg.freeze.rules.sparse.elements.random == 0.95
    assert cfg.freeze.rules.sparse.select == "*/kernel"


def test_freeze_presets_compose_as_a_list():
    cfg = compose_cfg(["+experiment=sparse_mlp", "freeze=[random_90,biases]"])
    assert sorted(cfg.freeze.rules) == ["biases", "sparse"]


def test_schema_rejects_wrong_types():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="trainer.epochs=abc") as info:
        compose_cfg(["trainer.epochs=abc"])
    assert "could not be converted to Integer" in str(info.value.__cause__)


def test_bare_cli_runs_on_bundled_digits(tmp_path):
    proc = cli(["trainer.epochs=1"], tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "completed"
    assert report["steps"] == 21  # 1,257 digits / batch 60
    assert report["test_accuracy"] > 0.5
    assert "test | loss" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_sparse_mlp_on_mnist_writes_report_with_zero_drift(tmp_path, mnist_dir):
    cli(["+experiment=sparse_mlp", "trainer.max_steps=300", "trainer.checkpoint_every_n_steps=200"], tmp_path,
        {"TRAINER_DATA_DIR": mnist_dir})
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "completed"
    assert report["steps"] == 300
    for key in ("test_accuracy", "test_loss", "steps", "epochs", "wall_seconds", "examples_per_second", "variables"):
        assert key in report
    kernels = [v for v in report["variables"] if v["path"].endswith("kernel")]
    assert [v["path"] for v in kernels] == ["lenet/fc1/kernel", "lenet/fc2/kernel", "lenet/out/kernel"]
    for v in report["variables"]:
        assert v["drift"] == 0.0
    for v in kernels:
        size = int(np.prod(v["shape"]))
        assert v["frozen_elements"] == round(0.9 * size)
        assert v["sparsity"] >= 0.9
    assert report["test_accuracy"] > 0.75  # 300 steps of a 10 %-dense LeNet-300-100 (measured 0.84)
    assert sorted(os.listdir(tmp_path / "checkpoints"))[:1] == ["checkpoint"]
    assert os.path.isfile(tmp_path / "model.keras")
    assert {"train", "validation"} <= set(os.listdir(tmp_path / "tb"))

    # model.keras loads in a process that never imports trainer, with the same zeros.
    masks = np.load(tmp_path / "masks.npz")
    np.save(tmp_path / "fc1_mask.npy", masks["lenet/fc1/kernel"])
    code = (
        "import sys, numpy as np, keras\n"
        f"m = keras.saving.load_model({str(tmp_path / 'model.keras')!r})\n"
        "assert 'trainer' not in sys.modules\n"
        f"mask = np.load({str(tmp_path / 'fc1_mask.npy')!r})\n"
        "k = m.get_layer('fc1').kernel.numpy()\n"
        "assert np.all(k[~mask] == 0.0), 'frozen elements not zero'\n"
        "print('zeros', int((k == 0).sum()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) >= round(0.9 * 784 * 300)


def test_run_in_process_returns_report(tmp_path):
    cfg = compose_cfg(["trainer.max_steps=5", "export.keras=false", "+experiment=sparse_mlp", "data=digits",
                       "trainer.jit_compile=false"])  # the MNIST test above runs this experiment's XLA step
    report = run(cfg, run_dir=str(tmp_path))
    assert report["steps"] == 5
    assert report["frozen_exact"] is True
    assert json.loads((tmp_path / "report.json").read_text())["steps"] == 5


# Experiments whose model.init_from is another run's weights.npz: the file (at seed=3) and the command that writes it.
TASK_A = "python -m trainer +experiment={a} seed=3 hydra.run.dir={d}/seed3"
NEEDS_A_RUN = {
    **{e: ("multirun/transformer/task_a/seed3/weights.npz",
           TASK_A.format(a="transformer_task_a", d="multirun/transformer/task_a"))
       for e in ("transformer_sft", "transformer_lora", "transformer_full")},
    **{e: ("multirun/continual/task_a/seed3/weights.npz",
           TASK_A.format(a="continual_task_a", d="multirun/continual/task_a"))
       for e in ("continual_task_b", "continual_task_b_freeze")},
    **{e: ("multirun/sparse_llm/pretrain/weights.npz",  # one pretraining run for every seed
           "python -m trainer +experiment=sparse_llm_pretrain hydra.run.dir=multirun/sparse_llm/pretrain")
       for e in ("sparse_llm", "sparse_llm_lora", "sparse_llm_full")},
}


def test_every_experiment_starting_from_another_runs_file_is_listed_above():
    needing = {e for e in EXPERIMENTS if str(compose_cfg([f"+experiment={e}"]).model.get("init_from") or "")}
    assert needing == set(NEEDS_A_RUN)


@pytest.mark.parametrize("experiment", sorted(NEEDS_A_RUN))
def test_a_missing_input_of_another_run_is_refused_naming_the_command_that_makes_it(experiment, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)  # no multirun/ here
    path, command = NEEDS_A_RUN[experiment]
    data = [] if experiment.startswith("sparse_llm") else ["data=digits"]  # not MNIST: the file is checked first
    cfg = compose_cfg([f"+experiment={experiment}", "seed=3", *data])
    with pytest.raises(ValueError) as info:
        run(cfg, run_dir=str(tmp_path / "run"))
    assert str(info.value) == f"model.init_from '{path}' does not exist; make it with: {command}"


def test_another_init_from_is_not_given_the_experiments_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_cfg(["+experiment=continual_task_b", "data=digits", "model.init_from=elsewhere/weights.npz"])
    with pytest.raises(ValueError) as info:
        run(cfg, run_dir=str(tmp_path / "run"))
    assert str(info.value) == ("model.init_from 'elsewhere/weights.npz' does not exist; pass the path of a .npz "
                               "archive saved with np.savez(path, **arrays_by_variable_path) (a run's weights.npz)")


@pytest.mark.slow
def test_the_named_command_makes_the_missing_file(tmp_path, mnist_dir, monkeypatch):
    # In this process (the CLI's exit code 2 and one-line refusal are tested above): the refusal, then the
    # command it prints (shortened), then task B again.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRAINER_DATA_DIR", mnist_dir)
    short = ["trainer.max_steps=2", "trainer.steps_per_execution=1", "trainer.jit_compile=false", "export.keras=false"]
    with pytest.raises(ValueError) as info:
        run(compose_cfg(["+experiment=continual_task_b", *short]), run_dir=str(tmp_path / "b"))
    prefix = "model.init_from 'multirun/continual/task_a/seed0/weights.npz' does not exist; make it with: "
    assert str(info.value) == prefix + ("python -m trainer +experiment=continual_task_a seed=0 "
                                        "hydra.run.dir=multirun/continual/task_a/seed0")
    *overrides, run_dir = str(info.value)[len(prefix):].split()[3:]  # the command as printed
    assert run_dir == "hydra.run.dir=multirun/continual/task_a/seed0"
    assert run(compose_cfg([*overrides, *short]), run_dir=run_dir.split("=", 1)[1])["status"] == "completed"
    assert (tmp_path / "multirun/continual/task_a/seed0/weights.npz").is_file()
    assert run(compose_cfg(["+experiment=continual_task_b", *short]), run_dir=str(tmp_path / "b2"))["status"] == \
        "completed"
