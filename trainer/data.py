"""Datasets as NumPy arrays and ``tf.data`` input pipelines. Knows nothing of masks.

``load_mnist`` reads the original MNIST as an ``.npz`` (keys ``x_train y_train
x_test y_test``); ``load_digits`` uses scikit-learn's bundled 8x8 digits for
offline use. Images become float32 in [0, 1] of shape ``(H, W, 1)``; labels int32.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf

from trainer.inputs import array_batches
from trainer.masks.checks import positive_int

__all__ = ["DATA_DIR_ENV", "DataError", "Splits", "check_arrays", "load_digits", "load_mnist", "make_dataset",
           "resolve_mnist_path", "select_classes", "split_datasets", "standardize", "tokenize"]

DATA_DIR_ENV = "TRAINER_DATA_DIR"
log = logging.getLogger("trainer")


class DataError(ValueError):
    """The data cannot be found or is unfit for training (raised before training)."""


@dataclasses.dataclass
class Splits:
    """Train / validation / test arrays of one dataset.

    Attributes:
      x_train, x_val, x_test: float32 arrays ``(N, H, W, 1)`` in [0, 1] (or
        int32 token arrays ``(N, L)`` when tokenized).
      y_train, y_val, y_test: int32 label arrays ``(N,)`` in ``[0, num_classes)``.
      num_classes: the number of classes.
      name: the dataset's name.
      source: where the arrays came from (a file path, a download, a bundled dataset).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str
    source: str = ""

    @property
    def input_shape(self) -> Tuple[int, ...]:
        """One example's shape, e.g. ``(28, 28, 1)`` (``(L,)`` for tokens)."""
        return tuple(self.x_train.shape[1:])


def check_arrays(x: np.ndarray, y: np.ndarray, num_classes: int, what: str) -> None:
    """Refuses arrays that would train wrongly or fail mid-run.

    Args:
      x: inputs ``(N, ...)``, any numeric dtype (floats are checked for NaN / infinity).
      y: labels ``(N,)``, an integer dtype.
      num_classes: labels must lie in ``[0, num_classes)``.
      what: the split's name for messages (``"mnist training set"``).

    Raises:
      DataError: lengths differ, labels are not integers in
        ``[0, num_classes)``, or inputs hold NaN / infinity.
    """
    if len(x) != len(y):
        raise DataError(f"{what}: {len(x)} inputs but {len(y)} labels; they must have the same length")
    if len(x) == 0:
        raise DataError(f"{what}: no examples")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{what}: labels must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}")
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        raise DataError(
            f"{what}: labels must lie in [0, {num_classes - 1}]; found {np.unique(y[bad])[:10].tolist()} "
            f"at {int(bad.sum())} positions"
        )
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise DataError(f"{what}: inputs hold {int((~np.isfinite(x)).sum())} NaN or infinite values")


def resolve_mnist_path(path: Optional[str]) -> Optional[str]:
    """The MNIST file to read: ``path``, else ``$TRAINER_DATA_DIR/mnist.npz``, else ``None`` (download).

    Raises:
      DataError: ``path`` is given but is not a file, or ``TRAINER_DATA_DIR``
        is set but is not a directory holding ``mnist.npz`` (the message
        echoes the value and says what to set instead; nothing is downloaded).
    """
    if path:
        path = os.path.expanduser(str(path))
        if not os.path.isfile(path):
            raise DataError(f"data.path {path!r} is not a file; pass the path of mnist.npz "
                            "(keys x_train y_train x_test y_test)")
        return path
    env = os.environ.get(DATA_DIR_ENV)
    if not env:
        return None
    directory = os.path.expanduser(env)
    if os.path.isfile(directory):
        raise DataError(f"{DATA_DIR_ENV}={env!r} is a file, not a directory: set {DATA_DIR_ENV}="
                        f"{os.path.dirname(os.path.abspath(directory))!r} (the directory holding mnist.npz), "
                        f"or pass data.path={env}")
    if not os.path.isdir(directory):
        raise DataError(f"{DATA_DIR_ENV}={env!r} does not exist: set it to the directory holding mnist.npz, "
                        f"or unset it to download MNIST")
    candidate = os.path.join(directory, "mnist.npz")
    if not os.path.isfile(candidate):
        held = sorted(os.listdir(directory))
        shown = ", ".join(held[:4]) + (f", ... ({len(held)} entries)" if len(held) > 4 else "") if held else "nothing"
        raise DataError(f"{DATA_DIR_ENV}={env!r} has no mnist.npz (it holds {shown}): set it to the directory "
                        f"holding mnist.npz, pass data.path=/path/to/mnist.npz, or unset it to download MNIST")
    return candidate


def _npz_arrays(path: str):
    """The four MNIST arrays, read through :class:`trainer.npfiles.NpzReader` (size, header and dtype checked)."""
    from trainer.npfiles import NpzReader

    expected = ".npz archive saved with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
    with NpzReader(path, "data.path", DataError, expected=expected) as data:
        missing = sorted({"x_train", "y_train", "x_test", "y_test"} - set(data.files))
        if missing:
            raise DataError(f"{path!r} lacks the arrays {missing}; it holds {sorted(data.files)}")
        return tuple(data.array(k) for k in ("x_train", "y_train", "x_test", "y_test"))


