"""How the scripts write their figures and tables: matplotlib without a display, parent folders made for them.

A library of ``aggregate_reports.py``, ``continual_eval.py``, ``sft_study.py`` and ``plot_run.py``, not a
command (the scripts' own folder is on ``sys.path`` when one runs ``python scripts/<name>.py``).
"""

from __future__ import annotations

import os
from typing import Optional


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive ``Agg`` backend (PNG files, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _make_parent(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def finish_axes(ax, *, xlabel: str, ylabel: str, title: str = "") -> None:
    """Labels ``ax``, titles it (when ``title``), draws a light grid and a legend when anything is labelled."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def save_figure(fig, path: str, *, dpi: Optional[int] = None) -> str:
    """Lays ``fig`` out tightly, writes it to ``path`` (its folder made when missing), closes it.

    Args:
      fig: a ``matplotlib.figure.Figure``.
      path: the file to write; the format follows its ending (``.png``).
      dpi: the resolution, else the figure's own.

    Returns:
      ``path``.
    """
    fig.tight_layout()
    _make_parent(path)
    fig.savefig(path, **({} if dpi is None else {"dpi": dpi}))
    pyplot().close(fig)
    return path


def emit_table(text: str, path: Optional[str] = None) -> str:
    """Prints ``text`` (a Markdown table) and, with ``path``, writes it there (its folder made when missing).

    Returns:
      ``text``.
    """
    print(text)
    if path:
        _make_parent(path)
        with open(path, "w") as f:
            f.write(text)
    return text
