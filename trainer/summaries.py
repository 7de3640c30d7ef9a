"""TensorBoard summaries written from the outer loop through ``tf.summary``.

Nothing here runs inside the compiled step: the :class:`FreezeSummaries` callback
reads variables and the registry between executions.

Layout of a run's ``tb/`` directory (one TensorBoard run per writer):

- ``tb/train``: ``loss`` and every metric (running mean over the epoch so
  far), ``learning_rate``, ``gradient_norm`` (global L2 norm of the last
  step's masked gradients), ``examples_per_second`` and ``seconds_per_step``
  (training only, evaluation left out), ``epoch``; per variable
  ``masks/<variable path>/<stat>`` with stats ``sparsity`` (fraction of exact
  zeros), ``frozen_fraction``, ``frozen_drift`` (max |value - pinned| over
  frozen elements; must stay 0) and ``trainable_norm`` (L2 norm of the
  trainable elements), for the variables a rule covers; ``model/sparsity``
  and ``model/frozen_fraction`` over all variables; histograms ``weights/<path>`` and ``gradients/<path>`` (the
  trainable elements only); images ``masks/<path>/trainable``; for
  prune-and-regrow rules, at each update, ``regrow/<path>/dropped``,
  ``grown``, ``drop_fraction`` and ``density`` (trainable fraction); texts
  ``config`` and ``freeze_plan``; a profile under ``plugins/profile`` when
  asked (:class:`Profile`); the Custom Scalars layout, freezing first
  (:mod:`trainer.tb_layout`).
- ``tb/validation``: ``loss`` and every metric after each epoch, and the final
  ``test/<metric>``.
- The HParams plugin's session record (the run's hyperparameters) goes into
  ``tb/validation`` too, with ``model/sparsity`` at the last step, so there is
  no third run in the Scalars legend. The HParams table shows the last value
  of each of that run's scalars: the last epoch's validation metrics, the
  final ``test/<metric>`` and ``model/sparsity``. No experiment record is
  written: TensorBoard then builds the table from every session under its
  logdir (typed columns, differing hyperparameters first), so the jobs of a
  Hydra multirun, each in its own directory, compare in one table.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp

from trainer.callbacks import Callback, Throughput, crossed
from trainer.masks import audit
from trainer.masks.checks import is_whole
from trainer.tb_layout import write_layout

__all__ = ["FreezeSummaries", "Profile", "TensorBoard", "current_learning_rate", "hparam_value", "mask_image", "model_stats",
           "variable_stats"]

log = logging.getLogger("trainer")

TRAIN, VALIDATION = "train", "validation"


def mask_image(trainable: np.ndarray) -> np.ndarray:
    """A trainable-mask as a grayscale image batch for ``tf.summary.image``.

    A 2-D mask ``(rows, cols)`` keeps its shape (a Dense kernel ``(in, out)``
    gives an image ``in`` pixels high and ``out`` wide). A 1-D mask becomes one
    row; a conv kernel ``(h, w, in, out)`` is reshaped to ``(h * w * in, out)``.
    White = trainable, black = frozen.

    Args:
      trainable: bool (or 0/1) array of any rank.

    Returns:
      float32 ``(1, rows, cols, 1)`` in {0, 1}.
    """
    m = np.asarray(trainable, dtype=np.float32)
    if m.ndim == 0:
        m = m.reshape(1, 1)
    elif m.ndim == 1:
        m = m.reshape(1, -1)
    elif m.ndim > 2:
        m = m.reshape(-1, m.shape[-1])
    return m[None, :, :, None]


def variable_stats(registry, rows: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Dict[str, float]]:
    """Mask statistics of every variable some rule covers (a variable without a rule has none to show).

    Args:
      registry: the :class:`~trainer.masks.MaskRegistry`.
      rows: :func:`trainer.masks.audit.variable_rows` of it, if already computed.

    Returns:
      ``{variable path: {"sparsity", "frozen_fraction", "frozen_drift",
      "trainable_norm"}}``, Python floats: the fraction of elements exactly 0,
      the fraction frozen, max |value - pinned| over frozen elements (0.0
      expected; ``inf`` for NaN) and the L2 norm of the trainable elements.
    """
    rows = audit.variable_rows(registry) if rows is None else rows
    covered = set(registry.covered_paths())
    return {r["path"]: {"sparsity": r["sparsity"], "frozen_fraction": r["frozen_fraction"],
                        "frozen_drift": r["drift"], "trainable_norm": r["trainable_norm"]} for r in rows
            if r["path"] in covered}


def model_stats(registry, rows: Optional[List[Dict[str, Any]]] = None) -> Dict[str, float]:
    """Sparsity and frozen fraction over all the plan's variables, weighted by element count.

    Returns:
      ``{"sparsity": exact zeros / elements, "frozen_fraction": frozen / elements}``.
    """
    return audit.model_stats(audit.variable_rows(registry) if rows is None else rows)


def current_learning_rate(optimizer) -> float:
    """The learning rate at the optimizer's current step (schedules evaluated)."""
    lr = optimizer.learning_rate
    return float(lr.numpy() if hasattr(lr, "numpy") else lr)


