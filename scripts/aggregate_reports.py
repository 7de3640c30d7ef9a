"""Aggregates the ``report.json`` files of one or more run directories into a table and a plot.

Every directory is searched recursively for ``report.json``; a run's config is
read from its ``.hydra/config.yaml`` (CLI runs) or ``config.yaml`` (runs started
by the study scripts). Runs are grouped by a series key and an x key, and each
metric is summarised as mean ± sample standard deviation over the group (the
seeds). Metrics whose name contains ``accuracy`` are shown in percent.

Keys are dotted paths into the run's config (``freeze.rules.sparse.elements.random``,
``name``) or ``kept_percent``: the percentage of kernel weights that are
non-zero at the end of training, rounded to 0.1 (biases are not counted).
Metrics are dotted paths into ``report.json`` (``test_accuracy``,
``early_stopping.test_accuracy``).

Example (study 1, experiments/random_sparsity)::

    python scripts/aggregate_reports.py multirun/random_sparsity --x kept_percent \\
        --metric test_accuracy --metric early_stopping.test_accuracy \\
        --published 100=98.69 --published 10=98.39 --published 5=98.14 --published 2=97.74 \\
        --table experiments/random_sparsity/results.md --plot experiments/random_sparsity/accuracy.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from _figures import emit_table, finish_axes, pyplot, save_figure


def find_runs(paths: Iterable[str]) -> List[Dict[str, Any]]:
    """Every run below ``paths``: ``{"dir", "report", "config"}`` per ``report.json`` found.

    ``config`` is the run's config as a plain dict (empty when none is stored).
    Runs are sorted by directory.
    """
    from omegaconf import OmegaConf

    runs = []
    for root in paths:
        for directory, _, files in os.walk(root):
            if "report.json" not in files:
                continue
            with open(os.path.join(directory, "report.json")) as f:
                report = json.load(f)
            config: Dict[str, Any] = {}
            for name in (os.path.join(".hydra", "config.yaml"), "config.yaml"):
                if os.path.isfile(os.path.join(directory, name)):
                    loaded = OmegaConf.load(os.path.join(directory, name))
                    try:
                        config = OmegaConf.to_container(loaded, resolve=True)
                    except Exception:  # an interpolation that needs Hydra's resolvers
                        config = OmegaConf.to_container(loaded, resolve=False)
                    break
            runs.append({"dir": directory, "report": report, "config": config})
    return sorted(runs, key=lambda r: r["dir"])


def lookup(mapping: Any, dotted: str) -> Any:
    """``mapping["a"]["b"]`` for ``"a.b"``; ``None`` when a part is missing."""
    for part in dotted.split("."):
        if not isinstance(mapping, Mapping) or part not in mapping:
            return None
        mapping = mapping[part]
    return mapping


def kept_percent(report: Mapping[str, Any]) -> float:
    """Percentage of kernel weights that are non-zero, from a report's per-variable sparsity."""
    total = kept = 0.0
    for row in report.get("variables", []):
        if row["path"].endswith("/kernel"):
            size = float(np.prod(row["shape"]))
            total += size
            kept += size * (1.0 - row["sparsity"])
    return round(100.0 * kept / total, 1) if total else float("nan")


def key_value(run: Mapping[str, Any], key: Optional[str]) -> Any:
    """A run's value for a grouping key (see the module docstring); ``None`` for no key."""
    if key is None:
        return None
    if key == "kept_percent":
        return kept_percent(run["report"])
    return lookup(run["config"], key)


def metric_value(run: Mapping[str, Any], metric: str) -> Optional[float]:
    """A metric of a run's report (in percent for accuracies); ``None`` when absent."""
    value = lookup(run["report"], metric)
    if value is None:
        return None
    return 100.0 * float(value) if "accuracy" in metric else float(value)


