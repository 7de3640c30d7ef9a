"""Sweeps: the value a job returns to Hydra's sweeper, and the table of every job at the end of a multirun.

``main`` returns :func:`optimized_value` (``optimized_metric`` in the config),
which the Optuna sweeper maximizes or minimizes. :class:`SweepResults`, a
Hydra callback registered in ``configs/config.yaml``, reads every job folder of
the sweep once the multirun ends (whatever the launcher: basic, joblib,
processes or submitit, whose jobs run in other processes) and prints and writes
``sweep_results.csv`` / ``sweep_results.md``: each job's overrides, status and
final metrics, best first (the pattern of lightning-hydra-template's
``optimized_metric``). Job folders are named ``<job number>_<short hash of its
overrides>`` (``hydra.sweep.subdir``, the ``short_hash`` resolver registered
here); the table gives each folder's overrides in full.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
from typing import Any, Dict, List, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

__all__ = ["SweepResults", "job_rows", "metric_value", "optimized_value", "print_table", "rank", "short_override",
           "short_hash", "split_overrides", "summarize_sweep", "write_error", "write_tables"]

try:  # Hydra >= 1.1
    from hydra.experimental.callback import Callback as HydraCallback
except ImportError:  # pragma: no cover - hydra-core is a dependency
    HydraCallback = object

log = logging.getLogger("trainer")

def short_hash(text: Any) -> str:
    """The first 8 hex digits of the SHA-256 of ``str(text)``: a job folder's name from its overrides."""
    return hashlib.sha256(str(text).encode("utf-8")).hexdigest()[:8]


if not OmegaConf.has_resolver("short_hash"):  # ${short_hash:...} in configs/config.yaml's hydra.sweep.subdir
    OmegaConf.register_new_resolver("short_hash", short_hash)

METRIC_COLUMNS = ("test_accuracy", "test_loss", "val_accuracy", "val_loss", "steps", "wall_seconds")
ERROR_FILE = "error.txt"


def metric_value(result: Mapping[str, Any], name: str) -> Optional[float]:
    """A metric of a ``report.json`` dict: a top-level key, else the last epoch's (``val_accuracy``, ``val_loss``).

    Returns:
      The value as a float, or ``None`` when the report does not have it.
    """
    value = result.get(name)
    if value is None:
        history = result.get("history") or []
        value = history[-1].get(name) if history else None
    return None if value is None or isinstance(value, (dict, list, str)) else float(value)


def optimized_value(cfg: DictConfig, result: Optional[Mapping[str, Any]]) -> Optional[float]:
    """What a job returns to the sweeper: ``cfg.optimized_metric`` of its report (``None`` when unset).

    A failed job, or a run stopped before the first validation of a
    ``val_*`` metric, returns ``nan``: the sweeper of
    ``hydra/sweeper=optuna_safe`` records it as a failed trial
    (``hydra_plugins/trainer_sweep/optuna_sweeper.py``).

    Raises:
      ValueError: the metric is configured but the report has no such key.
    """
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if result is None:
        return float("nan")
    value = metric_value(result, str(name))
    if value is None and str(name).startswith("val_") and not result.get("history"):
        log.warning("optimized_metric=%s: the run ended before its first epoch's validation; returning nan", name)
        return float("nan")
    if value is None:
        raise ValueError(f"optimized_metric={name!r} is not in the run's report; use a report.json key such as "
                         "test_accuracy, or val_accuracy / val_loss (the last epoch's)")
    return value


def write_error(run_dir: str, message: str, overrides: Optional[List[str]] = None) -> None:
    """Leaves a failed job's one-line error in its folder (for the sweep table).

    A job refused before its records were written (``hydra.output_subdir`` is
    null, see run.py) also gets ``.hydra/overrides.yaml`` from ``overrides``,
    so that :func:`job_rows` lists it; an existing one is left as it is.
    """
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, ERROR_FILE), "w") as f:
        f.write(message + "\n")
    overrides_file = os.path.join(run_dir, ".hydra", "overrides.yaml")
    if overrides is not None and not os.path.exists(overrides_file):
        os.makedirs(os.path.dirname(overrides_file), exist_ok=True)
        OmegaConf.save(OmegaConf.create([str(o) for o in overrides]), overrides_file)


def job_rows(sweep_dir: str) -> List[Dict[str, Any]]:
    """One row per job folder of a sweep (folders holding ``.hydra/overrides.yaml``), in job order.

    Each row: ``job`` (folder name), ``overrides`` (the job's command-line
    overrides joined by spaces), ``status`` (``completed``, ``interrupted``,
    ``failed: <error>``, or ``no report``; ``completed; failed: <error>`` for a
    run whose value the sweeper could not use, e.g. ``nan``) and
    :data:`METRIC_COLUMNS`.
    """
    rows = []
    for name in sorted(os.listdir(sweep_dir), key=lambda n: (len(n.split("_")[0]), n)):
        job = os.path.join(sweep_dir, name)
        overrides_file = os.path.join(job, ".hydra", "overrides.yaml")
        if not os.path.isfile(overrides_file):
            continue
        overrides = [short_override(str(o)) for o in OmegaConf.load(overrides_file)]
        row: Dict[str, Any] = {"job": name, "overrides": " ".join(overrides), "status": "no report"}
        report_file = os.path.join(job, "report.json")
        error_file = os.path.join(job, ERROR_FILE)
        error = None
        if os.path.isfile(error_file):
            with open(error_file) as f:
                error = "failed: " + f.read().strip()
        if os.path.isfile(report_file):
            with open(report_file) as f:
                report = json.load(f)
            row["status"] = str(report.get("status")) + (f"; {error}" if error else "")
            for column in METRIC_COLUMNS:
                row[column] = metric_value(report, column)
        elif error:
            row["status"] = error
        rows.append(row)
    return rows


