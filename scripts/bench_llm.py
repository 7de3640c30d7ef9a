"""LLM-scale benchmark: a Llama-shape decoder, 99.9 % frozen, against keras-hub LoRA and Keras ``fit`` (public API).

The model is ``keras_hub.models.LlamaBackbone`` built from constructor
arguments (random weights) with a causal-LM head through its own reverse token
embedding (``backbone.token_embedding(h, reverse=True)``), on random token ids
of ``--tokens`` tokens at ``--batch``, ``AdamW(1e-4)``, XLA, one step per
execution. Cases (each in its own subprocess: peak RSS is a per-process maximum):

- ``trainer_compact_float32`` / ``trainer_sampled_float32``: :class:`trainer.Trainer` with
  ``MaskRegistry(model, update="compact" | "sampled")`` and
  ``registry.freeze("*", elements={"random": 0.999, "seed": 0})``: 99.9 % of
  every backbone variable frozen (``sampled``: the kernel gradients at the
  trainable elements only);
- ``trainer_compact_bfloat16`` / ``trainer_sampled_bfloat16``: the same with the
  backbone in ``dtype="bfloat16"`` (float32 master values for the trainable elements);
- ``lora_fit`` / ``lora_fit_bfloat16``: keras-hub ``backbone.enable_lora(4)`` and Keras ``fit``;
- ``fit_dense`` / ``fit_dense_bfloat16``: Keras ``fit``, every weight trains.

Per case: ``peak_rss_mib`` (``resource.getrusage(...).ru_maxrss`` at the end:
the whole process, model and TensorFlow included), ``bytes_per_param`` (that
over the parameter count), ``rss_built_mib`` (after the model was built),
``peak_compile_mib`` (the peak through the first, compiling step, run as its own
``fit``), ``growth_bytes_per_param`` (the peak RSS of the timed ``fit`` of
``--steps`` steps over the RSS before it, per parameter: what a step holds at
once beyond the model; the peak mark is reset after the compiling step),
``ms_per_step`` (the median over the timed steps),
``trainable``, and for the trainer cases ``frozen_exact`` (``registry.exact()``)
and ``moved_fraction`` (of the trainable elements of the first query kernel).
The machine is shared: timings vary with its load (``load`` in the output).

``--setup-only`` (trainer cases) measures the set-up alone and trains nothing: ``setup_s``
(``MaskRegistry(model)`` and the ``freeze`` rule: masks, pins, digests, compact index and value
variables), ``setup_cpu_s`` (the process's CPU time over the same span, which varies less with the
machine's load), ``trainer_s`` (the ``Trainer`` constructor: the optimizer built on the compact
variables, the step not yet traced), ``trainable`` and the peak RSS. The trainer cases report
``setup_s`` and ``setup_cpu_s`` without the flag too.

Usage::

    python scripts/bench_llm.py --layers 2 --hidden 256 --out bench_llm.json      # a small shape, ~1 minute
    python scripts/bench_llm.py --shape tinyllama-1.1b --steps 3 --out bench_1b.json  # issue 29's 1.1B table
    python scripts/bench_llm.py --shape llama2-7b --steps 1 --no-xla --no-onednn --out bench_7b.json \
        --cases trainer_sampled_bfloat16 lora_fit_bfloat16                          # the 6.7B row (bfloat16)
    python scripts/bench_llm.py --shape llama2-7b --steps 1 --no-xla --low-memory-allocator --out bench_7b.json \
        --cases trainer_sampled_bfloat16 lora_fit_bfloat16                          # the same, less memory
    python scripts/bench_llm.py --shape tinyllama-1.1b --tokens 1024 --steps 2 --no-xla --low-memory-allocator \
        --remat --cases trainer_sampled_bfloat16 lora_fit_bfloat16 --out remat_1b.json  # 1,024 tokens, remat
    python scripts/bench_llm.py --shape tinyllama-1.1b --setup-only --cases trainer_compact_float32 \
        --out setup_1b.json                                                          # set-up time only

``--low-memory-allocator`` makes every case call :func:`trainer.allocator.low_memory_allocator` before its
first TensorFlow op (oneDNN's tensors from ``malloc``, glibc's mmap threshold fixed at 256 KiB: the trainer's
``trainer.low_memory_allocator=true``); LoRA and ``fit`` get it too, so the comparison stays like for like.
``--remat`` wraps every transformer block in ``tf.recompute_grad`` (:func:`trainer.remat.apply_remat`, the
trainer's ``trainer.remat=true``) in every case, LoRA and ``fit`` included.

``--no-xla`` compiles no case with XLA (``jit_compile=False``): XLA's CPU back end widens every bfloat16
kernel to a float32 copy. ``--no-onednn`` runs every case with ``TF_ENABLE_ONEDNN_OPTS=0``: TensorFlow then allocates
tensors with ``malloc`` instead of oneDNN's best-fit-with-coalescing pool, which keeps every
region it ever extended (at 1.1B parameters the built model alone took 617 MiB less); the
kernels that TensorFlow itself runs (not those of the XLA program) change too.

(``--shape`` sets ``--layers``, ``--hidden``, ``--intermediate``, ``--heads``,
``--kv-heads`` and ``--vocab``; every case runs in its own subprocess, one after
another, so a machine needs the memory of the largest case only.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any, Dict, List

from _measure import Clock, MemoryProbe, fit_clock, grown, machine, median, trainer_clock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FROZEN = 0.999
LORA_RANK = 4
CASES = {  # name: (how it trains, update mode, backbone dtype)
    "trainer_compact_float32": ("trainer", "compact", "float32"),
    "trainer_sampled_float32": ("trainer", "sampled", "float32"),
    "trainer_compact_bfloat16": ("trainer", "compact", "bfloat16"),
    "trainer_sampled_bfloat16": ("trainer", "sampled", "bfloat16"),
    "lora_fit": ("lora", None, "float32"),
    "lora_fit_bfloat16": ("lora", None, "bfloat16"),
    "fit_dense": ("fit", None, "float32"),
    "fit_dense_bfloat16": ("fit", None, "bfloat16"),
}
SHAPES = {  # --shape presets: the Llama-architecture shapes of issue 29 (vocabulary 32,000, random weights)
    "tinyllama-1.1b": dict(layers=22, hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000),
    "llama2-7b": dict(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000),
}


def build(args, dtype: str):
    """The causal LM: ``{"token_ids", "padding_mask"}`` -> logits ``[batch, tokens, vocab]``; and its backbone."""
    import keras
    import keras_hub

    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=args.vocab, num_layers=args.layers, num_query_heads=args.heads,
        num_key_value_heads=args.kv_heads, hidden_dim=args.hidden, intermediate_dim=args.intermediate,
        dtype=dtype)
    inputs = {"token_ids": keras.Input((args.tokens,), dtype="int32", name="token_ids"),
              "padding_mask": keras.Input((args.tokens,), dtype="int32", name="padding_mask")}
    logits = backbone.token_embedding(backbone(inputs), reverse=True)
    return keras.Model(inputs, logits, name="causal_lm"), backbone


def peak_rss_mib() -> float:
    """The peak RSS of this process so far, in MiB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024.0 for line in f if line.startswith("VmRSS:"))


