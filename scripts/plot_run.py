#!/usr/bin/env python
"""Plots runs from their TensorBoard event files (read with TensorBoard's EventAccumulator).

    python scripts/plot_run.py RUN_DIR [RUN_DIR ...] [--out DIR]

A RUN_DIR is a run directory (it holds ``tb/``) or any directory above runs,
such as a multirun sweep (``multirun/<name>/<time>``) or ``outputs/``: every
run below it is plotted. PNGs written to ``--out`` (default: ``plots/`` in the
first RUN_DIR):

- ``curves.png``: loss and accuracy against step, train (solid: the mean
  over each logged interval, so no jump at epoch boundaries) and validation
  (dashed, markers) for each run;
- ``sparsity.png``: the final sparsity (fraction of exact zeros) of every
  variable, one bar per run;
- ``accuracy_vs_sparsity.png``: final test accuracy against the model's
  sparsity, one point per run (a sweep over sparsities reads as one curve).

Runs are labelled by the hyperparameters that differ between them (from the
HParams records the runs wrote), else by their directory; a single run's
legend says only train / validation, and its directory is the title.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _figures, also when loaded from its path

import numpy as np  # noqa: E402
from tensorboard.backend.event_processing import event_accumulator as ea  # noqa: E402
from tensorboard.plugins.hparams import metadata as hparams_metadata  # noqa: E402
from tensorboard.util import tensor_util  # noqa: E402

from _figures import pyplot, save_figure  # noqa: E402

plt = pyplot()

WRITERS = ("train", "validation")
Series = Tuple[np.ndarray, np.ndarray]  # (steps int64, values float64)


def find_runs(paths: Sequence[str]) -> List[str]:
    """Run directories (holding ``tb/``) at or below each path, sorted, without duplicates.

    Raises:
      SystemExit: a path does not exist or holds no run.
    """
    runs: List[str] = []
    for path in paths:
        if not os.path.isdir(path):
            raise SystemExit(f"plot_run: {path!r} is not a directory")
        found = sorted(root for root, dirs, _ in os.walk(path) if "tb" in dirs and root not in runs)
        if not found:
            raise SystemExit(f"plot_run: no run (a directory holding tb/) under {path!r}")
        runs += [r for r in found if r not in runs]
    return runs


def _accumulator(path: str) -> Optional[ea.EventAccumulator]:
    if not os.path.isdir(path):
        return None
    acc = ea.EventAccumulator(path, size_guidance={ea.TENSORS: 0, ea.SCALARS: 0})
    acc.Reload()
    return acc


def read_scalars(acc: ea.EventAccumulator) -> Dict[str, Series]:
    """Every scalar series of one TensorBoard run, from ``tf.summary`` (tensors) or v1 scalar events."""
    out: Dict[str, Series] = {}
    tags = acc.Tags()
    for tag in tags.get(ea.SCALARS, []):
        events = acc.Scalars(tag)
        out[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events], dtype=np.float64))
    for tag in tags.get(ea.TENSORS, []):
        if acc.SummaryMetadata(tag).plugin_data.plugin_name != "scalars":
            continue
        events = acc.Tensors(tag)
        values = [float(np.asarray(tensor_util.make_ndarray(e.tensor_proto)).reshape(())) for e in events]
        steps = np.array([e.step for e in events])
        order = np.argsort(steps, kind="stable")
        out[tag] = (steps[order], np.array(values, dtype=np.float64)[order])
    return out


def read_hparams(acc: Optional[ea.EventAccumulator]) -> Dict[str, object]:
    """The hyperparameters of the run's HParams session record (``{}`` if none)."""
    if acc is None:
        return {}
    try:
        content = acc.PluginTagToContent("hparams").get(hparams_metadata.SESSION_START_INFO_TAG)
    except KeyError:  # no hparams plugin data in this run
        return {}
    if content is None:
        return {}
    info = hparams_metadata.parse_session_start_info_plugin_data(content)
    out: Dict[str, object] = {}
    for name, value in info.hparams.items():
        kind = value.WhichOneof("kind")
        out[name] = getattr(value, kind) if kind else None
    return out


def read_run(run_dir: str) -> Dict[str, object]:
    """``{"dir", "scalars": {writer: {tag: (steps, values)}}, "hparams": {...}}`` of one run.

    ``writer`` is ``train`` or ``validation``; the hyperparameters come from the session record in
    ``tb/validation`` (``tb/hparams`` in runs of earlier versions).
    """
    tb = os.path.join(run_dir, "tb")
    scalars = {}
    for writer in WRITERS:
        acc = _accumulator(os.path.join(tb, writer))
        scalars[writer] = read_scalars(acc) if acc is not None else {}
    hparams = read_hparams(_accumulator(os.path.join(tb, "validation"))) or read_hparams(
        _accumulator(os.path.join(tb, "hparams")))
    return {"dir": run_dir, "scalars": scalars, "hparams": hparams}


