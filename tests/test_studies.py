"""The studies in experiments/: their configs compose, and the scripts that regenerate their tables work."""

import json
import os
import sys

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import CONFIGS, REPO
from trainer.config import register
from trainer.masks import rules_from_config

sys.path.insert(0, os.path.join(REPO, "scripts"))
import aggregate_reports  # noqa: E402
import continual_eval  # noqa: E402
import dst_published  # noqa: E402
import lottery_ticket  # noqa: E402

register()

STUDY_EXPERIMENTS = ["magnitude_pruning", "lottery_ticket", "continual_task_a", "continual_task_b",
                     "continual_task_b_freeze"]


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("experiment", STUDY_EXPERIMENTS)
def test_study_experiment_composes_and_its_rules_validate(experiment):
    cfg = compose_cfg([f"+experiment={experiment}"])
    assert cfg.name == experiment
    assert cfg.data.name == "mnist" and cfg.model.name == "mlp"
    rules = rules_from_config(OmegaConf.to_container(cfg.freeze.rules, resolve=True))
    assert all(r.select for r in rules)


def test_magnitude_pruning_prunes_kernels_to_8_percent():
    cfg = compose_cfg(["+experiment=magnitude_pruning"])
    rules = {r.name: r for r in rules_from_config(OmegaConf.to_container(cfg.freeze.rules))}
    sizes = {"prune_hidden": 784 * 300 + 300 * 100, "prune_out": 100 * 10}
    kept = sum(sizes[n] * (1 - r.schedule.final_sparsity) for n, r in rules.items()) / 266_200
    assert kept == pytest.approx(0.0807, abs=1e-4)
    for rule in rules.values():
        assert rule.schedule(0) == 0.0 and rule.schedule(rule.schedule.end_step) == rule.schedule.final_sparsity
        assert all(s.endswith("/kernel") for s in rule.select)


def test_continual_task_b_defaults_to_task_a_run_of_the_same_seed():
    cfg = compose_cfg(["+experiment=continual_task_b_freeze", "seed=2"])
    assert cfg.model.init_from == "multirun/continual/task_a/seed2/weights.npz"
    assert list(cfg.model.init_exclude) == ["out/*"]
    assert cfg.freeze.rules.task_a_weights.elements == {"magnitude": 0.5, "invert": True}


@pytest.mark.parametrize("round_,percent", [(0, 100.0), (3, 51.3), (7, 21.1), (9, 13.5), (15, 3.6), (18, 1.9)])
def test_lottery_rounds_reach_the_published_levels(round_, percent):
    assert round(100 * lottery_ticket.remaining_fraction(round_), 1) == percent


def test_lottery_round_overrides_compose(tmp_path):
    assert lottery_ticket.round_overrides(0, None) == []
    with pytest.raises(ValueError, match="round 2 needs"):
        lottery_ticket.round_overrides(2, None)
    weights = str(tmp_path / "weights.npz")
    cfg = compose_cfg(["+experiment=lottery_ticket", *lottery_ticket.round_overrides(2, weights)])
    hidden = cfg.freeze.rules.prune_hidden.elements
    assert hidden.magnitude == pytest.approx(0.36) and hidden.weights_file == weights
    assert cfg.freeze.rules.prune_out.elements.magnitude == pytest.approx(0.19)


def _fake_run(directory, name, random, seed, accuracy):
    os.makedirs(os.path.join(directory, ".hydra"))
    config = {"name": name, "seed": seed, "freeze": {"rules": {"sparse": {"elements": {"random": random}}}}}
    OmegaConf.save(OmegaConf.create(config), os.path.join(directory, ".hydra", "config.yaml"))
    variables = [{"path": "net/fc/kernel", "shape": [10, 10], "sparsity": random},
                 {"path": "net/fc/bias", "shape": [10], "sparsity": 1.0}]
    report = {"test_accuracy": accuracy, "early_stopping": {"test_accuracy": accuracy - 0.01},
              "wall_seconds": 3.0, "variables": variables}
    with open(os.path.join(directory, "report.json"), "w") as f:
        json.dump(report, f)


