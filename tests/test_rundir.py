"""The run directory is a contract (issue 11): each finding as a hostile user would hit it, on ``data=digits``.

One small run (2 epochs of 21 steps, a checkpoint every 21 steps, 90 % random
sparsity) is trained once per module and copied for each test; refusals are
asserted by their exact text, and "nothing changed" by comparing every byte
in the run directory.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from hydra import compose, initialize_config_dir

from tests.conftest import CONFIGS, REPO
from tests.inprocess import run_trainer
from trainer.checkpoint import CheckpointError
from trainer.config import register
from trainer.masks import FreezeConfigError, MaskRegistry
from trainer.pretrained import load_initial_weights
from trainer.resume import ResumeError, resolve_resume
from trainer.run import run
from trainer.rundir import RunDirError, RunLock, config_changes

register()

BASE = ["trainer.epochs=2", "trainer.checkpoint_every_n_steps=21", "trainer.keep_checkpoints=5",
        "trainer.deterministic=true", "freeze=random_90", "export.keras=false", "log.summary_every_n_steps=50"]


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def env():
    # PYTHONPATH: a subprocess started outside the repository imports this checkout, not an installed copy.
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)


def error_line(proc):
    """The one ``Error: <type>: <message>`` line a refused CLI run prints (a ``Hint:`` line follows it)."""
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


def snapshot(directory):
    """Every file under ``directory`` (hidden ones, .hydra/ and the log included) with its bytes."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished CLI run (2 epochs, checkpoints at steps 21 and 42) to copy, run in this process."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    proc = run_trainer([f"hydra.run.dir={run_dir}", *BASE])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture
