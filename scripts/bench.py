"""Throughput benchmark: the masked trainer against Keras ``fit`` and the usual masking workarounds.

Every case trains an MLP on MNIST with Adam (lr 1e-3) and sparse categorical
cross-entropy on logits, at batch 128, from one shared ``tf.data`` pipeline
(``trainer.data.make_dataset``, shuffled, ``drop_remainder=True``). The cases
run in ONE process, interleaved (``A B C ... A B C ...``) for ``--rounds``
rounds, so that machine noise falls on every case alike; each reported number
is the median over rounds. The ``tfmot`` case needs legacy Keras
(``tf-keras``), so it runs in a worker subprocess that stays alive and is
driven round by round in the same interleaved order.

Cases (LeNet-300-100, a seeded random 90 % of every kernel pinned to zero in
the masked cases; ``K`` = ``--steps-per-execution``, XLA on unless stated):

- ``keras_fit``: Keras ``model.fit``, dense, ``jit_compile=True``, ``steps_per_execution=K``.
- ``keras_fit_default``: Keras ``model.fit`` with its defaults: ``jit_compile="auto"`` (which
  Keras resolves to no XLA on a CPU-only TensorFlow) and ``steps_per_execution=1``.
- ``trainer_dense``: :class:`trainer.Trainer`, no rules.
- ``trainer_masked``: :class:`trainer.Trainer`, the mask (``value="zero"``).
- ``trainer_{dense,masked}_unchecked``: the same with ``nan_policy="unchecked"``: the step
  without its non-finite guard (the guard's cost, ``guarded_vs_unchecked``).
- ``trainer_masked_cond_guard``: the masked trainer with ``guard="cond"`` (the update in a
  ``tf.cond``) instead of the select guard that ``guard="auto"`` takes for compact updates
  (``select_vs_cond_guard``).
- ``keras_constraint``: ``model.fit`` with a ``kernel_constraint`` that multiplies by the mask.
- ``keras_masked_layer``: ``model.fit`` with a ``Dense`` subclass that multiplies its kernel
  by the mask (a non-trainable variable) in ``call``.
- ``tfmot``: ``tfmot.sparsity.keras.prune_low_magnitude`` with ``ConstantSparsity(0.9)``
  under ``tf-keras`` (only when ``tensorflow-model-optimization`` and ``tf-keras`` are installed).
- ``matmuls_only``: the step's matmuls alone (linear layers, kernel gradients, SGD) under XLA:
  the MFU ceiling at the model's shapes.
- ``trainer_{dense,masked}_k{1,10,100}_{xla,noxla}``: the trainer at other settings (the sweep).
- ``wide_*``: a 784-4096-4096-10 MLP, where the matmuls dominate.
- ``matmul``: a 2048x2048 float32 ``tf.matmul``, the machine's rate for MFU.

What each number measures:

- examples/s, ms/step: a round calls ``fit`` for ``K + steps`` steps; the clock
  runs from the end of the first execution (``K`` steps, untimed: it starts the
  input pipeline) to the end of the last, read by a callback after each
  execution, so ``fit``'s own set-up is not counted but everything the outer
  loop does between executions is. ``cpu_ms_per_step`` is the process's CPU
  time (all threads) over the same window: less sensitive to other processes
  on the machine than wall time, but it counts the thread pools' spinning.
- MFU: model FLOPs per step (forward + backward of the dense layers, counted
  as 3 x 2 x batch x the kernel sizes: 204 MFLOP for LeNet-300-100 at batch
  128; masked cases count the same dense FLOPs) times steps/s, over the
  median matmul rate of the same run.
- first_step_s: from the first ``fit`` call on a freshly built model to the
  end of its first step: tracing, XLA compilation, the input pipeline's start
  and one step. With ``K > 1`` the first execution holds ``K`` steps; this is
  that time less ``K - 1`` steady steps (``first_execution_s`` is the raw time).
- memory: resident set size of the process (``/proc/self/status``).
  ``setup_mib`` is the growth of RSS while the case is built and its warm-up
  runs (model, optimizer slots, registry, compiled functions, the shuffle
  buffer of a new input iterator); ``peak_step_mib`` is the largest rise of
  the peak RSS over the RSS just before a timed round (``VmHWM`` reset through
  ``/proc/self/clear_refs``): the working memory of steps. Both are coarse
  (the allocator keeps freed memory), and the ``tfmot`` numbers come from its
  own process.

Ratios are throughput ratios, higher is better for the trainer, each the
median over rounds of the ratio within a round:
``masked_vs_unmasked`` = trainer_masked / trainer_dense,
``trainer_vs_keras_fit`` = trainer_masked / keras_fit (dense, same K and XLA),
``trainer_vs_constraint`` = trainer_masked / keras_constraint,
``trainer_vs_tfmot`` = trainer_masked / tfmot (``null`` when it did not run).

Usage::

    python scripts/bench.py               # the full run (about 10 minutes on 2 cores), writes bench.json
    python scripts/bench.py --scale --only matmul   # only the 100.7M-parameter scale cases (scripts/bench_scale.py)
    python scripts/bench.py --quick --data digits --out /tmp/b.json   # a smoke run
"""

from __future__ import annotations

import abc
import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 128
LR = 1e-3
SPARSITY = 0.9
MATMUL_N = 2048
WORKER_PREFIX = "BENCH "


# ------------------------------------------------------------------ memory
def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class MemoryProbe:
    """Resident-set-size readings of this process (Linux ``/proc``; ``None`` elsewhere).

    :meth:`reset_peak` resets the kernel's peak-RSS mark (``VmHWM``) to the
    current RSS by writing ``5`` to ``/proc/self/clear_refs``; :meth:`peak`
    reads it. Where the reset is refused, the peak is the process's lifetime
    peak and :attr:`resettable` is False.
    """

    def __init__(self):
        self.resettable = self._clear()

    @staticmethod
    def _clear() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def rss(self) -> Optional[float]:
        """Current RSS in MiB."""
        kib = _status_kib("VmRSS")
        return None if kib is None else kib / 1024.0

    def peak(self) -> Optional[float]:
        """Peak RSS in MiB since the last :meth:`reset_peak` (or process start)."""
        kib = _status_kib("VmHWM")
        return None if kib is None else kib / 1024.0

    def reset_peak(self) -> None:
        """Resets the peak mark to the current RSS where the kernel allows it."""
        if self.resettable:
            self._clear()


