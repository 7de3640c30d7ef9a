"""The sparse fine-tuning study: FISH, LT-SFT, random, magnitude, LoRA and full fine-tuning of a Transformer.

Task A: ``+experiment=transformer_task_a`` (MNIST digits 0-4). Task B (digits
5-9, a new head) from task A's weights, for every trainable budget ``b``
(a fraction of the backbone's elements, the new head not counted):

* ``fish`` / ``random`` / ``magnitude``: ``+experiment=transformer_sft sft.method=<m> sft.k=<b>``;
* ``lt_sft``: ``scripts/lt_sft.py``'s two phases (dense for the same steps, then the top-k ``|w - w0|``);
* ``lora``: ``+experiment=transformer_lora model.lora_rank=<r>``, ``r`` the rank whose adapter count is
  nearest to ``b`` times the backbone's elements (at least 1);
* ``full``: ``+experiment=transformer_full`` (once).

Every run is an ordinary run directory under ``<out>/seed<S>/``; a run whose
``report.json`` exists is skipped. Forgetting: each task-B run's ``model.keras``
(LoRA adapters included) with task A's head (``out/*`` from task A's
``weights.npz``) is evaluated on task A's test images. Stored size: what
must be kept to rebuild the fine-tuned model from task A's weights: for the
sparse methods the kept elements' values and int32 flat indices, for LoRA the
adapters, for full fine-tuning the whole backbone; the new head in each case.

Example::

    python scripts/sft_study.py --out multirun/sparse_finetuning --seeds 0 --budgets 0.005 0.05 \\
        --task-a-steps 400 --task-b-steps 200 \\
        --table experiments/sparse_finetuning/results.md --plot experiments/sparse_finetuning/accuracy.png
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lt_sft  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
log = logging.getLogger("sft_study")
SPARSE_METHODS = ("fish", "lt_sft", "random", "magnitude")


def backbone_sizes(task_a_overrides: Sequence[str]) -> Dict[str, int]:
    """``{"backbone": elements outside out/*, "lora_per_rank": adapter elements of rank 1}`` of the Transformer."""
    import keras

    from trainer.models import enable_lora
    from trainer.run import build

    keras.backend.clear_session()
    _, model, _, _ = build(lt_sft._compose(task_a_overrides))
    backbone = sum(int(np.prod(v.shape)) for v in model.trainable_variables if not v.path.startswith("out/"))
    enable_lora(model, rank=1)
    per_rank = sum(int(np.prod(v.shape)) for v in model.trainable_variables if "lora_kernel" in v.path)
    return {"backbone": backbone, "lora_per_rank": per_rank}


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


def study(out: str, seeds: Sequence[int], budgets: Sequence[float], task_a_steps: int,
          task_b_steps: int) -> List[Dict[str, Any]]:
    """Runs (or reuses) every run of the study; returns one row per task-B run."""
    rows = []
    for seed in seeds:
        base = os.path.join(os.path.abspath(out), f"seed{seed}")
        a_over = ["+experiment=transformer_task_a", f"seed={seed}", f"trainer.max_steps={task_a_steps}",
                  "log.progress=lines"]
        a_dir = os.path.join(base, "task_a")
        lt_sft.run_phase(a_over, a_dir)
        sizes = backbone_sizes(a_over)
        common = [f"seed={seed}", f"trainer.max_steps={task_b_steps}", "log.progress=lines",
                  f"model.init_from={os.path.join(a_dir, 'weights.npz')}"]
        runs = [("full", None, os.path.join(base, "full"), ["+experiment=transformer_full", *common])]
        for b in budgets:
            for m in ("fish", "random", "magnitude"):
                runs.append((m, b, os.path.join(base, f"{m}_{b}"),
                             ["+experiment=transformer_sft", f"sft.method={m}", f"sft.k={b}", *common]))
            rank = max(1, int(round(b * sizes["backbone"] / sizes["lora_per_rank"])))
            runs.append(("lora", b, os.path.join(base, f"lora_r{rank}"),
                         ["+experiment=transformer_lora", f"model.lora_rank={rank}", *common]))
            runs.append(("lt_sft", b, os.path.join(base, f"lt_sft_{b}"), ["+experiment=transformer_sft", *common]))
        for method, budget, run_dir, overrides in runs:
            started = time.perf_counter()
            if method == "lt_sft":
                report = lt_sft.lt_sft(overrides, run_dir, k=budget, dense_steps=task_b_steps)["sparse"]
                final_dir = os.path.join(run_dir, "sparse")
                with open(os.path.join(run_dir, "dense", "report.json")) as f:
                    wall = report["wall_seconds"] + json.load(f)["wall_seconds"]
            else:
                report, final_dir = lt_sft.run_phase(overrides, run_dir), run_dir
                wall = report["wall_seconds"]
            masks = np.load(os.path.join(final_dir, "masks.npz"))
            head = sum(int(masks[p].size) for p in masks.files if p.startswith("out/"))
            row = {"seed": seed, "method": method, "budget": budget, "dir": os.path.relpath(final_dir),
                   "trainable": report["trainable_elements"] - head,
                   "trainable_percent": 100 * (report["trainable_elements"] - head) / sizes["backbone"],
                   "task_b_accuracy": report["test_accuracy"],
                   "task_a_accuracy_after_b": task_a_accuracy_after_b(a_dir, final_dir),
                   "wall_seconds": wall, "steps_per_second": report["steady_steps_per_second"],
                   "stored_kib": stored_bytes(final_dir, method) / 1024, "frozen_exact": report["frozen_exact"]}
            rows.append(row)
            log.info("%s %s | %.0f s (this call %.0f s) | %s", method, budget, wall,
                     time.perf_counter() - started, row)
    return rows


def table(rows: Sequence[Dict[str, Any]]) -> str:
    """A Markdown table of the rows (one per run)."""
    lines = ["| method | budget | trainable (backbone) | task B acc. | task A acc. after B (A's head) | "
             "wall s | steps/s | stored KiB | frozen bit-exact |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        budget = "-" if r["budget"] is None else f"{100 * r['budget']:g} %"
        lines.append(f"| {r['method']} | {budget} | {r['trainable']:,} ({r['trainable_percent']:.2f} %) | "
                     f"{100 * r['task_b_accuracy']:.2f} | {100 * r['task_a_accuracy_after_b']:.2f} | "
                     f"{r['wall_seconds']:.0f} | {r['steps_per_second'] or float('nan'):.1f} | "
                     f"{r['stored_kib']:.1f} | {r['frozen_exact']} |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Dict[str, Any]], path: str) -> None:
    """Task-B and task-A-after-B accuracy against the trainable percentage, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for method in sorted({r["method"] for r in rows}):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["trainable_percent"])
        for ax, key in zip(axes, ("task_b_accuracy", "task_a_accuracy_after_b")):
            ax.plot([r["trainable_percent"] for r in mine], [100 * r[key] for r in mine], "o-", label=method)
    for ax, title in zip(axes, ("task B (digits 5-9)", "task A (digits 0-4) after B, A's head")):
        ax.set_xscale("log")
        ax.set_xlabel("trainable backbone elements (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="multirun/sparse_finetuning")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.005, 0.05])
    parser.add_argument("--task-a-steps", type=int, default=400)
    parser.add_argument("--task-b-steps", type=int, default=200)
    parser.add_argument("--table")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)

    from hydra import initialize_config_dir

    from trainer.config import register

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    register()
    started = time.perf_counter()
    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base="1.3"):
        rows = study(args.out, args.seeds, args.budgets, args.task_a_steps, args.task_b_steps)
    text = table(rows)
    print(text)
    if args.table:
        os.makedirs(os.path.dirname(os.path.abspath(args.table)), exist_ok=True)
        with open(args.table, "w") as f:
            f.write(text)
        with open(os.path.splitext(args.table)[0] + ".json", "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
    log.info("study done in %.1f min", (time.perf_counter() - started) / 60)


if __name__ == "__main__":
    main()