def test_aggregator_writes_a_table_and_a_png(tmp_path):
    for i, (random, seed, acc) in enumerate([(0.0, 0, 0.98), (0.0, 1, 0.96), (0.9, 0, 0.95), (0.9, 1, 0.95)]):
        _fake_run(str(tmp_path / "runs" / str(i)), "toy", random, seed, acc)
    table_path, plot_path = tmp_path / "out" / "table.md", tmp_path / "out" / "plot.png"
    table = aggregate_reports.main([str(tmp_path / "runs"), "--x", "kept_percent", "--metric", "test_accuracy",
                                    "--metric", "early_stopping.test_accuracy", "--published", "10=97.5",
                                    "--table", str(table_path), "--plot", str(plot_path), "--log-x"])
    lines = table.splitlines()
    assert lines[0] == ("| kernel weights kept (%) | seeds | test_accuracy | early_stopping.test_accuracy "
                        "| published |")
    assert lines[2] == "| 100 | 2 | 97.00 ± 1.41 | 96.00 ± 1.41 | - |"
    assert lines[3] == "| 10 | 2 | 95.00 ± 0.00 | 94.00 ± 0.00 | 97.5 |"
    assert "4 runs" in table and table_path.read_text() == table
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot_path.stat().st_size > 1000

    rows = aggregate_reports.summarize(aggregate_reports.find_runs([str(tmp_path / "runs")]),
                                       "freeze.rules.sparse.elements.random", ["test_accuracy"], series="name")
    assert [(r["series"], r["x"], r["n"]) for r in rows] == [("toy", 0.9, 2), ("toy", 0.0, 2)]


def test_aggregator_wide_table_puts_series_side_by_side(tmp_path):
    for i, (name, random, acc) in enumerate([("ticket", 0.0, 0.98), ("ticket", 0.9, 0.97), ("reinit", 0.9, 0.93)]):
        _fake_run(str(tmp_path / str(i)), name, random, 0, acc)
    table = aggregate_reports.main([str(tmp_path), "--x", "kept_percent", "--series", "name", "--metric",
                                    "test_accuracy", "--wide", "--x-values", "100", "10"])
    lines = table.splitlines()
    assert lines[0] == "| kernel weights kept (%) | reinit test_accuracy | ticket test_accuracy | seeds |"
    assert lines[2] == "| 100 | - | 98.00 ± 0.00 | -/1 |"
    assert lines[3] == "| 10 | 93.00 ± 0.00 | 97.00 ± 0.00 | 1/1 |"


def _curve_run(seed, epochs):
    """A run that logged the test set each epoch: test accuracy 0.9 + epoch / 10,000, best validation at epoch 2."""
    history = [{"test_accuracy": 0.9 + e / 10000} for e in range(1, epochs + 1)]
    return {"config": {"seed": seed}, "report": {"history": history, "early_stopping": {"test_accuracy": 0.9002}}}


def test_dst_published_curve_views_leave_out_lengths_past_the_run():
    short, long = _curve_run(0, 100), _curve_run(1, 250)  # 540 steps an epoch: 54,000 and 135,000 steps
    views = dst_published.curve_views(long)
    assert views["final"] == pytest.approx(92.5) and views["max"] == pytest.approx(92.5)
    assert views["best_val"] == pytest.approx(90.02)
    assert views["at_54000"] == pytest.approx(91.0)  # epoch 100 ends at step 54,000
    assert views["ckpt_54000"] == pytest.approx(91.0)  # epochs 91..100 end in (49,000, 54,000]
    assert views["at_30000"] == pytest.approx(90.55)  # epoch 55 ends at 29,700; 56 at 30,240
    assert views["at_135000"] == pytest.approx(92.5) and views["ckpt_135000"] == pytest.approx(92.5)
    assert "at_135000" not in dst_published.curve_views(short)
    lines = dst_published.curves({"snip": {5.0: [short, long]}}).splitlines()
    assert lines[0] == ("| run | kept | seed | final | max | best_val | at_30000 | ckpt_30000 | at_40000 | ckpt_40000 "
                        "| at_54000 | ckpt_54000 | at_135000 | ckpt_135000 |")
    assert lines[2].endswith("| 91.00 | 91.00 |  |  |") and lines[3].endswith("| 92.50 | 92.50 |")


