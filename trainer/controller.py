"""The eager outer loop (Orbit's controller): compiled executions, epochs, validation, hooks, progress.

:class:`Controller` runs what a :meth:`trainer.Trainer.fit` call asks for:
it checks the call's lengths and numbers its epochs (:func:`check_lengths`,
:meth:`Controller.schedule`), cuts the steps into compiled executions (ending
one where an epoch ends, at ``max_steps`` and where a freeze rule switches
or re-selects), calls the registry's updates between them, evaluates the
validation data after each epoch, decides how the call ended, and calls the
hooks. It owns where the run stands (:class:`Progress`) and knows the trainer
only through :class:`Runner` (``train_steps(iterator, k)`` and a few reads).
A hook sees the run through a :class:`~trainer.hooks.LoopState` (re-exported
here), never the trainer itself. The compiled step lives in
:mod:`trainer.step`; nothing here runs inside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Protocol, Sequence

import tensorflow as tf

from trainer.callbacks import Callback
from trainer.hooks import LoopState
from trainer.masks import MaskRegistry
from trainer.masks.checks import is_whole, positive_int

log = logging.getLogger("trainer")


class NonFiniteLossError(FloatingPointError):
    """The loss or a gradient was NaN or infinite (``nan_policy="stop"``)."""


class Progress:
    """Where the run stands, across ``fit`` calls: the controller's record, changed only by its own methods.

    The controller calls them as the run goes; :func:`stop_on_signals` and
    :meth:`trainer.Trainer.request_stop` ask for a stop through
    :meth:`request_stop`. :class:`trainer.Trainer` reads it (``epoch``,
    ``status``, ``timing``, ...) and hooks get it in a
    :class:`~trainer.hooks.LoopState`.

    Attributes:
      epoch: the epoch, from 0, of the execution running or last run.
      epoch_first_step: the optimizer step at which that epoch began.
      epochs_done: epochs completed so far; ``fit(epochs=n)`` numbers its
        epochs on from it.
      steps_per_epoch, total_steps, final_epoch: those of the last ``fit``
        call (as in :class:`~trainer.hooks.LoopState`; ``None`` before any).
      status: how the last ``fit`` ended: ``"completed"``, ``"interrupted"``
        (``stop_requested`` before the last step) or ``"failed"`` (it
        raised); ``None`` before any ``fit``.
      timing: seconds of the ``fit`` calls (``first_execution_seconds``,
        ``train_seconds``, ``steady_steps_per_second``), by name.
      regrow_events: the prune-and-regrow updates made after the last
        execution (:meth:`~trainer.masks.MaskRegistry.regrow`), one dict each.
      stop_requested: an interrupted stop was asked (SIGINT / SIGTERM); it stays.
      stop_training: a completed stop was asked (early stopping); each
        ``fit`` call starts without one.
    """

    def __init__(self):
        self.epoch, self.epoch_first_step, self.epochs_done = 0, 0, 0
        self.steps_per_epoch: Optional[int] = None
        self.total_steps: Optional[int] = None
        self.final_epoch: Optional[int] = None
        self.status: Optional[str] = None
        self.timing: Dict[str, float] = {}
        self.regrow_events: List[Dict[str, Any]] = []
        self.stop_requested, self.stop_training = False, False

    def start(self, schedule: "Schedule") -> None:
        """A ``fit`` call begins with ``schedule`` (and no completed-stop request)."""
        self.steps_per_epoch, self.total_steps = schedule.steps_per_epoch, schedule.total
        self.final_epoch, self.stop_training = schedule.final_epoch, False

    def enter_epoch(self, epoch: int, first_step: int) -> None:
        """The next execution runs in ``epoch``, which began at optimizer step ``first_step``."""
        self.epoch, self.epoch_first_step = epoch, first_step

    def close_epoch(self, epoch: int) -> None:
        """``epoch`` (from 0) is complete."""
        self.epochs_done = epoch + 1

    def regrew(self, events: List[Dict[str, Any]]) -> None:
        """The prune-and-regrow updates made after the last execution."""
        self.regrow_events = events

    def timed(self, name: str, seconds: float) -> None:
        """Records ``timing[name] = seconds``."""
        self.timing[name] = seconds

    def end(self, status: str) -> None:
        """The call's status so far: ``"failed"`` until it ends well."""
        self.status = status

    def request_stop(self, *, interrupt: bool = False) -> None:
        """Ends ``fit`` after the current execution: ``"interrupted"`` with ``interrupt``, else ``"completed"``."""
        if interrupt:
            self.stop_requested = True
        else:
            self.stop_training = True


