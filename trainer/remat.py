"""Activation recomputation (``trainer.remat``): each transformer block's activations are recomputed in the backward.

:func:`apply_remat` wraps the ``call`` of every block of the model's keras-hub
backbone (``backbone.transformer_layers``) in ``tf.recompute_grad``: the
forward keeps only each block's input; the backward runs the block again to
get what its gradient needs (Chen et al. 2016, "Training Deep Nets with
Sublinear Memory Cost"). Gradients are the same (the same ops on the same
inputs); the cost is one more forward of every block per step. Weights,
variable paths, saving and ``model.keras`` do not change (the wrapper is an
attribute of the layer object, not of its config).

Only the block's positional tensors pass through ``tf.recompute_grad`` (it
takes no keyword arguments inside a ``tf.function``); its keyword arguments
(padding and attention masks, ``training``) are closed over: they need no gradient.
"""

from __future__ import annotations

from typing import List

import keras
import tensorflow as tf

from trainer.causal_lm import backbone_of

__all__ = ["RematError", "apply_remat", "transformer_blocks"]


class RematError(ValueError):
    """``trainer.remat=true`` for a model with no transformer blocks to recompute."""


def transformer_blocks(model: keras.Model) -> List[keras.layers.Layer]:
    """The blocks :func:`apply_remat` wraps: the keras-hub backbone's ``transformer_layers`` (``[]`` without one)."""
    backbone = backbone_of(model)
    return list(backbone.transformer_layers) if backbone is not None else []


def _recomputed(call):
    def wrapped(*args, **kwargs):
        return tf.recompute_grad(lambda *tensors: call(*tensors, **kwargs))(*args)

    wrapped.remat_of = call
    return wrapped


def apply_remat(model: keras.Model) -> List[str]:
    """Recomputes every transformer block of ``model`` in the backward pass (see the module doc); idempotent.

    Args:
      model: a built model holding a keras-hub decoder backbone (``model=causal_lm``).

    Returns:
      The wrapped blocks' layer paths (``transformer_layer_0``, ...).

    Raises:
      RematError: the model has no keras-hub backbone with ``transformer_layers``, or none in it.
    """
    blocks = transformer_blocks(model)
    if not blocks:
        raise RematError(f"trainer.remat=true: model {model.name!r} has no transformer blocks to recompute (no "
                         "keras-hub backbone transformer_layers found); use model=causal_lm with at least one "
                         "layer, or set trainer.remat=false")
    for block in blocks:
        if not hasattr(block.call, "remat_of"):
            block.call = _recomputed(block.call)
    return [block.path for block in blocks]