def run_copy(trained, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(trained, target)
    return target


def report_of(run_dir):
    return json.loads((run_dir / "report.json").read_text())


# ------------------------------------------------------------------ finding 1 and 6: the checkpoint index
@pytest.mark.parametrize("damage", ["truncated", "empty", "missing"])
def test_damaged_index_is_rebuilt_from_the_ckpt_files(run_copy, damage):
    index = run_copy / "checkpoints" / "checkpoint"
    if damage == "truncated":
        index.write_bytes(index.read_bytes()[:17])
    elif damage == "empty":
        index.write_bytes(b"")
    else:
        index.unlink()
    report = run(compose_cfg([*BASE, f"resume={run_copy}", "trainer.epochs=3"]), run_dir=str(run_copy))
    assert report["segments"][-1]["start_step"] == 42  # continued, not retrained from step 0
    assert report["steps"] == 63 and len(report["history"]) == 3
    assert tf.train.latest_checkpoint(str(run_copy / "checkpoints")).endswith("ckpt-63")
    assert {f"ckpt-{s}.index" for s in (21, 42, 63)} <= set(os.listdir(run_copy / "checkpoints"))


def test_resume_that_restores_nothing_is_an_error(run_copy):
    for name in os.listdir(run_copy / "checkpoints"):
        if name.startswith("ckpt-") and ".data" in name:
            (run_copy / "checkpoints" / name).write_bytes(b"cut")
    before = snapshot(run_copy)
    with pytest.raises(CheckpointError) as info:
        run(compose_cfg([*BASE, f"resume={run_copy}"]), run_dir=str(run_copy))
    assert str(info.value).startswith(f"no readable checkpoint in {run_copy}/checkpoints: {run_copy}/checkpoints/ckpt-42 (")
    assert snapshot(run_copy) == before


def test_crafted_index_never_reaches_outside_checkpoints(run_copy, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    for name in ("ckpt-1.index", "ckpt-1.data-00000-of-00001"):
        (victim / name).write_bytes(b"precious")
    (run_copy / "checkpoints" / "checkpoint").write_text(
        f'model_checkpoint_path: "{victim}/ckpt-1"\nall_model_checkpoint_paths: "{victim}/ckpt-1"\n'
        'all_model_checkpoint_paths: "ckpt-21"\nall_model_checkpoint_paths: "ckpt-42"\n')
    report = run(compose_cfg([*BASE, f"resume={run_copy}", "trainer.epochs=4", "trainer.keep_checkpoints=1"]),
                 run_dir=str(run_copy))
    assert report["segments"][-1]["start_step"] == 42
    assert sorted(os.listdir(victim)) == ["ckpt-1.data-00000-of-00001", "ckpt-1.index"]
    assert (victim / "ckpt-1.index").read_bytes() == b"precious"
    assert str(victim) not in (run_copy / "checkpoints" / "checkpoint").read_text()


# ------------------------------------------------------------------ finding 2: one process per run directory
@pytest.mark.slow
def test_second_process_is_refused_and_a_dead_holder_is_stale(run_copy):
    holder = subprocess.Popen([sys.executable, "-m", "trainer", f"resume={run_copy}", *BASE, "trainer.epochs=5000",
                               "trainer.checkpoint_every_n_steps=1000000"], cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run_copy / "run.lock").exists() or not (run_copy / "run.lock").read_text().strip():
            assert time.time() < deadline and holder.poll() is None
            time.sleep(0.05)
        # Stopped, the holder is still alive and keeps its flock, but leaves the CPUs to the two refused runs.
        os.kill(holder.pid, signal.SIGSTOP)
        refusal = (f"Error: RunDirError: run directory {run_copy} is in use by process {holder.pid} (lock {run_copy}/run.lock); "
                   "wait for it to end, or start this run in another hydra.run.dir")
        # The refused runs are python -m trainer in this process (tests/inprocess.py), a process other than the
        # holder: its flock refuses them as it refuses any other process (two process starts less).
        fresh = run_trainer([f"hydra.run.dir={run_copy}", *BASE])
        again = run_trainer([f"resume={run_copy}", *BASE, "trainer.epochs=5000"])
        for proc in (fresh, again):
            assert proc.returncode == 2, proc.stderr[-2000:]
            assert error_line(proc) == refusal
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()
    assert (run_copy / "run.lock").read_text().strip() == str(holder.pid)  # left by the killed holder
    report = run(compose_cfg([*BASE, f"resume={run_copy}", "trainer.epochs=3"]), run_dir=str(run_copy))
    assert report["status"] == "completed"
    assert not (run_copy / "run.lock").exists()  # released at the end


def test_lock_names_the_holder_and_is_released():
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        with RunLock(directory):
            with pytest.raises(RunDirError) as info:
                RunLock(directory).acquire()
            assert str(info.value) == (f"run directory {directory} is in use by process {os.getpid()} (lock "
                                       f"{directory}/run.lock); wait for it to end, or start this run in another "
                                       "hydra.run.dir")
        assert os.listdir(directory) == []
        RunLock(directory).acquire().release()


def test_fresh_run_where_checkpoints_exist_is_refused(run_copy):
    before = snapshot(run_copy)
    with pytest.raises(RunDirError) as info:
        run(compose_cfg(BASE), run_dir=str(run_copy))
    assert str(info.value) == (f"{run_copy} holds the checkpoints of an earlier run: continue it with "
                               f"resume={run_copy}, or start a new run in another hydra.run.dir")
    assert snapshot(run_copy) == before


# ------------------------------------------------------------------ finding 3 and 5: a changed config on resume
def test_changed_config_on_resume_is_refused_listing_each_key_and_nothing_is_written(run_copy):
    before = snapshot(run_copy)
    proc = run_trainer([f"resume={run_copy}", *BASE, "freeze.rules.sparse.elements.random=0.5",
                        "freeze.rules.sparse.value=current", "seed=3", "trainer.batch_size=30", "trainer.epochs=3"])
    assert proc.returncode == 2
    assert error_line(proc) == (
        f"Error: RunDirError: resume={run_copy} was trained with another config (freeze.rules.sparse.elements.random: 0.9 -> 0.5; "
        "freeze.rules.sparse.elements.seed: 0 -> 3; freeze.rules.sparse.value: \"zero\" -> \"current\"; seed: 0 -> 3; "
        "trainer.batch_size: 60 -> 30); start a new run without resume= (or in another hydra.run.dir), or continue "
        "with the changed values by adding 'resume_allow_changes=[freeze.rules.sparse.elements.random,"
        "freeze.rules.sparse.elements.seed,freeze.rules.sparse.value,seed,trainer.batch_size]'")
    assert "Traceback" not in proc.stderr and "unrestored" not in proc.stderr
    assert snapshot(run_copy) == before  # .hydra/, the log, freeze_plan.json, report.json: all as they were


def test_shorter_run_is_refused(run_copy):
    with pytest.raises(RunDirError, match=r"\(trainer.epochs: 2 -> 1\)"):
        run(compose_cfg([*BASE, f"resume={run_copy}", "trainer.epochs=1"]), run_dir=str(run_copy))


@pytest.mark.parametrize("old, new, changes", [
    ({"trainer.epochs": 2, "trainer.max_steps": None}, {"trainer.epochs": 5, "trainer.max_steps": None}, []),
    ({"trainer.max_steps": 10}, {"trainer.max_steps": None}, []),
    ({"trainer.max_steps": None}, {"trainer.max_steps": 10}, [("trainer.max_steps", None, 10)]),
    ({"trainer.epochs": 2, "optimizer.schedule": "cosine"}, {"trainer.epochs": 5, "optimizer.schedule": "cosine"},
     [("trainer.epochs", 2, 5)]),  # the cosine decay length follows the run length
    ({"trainer.deterministic": True}, {"trainer.deterministic": 1}, [("trainer.deterministic", True, 1)]),
    ({"optimizer.learning_rate": 0.001}, {"optimizer.learning_rate": 0.001}, []),
    ({"seed": 0}, {}, [("seed", 0, "(absent)")]),
])
def test_which_changes_count(old, new, changes):
    assert config_changes(old, new) == changes


def test_allowed_change_is_recorded_in_the_report(run_copy):
    cfg = compose_cfg([*BASE, f"resume={run_copy}", "trainer.epochs=3", "trainer.batch_size=30",
                       "resume_allow_changes=[trainer.batch_size]"])
    report = run(cfg, run_dir=str(run_copy))
    assert report["config_changes"] == [{"key": "trainer.batch_size", "old": 60, "new": 30}]
    assert report["segments"][-1]["config_changes"] == report["config_changes"]


def test_resume_true_takes_only_a_run_with_this_config(tmp_path, trained):
    runs = tmp_path / "outputs" / "default"
    shutil.copytree(trained, runs / "2026-01-01_00-00-00")
    other = runs / "2026-01-02_00-00-00"  # newer, another seed
    run(compose_cfg([*BASE, "seed=1", "trainer.max_steps=21"]), run_dir=str(other))
    argv = ["resume=true", *BASE, "trainer.epochs=3"]
    assert resolve_resume(argv, str(tmp_path / "outputs"))[-1] == f"hydra.run.dir={runs / '2026-01-01_00-00-00'}"
    with pytest.raises(ResumeError) as info:
        resolve_resume(["resume=true", *BASE, "seed=7"], str(tmp_path / "outputs"))
    assert str(info.value) == (
        f"resume=true: none of the 2 runs under '{tmp_path}/outputs/default' has this config (the newest, "
        f"{other}, differs in freeze.rules.sparse.elements.seed: 1 -> 7; seed: 1 -> 7); pass resume=<run dir> to "
        "continue a run with its own config, or drop resume= to start a new run")
    proc = run_trainer(["resume=true", *BASE, "seed=7"], cwd=tmp_path)
    assert proc.returncode == 2  # the CLI searches ./outputs: the same line with relative paths
    assert error_line(proc) == "Error: ResumeError: " + str(info.value).replace(f"{tmp_path}/", "")


# ------------------------------------------------------------------ finding 4: the report across resumes
def test_report_keeps_history_and_sums_wall_time_across_resumes(run_copy):
    first = report_of(run_copy)
    report = run(compose_cfg([*BASE, f"resume={run_copy}", "trainer.epochs=3"]), run_dir=str(run_copy))
    assert len(report["history"]) == 3 and report["history"][:2] == first["history"]
    assert [(s["start_step"], s["end_step"], s["status"]) for s in report["segments"]] == [(0, 42, "completed"),
                                                                                           (42, 63, "completed")]
    assert report["wall_seconds"] == pytest.approx(sum(s["wall_seconds"] for s in report["segments"]))
    assert report["early_stopping"] is None or 1 <= report["early_stopping"]["epoch"] <= 3
    again = run(compose_cfg([*BASE, f"resume={run_copy}", "trainer.epochs=3"]), run_dir=str(run_copy))  # completed
    assert again["history"] == report["history"] and len(again["segments"]) == 3
    assert again["segments"][-1]["examples"] == 0
    assert again["examples_per_second"] == pytest.approx(report["examples_per_second"])
    assert again["examples_per_second"] < 1e6


# ------------------------------------------------------------------ finding 7: signals while finishing
FINISH_SIGNAL = """
import os, signal, sys
import trainer.report as reports
original = reports.export_masks
def export_masks(registry, path):
    os.kill(os.getpid(), signal.{name})
    original(registry, path)
reports.export_masks = export_masks
import runpy
sys.argv = ["trainer"] + sys.argv[1:]
runpy.run_module("trainer", run_name="__main__", alter_sys=True)  # as python -m trainer
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_signal_while_writing_the_exports_loses_nothing(tmp_path, name):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", FINISH_SIGNAL.format(name=name), f"hydra.run.dir={run_dir}",
                           "trainer.max_steps=5", "export.keras=true"], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for name_ in ("report.json", "masks.npz", "weights.npz", "model.keras"):
        assert (run_dir / name_).is_file(), name_
    assert report_of(run_dir)["status"] == "completed"
    assert not [n for n in os.listdir(run_dir) if n.startswith(".tmp-")]


def test_leftover_temporaries_are_removed_on_resume(run_copy):
    (run_copy / ".tmp-99999-report.json").write_text("{")
    (run_copy / "checkpoints" / "ckpt-63_temp").mkdir()
    run(compose_cfg([*BASE, f"resume={run_copy}"]), run_dir=str(run_copy))
    assert not (run_copy / ".tmp-99999-report.json").exists()
    assert not (run_copy / "checkpoints" / "ckpt-63_temp").exists()


# ------------------------------------------------------------------ finding 8: an existing directory of other files
def test_run_dir_with_other_files_is_refused(tmp_path):
    for name in ("report.json", "weights.npz", "notes.txt"):
        (tmp_path / name).write_text(f"my own {name}")
    before = snapshot(tmp_path)
    proc = run_trainer([f"hydra.run.dir={tmp_path}", "trainer.max_steps=2"])
    assert proc.returncode == 2
    assert error_line(proc) == (
        f"Error: RunDirError: {tmp_path} already holds report.json, weights.npz: a new run would replace them; "
        "pick a new or empty hydra.run.dir")
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ finding 9 and 10: init_from and user files
def small_model():
    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")], name="net")


def weights_file(tmp_path, **arrays):
    path = tmp_path / "weights.npz"
    np.savez(path, **arrays)
    return str(path)


def test_init_from_values_are_checked(tmp_path):
    model = small_model()
    kernel, bias = model.get_layer("fc").kernel.path, model.get_layer("fc").bias.path
    good = {kernel: np.ones((4, 3), np.float32), bias: np.zeros(3, np.float32)}
    cases = [
        ({kernel: np.full((4, 3), np.nan, np.float32), bias: good[bias]},
         ": 'net/fc/kernel' holds 12 non-finite values (NaN or infinity); only finite values can initialize a variable"),
        ({kernel: np.full((4, 3), 1e39), bias: good[bias]},
         ": 'net/fc/kernel' holds 1e+39, beyond float32's largest value 3.40282e+38"),
        ({kernel: np.full((4, 3), "a"), bias: good[bias]},
         ": 'net/fc/kernel' holds dtype <U1, expected numbers for a float32 variable"),
        ({kernel: np.ones((4, 3), bool), bias: good[bias]},
         ": 'net/fc/kernel' holds booleans, expected numbers for a float32 variable"),
        ({kernel: good[kernel]},
         " has no array for 1 of the model's variables (net/fc/bias); they would keep their random initialization: "
         "exclude them with model.init_exclude, or set model.init_from_partial=true"),
    ]
    for arrays, message in cases:
        path = weights_file(tmp_path, **arrays)
        before = model.get_layer("fc").kernel.numpy().copy()
        with pytest.raises(ValueError) as info:
            load_initial_weights(model, path, [])
        assert str(info.value) == f"model.init_from {path!r}{message}"
        np.testing.assert_array_equal(model.get_layer("fc").kernel.numpy(), before)  # nothing assigned
    path = weights_file(tmp_path, **{kernel: good[kernel]})
    assert load_initial_weights(model, path, [], partial=True) == [kernel]
    np.testing.assert_array_equal(model.get_layer("fc").kernel.numpy(), good[kernel])


def test_init_from_partial_is_a_config_key(tmp_path):
    first = run(compose_cfg(["trainer.max_steps=2", "export.keras=false"]), run_dir=str(tmp_path / "a"))
    assert first["status"] == "completed"
    with np.load(tmp_path / "a" / "weights.npz") as data:
        np.savez(tmp_path / "part.npz", **{k: data[k] for k in data.files if not k.endswith("bias")})
    common = ["trainer.max_steps=2", "export.keras=false", f"model.init_from={tmp_path / 'part.npz'}"]
    with pytest.raises(ValueError, match="or set model.init_from_partial=true$"):
        run(compose_cfg(common), run_dir=str(tmp_path / "b"))
    assert not (tmp_path / "b").exists() or os.listdir(tmp_path / "b") == []
    assert run(compose_cfg([*common, "model.init_from_partial=true"]), run_dir=str(tmp_path / "c"))["steps"] == 2


def giant_npy(path):
    """A .npy whose header claims 10**15 float32 elements, followed by 8 bytes."""
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**15,)}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 8)


def test_user_file_errors_are_ours(tmp_path):
    model = small_model()
    np.save(tmp_path / "one.npy", np.ones((4, 3), np.float32))
    with pytest.raises(ValueError) as info:
        load_initial_weights(model, str(tmp_path / "one.npy"), [])
    assert str(info.value) == (f"model.init_from {str(tmp_path / 'one.npy')!r} is a .npy file (one array); expected a "
                               ".npz archive saved with np.savez(path, **arrays_by_variable_path) (a run's weights.npz)")
    with pytest.raises(FreezeConfigError) as info:
        MaskRegistry(model).freeze("fc/kernel", elements={"magnitude": 0.5, "weights_file": str(tmp_path / "one.npy")})
    assert str(info.value).endswith(f"elements.weights_file {str(tmp_path / 'one.npy')!r} is a .npy file (one array); "
                                    "expected a .npz archive saved with np.savez(path, **arrays_by_variable_path) "
                                    "(a run's weights.npz)")
    giant_npy(tmp_path / "giant.npy")
    with pytest.raises(FreezeConfigError) as info:
        MaskRegistry(model).freeze("fc/kernel", elements={"mask_file": str(tmp_path / "giant.npy")})
    assert str(info.value).endswith(f"elements.mask_file {str(tmp_path / 'giant.npy')!r}: its header claims a "
                                    "(1000000000000000,) float32 array (4,000,000,000,000,000 bytes) but the file has "
                                    "136 bytes")
    (tmp_path / "notes.txt").write_text("hello, not an array\n")
    os.symlink(tmp_path / "notes.txt", tmp_path / "link.npy")
    os.symlink("/dev/zero", tmp_path / "zero.npy")
    for name, message in [("link.npy", "is a file starting with b'hello,'; expected a .npy file saved with "
                                        "np.save(path, bool_array)"),
                          ("zero.npy", "is not a regular file (a FIFO, device or socket); pass a .npy file saved with "
                                       "np.save(path, bool_array)")]:
        with pytest.raises(FreezeConfigError) as info:
            MaskRegistry(model).freeze("fc/kernel", elements={"mask_file": str(tmp_path / name)})
        assert str(info.value).endswith(f"elements.mask_file {str(tmp_path / name)!r} {message}")
        assert "pickle" not in str(info.value)
    with pytest.raises(FreezeConfigError) as info:
        MaskRegistry(model).freeze("fc/kernel", elements={"indices": [2**64]})
    assert str(info.value).endswith("elements.indices 18446744073709551616 is out of range: an index must lie in "
                                    "[0, size - 1] of its variable")


def test_fifo_mask_file_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "mask.npy"
    os.mkfifo(fifo)
    outcome = []

    def attempt():
        try:
            MaskRegistry(small_model()).freeze("fc/kernel", elements={"mask_file": str(fifo)})
        except FreezeConfigError as err:
            outcome.append(str(err))

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=20)
    if thread.is_alive():  # blocked in open(): unblock it so the test process can end
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=5)
    assert outcome and outcome[0].endswith(f"elements.mask_file {str(fifo)!r} is not a regular file (a FIFO, device "
                                           "or socket); pass a .npy file saved with np.save(path, bool_array)")


def test_pathological_regex_selector_is_fast():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="f" * 40)], name="n" * 40)
    start = time.perf_counter()
    with pytest.raises(FreezeConfigError, match="matches no variable"):
        MaskRegistry(model).freeze("re:(.*)*(.*)*(.*)*(.*)*(.*)*z")
    assert time.perf_counter() - start < 2.0
