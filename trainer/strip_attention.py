"""``trainer.strip`` of models with attention: heads removed from ``MultiHeadAttention``, FFN units removed.

:func:`trainer.strip` hands a model that holds a ``keras.layers.MultiHeadAttention`` (or a subclass) or a
keras-hub ``TransformerEncoder`` to :func:`strip_attention`. The residual stream (the hidden size) never
changes, so residual additions and ``LayerNormalization`` are kept as they are; what goes:

- **heads** (Michel et al. 2019, *Are Sixteen Heads Really Better than One?*): head ``h`` of an attention layer
  is removed when its slice of the output projection ``attention_output/kernel[h]`` is frozen at zero (it adds
  nothing), or, without ``use_gate``, when its value-kernel slice ``value/kernel[:, h, :]`` is (then its
  values are the constant ``value/bias[h]``, attention rows sum to 1, and ``value/bias[h] @
  attention_output/kernel[h]`` is folded into the output bias). The new layer has ``num_heads`` = the kept
  heads, the same ``key_dim`` / ``value_dim`` / output size; the query, key, value (and gate) kernels and
  biases are sliced along their heads axis (:mod:`trainer.masks.heads`), the output kernel along its own;
- **FFN units**: a ``Dense`` read by exactly one ``Dense`` (through activations and ``Dropout`` only) loses
  the units whose kernel column is frozen at zero (their constant ``act(bias)`` is folded into the next
  bias) or whose rows in the next kernel are (nothing reads them), with those rows. In a keras-hub
  ``TransformerEncoder`` that pair is its ``feedforward_intermediate_dense`` → ``feedforward_output_dense``.

A ``TransformerEncoder`` is rebuilt from plain Keras layers that compute what its ``call`` computes
(attention, dropout, residual addition, layer norm, the two FFN ``Dense``, dropout, residual addition, layer
norm, in the order ``normalize_first`` sets), so the stripped ``model.keras`` loads without keras-hub or
``trainer``. A removal that is not valid is refused with one line (:class:`~trainer.stripping.StripError`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import keras
import numpy as np

from trainer.masks.heads import head_axes
from trainer.stripping import MIXING, _fail, _zero

__all__ = ["has_attention", "plan_attention", "strip_attention"]

L = keras.layers
PASS = (L.Activation, L.ReLU, L.LeakyReLU, L.ELU, L.Dropout)  # may sit between an FFN's two Dense layers
# keras-hub TransformerEncoder.get_config() keys that _encoder rebuilds (those of keras-hub 0.32); a newer option
# is refused rather than dropped
ENCODER_OPTIONS = {"name", "trainable", "dtype", "intermediate_dim", "num_heads", "dropout", "activation",
                   "layer_norm_epsilon", "kernel_initializer", "bias_initializer", "normalize_first"}


def _keras_own(operation) -> bool:
    """A layer or ``keras.ops`` operation defined by Keras itself (copied unchanged: it serializes with Keras)."""
    return type(operation).__module__.split(".")[0] == "keras"


def _is_add(operation) -> bool:
    return isinstance(operation, L.Add) or (type(operation).__name__ == "Add" and _keras_own(operation))


def _is_encoder(layer) -> bool:
    """A keras-hub ``TransformerEncoder`` (recognized without importing keras-hub)."""
    return any(c.__name__ == "TransformerEncoder" and c.__module__.startswith("keras_hub")
               for c in type(layer).__mro__)


def has_attention(model) -> bool:
    """Whether ``model`` holds a ``MultiHeadAttention`` or a keras-hub ``TransformerEncoder`` (top level)."""
    return any(isinstance(l, L.MultiHeadAttention) or _is_encoder(l) for l in getattr(model, "layers", []))


def _np(variable) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(variable), np.float64)


def _functional(model):
    if isinstance(model, keras.Sequential):  # the same layers, as a functional graph
        return keras.Model(model.inputs[0], model.outputs[0], name=model.name)
    if not isinstance(model, keras.Model) or not hasattr(model, "_nodes_by_depth"):
        _fail(f"needs a built Sequential or functional keras.Model, got {type(model).__name__}")
    return model


def _plan_heads(mha, name: str, registry) -> Dict[str, Any]:
    """Kept heads of one attention layer and its sliced weights (``mha.weights`` order)."""
    if any(getattr(d, "lora_enabled", False) for d in (mha._query_dense, mha._key_dense, mha._value_dense,
                                                         mha._output_dense)):
        _fail(f"layer {name!r} has LoRA enabled; merge it into the kernels before stripping")
    if mha._output_dense.kernel.ndim != 3 or mha._value_dense.kernel.ndim != 3:
        _fail(f"layer {name!r} has an output_shape of several axes; strip removes heads of a MultiHeadAttention "
              "whose output has one feature axis only")
    heads = int(mha.num_heads)
    out_zero = _zero(mha._output_dense.kernel, registry).reshape(heads, -1).all(axis=1)
    value_zero = np.zeros(heads, bool)
    if not getattr(mha, "_use_gate", False):
        value_zero = np.moveaxis(_zero(mha._value_dense.kernel, registry), 1, 0).reshape(heads, -1).all(axis=1)
    kept = np.flatnonzero(~(out_zero | value_zero))
    if kept.size == 0:
        _fail(f"every head of {name!r} would be removed (its output or value slices are frozen at zero): the layer "
              "would output only its bias, so there is no smaller attention layer to build")
    axes = head_axes([mha])
    weights = []
    for variable in mha.weights:
        value = _np(variable)
        if variable is getattr(mha._output_dense, "bias", None):  # constant values of removed value-zero heads
            gone = np.flatnonzero(value_zero & ~out_zero)
            if gone.size and mha._value_dense.bias is not None:
                value = value + np.einsum("gv,gvo->o", _np(mha._value_dense.bias)[gone],
                                          _np(mha._output_dense.kernel)[gone])
        if id(variable) in axes:
            value = np.take(value, kept, axis=axes[id(variable)])
        weights.append(value.astype(np.float32))
    return {"kept": kept, "heads": heads, "weights": weights}


def _constants(dense, between: List[Any], units: np.ndarray) -> np.ndarray:
    """float64 outputs of ``dense``'s ``units`` when their kernel column is zero, after ``between``."""
    bias = _np(dense.bias)[units] if dense.use_bias else np.zeros(units.size)
    out = dense.activation(bias[None].astype(np.float32))
    for layer in between:
        out = layer(out, training=False)
    return np.asarray(keras.ops.convert_to_numpy(out), np.float64)[0]


