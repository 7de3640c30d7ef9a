"""Drop-and-grow updates of a trainable-mask (SET, RigL) and their drop-fraction schedules.

Dynamic sparse training keeps the number of trainable (*active*) elements of a
variable fixed while moving them: at each mask update it *drops* the
``n = round(drop_fraction * active)`` active elements with the smallest
``|w|`` and *grows* (regrowth) ``n`` elements that were inactive before the
drop:

- SET (Mocanu et al. 2018, "Scalable training of artificial neural networks
  with adaptive sparse connectivity ..."): grows uniformly at random.
- RigL (Evci et al. 2020, "Rigging the Lottery: Making All Tickets Winners"):
  grows where the dense gradient ``|g|`` is largest.

Dropped elements become exactly 0 (``+0.0``); grown elements start at zero or
at a given init; all other elements keep their bits (``tf.where``). The
functions are pure TensorFlow on tensors of static shape: call them inside a
``tf.function`` with the drop fraction and seed as tensors and changing masks
do not retrace. Grown elements are returned so the caller can zero their
optimizer slots (:func:`zero_slots`, as RigL's ``reset_momentum``).

Differences from google-research/rigl (``sparse_optimizers_base.py``): the
drop count is rounded (half to even), not truncated; growth candidates exclude
the elements dropped in the same update (RigL may regrow them), so dropped and
grown elements are disjoint and ``n`` is at most the number of inactive
elements; ties are broken by index instead of by adding noise.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import tensorflow as tf

from trainer.masks.errors import FreezeConfigError

TensorLike = Any


class RegrowUpdate(NamedTuple):
    """The result of one drop-and-grow update of one variable; all tensors of the variable's shape.

    Attributes:
      mask: bool, the new trainable-mask (``True`` = active).
      value: the new value, the variable's dtype.
      grown: bool, elements inactive before and active now (zero their slots).
      dropped: bool, elements active before and inactive now (now exactly 0).
    """

    mask: tf.Tensor
    value: tf.Tensor
    grown: tf.Tensor
    dropped: tf.Tensor


def check_drop_fraction(drop_fraction: Any, what: str = "drop_fraction") -> float:
    """Returns a Python ``drop_fraction`` as a float after checking it lies in [0, 1).

    Raises:
      FreezeConfigError: not a number (``bool`` included) or outside [0, 1).
    """
    if isinstance(drop_fraction, bool) or not isinstance(drop_fraction, (int, float)) or not 0.0 <= drop_fraction < 1.0:
        raise FreezeConfigError(f"{what} must be a number in [0, 1), got {drop_fraction!r}")
    return float(drop_fraction)


def _check_seed(seed: TensorLike) -> None:
    if isinstance(seed, (tf.Tensor, tf.Variable)):
        ok = seed.dtype in (tf.int32, tf.int64) and seed.shape.is_compatible_with([2])
    else:
        ok = (
            isinstance(seed, (list, tuple))
            and len(seed) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in seed)
        )
    if not ok:
        raise FreezeConfigError(f"seed must be two integers (a shape [2] int32/int64 tensor), got {seed!r}")


def _drop_fraction_tensor(drop_fraction: TensorLike) -> tf.Tensor:
    if isinstance(drop_fraction, (tf.Tensor, tf.Variable)):
        df = tf.cast(drop_fraction, tf.float64)
        tf.debugging.Assert(
            tf.logical_and(df >= 0.0, df < 1.0), ["drop_fraction must be a number in [0, 1), got", df]
        )
        return df
    return tf.constant(check_drop_fraction(drop_fraction), tf.float64)


def _select(scores: tf.Tensor, candidates: tf.Tensor, n: tf.Tensor, static_shapes: bool) -> tf.Tensor:
    """The ``n`` candidates of highest score (ties: lower index), as a bool vector; 1-D inputs."""
    size = tf.size(scores)
    if static_shapes:
        # Full sorts only (XLA needs static shapes): by score, then a stable sort on the candidate flag.
        order = tf.argsort(scores, direction="DESCENDING", stable=True)
        flag = tf.gather(tf.cast(candidates, tf.int32), order)
        order = tf.gather(order, tf.argsort(flag, direction="DESCENDING", stable=True))
        ranks = tf.scatter_nd(order[:, None], tf.range(size), tf.reshape(size, [1]))
        return tf.logical_and(candidates, ranks < n)
    # Faster: a partial sort of the candidates only (top_k keeps the lower index first on ties).
    index = tf.where(candidates)
    top = tf.math.top_k(tf.gather_nd(scores, index), k=n, sorted=True).indices
    hits = tf.scatter_nd(tf.gather(index, top), tf.ones_like(top), tf.reshape(tf.cast(size, tf.int64), [1]))
    return hits > 0


def drop_and_grow(
    value: TensorLike,
    mask: TensorLike,
    grow_scores: TensorLike,
    *,
    drop_fraction: TensorLike,
    grow_init: Optional[TensorLike] = None,
    static_shapes: bool = False,
) -> RegrowUpdate:
    """Drops the smallest-``|w|`` active elements and grows as many with the highest ``grow_scores``.

    ``active = sum(mask)``; ``n = min(round(drop_fraction * active), size -
    active)`` (round half to even, in float64). Dropped: the ``n`` active
    elements of smallest ``|value|`` (ties: lower flat index dropped first).
    Grown: the ``n`` elements inactive before the drop with the largest
    ``grow_scores`` (ties: lower flat index first). The number of active
    elements is unchanged.

    Args:
      value: the variable's value, float tensor of any static shape ``S``.
      mask: bool tensor of shape ``S``, ``True`` = active (trainable).
      grow_scores: real tensor of shape ``S``, higher grows first (no NaN).
      drop_fraction: a Python number in [0, 1), or a scalar float tensor
        (checked at run time with ``tf.debugging.Assert``, which XLA
        (``jit_compile=True``) drops: build tensors from a validated schedule
        such as :class:`CosineDropFraction`).
      grow_init: values for grown elements, shape ``S`` (cast to the value's
        dtype); ``None`` = zeros.
      static_shapes: ``False`` (default): partial sorts of the candidates,
        whose number varies (``tf.where``), fast but not XLA-compilable;
        ``True``: full sorts with static shapes, for a ``tf.function`` with
        ``jit_compile=True`` (several times slower on CPU). Both give the same
        result.

    Returns:
      A :class:`RegrowUpdate`.

    Raises:
      FreezeConfigError: a Python drop fraction outside [0, 1), shapes that
        differ or are not static, or a mask that is not bool (at trace time).
    """
    value = tf.convert_to_tensor(value)
    mask = tf.convert_to_tensor(mask)
    grow_scores = tf.convert_to_tensor(grow_scores)
    shape = value.shape
    if not shape.is_fully_defined():
        raise FreezeConfigError(f"drop-and-grow needs a value of static shape, got {shape}")
    if mask.dtype != tf.bool or mask.shape != shape:
        raise FreezeConfigError(
            f"mask must be a bool tensor of the value's shape {shape.as_list()}, got {mask.dtype.name} "
            f"{mask.shape.as_list()}"
        )
    if grow_scores.shape != shape:
        raise FreezeConfigError(
            f"grow scores must have the value's shape {shape.as_list()}, got {grow_scores.shape.as_list()}"
        )
    init = tf.zeros_like(value) if grow_init is None else tf.cast(tf.convert_to_tensor(grow_init), value.dtype)
    if init.shape != shape:
        raise FreezeConfigError(f"grow_init must have the value's shape {shape.as_list()}, got {init.shape.as_list()}")
    df = _drop_fraction_tensor(drop_fraction)

    flat_value = tf.reshape(value, [-1])
    active = tf.reshape(mask, [-1])
    size = tf.size(active)
    num_active = tf.reduce_sum(tf.cast(active, tf.int32))
    n = tf.cast(tf.round(df * tf.cast(num_active, tf.float64)), tf.int32)
    n = tf.clip_by_value(n, 0, tf.minimum(num_active, size - num_active))

    dropped = _select(-tf.abs(flat_value), active, n, static_shapes)
    grown = _select(tf.reshape(grow_scores, [-1]), tf.logical_not(active), n, static_shapes)

    new_mask = tf.logical_or(tf.logical_and(active, tf.logical_not(dropped)), grown)
    new_value = tf.where(dropped, tf.zeros_like(flat_value), tf.where(grown, tf.reshape(init, [-1]), flat_value))
    return RegrowUpdate(
        mask=tf.reshape(new_mask, shape),
        value=tf.reshape(new_value, shape),
        grown=tf.reshape(grown, shape),
        dropped=tf.reshape(dropped, shape),
    )


def set_update(
    value: TensorLike,
    mask: TensorLike,
    *,
    drop_fraction: TensorLike,
    seed: TensorLike,
    grow_init: Optional[TensorLike] = None,
    static_shapes: bool = False,
) -> RegrowUpdate:
    """SET: drop the smallest-``|w|`` active elements, grow as many uniformly at random (Mocanu et al. 2018).

    The random choice is ``tf.random.stateless_uniform(shape, seed)`` scores
    ranked by :func:`drop_and_grow`: a uniformly random subset of the
    inactive elements, the same for the same seed, TensorFlow version and
    compilation (XLA draws other numbers from the same seed). Pass a new seed
    per update (e.g. ``[base_seed, step]``) as a tensor to avoid retracing.

    Args:
      value: the variable's value, float tensor of static shape ``S``.
      mask: bool tensor of shape ``S``, ``True`` = active.
      drop_fraction: a Python number in [0, 1) or a scalar float tensor.
      seed: a shape ``[2]`` int32/int64 tensor or a pair of Python ints, the
        stateless RNG seed.
      grow_init: values for grown elements, shape ``S``; ``None`` = zeros.
      static_shapes: ``True`` inside ``jit_compile=True`` (see :func:`drop_and_grow`).

    Returns:
      A :class:`RegrowUpdate`.

    Raises:
      FreezeConfigError: as :func:`drop_and_grow`, or a seed that is not two
        integers.
    """
    shape = tf.convert_to_tensor(value).shape
    _check_seed(seed)
    scores = tf.random.stateless_uniform(shape, seed=seed, dtype=tf.float32)
    return drop_and_grow(
        value, mask, scores, drop_fraction=drop_fraction, grow_init=grow_init, static_shapes=static_shapes
    )


def rigl_update(
    value: TensorLike,
    mask: TensorLike,
    gradient: TensorLike,
    *,
    drop_fraction: TensorLike,
    grow_init: Optional[TensorLike] = None,
    static_shapes: bool = False,
) -> RegrowUpdate:
    """RigL: drop the smallest-``|w|`` active elements, grow as many where ``|g|`` is largest (Evci et al. 2020).

    Args:
      value: the variable's value, float tensor of static shape ``S``.
      mask: bool tensor of shape ``S``, ``True`` = active.
      gradient: the dense (unmasked) loss gradient, shape ``S``: inactive
        elements need their true gradient, so it must be taken before the
        gradients are masked.
      drop_fraction: a Python number in [0, 1) or a scalar float tensor.
      grow_init: values for grown elements, shape ``S``; ``None`` = zeros.
      static_shapes: ``True`` inside ``jit_compile=True`` (see :func:`drop_and_grow`).

    Returns:
      A :class:`RegrowUpdate`.

    Raises:
      FreezeConfigError: as :func:`drop_and_grow`.
    """
    gradient = tf.convert_to_tensor(gradient)  # IndexedSlices (embeddings) become dense
    return drop_and_grow(
        value, mask, tf.abs(gradient), drop_fraction=drop_fraction, grow_init=grow_init, static_shapes=static_shapes
    )


def zero_slots(slots: Sequence[tf.Variable], elements: TensorLike) -> None:
    """Sets ``elements`` of every optimizer slot to 0 in place, with ``tf.where`` (as RigL's ``reset_momentum``).

    Call it with :attr:`RegrowUpdate.grown` so grown elements start without
    momentum or second moment; usable inside a ``tf.function``. Other
    elements keep their bits.

    Args:
      slots: the variable's slot variables (e.g. Adam's momentum and
        velocity), each of the variable's shape.
      elements: bool tensor of that shape, ``True`` = set to 0.

    Raises:
      FreezeConfigError: a slot whose shape is not the shape of ``elements``.
    """
    elements = tf.convert_to_tensor(elements)
    for slot in slots:
        if slot.shape != elements.shape:
            raise FreezeConfigError(
                f"slot {getattr(slot, 'path', slot.name)!r} has shape {slot.shape.as_list()}, "
                f"the elements to zero have shape {elements.shape.as_list()}"
            )
        slot.assign(tf.where(elements, tf.zeros_like(slot), slot))


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
    """RigL's cosine decay of the drop fraction: ``alpha / 2 * (1 + cos(pi * t / T_end))``.

    ``t = step - begin_step`` clipped to ``[0, T_end]`` with ``T_end =
    end_step - begin_step``: ``alpha`` up to ``begin_step``, 0 from
    ``end_step`` on. With ``begin_step = 0`` this is RigL's
    ``tf.train.cosine_decay(drop_fraction, global_step, end_step)``.

    Attributes:
      initial: ``alpha``, a number in [0, 1).
      end_step: the step where the fraction reaches 0 (optimizer steps).
      begin_step: the step where the decay starts, ``0 <= begin_step < end_step``.
    """

    initial: float
    end_step: int
    begin_step: int = 0

    def __post_init__(self):
        check_drop_fraction(self.initial, "drop_fraction.initial")
        for name in ("begin_step", "end_step"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise FreezeConfigError(f"drop_fraction.{name} must be a non-negative integer, got {v!r}")
        if self.end_step <= self.begin_step:
            raise FreezeConfigError(
                f"drop_fraction.end_step ({self.end_step}) must be greater than begin_step ({self.begin_step})"
            )

    def __call__(self, step: TensorLike) -> tf.Tensor:
        """The drop fraction at ``step`` (int or integer tensor), a float64 scalar tensor."""
        span = float(self.end_step - self.begin_step)
        t = tf.clip_by_value(tf.cast(step, tf.float64) - float(self.begin_step), 0.0, span)
        return 0.5 * float(self.initial) * (1.0 + tf.cos(math.pi * t / span))


DROP_FRACTION_KINDS = ("constant", "cosine")
REGROW_METHODS = ("set", "rigl")


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
    unknown = sorted(set(spec) - set(fields))
    if unknown:
        raise FreezeConfigError(
            f"unknown drop_fraction key(s) {unknown} for kind {kind!r}; allowed: {sorted(set(fields) | {'kind'})}"
        )
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
    grown ones start at 0, and the optimizer slots of both are zeroed. The
    number of trainable elements of each variable never changes.

    Attributes:
      method: ``"set"`` or ``"rigl"``.
      drop_fraction: a :class:`ConstantDropFraction` or :class:`CosineDropFraction`.
      update_every_n_steps: the update period, optimizer steps (RigL: 100).
      end_step: the last step that updates; ``None`` = the cosine schedule's
        ``end_step`` (a constant fraction then updates until training ends).
      seed: SET's random seed (update at step ``t`` draws with ``[seed, t]``).
    """

    method: str
    drop_fraction: Union[ConstantDropFraction, CosineDropFraction]
    update_every_n_steps: int
    end_step: Optional[int] = None
    seed: int = 0

    KEYS = ("method", "drop_fraction", "update_every_n_steps", "end_step", "seed")

    @classmethod
    def from_mapping(cls, spec: Any) -> "RegrowSpec":
        """Builds a spec from a rule's ``regrow`` mapping.

        Raises:
          FreezeConfigError: not a mapping, unknown or missing keys, or bad values (named in the message).
        """
        if not isinstance(spec, Mapping):
            raise FreezeConfigError(f"regrow must be a mapping with keys {list(cls.KEYS)}, got {spec!r}")
        unknown = sorted(set(spec) - set(cls.KEYS))
        if unknown:
            raise FreezeConfigError(f"unknown regrow key(s) {unknown}; allowed: {list(cls.KEYS)}")
        missing = [k for k in ("method", "drop_fraction", "update_every_n_steps") if k not in spec]
        if missing:
            raise FreezeConfigError(f"regrow is missing {missing} (e.g. {{method: rigl, drop_fraction: 0.3, "
                                    "update_every_n_steps: 100})")
        method = spec["method"]
        if method not in REGROW_METHODS:
            raise FreezeConfigError(f"regrow.method must be one of {list(REGROW_METHODS)}, got {method!r}")
        every = spec["update_every_n_steps"]
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise FreezeConfigError(f"regrow.update_every_n_steps must be a positive integer, got {every!r}")
        schedule = make_drop_fraction_schedule(spec["drop_fraction"])
        end = spec.get("end_step")
        if end is not None and (isinstance(end, bool) or not isinstance(end, int) or end < 0):
            raise FreezeConfigError(f"regrow.end_step must be a non-negative integer or null, got {end!r}")
        if end is None and isinstance(schedule, CosineDropFraction):
            end = schedule.end_step
        seed = spec.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
            raise FreezeConfigError(f"regrow.seed must be an integer in [0, 2**31), got {seed!r}")
        return cls(method=method, drop_fraction=schedule, update_every_n_steps=every, end_step=end, seed=seed)

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
                    else f"drop {df.initial:g} (cosine to step {df.end_step})")
        until = f", until step {self.end_step}" if self.end_step is not None else ""
        return f"{self.method} every {self.update_every_n_steps} steps, {fraction}{until}"
