"""Scale benchmark: a 100.7M-parameter MLP mostly frozen, against dense Keras ``fit`` (public API only).

The model is ``keras.Input((4096,))``, 6 x ``Dense(4096, relu)``, ``Dense(10)``
(100.7M parameters), batch 32, ``AdamW(1e-4, weight_decay=1e-2)``, XLA and
``K = 20`` steps per execution on every side, on one fixed random batch (the
input pipeline is not what is measured). The masked cases call
``registry.freeze("*/kernel", elements={"random": f, "seed": 0}, value="current")``
with ``MaskRegistry(model, update=...)`` and train with :class:`trainer.Trainer`.
With ``--transformer``, two more cases: the ``transformer`` of ``trainer.models``
at BERT-base's encoder size with a 30,522-token embedding (108.5M parameters),
on sequences of 16 tokens at batch 8 (longer ones take minutes per step on 2
cores), Keras ``fit`` dense against the trainer at 99.5 % of every kernel frozen
(``transformer_995_auto``: embeddings, biases and layer norms train densely),
and three more on the same model: ``transformer_995_backbone_auto`` (99.5 % of
every backbone variable frozen, ``freeze("*", exclude="out/*", ...)``, 0.5 % of
the backbone trains), ``transformer_lora`` (``trainer.models.enable_lora`` of
the rank whose adapter count is nearest to 0.5 % of the backbone, at least 1,
on the blocks' attention and MLP projections, the rest of the backbone frozen
by a rule, the head dense) and ``transformer_dense`` (the trainer with no rule:
dense fine-tuning through the same loop). ``trainable`` is each case's count of
trainable elements (the head included).

Every case runs in its own subprocess, because peak RSS is a per-process
maximum: ``peak_growth_mib`` is the peak RSS (``VmHWM``) at the end less the
RSS right after the model was built. Cases are interleaved (``A B C ... A B C``)
for ``--rounds`` rounds; each number is the median over rounds. Per case:
``ms_per_step`` (the median over timed executions of one execution's wall time
over ``K``; the first execution, which compiles, is not timed), ``setup_s``
(``MaskRegistry(model)`` plus the ``freeze`` call), ``steps`` (optimizer steps
trained, which must equal those asked) and ``frozen_exact``
(``registry.exact()``). The memory probe, clock, medians and paired ratios are
``_measure.py``'s, shared with ``scripts/bench.py``.

Usage::

    python scripts/bench_scale.py --out /tmp/scale.json            # all cases, 2 rounds
    python scripts/bench_scale.py --width 1024 --rounds 1          # a small smoke run
    python scripts/bench.py --scale ...                            # the same cases, into bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from _measure import Clock, MemoryProbe, fit_clock, median, paired_ratio, trainer_clock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 32
K = 20
# The Transformer cases: BERT-base's encoder (dim 768, 12 blocks, 12 heads, MLP 3072) with a 30,522-token
# embedding, 108.6M parameters; short sequences and a small batch, or a step takes minutes on 2 cores.
SEQUENCE = 16
T_BATCH = 8
LORA_BUDGET = 0.005  # transformer_lora: the rank nearest to this fraction of the backbone (99.5 % frozen)
# name: (frozen fraction or None, update mode: None for Keras fit, "trainer" for the trainer with no rule, "lora");
# "transformer_*": the BERT-base-sized encoder
CASES = {
    "transformer_keras_fit": (None, None),
    "transformer_995_auto": (0.995, "auto"),
    "transformer_995_backbone_auto": (0.995, "auto"),
    "transformer_lora": (None, "lora"),
    "transformer_dense": (None, "trainer"),
    "keras_fit": (None, None),
    "trainer_99_auto": (0.99, "auto"),
    "trainer_99_dense": (0.99, "dense"),
    "trainer_90_auto": (0.90, "auto"),
    "trainer_90_dense": (0.90, "dense"),
    "trainer_90_compact": (0.90, "compact"),
    "trainer_50_auto": (0.50, "auto"),
    "trainer_50_dense": (0.50, "dense"),
    "trainer_50_compact": (0.50, "compact"),
}


def _required(value: Optional[float], field: str) -> float:
    if value is None:
        raise RuntimeError(f"no {field} in /proc/self/status")
    return value


def run_case(name: str, *, width: int, depth: int, executions: int) -> Dict[str, Any]:
    """Runs one case in this process and returns its measurements."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, REPO)
    import keras
    import numpy as np
    import tensorflow as tf

    from trainer import MaskRegistry, Trainer

    frozen, update = CASES[name]
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    if name.startswith("transformer"):
        from trainer.models import enable_lora, lora_elements_per_rank, nearest_lora_rank, transformer

        model = transformer((SEQUENCE,), 10, vocab_size=30522, dim=768, depth=12, heads=12, mlp_dim=3072)
        x = rng.integers(0, 30522, size=(T_BATCH, SEQUENCE)).astype(np.int32)
        y = rng.integers(0, 10, size=T_BATCH).astype(np.int32)
        first_kernel = "block1_mlp1/kernel"
    else:
        layers = [keras.Input((width,))] + [keras.layers.Dense(width, activation="relu", name=f"fc{i}")
                                            for i in range(depth)] + [keras.layers.Dense(10, name="out")]
        model = keras.Sequential(layers, name="mlp")
        x = rng.normal(size=(BATCH, width)).astype(np.float32)
        y = rng.integers(0, 10, size=BATCH).astype(np.int32)
        first_kernel = "mlp/fc0/kernel"
    params = int(sum(np.prod(v.shape) for v in model.trainable_variables))
    backbone = int(sum(np.prod(v.shape) for v in model.trainable_variables if not v.path.startswith("out/")))
    ds = tf.data.Dataset.from_tensors((x, y))
    out: Dict[str, Any] = {"case": name, "params": params, "backbone": backbone, "frozen_fraction": frozen,
                           "update": update}
    if update == "lora":  # the rank whose adapter count is nearest to 0.5 % of the backbone (at least 1)
        rank = nearest_lora_rank(LORA_BUDGET * backbone, lora_elements_per_rank(model))
        enabled = enable_lora(model, rank=rank)
        out.update(lora_rank=rank, lora_layers=len(enabled))
    mem = MemoryProbe(reset=False)  # the peak stays this process's own
    rss_built = _required(mem.rss(), "VmRSS")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = keras.optimizers.AdamW(1e-4, weight_decay=1e-2)
    clock = Clock()  # marked at the end of every execution; the first one (compiling) is not timed
    steps_asked = K * (1 + executions)
    if update is None:
        model.compile(optimizer=optimizer, loss=loss, jit_compile=True, steps_per_execution=K)
        model.fit(ds.repeat(), steps_per_epoch=steps_asked, epochs=1, verbose=0,
                  callbacks=[fit_clock(keras.callbacks.Callback, clock, K)])
        out["steps"] = int(optimizer.iterations.numpy())
        out["trainable"] = params
    else:
        start = time.perf_counter()
        registry = MaskRegistry(model, update="auto" if update in ("lora", "trainer") else update)
        if update == "lora":  # the rest of the backbone stays at its values; the adapters and the head train
            registry.freeze("*", exclude=["out/*", "*lora_kernel*"], non_trainable="skip", value="current")
        elif update != "trainer":
            select, exclude = ("*", ["out/*"]) if name == "transformer_995_backbone_auto" else ("*/kernel", None)
            registry.freeze(select, exclude=exclude, elements={"random": frozen, "seed": 0}, value="current")
        out["setup_s"] = time.perf_counter() - start
        out["memory_bytes"] = int(sum(registry.memory_bytes().values()))
        out["update_modes"] = sorted(set(registry.update_modes().values()))
        out["trainable"] = int(sum(int(m.sum()) for m in registry.trainable_masks().values()))
        kernel = next(v for v in model.variables if v.path == first_kernel)  # its first row: a direct bit check
        row_frozen = ~registry.trainable_mask(kernel.path)[0] if kernel.trainable else np.ones(kernel.shape[1], bool)
        row_before = kernel.numpy()[0][row_frozen].copy()
        trainer = Trainer(model, optimizer, loss, registry=registry, steps_per_execution=K, jit_compile=True)
        trainer.fit(ds, epochs=1, max_steps=steps_asked, steps_per_epoch=10 ** 9, callbacks=[trainer_clock(clock)])
        out["steps"] = trainer.step
        row_now = kernel.numpy()[0][row_frozen]
        out["frozen_bits_equal"] = bool(np.array_equal(row_now.view(np.uint32), row_before.view(np.uint32)))
        out["frozen_exact"] = bool(registry.exact())
    out["steps_asked"] = steps_asked
    out["ms_per_step"] = 1000.0 * median(clock.intervals()) / K
    out["rss_built_mib"] = rss_built
    out["peak_rss_mib"] = _required(mem.peak(), "VmHWM")
    out["peak_growth_mib"] = out["peak_rss_mib"] - rss_built
    return out