def _plan_pair(first, between: List[Any], second, registry, dense: Dict[str, Dict[str, Any]], names) -> None:
    """Units ``first`` keeps (rows of ``second``), constants folded into ``second``'s bias; fills ``dense``."""
    a, b = dense[names[0]], dense[names[1]]
    constant = _zero(first.kernel, registry).all(axis=0)
    unused = _zero(second.kernel, registry).all(axis=1)
    kept = np.flatnonzero(~(constant | unused))
    if kept.size == 0:
        _fail(f"every unit of {names[0]!r} would be removed (frozen at zero, or read by no kept unit): the "
              "model's output no longer depends on it, so there is no smaller model to build")
    mixing = [l.name for l in between if isinstance(l, L.Softmax)]
    if getattr(first.activation, "__name__", "") in MIXING:
        mixing.append(names[0])
    if kept.size < constant.size and mixing:
        _fail(f"layer {mixing[0]!r} mixes the units of {names[0]!r} (softmax), so removing some of them would "
              "change the others")
    folded = np.flatnonzero(constant & ~unused)
    if folded.size:
        b["bias_add"] = b["bias_add"] + _constants(first, between, folded) @ _np(second.kernel)[folded]
    a["units"], b["rows"] = kept, kept


def _refuse_narrow(name: str, zero_units: np.ndarray, feeds: str, residual: bool) -> None:
    shown = zero_units[:8].tolist() + (["..."] if zero_units.size > 8 else [])
    why = "; a residual addition's two sides must keep the hidden size, and" if residual else ";"
    _fail(f"units {shown} of {name!r} are frozen at zero, but {name!r} feeds {feeds}{why} strip removes units "
          "only of a Dense read by exactly one Dense (through activations and Dropout): unfreeze them")


