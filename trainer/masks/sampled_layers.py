"""The layers whose kernel gradient can be sampled, and the forward that computes it (``update="sampled"``).

Served (their weights, variable paths and saving unchanged; only the layer's
``call`` is replaced on the instance, as Keras' ``enable_lora`` changes a
layer's forward without touching its weights):

- ``keras.layers.Dense`` (``kernel``): ``x @ kernel`` as ``einsum("...i,io->...o")``;
- ``keras.layers.EinsumDense`` (``kernel``): its own equation, every two-operand
  contraction without an ellipsis (the keras-hub Llama, Gemma and BERT attention
  and feed-forward projections);
- ``keras.layers.ReversibleEmbedding`` (keras-hub's too): the reverse projection
  through ``reverse_embeddings``, or through the tied ``embeddings`` (then the
  lookup is sampled as well);
- ``keras.layers.Embedding`` (``embeddings``): the lookup.

A layer with LoRA enabled or quantized, or of another type, is not served:
its variable keeps the compact update with the gradient gathered from the
dense one, and the plan says so with the reason (``gradient``).
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any, Callable, Dict, Optional

import keras
import tensorflow as tf

from trainer.masks.sampled import Equation, sampled_einsum, sampled_take
from trainer.masks.updates import CompactUpdate


@dataclasses.dataclass
class Owner:
    """The layer that reads one variable, and how: ``kind`` is ``dense``, ``einsum``, ``reverse`` or ``lookup``.

    ``reason`` is set (and the layer is not served) when the layer cannot be.
    """

    layer: Any
    kind: str
    reason: Optional[str] = None


def _reason(layer) -> Optional[str]:
    if getattr(layer, "lora_enabled", False):
        return f"layer {layer.name!r} has LoRA enabled"
    if getattr(layer, "quantization_mode", None):
        return f"layer {layer.name!r} is quantized ({layer.quantization_mode})"
    return None


def _candidates(layer):
    if isinstance(layer, keras.layers.ReversibleEmbedding):
        if layer.tie_weights:
            return [("embeddings", "tied")]
        return [("embeddings", "lookup"), ("reverse_embeddings", "reverse")]
    if isinstance(layer, keras.layers.Embedding):
        return [("embeddings", "lookup")]
    if isinstance(layer, keras.layers.EinsumDense):
        try:
            Equation(layer.equation)
        except ValueError as error:
            return [("kernel", str(error))]
        return [("kernel", "einsum")]
    if isinstance(layer, keras.layers.Dense):
        return [("kernel", "dense")]
    return []


def owners(model: keras.layers.Layer) -> Dict[str, Owner]:
    """``{variable path: Owner}`` of every variable a served layer type reads (a reason where it is not served)."""
    out: Dict[str, Owner] = {}
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for attribute, kind in _candidates(layer):
            variable = getattr(layer, "_" + attribute if attribute != "reverse_embeddings" else attribute, None)
            if variable is None or not isinstance(variable, keras.Variable):
                continue
            reason = _reason(layer) or (None if kind in ("dense", "einsum", "reverse", "lookup", "tied") else kind)
            out.setdefault(variable.path, Owner(layer, kind, reason))
    return out


def describe_fallback(path: str, found: Optional[Owner]) -> str:
    """The ``gradient`` a plan row shows for a compact variable whose gradient is not sampled."""
    if found is None:
        return "dense (no served layer reads it: Dense, EinsumDense, Embedding, ReversibleEmbedding)"
    return f"dense ({found.reason})"


def _tf(variable) -> Any:
    return variable.value if isinstance(variable, keras.Variable) else variable


def _letters(rank: int) -> str:
    return string.ascii_lowercase[:rank]


def _post(layer, y):
    if getattr(layer, "bias", None) is not None:
        y = tf.add(y, tf.cast(layer.bias, y.dtype))
    return layer.activation(y) if getattr(layer, "activation", None) is not None else y


def _kernel_for(x, variable):
    value = _tf(variable)
    return value if value.dtype == x.dtype else tf.cast(value, x.dtype)  # a mixed-precision policy's compute dtype


def _project(x, update, equation: Equation):
    return sampled_einsum(equation, x, _kernel_for(x, update.variable), update.compact.value, update.indices)


def _dense_call(layer, update, inputs):
    x = tf.convert_to_tensor(inputs)
    batch = _letters(len(x.shape) - 1)
    return _post(layer, _project(x, update, Equation(f"{batch}y,yz->{batch}z")))


def _einsum_call(layer, update, inputs):
    return _post(layer, _project(tf.convert_to_tensor(inputs), update, Equation(layer.equation)))


def _lookup(layer, update, inputs):
    ids = tf.convert_to_tensor(inputs)
    ids = ids if ids.dtype in (tf.int32, tf.int64) else tf.cast(ids, tf.int32)
    out = sampled_take(_tf(update.variable), ids, update.compact.value, update.indices)
    return tf.cast(out, layer.compute_dtype)


def _reverse(layer, update, inputs, tied: bool):
    x = tf.convert_to_tensor(inputs)
    if layer.reverse_dtype is not None:
        x = tf.cast(x, layer.reverse_dtype)
    batch = _letters(len(x.shape) - 1)
    equation = Equation(f"{batch}y,zy->{batch}z" if tied else f"{batch}y,yz->{batch}z")
    logits = _project(x, update, equation)
    if layer.logit_soft_cap is not None:
        logits = tf.tanh(logits / layer.logit_soft_cap) * layer.logit_soft_cap
    return logits


def serve(owner: Owner, get_update: Callable[[], Any]) -> None:
    """Replaces ``owner.layer``'s ``call`` on the instance by one that samples the kernel gradient.

    ``get_update()`` gives the variable's current compact update, or ``None``
    (then the layer's own ``call`` runs): the update is looked up at each trace.
    """
    layer, kind = owner.layer, owner.kind
    original = layer.call

    def call(inputs, *args, **kwargs):
        update = get_update()
        reverse = bool(kwargs.get("reverse", args[0] if args else False))
        if update is None or (kind in ("lookup", "reverse") and reverse != (kind == "reverse")):
            return original(inputs, *args, **kwargs)
        if kind == "dense":
            return _dense_call(layer, update, inputs)
        if kind == "einsum":
            return _einsum_call(layer, update, inputs)
        if kind == "tied":
            return _reverse(layer, update, inputs, tied=True) if reverse else _lookup(layer, update, inputs)
        return _reverse(layer, update, inputs, tied=False) if kind == "reverse" else _lookup(layer, update, inputs)

    call.sampled_original = original
    object.__setattr__(layer, "call", call)


def unserve(owner: Owner) -> None:
    """Gives ``owner.layer`` the ``call`` it had before :func:`serve` (nothing if it is not served)."""
    call = owner.layer.__dict__.get("call")
    if call is None or not hasattr(call, "sampled_original"):
        return
    if hasattr(call.sampled_original, "sampled_original"):  # another variable of the layer is served too
        object.__setattr__(owner.layer, "call", call.sampled_original)
    else:
        del owner.layer.__dict__["call"]


class SampledUpdate(CompactUpdate):
    """A compact update whose gradient is already ``[k]``: the tape is asked for :attr:`compact` itself.

    The served layer's forward (:func:`serve`) sends the sampled kernel
    gradient to the compact variable, so :meth:`gradient` and
    :meth:`mask_gradient` take the ``[k]`` gradient of the compact variable
    (cast to its dtype) and the write-back is the compact update's.
    """

    gradient_kind = "sampled"

    def gradient(self, grad):
        """The ``[k]`` gradient of :attr:`compact`, in its dtype (an ``IndexedSlices`` is made dense, ``[k]``)."""
        grad = tf.convert_to_tensor(grad) if isinstance(grad, tf.IndexedSlices) else grad
        return tf.cast(grad, self.compact.dtype)

    mask_gradient = gradient