def summarize(runs: Sequence[Mapping[str, Any]], x: str, metrics: Sequence[str],
              series: Optional[str] = None) -> List[Dict[str, Any]]:
    """Groups runs by ``(series, x)`` and summarises each metric.

    Returns:
      One row per group, sorted by series then descending x:
      ``{"series", "x", "n", "wall_seconds", "<metric>": (mean, std, values)}``;
      ``std`` is the sample standard deviation (0 for a single run).
    """
    groups: Dict[tuple, List[Mapping[str, Any]]] = {}
    for run in runs:
        groups.setdefault((str(key_value(run, series)), key_value(run, x)), []).append(run)
    rows = []
    for (s, xv), members in groups.items():
        row: Dict[str, Any] = {"series": s, "x": xv, "n": len(members),
                               "wall_seconds": sum(float(m["report"].get("wall_seconds") or 0) for m in members)}
        for metric in metrics:
            values = [v for v in (metric_value(m, metric) for m in members) if v is not None]
            mean = statistics.fmean(values) if values else float("nan")
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            row[metric] = (mean, std, values)
        rows.append(row)

    def order(row):
        xv = row["x"]
        return (row["series"], -xv if isinstance(xv, (int, float)) else 0, str(xv))

    return sorted(rows, key=order)


def _fmt_x(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], *, x_label: str = "x",
                   series_label: Optional[str] = None, published: Optional[Mapping[str, float]] = None,
                   digits: int = 2) -> str:
    """A Markdown table: one line per group, ``mean ± std (n)`` per metric, and an optional published column.

    ``published`` maps a formatted x value (e.g. ``"10"``) to a published number.
    """
    head = ([series_label] if series_label else []) + [x_label, "seeds"] + list(metrics)
    if published:
        head.append("published")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = ([row["series"]] if series_label else []) + [_fmt_x(row["x"]), str(row["n"])]
        for metric in metrics:
            mean, std, values = row[metric]
            cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}" if values else "-")
        if published:
            value = published.get(_fmt_x(row["x"]))
            cells.append("-" if value is None else f"{value:g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_wide_table(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], *, x_label: str = "x",
                        x_values: Optional[Sequence[str]] = None, digits: int = 2) -> str:
    """A Markdown table with one line per x and one column per (series, metric): series side by side.

    ``x_values`` (formatted, e.g. ``["100", "51.3"]``) keeps only those lines, in that order.
    """
    series = list(dict.fromkeys(r["series"] for r in rows))
    xs = list(dict.fromkeys(_fmt_x(r["x"]) for r in rows)) if x_values is None else list(x_values)
    by = {(r["series"], _fmt_x(r["x"])): r for r in rows}
    head = [x_label] + [f"{s} {m}" for s in series for m in metrics] + ["seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for x in xs:
        cells, seeds = [x], []
        for s in series:
            row = by.get((s, x))
            seeds.append(str(row["n"]) if row else "-")
            for m in metrics:
                if row and row[m][2]:
                    cells.append(f"{row[m][0]:.{digits}f} ± {row[m][1]:.{digits}f}")
                else:
                    cells.append("-")
        lines.append("| " + " | ".join(cells + ["/".join(seeds)]) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Mapping[str, Any]], metric: str, path: str, *, xlabel: str, ylabel: str,
         title: str = "", published: Optional[Mapping[str, float]] = None, log_x: bool = False,
         invert_x: bool = False) -> None:
    """Writes a PNG: ``metric`` mean ± std against x, one line per series, plus published points."""
    import matplotlib.ticker

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for s in dict.fromkeys(r["series"] for r in rows):
        pts = sorted((float(r["x"]), r[metric][0], r[metric][1]) for r in rows if r["series"] == s and r[metric][2])
        if not pts:
            continue
        xs, means, stds = zip(*pts)
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=None if s == "None" else s)
    if published:
        xs = [float(k) for k in published]
        ax.plot(xs, list(published.values()), "k*", markersize=9, linestyle="none", label="published")
    if log_x:
        ax.set_xscale("log")
        xs = [float(r["x"]) for r in rows] + [float(k) for k in (published or {})]
        ax.set_xticks([t for t in (100, 50, 20, 10, 5, 2, 1, 0.5) if min(xs) <= t <= max(xs)])
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if invert_x:
        ax.invert_xaxis()
    finish_axes(ax, xlabel=xlabel, ylabel=ylabel, title=title)
    save_figure(fig, path)


