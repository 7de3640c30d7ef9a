"""``trainer.strip``: a smaller dense Keras model without the units and channels frozen at zero.

Pruning whole units of a ``Dense`` kernel or whole filters of a ``Conv`` kernel (``elements: {magnitude: 0.9,
groups: units}``) leaves the same dense model with zero columns: no faster. :func:`strip` builds a new model in
which those units are gone, with the dependent input rows of the next layer, their biases and their
BatchNormalization statistics, so the product is a smaller dense network (structured pruning: Li et al. 2017,
*Pruning Filters for Efficient ConvNets*; He et al. 2017, *Channel Pruning*).

A unit ``j`` of a layer ``P`` (a ``Dense`` or a ``Conv1D/2D/3D``) is removed when

- its kernel column ``P.kernel[..., j]`` is frozen at zero (on the inputs still kept): its output is then the
  constant ``c_j = act(b_j)``, carried through the per-channel layers after ``P`` (activations, BatchNorm in
  inference, Dropout, pooling, Flatten), and added into the next layer's bias: ``b'_k = b_k + c_j · Σ W[rows of
  j, k]`` (one row per position after ``Flatten``, every spatial tap of a ``padding='valid'`` convolution). This
  is exact up to float32 rounding. A non-zero constant into a ``padding='same'`` convolution is refused: the zero
  padding makes its contribution depend on the position;
- or its outgoing rows in the next layer are all frozen at zero: its output is never used.

Removals are repeated until none is found (a unit whose kept inputs were all removed is constant too). The last
layer's units (the model's outputs) and the model's inputs are never removed. Elements count as "frozen at zero"
when the registry freezes them and they hold 0 (``registry=None``: every element that holds 0).

Only chains are stripped here: a ``Sequential`` or a functional model in which every layer takes the one before
it. Anything else is refused with one line naming the layer (see :data:`KNOWN`), except a model with attention
(a ``MultiHeadAttention`` or a keras-hub ``TransformerEncoder``), which :func:`strip` hands to
:mod:`trainer.strip_attention` (heads and FFN units removed, residual connections kept).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import keras
import numpy as np

from trainer.masks.groups import _input_axis

__all__ = ["KNOWN", "StripError", "plan_strip", "strip", "strip_for_export"]

L = keras.layers
PRODUCERS = (L.Dense, L.Conv1D, L.Conv2D, L.Conv3D)
ELEMENTWISE = (L.Activation, L.ReLU, L.LeakyReLU, L.ELU, L.BatchNormalization, L.Dropout)
SPATIAL = (L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D, L.AveragePooling1D, L.AveragePooling2D,
           L.AveragePooling3D, L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalAveragePooling3D,
           L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D, L.Flatten)
KNOWN = PRODUCERS + ELEMENTWISE + SPATIAL + (L.Softmax,)
MIXING = ("softmax", "log_softmax")  # activations that mix units: allowed only where no unit is removed


class StripError(ValueError):
    """A model :func:`strip` cannot strip exactly; the message is one line naming the layer and why."""


def _fail(text: str) -> None:
    raise StripError(f"trainer.strip: {text}")


def _chain(model) -> List[Any]:
    """The model's layers in order, checked to form one chain of known single-input layers."""
    if not isinstance(model, keras.Model) or len(model.inputs) != 1 or len(model.outputs) != 1:
        _fail(f"needs a built keras.Model with one input and one output, got {type(model).__name__}")
    layers = [layer for layer in model.layers if not isinstance(layer, L.InputLayer)]
    previous = None
    for layer in layers:
        if not isinstance(layer, KNOWN):
            _fail(f"layer {layer.name!r} is of type {type(layer).__name__}, which strip does not know; it knows "
                  f"{sorted({k.__name__ for k in KNOWN})}")
        inputs = [t for node in layer._inbound_nodes for t in node.input_tensors]
        sources = [t._keras_history.operation for t in inputs]
        if len(inputs) != 1 or (previous is not None and sources[0] is not previous):
            follows = repr(previous.name) if previous is not None else "the model's input"
            _fail(f"layer {layer.name!r} ({type(layer).__name__}) does not simply follow {follows}: strip removes "
                  "units along a chain of layers only (a residual or other branch is not supported)")
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            _fail(f"layer {layer.name!r} has data_format={layer.data_format!r}; strip needs channels_last")
        if isinstance(layer, L.BatchNormalization) and layer.axis not in (-1, len(layer.input.shape) - 1):
            _fail(f"layer {layer.name!r} normalizes axis {layer.axis}; strip needs the last (channel) axis")
        if getattr(layer, "lora_enabled", False):
            _fail(f"layer {layer.name!r} has LoRA enabled; merge it into the kernel before stripping")
        if isinstance(layer, PRODUCERS[1:]) and getattr(layer, "groups", 1) != 1:
            _fail(f"layer {layer.name!r} is a grouped convolution (groups={layer.groups}); strip needs groups=1")
        previous = layer
    if previous is None or previous is not model.outputs[0]._keras_history.operation:
        _fail("the model's output is not its last layer's; strip removes units along a chain of layers only")
    return layers