def _fmt(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def labels_for(runs: List[Dict[str, object]], root: str, max_keys: int = 3) -> List[str]:
    """Short labels: up to ``max_keys`` hyperparameters that every run has and whose values differ
    (``random=0.9``), else the directory relative to ``root``; ``[""]`` for a single run (its
    directory is the figure's title, and the legend says only train / validation)."""
    if len(runs) == 1:
        return [""]
    keys = sorted(set.intersection(*(set(r["hparams"]) for r in runs))) if runs else []
    varying = [k for k in keys if len({_fmt(r["hparams"][k]) for r in runs}) > 1][:max_keys]
    labels = []
    for r in runs:
        if varying:
            labels.append(", ".join(f"{k.split('.')[-1]}={_fmt(r['hparams'][k])}" for k in varying))
        else:
            rel = os.path.relpath(r["dir"], root)
            labels.append(rel if rel != "." else os.path.basename(os.path.abspath(r["dir"])))
    return labels


def interval_means(steps: np.ndarray, values: np.ndarray, epoch_ends: Sequence[int]) -> np.ndarray:
    """Per-interval means from running means that restart at every epoch end.

    The trainer logs a metric's mean since the start of the epoch; plotted as
    is, a curve jumps at every epoch boundary. The mean over the steps between
    two logged points of one epoch is ``(m_i * n_i - m_j * n_j) / (n_i - n_j)``
    with ``n`` the steps since the epoch began (exact for equal batch sizes;
    the first point of an epoch is its own interval).

    Args:
      steps, values: the logged steps (increasing) and running means.
      epoch_ends: the steps at which epochs ended (the ``epoch`` scalar's steps).
    """
    ends = np.sort(np.asarray(list(epoch_ends), dtype=np.int64))
    out = np.empty(len(values), dtype=np.float64)
    prev_step, prev_value, prev_start = None, None, None
    for i, (step, value) in enumerate(zip(steps, values)):
        before = ends[ends < step]
        start = int(before[-1]) if len(before) else 0
        if prev_step is not None and prev_start == start and prev_step > start:
            out[i] = (value * (step - start) - prev_value * (prev_step - start)) / (step - prev_step)
        else:
            out[i] = value
        prev_step, prev_value, prev_start = int(step), float(value), start
    return out


def train_series(run: Dict[str, object], metric: str) -> Optional[Series]:
    """A run's train ``metric`` as per-interval means (see :func:`interval_means`); ``None`` if not logged."""
    scalars = run["scalars"]["train"]
    if metric not in scalars:
        return None
    steps, values = scalars[metric]
    ends = scalars["epoch"][0] if "epoch" in scalars else []
    return steps, interval_means(steps, values, ends)


def _last(series: Optional[Series]) -> Optional[float]:
    return None if series is None or not len(series[1]) else float(series[1][-1])


def plot_curves(runs, labels, path: str) -> Optional[str]:
    """Loss and accuracy against step (train solid, validation dashed); ``None`` if no run has a loss."""
    metrics = [m for m in ("loss", "accuracy") if any(m in r["scalars"][w] for r in runs for w in WRITERS)]
    if "loss" not in metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes[0], metrics):
        for i, (run, label) in enumerate(zip(runs, labels)):
            color = colors[i % len(colors)]
            train = train_series(run, metric)
            if train is not None:
                steps, values = train
                ax.plot(steps, values, color=color, marker="o" if len(steps) == 1 else None, markersize=3,
                        label=f"{label} train".strip())
            if metric in run["scalars"]["validation"]:
                ax.plot(*run["scalars"]["validation"][metric], color=color, linestyle="--", marker="o",
                        markersize=3, label=f"{label} validation".strip())
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if len(runs) == 1:
        fig.suptitle(runs[0]["dir"], fontsize=8)
    return save_figure(fig, path, dpi=120)


def plot_sparsity(runs, labels, path: str) -> Optional[str]:
    """Final ``masks/<variable>/sparsity`` of every variable, grouped bars per run; ``None`` if none logged."""
    variables = sorted({t[len("masks/"):-len("/sparsity")] for r in runs for t in r["scalars"]["train"]
                        if t.startswith("masks/") and t.endswith("/sparsity")})
    if not variables:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(variables) * max(1, len(runs)) ** 0.5))
    height = 0.8 / len(runs)
    y = np.arange(len(variables))
    for i, (run, label) in enumerate(zip(runs, labels)):
        values = [_last(run["scalars"]["train"].get(f"masks/{v}/sparsity")) or 0.0 for v in variables]
        ax.barh(y + i * height, values, height=height, label=label)
    ax.set_yticks(y + height * (len(runs) - 1) / 2, variables, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("sparsity (fraction of exact zeros) at the last step")
    ax.set_title("per-variable sparsity")
    ax.grid(axis="x", alpha=0.3)
    if any(labels):
        ax.legend(fontsize=7)
    return save_figure(fig, path, dpi=120)


def plot_accuracy_vs_sparsity(runs, labels, path: str) -> Optional[str]:
    """Final test accuracy (else validation accuracy) against ``model/sparsity``, one point per run."""
    points = []
    for run, label in zip(runs, labels):
        x = _last(run["scalars"]["train"].get("model/sparsity"))
        val = run["scalars"]["validation"]
        y = _last(val.get("test/accuracy"))
        y = _last(val.get("accuracy")) if y is None else y
        if x is not None and y is not None:
            points.append((x, y, label))
    if not points:
        return None
    points.sort()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    for x, y, label in points:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.ticklabel_format(axis="both", useOffset=False)
    ax.set_xlabel("model sparsity (fraction of exact zeros)")
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy against sparsity")
    ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=120)


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    """Runs the command line; returns the paths of the PNGs written."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories or directories above runs")
    parser.add_argument("--out", help="output directory (default: RUN_DIR/plots of the first RUN_DIR)")
    args = parser.parse_args(argv)
    run_dirs = find_runs(args.run_dirs)
    runs = [read_run(d) for d in run_dirs]
    labels = labels_for(runs, args.run_dirs[0])
    out = args.out or os.path.join(args.run_dirs[0], "plots")
    os.makedirs(out, exist_ok=True)
    written = [p for p in (
        plot_curves(runs, labels, os.path.join(out, "curves.png")),
        plot_sparsity(runs, labels, os.path.join(out, "sparsity.png")),
        plot_accuracy_vs_sparsity(runs, labels, os.path.join(out, "accuracy_vs_sparsity.png")),
    ) if p]
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
