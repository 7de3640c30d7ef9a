"""Checks of the ``optimizer`` group before anything is built: a known name, hyper-parameters in range.

A negative or zero learning rate trains (and diverges) without any error in
Keras; here it is refused with one line naming the value.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Tuple

__all__ = ["OPTIMIZER_NAMES", "OPTION_RANGES", "optimizer_problem"]

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
    options = cfg.get("options") or {}
    for key, (ok, allowed) in OPTION_RANGES.items():
        value = options.get(key)
        if value is None:
            continue
        if not _number(value) or not math.isfinite(value) or not ok(float(value)):
            return (f"optimizer.options.{key} must be {allowed}, got {value!r}",
                    f"optimizer.options.{key} is passed to keras.optimizers.{name}; set a value {allowed}")
    return "", ""
