"""The outer loop's hooks: what runs between compiled executions.

The compiled train step never logs, checkpoints or writes summaries; the
eager outer loop in :class:`trainer.Trainer` calls these hooks between
executions (as Orbit's controller does).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Optional

log = logging.getLogger("trainer")


class Callback:
    """Base class for outer-loop hooks; override what you need.

    ``step`` is the optimizer step (``optimizer.iterations``) after the
    execution; ``logs`` maps metric names (``"loss"``, ``"accuracy"``, and
    ``"val_loss"`` ... after validation) to Python floats.
    """

    def on_train_begin(self, trainer) -> None:
        """Before the first execution (after a checkpoint restore, if any)."""

    def on_execution_end(self, trainer, step_before: int, step: int, logs: Dict[str, float]) -> None:
        """After each compiled execution of ``step - step_before`` steps."""

    def on_epoch_end(self, trainer, epoch: int, step: int, logs: Dict[str, float]) -> None:
        """After an epoch's last step and its validation (``epoch`` counts from 1)."""

    def on_train_end(self, trainer, step: int, logs: Dict[str, float], status: str) -> None:
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

    def start(self, trainer) -> None:
        """Starts the clock at the trainer's current step and example count."""
        self._last, self._busy = time.perf_counter(), 0.0
        self._step, self._examples = trainer.step, int(trainer.examples.numpy())

    def tick(self) -> None:
        """Counts the time since the previous tick or resume as training time."""
        now = time.perf_counter()
        if self._last is not None:
            self._busy += now - self._last
        self._last = now

    def resume(self) -> None:
        """Restarts the clock without counting the time since the previous tick (evaluation)."""
        self._last = time.perf_counter()

    def measure(self, trainer, *, reset: bool = True) -> Dict[str, float]:
        """Rates since the previous measure (or start); ``reset`` restarts the window.

        Returns:
          ``{"examples_per_second", "steps_per_second", "seconds_per_step"}``
          (floats; ``seconds_per_step`` is ``nan`` when no step ran).
        """
        step, examples = trainer.step, int(trainer.examples.numpy())
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
    """One plain log line every ``every_n_steps`` steps, Orbit style.

    ``train | step 1000 | epoch 2 | steps/sec 812.3 | examples/sec 48738 | loss 0.0710 | accuracy 0.9800``

    Rates cover training only (see :class:`Throughput`). Lines go through the
    ``trainer`` logger, so under Hydra they also reach the run's log file.
    """

    def __init__(self, every_n_steps: int = 100):
        self.every_n_steps = every_n_steps
        self.throughput = Throughput()

    def on_train_begin(self, trainer) -> None:
        self.throughput.start(trainer)

    def on_execution_end(self, trainer, step_before: int, step: int, logs: Dict[str, Any]) -> None:
        self.throughput.tick()
        if not crossed(step_before, step, self.every_n_steps):
            return
        rates = self.throughput.measure(trainer)
        parts = [f"train | step {step}", f"epoch {trainer.epoch + 1}", f"steps/sec {rates['steps_per_second']:.1f}",
                 f"examples/sec {rates['examples_per_second']:.0f}"]
        parts += [f"{k} {v:.4f}" for k, v in logs.items()]
        log.info(" | ".join(parts))

    def on_epoch_end(self, trainer, epoch: int, step: int, logs: Dict[str, Any]) -> None:
        log.info("epoch %d | step %d | %s", epoch, step, " | ".join(f"{k} {v:.4f}" for k, v in logs.items()))
        self.throughput.resume()