def _dense_entry(layer) -> Dict[str, Any]:
    units = int(layer.kernel.shape[-1])
    return {"layer": layer, "units": np.arange(units), "before": units,
            "rows": np.arange(int(layer.kernel.shape[0])), "bias_add": np.zeros(units)}


def plan_attention(model, registry=None) -> Dict[str, Dict[str, Any]]:
    """What :func:`strip_attention` keeps: heads per attention layer, units and rows per ``Dense``.

    Args:
      model: a built ``Sequential`` or functional ``keras.Model`` with attention (see the module docstring).
      registry: the :class:`~trainer.masks.MaskRegistry` whose rules froze the zeros, or ``None`` (every 0).

    Returns:
      ``{"heads": {layer: {"kept": int64 kept heads, "heads": heads before, "weights": float32 list}},
      "dense": {layer: {"units": kept units, "before": units before, "rows": kept input rows, "kernel",
      "bias": float32 (bias None where the layer has none and nothing was folded)}}}``; the layers of a
      ``TransformerEncoder`` ``enc`` are named ``enc/self_attention_layer``, ``enc/feedforward_intermediate_dense``
      and ``enc/feedforward_output_dense``.

    Raises:
      StripError: one line naming the layer: a layer type strip does not know here, a layer called more than
        once, a masked or ``return_attention_scores`` encoder call, units frozen at zero in a ``Dense`` that
        does not feed exactly one ``Dense`` (e.g. a residual addition, the hidden size), every head or unit of
        a layer removed, a softmax across removed units.
    """
    graph = _functional(model)
    nodes = {id(n) for group in graph._nodes_by_depth.values() for n in group}
    outputs = {id(t._keras_history.operation) for t in graph.outputs}
    layers = [l for l in graph.operations if not isinstance(l, L.InputLayer)]
    heads: Dict[str, Dict[str, Any]] = {}
    dense: Dict[str, Dict[str, Any]] = {}
    for layer in layers:
        if not (_keras_own(layer) or _is_encoder(layer)):
            _fail(f"layer {layer.name!r} is of type {type(layer).__name__}, which strip does not know: in a model with "
                  "attention it copies Keras' own layers and keras.ops calls unchanged and rebuilds keras-hub's "
                  "TransformerEncoder, so that the stripped model.keras needs no other code")
        inbound = [n for n in layer._inbound_nodes if id(n) in nodes]
        if len(inbound) != 1:
            _fail(f"layer {layer.name!r} is called {len(inbound)} times in the model; strip needs each layer "
                  "called once")
        if getattr(layer, "lora_enabled", False):
            _fail(f"layer {layer.name!r} has LoRA enabled; merge it into the kernel before stripping")
        kwargs = inbound[0].arguments.kwargs
        if (isinstance(layer, L.MultiHeadAttention) or _is_encoder(layer)) and kwargs.get("return_attention_scores"):
            _fail(f"layer {layer.name!r} is called with return_attention_scores=True; strip would change the "
                  "scores' number of heads")
        if _is_encoder(layer):
            masked = [k for k in ("padding_mask", "attention_mask") if kwargs.get(k) is not None]
            if masked or getattr(inbound[0].arguments.args[0], "_keras_mask", None) is not None:
                _fail(f"layer {layer.name!r} (TransformerEncoder) is called with a "
                      f"{masked[0] if masked else 'Keras mask'}; strip rebuilds an encoder only without masks")
            name = layer.name
            unknown = sorted(set(layer.get_config()) - ENCODER_OPTIONS)
            if unknown:
                _fail(f"layer {name!r} (TransformerEncoder) has options {unknown} that strip does not rebuild (it "
                      f"knows {sorted(ENCODER_OPTIONS)})")
            heads[f"{name}/self_attention_layer"] = _plan_heads(layer._self_attention_layer,
                                                                 f"{name}/self_attention_layer", registry)
            pair = (f"{name}/feedforward_intermediate_dense", f"{name}/feedforward_output_dense")
            first, second = layer._feedforward_intermediate_dense, layer._feedforward_output_dense
            dense[pair[0]], dense[pair[1]] = _dense_entry(first), _dense_entry(second)
            _plan_pair(first, [], second, registry, dense, pair)
            zero = np.flatnonzero(_zero(second.kernel, registry).all(axis=0))
            if zero.size:
                _refuse_narrow(pair[1], zero, f"the residual addition in {name!r}", True)
        elif isinstance(layer, L.MultiHeadAttention):
            heads[layer.name] = _plan_heads(layer, layer.name, registry)
        elif isinstance(layer, L.Dense):
            dense.setdefault(layer.name, _dense_entry(layer))

    def consumers(layer) -> List[Any]:
        return [n.operation for n in layer._outbound_nodes if id(n) in nodes]

    for name, entry in list(dense.items()):
        if "/" in name:
            continue  # inside an encoder: planned above
        layer, between, current = entry["layer"], [], entry["layer"]
        while id(current) not in outputs:  # through activations and Dropout to the one Dense that reads it
            feeds = consumers(current)
            if len(feeds) == 1 and isinstance(feeds[0], PASS):
                between.append(feeds[0])
                current = feeds[0]
                continue
            if len(feeds) == 1 and isinstance(feeds[0], L.Dense):
                _plan_pair(layer, between, feeds[0], registry, dense, (name, feeds[0].name))
                break
            zero = np.flatnonzero(_zero(layer.kernel, registry).all(axis=0))
            if zero.size:
                target = (f"{len(feeds)} layers {[f.name for f in feeds]}" if len(feeds) != 1
                          else f"{feeds[0].name!r} ({type(feeds[0]).__name__})")
                _refuse_narrow(name, zero, target, len(feeds) == 1 and _is_add(feeds[0]))
            break
    for entry in dense.values():
        layer = entry["layer"]
        bias = (_np(layer.bias) if layer.use_bias else np.zeros(entry["before"])) + entry["bias_add"]
        entry["kernel"] = _np(layer.kernel)[entry["rows"]][:, entry["units"]].astype(np.float32)
        keep_bias = layer.use_bias or bool(np.any(entry["bias_add"] != 0))
        entry["bias"] = bias[entry["units"]].astype(np.float32) if keep_bias else None
    return {"heads": heads, "dense": dense}