def load_mnist(path: Optional[str] = None, validation_size: int = 5000) -> Splits:
    """Loads MNIST; the last ``validation_size`` training images become the validation set.

    Looks in ``path``, then ``$TRAINER_DATA_DIR/mnist.npz``, then tries
    ``keras.datasets.mnist.load_data()`` (which downloads).

    Args:
      path: an ``.npz`` with ``x_train`` ``(60000, 28, 28)`` uint8, ``y_train``
        ``(60000,)``, ``x_test`` ``(10000, 28, 28)``, ``y_test`` ``(10000,)``, or ``None``.
      validation_size: training images held out for validation, in ``[0, 60000)``.

    Returns:
      :class:`Splits` of float32 images ``(N, 28, 28, 1)`` in [0, 1] and int32
      labels in ``[0, 10)``: ``60000 - validation_size`` / ``validation_size`` / 10,000.

    Raises:
      DataError: nothing could be read (the message says what to pass), an
        array is missing or unfit (:func:`check_arrays`), or ``validation_size``
        is out of range.
    """
    resolved = resolve_mnist_path(path)
    if resolved is not None:
        x_train, y_train, x_test, y_test = _npz_arrays(resolved)
        source = resolved
    else:
        log.info("MNIST: no data.path and no %s: downloading with keras.datasets.mnist.load_data()", DATA_DIR_ENV)
        try:
            import keras

            (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
        except Exception as err:  # noqa: BLE001 - any download failure gets the same advice
            raise DataError(
                "MNIST not found: pass data.path=/path/to/mnist.npz (keys x_train y_train x_test y_test), "
                f"or set {DATA_DIR_ENV} to a directory holding mnist.npz, or use data=digits "
                f"(bundled with scikit-learn, no download). The download attempt failed: {err}"
            ) from None
        source = "downloaded by keras.datasets.mnist.load_data() (cached in ~/.keras/datasets)"
    splits = _split(x_train, y_train, x_test, y_test, validation_size, 255.0, 10, "mnist")
    return dataclasses.replace(splits, source=source)


def load_digits(validation_size: int = 180, test_size: int = 360, seed: int = 0) -> Splits:
    """scikit-learn's bundled 8x8 digits (1,797 images, no download), split by a seeded shuffle.

    Args:
      validation_size: images held out for validation (taken from the training part).
      test_size: images of the test set (the first ``test_size`` of the shuffle).
      seed: the shuffle's seed.

    Returns:
      :class:`Splits` of float32 images ``(N, 8, 8, 1)`` in [0, 1] and int32
      labels in ``[0, 10)``; by default 1,257 / 180 / 360 examples.

    Raises:
      DataError: ``validation_size`` outside ``[0, 1797 - test_size)``.
    """
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = bunch.images.astype(np.float32)
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    splits = _split(x[test_size:], y[test_size:], x[:test_size], y[:test_size], validation_size, 16.0, 10, "digits")
    return dataclasses.replace(splits, source="scikit-learn's bundled digits (no download)")


def _split(x_train, y_train, x_test, y_test, validation_size, scale, num_classes, name) -> Splits:
    if x_train.ndim == 3:
        x_train, x_test = x_train[..., None], x_test[..., None]
    x_train = x_train.astype(np.float32) / scale
    x_test = x_test.astype(np.float32) / scale
    check_arrays(x_train, y_train, num_classes, f"{name} training set")
    check_arrays(x_test, y_test, num_classes, f"{name} test set")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{name}: training inputs have shape {x_train.shape[1:]} but test inputs {x_test.shape[1:]}")
    if not 0 <= validation_size < len(x_train):
        raise DataError(f"validation_size must be in [0, {len(x_train) - 1}], got {validation_size}")
    cut = len(x_train) - validation_size
    return Splits(
        x_train[:cut], y_train[:cut].astype(np.int32), x_train[cut:], y_train[cut:].astype(np.int32),
        x_test, y_test.astype(np.int32), num_classes, name,
    )


def tokenize(splits: Splits, levels: int) -> Splits:
    """Turns images into token sequences: each pixel quantized to one of ``levels`` tokens.

    Gives an ``Embedding`` model real data to learn from: ``x`` becomes int32
    ``(N, H*W)`` with values in ``[0, levels)``.

    Args:
      splits: image splits, float inputs in [0, 1].
      levels: the number of tokens (``data.tokens``), a positive integer.

    Returns:
      The same splits with token inputs; the labels are unchanged.
    """
    def q(x):
        return np.minimum((x.reshape(len(x), -1) * levels).astype(np.int32), levels - 1)

    return dataclasses.replace(splits, x_train=q(splits.x_train), x_val=q(splits.x_val), x_test=q(splits.x_test))


def standardize(splits: Splits, stats) -> Splits:
    """The images standardised: ``(x - mean) / std`` in float32, every split with the same two numbers.

    As torchvision's ``Normalize((0.1307,), (0.3081,))`` after ``ToTensor``
    (the MNIST recipe of ``sparse_learning`` and ``dynamic-reparameterization``):
    ``data.standardize=[0.1307,0.3081]``.

    Args:
      splits: float32 images (e.g. in [0, 1]).
      stats: ``[mean, std]``, two finite numbers, ``std > 0``.

    Returns:
      :class:`Splits` with float32 images ``(x - mean) / std``, labels unchanged.

    Raises:
      DataError: ``stats`` is not two finite numbers with ``std > 0``, or the inputs are tokens.
    """
    ok = (isinstance(stats, (list, tuple)) and len(stats) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in stats))
    if not ok or stats[1] <= 0:
        raise DataError(f"data.standardize must be [mean, std], two numbers with std > 0 (e.g. [0.1307, 0.3081] "
                        f"for MNIST), got {stats!r}")
    if splits.x_train.dtype != np.float32:
        raise DataError(f"data.standardize needs float32 images, got {splits.x_train.dtype} (tokens?)")
    mean, std = np.float32(stats[0]), np.float32(stats[1])
    return dataclasses.replace(splits, **{k: (getattr(splits, k) - mean) / std for k in ("x_train", "x_val", "x_test")})