@dataclasses.dataclass(frozen=True)
class Schedule:
    """One ``fit`` call's steps: the epoch length, the optimizer step ``total`` where it ends, the epoch numbering.

    Epochs are numbered from ``origin`` (the optimizer step where epoch
    ``base`` begins): ``fit(epochs=n)`` continues from where the trainer
    stands, Keras' ``initial_epoch`` form counts from step 0.
    """

    steps_per_epoch: int
    total: int
    origin: int
    base: int

    def epoch_of(self, step: int) -> int:
        """The epoch, from 0, that the step after optimizer step ``step`` belongs to."""
        return self.base + (step - self.origin) // self.steps_per_epoch

    def epoch_end(self, epoch: int) -> int:
        """The optimizer step at which ``epoch`` ends."""
        return self.origin + (epoch - self.base + 1) * self.steps_per_epoch

    @property
    def final_epoch(self) -> int:
        """The number, from 1, of the call's last epoch."""
        return self.epoch_of(max(self.total - 1, self.origin)) + 1


def check_lengths(*, steps_per_epoch: Any, epochs: Any, max_steps: Any, initial_epoch: Any) -> None:
    """Refuses ``fit`` lengths that are not whole numbers in range (see :meth:`trainer.Trainer.fit`).

    Raises:
      ValueError: ``steps_per_epoch`` or ``epochs`` not a positive integer,
        ``max_steps`` neither that nor ``None``, ``initial_epoch`` neither an
        integer in ``[0, epochs)`` nor ``None``; the message names the value.
    """
    if not is_whole(steps_per_epoch, 1):
        raise ValueError(f"an epoch must have at least one step, got steps_per_epoch={steps_per_epoch!r}")
    positive_int("epochs", epochs)
    if max_steps is not None and not is_whole(max_steps, 1):
        raise ValueError(f"max_steps must be a positive integer or None, got {max_steps!r}")
    if initial_epoch is not None and not is_whole(initial_epoch, 0, epochs):
        raise ValueError(f"initial_epoch must be an integer in [0, epochs={epochs}), got {initial_epoch!r}")


class Runner(Protocol):
    """What the controller knows of the trainer whose steps it runs (:class:`trainer.Trainer` is one)."""

    registry: MaskRegistry
    steps_per_execution: int
    nan_policy: str

    @property
    def step(self) -> int: ...
    @property
    def nonfinite_seen(self) -> bool: ...
    def train_steps(self, iterator: Any, k: int) -> None: ...
    def train_logs(self) -> Dict[str, float]: ...
    def reset_train_metrics(self) -> None: ...
    def evaluate(self, x: Any) -> Dict[str, float]: ...
    def state(self) -> LoopState: ...


