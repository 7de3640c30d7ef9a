"""What :meth:`trainer.Trainer.fit`, ``evaluate`` and ``predict`` accept, turned into batched ``tf.data`` datasets.

As Keras' ``Model.fit`` does: either a *batched* ``tf.data.Dataset`` of
``(x, y)`` pairs, or NumPy arrays ``x`` and ``y`` with a ``batch_size``
(Keras' default 32), an optional ``validation_split`` (the *last* fraction of
the arrays, taken before shuffling, as in Keras) or ``validation_data``
(a dataset or an ``(x_val, y_val)`` tuple).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np
import tensorflow as tf

from trainer.masks.checks import positive_int

__all__ = ["DEFAULT_BATCH_SIZE", "array_batches", "evaluation_inputs", "from_arrays", "is_dataset", "split_validation",
           "training_inputs"]

DEFAULT_BATCH_SIZE = 32  # Keras' default


def is_dataset(value: Any) -> bool:
    """True for a ``tf.data.Dataset`` (also a distributed one)."""
    return isinstance(value, tf.data.Dataset)


def _array(value: Any, what: str) -> np.ndarray:
    if isinstance(value, (list, tuple)):
        value = np.asarray(value)
    if isinstance(value, tf.Tensor):
        value = value.numpy()
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{what} must be a batched tf.data.Dataset of (x, y) pairs or a NumPy array, "
                        f"got {type(value).__name__}")
    return value


def from_arrays(x: Any, y: Any, batch_size: Optional[int], *, shuffle: bool, seed: Optional[int],
                what: str = "x") -> tf.data.Dataset:
    """A batched dataset of ``(x, y)`` from arrays (``y=None``: inputs only, for ``predict``).

    Args:
      x: inputs, ``(N, ...)``.
      y: labels ``(N, ...)`` or ``None``.
      batch_size: examples per batch (default 32).
      shuffle: reshuffle every epoch (seeded by ``seed``).
      seed: the shuffle seed.
      what: the argument's name in messages.

    Raises:
      TypeError: ``x`` or ``y`` is not an array.
      ValueError: ``x`` and ``y`` differ in length, there are no examples,
        or ``batch_size`` is not a positive integer.
    """
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else positive_int("batch_size", batch_size)
    x = _array(x, what)
    if len(x) == 0:
        raise ValueError(f"{what} holds no examples")
    if y is None:
        return array_batches((x,), batch_size, shuffle=shuffle, seed=seed)
    y = _array(y, "y")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)}; they must have the same length")
    return array_batches((x, y), batch_size, shuffle=shuffle, seed=seed)


def array_batches(arrays: Tuple[np.ndarray, ...], batch_size: int, *, shuffle: bool, seed: Optional[int],
                  drop_remainder: bool = False) -> tf.data.Dataset:
    """Batches of in-memory arrays, each gathered in one op from a (shuffled) order of example indices.

    The shuffle moves int64 indices, not examples: reshuffling a 55,000-image
    MNIST epoch this way costs a fraction of shuffling the images through a
    shuffle buffer (whose per-example copies compete with the train step for
    the CPU), and the arrays are held once (no ``cache()`` copy).

    Args:
      arrays: one or more arrays of equal length ``N`` (e.g. ``(x, y)``).
      batch_size: examples per batch (a positive integer).
      shuffle: a new order every epoch (every iteration of the dataset).
      seed: the shuffle seed (``None``: a random one).
      drop_remainder: drop the last batch when it holds fewer than ``batch_size`` examples.

    Returns:
      A dataset of tuples of batches ``(batch, ...)`` (a single tensor for
      one array), of known length ``ceil(N / batch_size)`` (``floor`` with
      ``drop_remainder``), prefetched.
    """
    tensors = tuple(tf.convert_to_tensor(a) for a in arrays)
    order = tf.data.Dataset.range(len(arrays[0]))
    if shuffle:
        order = order.shuffle(len(arrays[0]), seed=seed, reshuffle_each_iteration=True)
    order = order.batch(batch_size, drop_remainder=drop_remainder)
    if len(tensors) == 1:
        batches = order.map(lambda i: tf.gather(tensors[0], i))
    else:
        batches = order.map(lambda i: tuple(tf.gather(t, i) for t in tensors))
    return batches.prefetch(tf.data.AUTOTUNE)


def split_validation(x: np.ndarray, y: np.ndarray, fraction: float) -> Tuple[tuple, tuple]:
    """``(x_train, y_train), (x_val, y_val)``: the last ``fraction`` of the arrays validates (Keras' rule).

    Raises:
      ValueError: ``fraction`` outside ``(0, 1)`` or leaving no example on one side.
    """
    if not isinstance(fraction, (int, float)) or not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"validation_split must be a fraction in (0, 1), got {fraction!r}")
    cut = int(len(x) * (1.0 - float(fraction)))
    if cut < 1 or cut >= len(x):
        raise ValueError(f"validation_split={fraction} of {len(x)} examples leaves an empty training or "
                         "validation set")
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def training_inputs(x: Any, y: Any, *, batch_size: Optional[int], validation_data: Any, validation_split: float,
                    shuffle: bool, seed: Optional[int]) -> Tuple[tf.data.Dataset, Optional[tf.data.Dataset]]:
    """The training and validation datasets of one ``fit`` call.

    ``x`` is a batched dataset of ``(x, y)`` (then ``y``, ``batch_size`` and
    ``validation_split`` must be left out; ``y`` may be a validation dataset,
    the older positional form ``fit(train_ds, val_ds)``) or an array with ``y``.

    Raises:
      TypeError, ValueError: a combination Keras would refuse too, named.
    """
    if is_dataset(x):
        if is_dataset(y):
            if validation_data is not None:
                raise ValueError("pass the validation dataset once: as validation_data, not also as y")
            validation_data, y = y, None
        if y is not None:
            raise ValueError("x is a dataset of (x, y) pairs: leave y out (labels come from the dataset)")
        if batch_size is not None:
            raise ValueError("x is a dataset, which is already batched: leave batch_size out "
                             "(batch it with dataset.batch(n))")
        if validation_split:
            raise ValueError("validation_split works on arrays only; with a dataset pass validation_data")
        train = x
    else:
        if isinstance(x, tuple):
            raise TypeError("x must be a batched tf.data.Dataset of (x, y) pairs or a NumPy array, got a tuple: "
                            "call fit(x, y, batch_size=...) with arrays")
        if y is None:
            raise ValueError("x is an array: pass its labels as y (or a batched tf.data.Dataset of (x, y) as x)")
        x, y = _array(x, "x"), _array(y, "y")
        if validation_split:
            if validation_data is not None:
                raise ValueError("pass either validation_split or validation_data, not both")
            (x, y), validation_data = split_validation(x, y, validation_split)
        train = from_arrays(x, y, batch_size, shuffle=shuffle, seed=seed)
    return train, evaluation_inputs(validation_data, None, batch_size=batch_size, what="validation_data")


def evaluation_inputs(x: Any, y: Any = None, *, batch_size: Optional[int], what: str = "x") -> Optional[tf.data.Dataset]:
    """A dataset of ``(x, y)`` batches from a dataset, an ``(x, y)`` tuple or arrays ``x, y`` (``None`` stays ``None``).

    Raises:
      TypeError, ValueError: not a dataset, a pair or arrays.
    """
    if x is None:
        return None
    if is_dataset(x):
        return x
    if y is None:
        if not (isinstance(x, (tuple, list)) and len(x) == 2):
            raise TypeError(f"{what} must be a batched tf.data.Dataset of (x, y) pairs or an (x, y) tuple of "
                            f"arrays, got {type(x).__name__}")
        x, y = x
    return from_arrays(x, y, batch_size, shuffle=False, seed=None, what=what)
