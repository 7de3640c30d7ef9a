"""``python -m trainer ... dry_run=true`` and bad rules on the command line (the CLI run in this process).

A dry run resolves every rule, prints the plan and writes only
``freeze_plan.json``. A bad rule exits non-zero with the message on stderr
before anything is written (Hydra's ``.hydra/`` and log file included).
"""

import json
import os

from tests.inprocess import run_trainer

PLAN_KEYS = {"path", "shape", "dtype", "frozen_elements", "frozen_fraction", "value", "rules"}


def cli(args, run_dir):
    return run_trainer([f"hydra.run.dir={run_dir}", *args], env={"COLUMNS": "200"})


def listing(directory):
    """Every file under ``directory`` (Hydra's own .hydra/ and log left out) with its bytes."""
    out = {}
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if d != ".hydra"]
        for name in files:
            path = os.path.join(root, name)
            if not name.endswith(".log"):
                with open(path, "rb") as f:
                    out[os.path.relpath(path, directory)] = f.read()
    return out


def test_dry_run_prints_the_plan_writes_freeze_plan_and_does_not_train(tmp_path):
    proc = cli(["+experiment=zero_indices", "dry_run=true"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(listing(tmp_path)) == ["freeze_plan.json"]  # no report.json, weights, checkpoints or tb/
    plan = json.loads((tmp_path / "freeze_plan.json").read_text())
    assert list(plan) == ["variables"]
    rows = plan["variables"]
    assert [r["path"] for r in rows] == ["lenet/fc1/kernel", "lenet/fc1/bias", "lenet/fc2/kernel", "lenet/fc2/bias",
                                         "lenet/out/kernel", "lenet/out/bias"]
    for row in rows:
        assert set(row) == PLAN_KEYS
    assert rows[0] == {"path": "lenet/fc1/kernel", "shape": [64, 300], "dtype": "float32", "frozen_elements": 8,
                       "frozen_fraction": 8 / 19200, "value": "zero", "rules": ["fc1_elements"]}
    assert rows[1]["frozen_elements"] == 0 and rows[1]["value"] is None and rows[1]["rules"] == []
    assert rows[4]["frozen_elements"] == 3 and rows[4]["rules"] == ["out_elements"]
    out = proc.stdout
    assert "freeze plan" in out
    for column in ("variable", "shape", "dtype", "frozen", "fraction", "value", "rules"):
        assert column in out
    assert "lenet/fc1/kernel" in out and "fc1_elements" in out


def test_bad_rule_on_the_command_line_fails_before_writing_anything(tmp_path):
    run_dir = tmp_path / "run"
    proc = cli(["+experiment=zero_indices", "freeze.rules.fc1_elements.elements.indices=[0,19200]"], run_dir)
    assert proc.returncode != 0
    assert ("elements.indices [19200] out of range for variable 'lenet/fc1/kernel' of shape (64, 300) and size "
            "19200: flat indices must lie in [0, 19199]") in proc.stderr
    assert not run_dir.exists()  # nothing written, not even Hydra's .hydra/ or log file: the empty directory is removed
