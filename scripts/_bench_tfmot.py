"""The ``tfmot`` case of ``scripts/bench.py``: ``prune_low_magnitude`` under tf-keras, in a worker process.

tfmot needs legacy Keras (``tf-keras``, ``TF_USE_LEGACY_KERAS=1``), which cannot share a process with
Keras 3, so :class:`TfmotCase` starts this file as a worker that stays alive and is driven round by round
(JSON commands on its stdin, ``BENCH {json}`` answers on its stdout), in the same interleaved order as the
other cases. A library of ``scripts/bench.py``, not a command.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Dict, Optional

from _bench_cases import LR, SPARSITY, Case, load_arrays, make_train_dataset
from _measure import Clock, MemoryProbe, fit_clock, grown, timed_round

WORKER_PREFIX = "BENCH "


def tfmot_available() -> Optional[str]:
    """``None`` when ``tensorflow_model_optimization`` and ``tf_keras`` can be imported, else the reason."""
    missing = [m for m in ("tensorflow_model_optimization", "tf_keras") if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(missing)} (pip install -e '.[tfmot]')" if missing else None


class TfmotCase(Case):
    """``prune_low_magnitude`` + ``ConstantSparsity(0.9)`` under tf-keras, in a persistent worker process."""

    def __init__(self, *args, data: str, limit: Optional[int], hidden, input_mode: str = "shuffled", **kwargs):
        super().__init__(*args, **kwargs)
        self.data, self.limit, self.hidden, self.input_mode = data, limit, hidden, input_mode
        self.proc = None
        self.stderr = tempfile.TemporaryFile(mode="w+")

    def _call(self, message: Dict[str, Any]) -> Dict[str, Any]:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.stderr.seek(0)
                tail = self.stderr.read()[-3000:]
                raise RuntimeError(f"the tfmot worker exited (code {self.proc.poll()}); its stderr ends:\n{tail}")
            if line.startswith(WORKER_PREFIX):
                reply = json.loads(line[len(WORKER_PREFIX):])
                if "error" in reply:
                    raise RuntimeError(f"the tfmot worker failed: {reply['error']}")
                return reply

    def setup(self, warmup_steps: int, mem: MemoryProbe) -> None:
        env = dict(os.environ, TF_USE_LEGACY_KERAS="1")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        reply = self._call({"cmd": "setup", "data": self.data, "limit": self.limit, "hidden": list(self.hidden),
                            "k": self.k, "jit": self.jit, "batch": self.batch, "warmup": warmup_steps,
                            "input": self.input_mode})
        self.jit = reply["jit_compile"]
        self.info.update({k: reply[k] for k in ("first_execution_s", "first_step_s", "setup_mib", "versions")})
        if reply.get("jit_error"):
            self.info["jit_error"] = reply["jit_error"]

    def run_round(self, steps: int, mem: MemoryProbe) -> Dict[str, float]:
        result = self._call({"cmd": "round", "steps": steps})
        self.rounds.append(result)
        return result

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


# ----------------------------------------------------------------- the worker process
def worker() -> None:
    """The worker's loop: reads JSON commands on stdin, answers ``BENCH {json}`` lines on stdout."""
    os.environ["TF_USE_LEGACY_KERAS"] = "1"

    def reply(obj):
        sys.stdout.write(WORKER_PREFIX + json.dumps(obj) + "\n")
        sys.stdout.flush()

    state: Dict[str, Any] = {}
    mem = MemoryProbe()
    for line in sys.stdin:
        message = json.loads(line)
        try:
            if message["cmd"] == "exit":
                return
            if message["cmd"] == "setup":
                reply(_setup(state, message, mem))
            elif message["cmd"] == "round":
                steps = state["k"] + int(message["steps"])
                reply(timed_round(state["clock"], mem, lambda n: _fit(state, n), steps))
        except Exception as err:  # noqa: BLE001 - reported to the parent, which raises
            reply({"error": f"{type(err).__name__}: {err}"})


def _build(state, message, jit):
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot

    tfk = tf.keras
    tfk.utils.set_random_seed(0)
    layers = [tfk.layers.Flatten(input_shape=state["input_shape"], name="flatten")]
    layers += [tfk.layers.Dense(int(w), activation="relu", name=f"fc{i + 1}") for i, w in enumerate(message["hidden"])]
    layers.append(tfk.layers.Dense(state["classes"], name="out"))
    schedule = tfmot.sparsity.keras.ConstantSparsity(SPARSITY, begin_step=0)
    model = tfmot.sparsity.keras.prune_low_magnitude(tfk.Sequential(layers, name="lenet"), pruning_schedule=schedule)
    model.compile(optimizer=tfk.optimizers.Adam(LR), loss=tfk.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=jit, steps_per_execution=state["k"])
    return model


def _setup(state, message, mem):
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot

    x, y, classes = load_arrays(message["data"], message.get("limit"))
    state.update(input_shape=x.shape[1:], classes=classes, k=int(message["k"]))
    state["ds"] = make_train_dataset(x, y, int(message["batch"]), message.get("input", "shuffled")).repeat()
    clock = Clock()
    state["clock"] = clock
    state["callback"] = fit_clock(tf.keras.callbacks.Callback, clock, state["k"])
    state["update"] = tfmot.sparsity.keras.UpdatePruningStep()
    jit, jit_error = message["jit"], None
    gc.collect()
    before = mem.rss()
    for attempt in ([jit, False] if jit else [False]):
        state["model"] = _build(state, message, attempt)
        try:
            clock.begin()
            _fit(state, int(message["warmup"]))
            jit = attempt
            break
        except Exception as err:  # noqa: BLE001 - XLA may refuse tfmot's ops: fall back and say so
            if not attempt:
                raise
            jit_error = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            gc.collect()
            before = mem.rss()
    import tf_keras

    return {
        "jit_compile": bool(jit), "jit_error": jit_error, **clock.first_step(), "setup_mib": grown(mem.rss(), before),
        "versions": {"tensorflow_model_optimization": tfmot.__version__, "tf_keras": tf_keras.__version__},
    }


def _fit(state, steps):
    state["model"].fit(state["ds"], epochs=1, steps_per_epoch=steps, verbose=0,
                       callbacks=[state["update"], state["callback"]])


if __name__ == "__main__":
    worker()
