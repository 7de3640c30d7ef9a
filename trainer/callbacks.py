"""The outer loop's hooks: what runs between compiled executions.

The compiled train step never logs, checkpoints or writes summaries; the
eager outer loop (:class:`trainer.controller.Controller`) calls these hooks
between executions, as Orbit's controller does, with a
:class:`~trainer.controller.LoopState`: where the run stands and the objects
a hook may read or save, not the trainer.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Dict, Optional, Protocol

import numpy as np

from trainer.masks.checks import is_whole

__all__ = ["BestWeights", "Callback", "EarlyStopping", "Evaluator", "LogLines", "StopOnPlateau", "TestEachEpoch",
           "Throughput", "crossed"]

log = logging.getLogger("trainer")


class Callback:
    """Base class for outer-loop hooks; override what you need.

    ``state`` is a :class:`~trainer.controller.LoopState` taken when the hook
    is called; ``step`` is the optimizer step (``optimizer.iterations``) after
    the execution; ``logs`` maps metric names (``"loss"``, ``"accuracy"``, and
    ``"val_loss"`` ... after validation) to Python floats. A callback that
    draws progress sets ``display = True``; ``fit`` then adds no bar of its own.
    """

    display = False

    def on_train_begin(self, state) -> None:
        """Before the first execution (after a checkpoint restore, if any)."""

    def on_execution_end(self, state, step_before: int, step: int, logs: Dict[str, float]) -> None:
        """After each compiled execution of ``step - step_before`` steps."""

    def on_epoch_end(self, state, epoch: int, step: int, logs: Dict[str, float]) -> None:
        """After an epoch's last step and its validation (``epoch`` counts from 1)."""

    def on_train_end(self, state, step: int, logs: Dict[str, float], status: str) -> None:
        """Once at the end; ``status`` is ``"completed"``, ``"interrupted"`` or ``"failed"``."""


def crossed(step_before: int, step: int, every: Optional[int]) -> bool:
    """True when a multiple of ``every`` lies in ``(step_before, step]``."""
    return bool(every) and every > 0 and step // every > step_before // every


class Throughput:
    """Training speed measured by an outer-loop hook, without evaluation time.

    Call :meth:`start` in ``on_train_begin``, :meth:`tick` in every
    ``on_execution_end`` and :meth:`resume` in ``on_epoch_end``: the time from
    the previous tick (or resume) to a tick counts as training, so validation
    and test evaluation, which run between an epoch's last execution and
    ``on_epoch_end``, are left out. :meth:`measure` gives the rates since the
    previous ``measure`` (or ``start``). The first window includes tracing
    and compilation of the step.
    """

    def __init__(self):
        self._last: Optional[float] = None
        self._busy = 0.0
        self._step = 0
        self._examples = 0

    def start(self, state) -> None:
        """Starts the clock at the state's step and example count."""
        self._last, self._busy = time.perf_counter(), 0.0
        self._step, self._examples = state.step, state.examples

    def tick(self) -> None:
        """Counts the time since the previous tick or resume as training time."""
        now = time.perf_counter()
        if self._last is not None:
            self._busy += now - self._last
        self._last = now

    def resume(self) -> None:
        """Restarts the clock without counting the time since the previous tick (evaluation)."""
        self._last = time.perf_counter()

    def measure(self, state, *, reset: bool = True) -> Dict[str, float]:
        """Rates since the previous measure (or start); ``reset`` restarts the window.

        Returns:
          ``{"examples_per_second", "steps_per_second", "seconds_per_step"}``
          (floats; ``seconds_per_step`` is ``nan`` when no step ran).
        """
        step, examples = state.step, state.examples
        busy = max(self._busy, 1e-9)
        steps, seen = step - self._step, examples - self._examples
        if reset:
            self._busy, self._step, self._examples = 0.0, step, examples
        return {
            "examples_per_second": seen / busy,
            "steps_per_second": steps / busy,
            "seconds_per_step": busy / steps if steps > 0 else float("nan"),
        }


