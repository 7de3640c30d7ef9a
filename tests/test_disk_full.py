"""Issue 26, item 5: disk full while the run writes its files ends in one line, and report.json says what is missing.

The disk is "full" for one writer at a time (it raises ``OSError(ENOSPC)`` / TensorFlow's ``ResourceExhaustedError``
as the real one does): the other files are then checked as they are left.
"""

import errno
import json
import os

import pytest
import tensorflow as tf
from hydra import compose, initialize_config_dir

from tests.conftest import CONFIGS
from trainer import report as reports
from trainer.config import register
from trainer.logs import error_lines, user_errors
from trainer.run import run
from trainer.writes import WriteError

register()

BASE = ["trainer.max_steps=5", "trainer.checkpoint_every_n_steps=3", "freeze=random_90", "log.summary_every_n_steps=50"]


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_an_export_that_cannot_be_written_fails_the_run_and_the_report_says_which(tmp_path, monkeypatch):
    monkeypatch.setattr(reports, "export_weights", disk_full)
    with pytest.raises(WriteError) as caught:
        run(compose_cfg(BASE), run_dir=str(tmp_path))
    message = (f"could not write the exports of {tmp_path} (weights.npz: [Errno 28] No space left on device); "
               "report.json says which")
    assert str(caught.value) == message
    assert error_lines(caught.value).splitlines()[0] == f"Error: WriteError: {message}"
    assert isinstance(caught.value, user_errors())  # the command line prints one line and exits 2
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "failed" and report["error"] == f"WriteError: {message}"
    assert report["export_errors"] == {"weights.npz": "[Errno 28] No space left on device"}
    assert report["steps"] == 5
    assert (tmp_path / "model.keras").is_file() and (tmp_path / "masks.npz").is_file()
    assert not (tmp_path / "weights.npz").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_a_report_that_says_completed_means_every_export_is_on_disk(tmp_path, monkeypatch):
    order = []
    for name in ("export_masks", "export_weights", "export_model", "write_json"):
        real = getattr(reports, name)
        monkeypatch.setattr(reports, name, lambda *a, _real=real, _name=name: (order.append(_name), _real(*a))[1])
    result = run(compose_cfg(BASE), run_dir=str(tmp_path))
    assert result["status"] == "completed"
    assert order == ["export_masks", "export_weights", "export_model", "write_json"]


def test_a_checkpoint_that_cannot_be_written_ends_in_one_line_and_a_failed_report(tmp_path, monkeypatch):
    def full(self, *args, **kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, "ckpt-3_temp/part-00000-of-00001.data-00000-of-00001; "
                                                           "No space left on device\n\t[[{{node SaveV2}}]]")

    monkeypatch.setattr(tf.train.CheckpointManager, "save", full)
    with pytest.raises(WriteError) as caught:
        run(compose_cfg(BASE), run_dir=str(tmp_path))
    message = (f"could not write the checkpoint of step 3 in {tmp_path}/checkpoints: "
               "ckpt-3_temp/part-00000-of-00001.data-00000-of-00001; No space left on device")
    assert str(caught.value) == message
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "failed" and report["error"] == f"WriteError: {message}" and report["steps"] == 3
