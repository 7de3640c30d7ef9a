"""Conflicting pins of rules whose step windows overlap, refused when the second rule is added.

:meth:`~trainer.masks.plan.Planner.combine` refuses two rules that pin one
element to different values when both are active *now*. Rules with step
windows (``start_step`` / ``end_step``) may be active together only later
(rule ``a``: zero until step 10, rule ``b``: 0.5 from step 5), which would
then fail mid-training. :func:`check_window_conflicts` compares, when a rule
is added, its pins with those of every rule covering the same variable whose
window can overlap its own, at the first step of the overlap.

Decidable up front, and so checked, are rules with a constant pin (``zero``,
a number, ``initial``) and a selection that does not depend on values read
later: not ``current`` pins, gradual schedules, ``magnitude`` / ``n_m``
selections (their elements are chosen from the values at that step) or
epoch bounds (their steps depend on the epoch length); those are checked
when they become active, as before.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Tuple

import numpy as np

from trainer.masks.elements import selector_name
from trainer.masks.errors import FreezeConfigError

__all__ = ["check_window_conflicts", "late_initial", "step_overlap"]

VALUE_DEPENDENT = ("magnitude", "magnitude_threshold", "n_m", "fan_in")


def step_overlap(a: Any, b: Any) -> Optional[Tuple[int, Optional[int]]]:
    """``(first, end)`` steps at which two :class:`~trainer.masks.schedules.ActiveWindow` s are both active.

    ``end`` is exclusive (``None``: open). ``None`` when the windows are
    disjoint or either has an epoch bound (not comparable in steps).
    """
    if any(w.start_epoch is not None or w.end_epoch is not None for w in (a, b)):
        return None
    first = max(a.start_step or 0, b.start_step or 0)
    ends = [e for e in (a.end_step, b.end_step) if e is not None]
    end = min(ends) if ends else None
    return None if end is not None and end <= first else (first, end)


def _decidable(rule: Any) -> bool:
    return (rule.value != "current" and rule.schedule is None and rule.regrow is None
            and selector_name(rule.elements) not in VALUE_DEPENDENT)


def _steps(first: int, end: Optional[int]) -> str:
    return f"steps {first}-{end - 1}" if end is not None else f"step {first} on"


def _bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).view(f"u{array.dtype.itemsize}")


def check_window_conflicts(planner: Any, state: Any, others: Iterable[Any], step: int) -> None:
    """Refuses ``state``'s rule when it and an earlier rule can pin one element to different values at one step.

    Args:
      planner: the :class:`~trainer.masks.plan.Planner` (``select``, ``pins``, ``shapes``).
      state: the new rule's :class:`~trainer.masks.plan.RuleState`.
      others: the rule states already added.
      step: now (a pair active together now is left to ``combine``).

    Raises:
      FreezeConfigError: naming both rules, their values, the variable, one
        element with both pins, and the steps at which both are active.
    """
    rule = state.rule
    if not _decidable(rule):
        return
    for other in others:
        shared = [p for p in state.paths if p in other.paths]
        if not shared or not _decidable(other.rule):
            continue
        span = step_overlap(rule.window, other.rule.window)
        if span is None or (rule.window.active(step, 0) and other.rule.window.active(step, 0)):
            continue
        for path in shared:
            shape, _ = planner.shapes[path]
            mine = np.broadcast_to(planner.pins(rule, path, None), shape)
            theirs = np.broadcast_to(planner.pins(other.rule, path, None), shape)
            differs = (planner.select(state, path, span[0]) & planner.select(other, path, span[0])
                       & (_bits(mine) != _bits(theirs)))
            if differs.any():
                index = tuple(int(i) for i in np.unravel_index(int(np.flatnonzero(differs)[0]), shape))
                raise FreezeConfigError(
                    f"rules {other.rule.name!r} (value {other.rule.value}) and {rule.name!r} (value {rule.value}) "
                    f"are both active at {_steps(*span)} and pin {int(differs.sum())} element(s) of variable "
                    f"{path!r} to different values, e.g. element {index}: {float(theirs[index])!r} and "
                    f"{float(mine[index])!r}; give them the same value, make their element selections disjoint, "
                    "or end one window where the other starts")


def late_initial(path: str, read_now: bool, optimizer: Any) -> None:
    """Refuses a ``value: initial`` pin read from a variable the optimizer has already trained.

    ``initial`` means the value before training (when the registry and its
    rules were made); read after an update it would be the trained value.

    Args:
      path: the variable's path.
      read_now: the pin would be read from the variable (no ``initial_values`` entry).
      optimizer: the attached optimizer, or ``None``.

    Raises:
      FreezeConfigError: ``read_now`` and ``optimizer.iterations > 0``.
    """
    step = 0 if optimizer is None else int(optimizer.iterations.numpy())
    if read_now and step > 0:
        raise FreezeConfigError(
            f"value 'initial' pins {path!r} to its value before training, but the optimizer has applied {step} "
            "update(s) since: add the rule before training, pass MaskRegistry(initial_values={path: array}), "
            "or use value 'current' (the value now)")
