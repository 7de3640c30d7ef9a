"""Issue 26, item 4: a run removes only the temporaries this project writes, never another run or a user's file."""

import logging

from trainer.rundir import clean_leftovers


def test_a_user_file_named_like_a_temporary_is_kept(tmp_path):
    (tmp_path / ".tmp-notes").write_text("keep")
    (tmp_path / ".tmp-12-notes.txt").write_text("keep")
    (tmp_path / ".tmp-99999-report.json").write_text("{")
    (tmp_path / ".tmp-99999-saved_model.old").mkdir()
    assert clean_leftovers(str(tmp_path)) == [".tmp-99999-report.json", ".tmp-99999-saved_model.old"]
    assert (tmp_path / ".tmp-notes").read_text() == "keep"
    assert (tmp_path / ".tmp-12-notes.txt").read_text() == "keep"


def test_checkpoint_temporaries_are_removed_by_their_exact_names(tmp_path):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    (ckpt / "ckpt-63_temp").mkdir()
    (ckpt / "ckpt-63_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"x")
    (ckpt / "checkpoint.tmp0a1b2c").write_text("model_checkpoint_path")
    (ckpt / ".tmp-7-checkpoint").write_text("x")
    (ckpt / "ckpt-63_temp_notes").write_text("keep")
    (ckpt / "checkpoint.tmp-mine").write_text("keep")
    assert clean_leftovers(str(tmp_path)) == ["checkpoints/.tmp-7-checkpoint", "checkpoints/checkpoint.tmp0a1b2c",
                                              "checkpoints/ckpt-63_temp"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint.tmp-mine", "ckpt-63_temp_notes"]


def test_a_directory_that_holds_a_run_of_its_own_is_never_removed(tmp_path, caplog):
    nested = tmp_path / ".tmp-5-weights.npz"
    (nested / "deeper").mkdir(parents=True)
    (nested / "deeper" / "report.json").write_text("{}")
    ckpt_run = tmp_path / "checkpoints" / "ckpt-3_temp"
    ckpt_run.mkdir(parents=True)
    (ckpt_run / "fingerprint.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="trainer"):
        assert clean_leftovers(str(tmp_path)) == []
    assert (nested / "deeper" / "report.json").is_file() and (ckpt_run / "fingerprint.json").is_file()
    assert [r.getMessage() for r in caplog.records] == [
        "kept .tmp-5-weights.npz: it is named like a temporary of this project but holds a run of its own "
        "(deeper/report.json)",
        "kept checkpoints/ckpt-3_temp: it is named like a temporary of this project but holds a run of its own "
        "(fingerprint.json)"]


def test_what_is_removed_is_said_in_one_line(tmp_path, caplog):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / ".tmp-4-config.yaml").write_text("a: 1")
    (tmp_path / ".tmp-4-masks.npz").write_bytes(b"")
    with caplog.at_level(logging.INFO, logger="trainer"):
        clean_leftovers(str(tmp_path))
    assert [r.getMessage() for r in caplog.records] == [
        "removed leftovers of an interrupted write: .tmp-4-masks.npz, .hydra/.tmp-4-config.yaml"]
