"""Probe: how much of one training step of the 1.1B benchmark model the sampled kernel gradients take.

    python experiments/benchmark/sampled_layout/step_share.py [--tokens 128] [--dtype bfloat16]
        [--low-memory-allocator]

For every kernel of ``scripts/bench_llm.py --shape tinyllama-1.1b`` (22 layers:
the query, key, value and output projections, the three feed-forward kernels;
the reverse token embedding; the token embedding's lookup), with the benchmark's
0.1 % of its elements trainable (random, seed 0), it times what the sampled
gradient adds to a step: :func:`trainer.masks.sampled.sampled_kernel_gradient`
(the lookup: :func:`trainer.masks.sampled.segment_gradient`), from ``x`` and
``dy`` in ``--dtype``, each kernel shape in its own ``tf.function``, no XLA,
median of 7 calls less the median call of a function of the same arguments that returns at once
(the Python call and its dispatch, which the step's one graph does not pay per kernel), shapes
interleaved. Each distinct shape is timed once and counted as often as the model has it. keras-hub LoRA computes no such
gradient (its base kernels are frozen), so the sum is the step time the trainer
spends where LoRA spends none, beside LoRA's own rank-4 products.
"""

import argparse
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

from trainer.masks.sampled import Equation, kernel_coordinates, sampled_kernel_gradient, segment_gradient  # noqa: E402

LAYERS, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 22, 2048, 5632, 32, 4, 32000
HEAD = HIDDEN // HEADS
KERNELS = [  # name, equation (keras-hub's LlamaBackbone; Dense as "by,yz->bz"), kernel shape, count per model
    ("query", "bqm,muh->bquh", (HIDDEN, HEADS, HEAD), LAYERS),
    ("key / value", "bkm,mvh->bkvh", (HIDDEN, KV_HEADS, HEAD), 2 * LAYERS),
    ("attention output", "bquh,uhm->bqm", (HEADS, HEAD, HIDDEN), LAYERS),
    ("gate / intermediate", "bty,yz->btz", (HIDDEN, INTERMEDIATE), 2 * LAYERS),
    ("feed-forward output", "bty,yz->btz", (INTERMEDIATE, HIDDEN), LAYERS),
    ("reverse embedding", "bty,yz->btz", (HIDDEN, VOCAB), 1),
    ("token embedding (lookup)", None, (VOCAB, HIDDEN), 1),
]


def operand(letters: str, sizes: dict, dtype, rng) -> tf.Tensor:
    return tf.constant(rng.normal(size=[sizes[a] for a in letters]).astype(np.float32), dtype=dtype)


def case(equation, shape, tokens, density, dtype, rng):
    """A ``tf.function`` computing one kernel's sampled gradient, and its arguments."""
    size = int(np.prod(shape))
    k = int(round(density * size))
    indices = tf.constant(np.sort(rng.choice(size, k, replace=False)).astype(np.int32))
    if equation is None:  # the lookup: dy [tokens, hidden], ids [tokens]
        ids = tf.constant(rng.integers(0, shape[0], tokens).astype(np.int32))
        dy = operand("th", {"t": tokens, "h": shape[1]}, dtype, rng)
        eq = Equation("tv,vh->th")

        @tf.function(autograph=False)
        def lookup(ids, dy, indices):
            rows, cols = kernel_coordinates(indices, shape, eq)
            return segment_gradient(ids, dy, rows, cols)

        return lookup, (ids, dy, indices), k
    eq = Equation(equation)
    sizes = dict(zip(eq.kernel, shape))
    sizes.update({a: 1 for a in eq.x + eq.out if a not in sizes})
    sizes[eq.tokens[-1]] = tokens  # batch 1: the last token axis is the sequence
    x, dy = operand(eq.x, sizes, dtype, rng), operand(eq.out, sizes, dtype, rng)
    fn = tf.function(lambda x, dy, indices: sampled_kernel_gradient(x, dy, indices, shape, eq), autograph=False)
    return fn, (x, dy, indices), k


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--density", type=float, default=0.001)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--low-memory-allocator", action="store_true")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    cases = [(name, count) + case(eq, shape, args.tokens, args.density, tf.as_dtype(args.dtype), rng)
             for name, eq, shape, count in KERNELS]
    empty = tf.function(lambda *inputs: tf.zeros([1]), autograph=False)  # the call alone
    cases.append(("(call)", 0, empty, cases[0][3], 0))
    times = {name: [] for name, *_ in cases}
    for name, _, fn, inputs, _ in cases:
        fn(*inputs).numpy()  # traces
    for _ in range(args.repeats):
        for name, _, fn, inputs, _ in cases:
            start = time.perf_counter()
            fn(*inputs).numpy()
            times[name].append(time.perf_counter() - start)
    call = float(np.median(times.pop("(call)")))
    cases.pop()
    print(f"{args.tokens} tokens, {args.dtype}, {args.density:.2%} trainable, "
          f"low-memory allocator: {args.low_memory_allocator}")
    print("| kernel | per model | k | ms each (median) | ms per step |")
    print("|---|---:|---:|---:|---:|")
    total = 0.0
    for name, count, _, _, k in cases:
        ms = 1000.0 * (float(np.median(times[name])) - call)
        total += count * ms
        print(f"| {name} | {count} | {k:,} | {ms:.2f} | {count * ms:.0f} |")
    print(f"| all | | | | **{total:.0f}** |")
    print(f"(each median less {1000.0 * call:.2f} ms, the median call of a function that returns at once)")


if __name__ == "__main__":
    main()