class LogLines(Callback):
    """One plain log line per epoch, and one every ``every_n_steps`` steps (``None``: none), Orbit style.

    ``train | step 1000 | epoch 2 | steps/sec 812.3 | examples/sec 48738 | loss 0.0710 | accuracy 0.9800``
    ``epoch 2 | step 1834 | steps/sec 815.0 | loss 0.0710 | accuracy 0.9800 | val_loss ...``

    ``compiling...`` is logged once at the start; the first execution (which
    traces and compiles the step) is left out of every later rate (a step line
    at its end says ``(with compiling)``). Rates cover
    training only (see :class:`Throughput`). Lines go through the ``trainer``
    logger, so under Hydra they also reach the run's log file.
    """

    display = True

    def __init__(self, every_n_steps: Optional[int] = 100):
        self.every_n_steps = every_n_steps
        self.throughput = Throughput()
        self.epoch_rate = Throughput()
        self._compiled = False

    def on_train_begin(self, state) -> None:
        self.throughput.start(state)
        self.epoch_rate.start(state)
        self._compiled = False
        log.info("compiling...")

    def on_execution_end(self, state, step_before: int, step: int, logs: Dict[str, Any]) -> None:
        self.throughput.tick()
        self.epoch_rate.tick()
        first, self._compiled = not self._compiled, True
        if first:  # the first execution compiled the step: later rates leave it out
            self.epoch_rate.measure(state)
        if not crossed(step_before, step, self.every_n_steps):
            if first:
                self.throughput.measure(state)
            return
        rates = self.throughput.measure(state)
        rate = f"{rates['steps_per_second']:.1f}" + (" (with compiling)" if first else "")
        parts = [f"train | step {step}", f"epoch {state.epoch + 1}", f"steps/sec {rate}",
                 f"examples/sec {rates['examples_per_second']:.0f}"]
        parts += [f"{k} {v:.4f}" for k, v in logs.items()]
        log.info(" | ".join(parts))

    def on_epoch_end(self, state, epoch: int, step: int, logs: Dict[str, Any]) -> None:
        rates = self.epoch_rate.measure(state)
        rate = [] if math.isnan(rates["seconds_per_step"]) else [f"steps/sec {rates['steps_per_second']:.1f}"]
        log.info("epoch %d | step %d | %s", epoch, step, " | ".join(rate + [f"{k} {v:.4f}" for k, v in logs.items()]))
        self.throughput.resume()
        self.epoch_rate.resume()


def _improves(mode: str, value: float, best: Optional[float], min_delta: float) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def _mode_of(monitor: str, mode: str) -> str:
    """``"min"`` or ``"max"``; ``"auto"`` maximizes accuracy-like metrics (Keras' rule) and minimizes the rest."""
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
    if mode == "auto":
        return "max" if "acc" in monitor or monitor.endswith("auc") else "min"
    return mode


def _monitored(monitor: str, logs: Dict[str, Any]) -> float:
    if monitor not in logs:
        raise ValueError(f"the monitored metric {monitor!r} is not in the epoch's logs {sorted(logs)}; "
                         "pass validation data for val_* metrics")
    return float(logs[monitor])


