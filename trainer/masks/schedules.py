"""When a rule is active, and the target sparsity of gradual magnitude pruning."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Optional, Union

from trainer.masks.checks import check_known, is_whole, step_span
from trainer.masks.errors import FreezeConfigError


@dataclasses.dataclass(frozen=True)
class PolynomialSparsity:
    """Target sparsity ``s(t)`` of gradual magnitude pruning.

    ``s(t) = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_1 - t_0)) ** power`` for
    ``t_0 <= t <= t_1``; ``s_i`` before ``t_0`` and ``s_f`` after ``t_1``.
    From Zhu & Gupta, "To prune, or not to prune" (2017), as in TensorFlow
    Model Optimization's ``PolynomialDecay`` (default ``power`` 3).

    Attributes:
      initial_sparsity: ``s_i``, a fraction in [0, 1].
      final_sparsity: ``s_f``, a fraction in [0, 1].
      begin_step: ``t_0`` (optimizer steps).
      end_step: ``t_1`` (optimizer steps), greater than ``begin_step``.
      power: the exponent.
    """

    initial_sparsity: float
    final_sparsity: float
    begin_step: int
    end_step: int
    power: float = 3.0

    def __post_init__(self):
        for name in ("initial_sparsity", "final_sparsity"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise FreezeConfigError(f"schedule.{name} must be a fraction in [0, 1], got {v!r}")
        step_span("schedule", self.begin_step, self.end_step, error=FreezeConfigError)
        power = self.power
        if isinstance(power, bool) or not isinstance(power, (int, float)) or not power > 0:
            raise FreezeConfigError(f"schedule.power must be a positive number (3 in Zhu & Gupta 2017), got {power!r}")

    def __call__(self, step: int) -> float:
        """The target sparsity (fraction of frozen elements) at ``step``.

        Exactly ``initial_sparsity`` up to ``begin_step`` and exactly
        ``final_sparsity`` from ``end_step`` on (the formula alone is off by
        rounding at ``begin_step``, which can change a rounded element count).
        """
        if step <= self.begin_step:
            return float(self.initial_sparsity)
        t = min(step, self.end_step)
        progress = (t - self.begin_step) / (self.end_step - self.begin_step)
        s = self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** self.power
        return float(min(max(s, 0.0), 1.0))


SCHEDULE_KINDS = ("polynomial",)


def make_schedule(spec: Optional[Mapping[str, Any]]) -> Optional[PolynomialSparsity]:
    """Builds a sparsity schedule from ``{kind: polynomial, ...}`` (or ``None``).

    Raises:
      FreezeConfigError: unknown kind or keys, or bad values.
    """
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise FreezeConfigError(f"schedule must be a mapping with kind {list(SCHEDULE_KINDS)}, got {spec!r}")
    spec = dict(spec)
    kind = spec.pop("kind", "polynomial")
    if kind not in SCHEDULE_KINDS:
        raise FreezeConfigError(f"schedule.kind must be one of {list(SCHEDULE_KINDS)}, got {kind!r}")
    allowed = {f.name for f in dataclasses.fields(PolynomialSparsity)}
    check_known(spec, allowed, error=FreezeConfigError, what="unknown schedule key(s) {unknown}",
                shown=sorted(allowed | {"kind"}))
    missing = sorted({"initial_sparsity", "final_sparsity", "begin_step", "end_step"} - set(spec))
    if missing:
        raise FreezeConfigError(f"schedule is missing {missing}")
    return PolynomialSparsity(**spec)


@dataclasses.dataclass(frozen=True)
class ActiveWindow:
    """The steps and epochs during which a rule is active.

    A rule is active when ``start_step <= step < end_step`` and
    ``start_epoch <= epoch < end_epoch``; ``None`` bounds are open. ``step``
    counts optimizer steps from 0, ``epoch`` counts epochs from 0.
    """

    start_step: Optional[int] = None
    end_step: Optional[int] = None
    start_epoch: Optional[int] = None
    end_epoch: Optional[int] = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None and not is_whole(v, 0):
                raise FreezeConfigError(f"{f.name} must be a non-negative integer or null, got {v!r}")
        for lo, hi in (("start_step", "end_step"), ("start_epoch", "end_epoch")):
            a, b = getattr(self, lo), getattr(self, hi)
            if a is not None and b is not None and b <= a:
                raise FreezeConfigError(f"{hi} ({b}) must be greater than {lo} ({a})")

    @property
    def always(self) -> bool:
        """True when no bound is set (the rule is active from the start, for ever)."""
        return all(getattr(self, f.name) is None for f in dataclasses.fields(self))

    def active(self, step: int, epoch: int) -> bool:
        def inside(x, lo, hi):
            return (lo is None or x >= lo) and (hi is None or x < hi)

        return inside(step, self.start_step, self.end_step) and inside(epoch, self.start_epoch, self.end_epoch)


def due_change(state: Any, step: int, epoch: int) -> Union[None, str, int]:
    """What a rule's schedule does at ``step`` / ``epoch``: the window and due logic of ``MaskRegistry.update``.

    Args:
      state: a :class:`~trainer.masks.plan.RuleState` (``rule``, ``active``, ``last_update_step``).
      step, epoch: now.

    Returns:
      ``None`` (nothing), ``"off"`` (the rule leaves its window), or the step
      to select at: ``step`` when the rule enters its window, or the due
      re-selection of a gradual-pruning rule (clipped to its schedule's end).
    """
    rule = state.rule
    if not rule.dynamic:
        return None
    active = rule.window.active(step, epoch)
    if active and not state.active:
        return step
    if not active and state.active:
        return "off"
    if active and rule.update_every_n_steps is not None:
        end = rule.schedule.end_step if rule.schedule is not None else None
        due = step - state.last_update_step >= rule.update_every_n_steps
        if due and (end is None or state.last_update_step < end):
            return min(step, end) if end is not None else step
    return None


def next_update_step(states: Iterable[Any], step: int) -> Optional[int]:
    """The first step after ``step`` at which a rule's schedule (or regrowth) can change a mask.

    Args:
      states: :class:`~trainer.masks.plan.RuleState` objects.
      step: the optimizer step now.

    Returns:
      The nearest ``start_step`` / ``end_step`` bound, due re-selection of a
      gradual-pruning rule or prune-and-regrow update after ``step``, or
      ``None`` when none is ahead.
    """
    candidates = []
    for state in states:
        rule, window = state.rule, state.rule.window
        candidates += [b for b in (window.start_step, window.end_step) if b is not None and b > step]
        if rule.regrow is not None:
            due = rule.regrow.next_due(step)
            candidates += [due] if due is not None else []
        if rule.update_every_n_steps is not None and state.active and state.last_update_step is not None:
            end = rule.schedule.end_step if rule.schedule is not None else None
            if end is None or state.last_update_step < end:
                candidates.append(max(state.last_update_step + rule.update_every_n_steps, step + 1))
    return min(candidates) if candidates else None
