"""Probe: one kernel's sampled gradient, the earlier layout against the current one and the dense product.

    python experiments/benchmark/sampled_layout/probe.py [--low-memory-allocator]

For each shape (rows R, columns C, tokens T, trainable fraction) it times, in one
process, interleaved, median of 5 (no XLA, float32 inputs):

* ``token_axis``: the layout before 2026-12-07, gathers along the token axis of
  ``[T, R]`` and ``[T, C]`` in chunks of ``2**22 // k`` tokens;
* ``pairs_2^N``: ``trainer.masks.sampled.sampled_dot`` (rows of ``[R, T]`` and
  ``[C, T]`` gathered for a chunk of the ``k`` pairs) with ``CHUNK_ELEMENTS = 2**N``;
* ``dense_blocks``: ``trainer.masks.sampled.dense_blocks`` (``[block, C]`` products);
* ``dense``: one ``x2^T dy2`` and a gather (the whole ``[R, C]`` gradient formed).

Every result is checked against ``dense`` (rtol 1e-4). Prints one line per case.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
if "--low-memory-allocator" in sys.argv:
    from trainer.allocator import low_memory_allocator

    low_memory_allocator()
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import trainer.masks.sampled as sampled  # noqa: E402

SHAPES = [(2048, 5632, 1024, 0.0059), (2048, 5632, 128, 0.001), (2048, 32000, 1024, 0.0059)]


def token_axis(x2, dy2, rows, cols, k):
    chunk = max(1, (1 << 22) // k)
    tokens, r, c = x2.shape[0], x2.shape[1], dy2.shape[1]
    if tokens <= chunk:
        return tf.reduce_sum(tf.gather(x2, rows, axis=1) * tf.gather(dy2, cols, axis=1), 0)
    count = -(-tokens // chunk)
    pad = count * chunk - tokens
    xs = tf.reshape(tf.pad(x2, [[0, pad], [0, 0]]), [count, chunk, r])
    ds = tf.reshape(tf.pad(dy2, [[0, pad], [0, 0]]), [count, chunk, c])

    def body(i, acc):
        return i + 1, acc + tf.reduce_sum(tf.gather(xs[i], rows, axis=1) * tf.gather(ds[i], cols, axis=1), 0)

    return tf.while_loop(lambda i, _: i < count, body, (0, tf.zeros([k])))[1]


def pairs(chunk):
    def run(x2, dy2, rows, cols, k):
        sampled.CHUNK_ELEMENTS = chunk  # read when the function is traced
        return sampled.sampled_dot(tf.transpose(x2), tf.transpose(dy2), rows, cols)
    return run


def main():
    for r, c, tokens, density in SHAPES:
        rng = np.random.default_rng(0)
        k = int(r * c * density)
        flat = np.sort(rng.choice(r * c, k, replace=False)).astype(np.int32)
        rows, cols = tf.constant(flat // c), tf.constant(flat % c)
        x2 = tf.constant(rng.normal(size=(tokens, r)).astype(np.float32))
        dy2 = tf.constant(rng.normal(size=(tokens, c)).astype(np.float32))
        cases = {"token_axis": token_axis, "pairs_2^15": pairs(1 << 15), "pairs_2^18": pairs(1 << 18),
                 "pairs_2^20": pairs(1 << 20),
                 "dense_blocks": lambda x2, dy2, rows, cols, k: sampled.dense_blocks(
                     tf.transpose(x2), tf.transpose(dy2), rows, cols),
                 "dense": lambda x2, dy2, rows, cols, k: tf.gather(
                     tf.reshape(tf.matmul(x2, dy2, transpose_a=True), [-1]), flat)}
        functions = {name: tf.function(lambda x2, dy2, f=f: f(x2, dy2, rows, cols, k)) for name, f in cases.items()}
        reference = functions["dense"](x2, dy2).numpy()
        for name, f in functions.items():
            np.testing.assert_allclose(f(x2, dy2).numpy(), reference, rtol=1e-4, atol=1e-3, err_msg=name)
        times = {name: [] for name in functions}
        for _ in range(5):
            for name, f in functions.items():
                start = time.perf_counter()
                f(x2, dy2).numpy()
                times[name].append(time.perf_counter() - start)
        label = f"[{r}, {c}] kernel, {tokens} tokens, {density:.2%} trainable (k={k})"
        print(label + ": " + ", ".join(f"{name} {1000 * np.median(t):.1f} ms" for name, t in times.items()))


if __name__ == "__main__":
    main()
