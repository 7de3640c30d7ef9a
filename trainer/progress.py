"""Terminal display: a rich progress bar per epoch on a TTY, plain log lines otherwise, and the end summary.

Which one a run gets is :func:`progress_callback`'s choice (``log.progress``):
``auto`` shows the bar when standard output is a terminal and writes
:class:`~trainer.callbacks.LogLines` otherwise (CI, ``nohup``, pipes), so log
files never fill with bar redraws.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Dict, List, Mapping, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from trainer.callbacks import Callback, LogLines, Throughput

__all__ = ["PROGRESS_MODES", "ProgressBar", "fit_stats", "print_plan", "print_summary", "progress_callback",
           "summary_rows"]

log = logging.getLogger("trainer")

PROGRESS_MODES = ("auto", "bar", "lines")


def fit_stats(logs: Mapping[str, Any], rate: float, width: int) -> str:
    """The metrics text of the bar, in at most ``width`` characters when it can be.

    Tries ``loss 0.1234 · accuracy 0.9876 · 1,234 ex/s``, then without the
    rate, then 3 decimals, then the loss alone.
    """
    full = " · ".join(f"{k} {v:.4f}" for k, v in logs.items())
    candidates = [f"{full} · {rate:,.0f} examples/s", full,
                  " ".join(f"{k} {v:.3f}" for k, v in logs.items()),
                  " ".join(f"{k} {v:.3f}" for k, v in list(logs.items())[:1])]
    for text in candidates:
        if len(text) <= width:
            return text
    return candidates[-1]


class ProgressBar(Callback):
    """A rich progress bar per epoch: steps, elapsed and remaining time, loss, metrics, examples/s.

    Each epoch's bar stays on screen when the epoch ends, followed by a line
    with the epoch's validation metrics (also logged through the ``trainer``
    logger, so it reaches the run's log file). While a bar is live, log
    records of handlers writing to the terminal are printed above it instead
    of breaking it.

    Args:
      console: the ``rich`` console to draw on (default: a new one on stdout).
    """

    display = True

    def __init__(self, console: Optional[Console] = None):
        self.console = console or Console()
        self.progress: Optional[Progress] = None
        self.task = None
        self.throughput = Throughput()
        self._swapped: List[tuple] = []
        self._fixed_width = 0

    # A logging.StreamHandler keeps the stream it was made with, so rich's
    # redirection of sys.stdout / sys.stderr does not reach it: point such
    # handlers at the redirected streams while the bar is live.
    def _redirect_logging(self) -> None:
        originals = {id(sys.__stdout__): "stdout", id(sys.__stderr__): "stderr"}
        for handler in logging.getLogger().handlers + log.handlers:
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and id(stream) in originals:
                handler.setStream(getattr(sys, originals[id(stream)]))
                self._swapped.append((handler, stream))

    def _restore_logging(self) -> None:
        for handler, stream in self._swapped:
            handler.setStream(stream)
        self._swapped = []

    def _start_epoch(self, state, step_before: int) -> None:
        first = state.epoch_first_step
        # Every column fits an 80-column terminal: a short bar, compact times,
        # and metrics that drop the rate when the line would not fit.
        self.progress = Progress(
            TextColumn(f"epoch {state.epoch + 1}/{state.final_epoch}"), BarColumn(bar_width=12),
            MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(compact=True),
            TextColumn("{task.fields[stats]}"), console=self.console,
        )
        self.progress.start()
        self._redirect_logging()
        total = min(state.steps_per_epoch, state.total_steps - first)
        self.task = self.progress.add_task("train", total=total, completed=step_before - first, stats="")
        self._fixed_width = len(f"epoch {state.epoch + 1}/{state.final_epoch}") + 12 + 2 * len(str(total)) + 1 \
            + 7 + 5 + 5  # bar, "n/m", elapsed, remaining, column gaps

    def _end_epoch(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self._restore_logging()
        self.progress = None

    def on_train_begin(self, state) -> None:
        self.throughput.start(state)

    def on_execution_end(self, state, step_before: int, step: int, logs: Dict[str, Any]) -> None:
        self.throughput.tick()
        if self.progress is None:
            self._start_epoch(state, step_before)
        rate = self.throughput.measure(state, reset=False)["examples_per_second"]
        stats = fit_stats(logs, rate, self.console.width - self._fixed_width)
        self.progress.update(self.task, completed=step - state.epoch_first_step, stats=stats)

    def on_epoch_end(self, state, epoch: int, step: int, logs: Dict[str, Any]) -> None:
        self._end_epoch()
        self.throughput.start(state)  # the next epoch's rate leaves this evaluation out
        log.info("epoch %d | step %d | %s", epoch, step, " | ".join(f"{k} {v:.4f}" for k, v in logs.items()))

    def on_train_end(self, state, step: int, logs: Dict[str, Any], status: str) -> None:
        self._end_epoch()


def progress_callback(mode: str = "auto", every_n_steps: Optional[int] = None, *, stream=None) -> Callback:
    """The terminal display for a run.

    Args:
      mode: ``"bar"`` (:class:`ProgressBar`), ``"lines"``
        (:class:`~trainer.callbacks.LogLines`: a line per epoch, and every
        ``every_n_steps`` steps unless it is ``None``) or
        ``"auto"`` (the bar when ``stream`` is a terminal, else lines).
      every_n_steps: the log-line interval (steps); ``None``: epoch lines only.
      stream: the stream checked by ``auto`` (default ``sys.stdout``).

    Raises:
      ValueError: an unknown ``mode`` (the known ones are listed).
    """
    if mode not in PROGRESS_MODES:
        raise ValueError(f"log.progress must be one of {list(PROGRESS_MODES)}, got {mode!r}")
    stream = sys.stdout if stream is None else stream
    if mode == "auto":
        mode = "bar" if getattr(stream, "isatty", lambda: False)() else "lines"
    return ProgressBar() if mode == "bar" else LogLines(every_n_steps)


def summary_rows(result: Mapping[str, Any]) -> List[tuple]:
    """``(label, text)`` rows of the end-of-run summary from a ``report.json`` dict."""
    rows = [("status", str(result.get("status", "?")))]
    for key in ("test_loss", "test_accuracy", "test_perplexity"):
        if result.get(key) is not None:
            rows.append((key.replace("_", " "), f"{result[key]:.4f}"))
    if result.get("steps") is not None:
        rows.append(("steps", f"{result['steps']:,} ({result.get('epochs', 0):.2f} epochs)"))
    if result.get("wall_seconds") is not None:
        rows.append(("wall time", f"{result['wall_seconds']:.1f} s"))
    if result.get("examples_per_second") is not None:
        rows.append(("examples/s", f"{result['examples_per_second']:,.0f}"))
    if result.get("audit"):
        rows.append(("frozen", result["audit"]))
    return rows


def print_summary(result: Mapping[str, Any], *, console: Optional[Console] = None, stream=None) -> None:
    """Prints the end-of-run summary: test metrics, wall time, examples/s and the frozen-element audit.

    A rich table when ``stream`` (default ``sys.stdout``) is a terminal or a
    ``console`` is given; otherwise plain ``label: text`` log lines through
    the ``trainer`` logger as one record (one block in the log; so they reach the run's log file).
    """
    rows = summary_rows(result)
    stream = sys.stdout if stream is None else stream
    if console is None and not getattr(stream, "isatty", lambda: False)():
        log.info("\n".join(f"summary | {label}: {text}" for label, text in rows))
        return
    table = Table(title="run summary", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for label, text in rows:
        table.add_row(label, text)
    (console or Console()).print(table)


def print_plan(plan: List[Mapping[str, Any]]) -> None:
    """Prints the freeze plan as a table: variable, shape, dtype, frozen elements, fraction, value, rules.

    Args:
      plan: one dict per variable (:meth:`trainer.masks.MaskRegistry.plan`:
        ``path``, ``shape``, ``dtype``, ``frozen_elements``,
        ``frozen_fraction``, ``value``, ``rules``).
    """
    table = Table(title="freeze plan")
    gradient = any("gradient" in row for row in plan)  # update=sampled: how each compact kernel's gradient is made
    groups = any("groups" in row for row in plan)  # group-wise magnitude rules: whole groups frozen
    for col in (("variable", "shape", "dtype", "frozen", "fraction", "value", "rules") + (("groups",) * groups)
                + (("gradient",) * gradient)):
        table.add_column(col)
    for row in plan:
        dtype = row["dtype"] + (f" ({row['precision']['values']} masters)" if row.get("precision") else "")
        table.add_row(row["path"], str(tuple(row["shape"])), dtype, f"{row['frozen_elements']:,}",
                      f"{row['frozen_fraction']:.4f}", row["value"] or "-", ", ".join(row["rules"]) or "-",
                      *([row.get("groups", "-")] * groups), *([row.get("gradient", "-")] * gradient))
    # Not a terminal (a log, CI): a wide console, so variable paths are not cut.
    Console(width=None if sys.stdout.isatty() else 200).print(table)
