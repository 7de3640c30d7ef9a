"""The compiled train step, for one replica or several, and the executions that run ``k`` of them.

The step (:func:`make_step`) is, in this order: forward pass under
``tf.GradientTape`` -> loss (plus ``model.losses``) -> gradients of the
not-fully-frozen variables -> ``registry.update_gradients`` (masked for a
dense update, gathered ``[k]`` for a compact one) -> the sum across replicas
-> the non-finite guard (:mod:`trainer.guard`) -> ``registry.apply_gradients``
(the optimizer, then frozen elements restored or the compact values scattered
back; a single-replica step leaves that scatter to :func:`write_back`,
run right after its function has returned, outside XLA) -> the metrics and counters. Which update a variable uses is the
registry's plan, not the step's; everything else the step decides (replicas,
guard, RigL capture) is decided when it is traced. ``k`` steps run inside one
``tf.function`` (:func:`make_execution`: ``for _ in tf.range(k)``, ``k`` a
Tensor, as in Orbit and Keras); :class:`Executions` builds them once per
registry structure.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence

import keras
import tensorflow as tf

from trainer import guard as guards
from trainer.masks import MaskRegistry, writeback
from trainer.masks.updates import CompactUpdate


class StepCounters:
    """The step's counters, ``tf.Variable`` s written inside the compiled step and read between executions.

    Created in the strategy's scope, each with ``ONLY_FIRST_REPLICA``
    aggregation (every replica writes the same value). Checkpointed (by
    :meth:`trainer.Trainer.checkpoint_objects`) under the keys
    ``skipped_steps``, ``examples_seen`` and ``batches_drawn``.

    Attributes:
      skipped: int64, steps dropped as non-finite (name ``skipped_steps``).
      nonfinite: bool, whether some step of the last execution met a
        non-finite loss or gradient (name ``nonfinite_seen``; reset as each
        execution starts, so a trainer that stopped on one trains again).
      examples: int64, training examples of applied steps (name ``examples_seen``).
      grad_norm: float32, the global L2 norm of the last applied step's update
        gradients (name ``grad_norm``; 0 under ``nan_policy="unchecked"``).
      batches: int64, batches drawn from the input pipeline, skipped steps
        included: a resumed run skips this many (name ``batches_drawn``).
    """

    def __init__(self):
        first = tf.VariableAggregation.ONLY_FIRST_REPLICA
        self.skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_steps", aggregation=first)
        self.nonfinite = tf.Variable(False, trainable=False, name="nonfinite_seen", aggregation=first)
        self.examples = tf.Variable(0, dtype=tf.int64, trainable=False, name="examples_seen", aggregation=first)
        self.grad_norm = tf.Variable(0.0, dtype=tf.float32, trainable=False, name="grad_norm", aggregation=first)
        self.batches = tf.Variable(0, dtype=tf.int64, trainable=False, name="batches_drawn", aggregation=first)

    def skip(self) -> tf.Tensor:
        """Counts a skipped (non-finite) step; returns ``tf.constant(False)`` (inside the step)."""
        self.skipped.assign_add(1)
        self.nonfinite.assign(True)
        return tf.constant(False)


class StepParts(Protocol):
    """What the step knows: a model, an optimizer, a loss, the mask state, its metrics and counters (no config)."""

    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    loss: Callable
    registry: MaskRegistry
    strategy: tf.distribute.Strategy
    counters: StepCounters
    train_loss: keras.metrics.Mean
    train_metrics: List[keras.metrics.Metric]
    nan_policy: str
    jit_compile: bool

    @property
    def guard_in_use(self) -> Optional[str]: ...


def outputs(model: keras.Model, loss_fn: Callable, x: Any, y: Any, *, training: bool):
    """``(y_pred, loss, regularization)``: the forward pass, cast to float32, the loss and ``model.losses``.

    The one place where the model meets the loss (train step, gradient
    summaries, evaluation). ``regularization`` is ``None`` when the model
    adds no loss; under mixed precision the outputs are cast so that the
    loss is computed in float32.
    """
    y_pred = model(x, training=training)
    if y_pred.dtype != tf.float32:
        y_pred = tf.cast(y_pred, tf.float32)
    loss = loss_fn(y, y_pred)
    regularization = tf.add_n(model.losses) if model.losses else None
    return y_pred, loss, regularization


def replica_gradients(parts: StepParts, x, y, count, variables: Sequence[tf.Variable], capture: bool):
    """One replica's half of the step: forward -> loss -> gradients -> ``registry.update_gradients``.

    ``count`` is the global batch size: this replica's mean loss is weighted
    by its share of the batch, so that the replicas' gradients *sum* to the
    gradient of the global mean (one replica: weight 1). Returns the update
    gradients (masked for a dense update, the trainable entries ``[k]`` for
    a compact one), the outputs, the loss (with ``model.losses``) times the
    local batch size, and with ``capture`` the raw gradients (for RigL's
    growth; else ``None``).
    """
    replicas = int(parts.strategy.num_replicas_in_sync)
    local = tf.shape(y)[0]
    weight = tf.cast(local, tf.float32) / tf.cast(count, tf.float32)
    with tf.GradientTape() as tape:
        y_pred, loss, regularization = outputs(parts.model, parts.loss, x, y, training=True)
        if replicas > 1 and isinstance(parts.loss, keras.losses.Loss):
            # In a replica context Keras divides a mean loss by the number of
            # replicas; undo it so `loss` is this replica's own mean.
            loss = loss * tf.cast(replicas, loss.dtype)
        objective = loss * weight
        if regularization is not None:
            objective = objective + regularization / replicas
        scaled = parts.optimizer.scale_loss(objective)
    raw = tape.gradient(scaled, variables)
    grads = parts.registry.update_gradients(raw, variables)  # masked, or gathered for compact updates
    if replicas > 1:  # all-reduced by the step: dense tensors
        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
    total = loss if regularization is None else loss + regularization
    raw = [None if g is None else tf.convert_to_tensor(g) for g in raw] if capture else None
    return grads, y_pred, total * tf.cast(local, total.dtype), raw


def record_step(parts: StepParts, norm, loss, count, y, y_pred) -> tf.Tensor:
    """The metrics and counters of an applied step (the gradient norm, loss, metrics, examples); ``True``."""
    if norm is not None:
        parts.counters.grad_norm.assign(norm)
    parts.train_loss.update_state(loss, sample_weight=tf.cast(count, tf.float32))
    for metric in parts.train_metrics:
        metric.update_state(y, y_pred)
    parts.counters.examples.assign_add(tf.cast(count, tf.int64))
    return tf.constant(True)


def make_step(parts: StepParts, capture: bool = False) -> Callable:
    """The train step ``step(x, y) -> applied``, one function for one replica or several (Keras' ``train_step``).

    forward -> loss -> gradients -> ``registry.update_gradients`` (in each
    replica, :func:`replica_gradients`) -> sum across replicas -> non-finite
    guard (:mod:`trainer.guard`; what the forward pass wrote is set back on a
    non-finite step) -> ``registry.apply_gradients`` (in cross-replica
    context Keras updates every replica's copy and the registry's write-back
    runs on every copy too) -> metrics and counters (:func:`record_step`). A
    non-finite loss or gradient on any replica skips (or stops) the step on
    all of them. One replica: the whole step is one XLA program
    (``jit_compile``); several: each replica's half is, traced per replica
    (:func:`per_replica_function`). With ``capture``, the step also stores
    the summed raw gradients for RigL (``registry.capture_gradients``).

    Args:
      parts: the trainer's model, optimizer, loss, registry, metrics and counters.
      capture: keep the raw gradients.

    Returns:
      ``step(x, y)`` returning a scalar bool Tensor (the update was applied):
      for one replica a function that calls the step's ``tf.function`` (XLA
      with ``jit_compile``), then :func:`write_back`, in place; a
      function for a ``tf.function`` (:func:`make_execution`) with several.
    """
    variables, strategy, guard = parts.registry.trainable_variables(), parts.strategy, parts.guard_in_use
    several = strategy.num_replicas_in_sync > 1

    def total(value):  # the sum over the replicas
        return strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) if several else value

    def forward(x, y, count):  # in each replica: forward, loss, gradients, update gradients
        return replica_gradients(parts, x, y, count, variables, capture)

    forward = per_replica_function(forward, jit_compile=parts.jit_compile) if several else forward

    def step(x, y):
        parts.counters.batches.assign_add(1)
        undo = guards.forward_undo(parts.model, strategy, x, guard)  # BatchNorm statistics, dropout seeds
        count = total(strategy.run(lambda t: tf.shape(t)[0], args=(y,)))
        grads, y_pred, loss_sum, raw = strategy.run(forward, args=(x, y, count))
        grads = [None if g is None else total(g) for g in grads]
        loss = total(loss_sum) / tf.cast(count, tf.float32)
        if capture:
            parts.registry.capture_gradients([None if g is None else total(g) for g in raw], variables)
        finite, norm = guards.check(loss, grads, guard=guard, optimizer=parts.optimizer)
        undo(finite)
        apply = functools.partial(parts.registry.apply_gradients, parts.optimizer, grads, variables)
        record = functools.partial(record_step, parts, norm, loss, count, concat_replicas(strategy, y),
                                   concat_replicas(strategy, y_pred))
        return guards.guarded(guard, finite, apply, record, parts.counters.skip)

    if several:  # called from the execution's tf.function: traced as it is, like the single-replica step
        return tf.autograph.experimental.do_not_convert(step)
    # The step leaves the compact write-back to the TensorFlow runtime, after the step's function has returned:
    # inside XLA a written variable gets a new full-size buffer, and inside one graph the scatter would copy
    # every kernel that a forward or backward read still holds (trainer.masks.writeback).
    compiled = tf.function(writeback.deferring(step), jit_compile=parts.jit_compile, reduce_retracing=True,
                           autograph=False)

    def step_then_write_back(x, y):
        applied = compiled(x, y)
        write_back(parts.registry)
        return applied

    return step_then_write_back


def compact_updates(registry: MaskRegistry) -> List[CompactUpdate]:
    """The :class:`~trainer.masks.updates.CompactUpdate` of every compactly updated variable of ``registry``.

    Built from the registry's tracked ``indices`` and ``compact`` dicts (keyed by variable path).
    """
    by_path = {v.path: v for v in registry.model.weights}
    return [CompactUpdate(by_path[path], registry.indices[path], registry.compact[path]) for path in registry.indices]


def write_back(registry: MaskRegistry) -> None:
    """Scatters every compact ``[k]`` variable of ``registry`` into its model variable, in place.

    Only the trainable elements are written (rounded to the variable's dtype
    where the compact values are float32 masters); frozen elements never are.
    Run outside an XLA program (eagerly or in a plain ``tf.function``): the
    TensorFlow runtime updates the variable's buffer in place, where XLA would
    materialize a new full-size one (:mod:`trainer.masks.writeback`). The
    single-replica XLA step (:func:`make_step`) calls it after every step.

    Raises:
      RuntimeError: called while :func:`trainer.masks.writeback.deferred` is active (it would write nothing).
    """
    if writeback.is_deferred():
        raise RuntimeError("write_back() inside writeback.deferred() writes nothing; call it after the XLA step")
    for update in compact_updates(registry):
        update.release()


def make_execution(step: Callable, last: Optional[Callable], *, counters: StepCounters,
                   stop_on_nonfinite: bool) -> Callable:
    """``k`` steps in one ``tf.function``: ``for _ in tf.range(k): step(next(iterator))`` (Orbit's shape).

    Args:
      step: the train step (:func:`make_step`).
      last: ``None``, or the step to run as the final one of the ``k`` (the
        step that keeps RigL's dense gradients).
      counters: the step's counters (``nonfinite`` ends the execution).
      stop_on_nonfinite: end the execution at the first non-finite step
        (``nan_policy="stop"``; the outer loop then raises).

    Returns:
      ``train_k(iterator, k)``, a ``tf.function``; ``k`` is an int64 scalar
      Tensor, so a new ``k`` does not retrace.
    """
    @tf.function
    def train_k(iterator, k):
        for _ in tf.range(k if last is None else k - 1):
            x, y = next(iterator)
            ok = step(x, y)
            if stop_on_nonfinite:
                if not ok:  # the outer loop raises NonFiniteLossError
                    break
        if last is not None and not (stop_on_nonfinite and counters.nonfinite):
            x, y = next(iterator)
            last(x, y)

    return train_k


class Executions:
    """The compiled executions of a trainer, built once per registry structure (a prune or regrow rebuilds them).

    Args:
      parts: the trainer (:class:`StepParts`).
    """

    def __init__(self, parts: StepParts):
        self.parts = parts
        self._functions: Dict[bool, Callable] = {}
        self._steps: Dict[bool, Callable] = {}
        self._structure: Optional[int] = None
        self._iterator, self._source = None, None

    @property
    def functions(self) -> Dict[bool, Callable]:
        """The executions built so far for the registry's current structure, keyed by capture (a new dict)."""
        return dict(self._functions) if self._structure == self.parts.registry.structure_version else {}

    def function(self, capture: bool = False) -> Callable:
        """The execution (with ``capture``: its last step keeps RigL's gradients), built once each.

        Both executions share the plain step (one trace, one XLA compilation).
        """
        registry = self.parts.registry
        if self._structure != registry.structure_version:
            self._functions, self._steps, self._structure = {}, {}, registry.structure_version
        for kind in {False, capture}:
            if kind not in self._steps:
                self._steps[kind] = make_step(self.parts, kind)
        if capture not in self._functions:
            self._functions[capture] = make_execution(
                self._steps[False], self._steps[True] if capture else None, counters=self.parts.counters,
                stop_on_nonfinite=self.parts.nan_policy == "stop")
        return self._functions[capture]

    def iterator(self, dataset: tf.data.Dataset):
        """The persistent iterator over ``dataset.repeat()`` (distributed to the replicas); a new dataset, a new one.

        A restored trainer (no iterator yet in this process) skips the
        batches its checkpoint says were drawn (``counters.batches``), to
        continue the same data order.
        """
        if self._iterator is not None and self._source is dataset:
            return self._iterator
        drawn = int(self.parts.counters.batches.numpy()) if self._iterator is None and self._source is None else 0
        repeated = dataset.repeat()
        repeated = repeated.skip(drawn) if drawn else repeated
        if self.parts.strategy.num_replicas_in_sync > 1:  # each replica gets its slice of every global batch
            repeated = self.parts.strategy.experimental_distribute_dataset(repeated)
        self._iterator, self._source = iter(repeated), dataset
        return self._iterator

    def train(self, iterator, k: int) -> None:
        """Runs ``k`` (positive) steps on ``iterator`` in one call of the right execution.

        The last step keeps the raw gradients when the registry's RigL update
        is due at the step the execution ends on.
        """
        step = int(self.parts.optimizer.iterations.numpy())
        self.parts.counters.nonfinite.assign(False)  # each execution reports its own non-finite step only
        self.function(capture=self.parts.registry.gradients_due(step + k))(iterator, tf.constant(k, dtype=tf.int64))


def per_replica_function(fn: Callable, *, jit_compile: bool) -> Callable:
    """``fn`` as a ``tf.function`` traced once per replica, for ``strategy.run``.

    One trace shared by every replica (what ``tf.function`` does by itself)
    makes XLA run replica 1's step on replica 0's device, which cannot reach
    replica 1's copy of a variable ("Trying to access resource ... located in
    device CPU:1 from device CPU:0"; TensorFlow's XLA known issue "tf.Variable
    on a different device"). A trace per replica keeps each step on its
    replica's device.

    Args:
      fn: the replica function.
      jit_compile: compile each trace with XLA.

    Returns:
      A callable for a replica context (outside one it uses replica 0's trace).
    """
    traces: Dict[int, Callable] = {}

    def call(*args):
        context = tf.distribute.get_replica_context()
        replica = 0 if context is None else int(tf.get_static_value(context.replica_id_in_sync_group) or 0)
        if replica not in traces:
            traces[replica] = tf.function(fn, jit_compile=jit_compile, reduce_retracing=True, autograph=False)
        return traces[replica](*args)

    return call


def concat_replicas(strategy: tf.distribute.Strategy, value: Any) -> tf.Tensor:
    """A per-replica batch as one global batch ``(sum of replica batches, ...)``, in cross-replica context.

    On one machine the replicas' tensors are concatenated directly; no
    collective runs, so replicas may hold batches of different sizes in any
    step of an execution (a partial last batch). Several workers use
    ``strategy.gather``.
    """
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return strategy.gather(value, axis=0)
    return tf.concat(strategy.experimental_local_results(value), axis=0)