def plot_history(runs: Sequence[Mapping[str, Any]], metric: str, path: str, *, series: Optional[str] = None,
                 ylabel: str = "", title: str = "") -> None:
    """Writes a PNG of a per-epoch ``history`` metric (mean ± std over runs), one line per series."""
    import matplotlib.ticker

    plt = pyplot()

    groups: Dict[str, List[List[float]]] = {}
    for run in runs:
        scale = 100.0 if "accuracy" in metric else 1.0
        curve = [scale * h[metric] for h in run["report"].get("history", []) if metric in h]
        groups.setdefault(str(key_value(run, series)), []).append(curve)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for s, curves in groups.items():
        length = min(len(c) for c in curves)
        values = np.array([c[:length] for c in curves])
        epochs = np.arange(1, length + 1)
        mean, std = values.mean(axis=0), values.std(axis=0, ddof=1) if len(values) > 1 else 0 * values[0]
        ax.plot(epochs, mean, marker=".", label=None if s == "None" else s)
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.25)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    finish_axes(ax, xlabel="epoch", ylabel=ylabel or metric, title=title)
    save_figure(fig, path)


def parse_published(items: Sequence[str]) -> Dict[str, float]:
    """``["10=98.39", ...]`` -> ``{"10": 98.39, ...}``.

    Raises:
      ValueError: an item is not ``X=VALUE`` with a numeric value.
    """
    out = {}
    for item in items or []:
        x, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--published expects X=VALUE, got {item!r}")
        out[_fmt_x(float(x))] = float(value)
    return out


def main(argv: Optional[Sequence[str]] = None) -> str:
    """The command line; returns the Markdown table (also printed and written with ``--table``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="run or multirun directories (searched recursively)")
    parser.add_argument("--x", required=True, help="config key or kept_percent: the table rows / plot x axis")
    parser.add_argument("--series", default=None, help="config key that splits runs into lines (e.g. name)")
    parser.add_argument("--metric", action="append", required=True, help="report key; the first one is plotted")
    parser.add_argument("--published", action="append", default=[], help="X=VALUE, a published number at x")
    parser.add_argument("--wide", action="store_true", help="one line per x, the series side by side")
    parser.add_argument("--x-values", nargs="+", help="with --wide: only these x values, in this order")
    parser.add_argument("--table", help="write the Markdown table here")
    parser.add_argument("--plot", help="write the PNG plot here")
    parser.add_argument("--history-plot", help="also write a PNG of --history-metric per epoch here")
    parser.add_argument("--history-metric", default="test_accuracy", help="a key of report.json's history rows")
    parser.add_argument("--xlabel", default=None)
    parser.add_argument("--ylabel", default=None)
    parser.add_argument("--title", default="")
    parser.add_argument("--log-x", action="store_true")
    parser.add_argument("--invert-x", action="store_true")
    args = parser.parse_args(argv)

    runs = find_runs(args.dirs)
    if not runs:
        raise SystemExit(f"no report.json found under {args.dirs}")
    rows = summarize(runs, args.x, args.metric, series=args.series)
    published = parse_published(args.published)
    xlabel = args.xlabel or ("kernel weights kept (%)" if args.x == "kept_percent" else args.x)
    if args.wide:
        table = markdown_wide_table(rows, args.metric, x_label=xlabel, x_values=args.x_values)
    else:
        table = markdown_table(rows, args.metric, x_label=xlabel, series_label=args.series, published=published)
    wall = sum(r["wall_seconds"] for r in rows)
    table += f"\n{len(runs)} runs; training wall time (sum of report.json wall_seconds): {wall / 60:.1f} min\n"
    emit_table(table, args.table)
    if args.plot:
        ylabel = args.ylabel or (args.metric[0] + (" (%)" if "accuracy" in args.metric[0] else ""))
        plot(rows, args.metric[0], args.plot, xlabel=xlabel, ylabel=ylabel, title=args.title,
             published=published, log_x=args.log_x, invert_x=args.invert_x)
    if args.history_plot:
        metric = args.history_metric
        plot_history(runs, metric, args.history_plot, series=args.series, title=args.title,
                     ylabel=metric + (" (%)" if "accuracy" in metric else ""))
    return table


if __name__ == "__main__":
    main()
