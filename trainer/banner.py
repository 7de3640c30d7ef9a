"""The start-of-run banner: where the run writes, what data it read, the model's size and the freeze plan.

A few ``trainer`` log lines before the first step (so they also reach the
run's log file), e.g.::

    run      outputs/sparse_mlp/2026-01-01_12-00-00
    data     mnist from /data/mnist.npz | train 55,000 | validation 5,000 | test 10,000 | inputs (28, 28, 1) | 10 classes
    model    mlp | 266,610 parameters (266,610 trainable)
    freeze   rules sparse | 239,580 of 266,610 elements frozen (89.9 %) in 3 variables
    train    20 epochs x 917 steps, batch 60 | adam lr 0.0012 cosine
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List

__all__ = ["banner_lines", "freeze_summary", "log_banner", "plural"]

log = logging.getLogger("trainer")


def plural(n: int, word: str) -> str:
    """``"1 variable"``, ``"3 variables"`` (with thousands separators)."""
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def freeze_summary(plan: List[Dict[str, Any]], total_parameters: int) -> str:
    """One line from ``registry.plan()``: the rules, and how many elements of how many variables are frozen."""
    frozen = sum(row["frozen_elements"] for row in plan)
    touched = sum(1 for row in plan if row["frozen_elements"])
    rules = sorted({rule for row in plan for rule in row["rules"]})
    if not frozen:
        return "nothing frozen" + (f" (rules {', '.join(rules)} select no element yet)" if rules else "")
    share = 100.0 * frozen / max(total_parameters, 1)
    return (f"rules {', '.join(rules) or '-'} | {frozen:,} of {total_parameters:,} elements frozen ({share:.1f} %) "
            f"in {plural(touched, 'variable')}")


def banner_lines(*, run_dir: str, splits, model, plan: List[Dict[str, Any]], cfg) -> List[str]:
    """The banner's lines (see the module docstring).

    Args:
      run_dir: the run directory.
      splits: a :class:`trainer.data.Splits`.
      model: the built Keras model.
      plan: ``registry.plan()``.
      cfg: the composed config (``trainer``, ``optimizer`` and ``model.name`` are read).
    """
    trainable = sum(int(v.numpy().size) for v in model.trainable_variables)
    total = sum(int(v.numpy().size) for v in model.variables)
    batch = int(cfg.trainer.batch_size)
    per_epoch = -(-len(splits.x_train) // batch)
    length = f"{cfg.trainer.epochs} epochs x {per_epoch:,} steps"
    if cfg.trainer.max_steps is not None:
        length += f" (capped at step {int(cfg.trainer.max_steps):,})"
    schedule = cfg.optimizer.get("schedule") or "constant"
    return [
        f"run      {run_dir}",
        f"data     {splits.name} from {splits.source or '?'} | train {len(splits.x_train):,} | "
        f"validation {len(splits.x_val):,} | test {len(splits.x_test):,} | inputs {tuple(splits.input_shape)} | "
        f"{splits.num_classes} classes",
        f"model    {cfg.model.name} | {total:,} parameters ({trainable:,} trainable)",
        f"freeze   {freeze_summary(plan, trainable)}",
        f"train    {length}, batch {batch} | {cfg.optimizer.name} lr {float(cfg.optimizer.learning_rate):g} {schedule}",
    ]


def log_banner(**kwargs) -> None:
    """Logs :func:`banner_lines` through the ``trainer`` logger (arguments as there)."""
    for line in banner_lines(**kwargs):
        log.info(line)
