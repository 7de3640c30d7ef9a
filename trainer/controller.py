"""The eager outer loop (Orbit's controller): compiled executions, epochs, validation and hooks.

:class:`Controller` runs what one :meth:`trainer.Trainer.fit` call asks for:
it cuts the steps into compiled executions (ending one where an epoch ends,
at ``max_steps`` and where a freeze rule switches or re-selects), calls the
registry's updates between them, evaluates the validation data after each
epoch, decides how the call ended, and calls the hooks. A hook sees the run
through a :class:`LoopState`, a small read-only record of where the run
stands and of the objects it may read or save, never the trainer itself.
The compiled step lives in :class:`trainer.Trainer`; nothing here runs
inside it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from trainer.callbacks import Callback
from trainer.masks import MaskRegistry

if TYPE_CHECKING:  # the trainer imports this module
    from trainer.loop import Trainer


class NonFiniteLossError(FloatingPointError):
    """The loss or a gradient was NaN or infinite (``nan_policy="stop"``)."""


@dataclasses.dataclass(frozen=True)
class LoopState:
    """What an outer-loop hook sees of a run (a snapshot taken when the hook is called).

    Attributes:
      step: the optimizer step (``optimizer.iterations``) now.
      epoch: the epoch, from 0, of the execution that just ran (in
        ``on_train_begin``: of the first execution).
      epoch_first_step: the optimizer step at which that epoch began.
      steps_per_epoch: steps in an epoch (``None`` before any ``fit``).
      total_steps: the optimizer step at which this ``fit`` call ends
        (``None`` before any ``fit``).
      final_epoch: the number, from 1, of the call's last epoch (``None``
        before any ``fit``).
      examples: training examples seen over the trainer's life (skipped
        steps not counted).
      skipped_steps: steps dropped as non-finite (``nan_policy="skip_step"``).
      gradient_norm: the global L2 norm (float32) of the last applied step's
        update gradients, or ``None`` under ``nan_policy="unchecked"``
        (which computes none).
      regrow_events: the prune-and-regrow updates made after the last
        execution (:meth:`~trainer.masks.MaskRegistry.regrow`), one dict each.
      timing: seconds of the call so far (``first_execution_seconds``,
        ``train_seconds``, ``steady_steps_per_second`` once known).
      model: the Keras model being trained.
      optimizer: its optimizer (``optimizer.iterations`` is the step).
      registry: the :class:`~trainer.masks.MaskRegistry` of the model.
      checkpoint_objects: every object an exact resume needs, by checkpoint
        key: ``model``, ``optimizer``, ``registry``, the counters
        ``skipped_steps``, ``examples_seen``, ``batches_drawn`` and
        ``train_metrics`` (a list of variables). Pass it to
        ``tf.train.Checkpoint(**checkpoint_objects)``.
      masked_gradients: ``fn(x, y) -> [(variable, gradient)]``, the masked
        gradients of one batch, computed eagerly without changing any state
        (:meth:`trainer.Trainer.masked_gradients`).
      request_stop: ``fn()``: end ``fit`` after the current execution (and its
        epoch's end hooks, if it closed an epoch), with status ``"completed"``
        (as Keras' ``model.stop_training = True``).
    """

    step: int
    epoch: int
    epoch_first_step: int
    steps_per_epoch: Optional[int]
    total_steps: Optional[int]
    final_epoch: Optional[int]
    examples: int
    skipped_steps: int
    gradient_norm: Optional[float]
    regrow_events: Tuple[Dict[str, Any], ...]
    timing: Mapping[str, float]
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    registry: MaskRegistry
    checkpoint_objects: Mapping[str, Any]
    masked_gradients: Callable[[Any, Any], List[tuple]]
    request_stop: Callable[[], None]


class Controller:
    """Runs one ``fit`` call: executions, epochs, validation, the run's status, and the hooks.

    Epochs are numbered from ``epoch_origin`` (the optimizer step where epoch
    ``epoch_base`` begins): ``fit(epochs=n)`` continues from where the
    trainer stands, Keras' ``initial_epoch`` form counts from step 0.

    Args:
      trainer: the :class:`trainer.Trainer` whose step runs.
      callbacks: the hooks, called in order.
      steps_per_epoch: steps in an epoch (positive).
      total: the optimizer step at which the call ends.
      epoch_origin, epoch_base: the epoch numbering (see above).
    """

    def __init__(self, trainer: "Trainer", callbacks: Sequence[Callback], *, steps_per_epoch: int, total: int,
                 epoch_origin: int, epoch_base: int):
        self.trainer = trainer
        self.callbacks = list(callbacks)
        self.steps_per_epoch = steps_per_epoch
        self.total = total
        self.origin, self.base = epoch_origin, epoch_base

    def epoch_of(self, step: int) -> int:
        """The epoch, from 0, that the step after optimizer step ``step`` belongs to."""
        return self.base + (step - self.origin) // self.steps_per_epoch

    def _call(self, event: str, *args) -> None:
        state = self.trainer.state()
        for cb in self.callbacks:
            getattr(cb, event)(state, *args)

    def run(self, iterator, validation: Optional[tf.data.Dataset]) -> List[Dict[str, float]]:
        """Calls ``on_train_begin``, trains from the trainer's step to ``total`` (or a stop request), calls ``on_train_end``.

        Returns one logs dict per epoch completed.

        The trainer's ``status`` becomes ``"completed"``, ``"interrupted"``
        (``trainer.stop_requested`` before the last step) or ``"failed"``
        (an exception, re-raised after ``on_train_end``).

        Raises:
          NonFiniteLossError: with ``nan_policy="stop"``, at the first
            non-finite loss or gradient; with ``"skip_step"``, when a whole
            epoch of batches in a row was skipped.
        """
        trainer, registry, spe = self.trainer, self.trainer.registry, self.steps_per_epoch
        step = trainer.step
        trainer.epoch = self.epoch_of(step)
        trainer.epoch_first_step = self.origin + (trainer.epoch - self.base) * spe
        self._call("on_train_begin")
        history: List[Dict[str, float]] = []
        logs: Dict[str, float] = {}
        trainer.status = status = "failed"
        start = time.perf_counter()
        first_done: Optional[float] = None
        steps_at_first = step
        skipped_in_a_row = 0
        try:
            while step < self.total and not trainer.stop_requested and not trainer.stop_training:
                trainer.epoch = epoch = self.epoch_of(step)
                registry.update(step, epoch)
                epoch_end = self.origin + (epoch - self.base + 1) * spe
                trainer.epoch_first_step = epoch_end - spe
                k = min(trainer.steps_per_execution, epoch_end - step, self.total - step)
                switch = registry.next_update_step(step)
                if switch is not None:  # end the execution where a rule switches or re-selects
                    k = min(k, switch - step)
                trainer.train_steps(iterator, k)
                before, step = step, trainer.step
                if trainer.nonfinite_seen and trainer.nan_policy == "stop":
                    raise NonFiniteLossError(
                        f"non-finite loss or gradient at step {step + 1} (steps {before + 1}-{before + k} "
                        "were in this execution); the update was not applied. Lower the learning rate, "
                        "check the inputs, or set trainer.nan_policy=skip_step"
                    )
                trainer.regrow_events = registry.regrow(step)  # prune and regrow, before any hook saves
                if first_done is None:
                    first_done = time.perf_counter()
                    trainer.timing["first_execution_seconds"] = first_done - start
                    steps_at_first = step
                logs = trainer.train_logs()
                self._call("on_execution_end", before, step, logs)
                if step >= epoch_end:
                    epoch_logs = dict(logs)
                    if validation is not None:
                        epoch_logs.update({"val_" + n: v for n, v in trainer.evaluate(validation).items()})
                    history.append(epoch_logs)
                    trainer.epochs_done = epoch + 1
                    self._call("on_epoch_end", epoch + 1, step, epoch_logs)
                    logs = epoch_logs
                    trainer.reset_train_metrics()
                # Skipped steps do not advance the step counter; a run whose
                # every batch is non-finite must still end.
                skipped_in_a_row = skipped_in_a_row + k if step == before else 0
                if skipped_in_a_row > spe:
                    raise NonFiniteLossError(
                        f"every step for a whole epoch of batches after step {step} was non-finite and skipped"
                    )
            status = "interrupted" if trainer.stop_requested and step < self.total else "completed"
            trainer.status = status
        finally:
            end = time.perf_counter()
            trainer.timing["train_seconds"] = end - start
            if first_done is not None and step > steps_at_first:
                trainer.timing["steady_steps_per_second"] = (step - steps_at_first) / max(end - first_done, 1e-9)
            self._call("on_train_end", step, logs, status)
        return history
