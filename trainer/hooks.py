"""What the outer loop's hooks get: a :class:`LoopState` of the run, and the display ``fit`` adds by itself.

A hook (:class:`trainer.callbacks.Callback`) is called by
:class:`trainer.controller.Controller` with a :class:`LoopState`, a small
read-only record of where the run stands and of the objects it may read or
save, never the trainer itself. :func:`with_display` puts a progress bar
first among a ``fit`` call's hooks when there is a terminal to show it in.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import keras

from trainer.callbacks import Callback
from trainer.masks import MaskRegistry


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


def with_display(callbacks: Iterable[Callback], verbose: Any) -> List[Callback]:
    """``callbacks`` as a list, with :func:`default_display` first unless one of them is a display already."""
    callbacks = list(callbacks)
    if not any(getattr(cb, "display", False) for cb in callbacks):
        display = default_display(verbose)
        if display is not None:
            callbacks.insert(0, display)
    return callbacks


def default_display(verbose: Any) -> Optional[Callback]:
    """The display ``fit`` adds by itself: a progress bar in a terminal, nothing otherwise.

    Args:
      verbose: ``"auto"`` (a bar when ``sys.stdout`` is a terminal and the
        ``CI`` environment variable is unset), ``True``/``1`` (always a bar),
        ``False``/``0`` (none).

    Raises:
      ValueError: any other value.
    """
    from trainer.progress import ProgressBar

    if verbose == "auto":
        show = sys.stdout.isatty() and not os.environ.get("CI")
    elif verbose in (True, False, 0, 1):
        show = bool(verbose)
    else:
        raise ValueError(f"verbose must be 'auto', True or False, got {verbose!r}")
    return ProgressBar() if show else None
