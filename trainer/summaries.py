"""TensorBoard summaries written from the outer loop through ``tf.summary``.

Train and validation go to separate writers (``tb/train``, ``tb/validation``),
so TensorBoard overlays them under the same tags (``loss``, ``accuracy``).
Per covered variable the tags are ``masks/<variable path>/<stat>`` with stats
``sparsity`` (fraction of exact zeros), ``frozen_fraction``, ``frozen_drift``
(max |value - pinned| over frozen elements; must stay 0) and
``trainable_norm`` (L2 norm of the trainable elements).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import numpy as np
import tensorflow as tf

from trainer.callbacks import Callback, crossed


def mask_image(trainable: np.ndarray) -> np.ndarray:
    """A trainable-mask as a grayscale image batch for ``tf.summary.image``.

    A 1-D mask becomes one row; a conv kernel ``(h, w, in, out)`` is reshaped
    to ``(h * w * in, out)``. White = trainable, black = frozen.

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


def variable_stats(registry) -> Dict[str, Dict[str, float]]:
    """Per trainable or covered variable: sparsity, frozen_fraction, frozen_drift, trainable_norm."""
    drift = registry.drift()
    out = {}
    for row in registry.plan():
        path = row["path"]
        value = np.asarray(registry_variable(registry, path).numpy())
        trainable = registry.trainable_mask(path)
        out[path] = {
            "sparsity": float(np.count_nonzero(value == 0) / max(value.size, 1)),
            "frozen_fraction": float(row["frozen_fraction"]),
            "frozen_drift": float(drift.get(path, 0.0)),
            "trainable_norm": float(np.linalg.norm(value[trainable].astype(np.float64))),
        }
    return out


def current_learning_rate(optimizer) -> float:
    """The learning rate at the optimizer's current step (schedules evaluated)."""
    lr = optimizer.learning_rate
    return float(lr.numpy() if hasattr(lr, "numpy") else lr)


def registry_variable(registry, path: str):
    for v in registry.model.variables:
        if v.path == path:
            return v
    raise KeyError(path)


class TensorBoard(Callback):
    """Writes scalars, per-variable mask statistics, histograms, mask images and text.

    Args:
      logdir: the ``tb/`` directory; ``train/`` and ``validation/`` are made in it.
      summary_every_n_steps: scalars and mask statistics interval.
      histogram_every_n_steps: histograms interval.
      texts: ``{tag: markdown}`` written once at the first step (e.g. config, freeze plan).
    """

    def __init__(self, logdir: str, *, summary_every_n_steps: int = 100, histogram_every_n_steps: int = 1000,
                 texts: Optional[Dict[str, str]] = None):
        self.logdir = logdir
        self.summary_every_n_steps = summary_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.texts = dict(texts or {})
        self.train_writer = tf.summary.create_file_writer(os.path.join(logdir, "train"))
        self.val_writer = tf.summary.create_file_writer(os.path.join(logdir, "validation"))
        self._mask_version: Optional[int] = None

    def _masks_snapshot(self, registry):
        return tuple(sorted((p, m.tobytes()) for p, m in registry.trainable_masks().items()))

    def write_masks(self, trainer, step: int, force: bool = False) -> None:
        snapshot = hash(self._masks_snapshot(trainer.registry))
        if not force and snapshot == self._mask_version:
            return
        self._mask_version = snapshot
        with self.train_writer.as_default(step=step):
            for path in trainer.registry.covered_paths():
                mask = trainer.registry.trainable_mask(path)
                if mask.ndim >= 2:
                    tf.summary.image(f"masks/{path}/trainable", mask_image(mask), max_outputs=1)

    def write_scalars(self, trainer, step: int, logs: Dict[str, Any]) -> None:
        with self.train_writer.as_default(step=step):
            for name, value in logs.items():
                if not name.startswith("val_"):
                    tf.summary.scalar(name, value)
            tf.summary.scalar("learning_rate", current_learning_rate(trainer.optimizer))
            for path, stats in variable_stats(trainer.registry).items():
                for stat, value in stats.items():
                    tf.summary.scalar(f"masks/{path}/{stat}", value)

    def write_histograms(self, trainer, step: int) -> None:
        with self.train_writer.as_default(step=step):
            for v in trainer.model.trainable_variables:
                value = np.asarray(v.numpy())
                tf.summary.histogram(f"weights/{v.path}", value[trainer.registry.trainable_mask(v.path)])

    def on_train_begin(self, trainer) -> None:
        step = trainer.step
        with self.train_writer.as_default(step=step):
            for tag, text in self.texts.items():
                tf.summary.text(tag, text)
        self.write_masks(trainer, step, force=True)
        self.train_writer.flush()

    def on_execution_end(self, trainer, step_before: int, step: int, logs: Dict[str, Any]) -> None:
        if crossed(step_before, step, self.summary_every_n_steps):
            self.write_scalars(trainer, step, logs)
        if crossed(step_before, step, self.histogram_every_n_steps):
            self.write_histograms(trainer, step)
        if trainer.registry.is_dynamic():
            self.write_masks(trainer, step)

    def on_epoch_end(self, trainer, epoch: int, step: int, logs: Dict[str, Any]) -> None:
        with self.train_writer.as_default(step=step):
            tf.summary.scalar("epoch", epoch)
        with self.val_writer.as_default(step=step):
            for name, value in logs.items():
                if name.startswith("val_"):
                    tf.summary.scalar(name[4:], value)
        self.val_writer.flush()

    def on_train_end(self, trainer, step: int, logs: Dict[str, Any], status: str) -> None:
        self.write_scalars(trainer, step, {k: v for k, v in logs.items() if not k.startswith("val_")})
        self.write_histograms(trainer, step)
        self.train_writer.flush()
        self.val_writer.flush()

    def write_test(self, step: int, metrics: Dict[str, float]) -> None:
        """Writes the final test metrics as ``test/<name>`` in the validation writer."""
        with self.val_writer.as_default(step=step):
            for name, value in metrics.items():
                tf.summary.scalar(f"test/{name}", value)
        self.val_writer.flush()

    def close(self) -> None:
        self.train_writer.close()
        self.val_writer.close()