def _subprocess(name: str, args) -> Dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--case", name, "--width", str(args.width),
           "--depth", str(args.depth), "--executions", str(args.executions)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    if proc.returncode != 0:
        raise RuntimeError(f"case {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(rounds: Dict[str, List[Dict[str, Any]]], num: str, den: str, key: str) -> Optional[float]:
    """Median over rounds of ``num[key] / den[key]`` within a round."""
    return paired_ratio(rounds, num, den, lambda r: r[key])


def run_all(args) -> Dict[str, Any]:
    """Runs the cases interleaved for ``args.rounds`` rounds; returns the summary (cases, ratios, load)."""
    names = args.cases or [n for n in CASES if args.transformer or not n.startswith("transformer")]
    rounds: Dict[str, List[Dict[str, Any]]] = {n: [] for n in names}
    loads = {"start": list(os.getloadavg())}
    for r in range(args.rounds):
        for name in names:
            result = _subprocess(name, args)
            rounds[name].append(result)
            print(f"scale round {r + 1}/{args.rounds} {name}: {result['ms_per_step']:.1f} ms/step, peak growth "
                  f"{result['peak_growth_mib']:.0f} MiB, set-up {result.get('setup_s', 0.0):.2f} s", flush=True)
    loads["end"] = list(os.getloadavg())
    cases = {}
    for name, results in rounds.items():
        first = results[0]
        cases[name] = {
            "params": first["params"], "frozen_fraction": first["frozen_fraction"], "update": first["update"],
            "trainable": first.get("trainable"), "lora_rank": first.get("lora_rank"),
            "update_modes": first.get("update_modes"),
            "ms_per_step": median([r["ms_per_step"] for r in results]),
            "peak_growth_mib": median([r["peak_growth_mib"] for r in results]),
            "rss_built_mib": median([r["rss_built_mib"] for r in results]),
            "setup_s": median([r.get("setup_s") for r in results]),
            "registry_memory_bytes": first.get("memory_bytes"),
            "steps_equal_asked": all(r["steps"] == r["steps_asked"] for r in results),
            "frozen_exact": all(r.get("frozen_exact", True) and r.get("frozen_bits_equal", True) for r in results),
            "rounds": results,
        }
    ratios = {
        "scale_step_time_vs_keras_fit": _ratio(rounds, "trainer_99_auto", "keras_fit", "ms_per_step"),
        "scale_peak_rss_growth_vs_keras_fit": _ratio(rounds, "trainer_99_auto", "keras_fit", "peak_growth_mib"),
        "scale_99_dense_step_time_vs_keras_fit": _ratio(rounds, "trainer_99_dense", "keras_fit", "ms_per_step"),
        "scale_99_dense_peak_rss_growth_vs_keras_fit": _ratio(rounds, "trainer_99_dense", "keras_fit",
                                                              "peak_growth_mib"),
    }
    ratios["transformer_step_time_vs_keras_fit"] = _ratio(rounds, "transformer_995_auto", "transformer_keras_fit",
                                                          "ms_per_step")
    ratios["transformer_peak_rss_growth_vs_keras_fit"] = _ratio(rounds, "transformer_995_auto",
                                                                "transformer_keras_fit", "peak_growth_mib")
    for case in ("transformer_995_backbone_auto", "transformer_lora", "transformer_dense"):
        for key, short in (("ms_per_step", "step_time"), ("peak_growth_mib", "peak_rss_growth")):
            ratios[f"{case}_{short}_vs_keras_fit"] = _ratio(rounds, case, "transformer_keras_fit", key)
    ratios["transformer_995_backbone_step_time_vs_lora"] = _ratio(rounds, "transformer_995_backbone_auto",
                                                                  "transformer_lora", "ms_per_step")
    ratios["transformer_995_backbone_peak_rss_growth_vs_lora"] = _ratio(rounds, "transformer_995_backbone_auto",
                                                                        "transformer_lora", "peak_growth_mib")
    for f in ("90", "50"):
        for other in ("dense", "compact"):
            ratios[f"scale_{f}_auto_vs_{other}"] = _ratio(rounds, f"trainer_{f}_auto", f"trainer_{f}_{other}",
                                                          "ms_per_step")
    setup = cases.get("trainer_99_auto", {}).get("setup_s")
    targets = {"scale_step_time_vs_keras_fit": ("<=", 0.75), "scale_peak_rss_growth_vs_keras_fit": ("<=", 0.6)}
    verdicts = {k: {"value": ratios[k], "target": t, "met": None if ratios[k] is None else ratios[k] <= t}
                for k, (_, t) in targets.items()}
    verdicts["registry_setup_s"] = {"value": setup, "target": 3.0, "met": None if setup is None else setup <= 3.0}
    for f in ("90", "50"):
        worst = [ratios[f"scale_{f}_auto_vs_{o}"] for o in ("dense", "compact")]
        if None not in worst:
            verdicts[f"scale_{f}_auto_within_3pct"] = {"value": max(worst), "target": 1.03, "met": max(worst) <= 1.03}
    return {"settings": {"width": args.width, "depth": args.depth, "batch": BATCH, "k": K,
                         "executions_timed": args.executions, "rounds": args.rounds},
            "loads": loads, "cases": cases, "ratios": ratios, "verdicts": verdicts}


def format_table(summary: Dict[str, Any]) -> str:
    """A Markdown table of the scale cases."""
    lines = ["| case | update | trainable | ms/step | peak RSS growth MiB | registry set-up s | steps as asked | "
             "frozen exact |", "|---|---|---:|---:|---:|---:|---|---|"]
    for name, c in summary["cases"].items():
        setup = "-" if c["setup_s"] is None else f"{c['setup_s']:.2f}"
        modes = ",".join(c["update_modes"] or []) or "-"
        trainable = "-" if c.get("trainable") is None else f"{c['trainable']:,}"
        lines.append(f"| {name} | {modes} | {trainable} | {c['ms_per_step']:.1f} | {c['peak_growth_mib']:.0f} | "
                     f"{setup} | {c['steps_equal_asked']} | {c['frozen_exact']} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="write the summary JSON here")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--executions", type=int, default=3, help="timed executions of K=20 steps per case")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--cases", nargs="+", default=None, choices=list(CASES))
    p.add_argument("--transformer", action="store_true", help="also the BERT-base-sized Transformer cases")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # one case, in this process (the worker)
    return p.parse_args(argv)


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.case:
        result = run_case(args.case, width=args.width, depth=args.depth, executions=args.executions)
        print(json.dumps(result))
        return result
    summary = run_all(args)
    print(format_table(summary))
    print(json.dumps({"ratios": summary["ratios"], "verdicts": summary["verdicts"]}, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