class Controller:
    """Runs ``fit`` calls of one runner: executions, epochs, validation, the run's status, and the hooks.

    Args:
      runner: the trainer whose steps run (:class:`Runner`).

    Attributes:
      progress: where the run stands (:class:`Progress`), kept across calls.
    """

    def __init__(self, runner: Runner):
        self.runner = runner
        self.progress = Progress()

    def schedule(self, *, steps_per_epoch: int, epochs: int, max_steps: Optional[int],
                 initial_epoch: Optional[int]) -> Schedule:
        """The steps of a ``fit`` call from where the runner stands (lengths checked by :func:`check_lengths`).

        Raises:
          ValueError: ``initial_epoch`` whose epochs do not hold the runner's
            optimizer step.
        """
        step, steps_per_epoch, epochs = self.runner.step, int(steps_per_epoch), int(epochs)
        if initial_epoch is None:  # `epochs` more epochs from here
            origin, base = step, self.progress.epochs_done
            total = step + epochs * steps_per_epoch
        else:  # Keras' resume form: epochs counted from optimizer step 0
            if not initial_epoch * steps_per_epoch <= step <= epochs * steps_per_epoch:
                raise ValueError(
                    f"initial_epoch={initial_epoch} with epochs={epochs} covers optimizer steps "
                    f"[{initial_epoch * steps_per_epoch}, {epochs * steps_per_epoch}] at {steps_per_epoch} steps "
                    f"per epoch, but the trainer is at step {step}: restore a checkpoint of that epoch first, "
                    "raise epochs, or leave initial_epoch out to train `epochs` more epochs from here")
            origin, base = 0, 0
            total = epochs * steps_per_epoch
        if max_steps is not None:
            total = min(total, int(max_steps))
        return Schedule(steps_per_epoch=steps_per_epoch, total=total, origin=origin, base=base)

    def fit(self, schedule: Schedule, iterator, validation: Optional[tf.data.Dataset],
            callbacks: Sequence[Callback]) -> List[Dict[str, float]]:
        """Calls ``on_train_begin``, trains to ``schedule.total`` (or a stop request), calls ``on_train_end``.

        Returns one logs dict per epoch completed.

        ``progress.status`` becomes ``"completed"``, ``"interrupted"``
        (``progress.stop_requested`` before the last step) or ``"failed"``
        (an exception, re-raised after ``on_train_end``).

        Raises:
          NonFiniteLossError: with ``nan_policy="stop"``, at the first
            non-finite loss or gradient; with ``"skip_step"``, when a whole
            epoch of batches in a row was skipped.
        """
        runner, registry, progress, spe = self.runner, self.runner.registry, self.progress, schedule.steps_per_epoch

        def call(event: str, *args) -> None:
            state = runner.state()
            for cb in callbacks:
                getattr(cb, event)(state, *args)

        progress.start(schedule)
        step = runner.step
        epoch = schedule.epoch_of(step)
        progress.enter_epoch(epoch, schedule.epoch_end(epoch) - spe)
        call("on_train_begin")
        history: List[Dict[str, float]] = []
        logs: Dict[str, float] = {}
        status = "failed"
        progress.end(status)
        start = time.perf_counter()
        first_done: Optional[float] = None
        steps_at_first = step
        skipped_in_a_row = 0
        try:
            while step < schedule.total and not progress.stop_requested and not progress.stop_training:
                epoch = schedule.epoch_of(step)
                registry.update(step, epoch)
                epoch_end = schedule.epoch_end(epoch)
                progress.enter_epoch(epoch, epoch_end - spe)
                k = min(runner.steps_per_execution, epoch_end - step, schedule.total - step)
                switch = registry.next_update_step(step)
                if switch is not None:  # end the execution where a rule switches or re-selects
                    k = min(k, switch - step)
                runner.train_steps(iterator, k)
                before, step = step, runner.step
                if runner.nonfinite_seen and runner.nan_policy == "stop":
                    raise NonFiniteLossError(
                        f"non-finite loss or gradient at step {step + 1} (steps {before + 1}-{before + k} "
                        "were in this execution); the update was not applied. Lower the learning rate, "
                        "check the inputs, or set trainer.nan_policy=skip_step"
                    )
                progress.regrew(registry.regrow(step))  # prune and regrow, before any hook saves
                if first_done is None:
                    first_done = time.perf_counter()
                    progress.timed("first_execution_seconds", first_done - start)
                    steps_at_first = step
                logs = runner.train_logs()
                call("on_execution_end", before, step, logs)
                if step >= epoch_end:
                    epoch_logs = dict(logs)
                    if validation is not None:
                        epoch_logs.update({"val_" + n: v for n, v in runner.evaluate(validation).items()})
                    history.append(epoch_logs)
                    progress.close_epoch(epoch)
                    call("on_epoch_end", epoch + 1, step, epoch_logs)
                    logs = epoch_logs
                    runner.reset_train_metrics()
                # Skipped steps do not advance the step counter; a run whose
                # every batch is non-finite must still end.
                skipped_in_a_row = skipped_in_a_row + k if step == before else 0
                if skipped_in_a_row > spe:
                    raise NonFiniteLossError(
                        f"every step for a whole epoch of batches after step {step} was non-finite and skipped"
                    )
            status = "interrupted" if progress.stop_requested and step < schedule.total else "completed"
            progress.end(status)
        finally:
            end = time.perf_counter()
            progress.timed("train_seconds", end - start)
            if first_done is not None and step > steps_at_first:
                progress.timed("steady_steps_per_second", (step - steps_at_first) / max(end - first_done, 1e-9))
            call("on_train_end", step, logs, status)
        return history


@contextlib.contextmanager
def stop_on_signals(progress: Progress) -> Iterator[None]:
    """SIGINT / SIGTERM ask for an interrupted stop after the current execution (then the run checkpoints).

    Inside the ``with`` block a signal calls
    ``progress.request_stop(interrupt=True)``; a second SIGINT exits at
    once (exit code 130) without waiting. The handlers are installed only in
    the main thread, and the previous ones are put back at the end.

    Args:
      progress: the controller's record (:attr:`trainer.Trainer.progress`).
    """
    previous = {}

    def ask_to_stop(signum, frame):
        if progress.stop_requested and signum == signal.SIGINT:
            log.error("second interrupt: exiting now")
            os._exit(130)
        progress.request_stop(interrupt=True)
        log.warning("%s received: finishing the current step, then writing a checkpoint "
                    "(press Ctrl-C again to exit at once)", signal.Signals(signum).name)

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, ask_to_stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