def select_classes(splits: Splits, classes) -> Splits:
    """Keeps only examples of the given classes and relabels them ``0 .. len(classes) - 1`` in that order.

    For task splits such as MNIST digits 0-4 (task A) and 5-9 (task B).

    Args:
      splits: the dataset's splits.
      classes: the labels to keep (ints), in their new order.

    Returns:
      :class:`Splits` with ``num_classes == len(classes)`` and int32 labels in
      ``[0, len(classes))``.

    Raises:
      DataError: a class outside ``[0, num_classes)`` or a repeated class.
    """
    classes = [int(c) for c in classes]
    if len(set(classes)) != len(classes) or not classes:
        raise DataError(f"data.classes must be a non-empty list of distinct labels, got {classes}")
    bad = [c for c in classes if not 0 <= c < splits.num_classes]
    if bad:
        raise DataError(f"data.classes {bad} outside [0, {splits.num_classes - 1}]")
    lookup = np.full(splits.num_classes, -1, dtype=np.int32)
    lookup[classes] = np.arange(len(classes), dtype=np.int32)

    def pick(x, y):
        keep = lookup[y] >= 0
        return x[keep], lookup[y[keep]]

    (xt, yt), (xv, yv), (xs, ys) = (pick(splits.x_train, splits.y_train), pick(splits.x_val, splits.y_val),
                                    pick(splits.x_test, splits.y_test))
    return Splits(xt, yt, xv, yv, xs, ys, len(classes), f"{splits.name}{classes}", splits.source)


def make_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, *, shuffle: bool, seed: int,
                 drop_remainder: bool = False) -> tf.data.Dataset:
    """A ``tf.data`` pipeline of ``(x, y)`` batches: a seeded order reshuffled each epoch -> gather -> prefetch.

    Each batch is gathered from the arrays by index
    (:func:`trainer.inputs.array_batches`), so the examples are held once and
    not copied through a shuffle buffer.

    Args:
      x: inputs ``(N, ...)``.
      y: labels ``(N,)``.
      batch_size: examples per batch, a positive integer.
      shuffle: a new seeded order every epoch.
      seed: the shuffle seed.
      drop_remainder: drop a last batch smaller than ``batch_size``.

    Returns:
      A dataset of ``(x_batch, y_batch)`` with the arrays' dtypes, of known
      length ``ceil(N / batch_size)`` (``floor`` with ``drop_remainder``).

    Raises:
      DataError: ``batch_size`` is not a positive integer.
    """
    batch_size = positive_int("batch_size", batch_size, error=DataError)
    return array_batches((x, y), batch_size, shuffle=shuffle, seed=seed, drop_remainder=drop_remainder)


def split_datasets(splits: Splits, batch_size: int, eval_batch_size: int, *,
                   seed: int) -> Tuple[tf.data.Dataset, Optional[tf.data.Dataset], tf.data.Dataset]:
    """The training, validation and test pipelines of a run (:func:`make_dataset` each).

    Args:
      splits: the dataset's arrays.
      batch_size: training examples per batch (the training set is reshuffled every epoch, seeded).
      eval_batch_size: validation and test examples per batch (in order).
      seed: the shuffle seed.

    Returns:
      ``(train, validation, test)`` datasets of ``(x_batch, y_batch)``;
      ``validation`` is ``None`` when the split is empty.

    Raises:
      DataError: a batch size that is not a positive integer.
    """
    train = make_dataset(splits.x_train, splits.y_train, batch_size, shuffle=True, seed=seed)
    validation = make_dataset(splits.x_val, splits.y_val, eval_batch_size, shuffle=False, seed=seed) \
        if len(splits.x_val) else None
    test = make_dataset(splits.x_test, splits.y_test, eval_batch_size, shuffle=False, seed=seed)
    return train, validation, test
