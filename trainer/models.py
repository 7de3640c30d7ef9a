"""Model builders: plain Keras 3 models (Sequential / Functional) that load without this package.

Knows nothing of masks. Every layer has a stable name so that variable paths
(``lenet/fc1/kernel``) are predictable in freeze rules. Models output logits.
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple

import keras


def mlp(input_shape: Tuple[int, ...], num_classes: int, *, hidden: Sequence[int] = (300, 100),
        activation: str = "relu", kernel_initializer: str = "glorot_uniform", name: str = "lenet") -> keras.Model:
    """A multilayer perceptron; the default is LeNet-300-100 (LeCun et al. 1998).

    Layers ``fc1 .. fcN`` (hidden) and ``out``; for 28x28 MNIST and 10 classes
    the kernels hold 784*300 + 300*100 + 100*10 = 266,200 weights.
    ``kernel_initializer`` is any Keras initializer name (``he_normal`` suits ReLU).
    """
    layers = [keras.Input(input_shape, name="image"), keras.layers.Flatten(name="flatten")]
    layers += [keras.layers.Dense(int(w), activation=activation, kernel_initializer=kernel_initializer,
                                  name=f"fc{i + 1}") for i, w in enumerate(hidden)]
    layers.append(keras.layers.Dense(num_classes, kernel_initializer=kernel_initializer, name="out"))
    return keras.Sequential(layers, name=name)


def cnn(input_shape: Tuple[int, ...], num_classes: int, *, filters: Sequence[int] = (6, 16),
        dense: Sequence[int] = (120, 84), batch_norm: bool = True, name: str = "lenet5") -> keras.Model:
    """A LeNet-5 style convolutional network (Functional API).

    ``conv1`` / ``conv2`` (5x5, same padding, ReLU, 2x2 max-pool; each followed by
    ``bn1`` / ``bn2`` BatchNormalization when ``batch_norm``), then dense
    ``fc1``, ``fc2`` and the ``out`` head.
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
    """
    inputs = keras.Input(input_shape, dtype="int32", name="tokens_in")
    x = keras.layers.Embedding(vocab_size, embedding_dim, name="tokens")(inputs)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(hidden, activation="relu", name="fc1")(x)
    outputs = keras.layers.Dense(num_classes, name="out")(x)
    return keras.Model(inputs, outputs, name=name)


BUILDERS: Dict[str, Callable[..., keras.Model]] = {
    "mlp": mlp,
    "cnn": cnn,
    "embedding_classifier": embedding_classifier,
}


def build_model(name: str, input_shape: Tuple[int, ...], num_classes: int, **kwargs) -> keras.Model:
    """Builds a model by name (``mlp``, ``cnn``, ``embedding_classifier``).

    Raises:
      ValueError: unknown name (the names are listed) or an option the builder does not take.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(BUILDERS)}")
    try:
        return BUILDERS[name](tuple(input_shape), int(num_classes), **kwargs)
    except TypeError as err:
        raise ValueError(f"model {name!r}: {err}") from None
