"""What ``scripts/bench.py`` writes: the ``bench.json`` object, the registry's memory, the Markdown tables.

A library of ``scripts/bench.py``, not a command. The meaning of every number is in ``scripts/bench.py``'s
docstring; the keys of ``bench.json`` and the names of its ratios are part of the project's record
(``experiments/benchmark/``).
"""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from _bench_cases import LR, MATMUL_N, SPARSITY, Case, settings_label
from _measure import median, paired_ratio

# ratio name: (numerator case, denominator case); a throughput ratio, higher favours the numerator
RATIOS = {
    "masked_vs_unmasked": ("trainer_masked", "trainer_dense"),
    "trainer_vs_keras_fit": ("trainer_masked", "keras_fit"),
    "trainer_vs_constraint": ("trainer_masked", "keras_constraint"),
    "trainer_vs_tfmot": ("trainer_masked", "tfmot"),
    "trainer_dense_vs_keras_fit": ("trainer_dense", "keras_fit"),
    # the guard's cost: the step with it over the step without (nan_policy="unchecked")
    "guarded_vs_unchecked": ("trainer_masked", "trainer_masked_unchecked"),
    "dense_guarded_vs_unchecked": ("trainer_dense", "trainer_dense_unchecked"),
    "select_vs_cond_guard": ("trainer_masked", "trainer_masked_cond_guard"),
    "trainer_vs_keras_fit_default": ("trainer_masked", "keras_fit_default"),
    "trainer_defaults_vs_keras_fit_defaults": ("trainer_defaults", "keras_fit_default"),
    "trainer_vs_masked_layer": ("trainer_masked", "keras_masked_layer"),
    "trainer_dense_k1_noxla_vs_keras_fit_default": ("trainer_dense_k1_noxla", "keras_fit_default"),
    "wide_masked_vs_unmasked": ("wide_trainer_masked", "wide_trainer_dense"),
    "wide_trainer_vs_keras_fit": ("wide_trainer_masked", "wide_keras_fit"),
    "wide_masked_vs_unmasked_noxla": ("wide_trainer_masked_noxla", "wide_trainer_dense_noxla"),
    "masked_optimizer_fit_vs_trainer": ("keras_masked_optimizer", "trainer_masked"),
}
TARGETS = {"masked_vs_unmasked": 0.98, "trainer_vs_keras_fit": 1.0, "trainer_vs_constraint": 1.0,
           "trainer_vs_tfmot": 1.0, "trainer_defaults_vs_keras_fit_defaults": 1.5,
           "masked_optimizer_fit_vs_trainer": 0.95}
MFU_TARGET = 0.5


def _throughput(round_: Dict[str, float]) -> float:
    return round_["steps"] / round_["seconds"]


def ratios_of(by_name: Dict[str, Case]) -> Dict[str, Any]:
    """Every ratio of :data:`RATIOS` and of the sweep (``None`` where a case did not run)."""
    rounds = {name: case.rounds for name, case in by_name.items()}
    ratios = {key: paired_ratio(rounds, num, den, _throughput) for key, (num, den) in RATIOS.items()}
    for name in by_name:  # the sweep: each setting against the headline masked trainer
        if name.startswith("trainer_masked_k"):
            ratios[f"{name}_vs_trainer_masked"] = paired_ratio(rounds, name, "trainer_masked", _throughput)
            dense = name.replace("masked", "dense")
            if dense in by_name:
                ratios[f"{name}_vs_{dense}"] = paired_ratio(rounds, name, dense, _throughput)
    return ratios


def summarize(cases: List[Case], args, machine, loads) -> Dict[str, Any]:
    """The bench.json object: cases, ratios, MFU, the matmul rate, targets, machine, load and settings."""
    matmul = next(c for c in cases if c.kind == "matmul")
    rate = median([r["flops_per_sec"] for r in matmul.rounds])
    by_name = {c.name: c for c in cases if c.kind == "train"}
    out_cases, mfu = {}, {}
    for case in by_name.values():
        ms = median([1000.0 * r["seconds"] / r["steps"] for r in case.rounds])
        eps = median([case.batch * r["steps"] / r["seconds"] for r in case.rounds])
        out_cases[case.name] = {
            "examples_per_sec": eps, "ms_per_step": ms, "first_step_s": case.info.get("first_step_s"),
            "first_execution_s": case.info.get("first_execution_s"), "model": case.model_name,
            "description": case.description, "steps_per_execution": case.k, "jit_compile": case.jit,
            "setup_mib": case.info.get("setup_mib"),
            "peak_step_mib": max((r["peak_step_mib"] for r in case.rounds if r.get("peak_step_mib") is not None),
                                 default=None),
            "round_ms_per_step": [1000.0 * r["seconds"] / r["steps"] for r in case.rounds],
            "cpu_ms_per_step": median([1000.0 * r["cpu_seconds"] / r["steps"] for r in case.rounds]),
            "model_flops_per_step": case.flops,
            **{k: v for k, v in case.info.items() if k in ("jit_error", "versions", "jit_compile_requested")},
        }
        mfu[case.name] = (case.flops * 1000.0 / ms) / rate if ms and rate else None
    ratios = ratios_of(by_name)
    verdicts = {k: {"value": ratios[k], "target": t, "met": None if ratios[k] is None else ratios[k] >= t}
                for k, t in TARGETS.items()}
    masked_mfu = mfu.get("trainer_masked")
    verdicts["mfu_trainer_masked"] = {"value": masked_mfu, "target": MFU_TARGET,
                                      "met": None if masked_mfu is None else masked_mfu >= MFU_TARGET}
    return {
        "cases": out_cases, "ratios": ratios, "mfu": mfu, "matmul_flops_per_sec": rate,
        "matmul_round_gflops": [r["flops_per_sec"] / 1e9 for r in matmul.rounds],
        "targets": verdicts, "machine": machine, "load_average": loads,
        "settings": {"batch": args.batch, "rounds": args.rounds, "steps": args.steps, "wide_steps": args.wide_steps,
                     "steps_per_execution": args.steps_per_execution, "wide_steps_per_execution": args.wide_k,
                     "data": args.data, "limit": args.limit, "input": args.input, "hidden": list(args.hidden),
                     "wide_width": args.wide_width, "warmup_steps": args.warmup, "optimizer": f"Adam({LR})",
                     "sparsity": SPARSITY, "tfmot_skipped": args.tfmot_skipped, "quick": args.quick,
                     "memory_peak_resettable": args.memory_resettable},
    }


