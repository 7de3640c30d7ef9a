"""The cases of ``scripts/bench.py`` that run in its own process: Keras ``fit``, the trainer, matmuls.

A library of ``scripts/bench.py``, not a command; the ``tfmot`` case is in ``_bench_tfmot.py``. Every case
trains through a public API (``keras.Model.fit``, :class:`trainer.Trainer`, ``tf.function``): the trainer's
cases time the product's own step. What the numbers mean is in ``scripts/bench.py``'s docstring.
"""

from __future__ import annotations

import abc
import gc
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from _measure import Clock, MemoryProbe, fit_clock, grown, timed_round, trainer_clock

BATCH = 128
LR = 1e-3
SPARSITY = 0.9
MATMUL_N = 2048
CACHED_BATCHES = 50


# ------------------------------------------------------------------- data
def load_arrays(data: str, limit: Optional[int] = None):
    """Training images and labels of ``data`` (``"mnist"`` or ``"digits"``), the first ``limit`` of them.

    Returns:
      ``(x, y, num_classes)``: ``x`` float32 images, ``y`` int labels, both of the same length.
    """
    from trainer.data import load_digits, load_mnist  # the worker's TF_USE_LEGACY_KERAS is set at its spawn

    splits = load_mnist() if data == "mnist" else load_digits()
    x, y = splits.x_train, splits.y_train
    if limit:
        x, y = x[:limit], y[:limit]
    return x, y, splits.num_classes


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


def settings_label(k: int, jit: Any) -> str:
    """``"K=<k>, XLA"`` or ``"K=<k>, no XLA"`` (``"jit=<value>"`` for anything but a bool)."""
    return f"K={k}, " + {True: "XLA", False: "no XLA"}.get(jit, f"jit={jit}")


# ------------------------------------------------------------------ cases
class Case(abc.ABC):
    """One benchmarked configuration: built once, warmed up, then timed round by round.

    Subclasses implement ``setup`` and ``run_round`` (see :class:`StepCase`
    for cases timed by training steps).
    """

    kind = "train"

    def __init__(self, name: str, description: str, *, model: str, k: int, jit: Any, flops: float, batch: int):
        self.name, self.description, self.model_name = name, description, model
        self.k, self.jit, self.flops, self.batch = k, jit, flops, batch
        self.clock = Clock()
        self.rounds: List[Dict[str, float]] = []
        self.info: Dict[str, Any] = {}

    def settings(self) -> str:
        """``"K=<k>, XLA"`` or ``"K=<k>, no XLA"``."""
        return settings_label(self.k, self.jit)

    @abc.abstractmethod
    def setup(self, warmup_steps: int, mem: MemoryProbe) -> None:
        """Builds the case and warms it up (compilation included)."""

    @abc.abstractmethod
    def run_round(self, steps: int, mem: MemoryProbe) -> Dict[str, float]:
        """Times one round; returns ``{"seconds", "steps", ...}``."""

    def close(self) -> None:
        """Releases what the case holds."""


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
        """Builds the case and runs its first training call (compilation + warm-up)."""
        gc.collect()
        before = mem.rss()
        self._build()
        self.clock.begin()
        self._fit(warmup_steps)
        self.info.update(self.clock.first_step())
        self.info["setup_mib"] = grown(mem.rss(), before)

    def run_round(self, steps: int, mem: MemoryProbe) -> Dict[str, float]:
        """Runs ``K + steps`` steps; times the last ``steps``; returns the round's numbers.

        Raises:
          RuntimeError: the clock saw another number of timed steps than ``steps``.
        """
        result = timed_round(self.clock, mem, self._fit, self.k + steps)
        if result["steps"] != steps:
            raise RuntimeError(f"{self.name}: timed {result['steps']} steps, expected {steps}")
        self.rounds.append(result)
        return result

    @abc.abstractmethod
    def _build(self) -> None:
        """Builds the case's model, optimizer and input."""

    @abc.abstractmethod
    def _fit(self, steps: int) -> None:
        """Runs ``steps`` more steps, marking the clock after each execution."""


def _masked_layer_classes():
    """The Keras 3 workarounds: a kernel constraint and a ``Dense`` subclass, each multiplying by a 0/1 mask."""
    import keras
    import tensorflow as tf

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

    return MaskConstraint, MaskedDense


class KerasFitCase(StepCase):
    """``model.fit`` of a Keras 3 model; ``variant`` is ``dense``, ``constraint``, ``masked_layer`` or
    ``masked_optimizer`` (:class:`trainer.MaskedOptimizer` with the masked trainer case's rule)."""

    def __init__(self, *args, variant: str, hidden, input_shape, classes, ds, **kwargs):
        super().__init__(*args, **kwargs)
        self.variant, self.hidden, self.input_shape, self.classes, self.ds = variant, hidden, input_shape, classes, ds

    def _build(self) -> None:
        import keras

        from trainer.models import build_model

        keras.utils.set_random_seed(0)
        base = build_model("mlp", self.input_shape, self.classes, hidden=list(self.hidden))
        if self.variant in ("dense", "masked_optimizer"):
            model = base
        else:
            MaskConstraint, MaskedDense = _masked_layer_classes()
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
        optimizer = keras.optimizers.Adam(LR)
        if self.variant == "masked_optimizer":  # the Trainer's masked case's rule, through model.fit
            from trainer import MaskedOptimizer, MaskRegistry

            registry = MaskRegistry(model)
            registry.freeze("*/kernel", elements={"random": SPARSITY, "seed": 0}, value="zero")
            optimizer = MaskedOptimizer(optimizer, registry)
        model.compile(optimizer=optimizer, loss=_loss(), metrics=["accuracy"],
                      jit_compile=self.jit, steps_per_execution=self.k)
        self.model = model
        self.callback = fit_clock(keras.callbacks.Callback, self.clock, self.k)
        if self.jit == "auto":  # Keras resolves "auto" to no XLA on a CPU-only TensorFlow
            self.info["jit_compile_requested"] = "auto"
            self.jit = bool(model.jit_compile)

    def _fit(self, steps: int) -> None:
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
        from trainer.models import build_model

        keras.utils.set_random_seed(0)
        model = build_model("mlp", self.input_shape, self.classes, hidden=list(self.hidden))
        registry = MaskRegistry(model)
        if self.masked:
            registry.freeze("*/kernel", elements={"random": SPARSITY, "seed": 0}, value="zero")
        self.callback = trainer_clock(self.clock)
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
        x = tf.constant(rng.standard_normal((self.batch, self.kernels[0][0]), dtype=np.float32))
        ws = [tf.Variable(rng.standard_normal(s, dtype=np.float32) * 0.01) for s in self.kernels]
        self.ws = ws

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