def hparam_value(value: Any) -> Any:
    """A value the HParams plugin accepts: bool, int, float or str (anything else as ``str``)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


class FreezeSummaries(Callback):
    """Writes scalars, mask statistics, histograms, mask images, texts and hparams (the run's TensorBoard logs).

    Named apart from ``keras.callbacks.TensorBoard`` (which also works in
    :meth:`trainer.Trainer.fit`); ``trainer.summaries.TensorBoard`` is this
    class under its former name.

    Args:
      logdir: the ``tb/`` directory; ``train/`` and ``validation/`` are made in it.
      summary_every_n_steps: scalars and mask statistics interval (steps).
      histogram_every_n_steps: weight and gradient histograms interval (steps).
      texts: ``{tag: markdown}`` written once at the first step (e.g. the
        config as YAML, the freeze plan as a Markdown table).
      hparams: ``{name: bool | int | float | str}`` for the HParams plugin
        (other values are written as ``str``), in ``tb/validation`` (see the
        module docstring); ``None`` writes no hparams.
      gradient_batch: a fixed ``(x, y)`` batch on which the masked gradients
        are computed (eagerly, with :meth:`Trainer.masked_gradients`) for the
        ``gradients/<path>`` histograms; ``None`` writes no gradient histograms.
        A fixed batch keeps the training data order untouched.
    """

    def __init__(self, logdir: str, *, summary_every_n_steps: int = 100, histogram_every_n_steps: int = 1000,
                 texts: Optional[Dict[str, str]] = None, hparams: Optional[Mapping[str, Any]] = None,
                 gradient_batch: Optional[Tuple[Any, Any]] = None):
        self.logdir = logdir
        self.summary_every_n_steps = summary_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.texts = dict(texts or {})
        self.hparams = None if hparams is None else {k: hparam_value(v) for k, v in hparams.items()}
        self.gradient_batch = gradient_batch
        self.train_writer = tf.summary.create_file_writer(os.path.join(logdir, TRAIN))
        self.val_writer = tf.summary.create_file_writer(os.path.join(logdir, VALIDATION))
        self.throughput = Throughput()
        self._mask_version: Optional[int] = None
        self._scalars_at: Optional[int] = None
        self._histograms_at: Optional[int] = None

    # ------------------------------------------------------------------ pieces
    def _masks_snapshot(self, registry) -> int:
        return hash(tuple(sorted((p, m.tobytes()) for p, m in registry.trainable_masks().items())))

    def write_masks(self, state, step: int, force: bool = False) -> bool:
        """Writes ``masks/<path>/trainable`` images of every variable of rank >= 2 that a rule covers.

        Skipped (returns False) when no mask changed since the last write,
        unless ``force``.
        """
        snapshot = self._masks_snapshot(state.registry)
        if not force and snapshot == self._mask_version:
            return False
        self._mask_version = snapshot
        with self.train_writer.as_default(step=step):
            covered = set(state.registry.covered_paths())
            for path, mask in state.registry.trainable_masks().items():
                if mask.ndim >= 2 and path in covered:
                    tf.summary.image(f"masks/{path}/trainable", mask_image(mask), max_outputs=1)
        return True

    def write_scalars(self, state, step: int, logs: Mapping[str, Any]) -> None:
        """Train metrics, learning rate, gradient norm, throughput and the mask statistics at ``step``."""
        self._scalars_at = step
        with self.train_writer.as_default(step=step):
            for name, value in logs.items():
                if not name.startswith(("val_", "test_")):
                    tf.summary.scalar(name, value)
            tf.summary.scalar("learning_rate", current_learning_rate(state.optimizer))
            if state.gradient_norm is not None:  # None: nan_policy="unchecked" computes no norm
                tf.summary.scalar("gradient_norm", state.gradient_norm)
            rates = self.throughput.measure(state)
            if not math.isnan(rates["seconds_per_step"]):
                tf.summary.scalar("examples_per_second", rates["examples_per_second"])
                tf.summary.scalar("seconds_per_step", rates["seconds_per_step"])
            rows = audit.variable_rows(state.registry)  # one audit serves both
            for path, stats in variable_stats(state.registry, rows).items():
                for stat, value in stats.items():
                    tf.summary.scalar(f"masks/{path}/{stat}", value)
            for stat, value in model_stats(state.registry, rows).items():
                tf.summary.scalar(f"model/{stat}", value)

    def write_regrowth(self, events: Sequence[Mapping[str, Any]], registry) -> None:
        """``regrow/<path>/{dropped, grown, drop_fraction, density}`` of each prune-and-regrow update, at its step."""
        for event in events:
            size = registry.trainable_mask(event["path"]).size
            with self.train_writer.as_default(step=event["step"]):
                for stat in ("dropped", "grown", "drop_fraction"):
                    tf.summary.scalar(f"regrow/{event['path']}/{stat}", float(event[stat]))
                tf.summary.scalar(f"regrow/{event['path']}/density", event["active"] / size)

    def write_histograms(self, state, step: int) -> None:
        """Histograms of each trainable variable's trainable elements and of its masked gradient there."""
        self._histograms_at = step
        registry = state.registry
        grads = {}
        if self.gradient_batch is not None:
            x, y = self.gradient_batch
            grads = {v.path: g for v, g in state.masked_gradients(x, y) if g is not None}
        with self.train_writer.as_default(step=step):
            for v in state.model.trainable_variables:
                trainable = registry.trainable_mask(v.path)
                if not trainable.any():
                    continue
                tf.summary.histogram(f"weights/{v.path}", np.asarray(v.numpy())[trainable])
                if v.path in grads:
                    tf.summary.histogram(f"gradients/{v.path}", np.asarray(grads[v.path].numpy())[trainable])

    def write_hparams(self, state) -> None:
        """This run's HParams session record (its hyperparameters) in ``tb/validation``."""
        with self.val_writer.as_default(step=state.step):
            hp.hparams(self.hparams)
        self.val_writer.flush()

    # ------------------------------------------------------------------- hooks
    def on_train_begin(self, state) -> None:
        step = state.step
        with self.train_writer.as_default(step=step):
            for tag, text in self.texts.items():
                tf.summary.text(tag, text)
        if self.hparams is not None:
            self.write_hparams(state)
        write_layout(self.train_writer, state.registry.covered_paths())  # Custom Scalars: the freezing view first
        self.write_masks(state, step, force=True)
        self.train_writer.flush()
        self.throughput.start(state)

    def on_execution_end(self, state, step_before: int, step: int, logs: Dict[str, Any]) -> None:
        self.throughput.tick()
        if crossed(step_before, step, self.summary_every_n_steps):
            self.write_scalars(state, step, logs)
        if crossed(step_before, step, self.histogram_every_n_steps):
            self.write_histograms(state, step)
        events = state.regrow_events
        if events:
            self.write_regrowth(events, state.registry)
        if state.registry.is_dynamic():
            # Rules that switch: an image per change. Prune and regrow moves masks every few
            # steps: an image at most every histogram_every_n_steps.
            regrowing = any(rule.regrow is not None for rule in state.registry.rules)
            if not regrowing or crossed(step_before, step, self.histogram_every_n_steps):
                self.write_masks(state, step)

    def on_epoch_end(self, state, epoch: int, step: int, logs: Dict[str, Any]) -> None:
        with self.train_writer.as_default(step=step):
            tf.summary.scalar("epoch", epoch)
        with self.val_writer.as_default(step=step):
            for name, value in logs.items():
                if name.startswith("val_"):
                    tf.summary.scalar(name[4:], value)
        self.val_writer.flush()
        self.throughput.resume()

    def on_train_end(self, state, step: int, logs: Dict[str, Any], status: str) -> None:
        if self._scalars_at != step:
            self.write_scalars(state, step, logs)
        if self._histograms_at != step:
            self.write_histograms(state, step)
        if self.hparams is not None:  # a final value for the HParams table
            with self.val_writer.as_default(step=step):
                tf.summary.scalar("model/sparsity", model_stats(state.registry)["sparsity"])
        self.train_writer.flush()
        self.val_writer.flush()

    def write_test(self, step: int, metrics: Mapping[str, float]) -> None:
        """Writes the final test metrics as ``test/<name>`` in the validation writer (an HParams table column)."""
        with self.val_writer.as_default(step=step):
            for name, value in metrics.items():
                tf.summary.scalar(f"test/{name}", value)
        self.val_writer.flush()

    def close(self) -> None:
        """Flushes and closes the summary writers (call once, at the end of the run)."""
        for writer in (self.train_writer, self.val_writer):
            writer.close()


TensorBoard = FreezeSummaries  # the former name (this project's hooks, not Keras's): kept for existing code


class Profile(Callback):
    """Captures a TensorBoard profile (trace viewer) of optimizer steps ``start`` to ``stop``.

    Steps count from 1 (step ``s`` is the update that makes
    ``optimizer.iterations == s``). The profiler starts between executions,
    before the execution that runs step ``start``, and stops after the one
    that reaches step ``stop``, so with ``steps_per_execution > 1`` whole
    executions are captured (and an epoch-end evaluation inside the window).
    The trace is written to ``<logdir>/plugins/profile/<time>/`` and shows in
    TensorBoard's Profile tab (which needs the ``tensorboard-plugin-profile``
    package installed where TensorBoard runs).

    Args:
      logdir: a TensorBoard run directory (e.g. ``tb/train``).
      steps: ``[start, stop]``, the first and last step to capture,
        ``1 <= start <= stop``.

    Raises:
      ValueError: ``steps`` is not two integers in order.
    """

    def __init__(self, logdir: str, steps: Sequence[int]):
        steps = list(steps)
        if len(steps) != 2 or not all(is_whole(s) for s in steps) \
                or not 1 <= steps[0] <= steps[1]:
            raise ValueError(f"log.profile_steps must be [start, stop] with integers 1 <= start <= stop, got {steps}")
        self.logdir = logdir
        self.start, self.stop = steps
        self.active = False
        self.done = False

    def _maybe_start(self, step: int) -> None:
        if not self.active and not self.done and self.start - 1 <= step < self.stop:
            try:
                tf.profiler.experimental.start(self.logdir)
            except Exception as err:  # another profiler running, or no profiler in this build
                log.warning("profiler not started: %s", err)
                self.done = True
                return
            self.active = True
            log.info("profiling steps %d-%d into %s", step + 1, self.stop, self.logdir)

    def _stop(self) -> None:
        if self.active:
            tf.profiler.experimental.stop()
            self.active, self.done = False, True

    def on_train_begin(self, state) -> None:
        self._maybe_start(state.step)

    def on_execution_end(self, state, step_before: int, step: int, logs: Dict[str, Any]) -> None:
        if self.active and step >= self.stop:
            self._stop()
        else:
            self._maybe_start(step)

    def on_train_end(self, state, step: int, logs: Dict[str, Any], status: str) -> None:
        self._stop()
