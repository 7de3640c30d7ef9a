"""Attention heads as groups: which axis of an attention layer's variables indexes its heads.

``elements: {magnitude: 0.5, groups: heads}`` ranks the heads of each selected variable by the norm of that
head's slice of *that* variable and freezes the smallest ``round(0.5 * heads)`` slices whole
(:mod:`trainer.masks.groups`). A head is one index of the heads axis:

================================  ==========================  ==========
variable                          shape (Keras MHA)           heads axis
================================  ==========================  ==========
``<mha>/query|key|value/kernel``  ``(in, heads, head_dim)``   1
``<mha>/query|key|value/bias``    ``(heads, head_dim)``       0
``<mha>/attention_output/kernel`` ``(heads, head_dim, out)``  0
``<mha>/attention_output/bias``   ``(out,)``                  none
================================  ==========================  ==========

The axis is read from each projection's ``EinsumDense`` equation, not guessed from the shape: the heads
letter is the output's second-to-last letter of a query/key/value projection (``"abc,cde->abde"``: ``d``) and
the input's second-to-last letter of the output projection (``"abcd,cde->abe"``: ``c``). That covers
``keras.layers.MultiHeadAttention`` and its subclasses (keras-hub's ``TransformerEncoder`` / BERT blocks and
``CachedMultiHeadAttention``) and the keras-hub attention layers that hold ``EinsumDense`` projections
named ``_query_dense`` ... ``_output_dense`` (Llama, Mistral) or ``query_dense`` ... ``output_dense``
(Gemma, whose query kernel is ``(heads, in, head_dim)``: axis 0).

Michel et al. (2019), *Are Sixteen Heads Really Better than One?*, prune heads by masking a head's output;
selecting ``*/attention_output/kernel`` does that: a head whose output-projection slice is frozen at zero
contributes nothing, and :func:`trainer.strip` removes it with its query, key and value slices.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import keras

PROJECTIONS = ("_query_dense", "_key_dense", "_value_dense", "_gate_dense", "query_dense", "key_dense", "value_dense")
OUTPUTS = ("_output_dense", "output_dense")


def _specs(equation: str) -> Optional[tuple]:
    """``(input spec, kernel spec, output spec)`` of an ``EinsumDense`` equation such as ``"abc,cde->abde"``."""
    try:
        inputs, output = equation.replace(" ", "").split("->")
        source, kernel = inputs.split(",")
    except ValueError:
        return None
    return source, kernel, output


def projection_axes(dense, role: str) -> Dict[int, int]:
    """``{id(variable): heads axis}`` of one ``EinsumDense`` projection of an attention layer.

    Args:
      dense: a built ``keras.layers.EinsumDense``.
      role: ``"projection"`` (query, key or value: heads on the output) or ``"output"`` (heads on the input).

    Returns:
      the kernel's heads axis, and the bias's where the bias has one; ``{}`` when the equation has no heads
      letter in the kernel (then the layer is not an attention projection this module knows).
    """
    specs = _specs(getattr(dense, "equation", "") or "")
    kernel = getattr(dense, "_kernel", None)  # the variable (`kernel` adds LoRA's product where enabled)
    if specs is None or kernel is None:
        return {}
    source, kernel_spec, output = specs
    spec = output if role == "projection" else source
    if len(spec) < 2 or spec[-2] not in kernel_spec or len(kernel_spec) != len(kernel.shape):
        return {}
    letter = spec[-2]
    axes = {id(kernel): kernel_spec.index(letter)}
    bias_axes = getattr(dense, "bias_axes", None) or ""
    bias = getattr(dense, "bias", None)
    if bias is not None and letter in bias_axes and letter in output:
        first = min(output.find(c) for c in bias_axes)
        axes[id(bias)] = output[first:].index(letter)
    return axes


def head_axes(layers: Iterable[keras.layers.Layer]) -> Dict[int, int]:
    """``{id(variable): heads axis}`` of every attention projection among ``layers`` (a model's flattened layers).

    Returns:
      one entry per query/key/value kernel and bias and per output-projection kernel of every attention layer
      found (see the module docstring); ``{}`` for a model without attention.
    """
    axes: Dict[int, int] = {}
    for layer in layers:
        for names, role in ((PROJECTIONS, "projection"), (OUTPUTS, "output")):
            for name in names:
                dense = getattr(layer, name, None)
                if isinstance(dense, keras.layers.EinsumDense) and dense.built:
                    axes.update(projection_axes(dense, role))
    return axes