def registry_memory(hidden, input_shape, classes) -> Dict[str, Any]:
    """Registry bytes against the model's own, per kernel: dense ``zero`` / ``current`` pins and compact updates.

    ``registry_bytes`` is :meth:`MaskRegistry.memory_bytes` (per-element state on the host and the device:
    the 1-byte trainable-mask of a dense update, or the int32 index and the value of each trainable element of
    a compact one; no pinned copies). ``bound_bytes`` is the target: 1.2 bytes per element of a partly frozen
    variable in dense mode, 8 bytes per trainable element in compact mode.
    """
    import keras

    from trainer import MaskRegistry
    from trainer.models import build_model

    out: Dict[str, Any] = {}
    for label, value, update in (("zero", "zero", "dense"), ("current", "current", "dense"),
                                 ("compact", "current", "compact")):
        keras.utils.set_random_seed(0)
        model = build_model("mlp", input_shape, classes, hidden=list(hidden))
        registry = MaskRegistry(model, update=update)
        registry.freeze("*/kernel", elements={"random": SPARSITY, "seed": 0}, value=value)
        variables = {v.path: v for v in model.variables}
        rows, totals = {}, {"model_bytes": 0, "registry_bytes": 0, "bound_bytes": 0}
        for path, nbytes in registry.memory_bytes().items():
            var = variables[path]
            size = int(np.prod(var.shape))
            trainable = int(registry.trainable_mask(path).sum())
            bound = 8 * trainable if update == "compact" else int(1.2 * size)
            row = {"elements": size, "trainable": trainable, "model_bytes": size * np.dtype(var.dtype).itemsize,
                   "registry_bytes": int(nbytes), "bytes_per_element": nbytes / size,
                   "bytes_per_trainable": nbytes / max(trainable, 1), "bound_bytes": bound,
                   "within_bound": int(nbytes) <= bound}
            rows[path] = row
            for key in totals:
                totals[key] += row[key]
        out[label] = {"variables": rows, **totals, "within_bound": all(r["within_bound"] for r in rows.values())}
    return out


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_table(result: Dict[str, Any]) -> str:
    """A Markdown table of the cases, then the ratios."""
    lines = ["| case | settings | examples/s | ms/step | CPU ms/step | MFU | first step (s) | setup MiB "
             "| step peak MiB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c in result["cases"].items():
        lines.append(f"| {name} | {settings_label(c['steps_per_execution'], c['jit_compile'])} | "
                     f"{_num(c['examples_per_sec'], ',.0f')} | "
                     f"{_num(c['ms_per_step'], '.2f')} | {_num(c['cpu_ms_per_step'], '.2f')} | "
                     f"{_num(result['mfu'].get(name), '.3f')} | "
                     f"{_num(c['first_step_s'], '.2f')} | {_num(c['setup_mib'], '.0f')} | "
                     f"{_num(c['peak_step_mib'], '.1f')} |")
    lines.append("")
    rate = result["matmul_flops_per_sec"]
    lines.append(f"matmul rate: {_num(rate and rate / 1e9, '.1f')} GFLOP/s ({MATMUL_N}x{MATMUL_N} float32, "
                 "median of rounds)")
    lines.append("")
    lines.append("| ratio (throughput, higher favours the trainer) | value | target |")
    lines.append("|---|---:|---:|")
    targets = result["targets"]
    for key, value in result["ratios"].items():
        target = targets.get(key, {}).get("target")
        lines.append(f"| {key} | {_num(value, '.3f')} | {'>= ' + str(target) if target else ''} |")
    t = targets["mfu_trainer_masked"]
    lines.append(f"| MFU of trainer_masked | {_num(t['value'], '.3f')} | >= {t['target']} |")
    return "\n".join(lines)


def format_memory(memory: Dict[str, Any]) -> str:
    """A Markdown table of the registry's memory per kernel."""
    lines = ["| case | variable | elements | model bytes | registry bytes | bytes/element | bytes/trainable | "
             "bound bytes | within bound |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for value, block in memory.items():
        for path, r in block["variables"].items():
            lines.append(f"| {value} | {path} | {r['elements']:,} | {r['model_bytes']:,} | {r['registry_bytes']:,} | "
                         f"{r['bytes_per_element']:.2f} | {r['bytes_per_trainable']:.2f} | {r['bound_bytes']:,} | "
                         f"{r['within_bound']} |")
    return "\n".join(lines)