def _delta(after: Optional[float], before: Optional[float]) -> Optional[float]:
    return None if after is None or before is None else max(after - before, 0.0)


# ------------------------------------------------------------------- data
def load_arrays(data: str, limit: Optional[int] = None):
    """Training images and labels of ``data`` (``"mnist"`` or ``"digits"``), the first ``limit`` of them."""
    from trainer.data import load_digits, load_mnist  # the worker's TF_USE_LEGACY_KERAS is set at its spawn

    splits = load_mnist() if data == "mnist" else load_digits()
    x, y = splits.x_train, splits.y_train
    if limit:
        x, y = x[:limit], y[:limit]
    return x, y, splits.num_classes


CACHED_BATCHES = 50


def make_train_dataset(x, y, batch: int, input_mode: str = "shuffled"):
    """The shared input pipeline: ``make_dataset(..., shuffle=True, seed=0, drop_remainder=True)``.

    ``input_mode="cached"`` keeps only its first 50 batches, cached after
    batching, so that a step draws a ready batch from memory: the cost of
    the input pipeline is then (almost) taken out of every case.
    """
    from trainer.data import make_dataset

    ds = make_dataset(x, y, batch, shuffle=True, seed=0, drop_remainder=True)
    return ds.take(CACHED_BATCHES).cache() if input_mode == "cached" else ds


def model_flops_per_step(kernel_shapes: Sequence[Sequence[int]], batch: int) -> float:
    """Forward + backward FLOPs of the dense layers: 3 x 2 x batch x sum of kernel sizes."""
    return 6.0 * batch * float(sum(int(np.prod(s)) for s in kernel_shapes))


# ------------------------------------------------------------------ timing
class _Clock:
    """Timestamps after each execution, and the first one after the ``fit`` call."""

    def __init__(self):
        self.start = 0.0
        self.marks: List[tuple] = []  # (wall time, steps done in this fit call, process CPU time)

    def begin(self) -> None:
        """Starts a ``fit`` call: its time origin, no marks yet."""
        self.start, self.marks = time.perf_counter(), []

    def mark(self, steps: int) -> None:
        """Records the end of an execution, ``steps`` steps into the ``fit`` call."""
        self.marks.append((time.perf_counter(), steps, time.process_time()))

    def steady(self) -> tuple:
        """(seconds, steps) from the end of the first execution to the end of the last."""
        (t0, s0, _), (t1, s1, _) = self.marks[0], self.marks[-1]
        return t1 - t0, s1 - s0

    def cpu(self) -> float:
        """Process CPU seconds (every thread) over the same window as :meth:`steady`."""
        return self.marks[-1][2] - self.marks[0][2]

    def first(self) -> tuple:
        """(seconds from the fit call to the first execution's end, steps in it)."""
        t, s, _ = self.marks[0]
        return t - self.start, s


class Case(abc.ABC):
    """One benchmarked configuration: built once, warmed up, then timed round by round.

    Subclasses implement ``setup`` and ``run_round`` (see :class:`StepCase`
    for cases timed by training steps).
    """

    kind = "train"

    def __init__(self, name: str, description: str, *, model: str, k: int, jit: Any, flops: float, batch: int):
        self.name, self.description, self.model_name = name, description, model
        self.k, self.jit, self.flops, self.batch = k, jit, flops, batch
        self.clock = _Clock()
        self.rounds: List[Dict[str, float]] = []
        self.info: Dict[str, Any] = {}

    def settings(self) -> str:
        """``"K=<k>, XLA"`` or ``"K=<k>, no XLA"``."""
        jit = {True: "XLA", False: "no XLA"}.get(self.jit, f"jit={self.jit}")
        return f"K={self.k}, {jit}"


    @abc.abstractmethod
    def setup(self, warmup_steps: int, mem: "MemoryProbe") -> None:
        """Builds the case and warms it up (compilation included)."""

    @abc.abstractmethod
    def run_round(self, steps: int, mem: "MemoryProbe") -> Dict[str, float]:
        """Times one round; returns ``{"seconds", "steps", ...}``."""

    def close(self) -> None:
        """Releases what the case holds."""


# --------------------------------------------------------------- Keras 3 cases
def _keras_case_classes():
    import keras
    import tensorflow as tf

    class KerasClock(keras.callbacks.Callback):
        def __init__(self, clock: _Clock, k: int):
            super().__init__()
            self.clock, self.k, self.calls = clock, k, 0

        def on_train_batch_end(self, batch, logs=None):
            self.calls += 1
            self.clock.mark(self.calls * self.k)

    class MaskConstraint(keras.constraints.Constraint):
        """Multiplies the kernel by a fixed 0/1 mask after every optimizer update."""

        def __init__(self, mask: np.ndarray):
            self.mask = tf.constant(mask.astype(np.float32))

        def __call__(self, w):
            return w * self.mask

    class MaskedDense(keras.layers.Dense):
        """A ``Dense`` layer whose kernel is multiplied by a non-trainable 0/1 mask in ``call``."""

        def __init__(self, units, *, mask: np.ndarray, **kwargs):
            super().__init__(units, **kwargs)
            self._mask_value = mask.astype(np.float32)

        def build(self, input_shape):
            super().build(input_shape)
            self.mask = self.add_weight(shape=self._mask_value.shape, name="mask", trainable=False,
                                        initializer=keras.initializers.Constant(self._mask_value))

        def call(self, inputs):
            y = keras.ops.matmul(inputs, self.kernel * self.mask)
            if self.use_bias:
                y = y + self.bias
            return self.activation(y) if self.activation is not None else y

    return KerasClock, MaskConstraint, MaskedDense