class StopOnPlateau(Callback):
    """Stops training when a monitored metric has not improved for ``patience`` epochs (as Keras' callback).

    The outer loop's hook, under its own name: ``keras.callbacks.EarlyStopping``
    also works in :meth:`trainer.Trainer.fit` (:mod:`trainer.keras_callbacks`);
    this one re-projects after restoring, so a frozen element stays exact even
    when the masks changed since the best epoch (prune-and-regrow rules).
    ``trainer.callbacks.EarlyStopping`` is the same class under its former name.

    Args:
      monitor: an epoch log key, e.g. ``"val_loss"`` or ``"val_accuracy"``.
      patience: epochs without improvement before stopping.
      min_delta: the smallest change that counts as an improvement.
      mode: ``"min"``, ``"max"`` or ``"auto"`` (max for accuracy-like names).
      restore_best_weights: at the end, put back the model's values of the
        best epoch (then re-project, so frozen elements stay exactly pinned).

    Attributes:
      best: the best value seen; ``best_epoch`` its epoch (from 1);
      ``stopped_epoch``: the epoch after which training stopped (0 if it did not).

    Raises:
      ValueError: the monitored key is missing from an epoch's logs.
    """

    def __init__(self, monitor: str = "val_loss", *, patience: int = 0, min_delta: float = 0.0,
                 mode: str = "auto", restore_best_weights: bool = False):
        if not is_whole(patience, 0):
            raise ValueError(f"patience must be a non-negative integer, got {patience!r}")
        self.monitor, self.patience, self.min_delta = monitor, patience, abs(float(min_delta))
        self.mode = _mode_of(monitor, mode)
        self.restore_best_weights = restore_best_weights
        self.best: Optional[float] = None
        self.best_epoch = 0
        self.stopped_epoch = 0
        self._wait = 0
        self._best_values = None

    def on_train_begin(self, state) -> None:
        self.best, self.best_epoch, self.stopped_epoch, self._wait, self._best_values = None, 0, 0, 0, None

    def on_epoch_end(self, state, epoch: int, step: int, logs: Dict[str, Any]) -> None:
        value = _monitored(self.monitor, logs)
        if _improves(self.mode, value, self.best, self.min_delta):
            self.best, self.best_epoch, self._wait = value, epoch, 0
            if self.restore_best_weights:
                self._best_values = [v.numpy() for v in state.model.variables]
            return
        self._wait += 1
        if self._wait > self.patience:
            self.stopped_epoch = epoch
            state.request_stop()
            log.info("early stopping after epoch %d: %s has not improved on %.4f (epoch %d) for %d epochs",
                     epoch, self.monitor, self.best, self.best_epoch, self._wait)

    def on_train_end(self, state, step: int, logs: Dict[str, Any], status: str) -> None:
        if self.restore_best_weights and self._best_values is not None and self.best_epoch:
            for variable, value in zip(state.model.variables, self._best_values):
                variable.assign(value)
            state.registry.reproject()
            log.info("restored the weights of epoch %d (%s %.4f)", self.best_epoch, self.monitor, self.best)


EarlyStopping = StopOnPlateau  # the former name (this project's protocol, not Keras's): kept for existing code


class BestWeights(Callback):
    """Writes the model's weights to ``path`` whenever a monitored metric improves (Keras' ``save_best_only``).

    The file is a ``.npz`` of every variable's value keyed by ``variable.path``
    (the format of a run's ``weights.npz``, readable with ``model.init_from``),
    written atomically.

    Args:
      path: the ``.npz`` file to write.
      monitor, mode: as for :class:`StopOnPlateau`.

    Attributes:
      best, best_epoch: the best value and its epoch (from 1).
    """

    def __init__(self, path: str, monitor: str = "val_loss", *, mode: str = "auto"):
        self.path, self.monitor, self.mode = str(path), monitor, _mode_of(monitor, mode)
        self.best: Optional[float] = None
        self.best_epoch = 0

    def on_epoch_end(self, state, epoch: int, step: int, logs: Dict[str, Any]) -> None:
        value = _monitored(self.monitor, logs)
        if not _improves(self.mode, value, self.best, 0.0):
            return
        self.best, self.best_epoch = value, epoch
        tmp = self.path + ".tmp.npz"
        np.savez(tmp, **{v.path: np.asarray(v.numpy()) for v in state.model.variables})
        os.replace(tmp, self.path)
        log.info("epoch %d: %s improved to %.4f, weights written to %s", epoch, self.monitor, value, self.path)


class Evaluator(Protocol):
    """What :class:`TestEachEpoch` needs of a trainer: ``evaluate(dataset) -> {metric name: float}``."""

    def evaluate(self, x: Any, *args: Any, **kwargs: Any) -> Dict[str, float]:
        """The metrics (``"loss"``, ``"accuracy"``, ...) of one pass over a batched dataset of ``(x, y)``."""


class TestEachEpoch(Callback):
    """Evaluates the test set after every epoch, adding ``test_loss`` / ``test_accuracy`` to the epoch's logs.

    Every metric ``m`` of ``trainer.evaluate(dataset)`` becomes ``test_m``
    in the logs that later callbacks (TensorBoard, the run record) see; put
    it first in the list.

    Args:
      trainer: what ``evaluate`` runs on, a :class:`trainer.Trainer` (any
        :class:`Evaluator`).
      dataset: the batched test dataset of ``(x, y)`` pairs.
    """

    __test__ = False  # a callback, not a pytest test class

    def __init__(self, trainer: Evaluator, dataset: Any):
        self.trainer, self.dataset = trainer, dataset

    def on_epoch_end(self, state, epoch: int, step: int, logs: Dict[str, Any]) -> None:
        logs.update({"test_" + k: v for k, v in self.trainer.evaluate(self.dataset).items()})
