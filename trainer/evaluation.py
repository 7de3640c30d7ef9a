"""What the trainer computes outside the train step: evaluation, prediction, and masked gradients for summaries.

:class:`Evaluator` runs a model with ``training=False`` over batched
datasets, compiled once each: the mean loss and metrics
(:meth:`Evaluator.evaluate`) or the outputs (:meth:`Evaluator.predict`).
:func:`masked_gradients` computes one batch's masked gradients eagerly, for
the summaries between executions. None of them writes a weight, a slot or a
counter; the model meets the loss in :func:`trainer.step.outputs`, as in the
step.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from trainer.masks import MaskRegistry
from trainer.step import outputs


def make_metric(spec: Any) -> keras.metrics.Metric:
    """A Keras metric from a metric or a name (``"accuracy"``/``"acc"``: ``SparseCategoricalAccuracy``)."""
    if isinstance(spec, keras.metrics.Metric):
        return spec
    if spec in ("accuracy", "acc"):
        return keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    return keras.metrics.get(spec)


def clone_metric(metric: keras.metrics.Metric) -> keras.metrics.Metric:
    """A new metric of the same class and configuration (its own state)."""
    return type(metric).from_config(metric.get_config())


def results(loss_metric: keras.metrics.Metric, metrics: Sequence[keras.metrics.Metric]) -> Dict[str, float]:
    """``{"loss": ..., <metric name>: ...}``: the metrics' current results as Python floats."""
    out = {"loss": float(loss_metric.result())}
    for m in metrics:
        out[m.name] = float(m.result())
    return out


class Evaluator:
    """The evaluation and prediction of a model over batched datasets, each compiled on first use.

    Args:
      model: the model (called with ``training=False``).
      loss_fn: its loss ``(y_true, y_pred) -> scalar``.
      metrics: the evaluation metrics (the evaluator's own objects: reset at
        each :meth:`evaluate`).
      jit_compile: compile the evaluation step with XLA.
    """

    def __init__(self, model: keras.Model, loss_fn: Callable, metrics: Sequence[keras.metrics.Metric], *,
                 jit_compile: bool):
        self.model, self.loss_fn, self.metrics, self.jit_compile = model, loss_fn, list(metrics), jit_compile
        self.loss = keras.metrics.Mean(name="loss")
        self._evaluate: Optional[Callable] = None
        self._predict: Optional[Callable] = None

    def _compile_evaluation(self) -> Callable:
        def step(x, y):
            y_pred, loss, _ = outputs(self.model, self.loss_fn, x, y, training=False)
            self.loss.update_state(loss, sample_weight=tf.shape(y)[0])
            for metric in self.metrics:
                metric.update_state(y, y_pred)

        compiled_step = tf.function(step, jit_compile=self.jit_compile, reduce_retracing=True, autograph=False)

        @tf.function
        def run(dataset):
            for x, y in dataset:
                compiled_step(x, y)  # reads each variable's (identical) primary copy

        return run

    def evaluate(self, dataset: tf.data.Dataset) -> Dict[str, float]:
        """The mean loss per example and the metrics over a finite batched dataset of ``(x, y)``.

        Returns:
          ``{"loss": ..., <metric name>: ...}`` (Python floats).
        """
        if self._evaluate is None:
            self._evaluate = self._compile_evaluation()
        self.loss.reset_state()
        for m in self.metrics:
            m.reset_state()
        self._evaluate(dataset)
        return results(self.loss, self.metrics)

    def predict(self, dataset: tf.data.Dataset) -> np.ndarray:
        """The model's outputs for every batch of a dataset of inputs, concatenated: ``(N, ...)``.

        Raises:
          ValueError: the dataset has no batches.
        """
        if self._predict is None:
            self._predict = tf.function(lambda batch: self.model(batch, training=False), reduce_retracing=True)
        batches = [np.asarray(self._predict(batch)) for batch in dataset]
        if not batches:
            raise ValueError("predict got no batches")
        return np.concatenate(batches, axis=0)


def masked_gradients(model: keras.Model, loss_fn: Callable, registry: MaskRegistry, x: Any, y: Any) -> List[tuple]:
    """The masked gradients of the loss (with ``model.losses``) on one batch, eagerly, with ``training=False``.

    Returns:
      ``[(variable, gradient)]`` for ``registry.trainable_variables()``, each
      gradient dense with every frozen element exactly 0, or ``None``
      (:meth:`trainer.Trainer.masked_gradients`).
    """
    variables = registry.trainable_variables()
    with tf.GradientTape() as tape:
        _, loss, regularization = outputs(model, loss_fn, x, y, training=False)
        total = loss if regularization is None else loss + regularization
    grads = registry.mask_gradients(tape.gradient(total, variables), variables)
    return [(v, None if g is None else tf.convert_to_tensor(g)) for v, g in zip(variables, grads)]