def _zero(variable, registry) -> np.ndarray:
    """Elements frozen at zero: frozen by ``registry`` (if any) and holding 0."""
    value = np.asarray(keras.ops.convert_to_numpy(variable))
    zero = value == 0
    if registry is not None:
        zero &= ~np.asarray(registry.trainable_mask(variable.path), dtype=bool)
    return zero


class _Stage:
    """A producer, the per-channel layers after it, and how its units reach the next producer's input rows."""

    def __init__(self, producer, between: List[Any]):
        self.producer, self.between = producer, between
        self.positions = 1  # next producer's input rows per unit (Flatten: one per spatial position)
        for layer in between:
            if isinstance(layer, L.Flatten):
                self.positions *= int(np.prod(layer.input.shape[1:-1], dtype=np.int64))
            if isinstance(layer, L.Softmax) or getattr(getattr(layer, "activation", None), "__name__", "") in MIXING:
                self.mixing = layer
        self.units = int(producer.kernel.shape[-1])

    mixing = None

    def rows(self, channels: np.ndarray) -> np.ndarray:
        """The next producer's input rows fed by ``channels`` (units of this producer)."""
        grid = np.arange(self.positions * self.units).reshape(self.positions, self.units)
        return grid[:, channels].reshape(-1)

    def constants(self, bias: np.ndarray) -> np.ndarray:
        """``(positions, units)`` float64: each unit's output, per position of the next producer's input rows,
        when its pre-activation is ``bias`` (its kernel column is zero), after the per-channel layers."""
        out = np.asarray(keras.ops.convert_to_numpy(self.producer.activation(bias[None].astype(np.float32))))[0]
        for layer in self.between:
            if isinstance(layer, ELEMENTWISE):
                shape = tuple(layer.input.shape[1:])
                flat = np.tile(out, shape[-1] // out.size)  # after a Flatten: one value per position
                value = layer(flat.reshape((1,) * len(shape) + (shape[-1],)).astype(np.float32), training=False)
                out = np.asarray(keras.ops.convert_to_numpy(value)).reshape(-1)
        return np.broadcast_to(np.asarray(out, np.float64).reshape(-1, self.units), (self.positions, self.units))


def _split(layers: List[Any]) -> tuple:
    """``(leading layers, stages)``: the layers before the first producer, then one stage per producer."""
    starts = [i for i, layer in enumerate(layers) if isinstance(layer, PRODUCERS)]
    if not starts:
        return layers, []
    stages = [_Stage(layers[s], layers[s + 1:e]) for s, e in zip(starts, starts[1:] + [len(layers)])]
    return layers[:starts[0]], stages


def plan_strip(model, registry=None) -> Dict[str, Dict[str, Any]]:
    """Which units of every producer :func:`strip` keeps, with their kernel and bias (constants folded in).

    Two passes over the producers ``0..n-1``: forward, the *constant* units of ``i`` (kernel column frozen at
    zero on every input row that is not a constant unit of ``i-1``, whose outputs are folded into ``i``'s
    bias); backward, the *unused* units of ``i`` (rows in ``i+1`` frozen at zero on every column that is not
    unused in ``i+1``). Both are removed; the last producer's units never are.

    Args:
      model: a ``keras.Model`` chain (see the module docstring).
      registry: the :class:`~trainer.masks.MaskRegistry` that froze the zeros, or ``None``.

    Returns:
      ``{producer name: {"kept": int64 array of kept unit indices, "units": units before, "kernel": float32
      kernel of the kept input rows and units, "bias": float32 bias of the kept units, or None}}``.

    Raises:
      StripError: a layer or a removal strip cannot do exactly (one line).
    """
    _, stages = _split(_chain(model))
    n = len(stages)
    kernels = [np.asarray(keras.ops.convert_to_numpy(s.producer.kernel), np.float64) for s in stages]
    zeros = [_zero(s.producer.kernel, registry) for s in stages]
    biases = [np.asarray(keras.ops.convert_to_numpy(s.producer.bias), np.float64) if s.producer.use_bias
              else np.zeros(s.units) for s in stages]

    def by_unit(array: np.ndarray, i: int) -> np.ndarray:  # producer i+1's kernel as (units of i, rest)
        rows = np.moveaxis(array, _input_axis(array.shape), 0)
        return np.moveaxis(rows.reshape((stages[i].positions, stages[i].units) + rows.shape[1:]), 1, 0).reshape(
            stages[i].units, -1, rows.shape[-1])  # (units of i, positions x taps, units of i+1)

    constant = [np.zeros(s.units, bool) for s in stages]
    for i in range(n - 1):  # forward: constant outputs
        live_rows = np.ones(zeros[i].shape[_input_axis(zeros[i].shape)], bool)
        if i > 0:
            live_rows[stages[i - 1].rows(np.flatnonzero(constant[i - 1]))] = False
        z = np.compress(live_rows, zeros[i], axis=_input_axis(zeros[i].shape))
        constant[i] = z.reshape(-1, stages[i].units).all(axis=0)
    unused = [np.zeros(s.units, bool) for s in stages]
    for i in reversed(range(n - 1)):  # backward: outputs no used unit reads
        unused[i] = by_unit(zeros[i + 1], i)[:, :, ~unused[i + 1]].all(axis=(1, 2))
    kept = [np.flatnonzero(~(constant[i] | unused[i])) for i in range(n)]
    plans, folded = {}, []
    for i, stage in enumerate(stages):
        bias, kernel = biases[i].copy(), kernels[i]
        if i > 0:  # the constant outputs of the previous producer's removed units, into this bias
            prev, gone = stages[i - 1], np.flatnonzero(constant[i - 1])
            values = prev.constants(folded[i - 1])[:, gone]  # (positions, gone)
            w = by_unit(kernel, i - 1)[gone]  # (gone, positions x taps, units)
            w = w.reshape(len(gone), prev.positions, w.shape[1] // prev.positions, w.shape[-1])
            padding = getattr(stage.producer, "padding", "valid")
            for unit, value, rows in zip(gone, values.T, w):
                if np.any(value != 0) and np.any(rows[..., ~unused[i]]) and padding != "valid":  # Dense: "valid"
                    _fail(f"unit {int(unit)} of {prev.producer.name!r} is frozen at zero but outputs the constant "
                          f"{value[0]:.6g} into {stage.producer.name!r}, a convolution with padding={padding!r}: the "
                          "zero padding makes its contribution depend on the position, so it cannot be folded into "
                          "the bias; pin that unit's bias (and BatchNorm offset) to zero too, or use padding='valid'")
            bias = bias + np.einsum("pg,gpto->o", values, w)
            kernel = np.take(kernel, prev.rows(kept[i - 1]), axis=_input_axis(kernel.shape))
        folded.append(bias)  # full width: what a constant unit outputs before its activation
        if kept[i].size == 0:
            _fail(f"every unit of {stage.producer.name!r} would be removed (frozen at zero, or read by no kept "
                  "unit): the model's output no longer depends on its input, so there is no smaller model to build")
        if kept[i].size < stage.units and stage.mixing is not None:
            _fail(f"layer {stage.mixing.name!r} mixes the units of {stage.producer.name!r} (softmax), so "
                  "removing some of them would change the others")
        if kept[i].size < stage.units and getattr(stage.producer.activation, "__name__", "") in MIXING:
            _fail(f"layer {stage.producer.name!r} has a {stage.producer.activation.__name__} activation, which "
                  "mixes its units, so removing some of them would change the others")
        needs_bias = stage.producer.use_bias or bool(np.any(bias != 0))
        plans[stage.producer.name] = {
            "kept": kept[i], "units": stage.units,
            "kernel": np.take(kernel, kept[i], axis=-1).astype(np.float32),
            "bias": bias[kept[i]].astype(np.float32) if needs_bias else None,
        }
    return plans


def strip(model, registry=None, *, name: Optional[str] = None, plans: Optional[Dict[str, Any]] = None):
    """A new, smaller Keras model without the units and channels frozen at zero; same outputs.

    Args:
      model: a ``keras.Model`` whose layers form a chain of ``Dense``, ``Conv1D/2D/3D``, ``BatchNormalization``,
        activations, ``Dropout``, pooling and ``Flatten`` (``channels_last``), float32.
      registry: the :class:`~trainer.masks.MaskRegistry` whose rules froze the zeros (only its frozen zeros
        count), or ``None`` (every element holding 0 counts).
      name: the new model's name (default: the model's).

      plans: :func:`plan_strip` of the same model and registry, when the caller already made it (not for a
        model with attention).

    Returns:
      A functional ``keras.Model`` of plain Keras layers (its ``model.keras`` loads without ``trainer``), same
      input and output shapes, whose outputs equal ``model``'s up to float32 rounding (the folded constants
      are summed in float64 and rounded once).

    A model with attention (``MultiHeadAttention``, keras-hub ``TransformerEncoder``) is stripped by
    :func:`trainer.strip_attention.strip_attention` instead: heads and FFN units removed, residuals kept.

    Raises:
      StripError: one line naming the layer: a layer type strip does not know, a branch (residual), a
        ``channels_first`` layer, a softmax across removed units, a constant into a ``padding='same'``
        convolution, a layer with every unit removed (and, with attention, those of
        :func:`trainer.strip_attention.plan_attention`).

    Examples:
      >>> small = trainer.strip(model, registry)   # doctest: +SKIP
      >>> small.save("stripped.keras")            # doctest: +SKIP
    """
    from trainer import strip_attention  # imports this module

    if strip_attention.has_attention(model):
        return strip_attention.strip_attention(model, registry, name=name)
    layers = _chain(model)
    plans = plan_strip(model, registry) if plans is None else plans
    kept_prev: Optional[np.ndarray] = None  # kept units of the last producer passed (BatchNorm slices by them)
    source = model.inputs[0]
    x = inputs = keras.Input(shape=source.shape[1:], dtype=source.dtype, name=getattr(source, "name", None))
    for layer in layers:
        config = layer.get_config()
        plan = plans.get(layer.name)  # planned producers only
        if plan is not None:
            config["units" if isinstance(layer, L.Dense) else "filters"] = int(plan["kept"].size)
            config["use_bias"] = plan["bias"] is not None
            weights = [plan["kernel"]] + ([plan["bias"]] if plan["bias"] is not None else [])
            kept_prev, kept_units = plan["kept"], plan["units"]
        elif isinstance(layer, L.BatchNormalization) and kept_prev is not None:
            units, width = kept_units, int(layer.input.shape[-1])  # after a Flatten: one feature per position
            index = (np.arange(width // units)[:, None] * units + kept_prev[None, :]).reshape(-1)
            weights = [w[index] for w in layer.get_weights()]
        else:
            weights = layer.get_weights()
        new = type(layer).from_config(config)
        x = new(x)
        new.set_weights(weights)
    return keras.Model(inputs, x, name=name or model.name)


def strip_for_export(model, registry) -> tuple:
    """``(stripped model or None, summary)`` for ``export.strip``: a refusal is reported, not raised.

    The summary is ``{"params": n, "params_before": m, "units": {layer: [kept, before]}}`` (with attention,
    also ``"heads": {layer: [kept, before]}``) or ``{"refused": "<the one-line StripError>"}`` (the run's
    other exports are still written).
    """
    from trainer import strip_attention

    try:
        if strip_attention.has_attention(model):
            plan = strip_attention.plan_attention(model, registry)
            small, kept = strip_attention.strip_attention(model, registry, plan=plan), strip_attention.summary(plan)
        else:
            plans = plan_strip(model, registry)
            small = strip(model, registry, plans=plans)
            kept = {"units": {name: [int(p["kept"].size), p["units"]] for name, p in plans.items()}}
    except StripError as err:
        return None, {"refused": str(err)}
    return small, {"params": int(small.count_params()), "params_before": int(model.count_params()), **kept}