def test_continual_eval_puts_task_a_head_on_task_b_layers(tmp_path, monkeypatch):
    from trainer.run import run

    common = ["data=digits", "trainer.max_steps=5", "trainer.jit_compile=false", "trainer.steps_per_execution=5"]
    os.makedirs(tmp_path / "a")
    os.makedirs(tmp_path / "b")
    a_cfg = compose_cfg(["+experiment=continual_task_a", *common])
    monkeypatch.chdir(tmp_path / "a")  # run() writes into the current directory outside a Hydra app
    run(a_cfg)
    os.makedirs(tmp_path / "a" / ".hydra")  # a run refuses a directory that already holds .hydra/
    OmegaConf.save(a_cfg, tmp_path / "a" / ".hydra" / "config.yaml")  # where a CLI run keeps its config
    monkeypatch.chdir(tmp_path / "b")
    b_cfg = compose_cfg(["+experiment=continual_task_b_freeze", *common,
                         f"model.init_from={tmp_path / 'a' / 'weights.npz'}"])
    OmegaConf.save(b_cfg, "config.yaml")
    b_report = run(b_cfg)

    result = continual_eval.evaluate_run({"dir": str(tmp_path / "b"), "report": b_report,
                                          "config": OmegaConf.to_container(b_cfg, resolve=True)})
    a_report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert result["task_a_accuracy_reloaded"] == pytest.approx(a_report["test_accuracy"], abs=1e-6)
    assert result["task_b_accuracy"] == b_report["test_accuracy"]
    assert 0.0 <= result["task_a_accuracy_after_b"] <= 1.0
    assert "task_a_accuracy_subnetwork" in result
    masks = np.load(tmp_path / "b" / "masks.npz")
    assert masks["lenet/fc1/kernel"].mean() == pytest.approx(0.5)


def test_lottery_round_rewinds_kept_weights_and_reinit_changes_them(tmp_path):
    from trainer.run import build

    _, dense, _, _ = build(compose_cfg(["+experiment=lottery_ticket", "data=digits"]))
    initial = {v.path: v.numpy() for v in dense.variables}
    trained = {p: w + np.random.default_rng(0).normal(size=w.shape).astype(w.dtype) for p, w in initial.items()}
    np.savez(tmp_path / "weights.npz", **trained)
    rounds = lottery_ticket.round_overrides(2, str(tmp_path / "weights.npz"))
    _, ticket, _, _ = build(compose_cfg(["+experiment=lottery_ticket", "data=digits", *rounds]))
    _, reinit, _, _ = build(compose_cfg(["+experiment=lottery_ticket", "data=digits", "model.init_seed=1000", *rounds]))
    for t, r in zip(ticket.variables, reinit.variables):
        if not t.path.endswith("/kernel"):
            continue
        kept = t.numpy() != 0
        assert kept.mean() == pytest.approx(0.64 if "out" not in t.path else 0.81, abs=0.01)
        np.testing.assert_array_equal(t.numpy()[kept], initial[t.path][kept])  # rewound, bit for bit
        np.testing.assert_array_equal(r.numpy() != 0, kept)  # the same mask ...
        assert not np.array_equal(r.numpy()[kept], initial[t.path][kept])  # ... from another initialization
        assert np.all(np.abs(trained[t.path][kept]) >= np.abs(trained[t.path][~kept]).max())
