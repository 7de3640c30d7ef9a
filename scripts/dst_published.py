"""The table and plot of experiments/dst_published: our SET, RigL, Sparse Momentum and SNIP beside published numbers.

Reads every ``report.json`` below the given directories (``aggregate_reports.find_runs``),
groups the runs by experiment ``name`` and the % of kernel weights kept (``1 -
elements.random`` for a regrow rule, else the non-zero kernel weights at the end), and writes a
Markdown table (mean ± sample std over seeds, ``n`` per cell, the published value and our
difference) and a plot (test accuracy against weights kept, ours
solid with the seeds' spread, published dashed); ``--curves`` also prints, for the runs that logged the
test set every epoch, the test accuracy at other stopping points (``curve_views``). Example::

    python scripts/dst_published.py /tmp/dst_runs --exclude '*/ablation_set_final_update/*' \\
        --table experiments/dst_published/results.md --plot experiments/dst_published/accuracy.png
"""

from __future__ import annotations

import argparse
import fnmatch
import statistics
from typing import Dict, List, Sequence

from _figures import pyplot, save_figure
from aggregate_reports import find_runs, key_value, metric_value

# Test accuracy in %. SET and Sparse Momentum: TimDettmers/sparse_learning, results/MNIST_sparse_summary.csv
# (columns "SET" and "Sparse Momentum", rows sparsity 0.9 / 0.95 / 0.98 / 0.99); SNIP: Lee et al. 2019, Table 1
# (LeNet-300-100: 1.6 % error at 95 % sparsity, 2.4 % at 98 %).
SET = {10.0: 98.39, 5.0: 98.14, 2.0: 97.74, 1.0: 95.80}
SNIP = {5.0: 98.4, 2.0: 97.6}
PUBLISHED: Dict[str, Dict[float, float]] = {
    "dst_lenet_set": SET, "dst_lenet_sm": {10.0: 98.67, 5.0: 98.53, 2.0: 98.20, 1.0: 97.53},
    "dst_lenet_rigl": SET, "snip": SNIP,  # RigL's goal: at least the published SET
    "dst_lenet_rigl_erk": SET, "dst_lenet_set_out50": SET, "dst_lenet_set_every600": SET,
    "dst_lenet_set_sparse_learning": SET, "snip_test_every_epoch": SNIP, "snip_fresh_init": SNIP,
    "snip_biases": SNIP, "snip_fresh_init_biases": SNIP, "snip_code_defaults": SNIP, "snip_code_defaults_10k": SNIP,
    "snip_long": SNIP, "snip_fresh_init_long": SNIP,
    "dst_lenet_sm_reset_slots": {2.0: 98.20}, "dst_lenet_sm_masked": {2.0: 98.20},
}
LABELS = {"dst_lenet_sm": "Sparse Momentum", "dst_lenet_set": "SET", "dst_lenet_rigl": "RigL", "snip": "SNIP",
          "dst_lenet_rigl_erk": "ablation: RigL, ERK densities",
          "dst_lenet_set_out50": "ablation: SET, output layer 50 % dense",
          "dst_lenet_set_every600": "ablation: SET, rewiring every 600 steps",
          "dst_lenet_set_sparse_learning": "ablation: SET in sparse_learning's recipe",
          "snip_test_every_epoch": "ablation: SNIP, test accuracy at the best validation epoch",
          "snip_fresh_init": "ablation: SNIP, kept weights freshly re-initialised",
          "snip_biases": "ablation: SNIP, biases ranked too (snip-public)",
          "snip_fresh_init_biases": "ablation: SNIP, fresh re-initialisation and biases ranked",
          "snip_code_defaults": "ablation: SNIP, snip-public's defaults (no momentum, constant rate)",
          "snip_code_defaults_10k": "ablation: SNIP, snip-public's defaults and 10,260 iterations",
          "snip_long": "ablation: SNIP, 250 epochs (135,000 iterations)",
          "snip_fresh_init_long": "ablation: SNIP, fresh re-initialisation and 250 epochs",
          "dst_lenet_sm_reset_slots": "ablation: Sparse Momentum, reset_slots true",
          "dst_lenet_sm_masked": "ablation: Sparse Momentum, frozen_gradients mask"}
