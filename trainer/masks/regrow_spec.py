"""How a prune-and-regrow rule moves its elements: the drop-fraction schedules and :class:`RegrowSpec`.

Declared as a rule's ``regrow`` mapping and checked once when the rule is
built; the drop-and-grow arithmetic itself is :mod:`trainer.masks.regrow`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Union

import tensorflow as tf

from trainer.masks.checks import check_known, is_whole, positive_int, step_span
from trainer.masks.errors import FreezeConfigError

TensorLike = Any


def check_drop_fraction(drop_fraction: Any, what: str = "drop_fraction") -> float:
    """Returns a Python ``drop_fraction`` as a float after checking it lies in [0, 1).

    Raises:
      FreezeConfigError: not a number (``bool`` included) or outside [0, 1).
    """
    if isinstance(drop_fraction, bool) or not isinstance(drop_fraction, (int, float)) or not 0.0 <= drop_fraction < 1.0:
        raise FreezeConfigError(f"{what} must be a number in [0, 1), got {drop_fraction!r}")
    return float(drop_fraction)


@dataclasses.dataclass(frozen=True)
class ConstantDropFraction:
    """A drop fraction that does not change: ``value`` at every step.

    Attributes:
      value: a number in [0, 1).
    """

    value: float

    def __post_init__(self):
        check_drop_fraction(self.value, "drop_fraction.value")

    def __call__(self, step: TensorLike) -> tf.Tensor:
        """The drop fraction at ``step`` (int or integer tensor), a float64 scalar tensor."""
        del step
        return tf.constant(float(self.value), tf.float64)


@dataclasses.dataclass(frozen=True)
class CosineDropFraction:
    """A cosine decay of the drop fraction: ``final + (alpha - final) / 2 * (1 + cos(pi * t / T_end))``.

    ``t = step - begin_step`` clipped to ``[0, T_end]`` with ``T_end =
    end_step - begin_step``: ``alpha`` up to ``begin_step``, ``final`` from
    ``end_step`` on. With ``begin_step = 0`` and ``final = 0`` this is RigL's
    ``tf.train.cosine_decay(drop_fraction, global_step, end_step)``; with
    ``final = 0.005`` it is the prune rate of Dettmers & Zettlemoyer 2019
    (``sparselearning.core.CosineDecay``: PyTorch's ``CosineAnnealingLR``
    with ``eta_min=0.005``, stepped once per batch).

    Attributes:
      initial: ``alpha``, a number in [0, 1).
      end_step: the step where the fraction reaches ``final`` (optimizer steps).
      begin_step: the step where the decay starts, ``0 <= begin_step < end_step``.
      final: the fraction from ``end_step`` on, a number in [0, 1) (default 0).
    """

    initial: float
    end_step: int
    begin_step: int = 0
    final: float = 0.0

    def __post_init__(self):
        check_drop_fraction(self.initial, "drop_fraction.initial")
        check_drop_fraction(self.final, "drop_fraction.final")
        step_span("drop_fraction", self.begin_step, self.end_step, error=FreezeConfigError)

    def __call__(self, step: TensorLike) -> tf.Tensor:
        """The drop fraction at ``step`` (int or integer tensor), a float64 scalar tensor."""
        span = float(self.end_step - self.begin_step)
        t = tf.clip_by_value(tf.cast(step, tf.float64) - float(self.begin_step), 0.0, span)
        return float(self.final) + 0.5 * (float(self.initial) - float(self.final)) * (1.0 + tf.cos(math.pi * t / span))


DROP_FRACTION_KINDS = ("constant", "cosine")
REGROW_METHODS = ("set", "rigl", "momentum")


def make_drop_fraction_schedule(spec: Union[float, Mapping[str, Any]]) -> Union[ConstantDropFraction, CosineDropFraction]:
    """Builds a drop-fraction schedule from a number or ``{kind: constant|cosine, ...}``.

    ``0.3`` and ``{kind: constant, value: 0.3}`` are constant;
    ``{kind: cosine, initial: 0.3, end_step: 7500, begin_step: 0}`` is
    :class:`CosineDropFraction`.

    Raises:
      FreezeConfigError: unknown kind or keys, missing keys, or bad values.
    """
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return ConstantDropFraction(value=spec)
    if not isinstance(spec, Mapping):
        raise FreezeConfigError(
            f"drop_fraction must be a number in [0, 1) or a mapping with kind {list(DROP_FRACTION_KINDS)}, "
            f"got {spec!r}"
        )
    spec = dict(spec)
    kind = spec.pop("kind", "constant")
    classes = {"constant": ConstantDropFraction, "cosine": CosineDropFraction}
    if kind not in classes:
        raise FreezeConfigError(f"drop_fraction.kind must be one of {list(DROP_FRACTION_KINDS)}, got {kind!r}")
    fields = {f.name: f for f in dataclasses.fields(classes[kind])}
    check_known(spec, fields, error=FreezeConfigError, what=f"unknown drop_fraction key(s) {{unknown}} for kind {kind!r}",
                shown=sorted(set(fields) | {"kind"}))
    missing = sorted(n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in spec)
    if missing:
        raise FreezeConfigError(f"drop_fraction of kind {kind!r} is missing {missing}")
    return classes[kind](**spec)


@dataclasses.dataclass(frozen=True)
class RegrowSpec:
    """How a freeze rule moves its trainable elements: prune-and-regrow every ``update_every_n_steps``.

    Declared as a rule's ``regrow`` mapping, e.g. ``{method: rigl,
    drop_fraction: {kind: cosine, initial: 0.3, end_step: 7500},
    update_every_n_steps: 100}``. At every optimizer step ``t = n *
    update_every_n_steps`` (``n >= 1``, ``t <= end_step``) each selected
    variable drops ``round(drop_fraction(t) * active)`` of its active elements
    (smallest ``|w|``) and grows as many: at random (``set``, Mocanu et al.
    2018) or where the dense gradient ``|g|`` of the last step is largest
    (``rigl``, Evci et al. 2020). Dropped elements are pinned to exactly 0,
    grown ones start at 0, and the optimizer slots of both are zeroed (unless
    ``reset_slots`` is false). The number of trainable elements of each
    variable never changes (``set``, ``rigl``). ``momentum`` (Sparse Momentum, Dettmers &
    Zettlemoyer 2019) drops ``ceil(drop_fraction(t) * active)`` per variable
    and regrows the rule's total across its variables in proportion to their
    mean momentum magnitude, where the momentum magnitude is largest
    (:mod:`trainer.masks.sparse_momentum`): per variable the count moves, the
    rule's total does not.

    Attributes:
      method: ``"set"``, ``"rigl"`` or ``"momentum"``.
      drop_fraction: a :class:`ConstantDropFraction` or :class:`CosineDropFraction`.
      update_every_n_steps: the update period, optimizer steps (RigL: 100;
        once per epoch: the steps of one epoch).
      end_step: the last step that updates; ``None`` = the cosine schedule's
        ``end_step`` (a constant fraction then updates until training ends).
      seed: SET's random seed (update at step ``t`` draws with ``[seed, t]``).
      reset_slots: ``True`` (default, RigL's ``reset_momentum``): zero the
        optimizer slots of grown and dropped elements; ``False``: keep them,
        so a grown element starts with the momentum accumulated at its
        position (``sparse_learning`` does this).
      frozen_gradients: ``"mask"`` (default for ``set`` / ``rigl``): frozen
        elements get a zero gradient; ``"pass"`` (default for ``momentum``):
        they get their true gradient, so the optimizer's slots (momentum)
        keep accumulating there while the weights are re-projected to exactly
        0 after every step (needs a dense update: refused with ``compact`` /
        ``sampled``).
    """

    method: str
    drop_fraction: Union[ConstantDropFraction, CosineDropFraction]
    update_every_n_steps: int
    end_step: Optional[int] = None
    seed: int = 0
    reset_slots: bool = True
    frozen_gradients: str = "mask"

    KEYS = ("method", "drop_fraction", "update_every_n_steps", "end_step", "seed", "reset_slots", "frozen_gradients")
    FROZEN_GRADIENTS = ("mask", "pass")

    @classmethod
    def from_mapping(cls, spec: Any) -> "RegrowSpec":
        """Builds a spec from a rule's ``regrow`` mapping.

        Raises:
          FreezeConfigError: not a mapping, unknown or missing keys, or bad values (named in the message).
        """
        if not isinstance(spec, Mapping):
            raise FreezeConfigError(f"regrow must be a mapping with keys {list(cls.KEYS)}, got {spec!r}")
        check_known(spec, cls.KEYS, error=FreezeConfigError, what="unknown regrow key(s) {unknown}")
        missing = [k for k in ("method", "drop_fraction", "update_every_n_steps") if k not in spec]
        if missing:
            raise FreezeConfigError(f"regrow is missing {missing} (e.g. {{method: rigl, drop_fraction: 0.3, "
                                    "update_every_n_steps: 100})")
        method = spec["method"]
        if method not in REGROW_METHODS:
            raise FreezeConfigError(f"regrow.method must be one of {list(REGROW_METHODS)}, got {method!r}")
        every = positive_int("regrow.update_every_n_steps", spec["update_every_n_steps"], error=FreezeConfigError)
        schedule = make_drop_fraction_schedule(spec["drop_fraction"])
        end = spec.get("end_step")
        if end is not None and not is_whole(end, 0):
            raise FreezeConfigError(f"regrow.end_step must be a non-negative integer or null, got {end!r}")
        if end is None and isinstance(schedule, CosineDropFraction):
            end = schedule.end_step
        seed = spec.get("seed", 0)
        if not is_whole(seed, 0, 2**31):
            raise FreezeConfigError(f"regrow.seed must be an integer in [0, 2**31), got {seed!r}")
        reset = spec.get("reset_slots", True)
        if not isinstance(reset, bool):
            raise FreezeConfigError(f"regrow.reset_slots must be true or false, got {reset!r}")
        frozen = spec.get("frozen_gradients")
        frozen = ("pass" if method == "momentum" else "mask") if frozen is None else frozen
        if frozen not in cls.FROZEN_GRADIENTS:
            raise FreezeConfigError(f"regrow.frozen_gradients must be one of {list(cls.FROZEN_GRADIENTS)}, "
                                    f"got {frozen!r}")
        return cls(method=method, drop_fraction=schedule, update_every_n_steps=every, end_step=end, seed=seed,
                   reset_slots=reset, frozen_gradients=frozen)

    def due(self, step: int, last: Optional[int]) -> bool:
        """Whether an update is due at optimizer ``step`` (after ``last``, the step of the previous one)."""
        if step <= 0 or step % self.update_every_n_steps or (self.end_step is not None and step > self.end_step):
            return False
        return last is None or step > last

    def next_due(self, step: int) -> Optional[int]:
        """The first update step after ``step``, or ``None`` when none is left."""
        n = self.update_every_n_steps
        nxt = (step // n + 1) * n
        return None if self.end_step is not None and nxt > self.end_step else nxt

    def describe(self) -> str:
        """E.g. ``"rigl every 100 steps, drop 0.3 (cosine to step 7500)"``."""
        df = self.drop_fraction
        fraction = (f"drop {df.value:g}" if isinstance(df, ConstantDropFraction)
                    else f"drop {df.initial:g} (cosine to " + (f"{df.final:g} at " if df.final else "")
                    + f"step {df.end_step})")
        until = f", until step {self.end_step}" if self.end_step is not None else ""
        slots = "" if self.reset_slots else ", slots kept"
        frozen = ", frozen gradients pass" if self.frozen_gradients == "pass" else ""
        return f"{self.method} every {self.update_every_n_steps} steps, {fraction}{until}{slots}{frozen}"
