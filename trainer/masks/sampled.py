"""Sampled kernel gradients (SDDMM): the gradient of a kernel at its ``k`` trainable elements only.

For ``y = einsum(equation, x, kernel)`` the kernel's gradient at one element is
a sum over the tokens (every axis of ``x`` that is also an axis of ``y``)::

    dW[r, c] = sum_t x2[t, r] * dy2[t, c]

where ``x2`` is ``x`` as ``[tokens, R]`` (R: the contracted axes) and ``dy2``
is ``dy`` as ``[tokens, C]`` (C: the kernel's output axes). Only the ``k``
trainable ``(r, c)`` pairs are computed (:func:`sampled_dot`): ``x`` and ``dy``
are transposed once to ``[R, tokens]`` and ``[C, tokens]`` and cast to
float32 once, so that each trainable element reads two contiguous rows; the
rows are gathered for a chunk of the ``k`` elements at a time, multiplied and
summed over tokens. Each chunk holds at most :data:`CHUNK_ELEMENTS` elements
per intermediate (128 KiB: below glibc's mmap threshold, also the one
``trainer.low_memory_allocator`` fixes, so the chunks are recycled from the heap
instead of being mapped and faulted in anew), beside the two transposed
copies, and the dense ``[in, out]`` gradient is never formed. Above
:data:`DENSE_DENSITY` of the kernel trainable, where ``tokens * k`` gathered
elements cost more than the matrix product, :func:`dense_blocks` computes
``[block, C]`` slices of ``x2^T dy2`` (at most :data:`BLOCK_ELEMENTS` at a
time) and reads the pairs from them. Measured on a 2-core CPU for a ``[2048,
5632]`` kernel at 1,024 tokens and 0.59 % trainable, no XLA
(``experiments/benchmark/sampled_layout/probe.py``): 40 ms (80 ms with the
low-memory allocator), against 112 ms (130 ms) for the dense ``x2^T dy2`` and
336 ms (585 ms) for the earlier gathers along the token axis of ``[tokens,
R]``; at 128 tokens and 0.1 %, 3.0 ms against 15.3 ms. From such ratios the
crossover lies between about 0.6 % and 1.4 % trainable (estimated, not
swept). The intermediates are formed only once the output gradient exists (:func:`after`), so no layer's
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
``ReversibleEmbedding``): ``dE[v, h] = sum_{t: ids[t] == v} dy[t, h]``, a
segment sum of ``dy`` over the distinct ids (``tokens * hidden`` work, not
``tokens * k``).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from trainer.masks.writeback import unravel

CHUNK_ELEMENTS = 1 << 15  # elements of one [chunk of k, tokens] intermediate (128 KiB in float32)
DENSE_DENSITY = 0.01  # above this trainable fraction of a kernel, its gradient is computed in dense blocks
BLOCK_ELEMENTS = 1 << 22  # elements of one dense [rows, C] block (16 MiB in float32)


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

    def matrix_shape(self, shape: Sequence[int]) -> Tuple[int, int]:
        """``(R, C)``: the kernel of static ``shape`` read as a matrix, rows over its contracted axes."""
        size = dict(zip(self.kernel, (int(d) for d in shape)))
        rows, cols = ([size[a] for a in axes] for axes in (self.contracted, self.outputs))
        return int(np.prod(rows, dtype=np.int64)), int(np.prod(cols, dtype=np.int64))

    @property
    def layout(self) -> Optional[str]:
        """How the kernel's axes read as a matrix without moving them: ``"RC"`` (the contracted axes, then the
        output axes: ``[R, C]`` row-major), ``"CR"`` (the reverse), or ``None`` (they interleave)."""
        letters = list(self.kernel)
        if letters == self.contracted + self.outputs:
            return "RC"
        if letters == self.outputs + self.contracted:
            return "CR"
        return None

    @property
    def backward(self) -> str:
        """The equation of ``dx = einsum(backward, dy, kernel)``."""
        return f"{self.out},{self.kernel}->{self.x}"


def _as_matrix(value: tf.Tensor, letters: str, first: Sequence[str], second: Sequence[str]) -> tf.Tensor:
    """``value`` (axes ``letters``) transposed to ``first + second`` and reshaped to ``[prod(first), prod(second)]``.

    The sizes stay static where ``value``'s are (XLA and the chunk count need them).
    """
    order = [letters.index(a) for a in list(first) + list(second)]
    moved = tf.transpose(value, order) if order != list(range(len(order))) else value

    def size(axes):
        static = [value.shape[letters.index(a)] for a in axes]
        if all(d is not None for d in static):
            return int(np.prod(static, dtype=np.int64))
        dynamic = tf.shape(value)
        return tf.reduce_prod([dynamic[letters.index(a)] for a in axes])

    return tf.reshape(moved, tf.stack([size(first), size(second)]))


def kernel_coordinates(indices: tf.Tensor, shape: Sequence[int], equation: Equation) -> Tuple[tf.Tensor, tf.Tensor]:
    """The row (over the contracted axes) and column (over the output axes) of each flat kernel index, ``[k]`` each.

    A kernel whose axes are its contracted axes then its output axes (``[R, C]`` row-major: a ``Dense``
    kernel, keras-hub Llama's projections) or the reverse takes one ``//`` and one ``%``; interleaved axes
    (Gemma's ``"ndh"`` query kernel) are unravelled axis by axis and raveled again.
    """
    shape = [int(d) for d in shape]
    height, width = equation.matrix_shape(shape)
    if equation.layout == "RC":
        return indices // width, indices % width
    if equation.layout == "CR":
        return indices % height, indices // height
    letters = list(equation.kernel)
    coords = dict(zip(letters, unravel(indices, shape)))

    def ravel(axes: List[str]) -> tf.Tensor:
        if not axes:
            return tf.zeros_like(indices)
        flat = coords[axes[0]]
        for a in axes[1:]:
            flat = flat * shape[letters.index(a)] + coords[a]
        return flat

    return ravel(equation.contracted), ravel(equation.outputs)


def sampled_dot(left: tf.Tensor, right: tf.Tensor, rows: tf.Tensor, cols: tf.Tensor) -> tf.Tensor:
    """``out[i] = sum_t left[rows[i], t] * right[cols[i], t]`` in float32, in chunks of the ``k`` pairs.

    Args:
      left: ``[R, T]`` (any float dtype; cast to float32 once, before the gathers).
      right: ``[C, T]``.
      rows, cols: ``[k]`` int, the pairs (``k`` static).

    Returns:
      ``[k]`` float32, in the pairs' order. Each chunk gathers
      ``max(1, CHUNK_ELEMENTS // T)`` pairs: two ``[chunk, T]`` float32 blocks
      and their product at once. Where one chunk does not hold them all, the
      chunks run in :func:`_pairs_in_chunks`, one ``tf.function`` that every
      kernel's gradient calls (see there).
    """
    k = int(rows.shape[0])
    tokens = left.shape[1]
    left, right = tf.cast(left, tf.float32), tf.cast(right, tf.float32)  # once: a cast per chunk costs k * T
    if tokens is not None and k * tokens <= CHUNK_ELEMENTS:
        return tf.reduce_sum(tf.gather(left, rows) * tf.gather(right, cols), 1)
    chunk = tf.maximum(tf.constant(1, tf.int64), CHUNK_ELEMENTS // tf.shape(left, out_type=tf.int64)[1])
    out = _pairs_in_chunks(left, right, tf.cast(rows, tf.int64), tf.cast(cols, tf.int64), chunk)
    return tf.ensure_shape(out, [k])


@tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32)] * 2 + [tf.TensorSpec([None], tf.int64)] * 2
             + [tf.TensorSpec([], tf.int64)], autograph=False, experimental_attributes={"_noinline": True})
def _pairs_in_chunks(left, right, rows, cols, chunk):
    """:func:`sampled_dot`'s chunks, ``chunk`` pairs at a time, in a ``tf.while_loop``.

    One function with unknown sizes, never inlined (``_noinline``), so every
    kernel's call runs the same instantiated graph. TensorFlow inlines a
    called function into its caller by default, and keeps a graph and an
    executor for each ``tf.while_loop`` it then finds: measured, 100 such
    loops in one ``tf.function`` kept 295 MiB resident after it ran, the same
    100 calls of this non-inlined function 24 MiB, the gathers unrolled
    without a loop 23 MiB (``experiments/benchmark/sampled_layout/loop_memory.py``).
    """
    k = tf.shape(rows, out_type=tf.int64)[0]
    count = (k + chunk - 1) // chunk
    pad = count * chunk - k  # padded pairs read row 0 and are cut off
    rows2 = tf.reshape(tf.pad(rows, [[0, pad]]), tf.stack([count, chunk]))
    cols2 = tf.reshape(tf.pad(cols, [[0, pad]]), tf.stack([count, chunk]))
    parts = tf.TensorArray(tf.float32, size=tf.cast(count, tf.int32), element_shape=tf.TensorShape([None]))

    def body(i, parts):
        return i + 1, parts.write(i, tf.reduce_sum(tf.gather(left, rows2[i]) * tf.gather(right, cols2[i]), 1))

    _, parts = tf.while_loop(lambda i, _: i < tf.cast(count, tf.int32), body, (tf.constant(0), parts))
    return tf.reshape(parts.stack(), [-1])[:k]


def dense_blocks(left: tf.Tensor, right: tf.Tensor, rows: tf.Tensor, cols: tf.Tensor) -> tf.Tensor:
    """The same ``[k]`` as :func:`sampled_dot`, from dense ``[block, C]`` products: for a large trainable fraction.

    The rows of ``left`` are taken :data:`BLOCK_ELEMENTS` ``// C`` at a time
    (zero rows pad the last block); each block's ``left[block] @ right^T`` is
    one matrix product, and the pairs whose row falls in the block are read
    from it. One ``[block, C]`` float32 buffer at a time: the whole ``[R, C]``
    gradient is never formed. ``T * R * C`` multiply-adds (a matrix product's
    speed) plus ``k`` reads per block.

    Args and returns: as :func:`sampled_dot` (``R`` and ``C`` static).
    """
    height, width = int(left.shape[0]), int(right.shape[0])
    block = max(1, min(height, BLOCK_ELEMENTS // width))
    count = -(-height // block)
    left = tf.cast(left, tf.float32)
    right = tf.cast(right, tf.float32)
    if count * block != height:
        left = tf.pad(left, [[0, count * block - height], [0, 0]])
    k = int(rows.shape[0])

    def body(i, acc):
        part = tf.matmul(tf.slice(left, tf.stack([i * block, 0]), [block, -1]), right, transpose_b=True)
        local = rows - tf.cast(i * block, rows.dtype)
        inside = (local >= 0) & (local < block)
        flat = tf.clip_by_value(local, 0, block - 1) * width + cols
        return i + 1, acc + tf.where(inside, tf.gather(tf.reshape(part, [-1]), flat), 0.0)

    return tf.while_loop(lambda i, _: i < count, body, (tf.constant(0), tf.zeros([k], tf.float32)))[1]


def sampled_kernel_gradient(x: tf.Tensor, dy: tf.Tensor, indices: tf.Tensor, shape: Sequence[int],
                            equation: Equation) -> tf.Tensor:
    """``tf.gather(reshape(dkernel, [-1]), indices)`` of ``y = einsum(equation, x, kernel)``, never forming ``dkernel``.

    Up to :data:`DENSE_DENSITY` of the kernel trainable, :func:`sampled_dot`
    (``T * k`` work); above it, :func:`dense_blocks` (``T * R * C`` work at a
    matrix product's speed, which is then the faster).

    Args:
      x: the layer's input, axes ``equation.x``.
      dy: the gradient of the output, axes ``equation.out``.
      indices: ``[k]`` int flat indices into the kernel.
      shape: the kernel's static shape.

    Returns:
      ``[k]`` float32.
    """
    rows, cols = kernel_coordinates(indices, shape, equation)
    height, width = equation.matrix_shape(shape)
    x2 = tf.ensure_shape(_as_matrix(x, equation.x, equation.contracted, equation.tokens), [height, None])  # [R, T]
    dy2 = tf.ensure_shape(_as_matrix(dy, equation.out, equation.outputs, equation.tokens), [width, None])  # [C, T]
    if int(indices.shape[0]) > DENSE_DENSITY * int(np.prod(shape, dtype=np.int64)):
        return dense_blocks(x2, dy2, rows, cols)
    return sampled_dot(x2, dy2, rows, cols)


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
    if equation.layout is None:
        return keras.ops.einsum(equation.backward, dy, kernel)
    transpose = equation.layout == "RC"
    letters, rows, cols = list(equation.kernel), list(equation.contracted), list(equation.outputs)
    size = dict(zip(letters, (int(d) for d in kernel.shape)))
    r, c = equation.matrix_shape(kernel.shape)
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
            dc = segment_gradient(tf.cast(tf.reshape(ids_now, [-1]), rows.dtype), tf.reshape(dy, [-1, shape[1]]),
                                  rows, cols)
            return tf.cast(dc, compact.dtype), [None] * len(variables or ())

        return y, grad

    return forward(compact)


def segment_gradient(ids: tf.Tensor, dy: tf.Tensor, rows: tf.Tensor, cols: tf.Tensor) -> tf.Tensor:
    """``out[i] = sum_{t: ids[t] == rows[i]} dy[t, cols[i]]`` (float32): an embedding table's gradient at k elements.

    The ids are sorted and ``dy``'s rows summed per distinct id (at most ``T``
    segments: ``[T, H]`` float32); each trainable row finds its segment by a
    binary search. ``T * H + k * log T`` work, every op one XLA compiles.

    Args:
      ids: ``[T]`` int, the looked-up rows (``rows``' dtype).
      dy: ``[T, H]``, the lookup's output gradient.
      rows, cols: ``[k]`` int, the table elements wanted.

    Returns:
      ``[k]`` float32; zero where no token looked up the row.
    """
    order = tf.argsort(ids)
    ordered = tf.gather(ids, order)
    segment = tf.cumsum(tf.cast(tf.not_equal(ordered[1:], ordered[:-1]), ids.dtype))
    segment = tf.concat([tf.zeros([1], ids.dtype), segment], 0)  # [T]: 0, 0, 1, ... the rank of each sorted id
    size = tf.shape(ids, out_type=ids.dtype)[0]
    summed = tf.math.unsorted_segment_sum(tf.cast(tf.gather(dy, order), tf.float32), segment, size)  # [T, H]
    distinct = tf.math.unsorted_segment_min(ordered, segment, size)  # sorted; unused segments hold the dtype's max
    slot = tf.minimum(tf.searchsorted(distinct, rows, out_type=ids.dtype), size - 1)
    found = tf.equal(tf.gather(distinct, slot), rows)
    width = tf.shape(dy, out_type=ids.dtype)[1]
    return tf.where(found, tf.gather(tf.reshape(summed, [-1]), slot * width + cols), 0.0)