def _rebuilt_dense(layer, entry, name: str):
    config = dict(layer.get_config(), units=int(entry["units"].size), use_bias=entry["bias"] is not None, name=name)
    return L.Dense.from_config(config)


def _set(layer, weights) -> None:
    layer.set_weights([np.asarray(w, np.float32) for w in weights])


def _dense_weights(entry) -> list:
    return [entry["kernel"]] + ([entry["bias"]] if entry["bias"] is not None else [])


def _encoder(enc, plan, x):
    """``enc`` (a keras-hub ``TransformerEncoder``) on ``x`` as plain Keras layers, heads and units removed."""
    name, first = enc.name, not enc.normalize_first
    attention = plan["heads"][f"{name}/self_attention_layer"]
    inter = plan["dense"][f"{name}/feedforward_intermediate_dense"]
    out = plan["dense"][f"{name}/feedforward_output_dense"]
    mha_config = dict(enc._self_attention_layer.get_config(), num_heads=int(attention["kept"].size),
                      name=f"{name}_self_attention")
    mha = L.MultiHeadAttention.from_config(mha_config)
    norms = [L.LayerNormalization.from_config(dict(norm.get_config(), name=f"{name}_{norm.name}"))
             for norm in (enc._self_attention_layer_norm, enc._feedforward_layer_norm)]
    drops = [L.Dropout(enc.dropout, name=f"{name}_{d}") for d in ("self_attention_dropout", "feedforward_dropout")]
    dense = [_rebuilt_dense(enc._feedforward_intermediate_dense, inter, f"{name}_feedforward_intermediate_dense"),
             _rebuilt_dense(enc._feedforward_output_dense, out, f"{name}_feedforward_output_dense")]
    residual = x
    h = x if first else norms[0](x)
    h = drops[0](mha(h, h))
    x = L.Add(name=f"{name}_self_attention_residual")([h, residual])
    x = norms[0](x) if first else x
    residual = x
    h = x if first else norms[1](x)
    h = drops[1](dense[1](dense[0](h)))
    x = L.Add(name=f"{name}_feedforward_residual")([h, residual])
    x = norms[1](x) if first else x
    _set(mha, attention["weights"])
    for new, old in zip(norms, (enc._self_attention_layer_norm, enc._feedforward_layer_norm)):
        _set(new, old.get_weights())
    _set(dense[0], _dense_weights(inter))
    _set(dense[1], _dense_weights(out))
    return x


