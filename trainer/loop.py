"""The trainer: a compiled masked step (:mod:`trainer.step`) inside an eager outer loop (:mod:`trainer.controller`).

:class:`Trainer` holds what the step knows (a model, an optimizer, a loss,
the :class:`~trainer.masks.MaskRegistry`, the metrics and the step's
counters), checks its arguments, and offers ``fit`` / ``evaluate`` /
``predict`` as Keras does. The step, for one replica or several, and the
executions of ``k`` steps in one ``tf.function`` are :mod:`trainer.step`;
the non-finite guard is :mod:`trainer.guard`. ``fit`` hands the call to a
:class:`~trainer.controller.Controller`, which owns where the run stands
(:class:`~trainer.controller.Progress`, read by the properties here) and
calls the hooks with a :class:`~trainer.controller.LoopState`, not the
trainer.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from trainer import fit_checks, inputs
from trainer.callbacks import Callback
from trainer.controller import Controller, Progress, check_lengths
from trainer.hooks import LoopState, default_display, with_display  # noqa: F401 (default_display re-exported)
from trainer.guard import GUARDS, NAN_POLICIES, check_policy, forward_writes, guard_for  # noqa: F401 (re-exported)
from trainer.masks import MaskRegistry
from trainer.masks.checks import positive_int
from trainer.history import History
from trainer.identifiers import loss_from, optimizer_from
from trainer.keras_callbacks import adapt_callbacks
from trainer.evaluation import Evaluator, clone_metric, make_metric, masked_gradients, results
from trainer.step import Executions, StepCounters


def _read(name: str, doc: str) -> property:
    """A read-only property of the trainer that reads the controller's :class:`~trainer.controller.Progress`."""
    return property(lambda trainer: getattr(trainer.progress, name), doc=doc)


