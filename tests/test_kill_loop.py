"""Four SIGKILLs at random points of checkpointing and finishing, then ``resume=``: bit-exact, nothing lost.

One uninterrupted run is the reference (run in the test's process, as is the last resume). The
same run is then started and killed again and again: twice while a
checkpoint is being written (the moment a new file appears in
``checkpoints/``, plus a random 0-20 ms), then twice while the run
finishes (after its last checkpoint: test evaluation, report, exports, the
process's exit; a random 0-0.5 s). A process may also complete before the
kill lands; later ones then resume a completed run, which re-saves its final
checkpoint and rewrites its exports: more places to be killed. After every
kill, each file the run directory held before is still there and whole. At
the end a plain ``resume=`` finishes the run, and its final checkpoint, its
weights and its epoch history equal the reference's bit for bit.

What it still covers, after it was cut from twenty kills at random phases of
a 5-epoch run (three minutes), then from eight, to keep the suite within its
time (each kill is one more process start, about 8 s of CPU): two kills in
each phase (a checkpoint every 6 of 63 steps: the checkpointing kills both
fall while training goes on), kills of resumed runs and of resumed completed
runs, no file lost or half-written after any kill, and the bit-exact final
state with its AdamW slots, mask state and rule state (what the plain case of
``test_resume.py::test_sigkill_then_resume_is_bit_exact`` checked before it was
folded in here).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import REPO
from tests.inprocess import run_trainer

COMMON = ["trainer.deterministic=true", "trainer.epochs=3", "trainer.checkpoint_every_n_steps=6",
          "trainer.keep_checkpoints=3", "optimizer=adamw", "freeze=random_90", "export.keras=true",
          "log.summary_every_n_steps=10", "log.progress=lines"]
PHASES = ["checkpointing"] * 2 + ["finishing"] * 2  # the kills, in order (training must go on for the first ones)
KILLS = len(PHASES)
FINAL = "ckpt-63"  # 3 epochs of 21 steps


def env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)


def start(args):
    return subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def ckpt_names(run_dir):
    directory = os.path.join(run_dir, "checkpoints")
    return set(os.listdir(directory)) if os.path.isdir(directory) else set()


def log_text(run_dir):
    path = os.path.join(run_dir, "__main__.log")
    return open(path).read() if os.path.exists(path) else ""


def wait_and_kill(proc, run_dir, phase, rng, log_before):
    """Kills ``proc`` at a random moment of ``phase``; returns True if it was killed, False if it ended first."""
    names = ckpt_names(run_dir)
    while proc.poll() is None:
        if phase == "checkpointing" and ckpt_names(run_dir) - names:
            time.sleep(rng.uniform(0, 0.02))
            break
        if phase == "finishing" and f"{FINAL}\n" in log_text(run_dir)[log_before:]:
            time.sleep(rng.uniform(0, 0.5))
            break
        time.sleep(0.002)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return True


def files_of(run_dir):
    """Every file of the run directory except the rotating checkpoints, the lock and temporaries."""
    out = set()
    for root, dirs, files in os.walk(run_dir):
        dirs[:] = [d for d in dirs if d != "checkpoints" and not d.startswith(".tmp-")]
        out |= {os.path.relpath(os.path.join(root, f), run_dir) for f in files
                if f != "run.lock" and not f.startswith(".tmp-")}
    return out


def check_whole(run_dir):
    """The outputs that exist read back whole (an atomic write never leaves half a file)."""
    if os.path.exists(os.path.join(run_dir, "report.json")):
        json.loads(open(os.path.join(run_dir, "report.json")).read())
    for name in ("weights.npz", "masks.npz"):
        if os.path.exists(os.path.join(run_dir, name)):
            with np.load(os.path.join(run_dir, name)) as data:
                [data[k] for k in data.files]


def final_state(run_dir):
    path = tf.train.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    reader = tf.train.load_checkpoint(path)
    return os.path.basename(path), {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
                                    if "save_counter" not in k and not k.startswith(("_CHECKPOINTABLE", "run_record"))}


@pytest.mark.slow
def test_kills_while_checkpointing_and_finishing_then_resume_is_bit_exact_and_loses_nothing(tmp_path):
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    rng = random.Random(11)
    proc = start([f"hydra.run.dir={killed}", *COMMON])
    while not ckpt_names(killed) and proc.poll() is None:  # a run killed before its first checkpoint cannot resume
        time.sleep(0.01)
    kills, processes, phases = 0, 1, []
    log_before, before = 0, set()
    while True:
        phase = PHASES[kills]
        was_killed = wait_and_kill(proc, killed, phase, rng, log_before)
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read()[-3000:]
        assert before <= files_of(killed), sorted(before - files_of(killed))  # no file of earlier segments lost
        check_whole(killed)
        kills += was_killed
        phases.append(phase if was_killed else "completed")
        if kills >= KILLS:
            break
        before, log_before = files_of(killed), len(log_text(killed))
        proc = start([f"resume={killed}", *COMMON])
        processes += 1
        assert processes < 3 * KILLS, phases
    assert kills == KILLS and phases.count("checkpointing") == phases.count("finishing") == 2, phases
    print("kill points:", {p: phases.count(p) for p in set(phases)}, "processes:", processes)

    before = files_of(killed)
    resumed = run_trainer([f"resume={killed}", *COMMON])  # python -m trainer, in this process
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = run_trainer([f"hydra.run.dir={straight}", *COMMON])
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert before <= files_of(killed)
    assert not [n for n in os.listdir(killed) if n.startswith(".tmp-")] and not os.path.exists(
        os.path.join(killed, "run.lock"))
    name_a, a = final_state(straight)
    name_b, b = final_state(killed)
    assert name_a == name_b == FINAL and sorted(a) == sorted(b)
    assert sum(k.startswith("optimizer/_variables/") for k in a) >= 12  # AdamW slots of 6 variables
    assert any(k.startswith(("registry/masks/", "registry/indices/")) for k in a)  # dense or compact state
    assert "registry/rule_state/.ATTRIBUTES/py_state" in a
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    with np.load(os.path.join(straight, "weights.npz")) as wa, np.load(os.path.join(killed, "weights.npz")) as wb:
        assert sorted(wa.files) == sorted(wb.files)
        for key in wa.files:
            assert wa[key].tobytes() == wb[key].tobytes(), key
    report_a = json.loads(open(os.path.join(straight, "report.json")).read())
    report_b = json.loads(open(os.path.join(killed, "report.json")).read())
    assert report_b["status"] == "completed" and report_b["frozen_exact"] is True
    assert report_b["history"] == report_a["history"]
    assert len(report_b["segments"]) >= 2 and report_b["segments"][-1]["end_step"] == 63
    assert report_b["segments"][0]["status"] == "killed" and report_b["segments"][-1]["status"] == "completed"
