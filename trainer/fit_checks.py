"""The checks ``Trainer.fit`` / ``evaluate`` / ``predict`` make before any step runs: inputs, labels, callbacks.

Each check is cheap next to one epoch: dtypes and shapes from the arrays'
headers or the dataset's ``element_spec``, finiteness by one vectorised
``np.isfinite`` over a float array, the label range by one ``min``/``max``
over an integer label array (sparse losses only). Datasets are checked by
their spec alone (their values are not read ahead). Every refusal is one
line that names the argument (``x``, ``y``, ``validation_data``,
``callbacks[i]``) and what to pass instead.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, List, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from trainer.callbacks import BestWeights, Callback, StopOnPlateau, TestEachEpoch

__all__ = ["check_arrays", "check_callbacks", "check_dataset", "check_fit_inputs", "sparse_classes"]


def sparse_classes(model: keras.Model, loss: Any) -> Optional[int]:
    """The number of classes when ``loss`` takes integer class labels (a sparse loss), else ``None``."""
    if not isinstance(loss, (keras.losses.SparseCategoricalCrossentropy,)) and getattr(
            loss, "__name__", "") != "sparse_categorical_crossentropy":
        return None
    shape = getattr(model, "output_shape", None)
    return shape[-1] if isinstance(shape, tuple) and shape and isinstance(shape[-1], int) else None


def _input_shape(model: keras.Model) -> Optional[tuple]:
    expected = getattr(model, "input_shape", None)
    if isinstance(expected, tuple) and all(isinstance(d, (int, type(None))) for d in expected):
        return tuple(expected)[1:]
    return None


def _shape_fits(got: Sequence[Optional[int]], want: Sequence[Optional[int]]) -> bool:
    return len(got) == len(want) and all(g is None or w is None or g == w for g, w in zip(got, want))


def check_arrays(model: keras.Model, loss: Any, x: Any, y: Any = None, *, what: str = "x",
                 labels: str = "y") -> None:
    """Refuses NumPy inputs and labels that the model or loss cannot take, before any step.

    Args:
      model: the trainer's model.
      loss: the trainer's loss (a sparse loss adds the label checks).
      x: the inputs ``(N, ...)``; anything but a NumPy array is left to the caller.
      y: the labels ``(N,)`` or ``None``.
      what, labels: the arguments' names in messages.

    Raises:
      TypeError: non-numeric inputs or labels (strings, objects).
      ValueError: inputs of another shape than the model's, NaN or infinite
        inputs, or (sparse loss) labels that are not integer class indices in
        ``[0, classes)``, one-hot labels included.
    """
    if isinstance(x, np.ndarray):
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
            raise TypeError(f"{what} must hold numbers, got dtype {x.dtype}: convert it (e.g. x.astype('float32'))")
        want = _input_shape(model)
        if want is not None and not _shape_fits(x.shape[1:], want):
            raise ValueError(f"the model expects {what} of shape (N, {', '.join(map(str, want))}), got {x.shape}")
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            bad = int(x.size - np.count_nonzero(np.isfinite(x)))
            raise ValueError(f"{what} holds {bad} NaN or infinite values; clean or drop those examples first")
    if not isinstance(y, np.ndarray):
        return
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == np.bool_):
        raise TypeError(f"{labels} must hold numbers, got dtype {y.dtype}")
    classes = sparse_classes(model, loss)
    if classes is None:
        return
    if y.ndim == 2 and y.shape[1] == classes and classes > 1:
        raise ValueError(f"{labels} looks one-hot ({y.shape}) but the loss takes class indices: pass "
                         f"{labels}.argmax(-1), or use keras.losses.CategoricalCrossentropy")
    if not (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)):
        raise ValueError(f"{labels} must be class indices of shape (N,), got {y.shape}")
    if y.size and (not np.array_equal(y, np.round(y)) if np.issubdtype(y.dtype, np.floating) else False):
        raise ValueError(f"{labels} must be whole class indices, got non-integer values")
    if y.size and (y.min() < 0 or y.max() >= classes):
        raise ValueError(f"{labels} holds class indices in [{y.min()}, {y.max()}] but the model has {classes} "
                         f"classes: labels must be in [0, {classes})")


def check_dataset(model: keras.Model, dataset: tf.data.Dataset, *, what: str = "the training dataset",
                  pairs: bool = True) -> None:
    """Refuses a dataset whose elements do not fit the model, by its ``element_spec`` alone.

    Raises:
      ValueError: not ``(x, y)`` pairs (with ``pairs``), single examples
        instead of batches, or inputs of another shape than the model's.
      TypeError: string inputs.
    """
    spec = dataset.element_spec
    if pairs and (not isinstance(spec, tuple) or len(spec) != 2):
        raise ValueError(f"{what} must yield batched (x, y) pairs, got elements of {spec}")
    features = spec[0] if isinstance(spec, tuple) else spec
    first = tf.nest.flatten(features)[0]  # inputs may be a dict of tensors (e.g. keras_hub models)
    if pairs and first.shape.rank is not None and first.shape.rank > 0 and spec[1].shape.rank == 0:
        raise ValueError(f"{what} yields single examples, not batches: batch it with dataset.batch(n), or pass "
                         "NumPy arrays with batch_size")
    if isinstance(features, tf.TensorSpec):
        if features.dtype == tf.string:
            raise TypeError(f"{what} yields string inputs; the model takes numbers")
        want = _input_shape(model)
        if want is not None and features.shape.rank is not None and not _shape_fits(tuple(features.shape)[1:], want):
            raise ValueError(f"the model expects inputs of shape (batch, {', '.join(map(str, want))}) "
                             f"but {what} yields {features.shape}")


def check_fit_inputs(model: keras.Model, loss: Any, x: Any, y: Any, validation_data: Any) -> None:
    """:func:`check_arrays` on arrays and ``(x, y)`` tuples, :func:`check_dataset` on datasets (``fit``, ``evaluate``).

    ``fit(train_ds, val_ds)`` (a validation dataset as ``y``) is understood.
    """
    if isinstance(x, tf.data.Dataset):
        check_dataset(model, x)
        validation_data = y if validation_data is None and isinstance(y, tf.data.Dataset) else validation_data
    elif isinstance(x, tuple) and len(x) == 2 and y is None:
        check_arrays(model, loss, *x)
    else:
        check_arrays(model, loss, x, y)
    if isinstance(validation_data, tf.data.Dataset):
        check_dataset(model, validation_data, what="validation_data")
    elif isinstance(validation_data, (tuple, list)) and len(validation_data) == 2:
        check_arrays(model, loss, *validation_data, what="validation_data x", labels="validation_data y")


def is_callback(cb: Any) -> bool:
    """``cb`` is a Keras callback, one of ours, or has our two hooks (``on_epoch_end``, ``on_train_end``)."""
    return isinstance(cb, (Callback, keras.callbacks.Callback)) or all(
        hasattr(cb, hook) for hook in ("on_epoch_end", "on_train_end"))


def check_callbacks(callbacks: Iterable[Any], *, names: Sequence[str], validation: bool) -> List[Any]:
    """Refuses callbacks that would fail only after an epoch has trained.

    Args:
      callbacks: ``fit``'s callbacks.
      names: the epoch's training log keys (``loss``, the metrics' names).
      validation: ``fit`` has validation data (``val_*`` keys exist).

    Returns:
      The callbacks as a list.

    Raises:
      TypeError: an entry that is neither a ``keras.callbacks.Callback`` nor a
        :class:`~trainer.callbacks.Callback` (nor has its ``on_epoch_end`` and
        ``on_train_end`` hooks).
      ValueError: a ``StopOnPlateau`` / ``BestWeights`` monitor that no
        epoch's logs will hold, or a ``BestWeights`` path whose directory
        does not exist or cannot be written.
    """
    callbacks = list(callbacks)
    testing = any(isinstance(cb, TestEachEpoch) for cb in callbacks)
    known = list(names) + [f"val_{n}" for n in names] * validation + [f"test_{n}" for n in names] * testing
    for i, cb in enumerate(callbacks):
        if not is_callback(cb):
            raise TypeError(f"callbacks[{i}] is a {type(cb).__name__}, not a keras.callbacks.Callback or a "
                            "trainer.callbacks.Callback")
        if isinstance(cb, (StopOnPlateau, BestWeights)) and cb.monitor not in known:
            head = (f"callbacks[{i}]: {type(cb).__name__}: the monitored metric {cb.monitor!r} is not in the "
                    f"epoch's logs {sorted(set(known))}")
            if cb.monitor.startswith("val_") and not validation:
                raise ValueError(f"{head}; fit has no validation data: pass validation_data or validation_split")
            raise ValueError(f"{head}; monitor one of those")
        if isinstance(cb, BestWeights):
            directory = os.path.dirname(os.path.abspath(cb.path))
            if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
                raise ValueError(f"callbacks[{i}]: BestWeights cannot write {cb.path!r}: its directory "
                                 f"{directory!r} does not exist or is not writable")
    return callbacks
