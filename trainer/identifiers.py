"""Keras string identifiers for what :class:`trainer.Trainer` takes, as ``Model.compile`` reads them."""

from __future__ import annotations

from typing import Any, Callable

import keras

__all__ = ["NamedLoss", "loss_from", "optimizer_from"]


class NamedLoss(keras.losses.Loss):
    """A per-example loss function (``keras.losses.get("mse")``) reduced as a Keras ``Loss`` (mean over the batch).

    Args:
      fn: ``(y_true, y_pred) -> float32 (batch,)`` per-example losses.
      name: the identifier it came from.
    """

    def __init__(self, fn: Callable, name: str):
        super().__init__(name=name)
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)


def loss_from(spec: Any) -> Callable:
    """``spec`` as a loss: a name (``"sparse_categorical_crossentropy"``, ``"SparseCategoricalCrossentropy"``)
    becomes a reducing ``keras.losses.Loss``; anything else is returned as given.

    Raises:
      ValueError: a name Keras does not know.
    """
    if not isinstance(spec, str):
        return spec
    loss = keras.losses.get(spec)
    return loss if isinstance(loss, keras.losses.Loss) else NamedLoss(loss, spec)


def optimizer_from(spec: Any) -> Any:
    """``spec`` as an optimizer: a name (``"adam"``) or config dict through ``keras.optimizers.get``, else as given.

    Raises:
      ValueError: an identifier Keras does not know.
    """
    return keras.optimizers.get(spec) if isinstance(spec, (str, dict)) else spec