GOAL = {"dst_lenet_sm": "within 0.2 of published SM", "dst_lenet_set": "within 0.2 of published SET",
        "dst_lenet_rigl": ">= published SET", "snip": "within 0.3 of published SNIP",
        "dst_lenet_rigl_erk": ">= published SET"}
PLOTTED = ("dst_lenet_sm", "dst_lenet_set", "dst_lenet_rigl", "snip", "dst_lenet_rigl_erk")
METRIC = {"snip_test_every_epoch": "early_stopping.test_accuracy"}  # the test accuracy at the lowest val_loss
STEPS_PER_EPOCH = 540  # 54,000 training images / batch 100


def kept(run: dict) -> float:
    """The % of kernel weights kept: ``1 - freeze.rules.sparse.elements.random`` (the trainable count a regrow rule
    keeps; a regrown weight may still be exactly 0 at the end), else the non-zero kernel weights (SNIP's masks)."""
    frozen = key_value(run, "freeze.rules.sparse.elements.random")
    return round(100.0 * (1.0 - float(frozen)), 1) if frozen is not None else key_value(run, "kept_percent")


def groups(dirs: Sequence[str], exclude: Sequence[str] = ()) -> Dict[str, Dict[float, List[dict]]]:
    """``{name: {kept: [run, ...]}}`` of every completed run below ``dirs`` whose directory matches no ``exclude``."""
    out: Dict[str, Dict[float, List[dict]]] = {}
    for run in find_runs(dirs):
        if run["report"].get("status") != "completed" or any(fnmatch.fnmatch(run["dir"], p) for p in exclude):
            continue
        out.setdefault(key_value(run, "name"), {}).setdefault(kept(run), []).append(run)
    return out