class _Encoder:
    """Stands for a ``TransformerEncoder`` while the graph is cloned (expanded by :func:`_encoder`)."""

    def __init__(self, layer):
        self.layer = layer


def strip_attention(model, registry=None, *, name: Optional[str] = None, plan: Optional[Dict[str, Any]] = None):
    """:func:`trainer.strip` of a model with attention: a new functional model, fewer heads and FFN units.

    Args:
      model: a built ``Sequential`` or functional ``keras.Model`` of Keras' own layers and ``keras.ops`` calls
        and keras-hub ``TransformerEncoder`` layers, each layer called once, float32.
      registry: the :class:`~trainer.masks.MaskRegistry` whose rules froze the zeros, or ``None`` (every 0).
      name: the new model's name (default: the model's).
      plan: :func:`plan_attention` of the same model and registry, when the caller already made it.

    Returns:
      A functional ``keras.Model`` of plain Keras layers (``MultiHeadAttention`` with ``num_heads`` = the kept
      heads, ``Dense`` with the kept units; each ``TransformerEncoder`` ``enc`` expanded into ``enc_...``
      layers), same inputs and outputs, equal to ``model``'s up to float32 rounding; its ``model.keras``
      loads with Keras alone.

    Raises:
      StripError: as :func:`plan_attention`.
    """
    plan = plan_attention(model, registry) if plan is None else plan
    graph = _functional(model)

    def clone(layer):
        if _is_encoder(layer):
            return _Encoder(layer)
        if not isinstance(layer, keras.layers.Layer):
            return layer  # a keras.ops operation: stateless, called again on the new tensors
        config = layer.get_config()
        if isinstance(layer, L.MultiHeadAttention):
            config["num_heads"] = int(plan["heads"][layer.name]["kept"].size)
        if isinstance(layer, L.Dense):
            return _rebuilt_dense(layer, plan["dense"][layer.name], layer.name)
        return type(layer).from_config(config)

    def call(new, *args, **kwargs):
        if isinstance(new, _Encoder):
            kwargs = {k: v for k, v in kwargs.items() if k not in ("padding_mask", "attention_mask", "training")}
            if kwargs:
                _fail(f"layer {new.layer.name!r} (TransformerEncoder) is called with {sorted(kwargs)}")
            return _encoder(new.layer, plan, args[0])
        out = new(*args, **kwargs)
        if not isinstance(new, keras.layers.Layer):
            return out
        if isinstance(new, L.Dense):
            _set(new, _dense_weights(plan["dense"][new.name]))
        elif isinstance(new, L.MultiHeadAttention):
            _set(new, plan["heads"][new.name]["weights"])
        else:
            _set(new, graph.get_layer(new.name).get_weights())
        return out

    small = keras.models.clone_model(graph, clone_function=clone, call_function=call)
    return keras.Model(small.input, small.output, name=name or model.name)


def summary(plan: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, List[int]]]:
    """``{"units": {layer: [kept, before]}, "heads": {layer: [kept, before]}}`` of a :func:`plan_attention`."""
    return {"units": {n: [int(e["units"].size), int(e["before"])] for n, e in plan["dense"].items()},
            "heads": {n: [int(e["kept"].size), int(e["heads"])] for n, e in plan["heads"].items()}}
