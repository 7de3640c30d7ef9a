"""Issue 26, item 7: resume_allow_changes works for each key it accepts, and refuses the others up front.

A refused key is named with the reason before the run directory is read (here even its checkpoints are
unreadable), and every byte of the run directory stays as it was (each file's hash and mtime compared).
"""

import os

import pytest
from hydra import compose, initialize_config_dir

from tests.conftest import CONFIGS
from tests.test_resume_data import tree_hashes
from trainer.config import register
from trainer.resume import check_allowed
from trainer.run import run
from trainer.rundir import CHANGEABLE_KEYS, RunDirError, change_allowed

register()

BASE = ["trainer.max_steps=4", "trainer.epochs=10", "trainer.checkpoint_every_n_steps=2", "freeze=random_90",
        "export.keras=false", "log.summary_every_n_steps=50"]
CAN = ("trainer.epochs, trainer.max_steps, trainer.batch_size, trainer.steps_per_execution, trainer.jit_compile, "
       "trainer.deterministic, trainer.nan_policy ('*' allows all of them); for any other change start a new run "
       "without resume=")


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("changes") / "run"
    run(compose_cfg(BASE), run_dir=str(run_dir))
    return run_dir


@pytest.mark.parametrize("overrides, allowed, reason", [
    (["seed=3"], "seed", "seed (the digits split, the data order and the rules' random draws come from it, and the "
                         "checkpoint holds the masks drawn with the old seed)"),
    (["freeze=none"], "freeze", "freeze (the checkpoint holds the old rules' masks, pinned values and compact slots)"),
    (["optimizer=sgd"], "optimizer", "optimizer (the checkpoint holds the old optimizer's slots, step and learning "
                                     "rate)"),
    (["model.hidden=[32,16]"], "model", "model (the checkpoint holds the old model's variables, by path and shape)"),
    (["data.validation_size=100"], "data.validation_size",
     "data.validation_size (the checkpoint's position in the data (batches drawn) and the data digest belong to the "
     "old data)"),
    (["trainer.mixed_precision=mixed_bfloat16"], "trainer", "trainer (it changes the optimizer (a loss-scale wrapper) "
                                                            "whose state the checkpoint holds)"),
    ([], "bogus", "bogus (it is not a key of the run's fingerprint)"),
])
def test_a_key_that_cannot_change_is_refused_before_anything_is_read(trained, overrides, allowed, reason):
    before = tree_hashes(trained)
    with pytest.raises(RunDirError) as caught:
        run(compose_cfg([*BASE, *overrides, f"resume={trained}", f"resume_allow_changes=[{allowed}]"]),
            run_dir=str(trained))
    assert str(caught.value) == (f"resume_allow_changes names keys that cannot change on resume: {reason}. "
                                 f"The keys that can change are {CAN}")
    assert tree_hashes(trained) == before


def test_the_refusal_comes_before_the_checkpoints_are_read(tmp_path):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    (ckpt / "ckpt-2.index").write_bytes(b"cut")
    with pytest.raises(RunDirError, match=r"^resume_allow_changes names keys that cannot change on resume: seed "):
        run(compose_cfg([*BASE, "seed=1", f"resume={tmp_path}", "resume_allow_changes=[seed]"]), run_dir=str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoints"] and os.listdir(ckpt) == ["ckpt-2.index"]


def test_star_allows_only_the_keys_that_can_change():
    assert check_allowed(["*", "trainer.nan_policy"]) == ["*", "trainer.nan_policy"]
    assert all(change_allowed(key, ["*"]) for key in CHANGEABLE_KEYS)
    assert not any(change_allowed(key, ["*"]) for key in ("seed", "freeze.rules.sparse.elements.seed",
                                                           "optimizer.name", "model.name", "data.digest.sha256"))


def test_each_key_that_can_change_does_change_on_resume(trained, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    # (jit_compile and deterministic are left out: XLA's compile time, and a process-wide switch)
    changed = ["trainer.max_steps=6", "trainer.batch_size=30", "trainer.steps_per_execution=2",
               "trainer.nan_policy=skip_step"]
    report = run(compose_cfg([*BASE, *changed, f"resume={copy}", "resume_allow_changes=[*]"]), run_dir=str(copy))
    assert report["status"] == "completed" and report["steps"] == 6 and report["frozen_exact"]
    assert {c["key"]: c["new"] for c in report["config_changes"]} == {
        "trainer.batch_size": 30, "trainer.steps_per_execution": 2, "trainer.nan_policy": "skip_step"}


def test_a_sound_checkpoint_index_is_left_as_tensorflow_wrote_it(trained, tmp_path):
    import shutil

    from trainer.checkpoint import write_index

    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    index = copy / "checkpoints" / "checkpoint"
    written = index.read_bytes()
    assert b"all_model_checkpoint_timestamps" in written
    write_index(str(copy / "checkpoints"), 4)
    assert index.read_bytes() == written
    write_index(str(copy / "checkpoints"), 2)  # an older latest: rewritten
    assert index.read_text() == 'model_checkpoint_path: "ckpt-2"\nall_model_checkpoint_paths: "ckpt-2"\n'