def table(found: Dict[str, Dict[float, List[dict]]]) -> str:
    """One Markdown line per (method, density): ours, n, seeds, published, difference, goal, wall time."""
    lines = ["| method | kept | ours: test accuracy % (mean ± std) | n | seeds | published | ours - published "
             "| goal | wall time per run (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for name in [n for n in LABELS if n in found] + sorted(set(found) - set(LABELS)):
        for kept in sorted(found[name], reverse=True):
            runs = found[name][kept]
            values = [metric_value(r, METRIC.get(name, "test_accuracy")) for r in runs]
            mean = statistics.fmean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            seeds = ",".join(str(key_value(r, "seed")) for r in runs)
            wall = statistics.fmean(float(r["report"]["wall_seconds"]) for r in runs)
            pub = PUBLISHED.get(name, {}).get(kept)
            diff = "" if pub is None else f"{mean - pub:+.2f}"
            lines.append(f"| {LABELS.get(name, name)} | {kept:g} % | {mean:.2f} ± {std:.2f} | {len(values)} | {seeds} "
                         f"| {'' if pub is None else f'{pub:.2f}'} | {diff} | {GOAL.get(name, '')} | {wall:.0f} |")
    return "\n".join(lines) + "\n"


def plot(found: Dict[str, Dict[float, List[dict]]], path: str) -> None:
    """Test accuracy against kept % (log x): ours solid with min-max bars, published dashed, one colour per method."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    floor, off = 94.0, 0  # lower points are marked at the bottom edge with their value, one label above the other
    for i, name in enumerate(n for n in PLOTTED if n in found):
        color = f"C{i}"
        xs = sorted(found[name])
        vals = [[metric_value(r, "test_accuracy") for r in found[name][x]] for x in xs]
        means = [statistics.fmean(v) for v in vals]
        low = [m - min(v) for m, v in zip(means, vals)]
        high = [max(v) - m for m, v in zip(means, vals)]
        ax.errorbar(xs, means, yerr=[low, high], color=color, marker="o", capsize=3,
                    label=f"ours: {LABELS[name].replace('ablation: ', '')}")
        if name in ("dst_lenet_sm", "dst_lenet_set", "snip"):
            pub = sorted(PUBLISHED[name].items())
            ax.plot([p[0] for p in pub], [p[1] for p in pub], color=color, linestyle="--", marker="x",
                    label=f"published: {LABELS[name]}")
        for x, mean in zip(xs, means):
            if mean < floor:
                ax.annotate(f"{LABELS[name]} {x:g} %: {mean:.1f} (off scale)", (x, floor),
                            xytext=(x * 1.05, floor + 0.3 + 0.35 * off), color=color, fontsize=8,
                            arrowprops={"arrowstyle": "->", "color": color})
                off += 1
    ax.set_ylim(floor, 99.0)
    ax.set_xscale("log")
    ax.set_xticks([1, 2, 5, 10])
    ax.set_xticklabels(["1", "2", "5", "10"])
    ax.set_xlabel("kernel weights kept (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("LeNet-300-100 on MNIST, the authors' recipes, 100 epochs")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def curve_views(run: dict, lengths: Sequence[int] = (30000, 40000, 54000, 135000)) -> Dict[str, float]:
    """Test accuracies (%) of one run that logged the test set every epoch (``log.test_every_epoch=true``).

    ``final``: after the last epoch; ``best_val``: at the epoch of lowest validation loss; ``max``: the best
    epoch. For each ``T`` in ``lengths``, the same recipe stopped after ``T`` steps (the learning-rate
    schedule is by steps, so a shorter run is a prefix of this one): ``at_T``, its accuracy at the last epoch
    ending at or before ``T``, and ``ckpt_T``, the maximum over the epochs ending in ``(T - 5000, T]``: an
    epoch-granular stand-in for what snip-public's ``test.py`` reports (the best test accuracy among the 5
    checkpoints that ``tf.train.Saver`` keeps, one every 1,000 steps: steps ``T - 4000 .. T``). A ``T`` past
    the run's last epoch is left out. Empty if the run has no per-epoch test accuracy.
    """
    history = run["report"].get("history") or []
    acc = [100.0 * float(h["test_accuracy"]) for h in history if "test_accuracy" in h]
    if len(acc) != len(history) or not acc:
        return {}
    out = {"final": acc[-1], "max": max(acc)}
    best = (run["report"].get("early_stopping") or {}).get("test_accuracy")
    if best is not None:
        out["best_val"] = 100.0 * float(best)
    for t in lengths:
        if t > len(acc) * STEPS_PER_EPOCH:
            continue
        last = t // STEPS_PER_EPOCH  # epochs 1..last end at or before step t
        first = max(1, -(-(t - 5000 + 1) // STEPS_PER_EPOCH))  # first epoch ending after step t - 5000
        out[f"at_{t}"] = acc[last - 1]
        out[f"ckpt_{t}"] = max(acc[first - 1:last])
    return out


def curves(found: Dict[str, Dict[float, List[dict]]]) -> str:
    """One Markdown line per run with per-epoch test accuracies: the views of :func:`curve_views`."""
    rows = []
    for name in sorted(found):
        for kept in sorted(found[name], reverse=True):
            for run in found[name][kept]:
                views = curve_views(run)
                if views:
                    rows.append((f"{LABELS.get(name, name)}", f"{kept:g} %", str(key_value(run, "seed")), views))
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for row in rows for k in row[3]))  # a shorter run leaves its longer T blank
    lines = ["| run | kept | seed | " + " | ".join(keys) + " |", "|---" * (3 + len(keys)) + "|"]
    lines += [f"| {a} | {b} | {c} | " + " | ".join(f"{v[k]:.2f}" if k in v else "" for k in keys) + " |"
              for a, b, c, v in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--table")
    parser.add_argument("--plot")
    parser.add_argument("--exclude", action="append", default=[], help="a glob over run directories to leave out")
    parser.add_argument("--curves", action="store_true", help="also print, for every run that logged the test "
                        "set each epoch, its test accuracy at other stopping points (curve_views)")
    args = parser.parse_args()
    found = groups(args.dirs, args.exclude)
    text = table(found)
    if args.curves:
        print(curves(found))
    print(text)
    if args.table:
        with open(args.table, "w") as f:
            f.write(text)
    if args.plot:
        plot(found, args.plot)


if __name__ == "__main__":
    main()
