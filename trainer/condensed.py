"""Constant fan-in kernels condensed for inference: a gather and an ``[out, k]`` product instead of a sparse matmul.

A Dense kernel ``(in, out)`` in which every output unit keeps exactly ``k`` inputs (``elements: {fan_in: k}``,
:func:`trainer.masks.groups.fan_in_keep`) is stored as ``indices`` ``int32 [out, k]`` and ``values``
``float32 [out, k]``; the forward is ``y[b, o] = Σ_j x[b, indices[o, j]] · values[o, j] + bias[o]``: a gather of
``x`` to ``(batch, out, k)`` and a row-wise product, ``out · k`` multiply-adds per example instead of
``in · out``. This is SRigL's condensed representation (Lasby et al. 2023, *Dynamic Sparse Training with
Structured Sparsity*, section 4.4), which they measure faster than the dense layer at batch 1 on a CPU. Whether it
is on this CPU, and at batch 256, is in ``docs/structured-pruning.md``.

:class:`CondensedDense` is a Keras layer registered as ``trainer>CondensedDense``: a ``model.keras`` holding it
loads after ``import trainer``; its SavedModel and TFLite exports need nothing of this package.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import keras
import numpy as np

from trainer.stripping import _zero

__all__ = ["CondensedDense", "condense", "condense_model"]


def condense(kernel: np.ndarray, kept: np.ndarray, *, name: str = "?") -> Tuple[np.ndarray, np.ndarray]:
    """A Dense kernel with constant fan-in as ``(indices, values)``.

    Args:
      kernel: ``(in, out)`` float.
      kept: bool ``(in, out)``, the elements kept (trainable, or not frozen at zero); every column must keep the
        same number ``k`` of them.
      name: the layer's name, for messages.

    Returns:
      ``indices`` int32 ``(out, k)`` (ascending per unit) and ``values`` float32 ``(out, k)``.

    Raises:
      ValueError: columns keep different numbers of inputs (the message gives the smallest and largest).
    """
    kept = np.asarray(kept, bool)
    counts = kept.sum(axis=0)
    if counts.min() != counts.max():
        raise ValueError(f"condense: the units of {name!r} keep between {counts.min()} and {counts.max()} inputs; "
                         "a condensed kernel needs the same number for every unit (elements: {fan_in: k})")
    k = int(counts[0])
    indices = np.nonzero(kept.T)[1].reshape(kept.shape[1], k).astype(np.int32)  # row-major over (out, in)
    values = np.take_along_axis(np.asarray(kernel).T, indices, axis=1).astype(np.float32)
    return indices, values


@keras.saving.register_keras_serializable(package="trainer")
class CondensedDense(keras.layers.Layer):
    """A Dense layer of constant fan-in ``k``: ``act(Σ_j x[..., indices[o, j]] · values[o, j] + bias[o])``.

    Inputs are ``(batch, in)`` float32 (:func:`condense_model` condenses only Dense layers of 2-D inputs).

    Args:
      units: outputs ``out``.
      fan_in: inputs per unit ``k``.
      activation: a Keras activation name or ``None``.
      use_bias: add ``bias`` ``(out,)``.

    Weights (set them with :func:`condense` or ``set_weights([indices, values, bias])``): ``indices`` int32
    ``(out, k)``, ``values`` float32 ``(out, k)``, ``bias`` float32 ``(out,)``; none is trainable (inference only).
    """

    def __init__(self, units: int, fan_in: int, activation: Optional[str] = None, use_bias: bool = True,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.units, self.fan_in, self.use_bias = int(units), int(fan_in), bool(use_bias)
        self.activation = keras.activations.get(activation)

    def build(self, input_shape):
        self.indices = self.add_weight(name="indices", shape=(self.units, self.fan_in), dtype="int32",
                                       initializer="zeros", trainable=False)
        self.values = self.add_weight(name="values", shape=(self.units, self.fan_in), initializer="zeros",
                                      trainable=False)
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer="zeros",
                                    trainable=False) if self.use_bias else None

    def call(self, x):
        # Gathering rows of x transposed (in, batch) is a copy of contiguous rows: measured 4x faster on a CPU
        # at batch 256 than gathering along x's last axis (TensorFlow 2.21, one thread).
        gathered = keras.ops.take(keras.ops.transpose(x), self.indices, axis=0)  # (out, k, batch)
        y = keras.ops.transpose(keras.ops.sum(gathered * self.values[:, :, None], axis=1))  # (batch, out)
        if self.bias is not None:
            y = y + self.bias
        return self.activation(y)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "fan_in": self.fan_in,
                "activation": keras.activations.serialize(self.activation), "use_bias": self.use_bias}


def condense_model(model, registry=None, *, min_saving: float = 0.0):
    """A copy of ``model`` whose Dense layers of constant fan-in are :class:`CondensedDense`; same outputs.

    A Dense kernel of 2-D inputs is condensed when every unit keeps the same number ``k < in`` of inputs, counting
    as dropped the elements frozen at zero (by ``registry``; with ``None``, every zero), and ``1 - k / in >
    min_saving``.

    Args:
      model: a ``keras.Model`` that ``keras.models.clone_model`` can clone (Sequential or functional).
      registry: the :class:`~trainer.masks.MaskRegistry` that froze the zeros, or ``None``.
      min_saving: condense only kernels with more than this fraction dropped.

    Returns:
      The new model (weights copied; outputs equal up to float32 summation order).
    """
    plans = {}
    for layer in model.layers:
        if type(layer) is not keras.layers.Dense or getattr(layer, "lora_enabled", False) or \
                len(layer.input.shape) != 2:
            continue
        kernel = np.asarray(layer.kernel)
        dropped = _zero(layer.kernel, registry)
        counts = (~dropped).sum(axis=0)
        if counts.min() == counts.max() and 1 - counts[0] / kernel.shape[0] > min_saving and counts[0] > 0:
            plans[layer.name] = condense(kernel, ~dropped, name=layer.name)

    def clone(layer):
        if layer.name not in plans:
            return layer.__class__.from_config(layer.get_config())
        return CondensedDense(layer.units, plans[layer.name][0].shape[1], keras.activations.serialize(layer.activation),
                              layer.use_bias, name=layer.name)

    new = keras.models.clone_model(model, clone_function=clone)
    for layer in new.layers:
        old = model.get_layer(layer.name)
        if layer.name in plans:
            indices, values = plans[layer.name]
            layer.set_weights([indices, values] + ([np.asarray(old.bias)] if old.use_bias else []))
        else:
            layer.set_weights(old.get_weights())
    return new
