"""Structured pruning and deployable exports: size and CPU latency of stripped and sparse models against dense.

    TRAINER_DATA_DIR=/dir/of/mnist.npz python scripts/bench_export.py --model mlp --epochs 3 \
        --out results/bench_export_mlp.json

For LeNet-300-100 (``--model mlp``) or the LeNet-5 style CNN (``--model cnn``) on MNIST it builds

- ``dense``: the model trained densely;
- ``struct<p>``: ``p`` % of the hidden units (mlp: ``fc1``, ``fc2``; cnn: the channels of ``conv1``, ``conv2``
  and the units of ``fc1``, ``fc2``) frozen at zero by group magnitude when training starts
  (``elements: {magnitude: p, groups: units}``; conv1's channels through conv2's ``groups: inputs``, which
  keeps conv1's constant outputs away from conv2's zero padding), trained, then ``trainer.strip`` ped;
- ``unstruct<p>``: element-wise magnitude pruning at init with each kernel's density equal to the stripped
  model's (the same number of non-zero kernel weights), trained; exported with its zeros;
- ``fanin<p>`` (mlp only): constant fan-in ``elements: {fan_in: k}`` on ``fc1`` and ``fc2`` with ``k`` = (1 - p)
  of their inputs, trained, then ``trainer.condensed.condense_model`` (gather + ``[out, k]`` product);

and measures, per case: test accuracy, parameters (non-zero), the file sizes of ``model.keras``, the
SavedModel and the ``.tflite`` (``Optimize.EXPERIMENTAL_SPARSITY``), and the latency per call at batch 1 and
batch 256 of the SavedModel's ``serve`` (TensorFlow) and of the TFLite interpreter (XNNPACK, ``--threads``).
Every (case, format, batch) is timed once per round, all interleaved in one process, over ``--rounds``
rounds; a round's value is the mean of ``--calls`` calls (fewer for a case slower than 50 ms a call); reported
are the median and the minimum over rounds and the speed-up against dense as the median over rounds of the
ratio within a round (paired: both saw the same machine load). TensorFlow and the interpreter get ``--threads`` threads each (1 by default). It checks that
each stripped model's logits equal the masked model's on the test set (max abs difference).

It writes a JSON (``--out``) and prints a Markdown table (copied into ``docs/structured-pruning.md``).
Public API only: ``trainer.models``, ``trainer.data``, ``MaskRegistry``, ``Trainer``, ``trainer.strip``,
``trainer.lite_export``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from typing import Any, Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import trainer  # noqa: E402
from trainer import MaskRegistry, Trainer  # noqa: E402
from trainer.condensed import condense_model  # noqa: E402
from trainer.data import load_mnist  # noqa: E402
from trainer.lite_export import TFLiteModel, directory_bytes, export_tflite, load_saved_model  # noqa: E402
from trainer.report import export_saved_model  # noqa: E402
from trainer.models import cnn, mlp  # noqa: E402

sys.path.insert(0, os.path.join(REPO, "scripts"))
from _measure import machine, median  # noqa: E402

UNITS = {"mlp": ("fc1", "fc2"), "cnn": ("conv2", "fc1", "fc2")}  # kernels pruned by their units


def build(kind: str) -> keras.Model:
    keras.utils.set_random_seed(0)
    return mlp((28, 28, 1), 10) if kind == "mlp" else cnn((28, 28, 1), 10)


def prune_structured(model, kind: str, fraction: float) -> MaskRegistry:
    registry = MaskRegistry(model)
    for name in UNITS[kind]:
        registry.freeze(f"{name}/kernel", elements={"magnitude": fraction, "groups": "units", "norm": "l2"},
                        value="zero", name=f"{name}_units")
    if kind == "cnn":  # conv1's channels: conv2's input rows (conv1 feeds a padding='same' convolution)
        registry.freeze("conv2/kernel", elements={"magnitude": fraction, "groups": "inputs", "norm": "l2"},
                        value="zero", name="conv1_channels")
    return registry


def prune_unstructured(model, densities: Dict[str, float]) -> MaskRegistry:
    registry = MaskRegistry(model)
    for name, density in densities.items():
        if density < 1.0:
            registry.freeze(f"{name}/kernel", elements={"magnitude": 1.0 - density}, value="zero", name=f"{name}_w")
    return registry


def train(model, registry, splits, epochs: int) -> None:
    if epochs <= 0:
        return
    fit = Trainer(model, keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  registry=registry, jit_compile=False)
    fit.fit(splits.x_train, splits.y_train, batch_size=100, epochs=epochs, verbose=False)
    assert registry is None or registry.exact()


def logits(model, x) -> np.ndarray:
    return np.concatenate([np.asarray(model(x[i:i + 1000], training=False)) for i in range(0, len(x), 1000)])


def nonzero_params(model) -> int:
    return int(sum(np.count_nonzero(w) for w in model.get_weights()))


def kernel_densities(stripped, dense) -> Dict[str, float]:
    return {l.name: float(np.prod(stripped.get_layer(l.name).kernel.shape)) / float(np.prod(l.kernel.shape))
            for l in dense.layers if hasattr(l, "kernel")}


def make_cases(kind: str, fractions: List[float], splits, epochs: int) -> Dict[str, Dict[str, Any]]:
    cases: Dict[str, Dict[str, Any]] = {}
    model = build(kind)
    train(model, None, splits, epochs)
    cases["dense"] = {"model": model, "masked": model}
    for fraction in fractions:
        tag = f"{round(fraction * 100)}"
        model = build(kind)
        registry = prune_structured(model, kind, fraction)
        train(model, registry, splits, epochs)
        small = trainer.strip(model, registry)
        masked = logits(model, splits.x_test)
        cases[f"struct{tag}"] = {"model": small, "masked": model, "max_abs_logit": float(np.max(np.abs(masked))),
                                 "max_abs_logit_diff": float(np.max(np.abs(logits(small, splits.x_test) - masked)))}
        model = build(kind)
        registry = prune_unstructured(model, kernel_densities(small, cases["dense"]["model"]))
        train(model, registry, splits, epochs)
        cases[f"unstruct{tag}"] = {"model": model, "masked": model}
        if kind == "mlp":  # constant fan-in (SRigL) at the same sparsity of fc1 and fc2, condensed
            model = build(kind)
            registry = MaskRegistry(model)
            for name in ("fc1", "fc2"):
                fan_in = model.get_layer(name).kernel.shape[0]
                registry.freeze(f"{name}/kernel", elements={"fan_in": max(1, round((1 - fraction) * fan_in))},
                                value="zero", name=f"{name}_fan_in")
            train(model, registry, splits, epochs)
            small = condense_model(model, registry)
            masked = logits(model, splits.x_test)
            cases[f"fanin{tag}"] = {"model": small, "masked": model, "max_abs_logit": float(np.max(np.abs(masked))),
                                    "max_abs_logit_diff": float(np.max(np.abs(logits(small, splits.x_test) - masked))),
                                    "params_nonzero": nonzero_params(model)}
    return cases


def export_all(cases, directory: str) -> None:
    for name, case in cases.items():
        model = case["model"]
        keras_path = os.path.join(directory, f"{name}.keras")
        model.save(keras_path)
        with contextlib.redirect_stdout(io.StringIO()):  # model.export prints the signature it traced
            export_saved_model(model, os.path.join(directory, f"{name}_saved_model"))
        tflite_path = os.path.join(directory, f"{name}.tflite")
        case["sizes"] = {"keras": os.path.getsize(keras_path),
                         "saved_model": directory_bytes(os.path.join(directory, f"{name}_saved_model")),
                         "tflite": export_tflite(model, tflite_path, sparsity=True)}
        case["files"] = {"saved_model": os.path.join(directory, f"{name}_saved_model"), "tflite": tflite_path}


def time_all(cases, batches, rounds: int, calls: Dict[int, int], threads: int, x_test) -> Dict[str, Any]:
    runners = {}
    for name, case in cases.items():
        serve = load_saved_model(case["files"]["saved_model"])
        for batch in batches:
            x = x_test[:batch]
            lite = TFLiteModel(case["files"]["tflite"], batch, num_threads=threads)
            ref = logits(case["model"], x)
            for fmt, fn in (("saved_model", serve), ("tflite", lite)):
                out = fn(x)
                assert np.max(np.abs(out - ref)) <= 1e-4, (name, fmt, float(np.max(np.abs(out - ref))))
                runners[(name, fmt, batch)] = (fn, x)
    samples = {key: [] for key in runners}
    counts = {}
    for key, (fn, x) in runners.items():  # a slow case makes fewer calls per round (about 50 ms at most)
        start = time.perf_counter()
        fn(x)
        counts[key] = max(1, min(calls[key[2]], int(0.05 / (time.perf_counter() - start))))
    order = sorted(runners, key=lambda k: (k[2], k[1]))  # per (batch, format), every case back to back
    for _ in range(rounds):  # interleaved: every (case, format, batch) once per round
        for key in order:
            fn, x = runners[key]
            n = counts[key]
            fn(x)
            start = time.perf_counter()
            for _ in range(n):
                fn(x)
            samples[key].append((time.perf_counter() - start) / n * 1e3)
    out = {}
    for (name, fmt, batch), v in samples.items():
        dense = samples[("dense", fmt, batch)]  # measured in the same rounds: paired ratios
        out[f"{name}|{fmt}|{batch}"] = {"median_ms": median(v), "min_ms": min(v), "calls": counts[(name, fmt, batch)],
                                        "speedup_paired": median([d / c for d, c in zip(dense, v)]), "rounds_ms": v}
    return out


def table(result: Dict[str, Any]) -> str:
    """The Markdown table: per format and batch, the median (min) ms per call and the paired speed-up."""
    t = result["latency"]

    def cell(name, fmt, batch):
        r = t[f"{name}|{fmt}|{batch}"]
        return f"{r['median_ms']:.3f} ({r['min_ms']:.3f}) | {r['speedup_paired']:.2f}×"

    lines = ["| case | test acc. | params (non-zero) | .keras KB | SavedModel KB | .tflite KB | "
             "SavedModel b1 ms | × | SavedModel b256 ms | × | TFLite b1 ms | × | TFLite b256 ms | × | "
             "max abs logit diff (of max abs logit) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, case in result["cases"].items():
        s = case["sizes"]
        diff = case.get("max_abs_logit_diff")
        diff = "-" if diff is None else f"{diff:.1e} (of {case['max_abs_logit']:.3g})"
        lines.append(
            f"| {name} | {case['test_accuracy']:.4f} | {case['params_nonzero']:,} | {s['keras'] / 1024:.0f} | "
            f"{s['saved_model'] / 1024:.0f} | {s['tflite'] / 1024:.0f} | {cell(name, 'saved_model', 1)} | "
            f"{cell(name, 'saved_model', 256)} | {cell(name, 'tflite', 1)} | {cell(name, 'tflite', 256)} | "
            f"{diff} |")
    return "\n".join(lines)


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per case (0: untrained weights)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, nargs=2, default=[100, 10], metavar=("B1", "B256"),
                        help="calls per round at batch 1 and at batch 256")
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow intra-op and TFLite interpreter threads")
    parser.add_argument("--out", default=None, help="the JSON to write")
    args = parser.parse_args(argv)
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)  # before any op runs
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    started = time.time()
    splits = load_mnist()
    cases = make_cases(args.model, args.fractions, splits, args.epochs)
    for case in cases.values():
        case["test_accuracy"] = float(np.mean(np.argmax(logits(case["model"], splits.x_test), -1) == splits.y_test))
        case["params"] = int(case["model"].count_params())
        case.setdefault("params_nonzero", nonzero_params(case["model"]))  # fanin: the masked model's (no indices)
    with tempfile.TemporaryDirectory() as directory:
        export_all(cases, directory)
        latency = time_all(cases, (1, 256), args.rounds, {1: args.calls[0], 256: args.calls[1]}, args.threads,
                           splits.x_test)
    result = {
        "model": args.model, "epochs": args.epochs, "rounds": args.rounds, "calls": args.calls,
        "threads": args.threads, "machine": machine(), "load_average": os.getloadavg(),
        "seconds": round(time.time() - started, 1), "latency": latency,
        "cases": {name: {k: v for k, v in case.items() if k not in ("model", "masked", "files")}
                  for name, case in cases.items()},
    }
    result["table"] = table(result)
    print(result["table"])
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
