"""The non-finite guard of the train step: the policies, the choice of guard, and what a skipped step sets back.

A step whose loss or some gradient is NaN or infinite must write nothing:
no weight, optimizer slot or optimizer step, and nothing that the forward
pass wrote (BatchNorm's moving statistics, dropout's seed states). Two
guards do this bit-exactly (``Trainer(guard=...)``):

- ``"select"`` runs the update always and selects back what the optimizer
  wrote when the step is not finite
  (``registry.apply_gradients(apply_if=finite)``), so the update does not
  wait for the check's reduction over every gradient element;
- ``"cond"`` runs the update in the finite branch of one ``tf.cond``.

Either way the metrics and counters are updated in a ``tf.cond`` of their
own. Measured on LeNet-300-100 with 90 % compact (docs/benchmarks.md): the
select let the masked step run at Keras ``fit``'s rate where the cond cost
about 20 %; on a dense update the two cost the same time, and the select's
copy of every weight and slot costs memory, hence ``"auto"``. With
``nan_policy="unchecked"`` there is no guard (for ablations of its cost).
Everything here is decided when the step is traced.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from trainer.masks.updates import keep_where

NAN_POLICIES = ("stop", "skip_step", "unchecked")
GUARDS = ("auto", "select", "cond")


def check_policy(nan_policy: str, guard: str) -> None:
    """Refuses a ``nan_policy`` outside :data:`NAN_POLICIES` or a ``guard`` outside :data:`GUARDS`.

    Raises:
      ValueError: naming the bad value and listing the allowed ones.
    """
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {list(NAN_POLICIES)}, got {nan_policy!r}")
    if guard not in GUARDS:
        raise ValueError(f"guard must be one of {list(GUARDS)}, got {guard!r}")


def guard_for(nan_policy: str, guard: str, update_modes: Iterable[str]) -> Optional[str]:
    """The guard a step uses: ``"select"``, ``"cond"``, or ``None`` (``nan_policy="unchecked"``).

    Args:
      nan_policy: one of :data:`NAN_POLICIES`.
      guard: one of :data:`GUARDS`; ``"auto"`` takes ``"select"`` when some
        variable has a compact update (a select then copies only the ``[k]``
        trainable entries and slots) and ``"cond"`` otherwise (a select would
        copy every weight and slot of a dense update).
      update_modes: the update mode of every variable in the registry's plan
        (``registry.update_modes().values()``).
    """
    if nan_policy == "unchecked":
        return None
    if guard != "auto":
        return guard
    return "select" if "compact" in set(update_modes) else "cond"


def forward_writes(model: keras.Model, x: Any) -> List[keras.Variable]:
    """The model's non-trainable variables that ``model(x, training=True)`` assigns.

    BatchNormalization's moving statistics and the states of dropout's seed
    generators, for example: variables the forward pass writes before the
    non-finite check can run, which the step sets back when it skips or stops
    at a non-finite step. Found by tracing the call once under
    ``keras.StatelessScope`` (which records assignments instead of making
    them) in a graph of its own: nothing runs and nothing is written.
    Weights that are merely non-trainable (a frozen backbone) are not
    returned, so they cost the step nothing.

    Args:
      model: the model.
      x: one batch of inputs (tensors or a nest of them); only shapes and
        dtypes are used.

    Returns:
      The variables, in ``model.non_trainable_variables`` order.
    """
    spec = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), x)
    found: List[keras.Variable] = []

    def probe(inputs):
        with keras.StatelessScope(initialize_variables=False) as scope:
            model(inputs, training=True)
        found.extend(v for v in model.non_trainable_variables if scope.get_current_value(v) is not None)
        return tf.constant(0)

    tf.function(probe).get_concrete_function(spec)
    return found


def forward_undo(model: keras.Model, strategy: tf.distribute.Strategy, x: Any,
                 guard: Optional[str]) -> Callable[[tf.Tensor], None]:
    """Keeps what the forward pass is about to write, and returns ``undo(finite)`` that sets it back unless finite.

    Call it in the step before the forward pass. ``undo(finite)`` (``finite``
    a scalar bool Tensor) puts back, in every replica's copy, the values of
    :func:`forward_writes` when ``finite`` is False. Without a guard
    (``guard=None``) nothing is kept and ``undo`` does nothing.

    Args:
      model: the model.
      strategy: the step's strategy (``x`` may be a per-replica value).
      x: the step's batch of inputs.
      guard: :func:`guard_for`'s answer.
    """
    local_x = tf.nest.map_structure(lambda t: strategy.experimental_local_results(t)[0], x)
    written = [] if guard is None else forward_writes(model, local_x)
    before = [tf.identity(v.value) for v in written]

    def undo(finite: tf.Tensor) -> None:
        for variable, value in zip(written, before):
            keep_where(variable, finite, value)

    return undo


def global_norm(grads: Sequence[Any]) -> tf.Tensor:
    """The global L2 norm (float32 scalar) of the gradients present (``None`` skipped; ``IndexedSlices`` by values)."""
    present = [tf.cast(g.values if isinstance(g, tf.IndexedSlices) else g, tf.float32)
               for g in grads if g is not None]
    return tf.linalg.global_norm(present) if present else tf.constant(0.0)


def check(loss: tf.Tensor, grads: Sequence[Any], *, guard: Optional[str],
          optimizer: keras.optimizers.Optimizer) -> Tuple[tf.Tensor, Optional[tf.Tensor]]:
    """``(finite, norm)``: whether the loss and every gradient are finite, and the gradients' global norm.

    One reduction serves both: the global norm is non-finite exactly when
    some gradient element is (or when the squares overflow float32, which
    is treated as divergence too). A loss-scale optimizer skips overflowing
    steps itself, so only the loss is checked under it.

    Args:
      loss: the step's scalar loss.
      grads: the update gradients (Tensors, ``IndexedSlices`` or ``None``).
      guard: :func:`guard_for`'s answer; ``None`` computes nothing and
        returns ``(True, None)``.
      optimizer: the step's optimizer.

    Returns:
      A scalar bool Tensor and a float32 scalar Tensor (or ``None``).
    """
    if guard is None:
        return tf.constant(True), None
    norm = global_norm(grads)
    finite = tf.math.is_finite(loss)
    if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        finite = tf.logical_and(finite, tf.math.is_finite(norm))
    return finite, norm


def guarded(guard: Optional[str], finite: tf.Tensor, apply: Callable[..., None],
            record: Callable[[], tf.Tensor], skip: Callable[[], tf.Tensor]) -> tf.Tensor:
    """Runs ``apply`` and ``record`` when ``finite``, else ``skip``, under the guard (see the module's notes).

    Args:
      guard: ``"select"``, ``"cond"`` or ``None``.
      finite: a scalar bool Tensor (:func:`check`).
      apply: ``apply(apply_if=...)`` applies the update; under ``"select"``
        it gets ``finite`` and must select back what it wrote when that is
        False, else ``None``.
      record: updates the metrics and counters of an applied step; returns
        ``tf.constant(True)``.
      skip: counts a skipped step; returns ``tf.constant(False)``.

    Returns:
      A scalar bool Tensor: whether the step was applied.
    """
    def apply_and_record():
        apply(apply_if=None)
        return record()

    if guard is None:
        return apply_and_record()
    if guard == "select":
        apply(apply_if=finite)
        return tf.cond(finite, record, skip)
    return tf.cond(finite, apply_and_record, skip)