def _loss():
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _random_masks(model, seed: int = 0) -> Dict[str, np.ndarray]:
    """Per kernel path, the trainable-mask of ``registry.freeze("*/kernel", random=0.9, seed=seed)``."""
    from trainer import MaskRegistry

    registry = MaskRegistry(model)
    registry.freeze("*/kernel", elements={"random": SPARSITY, "seed": seed}, value="zero")
    return {p: m for p, m in registry.trainable_masks().items() if p.endswith("/kernel")}


class StepCase(Case):
    """A case timed by training steps: subclasses implement :meth:`_build` and :meth:`_fit`."""

    def setup(self, warmup_steps: int, mem: MemoryProbe) -> None:
        """Builds the case and runs its first ``fit`` call (compilation + warm-up)."""
        gc.collect()
        before = mem.rss()
        self._build()
        self.clock.begin()
        self._fit(warmup_steps)
        seconds, steps = self.clock.first()
        steady_s, steady_steps = self.clock.steady()
        per_step = steady_s / steady_steps if steady_steps else 0.0
        self.info["first_execution_s"] = seconds
        self.info["first_step_s"] = max(seconds - (steps - 1) * per_step, 0.0)
        self.info["setup_mib"] = _delta(mem.rss(), before)

    def run_round(self, steps: int, mem: MemoryProbe) -> Dict[str, float]:
        """Runs ``K + steps`` steps; times the last ``steps``; returns the round's numbers."""
        gc.collect()
        before = mem.rss()
        mem.reset_peak()
        self.clock.begin()
        self._fit(self.k + steps)
        seconds, timed = self.clock.steady()
        if timed != steps:
            raise RuntimeError(f"{self.name}: timed {timed} steps, expected {steps}")
        result = {"seconds": seconds, "steps": timed, "cpu_seconds": self.clock.cpu(),
                  "peak_step_mib": _delta(mem.peak(), before)}
        self.rounds.append(result)
        return result

    @abc.abstractmethod
    def _build(self) -> None:
        """Builds the case's model, optimizer and input."""

    @abc.abstractmethod
    def _fit(self, steps: int) -> None:
        """Runs ``steps`` more steps, marking the clock after each execution."""


class KerasFitCase(StepCase):
    """``model.fit`` of a Keras 3 model; ``variant`` is ``dense``, ``constraint`` or ``masked_layer``."""

    def __init__(self, *args, variant: str, hidden, input_shape, classes, ds, **kwargs):
        super().__init__(*args, **kwargs)
        self.variant, self.hidden, self.input_shape, self.classes, self.ds = variant, hidden, input_shape, classes, ds

    def _build(self) -> None:
        import keras

        from trainer.models import build_model

        keras.utils.set_random_seed(0)
        base = build_model("mlp", self.input_shape, self.classes, hidden=list(self.hidden))
        KerasClock, MaskConstraint, MaskedDense = _keras_case_classes()
        if self.variant == "dense":
            model = base
        else:
            masks = _random_masks(base)
            layers = [keras.Input(self.input_shape), keras.layers.Flatten(name="flatten")]
            dense = [layer for layer in base.layers if isinstance(layer, keras.layers.Dense)]
            for layer in dense:
                mask = masks[layer.kernel.path]
                kwargs = dict(activation=layer.activation, name=layer.name)
                if self.variant == "constraint":
                    layers.append(keras.layers.Dense(layer.units, kernel_constraint=MaskConstraint(mask), **kwargs))
                else:
                    layers.append(MaskedDense(layer.units, mask=mask, **kwargs))
            model = keras.Sequential(layers, name=base.name)
            for new, old in zip([lay for lay in model.layers if isinstance(lay, keras.layers.Dense)], dense):
                new.kernel.assign(old.kernel.numpy() * masks[old.kernel.path])
                new.bias.assign(old.bias.numpy())
        model.compile(optimizer=keras.optimizers.Adam(LR), loss=_loss(), metrics=["accuracy"],
                      jit_compile=self.jit, steps_per_execution=self.k)
        self.model = model
        self.callback = KerasClock(self.clock, self.k)
        if self.jit == "auto":  # Keras resolves "auto" to no XLA on a CPU-only TensorFlow
            self.info["jit_compile_requested"] = "auto"
            self.jit = bool(model.jit_compile)

    def _fit(self, steps: int) -> None:
        self.callback.calls = 0
        self.model.fit(self.ds, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[self.callback])


