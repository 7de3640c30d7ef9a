"""Sampled kernel gradients (SDDMM): the gradient of a kernel at its ``k`` trainable elements only.

For ``y = einsum(equation, x, kernel)`` the kernel's gradient at one element is
a sum over the tokens (every axis of ``x`` that is also an axis of ``y``)::

    dW[r, c] = sum_t x2[t, r] * dy2[t, c]

where ``x2`` is ``x`` as ``[tokens, R]`` (R: the contracted axes) and ``dy2``
is ``dy`` as ``[tokens, C]`` (C: the kernel's output axes). Only the ``k``
trainable ``(r, c)`` pairs are computed: two gathers along ``R`` and ``C``, a
product and a reduction over tokens, in float32 whatever the variable's dtype.
The ``[tokens, k]`` intermediates are chunked over tokens: each chunk holds at
most :data:`CHUNK_ELEMENTS` elements per intermediate (so about
``3 * CHUNK_ELEMENTS * 4`` bytes at once: two gathered operands and their
product), and the dense ``[in, out]`` gradient is never formed. They are
formed only once the output gradient exists (:func:`after`), so no layer's
are held from its forward pass to its backward pass. ``dx`` is
``einsum(dy, kernel)``, computed as one matrix product with the kernel read as
a ``[R, C]`` (or ``[C, R]``) matrix where its axes allow (:func:`input_gradient`):
XLA's CPU backend turns the einsum of a kernel of rank 3 (a keras-hub
attention projection, ``[hidden, heads, head_dim]``) into a transposed
*copy* of the kernel, one kernel-sized buffer per projection per step.

:func:`sampled_einsum` is a ``tf.custom_gradient`` whose gradient goes to the
compact ``[k]`` values (an input that the forward does not need numerically:
the kernel holds them, written back after each step); the kernel gets no
gradient, so the tape must be asked for the compact variable instead
(``MaskRegistry.trainable_variables`` does so where gradients are sampled).
:func:`sampled_take` is the same for an embedding lookup (a tied
``ReversibleEmbedding``): ``dE[v, h] = sum_{t: ids[t] == v} dy[t, h]``.
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

CHUNK_ELEMENTS = 1 << 22  # elements of one [tokens, k] intermediate (16 MiB in float32)


class Equation:
    """The axes of a two-operand einsum ``"X,K->O"`` (no ellipsis), as a sampled kernel gradient needs them.

    Attributes:
      x, kernel, out: the letters of the input, the kernel and the output.
      tokens: the letters of ``x`` that are also in the output (batch, sequence...), in ``x``'s order.
      contracted: the kernel's letters that are summed with ``x`` (its rows), in the kernel's order.
      outputs: the kernel's letters that stay in the output (its columns), in the kernel's order.

    Raises:
      ValueError: the equation has an ellipsis, a kernel axis that is in both
        ``x`` and the output, or an axis of ``x`` or of the kernel that is in
        neither of the others (a sum the gradient would not see).
    """

    def __init__(self, equation: str):
        self.text = equation.replace(" ", "")
        if "." in self.text:
            raise ValueError(f"equation {equation!r} has an ellipsis; write every axis")
        inputs, self.out = self.text.split("->")
        self.x, self.kernel = inputs.split(",")
        shared = [a for a in self.kernel if a in self.x and a in self.out]
        lost = [a for a in self.x + self.kernel if a not in self.out and (a not in self.x or a not in self.kernel)]
        if shared or lost:
            raise ValueError(f"equation {equation!r}: axes {shared + lost} are not a plain contraction")
        self.tokens = [a for a in self.x if a in self.out]
        self.contracted = [a for a in self.kernel if a in self.x]
        self.outputs = [a for a in self.kernel if a in self.out]

    @property
    def backward(self) -> str:
        """The equation of ``dx = einsum(backward, dy, kernel)``."""
        return f"{self.out},{self.kernel}->{self.x}"


def _as_matrix(value: tf.Tensor, letters: str, tokens: Sequence[str], columns: Sequence[str]) -> tf.Tensor:
    """``value`` (axes ``letters``) transposed to ``tokens + columns`` and reshaped to ``[T, prod(columns)]``."""
    order = [letters.index(a) for a in list(tokens) + list(columns)]
    moved = tf.transpose(value, order) if order != list(range(len(order))) else value
    shape = tf.shape(value)
    width = 1
    for a in columns:
        width = width * shape[letters.index(a)]
    return tf.reshape(moved, [-1, width])


def kernel_coordinates(indices: tf.Tensor, shape: Sequence[int], equation: Equation) -> Tuple[tf.Tensor, tf.Tensor]:
    """The row (over the contracted axes) and column (over the output axes) of each flat kernel index, ``[k]`` each."""
    shape = [int(d) for d in shape]
    strides = [int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape))]
    coords = {a: (indices // strides[i]) % shape[i] for i, a in enumerate(equation.kernel)}

    def ravel(letters: List[str]) -> tf.Tensor:
        flat = tf.zeros_like(indices)
        for a in letters:
            flat = flat * shape[equation.kernel.index(a)] + coords[a]
        return flat

    return ravel(equation.contracted), ravel(equation.outputs)


def chunked_sum(product: Callable[[tf.Tensor, tf.Tensor], tf.Tensor], left: tf.Tensor, right: tf.Tensor,
                k: int) -> tf.Tensor:
    """``sum over tokens of product(left_chunk, right_chunk)`` (``[chunk, k]`` each), in chunks of tokens.

    Args:
      product: ``(left [c, ...], right [c, ...]) -> [c, k]`` float32.
      left, right: ``[T, ...]`` tensors with the same number of rows.
      k: the number of sampled elements (static).

    Returns:
      A ``[k]`` float32 tensor. Each chunk has ``max(1, CHUNK_ELEMENTS // k)`` tokens.
    """
    chunk = max(1, CHUNK_ELEMENTS // max(k, 1))
    tokens = left.shape[0]
    if tokens is not None and tokens <= chunk:
        return tf.reduce_sum(product(left, right), axis=0)
    total = tf.shape(left)[0]
    count = (total + chunk - 1) // chunk
    pad = count * chunk - total

    def split(value):
        padded = tf.pad(value, [[0, pad]] + [[0, 0]] * (len(value.shape) - 1))  # zero rows add nothing
        return tf.reshape(padded, tf.concat([[count, chunk], tf.shape(value)[1:]], 0))

    lefts, rights = split(left), split(right)

    def body(i, acc):
        return i + 1, acc + tf.reduce_sum(product(lefts[i], rights[i]), axis=0)

    _, acc = tf.while_loop(lambda i, _: i < count, body, (tf.constant(0), tf.zeros([k], tf.float32)))
    return acc


def sampled_kernel_gradient(x: tf.Tensor, dy: tf.Tensor, indices: tf.Tensor, shape: Sequence[int],
                            equation: Equation) -> tf.Tensor:
    """``tf.gather(reshape(dkernel, [-1]), indices)`` of ``y = einsum(equation, x, kernel)``, never forming ``dkernel``.

    Args:
      x: the layer's input, axes ``equation.x``.
      dy: the gradient of the output, axes ``equation.out``.
      indices: ``[k]`` int flat indices into the kernel.
      shape: the kernel's static shape.

    Returns:
      ``[k]`` float32.
    """
    rows, cols = kernel_coordinates(indices, shape, equation)
    x2 = tf.cast(_as_matrix(x, equation.x, equation.tokens, equation.contracted), tf.float32)
    dy2 = tf.cast(_as_matrix(dy, equation.out, equation.tokens, equation.outputs), tf.float32)
    k = int(indices.shape[0])
    return chunked_sum(lambda a, b: tf.gather(a, rows, axis=1) * tf.gather(b, cols, axis=1), x2, dy2, k)


def input_gradient(equation: Equation, dy: tf.Tensor, kernel: tf.Tensor, x_shape: tf.Tensor) -> tf.Tensor:
    """``dx = einsum(equation.backward, dy, kernel)``, as one matrix product where the kernel's axes allow it.

    When the kernel's axes are its contracted axes followed by its output
    axes (``[R, C]``, e.g. ``"muh"`` in ``"bqm,muh->bquh"``) or the output
    axes followed by the contracted ones (``[C, R]``), the kernel is read as
    a matrix by a reshape (no copy) and ``dx2 = dy2 @ K^T`` (or ``dy2 @ K``)
    is one ``tf.matmul`` with ``transpose_b``, which XLA computes without
    moving the kernel. Otherwise (interleaved axes) the einsum is used.

    Args:
      equation: the layer's :class:`Equation`.
      dy: the output gradient, axes ``equation.out``.
      kernel: the kernel's value.
      x_shape: ``tf.shape(x)`` of the forward input (axes ``equation.x``).

    Returns:
      ``dx``, axes ``equation.x``, ``dy``'s dtype.
    """
    letters = list(equation.kernel)
    rows, cols = list(equation.contracted), list(equation.outputs)
    if letters == rows + cols:
        transpose = True
    elif letters == cols + rows:
        transpose = False
    else:
        return keras.ops.einsum(equation.backward, dy, kernel)
    size = {a: int(kernel.shape[letters.index(a)]) for a in letters}
    r, c = int(np.prod([size[a] for a in rows])), int(np.prod([size[a] for a in cols]))
    matrix = kernel if len(letters) == 2 else tf.reshape(kernel, [r, c] if transpose else [c, r])
    dx2 = tf.matmul(_as_matrix(dy, equation.out, equation.tokens, cols), matrix, transpose_b=transpose)
    tokens = [x_shape[equation.x.index(a)] for a in equation.tokens]
    dx = tf.reshape(dx2, tf.stack(tokens + [size[a] for a in rows]))  # axes: tokens, then contracted
    order = [(equation.tokens + rows).index(a) for a in equation.x]
    return tf.transpose(dx, order) if order != list(range(len(order))) else dx


def after(dy: tf.Tensor, *tensors: tf.Tensor) -> List[tf.Tensor]:
    """``tensors``, read only once ``dy`` exists (``tf.identity`` under a control dependency: no copy).

    TensorFlow's graph executor runs an op as soon as its inputs are ready. A
    gradient's ops that read only forward tensors (``x`` cast to float32, its
    gathered ``[tokens, k]`` columns, the kernel coordinates of the indices)
    would otherwise run during the forward pass and be held until the backward
    pass reaches their layer: about ``tokens * k * 4`` bytes per kernel at once.
    """
    with tf.control_dependencies([dy]):
        return [tf.identity(t) for t in tensors]


def sampled_einsum(equation: Equation, x: tf.Tensor, kernel, compact: tf.Tensor, indices: tf.Tensor) -> tf.Tensor:
    """``einsum(equation, x, kernel)`` whose kernel gradient is sampled and given to ``compact`` (``[k]``).

    Args:
      equation: the layer's :class:`Equation`.
      x: the input (the kernel's dtype).
      kernel: the kernel's ``tf.Variable`` or value (it gets no gradient).
      compact: ``[k]`` tensor read from the compact variable (float32 masters or the kernel's dtype).
      indices: ``[k]`` flat indices of the trainable elements.

    Returns:
      The einsum, as the layer computes it.
    """
    shape = tuple(int(d) for d in kernel.shape)
    value = tf.convert_to_tensor(kernel)  # read outside: the custom gradient sees no kernel-shaped input

    @tf.custom_gradient
    def forward(x, compact):
        y = keras.ops.einsum(equation.text, x, value)  # as the layer computes it: its matmuls where it has them

        def grad(dy, variables=None):
            dx = input_gradient(equation, dy, value, tf.shape(x))
            x_now, indices_now = after(dy, x, indices)
            dc = tf.cast(sampled_kernel_gradient(x_now, dy, indices_now, shape, equation), compact.dtype)
            return (dx, dc), [None] * len(variables or ())

        return y, grad

    return forward(x, compact)


def sampled_take(table, ids: tf.Tensor, compact: tf.Tensor, indices: tf.Tensor) -> tf.Tensor:
    """``tf.gather(table, ids)`` (an embedding lookup) whose table gradient is sampled and given to ``compact``.

    ``dE[v, h] = sum_{t: ids[t] == v} dy[t, h]`` at the ``k`` trainable ``(v, h)``,
    chunked over tokens like :func:`sampled_kernel_gradient`. ``ids`` gets no gradient.
    """
    shape = tuple(int(d) for d in table.shape)
    equation = Equation("tv,vh->th")  # the lookup as a one-hot product: rows v, columns h

    value = tf.convert_to_tensor(table)

    @tf.custom_gradient
    def forward(compact):
        y = tf.gather(value, ids)

        def grad(dy, variables=None):
            ids_now, indices_now = after(dy, ids, indices)
            rows, cols = kernel_coordinates(indices_now, shape, equation)
            flat_ids = tf.reshape(tf.cast(ids_now, rows.dtype), [-1, 1])
            dy2 = tf.cast(tf.reshape(dy, [-1, shape[1]]), tf.float32)
            k = int(indices.shape[0])
            dc = chunked_sum(lambda a, b: tf.cast(tf.equal(a, rows[None, :]), tf.float32) * tf.gather(b, cols, axis=1),
                             flat_ids, dy2, k)
            return tf.cast(dc, compact.dtype), [None] * len(variables or ())

        return y, grad

    return forward(compact)
