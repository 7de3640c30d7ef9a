"""Model builders: plain Keras 3 models (Sequential / Functional) that load without this package.

Knows nothing of masks. Every layer has a stable name so that variable paths
(``lenet/fc1/kernel``) are predictable in freeze rules. Every model maps a
batch of inputs ``(batch, *input_shape)`` (float32 images, or int32 tokens) to
float32 logits ``(batch, num_classes)``.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import keras

from trainer.causal_lm import causal_lm
from trainer.masks.checks import positive_int

__all__ = ["BUILDERS", "LORA_LAYER_TYPES", "TRANSFORMER_LORA_LAYERS", "build_model", "cnn", "embedding_classifier",
           "enable_lora", "lora_elements_per_rank", "lora_layers", "mlp", "nearest_lora_rank", "transformer"]


def mlp(input_shape: Tuple[int, ...], num_classes: int, *, hidden: Sequence[int] = (300, 100),
        activation: str = "relu", kernel_initializer: Any = "glorot_uniform", name: str = "lenet",
        use_bias: bool = True, batch_norm: bool = False, coupled_l2: float = 0.0) -> keras.Model:
    """A multilayer perceptron; the default is LeNet-300-100 (LeCun et al. 1998).

    Layers ``fc1 .. fcN`` (hidden) and ``out``; for 28x28 MNIST and 10 classes
    the kernels hold 784*300 + 300*100 + 100*10 = 266,200 weights.
    ``kernel_initializer`` is any Keras initializer name (``he_normal`` suits ReLU)
    or mapping (``{class_name: VarianceScaling, config: {scale: 0.3333, mode:
    fan_in, distribution: uniform}}`` is PyTorch's default ``nn.Linear`` kernel init).

    With ``batch_norm``, every Dense layer (``out`` too) is followed by a
    BatchNormalization ``<layer>_bn`` (PyTorch's defaults: ``epsilon=1e-5``,
    moving averages with momentum 0.9) before its activation (``<layer>_act``):
    the ``mnist_mlp`` of ``IntelAI/dynamic-reparameterization`` (``model.py``),
    there without biases (``use_bias=False``).

    Args:
      input_shape: one example's shape, e.g. ``(28, 28, 1)`` (flattened first).
      num_classes: the logits' width.
      hidden: the hidden layers' widths.
      activation: the hidden layers' activation.
      kernel_initializer: every kernel's initializer (a name or a Keras config mapping).
      name: the model's name, the first part of every variable path.
      use_bias: give every Dense layer a bias.
      batch_norm: BatchNormalization after every Dense layer (see above).
      coupled_l2: ``lambda >= 0``: coupled L2 on every trainable weight
        (kernels, biases, BatchNorm's gamma and beta): the loss gains
        ``lambda / 2 * sum(w ** 2)`` (Keras ``L2(lambda / 2)``), so the
        gradient gains ``lambda * w``: PyTorch's ``SGD(weight_decay=lambda)``
        (``5e-4`` in ``sparse_learning``). 0: none.

    Returns:
      A ``keras.Sequential``: float32 ``(batch, *input_shape)`` -> logits ``(batch, num_classes)``.

    Raises:
      ValueError: ``coupled_l2`` is not a number >= 0.
    """
    if isinstance(coupled_l2, bool) or not isinstance(coupled_l2, (int, float)) or not coupled_l2 >= 0:
        raise ValueError(f"model.coupled_l2 must be a number >= 0 (PyTorch's weight_decay, e.g. 5e-4), "
                         f"got {coupled_l2!r}")
    reg = (lambda: keras.regularizers.L2(float(coupled_l2) / 2.0)) if coupled_l2 else (lambda: None)  # noqa: E731
    layers = [keras.Input(input_shape, name="image"), keras.layers.Flatten(name="flatten")]
    names = [f"fc{i + 1}" for i in range(len(hidden))] + ["out"]
    for i, (layer, width) in enumerate(zip(names, [int(w) for w in hidden] + [int(num_classes)])):
        act = activation if i < len(hidden) else None
        layers.append(keras.layers.Dense(width, activation=None if batch_norm else act, use_bias=bool(use_bias),
                                         kernel_initializer=kernel_initializer, kernel_regularizer=reg(),
                                         bias_regularizer=reg(), name=layer))
        if batch_norm:
            layers.append(keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, gamma_regularizer=reg(),
                                                          beta_regularizer=reg(), name=f"{layer}_bn"))
            if act is not None:
                layers.append(keras.layers.Activation(act, name=f"{layer}_act"))
    return keras.Sequential(layers, name=name)


def cnn(input_shape: Tuple[int, ...], num_classes: int, *, filters: Sequence[int] = (6, 16),
        dense: Sequence[int] = (120, 84), batch_norm: bool = True, name: str = "lenet5") -> keras.Model:
    """A LeNet-5 style convolutional network (Functional API).

    ``conv1`` / ``conv2`` (5x5, same padding, ReLU, 2x2 max-pool; each followed by
    ``bn1`` / ``bn2`` BatchNormalization when ``batch_norm``), then dense
    ``fc1``, ``fc2`` and the ``out`` head.

    Args:
      input_shape: ``(H, W, C)``, float32 images.
      num_classes: the logits' width.
      filters: each convolution's filter count.
      dense: the dense layers' widths.
      batch_norm: add the BatchNormalization layers.
      name: the model's name.

    Returns:
      A Functional model: ``(batch, H, W, C)`` -> logits ``(batch, num_classes)``.
    """
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    for i, f in enumerate(filters):
        x = keras.layers.Conv2D(int(f), 5, padding="same", name=f"conv{i + 1}")(x)
        if batch_norm:
            x = keras.layers.BatchNormalization(name=f"bn{i + 1}")(x)
        x = keras.layers.Activation("relu", name=f"relu{i + 1}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    for i, w in enumerate(dense):
        x = keras.layers.Dense(int(w), activation="relu", name=f"fc{i + 1}")(x)
    outputs = keras.layers.Dense(num_classes, name="out")(x)
    return keras.Model(inputs, outputs, name=name)


def embedding_classifier(input_shape: Tuple[int, ...], num_classes: int, *, vocab_size: int = 17,
                         embedding_dim: int = 16, hidden: int = 64, name: str = "embed") -> keras.Model:
    """Token sequences -> ``Embedding`` (``tokens``) -> mean over positions -> ``fc1`` -> ``out``.

    Its gradient for the embedding table is a ``tf.IndexedSlices``.

    Args:
      input_shape: ``(length,)``, int32 token ids in ``[0, vocab_size)``.
      num_classes: the logits' width.
      vocab_size: the embedding table's rows.
      embedding_dim: its columns.
      hidden: ``fc1``'s width.
      name: the model's name.

    Returns:
      A Functional model: int32 ``(batch, length)`` -> logits ``(batch, num_classes)``.
    """
    inputs = keras.Input(input_shape, dtype="int32", name="tokens_in")
    x = keras.layers.Embedding(vocab_size, embedding_dim, name="tokens")(inputs)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(hidden, activation="relu", name="fc1")(x)
    outputs = keras.layers.Dense(num_classes, name="out")(x)
    return keras.Model(inputs, outputs, name=name)


def transformer(input_shape: Tuple[int, ...], num_classes: int, *, patch_size: int = 4,
                vocab_size: Optional[int] = None, dim: int = 64, depth: int = 2, heads: int = 4,
                mlp_dim: int = 128, dropout: float = 0.0, name: str = "transformer") -> keras.Model:
    """A Transformer encoder classifier (pre-norm, as ViT and BERT use; Dosovitskiy et al. 2021).

    Images ``(H, W)`` or ``(H, W, C)`` are cut into ``patch_size`` x ``patch_size``
    patches and projected to ``dim`` (``patch_proj``, a strided ``Conv2D``);
    token sequences (``vocab_size`` given, input ``(length,)`` of int32) go
    through an ``Embedding`` (``tokens``). A learned position ``Embedding``
    (``pos``) is added; then ``depth`` blocks ``block<i>_*``: ``ln1``,
    ``MultiHeadAttention`` (``attn``, whose query/key/value/output kernels are
    ``EinsumDense`` kernels), a residual, ``ln2``, ``mlp1`` (GELU), ``mlp2``, a
    residual; a final ``ln``, the mean over positions and the ``out`` head.

    Sizes: the default is small (MNIST patches train on a CPU in minutes);
    ``dim=768, depth=12, heads=12, mlp_dim=3072`` is BERT-base's encoder
    (85M parameters in the blocks; about 110M with a 30,522-token embedding).

    Returns:
      A Functional model: float32 images ``(batch, H, W[, C])`` or int32 tokens
      ``(batch, length)`` -> logits ``(batch, num_classes)``.

    Raises:
      ValueError: an image whose sides are not multiples of ``patch_size``, or
        ``dim`` not a multiple of ``heads``.
    """
    if dim % heads:
        raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
    if vocab_size is not None:
        inputs = keras.Input(input_shape, dtype="int32", name="tokens_in")
        x = keras.layers.Embedding(int(vocab_size), dim, name="tokens")(inputs)
        length = int(input_shape[0])
    else:
        inputs = keras.Input(input_shape, name="image")
        x = inputs if len(input_shape) == 3 else keras.layers.Reshape((*input_shape, 1), name="channels")(inputs)
        h, w = int(input_shape[0]), int(input_shape[1])
        if h % patch_size or w % patch_size:
            raise ValueError(f"image sides {(h, w)} must be multiples of patch_size ({patch_size})")
        x = keras.layers.Conv2D(dim, patch_size, strides=patch_size, name="patch_proj")(x)
        length = (h // patch_size) * (w // patch_size)
        x = keras.layers.Reshape((length, dim), name="patches")(x)
    positions = keras.ops.cumsum(keras.ops.ones_like(x[:, :, 0], dtype="int32"), axis=1) - 1
    x = x + keras.layers.Embedding(length, dim, name="pos")(positions)
    for i in range(1, depth + 1):
        y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_ln1")(x)
        y = keras.layers.MultiHeadAttention(heads, dim // heads, dropout=dropout, name=f"block{i}_attn")(y, y)
        x = x + y
        y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_ln2")(x)
        y = keras.layers.Dense(mlp_dim, activation="gelu", name=f"block{i}_mlp1")(y)
        y = keras.layers.Dropout(dropout, name=f"block{i}_drop")(y)
        x = x + keras.layers.Dense(dim, name=f"block{i}_mlp2")(y)
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="ln")(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = keras.layers.Dense(num_classes, name="out")(x)
    return keras.Model(inputs, outputs, name=name)


BUILDERS: Dict[str, Callable[..., keras.Model]] = {
    "mlp": mlp,
    "cnn": cnn,
    "embedding_classifier": embedding_classifier,
    "transformer": transformer,
    "causal_lm": causal_lm,  # a keras-hub decoder (trainer/causal_lm.py)
}


def build_model(name: str, input_shape: Tuple[int, ...], num_classes: int, **kwargs) -> keras.Model:
    """Builds a model by name (``mlp``, ``cnn``, ``embedding_classifier``, ``transformer``, ``causal_lm``).

    Args:
      name: a key of :data:`BUILDERS`.
      input_shape: one example's shape (``Splits.input_shape``).
      num_classes: the logits' width.
      **kwargs: the builder's own options (``model.*`` of the config).

    Returns:
      The built model: ``(batch, *input_shape)`` -> float32 logits ``(batch, num_classes)``
      (``causal_lm``: ``(batch, L, vocabulary)``).

    Raises:
      ValueError: unknown name (the names are listed) or an option the builder does not take
        (``causal_lm``: also :class:`trainer.causal_lm.PresetError`, a preset that is not a local directory).
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(BUILDERS)}")
    try:
        return BUILDERS[name](tuple(input_shape), int(num_classes), **kwargs)
    except TypeError as err:
        raise ValueError(f"model {name!r}: {err}") from None


LORA_LAYER_TYPES = ("Dense", "EinsumDense", "Embedding")
TRANSFORMER_LORA_LAYERS = ("block*_attn/query", "block*_attn/key", "block*_attn/value",
                           "block*_attn/attention_output", "block*_mlp1", "block*_mlp2")


def lora_layers(model: keras.Model, patterns: Sequence[str]) -> List[keras.layers.Layer]:
    """The ``Dense`` / ``EinsumDense`` / ``Embedding`` layers whose path matches a glob, in model order.

    Args:
      model: a built Keras model.
      patterns: ``fnmatch`` globs over layer paths (``block1_attn/query``,
        ``block2_mlp1``; the model's own name is not part of a layer path).

    Returns:
      The matching layers, each once.

    Raises:
      ValueError: a pattern that matches no such layer (the candidates are listed).
    """
    candidates = [layer for layer in model._flatten_layers(include_self=False)
                  if type(layer).__name__ in LORA_LAYER_TYPES]
    chosen: List[keras.layers.Layer] = []
    for pattern in patterns:
        hits = [layer for layer in candidates if fnmatch.fnmatchcase(layer.path, str(pattern))]
        if not hits:
            raise ValueError(f"model.lora_layers: {pattern!r} matches no Dense/EinsumDense/Embedding layer; "
                             f"layers: {[layer.path for layer in candidates]}")
        chosen += [layer for layer in hits if all(layer is not c for c in chosen)]
    return chosen


def enable_lora(model: keras.Model, *, rank: int, layers: Optional[Sequence[str]] = None,
                alpha: Optional[float] = None) -> List[str]:
    """Enables Keras's own LoRA (``layer.enable_lora``; Hu et al. 2022) on the chosen layers.

    Each chosen layer's kernel (embeddings) becomes non-trainable and gains
    two trainable factors ``lora_kernel_a`` (``in x rank``) and
    ``lora_kernel_b`` (``rank x out``, zeros, so the model's output does not
    change); Keras saves ``lora_rank`` in the layer config, so a
    ``model.keras`` with LoRA loads with plain Keras. Biases and other
    layers are untouched (freeze them with freeze rules).

    Args:
      model: a built Keras model (load pretrained weights first).
      rank: the LoRA rank, a positive integer.
      layers: globs over layer paths (:func:`lora_layers`); default
        :data:`TRANSFORMER_LORA_LAYERS` (attention projections and MLP of
        every Transformer block).
      alpha: LoRA's scaling numerator (output scaled by ``alpha / rank``);
        default ``rank`` (scale 1), Keras's default.

    Returns:
      The paths of the layers given LoRA.

    Raises:
      ValueError: ``rank`` not a positive integer, or a pattern that matches nothing.
    """
    rank = positive_int("model.lora_rank", rank)
    chosen = lora_layers(model, list(layers) if layers is not None else list(TRANSFORMER_LORA_LAYERS))
    for layer in chosen:
        layer.enable_lora(rank, lora_alpha=alpha)
    return [layer.path for layer in chosen]


def lora_elements_per_rank(model: keras.Model, layers: Optional[Sequence[str]] = None) -> int:
    """The adapter elements one unit of LoRA rank adds on the chosen layers (before :func:`enable_lora`).

    Keras's factors of a kernel (or embedding table) of shape ``(..., out)``
    are ``(..., rank)`` and ``(rank, out)``, so each layer adds
    ``prod(shape[:-1]) + out`` elements per unit of rank.

    Args:
      model: a built Keras model without LoRA.
      layers: globs over layer paths, as for :func:`enable_lora`.

    Returns:
      The element count (an ``int``).

    Raises:
      ValueError: a pattern that matches nothing.
    """
    total = 0
    for layer in lora_layers(model, list(layers) if layers is not None else list(TRANSFORMER_LORA_LAYERS)):
        shape = tuple(int(d) for d in (layer.embeddings if hasattr(layer, "embeddings") else layer.kernel).shape)
        inner = 1
        for d in shape[:-1]:
            inner *= d
        total += inner + shape[-1]
    return total


def nearest_lora_rank(elements: float, per_rank: int) -> int:
    """The LoRA rank whose adapter count (``rank * per_rank``) is nearest to ``elements``, at least 1.

    Used to compare LoRA with sparse fine-tuning at a trainable budget.

    Args:
      elements: the trainable budget (an element count).
      per_rank: :func:`lora_elements_per_rank` of the chosen layers, positive.

    Raises:
      ZeroDivisionError: ``per_rank`` is 0.
    """
    return max(1, int(round(elements / per_rank)))

