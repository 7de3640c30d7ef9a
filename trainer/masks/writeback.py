"""Writing compact ``[k]`` values into their model variables in place, outside the XLA program of the step.

A scatter into a model variable *inside* an XLA program is not done in place:
XLA gives the program a new full-size buffer for every variable it writes
(measured: about 4 bytes per parameter of peak memory for float32 kernels at
0.1 % trainable, by the write-back probe of issue 29; docs/llm_scale.md).
The same ``ResourceScatterNdUpdate`` run by the TensorFlow runtime updates the
variable's buffer in place (it copies only a buffer that something else still
references, and nothing does once the compiled step has returned).

So with one replica (with or without ``jit_compile``; without it, a scatter
inside the step would copy every kernel a forward or backward read still holds),
:func:`trainer.step.make_step` traces the step under :func:`deferred` (the
compact updates' :meth:`~trainer.masks.updates.CompactUpdate.release` then
writes nothing) and runs :func:`trainer.step.write_back` right after it, in the same
``tf.function`` of the execution but outside the step's own function. It runs after
*every* step, so with ``steps_per_execution > 1`` the next step's forward pass
reads the kernel with the previous update in it: there is no stale kernel, and
``k`` steps per execution give the same bits as one (tested). Under several
replicas the optimizer update already runs outside XLA (cross-replica
context), and the write-back stays in the step.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, List, Sequence

import numpy as np
import tensorflow as tf
from tensorflow.python.ops import control_flow_util  # no public API says whether a trace is XLA's

__all__ = ["deferred", "deferring", "is_deferred", "scatter_flat", "unravel"]

_LOCAL = threading.local()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """While active (in this thread), compact updates leave the write-back to :func:`write_back`."""
    previous = getattr(_LOCAL, "deferred", False)
    _LOCAL.deferred = True
    try:
        yield
    finally:
        _LOCAL.deferred = previous


def is_deferred() -> bool:
    """True inside :func:`deferred` (e.g. while the XLA step is traced)."""
    return bool(getattr(_LOCAL, "deferred", False))


def deferring(fn: Callable) -> Callable:
    """``fn`` run (and so traced) under :func:`deferred`."""
    def call(*args, **kwargs):
        with deferred():
            return fn(*args, **kwargs)

    return call


def unravel(indices: tf.Tensor, shape: Sequence[int]) -> List[tf.Tensor]:
    """The coordinates of flat (row-major) ``indices`` in a static ``shape``: one ``[k]`` tensor per axis.

    By strides, in ``indices``' dtype (``tf.unravel_index`` has no XLA kernel). The first axis takes no
    remainder (an index is below the size) and the last no division (its stride is 1): for a matrix, one
    ``//`` and one ``%``.

    Args:
      indices: ``[k]`` int32 / int64, each below ``prod(shape)``.
      shape: the static shape, at least one axis.
    """
    shape = [int(d) for d in shape]
    strides = [int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape))]
    coords = []
    for axis, (stride, dim) in enumerate(zip(strides, shape)):
        coord = indices if stride == 1 else indices // stride
        coords.append(coord if axis == 0 else coord % dim)
    return coords


def scatter_flat(variable: tf.Variable, indices: tf.Tensor, values: tf.Tensor, shape: Sequence[int]) -> None:
    """``variable[unravel(indices)] = values`` in place (``ResourceVariable.scatter_nd_update``).

    Args:
      variable: a ``tf.Variable`` (one replica's copy) of static ``shape``.
      indices: ``[k]`` int32 / int64 flat (row-major) indices.
      values: ``[k]`` values of the variable's dtype.
      shape: the variable's shape (flat index -> coordinates by strides: ``tf.unravel_index`` has no XLA kernel).
    """
    variable.scatter_nd_update(tf.stack(unravel(indices, shape), axis=1), values)
    if not control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
        # A sparse write puts the variable in TensorFlow's copy-on-read mode: from then on every read
        # (`ReadVariableOp`) copies the whole variable, e.g. each kernel of the forward pass, kept to the backward
        # (measured: +3.8 bytes/parameter at 1.1B without XLA). Reads share the buffer again once it is disabled;
        # the next sparse write copies the variable only if a read still holds it. XLA has no kernel for the op,
        # and its own reads never copy.
        tf.raw_ops.DisableCopyOnRead(resource=variable.handle)