class Trainer:
    """Trains a Keras model with element-level freezing.

    Args:
      model: a built ``keras.Model``.
      optimizer: any Keras 3 optimizer, or its identifier as
        ``keras.optimizers.get`` takes it (``"adam"``); it is built once with
        every trainable variable of the model.
      loss: a ``keras.losses.Loss``, its name (``"sparse_categorical_crossentropy"``)
        or a callable ``(y_true, y_pred) -> scalar``.
      metrics: Keras metrics or names (``"accuracy"`` means
        ``SparseCategoricalAccuracy``: integer labels, logits or probabilities).
      registry: a :class:`~trainer.masks.MaskRegistry` of ``model``; ``None``
        trains without freezing.
      steps_per_execution: steps run inside one ``tf.function`` call
        (default 100: the fastest setting measured, docs/benchmarks.md; an
        execution always ends at an epoch's end and at ``max_steps``).
      jit_compile: compile the step with XLA (default on, as measured in
        docs/benchmarks.md; pass ``False`` for a model with ops XLA cannot compile).
      nan_policy: ``"stop"`` raises :class:`~trainer.controller.NonFiniteLossError`
        naming the step; ``"skip_step"`` drops that update (no weight, slot or
        step change; what the forward pass wrote is set back:
        :func:`~trainer.guard.forward_writes`) and counts it in
        :attr:`skipped_steps`; ``"unchecked"`` has no guard and no gradient
        norm in the step (every update is applied, NaN included): for
        ablations of the guard's cost only.
      guard: how a non-finite step is kept from writing (:mod:`trainer.guard`):
        ``"select"`` runs the update and selects back what the optimizer
        wrote, ``"cond"`` runs it in one branch of a ``tf.cond``; ``"auto"``
        (default) takes ``"select"`` when some variable has a compact update
        and ``"cond"`` otherwise. Both are bit-exact; they differ in speed
        and memory (docs/benchmarks.md).
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
        self.steps_per_execution = positive_int("steps_per_execution", steps_per_execution)
        check_policy(nan_policy, guard)
        if registry is not None and registry.model is not model:
            raise ValueError("the registry was made for another model: build it with MaskRegistry(model)")
        self.strategy = strategy if strategy is not None else tf.distribute.get_strategy()
        self.replicas = int(self.strategy.num_replicas_in_sync)
        self.model = model
        self.optimizer = optimizer_from(optimizer)
        self.loss = loss_from(loss)
        self.registry = registry if registry is not None else MaskRegistry(model)
        self.jit_compile = bool(jit_compile)
        self.nan_policy = nan_policy
        self.guard = guard
        # Metrics live outside the strategy: under several replicas they are
        # updated in cross-replica context with the gathered global batch.
        self.train_metrics = [make_metric(m) for m in metrics]
        eval_metrics = [clone_metric(m) for m in self.train_metrics]
        self.train_loss = keras.metrics.Mean(name="loss")
        self._evaluator = Evaluator(model, self.loss, eval_metrics, jit_compile=self.jit_compile)
        with self.strategy.scope():
            self.registry.attach_optimizer(self.optimizer)
            self.counters = StepCounters()  # written in the step, read between executions
        self._executions = Executions(self)  # the compiled step, its executions and their training iterator
        self._controller = Controller(self)  # the outer loop, and where the run stands

    # ---------------------------------------------------------------- state
    @property
    def step(self) -> int:
        """The number of optimizer updates applied so far (``optimizer.iterations``)."""
        return int(self.optimizer.iterations.numpy())

    @property
    def skipped_steps(self) -> int:
        """Steps dropped as non-finite so far (``nan_policy="skip_step"``)."""
        return int(self.counters.skipped.numpy())

    @property
    def progress(self) -> Progress:
        """Where the run stands (:class:`~trainer.controller.Progress`); the properties below read it."""
        return self._controller.progress

    epoch = _read("epoch", "The epoch, from 0, of the execution running or last run.")
    epoch_first_step = _read("epoch_first_step", "The optimizer step at which :attr:`epoch` began.")
    epochs_done = _read("epochs_done", "Epochs completed over the trainer's ``fit`` calls.")
    steps_per_epoch = _read("steps_per_epoch", "Steps in an epoch of the last ``fit`` call (``None`` before any).")
    total_steps = _read("total_steps", "The optimizer step at which the last ``fit`` call ends (``None`` before any).")
    final_epoch = _read("final_epoch", "The number, from 1, of the last ``fit`` call's last epoch (or ``None``).")
    status = _read("status", "How the last ``fit`` ended: ``\"completed\"``, ``\"interrupted\"`` or ``\"failed\"``.")
    timing = _read("timing", "Seconds of the ``fit`` calls (see :class:`~trainer.hooks.LoopState`).")
    regrow_events = _read("regrow_events", "The prune-and-regrow updates after the last execution.")
    stop_requested = _read("stop_requested", "True once SIGINT / SIGTERM asked for an interrupted stop.")

    # ---------------------------------------------------------- compiled step
    @property
    def guard_in_use(self) -> Optional[str]:
        """The non-finite guard the step uses now: ``"select"``, ``"cond"``, or ``None`` (``nan_policy="unchecked"``).

        ``guard="auto"`` resolves by the registry's current plan (a prune or
        regrow update may change it; the step is rebuilt then).
        """
        return guard_for(self.nan_policy, self.guard, self.registry.update_modes().values())

    @property
    def train_functions(self) -> Dict[bool, Callable]:
        """The compiled executions built so far for the registry's current structure.

        Keyed by whether the execution's last step keeps RigL's gradients;
        each is a ``tf.function`` (``experimental_get_tracing_count()`` tells
        whether it retraced). A new dict each call.
        """
        return self._executions.functions

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
        return masked_gradients(self.model, self.loss, self.registry, x, y)

    # ----------------------------------------------------------------- loops
    def evaluate(self, x: Any, y: Any = None, *, batch_size: Optional[int] = None) -> Dict[str, float]:
        """Runs the model over a finite dataset of ``(x, y)`` batches, or over arrays ``x, y``.

        Args:
          x: a batched ``tf.data.Dataset`` of ``(x, y)``, or an input array.
          y: the labels when ``x`` is an array.
          batch_size: batch size for arrays (default 32).

        Returns:
          ``{"loss": mean loss per example, <metric name>: value, ...}``.
        """
        fit_checks.check_fit_inputs(self.model, self.loss, x, y, None)
        dataset = inputs.evaluation_inputs(x, y, batch_size=batch_size)
        fit_checks.check_dataset(self.model, dataset, what="the evaluation data")
        return self._evaluator.evaluate(dataset)

    def predict(self, x: Any, *, batch_size: Optional[int] = None) -> np.ndarray:
        """The model's outputs (``training=False``) for every example, as one NumPy array.

        Args:
          x: an input array ``(N, ...)``, or a batched ``tf.data.Dataset`` of
            inputs or of ``(x, y)`` pairs (labels are ignored).
          batch_size: batch size for arrays (default 32).

        Returns:
          The outputs concatenated over batches, ``(N, ...)`` (logits for the
          project's models; ``argmax(-1)`` gives the class).

        Raises:
          ValueError: no batches.
        """
        fit_checks.check_arrays(self.model, self.loss, x)
        dataset = x if inputs.is_dataset(x) else inputs.from_arrays(x, None, batch_size, shuffle=False, seed=None)
        fit_checks.check_dataset(self.model, dataset, what="the prediction data", pairs=False)
        if isinstance(dataset.element_spec, tuple):
            dataset = dataset.map(lambda features, *rest: features)
        return self._evaluator.predict(dataset)

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
    ) -> History:
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
          callbacks: Keras callbacks (``keras.callbacks.EarlyStopping``,
            ``ModelCheckpoint``, ``TensorBoard``... called with Keras's hooks:
            :mod:`trainer.keras_callbacks`) and outer-loop hooks (:mod:`trainer.callbacks`:
            ``StopOnPlateau``, ``BestWeights``, ``LogLines``; ``ProgressBar``
            in :mod:`trainer.progress`), each called with a
            :class:`~trainer.controller.LoopState`.
          verbose: ``"auto"`` shows a progress bar when standard output is a
            terminal and the ``CI`` variable is unset; ``True`` always,
            ``False`` never. Ignored when ``callbacks`` already hold a display.

        Returns:
          A :class:`~trainer.history.History`: a list of one logs dict per
          completed epoch of this call, with Keras's ``history.history``
          (``{key: [value per epoch]}``).

        Raises:
          ValueError: the epoch length is unknown or zero, ``epochs`` /
            ``max_steps`` is not a positive integer, ``initial_epoch`` does not
            match the optimizer step, the inputs or ``validation_data`` do not
            fit the model or loss, or a callback monitors a key no epoch will
            log (all before any step: :mod:`trainer.fit_checks`).
          TypeError: inputs that are neither a dataset nor numeric arrays, or a
            callback that is not a :class:`~trainer.callbacks.Callback`.
          NonFiniteLossError: with ``nan_policy="stop"``, at the first
            non-finite loss or gradient (that update is not applied).
        """
        fit_checks.check_fit_inputs(self.model, self.loss, x, y, validation_data)
        train_ds, validation_ds = inputs.training_inputs(
            x, y, batch_size=batch_size, validation_data=validation_data, validation_split=validation_split,
            shuffle=shuffle, seed=seed)
        if steps_per_epoch is None:
            steps_per_epoch = int(train_ds.cardinality().numpy())
            if steps_per_epoch < 0:
                raise ValueError("the training dataset's length is unknown or infinite: pass steps_per_epoch")
        check_lengths(steps_per_epoch=steps_per_epoch, epochs=epochs, max_steps=max_steps, initial_epoch=initial_epoch)
        fit_checks.check_dataset(self.model, train_ds)
        callbacks = fit_checks.check_callbacks(callbacks, names=list(self.train_logs()),
                                               validation=validation_ds is not None)
        schedule = self._controller.schedule(steps_per_epoch=steps_per_epoch, epochs=epochs, max_steps=max_steps,
                                             initial_epoch=initial_epoch)
        callbacks = with_display(adapt_callbacks(callbacks, self.model, self.optimizer), verbose)
        first_epoch = schedule.epoch_of(self.step)
        logs = self._controller.fit(schedule, self._executions.iterator(train_ds), validation_ds, callbacks)
        return History(logs, epoch=list(range(first_epoch, first_epoch + len(logs))), model=self.model,
                       params={"epochs": schedule.final_epoch, "steps": steps_per_epoch})

    # ------------------------------------------------- what the controller calls
    def train_steps(self, iterator, k: int) -> None:
        """Runs ``k`` train steps on ``iterator`` in one compiled execution (:meth:`trainer.step.Executions.train`).

        Skipped (non-finite) steps count as steps here but do not advance
        :attr:`step`; with ``nan_policy="stop"`` the execution ends at the
        first one (:attr:`nonfinite_seen` tells).

        Args:
          iterator: an iterator over ``(x, y)`` batches (from a dataset that
            repeats: it is drawn ``k`` times).
          k: the number of steps (positive).
        """
        self._executions.train(iterator, k)

    @property
    def nonfinite_seen(self) -> bool:
        """True when a step of the last execution met a non-finite loss or gradient (and was not applied)."""
        return bool(self.counters.nonfinite.numpy())

    def train_logs(self) -> Dict[str, float]:
        """The running training metrics of the current epoch: ``{"loss": ..., <metric>: ...}``.

        Under ``nan_policy="skip_step"`` also ``skipped_steps`` (the trainer's
        total, as a float).
        """
        logs = results(self.train_loss, self.train_metrics)
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
            skipped_steps=self.counters.skipped,
            examples_seen=self.counters.examples,
            batches_drawn=self.counters.batches,
            # the running epoch's training loss and metrics, so a mid-epoch resume logs the same epoch
            train_metrics=[v for metric in (self.train_loss, *self.train_metrics) for v in metric.variables],
        )

    def request_stop(self) -> None:
        """Ends ``fit`` after the current execution, with status ``"completed"`` (an early stop)."""
        self._controller.progress.request_stop()

    def state(self) -> LoopState:
        """Where the run stands now, as the hooks see it (:class:`~trainer.controller.LoopState`)."""
        progress, counters = self.progress, self.counters
        return LoopState(
            step=self.step, epoch=progress.epoch, epoch_first_step=progress.epoch_first_step,
            steps_per_epoch=progress.steps_per_epoch, total_steps=progress.total_steps,
            final_epoch=progress.final_epoch, examples=int(counters.examples.numpy()),
            skipped_steps=self.skipped_steps,
            gradient_norm=None if self.nan_policy == "unchecked" else float(counters.grad_norm.numpy()),
            regrow_events=tuple(progress.regrow_events), timing=dict(progress.timing),
            model=self.model, optimizer=self.optimizer, registry=self.registry,
            checkpoint_objects=self.checkpoint_objects(), masked_gradients=self.masked_gradients,
            request_stop=self.request_stop)
