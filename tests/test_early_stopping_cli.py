"""early_stopping.* from the config: stop after `patience` epochs without improvement, end on the best weights."""

import json

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from tests.conftest import CONFIGS
from trainer.config import ConfigError, register
from trainer.run import run

register()

BASE = ["data=digits", "trainer.epochs=10", "trainer.batch_size=64", "freeze=random_90"]


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_stops_after_patience_and_ends_on_the_best_epochs_weights(tmp_path):
    # a high learning rate, so that the validation loss turns up within the 10 epochs
    report = run(compose_cfg([*BASE, "optimizer.learning_rate=0.05", "early_stopping.monitor=val_loss",
                              "early_stopping.patience=0"]), run_dir=str(tmp_path))
    loss = [epoch["val_loss"] for epoch in report["history"]]
    # patience 0: training stops after the first epoch whose val_loss is not below every earlier one
    expected = next((e + 1 for e in range(1, len(loss)) if loss[e] >= min(loss[:e])), 10)
    assert len(loss) == expected < 10
    assert report["status"] == "completed" and report["frozen_exact"] is True
    with np.load(tmp_path / "weights.npz") as final, np.load(tmp_path / "best_weights.npz") as best:
        assert sorted(final.files) == sorted(best.files)
        for key in final.files:  # the best epoch's weights, restored bit for bit
            assert final[key].tobytes() == best[key].tobytes(), key
    assert len(json.loads((tmp_path / "report.json").read_text())["history"]) == expected


def test_off_by_default_and_a_bad_monitor_is_refused_before_training(tmp_path):
    report = run(compose_cfg([*BASE, "trainer.epochs=2"]), run_dir=str(tmp_path / "plain"))
    assert len(report["history"]) == 2 and not (tmp_path / "plain" / "best_weights.npz").exists()
    with pytest.raises(ConfigError) as info:
        run(compose_cfg([*BASE, "early_stopping.monitor=val_acc"]), run_dir=str(tmp_path / "bad"))
    assert str(info.value) == ("early_stopping.monitor must be null (off) or one of ['val_loss', 'val_accuracy', "
                               "'loss', 'accuracy', 'val_perplexity', 'perplexity'], got 'val_acc'")
    assert not (tmp_path / "bad" / "report.json").exists()
