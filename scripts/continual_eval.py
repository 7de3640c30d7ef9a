"""Task-A accuracy after task B: task A's head on top of task B's hidden layers.

For every task-B run below the given directories (a run whose config has
``model.init_from``), this loads task A's ``model.keras`` (the run that
``init_from`` points into), assigns task B's final values (``weights.npz``) to
every variable except the head (``out/*``), and evaluates it on the test
images of task A's classes. For a run that froze elements, it also evaluates
task A's sub-network (PackNet's inference): the hidden weights task B was
allowed to train are set to zero, the frozen ones are task A's own values.

Writes ``task_a_eval.json`` into each task-B run, prints a Markdown table
(mean ± std over seeds, by experiment name) and optionally writes it and a bar plot.

Example::

    python scripts/continual_eval.py multirun/continual/task_b multirun/continual/task_b_freeze \\
        --table experiments/continual/results.md --plot experiments/continual/forgetting.png
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

from _figures import emit_table, pyplot, save_figure
from aggregate_reports import find_runs, lookup, markdown_table, summarize

METRICS = ("task_a_accuracy_before_b", "task_a_accuracy_after_b", "task_a_accuracy_subnetwork", "task_b_accuracy")


def task_a_test_set(config: Mapping[str, Any]):
    """Test images and labels (relabelled ``0..K-1``) of task A's classes, loaded as task A's run loaded them."""
    from omegaconf import OmegaConf

    from trainer.run import load_data

    splits = load_data(OmegaConf.create(config["data"]), int(config.get("seed", 0)))
    return splits.x_test, splits.y_test


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of a logits model."""
    logits = model.predict(x, batch_size=1000, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == y))


def evaluate_run(run: Mapping[str, Any], head: str = "out/") -> Dict[str, Any]:
    """Task-A and task-B accuracies of one task-B run (see the module docstring).

    Raises:
      ValueError: the run has no ``model.init_from`` or task A's run lacks ``model.keras``.
    """
    import keras
    from omegaconf import OmegaConf

    init_from = lookup(run["config"], "model.init_from")
    if not init_from:
        raise ValueError(f"{run['dir']}: not a task-B run (no model.init_from in its config)")
    a_dir = os.path.dirname(init_from)  # relative paths: run this from where the runs were started
    a_cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(a_dir, ".hydra", "config.yaml")), resolve=True)
    with open(os.path.join(a_dir, "report.json")) as f:
        a_report = json.load(f)
    x, y = task_a_test_set(a_cfg)

    model = keras.models.load_model(os.path.join(a_dir, "model.keras"), compile=False)
    reloaded = accuracy(model, x, y)  # task A's own model, as a check of the evaluation against its report
    b_weights = dict(np.load(os.path.join(run["dir"], "weights.npz")))
    b_masks = dict(np.load(os.path.join(run["dir"], "masks.npz")))
    shared = []  # (model variable, its path in task B's weights.npz); a loaded model may drop the model name
    for v in model.variables:
        key = next((k for k in b_weights if k == v.path or k.endswith("/" + v.path)), None)
        if key is None:
            raise ValueError(f"{run['dir']}/weights.npz has no variable {v.path!r}; it has {sorted(b_weights)}")
        if f"/{head}" not in f"/{key}":
            shared.append((v, key))
    for v, key in shared:
        v.assign(b_weights[key])
    result = {"task_a_accuracy_before_b": a_report["test_accuracy"],
              "task_a_accuracy_after_b": accuracy(model, x, y),
              "task_b_accuracy": run["report"]["test_accuracy"],
              "task_a_accuracy_reloaded": reloaded,
              "task_a_run": a_dir}
    if any(not m.all() for m in b_masks.values()):
        for v, key in shared:
            trainable = b_masks.get(key)
            if trainable is not None and key.endswith("/kernel"):
                v.assign(np.where(trainable, 0.0, b_weights[key]).astype(b_weights[key].dtype))
        result["task_a_accuracy_subnetwork"] = accuracy(model, x, y)
    return result


def bar_plot(rows, path: str) -> None:
    """Grouped bars: task A before / after B, task A sub-network and task B, per method (mean ± std)."""
    plt = pyplot()
    labels = {"task_a_accuracy_before_b": "task A, before B", "task_a_accuracy_after_b": "task A, after B",
              "task_a_accuracy_subnetwork": "task A, frozen sub-network", "task_b_accuracy": "task B"}
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    width = 0.8 / len(METRICS)
    for i, metric in enumerate(METRICS):
        means = [r[metric][0] if r[metric][2] else float("nan") for r in rows]  # NaN: no bar
        stds = [r[metric][1] for r in rows]
        ax.bar(np.arange(len(rows)) + (i - (len(METRICS) - 1) / 2) * width, means, width, yerr=stds,
               capsize=3, label=labels[metric])
    ax.set_xticks(np.arange(len(rows)), [str(r["x"]) for r in rows])
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    save_figure(fig, path)


def main(argv: Optional[Sequence[str]] = None) -> str:
    """The command line (see the module docstring); returns the Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="task-B run or multirun directories")
    parser.add_argument("--table")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)

    evaluated = []
    for run in find_runs(args.dirs):
        if not lookup(run["config"], "model.init_from"):
            continue
        result = evaluate_run(run)
        with open(os.path.join(run["dir"], "task_a_eval.json"), "w") as f:
            json.dump(result, f, indent=2)
        evaluated.append({"dir": run["dir"], "config": run["config"],
                          "report": {**result, "wall_seconds": run["report"].get("wall_seconds")}})
    if not evaluated:
        raise SystemExit(f"no task-B run (with model.init_from) under {args.dirs}")
    rows = summarize(evaluated, "name", METRICS)
    table = emit_table(markdown_table(rows, METRICS, x_label="task B run"), args.table)
    if args.plot:
        bar_plot(rows, args.plot)
    return table


if __name__ == "__main__":
    main()
