"""The masked training loop: a compiled GradientTape step inside an eager outer loop.

The step is, in this order: forward pass under ``tf.GradientTape`` -> loss
(plus ``model.losses``) -> gradients of the not-fully-frozen variables ->
``registry.update_gradients`` (masked for a dense update, gathered ``[k]`` for
a compact one) -> ``registry.apply_gradients`` (the optimizer, then frozen
elements restored or the compact values scattered back), guarded so that a
non-finite loss or gradient writes nothing (``Trainer(guard=...)``: select
back what the optimizer wrote, or one ``tf.cond``).
One step function serves one replica or several
(``strategy.run``). Which update a variable uses is the registry's plan,
not the step's. ``steps_per_execution``
steps run inside one ``tf.function`` (``for _ in tf.range(k)``, ``k`` a
Tensor, as in Orbit and Keras). The eager outer loop around the executions
(epochs, validation, hooks for summaries, checkpoints and logs) is
:class:`trainer.controller.Controller`; hooks see a
:class:`~trainer.controller.LoopState`, not the trainer.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from trainer import inputs
from trainer.callbacks import Callback
from trainer.controller import Controller, LoopState
from trainer.masks import MaskRegistry
from trainer.masks.updates import keep_where

log = logging.getLogger("trainer")

NAN_POLICIES = ("stop", "skip_step", "unchecked")
GUARDS = ("auto", "select", "cond")


def _metric(spec: Any) -> keras.metrics.Metric:
    if isinstance(spec, keras.metrics.Metric):
        return spec
    if spec in ("accuracy", "acc"):
        return keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    return keras.metrics.get(spec)


def _clone_metric(metric: keras.metrics.Metric) -> keras.metrics.Metric:
    return type(metric).from_config(metric.get_config())


class Trainer:
    """Trains a Keras model with element-level freezing.

    Args:
      model: a built ``keras.Model``.
      optimizer: any Keras 3 optimizer; it is built once with every
        trainable variable of the model.
      loss: a ``keras.losses.Loss`` or a callable ``(y_true, y_pred) -> scalar``.
      metrics: Keras metrics or names (``"accuracy"`` means
        ``SparseCategoricalAccuracy``: integer labels, logits or probabilities).
      registry: a :class:`~trainer.masks.MaskRegistry` of ``model``; ``None``
        trains without freezing.
      steps_per_execution: steps run inside one ``tf.function`` call
        (default 100: the fastest setting measured, README "Speed"; an
        execution always ends at an epoch's end and at ``max_steps``).
      jit_compile: compile the step with XLA (default on, as measured in
        README "Speed"; pass ``False`` for a model with ops XLA cannot compile).
      nan_policy: ``"stop"`` raises :class:`~trainer.controller.NonFiniteLossError` naming the
        step; ``"skip_step"`` drops that update (no weight, slot or step
        change, and what the forward pass wrote, BatchNorm statistics and
        dropout seed states, is set back: :func:`forward_writes`) and counts
        it in :attr:`skipped_steps`; ``"unchecked"`` has no guard
        and no gradient norm in the step (every update is applied, NaN
        included): for ablations of the guard's cost only.
      guard: how a non-finite step is kept from writing (``nan_policy``
        ``"stop"`` or ``"skip_step"``): ``"select"`` always runs the update
        and selects back what the optimizer wrote
        (``registry.apply_gradients(apply_if=finite)``), ``"cond"`` runs the
        update in one branch of a ``tf.cond``; ``"auto"`` (default) takes
        ``"select"`` when some variable has a compact update (it then copies
        only the ``[k]`` trainable entries and slots) and ``"cond"`` otherwise
        (a select would copy every weight and slot of a dense update). Both
        are bit-exact; they differ in speed and memory (README "Speed").
      strategy: a ``tf.distribute.Strategy`` (e.g. ``MirroredStrategy``);
        the model, optimizer and registry must have been created in its
        scope. Each dataset batch is the *global* batch, split across replicas.

    Raises:
      ValueError: a bad ``steps_per_execution``, ``nan_policy`` or ``guard``, or a
        registry made for another model.
    """

    def __init__(
        self,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        loss: Callable,
        *,
        metrics: Sequence[Any] = (),
        registry: Optional[MaskRegistry] = None,
        steps_per_execution: int = 100,
        jit_compile: bool = True,
        nan_policy: str = "stop",
        guard: str = "auto",
        strategy: Optional[tf.distribute.Strategy] = None,
    ):
        if isinstance(steps_per_execution, bool) or not isinstance(steps_per_execution, int) or steps_per_execution < 1:
            raise ValueError(f"steps_per_execution must be a positive integer, got {steps_per_execution!r}")
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {list(NAN_POLICIES)}, got {nan_policy!r}")
        if guard not in GUARDS:
            raise ValueError(f"guard must be one of {list(GUARDS)}, got {guard!r}")
        if registry is not None and registry.model is not model:
            raise ValueError("the registry was made for another model: build it with MaskRegistry(model)")
        self.strategy = strategy if strategy is not None else tf.distribute.get_strategy()
        self.replicas = int(self.strategy.num_replicas_in_sync)
        self.model = model
        self.optimizer = optimizer
        self.loss = keras.losses.get(loss) if isinstance(loss, str) else loss
        self.registry = registry if registry is not None else MaskRegistry(model)
        self.steps_per_execution = steps_per_execution
        self.jit_compile = bool(jit_compile)
        self.nan_policy = nan_policy
        self.guard = guard
        # Metrics live outside the strategy: under several replicas they are
        # updated in cross-replica context with the gathered global batch.
        self.train_metrics = [_metric(m) for m in metrics]
        self.eval_metrics = [_clone_metric(m) for m in self.train_metrics]
        self.train_loss = keras.metrics.Mean(name="loss")
        self.eval_loss = keras.metrics.Mean(name="loss")
        with self.strategy.scope():
            self.registry.attach_optimizer(optimizer)
            first = tf.VariableAggregation.ONLY_FIRST_REPLICA  # counters written identically by every replica
            self.skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_steps", aggregation=first)
            self.nonfinite = tf.Variable(False, trainable=False, name="nonfinite_seen", aggregation=first)
            self.examples = tf.Variable(0, dtype=tf.int64, trainable=False, name="examples_seen", aggregation=first)
            # Global L2 norm of the last applied step's masked gradients, read by
            # summaries between executions (assigned in the step, never logged there).
            self.grad_norm = tf.Variable(0.0, dtype=tf.float32, trainable=False, name="grad_norm", aggregation=first)
            # Batches drawn from the input pipeline (skipped steps included): a
            # resumed run skips this many to continue the same data order.
            self.batches = tf.Variable(0, dtype=tf.int64, trainable=False, name="batches_drawn", aggregation=first)
        self.train_iterator = None
        # Where the run stands, set by the controller during fit() (LoopState gives them to hooks).
        self.epoch, self.epoch_first_step, self.epochs_done = 0, 0, 0
        self.steps_per_epoch: Optional[int] = None
        self.total_steps: Optional[int] = None
        self.final_epoch: Optional[int] = None
        # SIGINT/SIGTERM (run.py) ask for an interrupted stop; request_stop() (early stopping) a completed one.
        self.stop_requested, self.stop_training = False, False
        self._train_fn: Dict[bool, Callable] = {}
        self._steps: Dict[bool, Callable] = {}
        self._structure = None
        self._eval_fn = None
        self.timing: Dict[str, float] = {}
        # The prune-and-regrow updates after the last execution (MaskRegistry.regrow), for hooks.
        self.regrow_events: List[Dict[str, Any]] = []
        # How the last fit() ended: "completed", "interrupted" (stop_requested
        # before the last step) or "failed" (it raised); None before any fit().
        self.status: Optional[str] = None
        # fit() across calls: the dataset behind train_iterator.
        self._train_source, self._predict_fn = None, None

    # ---------------------------------------------------------------- state
    @property
    def step(self) -> int:
        """The number of optimizer updates applied so far (``optimizer.iterations``)."""
        return int(self.optimizer.iterations.numpy())

    @property
    def skipped_steps(self) -> int:
        return int(self.skipped.numpy())

    # ---------------------------------------------------------- compiled step
    def _outputs(self, x, y, *, training: bool):
        """``(y_pred, loss, regularization)``: the forward pass, cast to float32, the loss and ``model.losses``.

        The one place where the model meets the loss (train step, gradient
        summaries, evaluation). ``regularization`` is ``None`` when the model
        adds no loss; under mixed precision the outputs are cast so that the
        loss is computed in float32.
        """
        y_pred = self.model(x, training=training)
        if y_pred.dtype != tf.float32:
            y_pred = tf.cast(y_pred, tf.float32)
        loss = self.loss(y, y_pred)
        regularization = tf.add_n(self.model.losses) if self.model.losses else None
        return y_pred, loss, regularization

    def _replica_step(self, x, y, count, variables, capture=False):
        """One replica's half of the step: forward -> loss -> gradients -> ``registry.update_gradients``.

        ``count`` is the global batch size: this replica's mean loss is weighted
        by its share of the batch, so that the replicas' gradients *sum* to the
        gradient of the global mean (one replica: weight 1). Returns the update
        gradients (masked for a dense update, the trainable entries ``[k]`` for
        a compact one), the outputs, the loss (with ``model.losses``)
        times the local batch size, and with ``capture`` the raw gradients
        (for RigL's growth; else ``None``).
        """
        local = tf.shape(y)[0]
        weight = tf.cast(local, tf.float32) / tf.cast(count, tf.float32)
        with tf.GradientTape() as tape:
            y_pred, loss, regularization = self._outputs(x, y, training=True)
            if self.replicas > 1 and isinstance(self.loss, keras.losses.Loss):
                # In a replica context Keras divides a mean loss by the number of
                # replicas; undo it so `loss` is this replica's own mean.
                loss = loss * tf.cast(self.replicas, loss.dtype)
            objective = loss * weight
            if regularization is not None:
                objective = objective + regularization / self.replicas
            scaled = self.optimizer.scale_loss(objective)
        raw = tape.gradient(scaled, variables)
        grads = self.registry.update_gradients(raw, variables)  # masked, or gathered for compact updates
        if self.replicas > 1:  # all-reduced below: dense tensors
            grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        total = loss if regularization is None else loss + regularization
        raw = [None if g is None else tf.convert_to_tensor(g) for g in raw] if capture else None
        return grads, y_pred, total * tf.cast(local, total.dtype), raw

    @staticmethod
    def _norm(grads):
        """The global L2 norm of the gradients (float32)."""
        present = [tf.cast(g.values if isinstance(g, tf.IndexedSlices) else g, tf.float32)
                   for g in grads if g is not None]
        return tf.linalg.global_norm(present) if present else tf.constant(0.0)

    def _check(self, total, grads):
        """``(finite, norm)``: whether the loss and every gradient are finite, and the gradients' global norm.

        One reduction serves both: the global norm is non-finite exactly when
        some gradient element is (or when the squares overflow float32, which
        is treated as divergence too). A loss-scale optimizer skips
        overflowing steps itself, so only the loss is checked under it.
        ``nan_policy="unchecked"``: ``(True, None)``, nothing computed.
        """
        if self.nan_policy == "unchecked":
            return tf.constant(True), None
        norm = self._norm(grads)
        finite = tf.math.is_finite(total)
        if not isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            finite = tf.logical_and(finite, tf.math.is_finite(norm))
        return finite, norm

    @property
    def guard_in_use(self) -> Optional[str]:
        """The non-finite guard the step uses now: ``"select"``, ``"cond"``, or ``None`` (``nan_policy="unchecked"``).

        ``guard="auto"`` resolves by the registry's current plan (a prune or
        regrow update may change it; the step is rebuilt then).
        """
        if self.nan_policy == "unchecked":
            return None
        if self.guard != "auto":
            return self.guard
        return "select" if "compact" in self.registry.update_modes().values() else "cond"

    def _apply_or_skip(self, finite, norm, grads, variables, loss, count, y, y_pred):
        """Applies the update gradients (frozen elements never change) if ``finite``, else changes nothing.

        The non-finite guard (:attr:`guard_in_use`): ``"select"`` runs the
        update always and selects back what the optimizer wrote when the step
        is not finite, so the update does not wait for the check's reduction
        over every gradient element; ``"cond"`` runs it in the finite branch
        of a ``tf.cond``. Either way a non-finite step writes no weight, slot
        or optimizer step (bit-exact), and the metrics and counters are
        updated in a ``tf.cond`` of their own. Measured on LeNet-300-100 with
        90 % compact (README "Speed"): the select let the masked step run at
        Keras ``fit``'s rate where the cond cost about 20 %; on a dense
        update the two cost the same time, and the select's copy of every
        weight and slot costs memory, hence ``"auto"``. With
        ``nan_policy="unchecked"`` there is no guard (for ablations).
        Returns ``finite``.
        """
        guard = self.guard_in_use

        def apply():
            # dense: restore frozen elements; compact: scatter the [k] values
            self.registry.apply_gradients(self.optimizer, grads, variables,
                                          apply_if=finite if guard == "select" else None)

        def record():
            if norm is not None:
                self.grad_norm.assign(norm)
            self.train_loss.update_state(loss, sample_weight=tf.cast(count, tf.float32))
            for metric in self.train_metrics:
                metric.update_state(y, y_pred)
            self.examples.assign_add(tf.cast(count, tf.int64))
            return tf.constant(True)

        def skip():
            self.skipped.assign_add(1)
            self.nonfinite.assign(True)
            return tf.constant(False)

        def apply_and_record():
            apply()
            return record()

        if guard is None:
            return apply_and_record()
        if guard == "select":
            apply()
            return tf.cond(finite, record, skip)
        return tf.cond(finite, apply_and_record, skip)

    def _execution(self, step, last=None):
        """``k`` steps in one ``tf.function``: ``for _ in tf.range(k): step(next(iterator))`` (Orbit's shape).

        With ``last``, the final step of the ``k`` is ``last`` instead (the
        step that keeps RigL's dense gradients).
        """
        stop_on_nonfinite = self.nan_policy == "stop"

        @tf.function
        def train_k(iterator, k):
            for _ in tf.range(k if last is None else k - 1):
                x, y = next(iterator)
                ok = step(x, y)
                if stop_on_nonfinite:
                    if not ok:  # the outer loop raises NonFiniteLossError
                        break
            if last is not None and not (stop_on_nonfinite and self.nonfinite):
                x, y = next(iterator)
                last(x, y)

        return train_k

    def _make_step(self, capture: bool = False):
        """The train step, one function for one replica or several (as Keras' ``train_step`` under ``strategy.run``).

        forward -> loss -> gradients -> ``registry.update_gradients`` (in each
        replica, :meth:`_replica_step`) -> sum across replicas -> non-finite
        guard -> ``registry.apply_gradients`` (the optimizer, then frozen
        elements restored or compact values scattered back; in cross-replica
        context Keras updates every replica's copy and the registry's
        write-back runs on every copy too). A non-finite loss or gradient on
        any replica skips (or stops) the step on all of them. One replica:
        the whole step is one XLA program (``jit_compile``); several: each
        replica's half is, traced per replica (:func:`per_replica_function`).
        With ``capture``, the step also stores the summed raw gradients for
        the registry's RigL updates (``registry.capture_gradients``).
        """
        variables = self.registry.trainable_variables()
        strategy, several = self.strategy, self.replicas > 1
        SUM = tf.distribute.ReduceOp.SUM

        def sum_replicas(value):
            return strategy.reduce(SUM, value, axis=None) if several else value

        def replica_step(x, y, count):
            return self._replica_step(x, y, count, variables, capture=capture)

        if several:
            replica_step = per_replica_function(replica_step, jit_compile=self.jit_compile)

        def step(x, y):
            self.batches.assign_add(1)
            # what the forward pass writes (BatchNorm statistics, dropout seeds), kept to undo a non-finite step
            local_x = tf.nest.map_structure(lambda t: strategy.experimental_local_results(t)[0], x)
            written = [] if self.guard_in_use is None else forward_writes(self.model, local_x)
            before = [tf.identity(v.value) for v in written]
            count = sum_replicas(strategy.run(lambda t: tf.shape(t)[0], args=(y,)))
            grads, y_pred, loss_sum, raw = strategy.run(replica_step, args=(x, y, count))
            grads = [None if g is None else sum_replicas(g) for g in grads]
            loss = sum_replicas(loss_sum) / tf.cast(count, tf.float32)
            if capture:
                self.registry.capture_gradients([None if g is None else sum_replicas(g) for g in raw], variables)
            finite, norm = self._check(loss, grads)
            for variable, value in zip(written, before):
                keep_where(variable, finite, value)
            return self._apply_or_skip(finite, norm, grads, variables, loss, count,
                                       concat_replicas(strategy, y), concat_replicas(strategy, y_pred))

        if not several:
            step = tf.function(step, jit_compile=self.jit_compile, reduce_retracing=True)
        return step

    @property
    def train_functions(self) -> Dict[bool, Callable]:
        """The compiled executions built so far for the registry's current structure.

        Keyed by whether the execution's last step keeps RigL's gradients;
        each is a ``tf.function`` (``experimental_get_tracing_count()`` tells
        whether it retraced). A new dict each call.
        """
        return dict(self._train_fn) if self._structure == self.registry.structure_version else {}

    def _train_function(self, capture: bool = False):
        """The compiled execution (with ``capture``: its last step keeps RigL's gradients), built once each.

        Both executions share the plain step (one trace, one XLA compilation).
        """
        if self._structure != self.registry.structure_version:
            self._train_fn, self._steps, self._structure = {}, {}, self.registry.structure_version
        for kind in {False, capture}:
            if kind not in self._steps:
                self._steps[kind] = self._make_step(kind)
        if capture not in self._train_fn:
            self._train_fn[capture] = self._execution(self._steps[False], self._steps[True] if capture else None)
        return self._train_fn[capture]

    def masked_gradients(self, x, y) -> List[tuple]:
        """The masked gradients of the loss on one batch, computed eagerly (for summaries).

        For the outer loop only (e.g. gradient histograms between executions).
        The model runs with ``training=False`` so that the call changes no
        state (batch-norm statistics, dropout seed generators): logging does
        not change the run. Nothing is applied.

        Args:
          x: one batch of inputs, as the model takes them.
          y: its labels, as the loss takes them.

        Returns:
          ``[(variable, gradient)]`` for ``registry.trainable_variables()``:
          each gradient a dense ``tf.Tensor`` of the variable's shape and dtype
          with every frozen element exactly 0, or ``None`` when the variable
          does not affect the loss.
        """
        variables = self.registry.trainable_variables()
        with tf.GradientTape() as tape:
            _, loss, regularization = self._outputs(x, y, training=False)
            total = loss if regularization is None else loss + regularization
        grads = self.registry.mask_gradients(tape.gradient(total, variables), variables)
        return [(v, None if g is None else tf.convert_to_tensor(g)) for v, g in zip(variables, grads)]

    def _make_eval_function(self):
        def step(x, y):
            y_pred, loss, _ = self._outputs(x, y, training=False)
            self.eval_loss.update_state(loss, sample_weight=tf.shape(y)[0])
            for metric in self.eval_metrics:
                metric.update_state(y, y_pred)

        compiled_step = tf.function(step, jit_compile=self.jit_compile, reduce_retracing=True)

        @tf.function
        def run(dataset):
            for x, y in dataset:
                compiled_step(x, y)  # reads each variable's (identical) primary copy

        return run

    # ----------------------------------------------------------------- loops
    @staticmethod
    def _results(loss_metric, metrics, prefix: str = "") -> Dict[str, float]:
        out = {prefix + "loss": float(loss_metric.result())}
        for m in metrics:
            out[prefix + m.name] = float(m.result())
        return out

    def evaluate(self, x: Any, y: Any = None, *, batch_size: Optional[int] = None) -> Dict[str, float]:
        """Runs the model over a finite dataset of ``(x, y)`` batches, or over arrays ``x, y``.

        Args:
          x: a batched ``tf.data.Dataset`` of ``(x, y)``, or an input array.
          y: the labels when ``x`` is an array.
          batch_size: batch size for arrays (default 32).

        Returns:
          ``{"loss": mean loss per example, <metric name>: value, ...}``.
        """
        dataset = inputs.evaluation_inputs(x, y, batch_size=batch_size)
        if self._eval_fn is None:
            self._eval_fn = self._make_eval_function()
        self.eval_loss.reset_state()
        for m in self.eval_metrics:
            m.reset_state()
        self._eval_fn(dataset)
        return self._results(self.eval_loss, self.eval_metrics)

    def predict(self, x: Any, *, batch_size: Optional[int] = None) -> np.ndarray:
        """The model's outputs (``training=False``) for every example, as one NumPy array.

        Args:
          x: an input array ``(N, ...)``, or a batched ``tf.data.Dataset`` of
            inputs or of ``(x, y)`` pairs (labels are ignored).
          batch_size: batch size for arrays (default 32).

        Returns:
          The outputs concatenated over batches, ``(N, ...)`` (logits for the
          project's models; ``argmax(-1)`` gives the class).
        """
        dataset = x if inputs.is_dataset(x) else inputs.from_arrays(x, None, batch_size, shuffle=False, seed=None)
        if isinstance(dataset.element_spec, tuple):
            dataset = dataset.map(lambda features, *rest: features)
        if self._predict_fn is None:
            self._predict_fn = tf.function(lambda batch: self.model(batch, training=False), reduce_retracing=True)
        outputs = [np.asarray(self._predict_fn(batch)) for batch in dataset]
        if not outputs:
            raise ValueError("predict got no batches")
        return np.concatenate(outputs, axis=0)

    def _check_inputs(self, dataset: tf.data.Dataset) -> None:
        """Refuses a dataset whose inputs do not fit the model, before any step runs."""
        spec = dataset.element_spec
        if not isinstance(spec, tuple) or len(spec) != 2:
            raise ValueError(f"the training dataset must yield batched (x, y) pairs, got elements of {spec}")
        first = tf.nest.flatten(spec[0])[0]  # inputs may be a dict of tensors (e.g. keras_hub models)
        if first.shape.rank is not None and first.shape.rank > 0 and spec[1].shape.rank == 0:
            raise ValueError("the training dataset yields single examples, not batches: batch it with "
                             "dataset.batch(n), or pass NumPy arrays with batch_size")
        expected = getattr(self.model, "input_shape", None)
        if (isinstance(spec[0], tf.TensorSpec) and isinstance(expected, tuple)
                and all(isinstance(d, (int, type(None))) for d in expected)):
            got = tuple(spec[0].shape)[1:]
            want = tuple(expected)[1:]
            if len(got) != len(want) or any(g is not None and w is not None and g != w for g, w in zip(got, want)):
                raise ValueError(f"the model expects inputs of shape (batch, {', '.join(map(str, want))}) "
                                 f"but the dataset yields {spec[0].shape}")

    def _iterator_for(self, train_ds: tf.data.Dataset):
        """The persistent iterator over ``train_ds.repeat()``; a new dataset gets a new iterator.

        A restored trainer (no iterator yet in this process) skips the batches
        its checkpoint says were drawn, to continue the same data order.
        """
        if self.train_iterator is not None and self._train_source is train_ds:
            return self.train_iterator
        drawn = int(self.batches.numpy()) if self.train_iterator is None and self._train_source is None else 0
        repeated = train_ds.repeat()
        repeated = repeated.skip(drawn) if drawn else repeated
        if self.replicas > 1:  # each replica gets its slice of every global batch
            repeated = self.strategy.experimental_distribute_dataset(repeated)
        self.train_iterator = iter(repeated)
        self._train_source = train_ds
        return self.train_iterator

    def fit(
        self,
        x: Any,
        y: Any = None,
        *,
        batch_size: Optional[int] = None,
        epochs: int = 1,
        validation_data: Any = None,
        validation_split: float = 0.0,
        shuffle: bool = True,
        seed: Optional[int] = None,
        initial_epoch: Optional[int] = None,
        max_steps: Optional[int] = None,
        steps_per_epoch: Optional[int] = None,
        callbacks: Iterable[Callback] = (),
        verbose: Any = "auto",
    ) -> List[Dict[str, float]]:
        """Trains ``epochs`` epochs on the data it is given, as Keras' ``Model.fit`` does.

        Each call trains ``epochs`` more epochs from where the trainer stands
        (``fit(ds, epochs=1)`` three times trains three epochs), on the data
        of *this* call: a dataset seen in the previous call continues its
        persistent iterator over ``dataset.repeat()`` (re-creating a
        ``tf.data`` iterator every epoch can stall the input pipeline), any
        other data gets a new iterator. ``initial_epoch`` is Keras' resume
        form: epochs are then counted from optimizer step 0, so
        ``fit(ds, epochs=20, initial_epoch=0)`` after restoring a checkpoint
        of step 500 trains from step 500 to the end of epoch 20.

        Args:
          x: a *batched* ``tf.data.Dataset`` of ``(x, y)`` pairs, or a NumPy
            input array ``(N, ...)``. Shuffle a dataset with
            ``reshuffle_each_iteration=True`` for a new order each epoch.
          y: the labels ``(N,)`` when ``x`` is an array. When ``x`` is a
            dataset, ``y`` may be the validation dataset (``fit(train_ds,
            val_ds)``).
          batch_size: examples per batch for arrays (default 32).
          epochs: epochs to train in this call; with ``initial_epoch``, the
            last epoch of the whole run.
          validation_data: a batched dataset of ``(x, y)`` or an ``(x_val,
            y_val)`` tuple, evaluated after every epoch (keys get ``val_``).
          validation_split: for arrays, the last fraction of ``x, y`` (before
            shuffling) held out for validation.
          shuffle: reshuffle arrays every epoch (datasets are used as given).
          seed: the shuffle seed for arrays.
          initial_epoch: ``None`` (train ``epochs`` more epochs) or the epoch
            at which the trainer stands when resuming: the optimizer step must
            lie between that epoch's first step and the end of epoch
            ``epochs`` (at the end, nothing is trained).
          max_steps: an optional cap on the optimizer step
            (``optimizer.iterations``, counted over the trainer's life).
          steps_per_epoch: batches per epoch; by default the dataset's
            cardinality, which must then be known.
          callbacks: outer-loop hooks (:mod:`trainer.callbacks`:
            ``EarlyStopping``, ``BestWeights``, ``LogLines``; ``ProgressBar``
            in :mod:`trainer.progress`), each called with a
            :class:`~trainer.controller.LoopState`.
          verbose: ``"auto"`` shows a progress bar when standard output is a
            terminal and the ``CI`` variable is unset; ``True`` always,
            ``False`` never. Ignored when ``callbacks`` already hold a display.

        Returns:
          One logs dict per completed epoch of this call.

        Raises:
          ValueError: the epoch length is unknown or zero, ``epochs`` /
            ``max_steps`` is not a positive integer, ``initial_epoch`` does not
            match the optimizer step, or the inputs do not fit the model.
          TypeError: inputs that are neither a dataset nor arrays.
          NonFiniteLossError: with ``nan_policy="stop"``, at the first
            non-finite loss or gradient (that update is not applied).
        """
        train_ds, validation_ds = inputs.training_inputs(
            x, y, batch_size=batch_size, validation_data=validation_data, validation_split=validation_split,
            shuffle=shuffle, seed=seed)
        if steps_per_epoch is None:
            steps_per_epoch = int(train_ds.cardinality().numpy())
            if steps_per_epoch < 0:
                raise ValueError("the training dataset's length is unknown or infinite: pass steps_per_epoch")
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch <= 0:
            raise ValueError(f"an epoch must have at least one step, got steps_per_epoch={steps_per_epoch!r}")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"max_steps must be a positive integer or None, got {max_steps!r}")
        if initial_epoch is not None and (isinstance(initial_epoch, bool) or not isinstance(initial_epoch, int)
                                          or not 0 <= initial_epoch < epochs):
            raise ValueError(f"initial_epoch must be an integer in [0, epochs={epochs}), got {initial_epoch!r}")
        self._check_inputs(train_ds)
        step = self.step
        if initial_epoch is None:  # `epochs` more epochs from here
            origin, base = step, self.epochs_done
            total = step + epochs * steps_per_epoch
        else:  # Keras' resume form: epochs counted from optimizer step 0
            if not initial_epoch * steps_per_epoch <= step <= epochs * steps_per_epoch:
                raise ValueError(
                    f"initial_epoch={initial_epoch} with epochs={epochs} covers optimizer steps "
                    f"[{initial_epoch * steps_per_epoch}, {epochs * steps_per_epoch}] at {steps_per_epoch} steps "
                    f"per epoch, but the trainer is at step {step}: restore a checkpoint of that epoch first, "
                    "raise epochs, or leave initial_epoch out to train `epochs` more epochs from here")
            origin, base = 0, 0
            total = epochs * steps_per_epoch
        if max_steps is not None:
            total = min(total, max_steps)
        callbacks = list(callbacks)
        if not any(getattr(cb, "display", False) for cb in callbacks):
            display = default_display(verbose)
            if display is not None:
                callbacks.insert(0, display)
        controller = Controller(self, callbacks, steps_per_epoch=steps_per_epoch, total=total,
                                epoch_origin=origin, epoch_base=base)
        self.steps_per_epoch, self.total_steps, self.stop_training = steps_per_epoch, total, False
        self.final_epoch = controller.epoch_of(max(total - 1, origin)) + 1
        return controller.run(self._iterator_for(train_ds), validation_ds)

    # ------------------------------------------------- what the controller calls
    def train_steps(self, iterator, k: int) -> None:
        """Runs ``k`` train steps on ``iterator`` in one compiled execution (one ``tf.function`` call).

        The execution's last step also keeps the raw gradients when the
        registry's RigL update is due at the step the execution ends on.
        Skipped (non-finite) steps count as steps here but do not advance
        :attr:`step`; with ``nan_policy="stop"`` the execution ends at the
        first one (:attr:`nonfinite_seen` tells).

        Args:
          iterator: an iterator over ``(x, y)`` batches (from a dataset that
            repeats: it is drawn ``k`` times).
          k: the number of steps (positive).
        """
        train_fn = self._train_function(capture=self.registry.gradients_due(self.step + k))
        train_fn(iterator, tf.constant(k, dtype=tf.int64))

    @property
    def nonfinite_seen(self) -> bool:
        """True once a step met a non-finite loss or gradient (and was not applied)."""
        return bool(self.nonfinite.numpy())

    def train_logs(self) -> Dict[str, float]:
        """The running training metrics of the current epoch: ``{"loss": ..., <metric>: ...}``.

        Under ``nan_policy="skip_step"`` also ``skipped_steps`` (the trainer's
        total, as a float).
        """
        logs = self._results(self.train_loss, self.train_metrics)
        if self.nan_policy == "skip_step":
            logs["skipped_steps"] = float(self.skipped_steps)
        return logs

    def reset_train_metrics(self) -> None:
        """Starts the training loss and metrics over (at an epoch's end)."""
        self.train_loss.reset_state()
        for m in self.train_metrics:
            m.reset_state()

    def checkpoint_objects(self) -> Dict[str, Any]:
        """Every object an exact resume needs, by checkpoint key (see :class:`~trainer.controller.LoopState`)."""
        return dict(
            model=self.model,
            optimizer=self.optimizer,
            registry=self.registry,
            skipped_steps=self.skipped,
            examples_seen=self.examples,
            batches_drawn=self.batches,
            # the running epoch's training loss and metrics, so a mid-epoch resume logs the same epoch
            train_metrics=[v for metric in (self.train_loss, *self.train_metrics) for v in metric.variables],
        )

    def request_stop(self) -> None:
        """Ends ``fit`` after the current execution, with status ``"completed"`` (an early stop)."""
        self.stop_training = True

    def state(self) -> LoopState:
        """Where the run stands now, as the hooks see it (:class:`~trainer.controller.LoopState`)."""
        return LoopState(
            step=self.step,
            epoch=self.epoch,
            epoch_first_step=self.epoch_first_step,
            steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps,
            final_epoch=self.final_epoch,
            examples=int(self.examples.numpy()),
            skipped_steps=self.skipped_steps,
            gradient_norm=None if self.nan_policy == "unchecked" else float(self.grad_norm.numpy()),
            regrow_events=tuple(self.regrow_events),
            timing=dict(self.timing),
            model=self.model,
            optimizer=self.optimizer,
            registry=self.registry,
            checkpoint_objects=self.checkpoint_objects(),
            masked_gradients=self.masked_gradients,
            request_stop=self.request_stop,
        )


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
            traces[replica] = tf.function(fn, jit_compile=jit_compile, reduce_retracing=True)
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


def default_display(verbose: Any) -> Optional[Callback]:
    """The display ``fit`` adds by itself: a progress bar in a terminal, nothing otherwise.

    Args:
      verbose: ``"auto"`` (a bar when ``sys.stdout`` is a terminal and the
        ``CI`` environment variable is unset), ``True``/``1`` (always a bar),
        ``False``/``0`` (none).

    Raises:
      ValueError: any other value.
    """
    from trainer.progress import ProgressBar

    if verbose == "auto":
        show = sys.stdout.isatty() and not os.environ.get("CI")
    elif verbose in (True, False, 0, 1):
        show = bool(verbose)
    else:
        raise ValueError(f"verbose must be 'auto', True or False, got {verbose!r}")
    return ProgressBar() if show else None
