"""The sparse LLM fine-tuning study (issue 29): FISH, random and magnitude at 0.5 %, LoRA and full fine-tuning.

A small Llama-architecture decoder (``+experiment=sparse_llm_pretrain``: keras-hub ``LlamaBackbone``, byte-level
tokens) is pretrained once on the standard library's sources except its tests; its ``weights.npz`` is the
starting point of every fine-tune on the standard library's unit tests (``test/*.py``):

* ``fish`` / ``random`` / ``magnitude``: ``+experiment=sparse_llm sft.method=<m>`` (``sft.k`` = 0.5 % of every
  element of the decoder, chosen before training);
* ``lora``: ``+experiment=sparse_llm_lora model.lora_rank=<r>``, ``r`` the rank whose adapter count is nearest
  to the same count (``trainer.models.nearest_lora_rank``);
* ``full``: ``+experiment=sparse_llm_full``;
* ``pretrained``: the starting point itself, evaluated on the fine-tuning validation set (no training).

Every run is an ordinary run directory under ``<out>/seed<S>/<method>`` (``run(cfg)`` through
``scripts/_study.py``; a finished run is not run again). The table gives, per method, the mean and sample
standard deviation over the seeds of the validation and test perplexity (``exp`` of the mean next-token
cross-entropy over non-pad tokens), the trainable elements and the wall seconds of a run.

Example::

    python scripts/sparse_llm_study.py --out multirun/sparse_llm --seeds 0 1 2 \\
        --table experiments/sparse_llm/results.md --plot experiments/sparse_llm/perplexity.png
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from _figures import emit_table, pyplot, save_figure
from _study import compose, configs, read_report, run_once

METHODS = ("fish", "random", "magnitude", "lora", "full")
BUDGET = 0.005


def pretrained_row(out: str, extra: Sequence[str]) -> Dict[str, Any]:
    """The starting point on the fine-tuning validation and test sets, and the LoRA rank nearest to ``BUDGET``."""
    import keras

    from trainer import Trainer
    from trainer.data import make_dataset
    from trainer.models import lora_elements_per_rank, nearest_lora_rank
    from trainer.run import build
    from trainer.text_data import objectives

    keras.backend.clear_session()
    cfg = compose(["+experiment=sparse_llm_full", f"model.init_from={out}/pretrain/weights.npz", *extra])
    splits, model, optimizer, registry = build(cfg)
    elements = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    rank = nearest_lora_rank(BUDGET * elements, lora_elements_per_rank(model, list(cfg.model.lora_layers)))
    loss, metrics = objectives(splits)
    trainer = Trainer(model, optimizer, loss, metrics=metrics, registry=registry, jit_compile=False)
    batch = int(cfg.trainer.eval_batch_size)
    val = trainer.evaluate(make_dataset(splits.x_val, splits.y_val, batch, shuffle=False, seed=0))
    test = trainer.evaluate(make_dataset(splits.x_test, splits.y_test, batch, shuffle=False, seed=0))
    return {"method": "pretrained", "seed": None, "val_perplexity": val["perplexity"],
            "test_perplexity": test["perplexity"], "trainable_elements": 0, "wall_seconds": None,
            "elements": elements, "lora_rank": rank, "budget": int(round(BUDGET * elements)),
            "train_sequences": int(len(splits.x_train)), "val_sequences": int(len(splits.x_val))}


def overrides_of(method: str, seed: int, out: str, rank: int) -> List[str]:
    """The command line of one fine-tune."""
    common = [f"seed={seed}", f"model.init_from={out}/pretrain/weights.npz"]
    if method == "lora":
        return ["+experiment=sparse_llm_lora", f"model.lora_rank={rank}", *common]
    if method == "full":
        return ["+experiment=sparse_llm_full", *common]
    return ["+experiment=sparse_llm", f"sft.method={method}", f"sft.k={BUDGET}", f"sft.seed={seed}", *common]


def study(out: str, seeds: Sequence[int], methods: Sequence[str], extra: Sequence[str]) -> List[Dict[str, Any]]:
    """Runs (or reads back) the pretraining, the pretrained row and every fine-tune; returns one row per run."""
    started = time.perf_counter()
    with configs():
        run_once(["+experiment=sparse_llm_pretrain", *extra], os.path.join(out, "pretrain"))
        base = pretrained_row(out, extra)
        rows = [base]
        for seed in seeds:
            for method in methods:
                run_dir = os.path.join(out, f"seed{seed}", method)
                report = run_once([*overrides_of(method, seed, out, base["lora_rank"]), *extra], run_dir)
                rows.append({"method": method, "seed": seed, "val_perplexity": report["val_perplexity"],
                             "test_perplexity": report["test_perplexity"],
                             "trainable_elements": report["trainable_elements"],
                             "wall_seconds": report["wall_seconds"]})
    pretrain = read_report(os.path.join(out, "pretrain"))
    base.update(pretrain_wall_seconds=pretrain["wall_seconds"], pretrain_val_perplexity=pretrain["val_perplexity"],
                study_wall_seconds=time.perf_counter() - started)
    return rows


def mean_sd(values: Sequence[Optional[float]]) -> str:
    """``mean ± sd`` (sample standard deviation; the mean alone for one value, ``-`` for none)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def table(rows: Sequence[Dict[str, Any]]) -> str:
    """The Markdown table: one line per method, means over the seeds."""
    lines = ["| method | trainable elements | val perplexity | test perplexity | seeds | wall s / run |",
             "|---|---:|---:|---:|---:|---:|"]
    for method in ["pretrained", *METHODS]:
        group = [r for r in rows if r["method"] == method]
        if not group:
            continue
        walls = [r["wall_seconds"] for r in group if r["wall_seconds"] is not None]
        lines.append(f"| {method} | {group[0]['trainable_elements']:,} | "
                     f"{mean_sd([r['val_perplexity'] for r in group])} | "
                     f"{mean_sd([r['test_perplexity'] for r in group])} | "
                     f"{len([r for r in group if r['seed'] is not None]) or '-'} | "
                     f"{f'{np.mean(walls):.0f}' if walls else '-'} |")
    return "\n".join(lines)


