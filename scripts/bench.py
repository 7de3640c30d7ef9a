"""Throughput benchmark: the masked trainer against Keras ``fit`` and the usual masking workarounds.

Every case trains an MLP on MNIST with Adam (lr 1e-3) and sparse categorical
cross-entropy on logits, at batch 128, from one shared ``tf.data`` pipeline
(``trainer.data.make_dataset``, shuffled, ``drop_remainder=True``). The cases
run in ONE process, interleaved (``A B C ... A B C ...``) for ``--rounds``
rounds, so that machine noise falls on every case alike; each reported number
is the median over rounds. The ``tfmot`` case needs legacy Keras
(``tf-keras``), so it runs in a worker subprocess that stays alive and is
driven round by round in the same interleaved order.

Cases (LeNet-300-100, a seeded random 90 % of every kernel pinned to zero in
the masked cases; ``K`` = ``--steps-per-execution``, XLA on unless stated):

- ``keras_fit``: Keras ``model.fit``, dense, ``jit_compile=True``, ``steps_per_execution=K``.
- ``keras_fit_default``: Keras ``model.fit`` with its defaults: ``jit_compile="auto"`` (which
  Keras resolves to no XLA on a CPU-only TensorFlow) and ``steps_per_execution=1``.
- ``trainer_dense``: :class:`trainer.Trainer`, no rules.
- ``trainer_masked``: :class:`trainer.Trainer`, the mask (``value="zero"``).
- ``trainer_{dense,masked}_unchecked``: the same with ``nan_policy="unchecked"``: the step
  without its non-finite guard (the guard's cost, ``guarded_vs_unchecked``).
- ``trainer_masked_cond_guard``: the masked trainer with ``guard="cond"`` (the update in a
  ``tf.cond``) instead of the select guard that ``guard="auto"`` takes for compact updates
  (``select_vs_cond_guard``).
- ``keras_constraint``: ``model.fit`` with a ``kernel_constraint`` that multiplies by the mask.
- ``keras_masked_layer``: ``model.fit`` with a ``Dense`` subclass that multiplies its kernel
  by the mask (a non-trainable variable) in ``call``.
- ``tfmot``: ``tfmot.sparsity.keras.prune_low_magnitude`` with ``ConstantSparsity(0.9)``
  under ``tf-keras`` (only when ``tensorflow-model-optimization`` and ``tf-keras`` are installed).
- ``matmuls_only``: the step's matmuls alone (linear layers, kernel gradients, SGD) under XLA:
  the MFU ceiling at the model's shapes.
- ``trainer_{dense,masked}_k{1,10,100}_{xla,noxla}``: the trainer at other settings (the sweep).
- ``wide_*``: a 784-4096-4096-10 MLP, where the matmuls dominate.
- ``matmul``: a 2048x2048 float32 ``tf.matmul``, the machine's rate for MFU.

What each number measures:

- examples/s, ms/step: a round calls ``fit`` for ``K + steps`` steps; the clock
  runs from the end of the first execution (``K`` steps, untimed: it starts the
  input pipeline) to the end of the last, read by a callback after each
  execution, so ``fit``'s own set-up is not counted but everything the outer
  loop does between executions is. ``cpu_ms_per_step`` is the process's CPU
  time (all threads) over the same window: less sensitive to other processes
  on the machine than wall time, but it counts the thread pools' spinning.
- MFU: model FLOPs per step (forward + backward of the dense layers, counted
  as 3 x 2 x batch x the kernel sizes: 204 MFLOP for LeNet-300-100 at batch
  128; masked cases count the same dense FLOPs) times steps/s, over the
  median matmul rate of the same run.
- first_step_s: from the first ``fit`` call on a freshly built model to the
  end of its first step: tracing, XLA compilation, the input pipeline's start
  and one step. With ``K > 1`` the first execution holds ``K`` steps; this is
  that time less ``K - 1`` steady steps (``first_execution_s`` is the raw time).
- memory: resident set size of the process (``/proc/self/status``).
  ``setup_mib`` is the growth of RSS while the case is built and its warm-up
  runs (model, optimizer slots, registry, compiled functions, the shuffle
  buffer of a new input iterator); ``peak_step_mib`` is the largest rise of
  the peak RSS over the RSS just before a timed round (``VmHWM`` reset through
  ``/proc/self/clear_refs``): the working memory of steps. Both are coarse
  (the allocator keeps freed memory), and the ``tfmot`` numbers come from its
  own process.

Ratios are throughput ratios, higher is better for the trainer, each the
median over rounds of the ratio within a round:
``masked_vs_unmasked`` = trainer_masked / trainer_dense,
``trainer_vs_keras_fit`` = trainer_masked / keras_fit (dense, same K and XLA),
``trainer_vs_constraint`` = trainer_masked / keras_constraint,
``trainer_vs_tfmot`` = trainer_masked / tfmot (``null`` when it did not run),
``masked_optimizer_fit_vs_trainer`` = keras_masked_optimizer / trainer_masked (target 0.95).

Layout: this file is the command line and the case list; the cases are in
``_bench_cases.py`` (``tfmot``: ``_bench_tfmot.py``, also its worker), what
``bench.json`` holds in ``_bench_report.py``, and the memory probe, clock,
medians, ratios and machine description in ``_measure.py``, which
``scripts/bench_scale.py`` uses too.

Usage::

    python scripts/bench.py               # the full run (about 10 minutes on 2 cores), writes bench.json
    python scripts/bench.py --scale --only matmul   # only the 100.7M-parameter scale cases (scripts/bench_scale.py)
    python scripts/bench.py --quick --data digits --out /tmp/b.json   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Dict, List

import numpy as np

from _bench_cases import BATCH, CACHED_BATCHES, Case, KerasFitCase, MatmulCase, MatmulStepCase, TrainerCase
from _bench_cases import load_arrays, make_train_dataset, model_flops_per_step
from _bench_report import format_memory, format_table, registry_memory, summarize
from _bench_tfmot import TfmotCase, tfmot_available
from _measure import MemoryProbe, machine as describe_machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_cases(args, x, y, classes) -> List[Case]:
    """The case list, in the order each round runs them."""
    import tensorflow as tf

    input_shape = tuple(x.shape[1:])
    ds = make_train_dataset(x, y, args.batch, args.input)
    if int(ds.cardinality().numpy()) < 1:
        raise SystemExit(f"--batch {args.batch} leaves no full batch in {len(x)} examples")
    repeated = ds.repeat()
    k = args.steps_per_execution
    cases: List[Case] = [MatmulCase(args.matmul_reps)]

    def kernels(hidden):
        dims = [int(np.prod(input_shape))] + [int(h) for h in hidden] + [classes]
        return [(a, b) for a, b in zip(dims[:-1], dims[1:])]

    def add(model, hidden, steps_k, specs):
        flops = model_flops_per_step(kernels(hidden), args.batch)
        prefix = "" if model == "lenet" else "wide_"
        for name, kind, opts in specs:
            opts = dict(opts)
            desc = opts.pop("desc")
            common = dict(model=model, flops=flops, batch=args.batch, hidden=hidden, **opts)
            if kind == "keras":
                cases.append(KerasFitCase(prefix + name, desc, input_shape=input_shape, classes=classes,
                                          ds=repeated, **common))
            elif kind == "trainer":
                cases.append(TrainerCase(prefix + name, desc, input_shape=input_shape, classes=classes,
                                         ds=ds, **common))
            elif kind == "tfmot":
                cases.append(TfmotCase(prefix + name, desc, data=args.data, limit=args.limit,
                                       input_mode=args.input, **common))
            elif kind == "matmuls":
                common.pop("hidden")
                cases.append(MatmulStepCase(prefix + name, desc, kernels=kernels(hidden), **common))

    lenet = list(args.hidden)
    specs = [
        ("keras_fit", "keras", dict(desc="Keras model.fit, dense", variant="dense", k=k, jit=True)),
        ("keras_fit_default", "keras", dict(desc="Keras model.fit, dense, its defaults (jit_compile='auto')",
                                            variant="dense", k=1, jit="auto")),
        ("trainer_dense", "trainer", dict(desc="trainer, no rules", masked=False, k=k, jit=True)),
        ("trainer_masked", "trainer", dict(desc="trainer, 90% random zero mask", masked=True, k=k, jit=True)),
        ("trainer_dense_unchecked", "trainer", dict(desc="trainer, no rules, nan_policy='unchecked' (no guard)",
                                                    masked=False, k=k, jit=True, nan_policy="unchecked")),
        ("trainer_masked_unchecked", "trainer", dict(desc="trainer, mask, nan_policy='unchecked' (no guard)",
                                                     masked=True, k=k, jit=True, nan_policy="unchecked")),
        ("trainer_masked_cond_guard", "trainer", dict(desc="trainer, mask, guard='cond' (update in a tf.cond)",
                                                      masked=True, k=k, jit=True, guard="cond")),
        ("keras_constraint", "keras", dict(desc="model.fit, kernel_constraint *mask", variant="constraint", k=k,
                                           jit=True)),
        ("keras_masked_layer", "keras", dict(desc="model.fit, Dense subclass kernel*mask", variant="masked_layer",
                                             k=k, jit=True)),
        ("matmuls_only", "matmuls", dict(desc="the step's matmuls alone (linear layers, SGD)", k=k, jit=True)),
        ("keras_masked_optimizer", "keras", dict(desc="model.fit, trainer.MaskedOptimizer, 90% random zero mask",
                                                 variant="masked_optimizer", k=k, jit=True)),
    ]
    defaults = trainer_defaults()
    specs.append(("trainer_defaults", "trainer", dict(desc="trainer, mask, Trainer(...) at its defaults",
                                                      masked=True, defaults=True, **defaults)))
    if args.quick:  # the smoke run keeps the cases that the ratios need
        specs = [spec for spec in specs if spec[0] not in ("keras_fit_default", "trainer_defaults",
                                                           "trainer_dense_unchecked", "trainer_masked_unchecked",
                                                           "trainer_masked_cond_guard")]
    reason = tfmot_available() if not args.no_tfmot else "--no-tfmot"
    if reason is None:
        specs.append(("tfmot", "tfmot", dict(desc="tfmot prune_low_magnitude, ConstantSparsity(0.9)", k=k,
                                             jit=True)))
    args.tfmot_skipped = reason
    if not args.no_sweep:
        for sweep_k in args.sweep_k:
            for jit in (True, False):
                for masked in (False, True):
                    if sweep_k == k and jit:
                        continue  # the headline cases above
                    name = f"trainer_{'masked' if masked else 'dense'}_k{sweep_k}_{'xla' if jit else 'noxla'}"
                    desc = f"trainer, {'mask' if masked else 'no rules'}"
                    specs.append((name, "trainer", dict(desc=desc, masked=masked, k=sweep_k, jit=jit)))
    add("lenet", lenet, k, specs)
    if not args.no_wide:
        wk = args.wide_k
        wide = [args.wide_width, args.wide_width]
        wide_specs = [
            ("keras_fit", "keras", dict(desc="Keras model.fit, dense", variant="dense", k=wk, jit=True)),
            ("trainer_dense", "trainer", dict(desc="trainer, no rules", masked=False, k=wk, jit=True)),
            ("trainer_masked", "trainer", dict(desc="trainer, 90% random zero mask", masked=True, k=wk, jit=True)),
            ("trainer_masked_noxla", "trainer", dict(desc="trainer, mask", masked=True, k=wk, jit=False)),
            ("trainer_dense_noxla", "trainer", dict(desc="trainer, no rules", masked=False, k=wk, jit=False)),
            ("matmuls_only", "matmuls", dict(desc="the step's matmuls alone (linear layers, SGD)", k=wk, jit=True)),
        ]
        add("wide", wide, wk, wide_specs)
    del tf
    if args.only:
        unknown = sorted(set(args.only) - {c.name for c in cases})
        if unknown:
            raise SystemExit(f"--only: unknown case(s) {unknown}; cases: {[c.name for c in cases]}")
        cases = [c for c in cases if c.kind == "matmul" or c.name in args.only]
    return cases


def trainer_defaults() -> Dict[str, Any]:
    """``{"k": ..., "jit": ...}``: the ``steps_per_execution`` and ``jit_compile`` that ``Trainer(...)`` defaults to."""
    import inspect

    from trainer import Trainer

    params = inspect.signature(Trainer).parameters
    return {"k": params["steps_per_execution"].default, "jit": bool(params["jit_compile"].default)}


def _steps_for(case: Case, args) -> int:
    steps = args.wide_steps if case.model_name == "wide" else args.steps
    return max(case.k, int(math.ceil(steps / case.k)) * case.k)


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options; ``--quick`` shrinks everything for a smoke run."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench.json", help="the JSON file to write (default bench.json)")
    p.add_argument("--quick", action="store_true", help="a short smoke run: 2 rounds of few steps, no sweep")
    p.add_argument("--data", choices=("mnist", "digits"), default="mnist",
                   help="mnist reads $TRAINER_DATA_DIR/mnist.npz; digits is scikit-learn's bundled 8x8 digits")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--input", choices=("shuffled", "cached"), default="shuffled",
                   help=f"shuffled: the real pipeline (default); cached: its first {CACHED_BATCHES} batches held in "
                        "memory, to price the input pipeline")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; 2 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default 400; 20 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps after compilation (default 100)")
    p.add_argument("--steps-per-execution", type=int, default=None,
                   help="K for the headline cases and every Keras fit (default 100; 10 with --quick)")
    p.add_argument("--sweep-k", type=int, nargs="*", default=None, help="the trainer sweep's K values (1 10 100)")
    p.add_argument("--no-sweep", action="store_true", help="skip the trainer K / XLA sweep")
    p.add_argument("--scale", action="store_true",
                   help="also run the 100.7M-parameter MLP cases of scripts/bench_scale.py (each in a subprocess)")
    p.add_argument("--scale-rounds", type=int, default=2, help="interleaved rounds of the scale cases (default 2)")
    p.add_argument("--scale-width", type=int, default=4096, help="the scale MLP's width (default 4096: 100.7M)")
    p.add_argument("--scale-transformer", action="store_true", help="with --scale: the 108.6M Transformer cases too")
    p.add_argument("--only", nargs="+", default=None, help="run only these cases (names as in the table)")
    p.add_argument("--no-tfmot", action="store_true", help="skip the tfmot case")
    p.add_argument("--no-wide", action="store_true", help="skip the wide MLP")
    p.add_argument("--wide-width", type=int, default=None, help="the wide MLP's hidden width (default 4096)")
    p.add_argument("--wide-steps", type=int, default=None, help="timed steps per round of the wide MLP (default 30)")
    p.add_argument("--wide-k", type=int, default=None, help="K of the wide MLP (default 10)")
    p.add_argument("--matmul-reps", type=int, default=None, help="matmuls per round (default 10)")
    p.add_argument("--hidden", type=int, nargs="+", default=[300, 100], help="the small MLP's hidden widths")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = dict(rounds=(2, 5), steps=(20, 400), warmup=(10, 100), steps_per_execution=(10, 100),
                    sweep_k=([], [1, 10, 100]), wide_width=(256, 4096), wide_steps=(10, 30), wide_k=(5, 10),
                    matmul_reps=(2, 10))
    for key, (q, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, q if quick else full)
    if quick and not args.sweep_k:
        args.no_sweep = True
    return args


def main(argv=None) -> Dict[str, Any]:
    """Runs the benchmark, prints the tables and writes ``--out``; returns the JSON object."""
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, REPO)
    loads = {"start": list(os.getloadavg())}
    x, y, classes = load_arrays(args.data, args.limit)
    machine = describe_machine()
    mem = MemoryProbe()
    args.memory_resettable = mem.resettable
    cases = build_cases(args, x, y, classes)
    try:
        for case in cases:
            steps = max(case.k, int(math.ceil(args.warmup / case.k)) * case.k) + case.k
            print(f"setting up {case.name} ({case.settings()}) ...", flush=True)
            case.setup(steps, mem)
        for r in range(args.rounds):
            for case in cases:
                result = case.run_round(_steps_for(case, args), mem)
                print(f"round {r + 1}/{args.rounds} {case.name}: "
                      f"{1000.0 * result['seconds'] / result['steps']:.2f} ms/step", flush=True)
        loads["end"] = list(os.getloadavg())
        result = summarize(cases, args, machine, loads)
        result["registry_memory"] = {
            "lenet": registry_memory(args.hidden, tuple(x.shape[1:]), classes),
        }
        if not args.no_wide:
            result["registry_memory"]["wide"] = registry_memory([args.wide_width] * 2, tuple(x.shape[1:]), classes)
        if args.scale:  # the 100.7M-parameter cases, each in its own subprocess (scripts/bench_scale.py)
            import bench_scale

            scale = bench_scale.run_all(bench_scale.parse_args(
                ["--rounds", str(args.scale_rounds), "--width", str(args.scale_width)]
                + (["--transformer"] if args.scale_transformer else [])))
            result["scale"] = scale
            result["ratios"].update(scale["ratios"])
            print(bench_scale.format_table(scale))
    finally:
        for case in cases:
            case.close()
    print()
    print(f"machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs; TF {machine['tensorflow']}, "
          f"Keras {machine['keras']}; load average at start {loads['start'][0]:.2f}, at end {loads['end'][0]:.2f}")
    print(format_table(result))
    print()
    for name, block in result["registry_memory"].items():
        print(f"registry memory ({name}):")
        print(format_memory(block))
    if args.tfmot_skipped:
        print(f"\ntfmot case skipped: {args.tfmot_skipped}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