def run_case(name: str, args) -> Dict[str, Any]:
    """Runs one case in this process and returns its measurements."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, REPO)
    if args.low_memory_allocator:
        from trainer.allocator import low_memory_allocator

        low_memory_allocator()  # before the first TensorFlow op
    import keras
    import numpy as np
    import tensorflow as tf

    from trainer import MaskRegistry, Trainer
    from trainer.remat import apply_remat

    kind, update, dtype = CASES[name]
    keras.utils.set_random_seed(0)
    model, backbone = build(args, dtype)
    params = int(sum(np.prod(v.shape) for v in model.weights))
    rng = np.random.default_rng(0)
    shape = (args.batch, args.tokens)
    x = {"token_ids": rng.integers(0, args.vocab, shape).astype(np.int32), "padding_mask": np.ones(shape, np.int32)}
    y = rng.integers(0, args.vocab, shape).astype(np.int32)
    ds = tf.data.Dataset.from_tensors((x, y)).repeat(args.steps)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = keras.optimizers.AdamW(1e-4)
    out: Dict[str, Any] = {"case": name, "params": params, "dtype": dtype, "update": update}
    clock = Clock()
    if kind in ("lora", "fit"):
        if kind == "lora":
            backbone.enable_lora(LORA_RANK)
        if args.remat:
            apply_remat(model)
        out["trainable"] = int(sum(np.prod(v.shape) for v in model.trainable_weights))
        out["rss_built_mib"] = rss_mib()
        model.compile(optimizer=optimizer, loss=loss, jit_compile=args.xla)
        model.fit(ds.take(1), epochs=1, verbose=0)  # compiles
        probe, timed = steady(out), time.perf_counter()
        model.fit(ds, epochs=1, verbose=0, callbacks=[fit_clock(keras.callbacks.Callback, clock, 1)])
        out["steps"] = int(optimizer.iterations.numpy())
    else:
        start, cpu = time.perf_counter(), time.process_time()
        registry = MaskRegistry(model, update=update)
        registry.freeze("*", elements={"random": args.frozen, "seed": 0}, value="current")
        out["setup_s"], out["setup_cpu_s"] = time.perf_counter() - start, time.process_time() - cpu
        if args.remat:
            apply_remat(model)
        # one mask at a time: every bool mask at once (trainable_masks()) would hold 1 byte/parameter
        out["trainable"] = int(sum(int(registry.trainable_mask(v.path).sum()) for v in model.trainable_weights))
        if args.setup_only:
            start = time.perf_counter()
            Trainer(model, optimizer, loss, registry=registry, steps_per_execution=1, jit_compile=args.xla)
            out["trainer_s"] = time.perf_counter() - start
            out["peak_rss_mib"] = peak_rss_mib()
            return out
        out["gradients"] = sorted({r.get("gradient", "gathered") for r in registry.plan()
                                   if registry.update_modes().get(r["path"]) == "compact"})
        query = next(v for v in model.weights if v.path.endswith("query/kernel"))
        mask = registry.trainable_mask(query.path)
        before = np.asarray(tf.bitcast(tf.convert_to_tensor(query.value), tf.uint16 if dtype == "bfloat16"
                                       else tf.uint32))[mask]
        out["rss_built_mib"] = rss_mib()
        trainer = Trainer(model, optimizer, loss, registry=registry, steps_per_execution=1, jit_compile=args.xla)
        trainer.fit(ds.take(1), epochs=1)  # compiles; the next fit, a new dataset of the same structure, does not
        probe, timed = steady(out), time.perf_counter()
        trainer.fit(ds, epochs=1, callbacks=[trainer_clock(clock)])
        out["steps"] = trainer.step
        out["frozen_exact"] = bool(registry.exact())
        after = np.asarray(tf.bitcast(tf.convert_to_tensor(query.value), tf.uint16 if dtype == "bfloat16"
                                      else tf.uint32))[mask]
        out["moved_fraction"] = float(np.mean(after != before)) if before.size else None
    # the median over the timed steps after the first; with --steps 1, the one timed fit of one step
    intervals = clock.intervals() or [time.perf_counter() - timed]
    out["ms_per_step"] = 1000.0 * median(intervals)
    out["peak_rss_mib"] = peak_rss_mib()
    out["bytes_per_param"] = out["peak_rss_mib"] * 2 ** 20 / params
    growth = grown(probe.peak(), out["rss_compiled_mib"]) if probe.resettable else None
    out["growth_bytes_per_param"] = None if growth is None else growth * 2 ** 20 / params
    return out


def steady(out: Dict[str, Any]):
    """After the compiling first step: records the RSS and resets the peak mark (what later steps add)."""
    out["rss_compiled_mib"], out["peak_compile_mib"] = rss_mib(), peak_rss_mib()
    return MemoryProbe()


def _subprocess(name: str, args) -> Dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--case", name] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in SHAPE] + (
        ["--setup-only"] if args.setup_only else []) + ([] if args.xla else ["--no-xla"]) + (
        ["--remat"] if args.remat else []) + (["--low-memory-allocator"] if args.low_memory_allocator else [])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    if args.no_onednn:
        env["TF_ENABLE_ONEDNN_OPTS"] = "0"
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"case": name, "error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


SHAPE = ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "tokens", "batch", "steps", "frozen")


def format_table(cases: List[Dict[str, Any]], setup_only: bool = False) -> str:
    """A Markdown table of the cases' results (with ``setup_only``, of their set-up alone)."""
    if setup_only:
        lines = ["| case | params | trainable | setup s | setup CPU s | Trainer s | peak RSS (MiB) |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for c in cases:
            lines.append(f"| {c['case']} | failed: {c['error'].strip().splitlines()[-1][:80]} ||||||" if "error" in c
                         else f"| {c['case']} | {c['params']:,} | {c['trainable']:,} | {c['setup_s']:.2f} | "
                              f"{c['setup_cpu_s']:.2f} | {c['trainer_s']:.2f} | {c['peak_rss_mib']:.0f} |")
        return "\n".join(lines)
    lines = ["| case | params | trainable | peak RSS (MiB) | bytes/param | growth B/param | ms/step | exact | moved |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for c in cases:
        if "error" in c:
            lines.append(f"| {c['case']} | failed: {c['error'].strip().splitlines()[-1][:80]} ||||||||")
            continue
        moved, growth = c.get("moved_fraction"), c.get("growth_bytes_per_param")
        lines.append(f"| {c['case']} | {c['params']:,} | {c['trainable']:,} | {c['peak_rss_mib']:.0f} | "
                     f"{c['bytes_per_param']:.2f} | {'-' if growth is None else f'{growth:.2f}'} | "
                     f"{c['ms_per_step']:.0f} | {c.get('frozen_exact', '-')} | "
                     f"{'-' if moved is None else f'{moved:.2f}'} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="a preset shape (sets --layers ... --vocab; later flags do not override it)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=None, help="default: 2.75 x hidden")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5,
                        help="timed steps per case, after one compiling step (with 1: that step's whole fit call)")
    parser.add_argument("--frozen", type=float, default=FROZEN,
                        help="the trainer cases' frozen fraction of every variable (default 0.999; 0.99409 gives "
                             "the 1.1B shape about LoRA rank 4's trainable count)")
    parser.add_argument("--cases", nargs="*", choices=sorted(CASES), default=None)
    parser.add_argument("--out", default="bench_llm.json")
    parser.add_argument("--setup-only", action="store_true",
                        help="trainer cases: time the registry set-up and the Trainer constructor, train nothing")
    parser.add_argument("--no-onednn", action="store_true",
                        help="run every case with TF_ENABLE_ONEDNN_OPTS=0 (malloc instead of oneDNN's memory pool)")
    parser.add_argument("--low-memory-allocator", action="store_true",
                        help="every case calls trainer.allocator.low_memory_allocator() first: oneDNN's tensors from "
                             "malloc, glibc's mmap threshold fixed at 256 KiB")
    parser.add_argument("--no-xla", dest="xla", action="store_false",
                        help="every case with jit_compile=False (TensorFlow's graph executor instead of one XLA program)")
    parser.add_argument("--remat", action="store_true",
                        help="every case recomputes each transformer block in the backward (trainer.remat.apply_remat)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # a worker: one case, JSON on stdout
    args = parser.parse_args(argv)
    for key, value in SHAPES.get(args.shape, {}).items():
        setattr(args, key, value)
    if args.intermediate is None:
        args.intermediate = int(round(2.75 * args.hidden))
    untimed = [c for c in args.cases or [] if args.setup_only and CASES[c][0] != "trainer"]
    if not 0.0 < args.frozen < 1.0:
        parser.error(f"--frozen={args.frozen}: give a fraction between 0 and 1 (exclusive)")
    if untimed:
        parser.error(f"--setup-only times the trainer cases' registry set-up; {untimed} have none")
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.case is not None:
        print(json.dumps(run_case(args.case, args)))
        return {}
    load = {"start": list(os.getloadavg())}
    cases = []
    names = args.cases or [n for n in CASES if not args.setup_only or CASES[n][0] == "trainer"]
    for name in names:
        cases.append(_subprocess(name, args))
        print(format_table(cases[-1:], args.setup_only).splitlines()[-1], flush=True)
    load["end"] = list(os.getloadavg())
    summary = {"shape": {k: getattr(args, k) for k in SHAPE}, "setup_only": args.setup_only,
               "onednn": not args.no_onednn,
               "low_memory_allocator": args.low_memory_allocator, "xla": args.xla, "remat": args.remat,
               "frozen_fraction": args.frozen, "lora_rank": LORA_RANK, "machine": machine(), "load": load,
               "cases": cases}
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
    print(format_table(cases, args.setup_only))
    return summary


if __name__ == "__main__":
    main()