def plot(series: Dict[str, Sequence[Dict[str, Any]]], path: str) -> None:
    """Validation perplexity per method: each seed a dot, the mean with its sd as a bar; the pretrained model a line.

    Args:
      series: ``{label: rows}``, one study's rows per label (e.g. one per learning rate), drawn side by side.
      path: the PNG to write.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    methods = [m for m in METHODS if any(r["method"] == m for rows in series.values() for r in rows)]
    width = 0.7 / max(len(series), 1)
    for k, (label, rows) in enumerate(series.items()):
        for i, method in enumerate(methods):
            values = [r["val_perplexity"] for r in rows if r["method"] == method]
            if not values:
                continue
            x = i - 0.35 + width * (k + 0.5)
            ax.plot([x] * len(values), values, ".", color=f"C{k}", ms=4, alpha=0.6)
            ax.errorbar(x, np.mean(values), yerr=np.std(values, ddof=1) if len(values) > 1 else 0, fmt="o",
                        color=f"C{k}", capsize=4, label=label if i == 0 or not k else None)
    base = next(r for rows in series.values() for r in rows if r["method"] == "pretrained")
    ax.axhline(base["val_perplexity"], color="#c44", ls="--", label="pretrained (no fine-tune)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), loc="upper right", fontsize=8)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("validation perplexity (byte tokens)")
    ax.set_title(f"fine-tuning a {base['elements'] / 1e6:.1f}M Llama on stdlib tests; sparse at 0.5 %", fontsize=10)
    save_figure(fig, path)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="multirun/sparse_llm", help="where the run directories go")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--table", help="also write the Markdown table here")
    parser.add_argument("--plot", help="write the PNG plot here")
    parser.add_argument("--json", help="write every row (and the study's wall time) here")
    parser.add_argument("--label", default="this study", help="this study's name in the plot's legend")
    parser.add_argument("--plot-with", nargs="*", default=[], metavar="LABEL=JSON",
                        help="also plot the rows of other studies (their --json files)")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every run (e.g. trainer.batch_size=8)")
    args = parser.parse_args(argv)
    rows = study(os.path.abspath(args.out), args.seeds, args.methods, args.overrides)
    emit_table(table(rows), args.table)
    if args.plot:
        series = {args.label: rows}
        for item in args.plot_with:
            label, _, path = item.partition("=")
            with open(path) as f:
                series[label] = json.load(f)
        plot(series, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
