"""The sparse fine-tuning study: FISH, LT-SFT, random, magnitude, LoRA and full fine-tuning of a Transformer.

Task A: ``+experiment=transformer_task_a`` (MNIST digits 0-4). Task B (digits
5-9, a new head) from task A's weights, for every trainable budget ``b``
(a fraction of the backbone's elements, the new head not counted):

* ``fish`` / ``random`` / ``magnitude``: ``+experiment=transformer_sft sft.method=<m> sft.k=<b>``;
* ``lt_sft``: ``scripts/lt_sft.py``'s two phases (dense for the same steps, then the top-k ``|w - w0|``);
* ``lora``: ``+experiment=transformer_lora model.lora_rank=<r>``, ``r`` the rank whose adapter count is
  nearest to ``b`` times the backbone's elements (at least 1);
* ``full``: ``+experiment=transformer_full`` (once).

Every run is an ordinary run directory under ``<out>/seed<S>/``, run in its
own subprocess (this script's ``--worker``) so that its peak memory is its own
(``os.wait4``'s ``ru_maxrss``, kept in ``<run dir>/peak_rss.json``); a run whose
``report.json`` exists is skipped. LoRA runs of the same rank (several budgets
can round to one rank) run once. Forgetting: each task-B run's ``model.keras``
(LoRA adapters included) with task A's head (``out/*`` from task A's
``weights.npz``) is evaluated on task A's test images. Stored size: what
must be kept to rebuild the fine-tuned model from task A's weights: for the
sparse methods the kept elements' values and int32 flat indices, for LoRA the
adapters, for full fine-tuning the whole backbone; the new head in each case.
The table gives, per configuration, the mean and sample standard deviation
over the seeds; ``--no-run`` tabulates what is done without running anything.

Example::

    python scripts/sft_study.py --out multirun/sparse_finetuning --seeds 0 1 2 \\
        --budgets 0.001 0.005 0.01 0.05 --task-a-steps 400 --task-b-steps 200 \\
        --table experiments/sparse_finetuning/results.md --plot experiments/sparse_finetuning/accuracy.png
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

import lt_sft
from _figures import emit_table, pyplot, save_figure
from _study import REPO, compose, configs, finished, read_report, run_once

log = logging.getLogger("sft_study")
SPARSE_METHODS = ("fish", "lt_sft", "random", "magnitude")


def backbone_sizes(task_a_overrides: Sequence[str]) -> Dict[str, int]:
    """``{"backbone": elements outside out/*, "lora_per_rank": adapter elements of rank 1}`` of the Transformer."""
    import keras

    from trainer.models import lora_elements_per_rank
    from trainer.run import build

    keras.backend.clear_session()
    _, model, _, _ = build(compose(task_a_overrides))
    backbone = sum(int(np.prod(v.shape)) for v in model.trainable_variables if not v.path.startswith("out/"))
    return {"backbone": backbone, "lora_per_rank": lora_elements_per_rank(model)}


def task_a_accuracy_after_b(task_a_dir: str, run_dir: str) -> float:
    """Task B's model (``model.keras``) with task A's head, on task A's test images."""
    import keras
    from omegaconf import OmegaConf

    from trainer.run import load_data

    a_cfg = OmegaConf.load(os.path.join(task_a_dir, "config.yaml"))
    splits = load_data(a_cfg.data, int(a_cfg.seed))
    model = keras.saving.load_model(os.path.join(run_dir, "model.keras"), compile=False)
    head = np.load(os.path.join(task_a_dir, "weights.npz"))
    for v in model.variables:
        if v.path.startswith("out/"):
            v.assign(head[v.path])
    logits = model.predict(splits.x_test, batch_size=1000, verbose=0)
    return float(np.mean(np.argmax(logits, -1) == splits.y_test))


def stored_bytes(run_dir: str, method: str) -> int:
    """Bytes to rebuild the fine-tuned model from task A's weights (see the module docstring)."""
    weights, masks = np.load(os.path.join(run_dir, "weights.npz")), np.load(os.path.join(run_dir, "masks.npz"))
    total = 0
    for path in weights.files:
        size = int(weights[path].size) * weights[path].itemsize
        if path.startswith("out/"):
            total += size
        elif method == "lora":
            total += size if "lora_kernel" in path else 0
        elif method == "full":
            total += size if path in masks.files else 0
        elif path in masks.files:
            total += int(masks[path].sum()) * (weights[path].itemsize + 4)
    return total


def _worker(spec: Dict[str, Any]) -> None:
    """One run in this process (the subprocess of :func:`run_measured`): an ordinary run or LT-SFT's two phases."""
    with configs():
        if spec["kind"] == "lt_sft":
            lt_sft.lt_sft(spec["overrides"], spec["run_dir"], k=spec["k"], dense_steps=spec["dense_steps"])
        else:
            run_once(spec["overrides"], spec["run_dir"])


def run_measured(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Runs ``spec`` in a subprocess (this script's ``--worker``) unless done; returns its peak RSS and time.

    The peak is the subprocess's ``ru_maxrss`` (``os.wait4``), so each run's
    peak memory is its own; it is kept in ``<run_dir>/peak_rss.json`` so a
    rerun of the study reuses it (``None`` for a run done before without it).
    """
    run_dir = spec["run_dir"]
    peak_path = os.path.join(run_dir, "peak_rss.json")
    if finished(os.path.join(run_dir, "sparse") if spec["kind"] == "lt_sft" else run_dir):
        if os.path.isfile(peak_path):
            with open(peak_path) as f:
                return json.load(f)
        return {"peak_rss_mib": None, "process_seconds": None}
    os.makedirs(run_dir, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    started = time.perf_counter()
    with open(os.path.join(run_dir, "study_worker.log"), "w") as log_file:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                                cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"run {run_dir} failed (exit {proc.returncode}); see {log_file.name}")
    measured = {"peak_rss_mib": usage.ru_maxrss / 1024.0, "process_seconds": time.perf_counter() - started}
    with open(peak_path, "w") as f:
        json.dump(measured, f)
    return measured


def lora_rank(budget: float, sizes: Dict[str, int]) -> int:
    """The LoRA rank whose adapter count is nearest to ``budget`` of the backbone, at least 1."""
    from trainer.models import nearest_lora_rank

    return nearest_lora_rank(budget * sizes["backbone"], sizes["lora_per_rank"])


def study(out: str, seeds: Sequence[int], budgets: Sequence[float], task_a_steps: int,
          task_b_steps: int, methods: Sequence[str] = ("full", "fish", "random", "magnitude", "lora", "lt_sft"),
          run_missing: bool = True) -> List[Dict[str, Any]]:
    """Runs (or reuses) every run of the study, each in its own subprocess; returns one row per task-B run.

    Runs sharing a directory (LoRA at the same rank for several budgets) run
    once; their row lists every budget in ``budgets``. With ``run_missing``
    false nothing is run and runs not done are left out (a partial table).
    """
    rows = []
    for seed in seeds:
        base = os.path.join(os.path.abspath(out), f"seed{seed}")
        a_over = ["+experiment=transformer_task_a", f"seed={seed}", f"trainer.max_steps={task_a_steps}",
                  "log.progress=lines"]
        a_dir = os.path.join(base, "task_a")
        if not finished(a_dir) and not run_missing:
            continue
        a_peak = run_measured({"kind": "phase", "overrides": a_over, "run_dir": a_dir})
        a_report = read_report(a_dir)
        log.info("seed %d task A: %.4f, %.0f s, peak %s MiB", seed, a_report["test_accuracy"],
                 a_report["wall_seconds"], a_peak["peak_rss_mib"])
        sizes = backbone_sizes(a_over)
        common = [f"seed={seed}", f"trainer.max_steps={task_b_steps}", "log.progress=lines",
                  f"model.init_from={os.path.join(a_dir, 'weights.npz')}"]
        runs: Dict[str, Dict[str, Any]] = {}  # run directory -> its run (LoRA: one per rank)

        def add(method, budget, name, overrides, **extra):
            run_dir = os.path.join(base, name)
            if method not in methods:
                return
            if run_dir in runs:
                runs[run_dir]["budgets"].append(budget)
            else:
                runs[run_dir] = {"method": method, "budgets": [budget], "overrides": overrides, **extra}

        add("full", None, "full", ["+experiment=transformer_full", *common])
        for b in budgets:
            for m in ("fish", "random", "magnitude"):
                add(m, b, f"{m}_{b}", ["+experiment=transformer_sft", f"sft.method={m}", f"sft.k={b}", *common])
            rank = lora_rank(b, sizes)
            add("lora", b, f"lora_r{rank}", ["+experiment=transformer_lora", f"model.lora_rank={rank}", *common],
                rank=rank)
            add("lt_sft", b, f"lt_sft_{b}", ["+experiment=transformer_sft", *common])
        for run_dir, spec in runs.items():
            method, budget = spec["method"], spec["budgets"][0]
            final_dir = os.path.join(run_dir, "sparse") if method == "lt_sft" else run_dir
            if not run_missing and not finished(final_dir):
                continue
            started = time.perf_counter()
            if method == "lt_sft":
                measured = run_measured({"kind": "lt_sft", "overrides": spec["overrides"], "run_dir": run_dir,
                                         "k": budget, "dense_steps": task_b_steps})
            else:
                measured = run_measured({"kind": "phase", "overrides": spec["overrides"], "run_dir": run_dir})
            report = read_report(final_dir)
            wall = report["wall_seconds"]
            if method == "lt_sft":
                wall += read_report(os.path.join(run_dir, "dense"))["wall_seconds"]
            masks = np.load(os.path.join(final_dir, "masks.npz"))
            head = sum(int(masks[p].size) for p in masks.files if p.startswith("out/"))
            steady = report.get("steady_steps_per_second")
            row = {"seed": seed, "method": method, "budget": budget, "budgets": spec["budgets"],
                   "rank": spec.get("rank"), "key": os.path.basename(run_dir), "dir": os.path.relpath(final_dir),
                   "trainable": report["trainable_elements"] - head,
                   "trainable_percent": 100 * (report["trainable_elements"] - head) / sizes["backbone"],
                   "task_b_accuracy": report["test_accuracy"],
                   "task_a_accuracy_after_b": task_a_accuracy_after_b(a_dir, final_dir),
                   "task_a_accuracy": a_report["test_accuracy"],
                   "wall_seconds": wall, "steps": report["steps"], "steps_per_second": steady,
                   "ms_per_step": 1000.0 / steady if steady else None,
                   "peak_rss_mib": measured["peak_rss_mib"],
                   "stored_kib": stored_bytes(final_dir, method) / 1024, "frozen_exact": report["frozen_exact"]}
            rows.append(row)
            log.info("%s %s | %.0f s (this call %.0f s) | %s", method, budget, wall,
                     time.perf_counter() - started, row)
    return rows


def _mean_std(values: Sequence[Optional[float]]):
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)


SUMMARY_KEYS = ("trainable_percent", "task_b_accuracy", "task_a_accuracy_after_b", "wall_seconds", "ms_per_step",
                "peak_rss_mib", "stored_kib")


def summarize(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One entry per configuration (method and budget, or LoRA rank): mean and sample std (ddof 1) over seeds."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["key"], []).append(r)
    order = {"full": 0, "fish": 1, "lt_sft": 2, "random": 3, "magnitude": 4, "lora": 5}
    out = []
    for key, mine in groups.items():
        first = mine[0]
        entry = {"key": key, "method": first["method"], "budgets": first["budgets"], "rank": first.get("rank"),
                 "trainable": first["trainable"], "seeds": sorted(r["seed"] for r in mine),
                 "frozen_exact": all(r["frozen_exact"] for r in mine)}
        for k in SUMMARY_KEYS:
            entry[k], entry[k + "_std"] = _mean_std([r.get(k) for r in mine])
        out.append(entry)
    return sorted(out, key=lambda e: (order.get(e["method"], 9), e["trainable_percent"]))


def table(rows: Sequence[Dict[str, Any]]) -> str:
    """A Markdown table: one line per configuration, mean ± std over its seeds."""
    def pm(e, k, scale=1.0, digits=2):
        mean, std = e[k], e[k + "_std"]
        return "-" if mean is None else f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"

    lines = ["| method | budget | trainable (backbone) | seeds | task B acc. % | task A acc. after B % (A's head) | "
             "ms/step | wall s | peak RSS MiB | stored KiB | frozen bit-exact |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in summarize(rows):
        budgets = [b for b in e["budgets"] if b is not None]
        budget = " / ".join(f"{100 * b:g} %" for b in budgets) or "-"
        if e["method"] == "lora":
            budget += f" (rank {e['rank']})"
        lines.append(f"| {e['method']} | {budget} | {e['trainable']:,} ({e['trainable_percent']:.2f} %) | "
                     f"{len(e['seeds'])} | {pm(e, 'task_b_accuracy', 100)} | {pm(e, 'task_a_accuracy_after_b', 100)} | "
                     f"{pm(e, 'ms_per_step', 1, 0)} | {pm(e, 'wall_seconds', 1, 0)} | {pm(e, 'peak_rss_mib', 1, 0)} | "
                     f"{e['stored_kib']:.1f} | {e['frozen_exact']} |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Dict[str, Any]], path: str) -> None:
    """Task-B and task-A-after-B accuracy against the trainable percentage, one line per method, std error bars."""
    plt = pyplot()
    summary = summarize(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for method in sorted({e["method"] for e in summary}):
        mine = sorted((e for e in summary if e["method"] == method), key=lambda e: e["trainable_percent"])
        for ax, key in zip(axes, ("task_b_accuracy", "task_a_accuracy_after_b")):
            ax.errorbar([e["trainable_percent"] for e in mine], [100 * e[key] for e in mine],
                        yerr=[100 * e[key + "_std"] for e in mine], fmt="o-", capsize=3, label=method)
    seeds = max((len(e["seeds"]) for e in summary), default=0)
    for ax, title in zip(axes, ("task B (digits 5-9)", "task A (digits 0-4) after B, A's head")):
        ax.set_xscale("log")
        ax.set_xlabel("trainable backbone elements (%)")
        ax.set_ylabel(f"test accuracy (%), mean ± std over {seeds} seeds")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="multirun/sparse_finetuning")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.005, 0.05])
    parser.add_argument("--methods", nargs="+", default=["full", "fish", "random", "magnitude", "lora", "lt_sft"],
                        choices=["full", "fish", "random", "magnitude", "lora", "lt_sft"])
    parser.add_argument("--task-a-steps", type=int, default=400)
    parser.add_argument("--task-b-steps", type=int, default=200)
    parser.add_argument("--no-run", action="store_true",
                        help="run nothing: tabulate the runs already done under --out (a partial study)")
    parser.add_argument("--table")
    parser.add_argument("--plot")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one run, in this process (JSON spec)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return

    started = time.perf_counter()
    with configs():
        rows = study(args.out, args.seeds, args.budgets, args.task_a_steps, args.task_b_steps,
                     methods=args.methods, run_missing=not args.no_run)
    emit_table(table(rows), args.table)
    if args.table:
        with open(os.path.splitext(args.table)[0] + ".json", "w") as f:
            json.dump({"runs": rows, "summary": summarize(rows)}, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
    log.info("study done in %.1f min", (time.perf_counter() - started) / 60)


if __name__ == "__main__":
    main()
