"""The freezing experiments (configs/experiment/) run end to end through ``run(cfg)`` on the bundled digits.

Each runs a few steps; its report must show zero drift and exactly the frozen
elements its rules name, and the frozen elements of the saved weights must be
bit-for-bit the pinned values (0, or the value at model build).
"""

import json
import os

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import CONFIGS
from trainer.config import register
from trainer.run import build, run

register()

# Per experiment: the frozen elements of every variable with any (all other trainable variables: 0),
# and whether they are pinned to zero (else to their value at model build, "current").
EXPERIMENTS = {
    "zero_indices": ({"lenet/fc1/kernel": 8, "lenet/out/kernel": 3}, True),
    "connectivity": ({"lenet/fc2/kernel": 64 - 22}, True),
    "freeze_conv": ({"conv1/kernel": 5 * 5 * 1 * 6, "conv1/bias": 6, "bn1/gamma": 6, "bn1/beta": 6,
                     "conv2/kernel": 5 * 5 * 6 * 16, "conv2/bias": 16, "bn2/gamma": 16, "bn2/beta": 16}, False),
    "kernel_only": ({"lenet/fc1/kernel": 64 * 300, "lenet/fc2/kernel": 300 * 100, "lenet/out/kernel": 100 * 10},
                    False),
    "embedding_new_tokens": ({"tokens/embeddings": 12 * 16}, False),
}
STEPS = 5


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def in_tmp(tmp_path):
    cwd = os.getcwd()
    os.chdir(tmp_path)  # outside Hydra, run() writes to the current directory
    yield tmp_path
    os.chdir(cwd)


def test_every_freezing_experiment_file_exists_and_names_itself():
    for name in EXPERIMENTS:
        path = os.path.join(CONFIGS, "experiment", f"{name}.yaml")
        with open(path) as f:
            text = f.read()
        assert text.startswith("# @package _global_\n"), name
        assert f"python -m trainer +experiment={name}" in text, name
        assert compose_cfg([f"+experiment={name}"]).name == name


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_runs_with_zero_drift_and_exact_frozen_elements(in_tmp, name):
    expected, zero = EXPERIMENTS[name]
    cfg = compose_cfg([f"+experiment={name}", f"trainer.max_steps={STEPS}", "export.keras=false"])
    assert cfg.data.name == "digits"  # no download
    # The model as built, before any training: what "current" pins to.
    _, built_model, _, _ = build(cfg)
    built = {v.path: v.numpy().copy() for v in built_model.variables}
    trainable = [v.path for v in built_model.trainable_variables]

    report = run(cfg)

    assert report["status"] == "completed" and report["steps"] == STEPS
    assert report["frozen_exact"] is True
    on_disk = json.loads((in_tmp / "report.json").read_text())
    plan = json.loads((in_tmp / "freeze_plan.json").read_text())
    for rows in (report["variables"], on_disk["variables"], plan["variables"]):
        assert [r["path"] for r in rows] == trainable  # every trainable variable, in model order
        assert {r["path"]: r["frozen_elements"] for r in rows if r["frozen_elements"]} == expected
    assert {r["drift"] for r in on_disk["variables"]} == {0.0}
    for row in plan["variables"]:
        assert set(row) == {"path", "shape", "dtype", "frozen_elements", "frozen_fraction", "value", "rules"}
        assert row["frozen_fraction"] == row["frozen_elements"] / int(np.prod(row["shape"]))

    masks = np.load(in_tmp / "masks.npz")
    weights = np.load(in_tmp / "weights.npz")
    moved = 0
    for path in trainable:
        frozen = ~masks[path]
        assert int(frozen.sum()) == expected.get(path, 0)
        pinned = np.zeros(int(frozen.sum()), np.float32) if zero else built[path][frozen]
        np.testing.assert_array_equal(weights[path][frozen].view(np.uint32), pinned.view(np.uint32))
        moved += int(np.sum(weights[path][~frozen] != built[path][~frozen]))
    assert moved > 0  # the rest trained


def test_connectivity_matrix_is_the_trainable_mask():
    cfg = compose_cfg(["+experiment=connectivity"])
    matrix = np.array(OmegaConf.to_container(cfg.freeze.rules.connections.elements.mask), dtype=bool)
    _, model, _, registry = build(cfg)
    np.testing.assert_array_equal(registry.trainable_mask("lenet/fc2/kernel"), matrix)
    assert model.get_layer("fc2").activation.__name__ == "sigmoid"
    assert not model.get_layer("fc2").kernel.numpy()[~matrix].any()


def test_embedding_new_tokens_freezes_the_first_rows():
    _, model, _, registry = build(compose_cfg(["+experiment=embedding_new_tokens"]))
    frozen = ~registry.trainable_mask("tokens/embeddings")
    np.testing.assert_array_equal(frozen, np.arange(17)[:, None].repeat(16, axis=1) < 12)


def test_dry_run_in_process_writes_only_the_plan(in_tmp):
    result = run(compose_cfg(["+experiment=freeze_conv", "dry_run=true"]))
    assert result["status"] == "dry_run"
    assert sorted(os.listdir(in_tmp)) == ["freeze_plan.json"]
    plan = json.loads((in_tmp / "freeze_plan.json").read_text())
    assert plan == {"variables": result["variables"]}
    assert sum(r["frozen_elements"] for r in plan["variables"]) == sum(EXPERIMENTS["freeze_conv"][0].values())
