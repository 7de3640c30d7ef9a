"""Deployable exports of a (stripped or sparse) Keras model: a LiteRT / TFLite flatbuffer and a SavedModel.

:func:`export_tflite` converts with ``tf.lite.TFLiteConverter``; with ``sparsity=True`` it asks for
``tf.lite.Optimize.EXPERIMENTAL_SPARSITY``, which stores weight tensors that are mostly zero in a sparse
(CSR-like) encoding: a smaller file. Whether it runs faster depends on the runtime's kernels; this CPU's numbers,
gains or not, are in ``docs/structured-pruning.md`` (``scripts/bench_export.py``). :class:`TFLiteModel` runs such
a file for one fixed batch size. :func:`load_saved_model` calls back the ``serve`` endpoint of a SavedModel that
:func:`trainer.report.export_saved_model` wrote.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from typing import Callable, Union

import numpy as np
import tensorflow as tf

from trainer import rundir

__all__ = ["TFLiteModel", "directory_bytes", "export_tflite", "load_saved_model", "tflite_bytes"]


def tflite_bytes(model, *, sparsity: bool = True) -> bytes:
    """The model as a TFLite flatbuffer (float32).

    Args:
      model: a built ``keras.Model`` (any Keras model the converter accepts).
      sparsity: request ``Optimize.EXPERIMENTAL_SPARSITY`` (sparse encoding of mostly-zero weights).

    Returns:
      The flatbuffer's bytes.
    """
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints the SavedModel it traces
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        if sparsity:
            converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
        return converter.convert()


def export_tflite(model, path: Union[str, os.PathLike], *, sparsity: bool = True) -> int:
    """Writes :func:`tflite_bytes` to ``path`` atomically (:func:`trainer.rundir.atomic_write`). Returns its size in
    bytes."""
    content = tflite_bytes(model, sparsity=sparsity)
    with rundir.atomic_write(os.fspath(path)) as tmp, open(tmp, "wb") as f:
        f.write(content)
    return len(content)


class TFLiteModel:
    """A TFLite flatbuffer run by the TensorFlow Lite interpreter for one batch size.

    Args:
      content: the flatbuffer (``bytes``) or a path to a ``.tflite`` file.
      batch_size: the input batch size the interpreter is sized for.
      num_threads: interpreter threads (XNNPACK's CPU delegate is on by default).

    Calling it with a float32 array ``(batch_size, *input_shape)`` returns the float32 outputs.
    """

    def __init__(self, content: Union[bytes, str, os.PathLike], batch_size: int = 1, *, num_threads: int = 1):
        kwargs = {"model_content": content} if isinstance(content, bytes) else {"model_path": os.fspath(content)}
        with warnings.catch_warnings():  # tf.lite.Interpreter's deprecation notice (LiteRT's is the same runtime)
            warnings.simplefilter("ignore")
            self.interpreter = tf.lite.Interpreter(num_threads=num_threads, **kwargs)
        self.input = self.interpreter.get_input_details()[0]
        shape = [batch_size] + list(self.input["shape"][1:])
        self.interpreter.resize_tensor_input(self.input["index"], shape)
        self.interpreter.allocate_tensors()
        self.output = self.interpreter.get_output_details()[0]["index"]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.input["index"], np.asarray(x, np.float32))
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output)


def load_saved_model(directory: Union[str, os.PathLike]) -> Callable[[np.ndarray], np.ndarray]:
    """The ``serve`` endpoint of a SavedModel (``tf.saved_model.load``, no Keras): float32 array -> outputs."""
    loaded = tf.saved_model.load(os.fspath(directory))  # kept alive by the closure: it owns the variables
    return lambda x: loaded.serve(tf.constant(x, tf.float32)).numpy()


def directory_bytes(path: Union[str, os.PathLike]) -> int:
    """The size of a file, or of every file under a directory, in bytes."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, files in os.walk(path) for name in files)
