"""keras-hub decoders as causal language models: token ids ``(batch, L)`` -> next-token logits ``(batch, L, vocab)``.

Knows nothing of masks. The backbone is a keras-hub decoder built from
constructor arguments (``architecture`` names its class in
:data:`ARCHITECTURES`) or loaded from a local preset directory with
``keras_hub.models.Backbone.from_preset(<dir>)`` (a directory written by
``backbone.save_to_preset(dir)``, holding ``config.json``; nothing is
downloaded). The head is keras-hub's own ``CausalLM`` task of that backbone
(``LlamaCausalLM``, ``GemmaCausalLM``..., no preprocessor), whose logits are
the backbone's reverse token embedding (``backbone.token_embedding(h,
reverse=True)``); the Functional model around it takes the token ids alone,
and ``model.keras`` loads back with plain Keras. Every variable path is keras-hub's:
``token_embedding/embeddings``, ``transformer_layer_0/self_attention/query/kernel``
(Llama), ``decoder_block_0/attention/query/kernel`` (Gemma).

Sequences are right-padded (:mod:`trainer.text_data`), so the model passes
an all-ones padding mask: under the causal attention a real token never sees
a pad after it, and the loss ignores pad labels.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple

import keras

__all__ = ["ARCHITECTURES", "PresetError", "backbone_of", "causal_lm", "check_preset", "load_backbone"]

log = logging.getLogger("trainer")

ARCHITECTURES = {"llama": "LlamaBackbone", "gemma": "GemmaBackbone", "mistral": "MistralBackbone",
                 "qwen": "QwenBackbone"}


class PresetError(ValueError):
    """``model.preset`` is not a local preset directory (presets are never downloaded)."""


def check_preset(preset: Optional[str]) -> None:
    """Refuses a ``model.preset`` that is not a local preset directory (also run by ``check_config``).

    Raises:
      PresetError: ``preset`` is set but is not a directory holding ``config.json`` (a preset *name* such as
        ``llama2_7b_en`` would need a download).
    """
    if preset is not None and not os.path.isfile(os.path.join(os.path.expanduser(str(preset)), "config.json")):
        raise PresetError(f"model.preset={preset!r} is not a local directory; presets cannot be downloaded here: "
                          "pass the path of a preset directory (saved with save_to_preset(dir), holding config.json)")


def load_backbone(architecture: str, preset: Optional[str], vocabulary_size: int,
                  backbone: Optional[Dict[str, Any]] = None):
    """A keras-hub decoder backbone: from ``preset`` (a local directory) or ``ARCHITECTURES[architecture](**backbone)``.

    Args:
      architecture: a key of :data:`ARCHITECTURES` (ignored with a preset: its ``config.json`` names the class).
      preset: a directory saved with ``backbone.save_to_preset(dir)``, or ``None``.
      vocabulary_size: the data's vocabulary (``vocabulary_size`` of a constructed backbone).
      backbone: the constructor's other keyword arguments (``num_layers``, ``hidden_dim``, ``dtype``...).

    Returns:
      The backbone (a ``keras_hub.models.Backbone`` with ``token_embedding`` and ``transformer_layers``).

    Raises:
      PresetError: ``preset`` is not a directory holding ``config.json``.
      ValueError: an unknown architecture, a constructor argument it does not take, or a preset whose
        vocabulary is smaller than the data's.
    """
    import keras_hub

    if preset is not None:
        check_preset(preset)
        directory = os.path.expanduser(str(preset))
        if backbone:
            log.info("model.preset=%s: the architecture comes from its config.json; model.backbone (%s) is not used",
                     preset, ", ".join(sorted(backbone)))
        model = keras_hub.models.Backbone.from_preset(directory)
        if not hasattr(model, "token_embedding") or not hasattr(model, "transformer_layers"):
            raise ValueError(f"model.preset={preset!r} holds a {type(model).__name__}, not a decoder with "
                             f"token_embedding and transformer_layers; known: {sorted(ARCHITECTURES)}")
        size = int(model.token_embedding.input_dim)
        if size < vocabulary_size:
            raise ValueError(f"model.preset={preset!r} has vocabulary_size {size:,} but the data's tokens go up to "
                             f"{vocabulary_size:,}: pass the preset's tokenizer as data.tokenizer")
        return model
    if architecture not in ARCHITECTURES:
        raise ValueError(f"model.architecture must be one of {sorted(ARCHITECTURES)}, got {architecture!r}")
    cls = getattr(keras_hub.models, ARCHITECTURES[architecture])
    try:
        return cls(vocabulary_size=int(vocabulary_size), **(backbone or {}))
    except TypeError as err:
        raise ValueError(f"model.backbone for {ARCHITECTURES[architecture]}: {err}") from None


def causal_lm(input_shape: Tuple[int, ...], num_classes: int, *, architecture: str = "llama",
              preset: Optional[str] = None, backbone: Optional[Dict[str, Any]] = None,
              name: str = "causal_lm") -> keras.Model:
    """A causal language model over a keras-hub decoder (see the module doc).

    Args:
      input_shape: ``(L,)``, the sequence length (int32 token ids).
      num_classes: the data's vocabulary size (the backbone's ``vocabulary_size`` unless a preset gives its own).
      architecture: ``llama``, ``gemma``, ``mistral`` or ``qwen`` (:data:`ARCHITECTURES`).
      preset: a local preset directory, or ``None`` to construct from ``backbone``.
      backbone: constructor arguments of the backbone class (``num_layers``, ``num_query_heads``,
        ``num_key_value_heads``, ``hidden_dim``, ``intermediate_dim``, Gemma's ``head_dim``, ``dtype``...).
      name: the Functional model's name (not part of any variable path).

    Returns:
      A Functional ``keras.Model``: int32 ``(batch, L)`` -> logits ``(batch, L, vocabulary)`` in the backbone's
      dtype (float32 unless ``backbone.dtype`` says otherwise), around the keras-hub ``CausalLM`` task.

    Raises:
      PresetError, ValueError: from :func:`load_backbone`; ``input_shape`` that is not ``(L,)``.
    """
    if len(tuple(input_shape)) != 1:
        raise ValueError(f"model=causal_lm takes token sequences (L,), got inputs of shape {tuple(input_shape)}; "
                         "use data=text")
    import keras_hub

    decoder = load_backbone(architecture, preset, int(num_classes), backbone)
    task = getattr(keras_hub.models, type(decoder).__name__.replace("Backbone", "CausalLM"), None)
    if task is None:
        raise ValueError(f"model.preset={preset!r} holds a {type(decoder).__name__}, which has no keras-hub CausalLM "
                         f"task; known architectures: {sorted(ARCHITECTURES)}")
    lm = task(backbone=decoder, preprocessor=None)  # its logits: decoder.token_embedding(h, reverse=True)
    tokens = keras.Input(tuple(input_shape), dtype="int32", name="token_ids")
    return keras.Model(tokens, lm({"token_ids": tokens, "padding_mask": keras.ops.ones_like(tokens)}), name=name)


def backbone_of(model: keras.Model):
    """The keras-hub backbone in ``model`` (the layer with ``transformer_layers``, ``token_embedding``) or None."""
    for layer in model._flatten_layers(include_self=True):
        if hasattr(layer, "transformer_layers") and hasattr(layer, "token_embedding"):
            return layer
    return None
