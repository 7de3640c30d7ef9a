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


class LogLines(Callback):
    """One plain log line every ``every_n_steps`` steps, Orbit style.

    ``train | step 1000 | epoch 2 | steps/sec 812.3 | loss 0.0710 | accuracy 0.9800``
    """

    def __init__(self, every_n_steps: int = 100):
        self.every_n_steps = every_n_steps
        self._last_time: Optional[float] = None
        self._last_step = 0

    def on_train_begin(self, trainer) -> None:
        self._last_time, self._last_step = time.perf_counter(), trainer.step

    def on_execution_end(self, trainer, step_before: int, step: int, logs: Dict[str, Any]) -> None:
        if not crossed(step_before, step, self.every_n_steps):
            return
        now = time.perf_counter()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        parts = [f"train | step {step}", f"epoch {trainer.epoch + 1}", f"steps/sec {rate:.1f}"]
        parts += [f"{k} {v:.4f}" for k, v in logs.items()]
        log.info(" | ".join(parts))

    def on_epoch_end(self, trainer, epoch: int, step: int, logs: Dict[str, Any]) -> None:
        log.info("epoch %d | step %d | %s", epoch, step, " | ".join(f"{k} {v:.4f}" for k, v in logs.items()))