class TrainerCase(StepCase):
    """:class:`trainer.Trainer` with (``masked``) or without freeze rules."""

    def __init__(self, *args, masked: bool, hidden, input_shape, classes, ds, defaults: bool = False,
                 nan_policy: str = "stop", guard: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.masked, self.hidden, self.input_shape, self.classes, self.ds = masked, hidden, input_shape, classes, ds
        self.defaults = defaults  # Trainer(...) without steps_per_execution / jit_compile: what a user gets
        self.nan_policy = nan_policy  # "unchecked": the guard ablation (Trainer's public option)
        self.guard = guard  # "cond" / "select": which guard (Trainer's public option)

    def _build(self) -> None:
        import keras

        from trainer import MaskRegistry, Trainer
        from trainer.callbacks import Callback
        from trainer.models import build_model

        keras.utils.set_random_seed(0)
        model = build_model("mlp", self.input_shape, self.classes, hidden=list(self.hidden))
        registry = MaskRegistry(model)
        if self.masked:
            registry.freeze("*/kernel", elements={"random": SPARSITY, "seed": 0}, value="zero")
        clock = self.clock

        class TrainerClock(Callback):
            def on_train_begin(self, state):
                self.base = state.step

            def on_execution_end(self, state, step_before, step, logs):
                clock.mark(step - self.base)

        self.callback = TrainerClock()
        self.registry = registry
        speed = {} if self.defaults else dict(steps_per_execution=self.k, jit_compile=bool(self.jit))
        self.trainer = Trainer(model, keras.optimizers.Adam(LR), _loss(), metrics=["accuracy"],
                               registry=registry, nan_policy=self.nan_policy, guard=self.guard, **speed)
        if (self.trainer.steps_per_execution, self.trainer.jit_compile) != (self.k, bool(self.jit)):
            raise RuntimeError(f"{self.name}: the trainer runs K={self.trainer.steps_per_execution}, "
                               f"jit_compile={self.trainer.jit_compile}, not the case's {self.settings()}")

    def _fit(self, steps: int) -> None:
        # One endless "epoch" (the trainer repeats the dataset itself), as Keras fit gets
        # with steps_per_epoch on a repeated dataset: no execution is cut at an epoch end.
        self.trainer.fit(self.ds, epochs=1, max_steps=self.trainer.step + steps,
                         steps_per_epoch=10 ** 12, callbacks=[self.callback])


class MatmulCase(Case):
    """The machine's float32 matmul rate: ``reps`` 2048x2048 ``tf.matmul`` per round."""

    kind = "matmul"

    def __init__(self, reps: int):
        super().__init__("matmul", f"{MATMUL_N}x{MATMUL_N} float32 tf.matmul", model="-", k=1, jit=False,
                         flops=2.0 * MATMUL_N ** 3, batch=0)
        self.reps = reps

    def settings(self) -> str:
        """How many matmuls a round times."""
        return f"{self.reps} per round"

    def setup(self, warmup_steps: int, mem: MemoryProbe) -> None:
        import tensorflow as tf

        rng = np.random.default_rng(0)
        self.a = tf.constant(rng.standard_normal((MATMUL_N, MATMUL_N), dtype=np.float32))
        self.b = tf.constant(rng.standard_normal((MATMUL_N, MATMUL_N), dtype=np.float32))
        self.fn = tf.function(tf.matmul)
        for _ in range(2):
            self.fn(self.a, self.b).numpy()

    def run_round(self, steps: int, mem: MemoryProbe) -> Dict[str, float]:
        start = time.perf_counter()
        out = None
        for _ in range(self.reps):
            out = self.fn(self.a, self.b)
        float(out[0, 0])
        seconds = time.perf_counter() - start
        result = {"seconds": seconds, "steps": self.reps, "flops_per_sec": self.reps * self.flops / seconds}
        self.rounds.append(result)
        return result


class MatmulStepCase(StepCase):
    """The ceiling at the model's shapes: only the dense layers' matmuls of a training step, under XLA.

    Linear layers (no bias, no activation), the gradient of ``sum(logits)``
    with respect to the kernels (no input gradient, as in the real step) and
    an SGD update so nothing is optimized away; ``K`` steps per call in a
    ``tf.range`` loop, like the trainer. Its MFU is what the matmuls alone
    reach at these shapes on this machine.
    """

    def __init__(self, *args, kernels, **kwargs):
        super().__init__(*args, **kwargs)
        self.kernels = kernels

    def _build(self) -> None:
        import tensorflow as tf

        rng = np.random.default_rng(0)
        self.x = tf.constant(rng.standard_normal((self.batch, self.kernels[0][0]), dtype=np.float32))
        ws = [tf.Variable(rng.standard_normal(s, dtype=np.float32) * 0.01) for s in self.kernels]
        self.ws = ws
        x = self.x

        @tf.function(jit_compile=True)
        def step():
            with tf.GradientTape() as tape:
                h = x
                for w in ws:
                    h = tf.matmul(h, w)
                loss = tf.reduce_sum(h)
            for w, g in zip(ws, tape.gradient(loss, ws)):
                w.assign_sub(1e-9 * g)

        @tf.function
        def run(k):
            for _ in tf.range(k):
                step()

        self.fn = run

    def _fit(self, steps: int) -> None:
        import tensorflow as tf

        done = 0
        while done < steps:
            n = min(self.k, steps - done)
            self.fn(tf.constant(n))
            float(self.ws[-1][0, 0])
            done += n
            self.clock.mark(done)


# ----------------------------------------------------------------- tfmot worker
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
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--tfmot-worker"], env=env,
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


def tfmot_worker() -> None:
    """The ``--tfmot-worker`` process: reads JSON commands on stdin, answers ``BENCH {json}`` lines."""
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
                reply(_tfmot_setup(state, message, mem))
            elif message["cmd"] == "round":
                reply(_tfmot_round(state, int(message["steps"]), mem))
        except Exception as err:  # noqa: BLE001 - reported to the parent, which raises
            reply({"error": f"{type(err).__name__}: {err}"})


def _tfmot_build(state, message, jit):
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


def _tfmot_setup(state, message, mem):
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot

    x, y, classes = load_arrays(message["data"], message.get("limit"))
    state.update(input_shape=x.shape[1:], classes=classes, k=int(message["k"]))
    state["ds"] = make_train_dataset(x, y, int(message["batch"]), message.get("input", "shuffled")).repeat()
    clock = _Clock()
    state["clock"] = clock
    k = state["k"]

    class WorkerClock(tf.keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def on_train_batch_end(self, batch, logs=None):
            self.calls += 1
            clock.mark(self.calls * k)

    state["callback"] = WorkerClock()
    state["update"] = tfmot.sparsity.keras.UpdatePruningStep()
    jit, jit_error = message["jit"], None
    gc.collect()
    before = mem.rss()
    for attempt in ([jit, False] if jit else [False]):
        state["model"] = _tfmot_build(state, message, attempt)
        try:
            clock.begin()
            _tfmot_fit(state, int(message["warmup"]))
            jit = attempt
            break
        except Exception as err:  # noqa: BLE001 - XLA may refuse tfmot's ops: fall back and say so
            if not attempt:
                raise
            jit_error = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            gc.collect()
            before = mem.rss()
    seconds, steps = clock.first()
    steady_s, steady_steps = clock.steady()
    per_step = steady_s / steady_steps if steady_steps else 0.0
    import tf_keras

    return {
        "jit_compile": bool(jit), "jit_error": jit_error, "first_execution_s": seconds,
        "first_step_s": max(seconds - (steps - 1) * per_step, 0.0), "setup_mib": _delta(mem.rss(), before),
        "versions": {"tensorflow_model_optimization": tfmot.__version__, "tf_keras": tf_keras.__version__},
    }


def _tfmot_fit(state, steps):
    state["callback"].calls = 0
    state["model"].fit(state["ds"], epochs=1, steps_per_epoch=steps, verbose=0,
                       callbacks=[state["update"], state["callback"]])


def _tfmot_round(state, steps, mem):
    gc.collect()
    before = mem.rss()
    mem.reset_peak()
    state["clock"].begin()
    _tfmot_fit(state, state["k"] + steps)
    seconds, timed = state["clock"].steady()
    return {"seconds": seconds, "steps": timed, "cpu_seconds": state["clock"].cpu(),
            "peak_step_mib": _delta(mem.peak(), before)}


# ------------------------------------------------------------------ registry memory
def registry_memory(hidden, input_shape, classes) -> Dict[str, Any]:
    """Registry bytes against the model's own, per kernel: dense ``zero`` / ``current`` pins and compact updates.

    ``registry_bytes`` is :meth:`MaskRegistry.memory_bytes` (per-element state on the host and the device:
    the 1-byte trainable-mask of a dense update, or the int32 index and the value of each trainable element of
    a compact one; no pinned copies). ``bound_bytes`` is the target: 1.2 bytes per element of a partly frozen
    variable in dense mode, 8 bytes per trainable element in compact mode.
    """
    import keras

    from trainer import MaskRegistry
    from trainer.models import build_model

    out: Dict[str, Any] = {}
    for label, value, update in (("zero", "zero", "dense"), ("current", "current", "dense"),
                                 ("compact", "current", "compact")):
        keras.utils.set_random_seed(0)
        model = build_model("mlp", input_shape, classes, hidden=list(hidden))
        registry = MaskRegistry(model, update=update)
        registry.freeze("*/kernel", elements={"random": SPARSITY, "seed": 0}, value=value)
        variables = {v.path: v for v in model.variables}
        rows, totals = {}, {"model_bytes": 0, "registry_bytes": 0, "bound_bytes": 0}
        for path, nbytes in registry.memory_bytes().items():
            var = variables[path]
            size = int(np.prod(var.shape))
            trainable = int(registry.trainable_mask(path).sum())
            bound = 8 * trainable if update == "compact" else int(1.2 * size)
            row = {"elements": size, "trainable": trainable, "model_bytes": size * np.dtype(var.dtype).itemsize,
                   "registry_bytes": int(nbytes), "bytes_per_element": nbytes / size,
                   "bytes_per_trainable": nbytes / max(trainable, 1), "bound_bytes": bound,
                   "within_bound": int(nbytes) <= bound}
            rows[path] = row
            for key in totals:
                totals[key] += row[key]
        out[label] = {"variables": rows, **totals, "within_bound": all(r["within_bound"] for r in rows.values())}
    return out


# -------------------------------------------------------------------- running
def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _machine() -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import keras
    import tensorflow as tf

    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__}


def build_cases(args, x, y, classes) -> List[Case]:
    """The case list, in the order each round runs them."""
    import tensorflow as tf

    input_shape = tuple(x.shape[1:])
    ds = make_train_dataset(x, y, args.batch, args.input)
    if int(ds.cardinality().numpy()) < 1:
        raise SystemExit(f"--batch {args.batch} leaves no full batch in {len(x)} examples")
    repeated = ds.repeat()
    k = args.steps_per_execution
    cases: List[Case] = [MatmulCase(args.matmul_reps)]

    def kernels(hidden):
        dims = [int(np.prod(input_shape))] + [int(h) for h in hidden] + [classes]
        return [(a, b) for a, b in zip(dims[:-1], dims[1:])]

    def add(model, hidden, steps_k, specs):
        flops = model_flops_per_step(kernels(hidden), args.batch)
        prefix = "" if model == "lenet" else "wide_"
        for name, kind, opts in specs:
            opts = dict(opts)
            desc = opts.pop("desc")
            common = dict(model=model, flops=flops, batch=args.batch, hidden=hidden, **opts)
            if kind == "keras":
                cases.append(KerasFitCase(prefix + name, desc, input_shape=input_shape, classes=classes,
                                          ds=repeated, **common))
            elif kind == "trainer":
                cases.append(TrainerCase(prefix + name, desc, input_shape=input_shape, classes=classes,
                                         ds=ds, **common))
            elif kind == "tfmot":
                cases.append(TfmotCase(prefix + name, desc, data=args.data, limit=args.limit,
                                       input_mode=args.input, **common))
            elif kind == "matmuls":
                common.pop("hidden")
                cases.append(MatmulStepCase(prefix + name, desc, kernels=kernels(hidden), **common))

    lenet = list(args.hidden)
    specs = [
        ("keras_fit", "keras", dict(desc="Keras model.fit, dense", variant="dense", k=k, jit=True)),
        ("keras_fit_default", "keras", dict(desc="Keras model.fit, dense, its defaults (jit_compile='auto')",
                                            variant="dense", k=1, jit="auto")),
        ("trainer_dense", "trainer", dict(desc="trainer, no rules", masked=False, k=k, jit=True)),
        ("trainer_masked", "trainer", dict(desc="trainer, 90% random zero mask", masked=True, k=k, jit=True)),
        ("trainer_dense_unchecked", "trainer", dict(desc="trainer, no rules, nan_policy='unchecked' (no guard)",
                                                    masked=False, k=k, jit=True, nan_policy="unchecked")),
        ("trainer_masked_unchecked", "trainer", dict(desc="trainer, mask, nan_policy='unchecked' (no guard)",
                                                     masked=True, k=k, jit=True, nan_policy="unchecked")),
        ("trainer_masked_cond_guard", "trainer", dict(desc="trainer, mask, guard='cond' (update in a tf.cond)",
                                                      masked=True, k=k, jit=True, guard="cond")),
        ("keras_constraint", "keras", dict(desc="model.fit, kernel_constraint *mask", variant="constraint", k=k,
                                           jit=True)),
        ("keras_masked_layer", "keras", dict(desc="model.fit, Dense subclass kernel*mask", variant="masked_layer",
                                             k=k, jit=True)),
        ("matmuls_only", "matmuls", dict(desc="the step's matmuls alone (linear layers, SGD)", k=k, jit=True)),
    ]
    defaults = trainer_defaults()
    specs.append(("trainer_defaults", "trainer", dict(desc="trainer, mask, Trainer(...) at its defaults",
                                                      masked=True, defaults=True, **defaults)))
    if args.quick:  # the smoke run keeps the cases that the ratios need
        specs = [spec for spec in specs if spec[0] not in ("keras_fit_default", "trainer_defaults",
                                                           "trainer_dense_unchecked", "trainer_masked_unchecked",
                                                           "trainer_masked_cond_guard")]
    reason = tfmot_available() if not args.no_tfmot else "--no-tfmot"
    if reason is None:
        specs.append(("tfmot", "tfmot", dict(desc="tfmot prune_low_magnitude, ConstantSparsity(0.9)", k=k,
                                             jit=True)))
    args.tfmot_skipped = reason
    if not args.no_sweep:
        for sweep_k in args.sweep_k:
            for jit in (True, False):
                for masked in (False, True):
                    if sweep_k == k and jit:
                        continue  # the headline cases above
                    name = f"trainer_{'masked' if masked else 'dense'}_k{sweep_k}_{'xla' if jit else 'noxla'}"
                    desc = f"trainer, {'mask' if masked else 'no rules'}"
                    specs.append((name, "trainer", dict(desc=desc, masked=masked, k=sweep_k, jit=jit)))
    add("lenet", lenet, k, specs)
    if not args.no_wide:
        wk = args.wide_k
        wide = [args.wide_width, args.wide_width]
        wide_specs = [
            ("keras_fit", "keras", dict(desc="Keras model.fit, dense", variant="dense", k=wk, jit=True)),
            ("trainer_dense", "trainer", dict(desc="trainer, no rules", masked=False, k=wk, jit=True)),
            ("trainer_masked", "trainer", dict(desc="trainer, 90% random zero mask", masked=True, k=wk, jit=True)),
            ("trainer_masked_noxla", "trainer", dict(desc="trainer, mask", masked=True, k=wk, jit=False)),
            ("trainer_dense_noxla", "trainer", dict(desc="trainer, no rules", masked=False, k=wk, jit=False)),
            ("matmuls_only", "matmuls", dict(desc="the step's matmuls alone (linear layers, SGD)", k=wk, jit=True)),
        ]
        add("wide", wide, wk, wide_specs)
    del tf
    if args.only:
        unknown = sorted(set(args.only) - {c.name for c in cases})
        if unknown:
            raise SystemExit(f"--only: unknown case(s) {unknown}; cases: {[c.name for c in cases]}")
        cases = [c for c in cases if c.kind == "matmul" or c.name in args.only]
    return cases


def trainer_defaults() -> Dict[str, Any]:
    """``{"k": ..., "jit": ...}``: the ``steps_per_execution`` and ``jit_compile`` that ``Trainer(...)`` defaults to."""
    import inspect

    from trainer import Trainer

    params = inspect.signature(Trainer).parameters
    return {"k": params["steps_per_execution"].default, "jit": bool(params["jit_compile"].default)}


def _steps_for(case: Case, args) -> int:
    steps = args.wide_steps if case.model_name == "wide" else args.steps
    return max(case.k, int(math.ceil(steps / case.k)) * case.k)


def _ratio(cases: Dict[str, Case], num: str, den: str) -> Optional[float]:
    """Median over rounds of the throughput ratio num / den within a round."""
    if num not in cases or den not in cases:
        return None
    a, b = cases[num].rounds, cases[den].rounds
    ratios = [(rb["seconds"] / rb["steps"]) / (ra["seconds"] / ra["steps"]) for ra, rb in zip(a, b)]
    return _median(ratios)


def summarize(cases: List[Case], args, machine, loads) -> Dict[str, Any]:
    """The bench.json object."""
    matmul = next(c for c in cases if c.kind == "matmul")
    rate = _median([r["flops_per_sec"] for r in matmul.rounds])
    by_name = {c.name: c for c in cases if c.kind == "train"}
    out_cases, mfu = {}, {}
    for case in by_name.values():
        ms = _median([1000.0 * r["seconds"] / r["steps"] for r in case.rounds])
        eps = _median([case.batch * r["steps"] / r["seconds"] for r in case.rounds])
        out_cases[case.name] = {
            "examples_per_sec": eps, "ms_per_step": ms, "first_step_s": case.info.get("first_step_s"),
            "first_execution_s": case.info.get("first_execution_s"), "model": case.model_name,
            "description": case.description, "steps_per_execution": case.k, "jit_compile": case.jit,
            "setup_mib": case.info.get("setup_mib"),
            "peak_step_mib": max((r["peak_step_mib"] for r in case.rounds if r.get("peak_step_mib") is not None),
                                 default=None),
            "round_ms_per_step": [1000.0 * r["seconds"] / r["steps"] for r in case.rounds],
            "cpu_ms_per_step": _median([1000.0 * r["cpu_seconds"] / r["steps"] for r in case.rounds]),
            "model_flops_per_step": case.flops,
            **{k: v for k, v in case.info.items() if k in ("jit_error", "versions", "jit_compile_requested")},
        }
        mfu[case.name] = (case.flops * 1000.0 / ms) / rate if ms and rate else None
    ratios = {
        "masked_vs_unmasked": _ratio(by_name, "trainer_masked", "trainer_dense"),
        "trainer_vs_keras_fit": _ratio(by_name, "trainer_masked", "keras_fit"),
        "trainer_vs_constraint": _ratio(by_name, "trainer_masked", "keras_constraint"),
        "trainer_vs_tfmot": _ratio(by_name, "trainer_masked", "tfmot"),
        "trainer_dense_vs_keras_fit": _ratio(by_name, "trainer_dense", "keras_fit"),
        # the guard's cost: the step with it over the step without (nan_policy="unchecked")
        "guarded_vs_unchecked": _ratio(by_name, "trainer_masked", "trainer_masked_unchecked"),
        "dense_guarded_vs_unchecked": _ratio(by_name, "trainer_dense", "trainer_dense_unchecked"),
        "select_vs_cond_guard": _ratio(by_name, "trainer_masked", "trainer_masked_cond_guard"),
        "trainer_vs_keras_fit_default": _ratio(by_name, "trainer_masked", "keras_fit_default"),
        "trainer_defaults_vs_keras_fit_defaults": _ratio(by_name, "trainer_defaults", "keras_fit_default"),
        "trainer_vs_masked_layer": _ratio(by_name, "trainer_masked", "keras_masked_layer"),
        "trainer_dense_k1_noxla_vs_keras_fit_default": _ratio(by_name, "trainer_dense_k1_noxla",
                                                              "keras_fit_default"),
        "wide_masked_vs_unmasked": _ratio(by_name, "wide_trainer_masked", "wide_trainer_dense"),
        "wide_trainer_vs_keras_fit": _ratio(by_name, "wide_trainer_masked", "wide_keras_fit"),
        "wide_masked_vs_unmasked_noxla": _ratio(by_name, "wide_trainer_masked_noxla", "wide_trainer_dense_noxla"),
    }
    for name, case in by_name.items():  # the sweep: each setting against the headline masked trainer
        if name.startswith("trainer_masked_k"):
            ratios[f"{name}_vs_trainer_masked"] = _ratio(by_name, name, "trainer_masked")
            dense = name.replace("masked", "dense")
            if dense in by_name:
                ratios[f"{name}_vs_{dense}"] = _ratio(by_name, name, dense)
    targets = {"masked_vs_unmasked": 0.98, "trainer_vs_keras_fit": 1.0, "trainer_vs_constraint": 1.0,
               "trainer_vs_tfmot": 1.0, "trainer_defaults_vs_keras_fit_defaults": 1.5}
    verdicts = {k: {"value": ratios[k], "target": t, "met": None if ratios[k] is None else ratios[k] >= t}
                for k, t in targets.items()}
    masked_mfu = mfu.get("trainer_masked")
    verdicts["mfu_trainer_masked"] = {"value": masked_mfu, "target": 0.5,
                                      "met": None if masked_mfu is None else masked_mfu >= 0.5}
    return {
        "cases": out_cases, "ratios": ratios, "mfu": mfu, "matmul_flops_per_sec": rate,
        "matmul_round_gflops": [r["flops_per_sec"] / 1e9 for r in matmul.rounds],
        "targets": verdicts, "machine": machine, "load_average": loads,
        "settings": {"batch": args.batch, "rounds": args.rounds, "steps": args.steps, "wide_steps": args.wide_steps,
                     "steps_per_execution": args.steps_per_execution, "wide_steps_per_execution": args.wide_k,
                     "data": args.data, "limit": args.limit, "input": args.input, "hidden": list(args.hidden),
                     "wide_width": args.wide_width, "warmup_steps": args.warmup, "optimizer": f"Adam({LR})",
                     "sparsity": SPARSITY, "tfmot_skipped": args.tfmot_skipped, "quick": args.quick,
                     "memory_peak_resettable": args.memory_resettable},
    }


def format_table(result: Dict[str, Any]) -> str:
    """A Markdown table of the cases, then the ratios."""
    lines = ["| case | settings | examples/s | ms/step | CPU ms/step | MFU | first step (s) | setup MiB "
             "| step peak MiB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    for name, c in result["cases"].items():
        jit = {True: "XLA", False: "no XLA"}.get(c["jit_compile"], f"jit={c['jit_compile']}")
        lines.append(f"| {name} | K={c['steps_per_execution']}, {jit} | {num(c['examples_per_sec'], ',.0f')} | "
                     f"{num(c['ms_per_step'], '.2f')} | {num(c['cpu_ms_per_step'], '.2f')} | "
                     f"{num(result['mfu'].get(name), '.3f')} | "
                     f"{num(c['first_step_s'], '.2f')} | {num(c['setup_mib'], '.0f')} | "
                     f"{num(c['peak_step_mib'], '.1f')} |")
    lines.append("")
    lines.append(f"matmul rate: {num(result['matmul_flops_per_sec'] and result['matmul_flops_per_sec'] / 1e9, '.1f')}"
                 f" GFLOP/s ({MATMUL_N}x{MATMUL_N} float32, median of rounds)")
    lines.append("")
    lines.append("| ratio (throughput, higher favours the trainer) | value | target |")
    lines.append("|---|---:|---:|")
    targets = result["targets"]
    for key, value in result["ratios"].items():
        target = targets.get(key, {}).get("target")
        lines.append(f"| {key} | {num(value, '.3f')} | {'>= ' + str(target) if target else ''} |")
    t = targets["mfu_trainer_masked"]
    lines.append(f"| MFU of trainer_masked | {num(t['value'], '.3f')} | >= {t['target']} |")
    return "\n".join(lines)


def format_memory(memory: Dict[str, Any]) -> str:
    """A Markdown table of the registry's memory per kernel."""
    lines = ["| case | variable | elements | model bytes | registry bytes | bytes/element | bytes/trainable | "
             "bound bytes | within bound |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for value, block in memory.items():
        for path, r in block["variables"].items():
            lines.append(f"| {value} | {path} | {r['elements']:,} | {r['model_bytes']:,} | {r['registry_bytes']:,} | "
                         f"{r['bytes_per_element']:.2f} | {r['bytes_per_trainable']:.2f} | {r['bound_bytes']:,} | "
                         f"{r['within_bound']} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options; ``--quick`` shrinks everything for a smoke run."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench.json", help="the JSON file to write (default bench.json)")
    p.add_argument("--quick", action="store_true", help="a short smoke run: 2 rounds of few steps, no sweep")
    p.add_argument("--data", choices=("mnist", "digits"), default="mnist",
                   help="mnist reads $TRAINER_DATA_DIR/mnist.npz; digits is scikit-learn's bundled 8x8 digits")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--input", choices=("shuffled", "cached"), default="shuffled",
                   help=f"shuffled: the real pipeline (default); cached: its first {CACHED_BATCHES} batches held in "
                        "memory, to price the input pipeline")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; 2 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default 400; 20 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps after compilation (default 100)")
    p.add_argument("--steps-per-execution", type=int, default=None,
                   help="K for the headline cases and every Keras fit (default 100; 10 with --quick)")
    p.add_argument("--sweep-k", type=int, nargs="*", default=None, help="the trainer sweep's K values (1 10 100)")
    p.add_argument("--no-sweep", action="store_true", help="skip the trainer K / XLA sweep")
    p.add_argument("--scale", action="store_true",
                   help="also run the 100.7M-parameter MLP cases of scripts/bench_scale.py (each in a subprocess)")
    p.add_argument("--scale-rounds", type=int, default=2, help="interleaved rounds of the scale cases (default 2)")
    p.add_argument("--scale-width", type=int, default=4096, help="the scale MLP's width (default 4096: 100.7M)")
    p.add_argument("--scale-transformer", action="store_true", help="with --scale: the 108.6M Transformer cases too")
    p.add_argument("--only", nargs="+", default=None, help="run only these cases (names as in the table)")
    p.add_argument("--no-tfmot", action="store_true", help="skip the tfmot case")
    p.add_argument("--no-wide", action="store_true", help="skip the wide MLP")
    p.add_argument("--wide-width", type=int, default=None, help="the wide MLP's hidden width (default 4096)")
    p.add_argument("--wide-steps", type=int, default=None, help="timed steps per round of the wide MLP (default 30)")
    p.add_argument("--wide-k", type=int, default=None, help="K of the wide MLP (default 10)")
    p.add_argument("--matmul-reps", type=int, default=None, help="matmuls per round (default 10)")
    p.add_argument("--hidden", type=int, nargs="+", default=[300, 100], help="the small MLP's hidden widths")
    p.add_argument("--tfmot-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    defaults = dict(rounds=(2, 5), steps=(20, 400), warmup=(10, 100), steps_per_execution=(10, 100),
                    sweep_k=([], [1, 10, 100]), wide_width=(256, 4096), wide_steps=(10, 30), wide_k=(5, 10),
                    matmul_reps=(2, 10))
    for key, (q, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, q if quick else full)
    if quick and not args.sweep_k:
        args.no_sweep = True
    return args


def main(argv=None) -> Dict[str, Any]:
    """Runs the benchmark, prints the tables and writes ``--out``; returns the JSON object."""
    args = parse_args(argv)
    if args.tfmot_worker:
        tfmot_worker()
        return {}
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, REPO)
    loads = {"start": list(os.getloadavg())}
    x, y, classes = load_arrays(args.data, args.limit)
    machine = _machine()
    mem = MemoryProbe()
    args.memory_resettable = mem.resettable
    cases = build_cases(args, x, y, classes)
    warm = {}
    try:
        for case in cases:
            steps = max(case.k, int(math.ceil(args.warmup / case.k)) * case.k) + case.k
            warm[case.name] = steps
            print(f"setting up {case.name} ({case.settings()}) ...", flush=True)
            case.setup(steps, mem)
        for r in range(args.rounds):
            for case in cases:
                result = case.run_round(_steps_for(case, args), mem)
                print(f"round {r + 1}/{args.rounds} {case.name}: "
                      f"{1000.0 * result['seconds'] / result['steps']:.2f} ms/step", flush=True)
        loads["end"] = list(os.getloadavg())
        result = summarize(cases, args, machine, loads)
        result["registry_memory"] = {
            "lenet": registry_memory(args.hidden, tuple(x.shape[1:]), classes),
        }
        if not args.no_wide:
            result["registry_memory"]["wide"] = registry_memory([args.wide_width] * 2, tuple(x.shape[1:]), classes)
        if args.scale:  # the 100.7M-parameter cases, each in its own subprocess (scripts/bench_scale.py)
            import bench_scale

            scale = bench_scale.run_all(bench_scale.parse_args(
                ["--rounds", str(args.scale_rounds), "--width", str(args.scale_width)]
                + (["--transformer"] if args.scale_transformer else [])))
            result["scale"] = scale
            result["ratios"].update(scale["ratios"])
            print(bench_scale.format_table(scale))
    finally:
        for case in cases:
            case.close()
    print()
    print(f"machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs; TF {machine['tensorflow']}, "
          f"Keras {machine['keras']}; load average at start {loads['start'][0]:.2f}, at end {loads['end'][0]:.2f}")
    print(format_table(result))
    print()
    for name, block in result["registry_memory"].items():
        print(f"registry memory ({name}):")
        print(format_memory(block))
    if args.tfmot_skipped:
        print(f"\ntfmot case skipped: {args.tfmot_skipped}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