LONG_FLOAT = re.compile(r"^(?P<key>[^=]+=)(?P<value>[-+]?\d*\.\d{5,}(?:[eE][-+]?\d+)?)$")


def short_override(override: str) -> str:
    """``key=value`` with a float value of 5 or more decimals written with 4 significant digits.

    Optuna's draws (``optimizer.learning_rate=0.0012345678901234``) would
    otherwise wrap every row of the table; other overrides are returned as given.
    """
    match = LONG_FLOAT.match(override)
    return f"{match['key']}{float(match['value']):.4g}" if match else override


def _format(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1:
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4f}"
    return str(value)


def split_overrides(rows: List[Dict[str, Any]]) -> tuple:
    """``(common, varying)``: overrides every job shares, and per row the ones that differ between jobs."""
    lists = [row["overrides"].split() for row in rows]
    common = [o for o in lists[0] if all(o in other for other in lists[1:])] if lists else []
    return common, [" ".join(o for o in each if o not in common) for each in lists]


def rank(rows: List[Dict[str, Any]], metric: Optional[str], direction: str = "maximize") -> List[Dict[str, Any]]:
    """The rows best first by ``metric`` (jobs without it last); unchanged when ``metric`` is ``None``."""
    if not metric:
        return rows
    sign = -1.0 if direction == "maximize" else 1.0
    present = [r for r in rows if r.get(metric) is not None and not math.isnan(r[metric])]
    missing = [r for r in rows if r not in present]
    return sorted(present, key=lambda r: sign * r[metric]) + missing


def write_tables(rows: List[Dict[str, Any]], sweep_dir: str) -> List[str]:
    """Writes ``sweep_results.csv`` and ``sweep_results.md`` into ``sweep_dir``; returns their paths."""
    columns = ["job", "overrides", "status", *METRIC_COLUMNS]
    csv_path = os.path.join(sweep_dir, "sweep_results.csv")
    with open(csv_path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(csv_path + ".tmp", csv_path)
    md_path = os.path.join(sweep_dir, "sweep_results.md")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_format(row.get(c)).replace("|", "\\|") for c in columns) + " |")
    with open(md_path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(md_path + ".tmp", md_path)
    return [csv_path, md_path]


def print_table(rows: List[Dict[str, Any]], title: str) -> None:
    """The results as a rich table on stdout: the job number, the overrides that differ, status and metrics."""
    import sys

    from rich.console import Console
    from rich.table import Table

    common, varying = split_overrides(rows)
    table = Table(title=title, caption=("every job: " + " ".join(common)) if common else None)
    columns = ("job", "overrides", "status", *METRIC_COLUMNS)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row, differ in zip(rows, varying):
        cells = {**row, "job": row["job"].split("_")[0], "overrides": differ or "-"}
        table.add_row(*(_format(cells.get(c)) for c in columns))
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def summarize_sweep(sweep_dir: str, metric: Optional[str] = None, direction: str = "maximize") -> List[Dict[str, Any]]:
    """Collects, ranks, prints and writes the results of the sweep in ``sweep_dir``; returns the ranked rows."""
    rows = rank(job_rows(sweep_dir), metric, direction)
    if not rows:
        log.warning("no job folders in %s: nothing to summarize", sweep_dir)
        return rows
    paths = write_tables(rows, sweep_dir)
    print_table(rows, f"sweep results ({len(rows)} jobs{', best ' + metric + ' first' if metric else ''})")
    best = rows[0]
    if metric and best.get(metric) is not None:
        differ = split_overrides(rows)[1][0] or best["overrides"]
        print(f"best: {metric} {_format(best[metric])} | {differ} | {os.path.join(sweep_dir, best['job'])}")
    print(f"written: {paths[0]}, {paths[1]}")
    return rows


class SweepResults(HydraCallback):
    """Hydra callback: at the end of a multirun, the table of every job (see :func:`summarize_sweep`).

    The ranking metric is ``optimized_metric``; the direction is the Optuna
    sweeper's ``direction`` when it has one, else ``maximize`` for names with
    ``acc`` and ``minimize`` otherwise.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = str(config.hydra.sweep.dir)
        if not os.path.isdir(sweep_dir):
            return
        metric = config.get("optimized_metric")
        direction = OmegaConf.select(config, "hydra.sweeper.direction", default=None)
        if not isinstance(direction, str):
            direction = "maximize" if metric and "acc" in str(metric) else "minimize"
        summarize_sweep(sweep_dir, str(metric) if metric else None, direction)
