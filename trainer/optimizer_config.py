"""Checks of the ``optimizer`` group before anything is built: a known name, hyper-parameters in range.

A negative or zero learning rate trains (and diverges) without any error in
Keras; here it is refused with one line naming the value.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Tuple

__all__ = ["OPTIMIZER_NAMES", "OPTION_RANGES", "optimizer_problem", "schedule_problem", "step_decay"]

# What keras.optimizers.get accepts by name (Keras 3), lower case.
OPTIMIZER_NAMES = ("adadelta", "adafactor", "adagrad", "adam", "adamax", "adamw", "ftrl", "lion", "muon", "nadam",
                   "rmsprop", "sgd")

_unit = (lambda v: 0.0 <= v < 1.0, "in [0, 1)")
_positive = (lambda v: v > 0.0, "> 0")
_non_negative = (lambda v: v >= 0.0, ">= 0")
OPTION_RANGES: Dict[str, Tuple[Callable[[float], bool], str]] = {
    "beta_1": _unit, "beta_2": _unit, "rho": _unit, "momentum": _unit, "ema_momentum": _unit,
    "epsilon": _positive, "clipnorm": _positive, "clipvalue": _positive, "global_clipnorm": _positive,
    "weight_decay": _non_negative,
}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def optimizer_problem(cfg: Any) -> Tuple[str, str]:
    """The first problem of an ``optimizer`` block, as ``(message, hint)``; ``("", "")`` when there is none.

    Args:
      cfg: the ``optimizer`` block: ``name``, ``learning_rate`` (a finite
        number > 0), optional ``options`` (``beta_1``, ``beta_2``, ``rho``,
        ``momentum``, ``ema_momentum`` in [0, 1); ``epsilon`` and clipping > 0;
        ``weight_decay`` >= 0; others are left to Keras).
    """
    from trainer.suggest import suggestion

    name = str(cfg.get("name"))
    if name.lower() not in OPTIMIZER_NAMES:
        return (f"optimizer.name={name!r} is not a Keras optimizer",
                suggestion(name.lower(), OPTIMIZER_NAMES, "valid names", prefix="optimizer.name="))
    lr = cfg.get("learning_rate")
    if not _number(lr) or not math.isfinite(lr) or lr <= 0:
        return (f"optimizer.learning_rate must be a finite number > 0, got {lr!r}",
                "a typical Adam learning rate is 1e-3 (SGD: 0.01 to 0.1), e.g. optimizer.learning_rate=0.001")
    problem = schedule_problem(cfg.get("schedule"))
    if problem:
        return problem, ("e.g. optimizer.schedule=cosine, or in a config file schedule: {kind: step, every_n_steps: "
                         "25000, factor: 0.1}")
    options = cfg.get("options") or {}
    for key, (ok, allowed) in OPTION_RANGES.items():
        value = options.get(key)
        if value is None:
            continue
        if not _number(value) or not math.isfinite(value) or not ok(float(value)):
            return (f"optimizer.options.{key} must be {allowed}, got {value!r}",
                    f"optimizer.options.{key} is passed to keras.optimizers.{name}; set a value {allowed}")
    return "", ""


SCHEDULE_NAMES = ("constant", "cosine")
STEP_KEYS = ("kind", "every_n_steps", "factor")


def schedule_problem(schedule: Any) -> str:
    """The problem of an ``optimizer.schedule``, or ``""``: a name, or ``{kind: step, every_n_steps, factor}``.

    ``step`` multiplies the learning rate by ``factor`` (in (0, 1]) every
    ``every_n_steps`` batches (an integer >= 1): PyTorch's ``StepLR`` stepped
    before each batch (:func:`step_decay`).
    """
    if schedule is None or (isinstance(schedule, str) and schedule in SCHEDULE_NAMES):
        return ""
    if not hasattr(schedule, "keys"):
        return (f"optimizer.schedule must be one of {list(SCHEDULE_NAMES)} or a mapping {{kind: step, "
                f"every_n_steps, factor}}, got {schedule!r}")
    spec = dict(schedule)
    unknown = sorted(set(spec) - set(STEP_KEYS))
    every, factor = spec.get("every_n_steps"), spec.get("factor")
    if spec.get("kind") != "step" or unknown:
        return f"optimizer.schedule as a mapping takes keys {list(STEP_KEYS)} with kind: step, got {spec!r}"
    if not (_number(every) and float(every).is_integer() and every >= 1):
        return f"optimizer.schedule.every_n_steps must be an integer >= 1, got {every!r}"
    if not (_number(factor) and 0.0 < factor <= 1.0):
        return f"optimizer.schedule.factor must be a number in (0, 1], got {factor!r}"
    return ""


def step_decay(learning_rate: float, every_n_steps: int, factor: float, total_steps: int):
    """A learning rate times ``factor`` every ``every_n_steps`` batches, as PyTorch's ``StepLR`` stepped per batch.

    ``sparse_learning`` calls ``lr_scheduler.step()`` before each batch, so its
    batch ``b`` (from 1) trains with ``lr * factor ** floor(b / every)``; Keras
    evaluates a schedule at ``optimizer.iterations = b - 1``, hence the value
    at iteration ``i`` is ``lr * factor ** floor((i + 1) / every)``: the first
    decay at iteration ``every - 1``.

    Args:
      learning_rate: the initial rate, > 0.
      every_n_steps: the decay period in batches (optimizer steps), >= 1.
      factor: the multiplier, in (0, 1].
      total_steps: the run's optimizer steps (decays after it are left out).

    Returns:
      A ``keras.optimizers.schedules.PiecewiseConstantDecay`` (a float when no decay falls in the run).
    """
    import keras

    decays = max(int(total_steps), 0) // int(every_n_steps)
    if decays == 0:
        return float(learning_rate)
    boundaries = [k * int(every_n_steps) - 2 for k in range(1, decays + 1)]
    values = [float(learning_rate) * float(factor) ** k for k in range(decays + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
