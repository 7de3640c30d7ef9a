"""The mask registry: a thin facade over the plan, the per-variable updates, slots and the audit.

Usable in any ``tf.GradientTape`` loop::

    registry = MaskRegistry(model)
    registry.freeze("*/kernel", elements={"random": 0.9, "seed": 0}, value="zero")
    registry.attach_optimizer(optimizer)        # builds it (on compact variables where compact)
    variables = registry.trainable_variables()  # fully frozen ones left out
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grads = registry.update_gradients(tape.gradient(loss, variables), variables)
    registry.apply_gradients(optimizer, grads, variables)  # frozen elements never change

A *trainable-mask* is ``True`` where an element may change; rules declare
*frozen* elements. Every method delegates: rules to :mod:`~trainer.masks.plan`,
the store the step touches to :mod:`~trainer.masks.state`, the step's
gradients and updates to :mod:`~trainer.masks.updates`, audits to
:mod:`~trainer.masks.audit`, prune-and-regrow to :mod:`~trainer.masks.regrow_updates`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from trainer.masks import audit, schedules
from trainer.masks.checks import check_known
from trainer.masks.errors import FreezeConfigError
from trainer.masks.held import HeldValues, reproject
from trainer.masks.plan import Planner, VariablePlan
from trainer.masks.paths import resolve_path
from trainer.masks.regrow_updates import Regrower
from trainer.masks.rules import FreezeRule
from trainer.masks.state import MaskState, RuleStateTrackable
from trainer.masks.updates import UPDATE_MODES, apply_updates, step_gradients
from trainer.masks.variables import index_variables

# ``update="auto"`` uses a compact update where at most this fraction of a variable trains
# (measured on the 100.7M MLP, see docs/scale.md).
COMPACT_CROSSOVER = 0.5


class _Refs:
    """Plain holder, so that tf.Module tracks none of the model, the store, the planner and the regrower."""

    def __init__(self, model, state: MaskState, planner: Planner, initial_values):
        self.model, self.state, self.planner = model, state, planner
        self.initial_values = initial_values  # a reference, read lazily
        self.regrower = Regrower()  # not checkpointed: its buffers are filled and used within one execution
        self.held = HeldValues()  # pre-update copies of the plain loop (mask_gradients -> reproject)


class MaskRegistry(tf.Module):
    """Element-level freezing for the variables of one Keras model.

    Creating a registry copies nothing: it indexes the model's variables. Per
    covered variable it keeps what its update needs on the device (a bool mask,
    or the int32 indices and values of the trainable elements), and on the host
    the initial values ``value: initial`` pins and captured selections as packed
    bits; everything keyed by ``variable.path``.

    Args:
      model: a built ``keras.Model`` (or layer).
      initial_values: optional ``{variable path: array}`` used by ``value="initial"``
        instead of the values when the rule is added.
      update: ``"auto"`` (default), ``"dense"``, ``"compact"`` or ``"sampled"`` (compact, kernel gradients
        sampled in served layers: :mod:`trainer.masks.sampled_layers`): how partly frozen
        variables are updated (see :mod:`trainer.masks.updates`).
      name: the ``tf.Module`` name.

    Raises:
      FreezeConfigError: the model has no variables, two share a path, or ``update`` is unknown.
    """

    def __init__(self, model: keras.layers.Layer, *, initial_values: Optional[Mapping[str, Any]] = None,
                 update: str = "auto", name: str = "mask_registry"):
        super().__init__(name=name)
        if update not in UPDATE_MODES:
            raise FreezeConfigError(f"update must be one of {list(UPDATE_MODES)}, got {update!r}")
        self.update_mode = update
        # The checkpoint keys, keyed by variable path: tracked here, written only by the store.
        self.masks: Dict[str, tf.Variable] = {}
        self.pins: Dict[str, tf.Variable] = {}  # only non-trainable variables held by `non_trainable: pin`
        self.indices: Dict[str, tf.Variable] = {}
        self.compact: Dict[str, keras.Variable] = {}
        state = MaskState(index_variables(model), masks=self.masks, pins=self.pins, indices=self.indices,
                          compact=self.compact, requested=update, crossover=COMPACT_CROSSOVER, model=model)
        planner = Planner(shapes=state.shapes(), read=state.read, trainable_now=state.trainable_now, heads=state.heads())
        self._refs = _Refs(model, state, planner, initial_values)
        self.rule_state = RuleStateTrackable(state)

    @property
    def structure_version(self) -> int:
        """A counter bumped whenever what the compiled step sees changes (a new, replaced or dropped update)."""
        return self._refs.state.version

    @property
    def rules(self) -> List[FreezeRule]:
        """The rules in the order they were added."""
        return [s.rule for s in self._refs.state.rules.values()]

    @property
    def model(self) -> keras.layers.Layer:
        """The model whose variables the registry covers."""
        return self._refs.model

    def freeze(self, select: Any = None, elements: Any = "all", value: Any = "current",
               name: Optional[str] = None, **options: Any) -> FreezeRule:
        """Adds a rule and applies it now if it is active at the current step.

        Args:
          select: a glob or list of globs over variable paths (``re:`` for a
            regex); a pattern also matches a trailing sub-path.
          elements: ``"all"`` or a selector mapping, e.g. ``{"random": 0.9, "seed": 0}``,
            ``{"indices": [0, 2]}``, ``{"slice": "[:, :10]"}``, ``{"magnitude": 0.8}``.
          value: ``"current"``, ``"initial"``, ``"zero"`` or a number (cast to each
            variable's dtype bit-exactly; one that overflows it is refused).
          name: the rule's name (default ``"rule<N>"``).
          **options: the other keys of :class:`FreezeRule` (``layer_type``, ``exclude``,
            ``start_step``, ``end_epoch``, ``schedule``, ``non_trainable``...).

        Returns:
          The :class:`FreezeRule` added.

        Raises:
          FreezeConfigError: the rule is malformed, matches nothing, does not fit a variable,
            pins a value its dtype cannot hold, or pins an element another rule pins
            differently. The registry is unchanged when this is raised.
        """
        name = name or f"rule{len(self._refs.state.rules)}"
        check_known(options, FreezeRule.KEYS, error=FreezeConfigError,  # a config's message, not a TypeError
                    what=f"rule {name!r}: unknown key(s) {{unknown}}")
        return self.add_rule(FreezeRule.create(name, select, elements, value, **options))

    def add_rule(self, rule: FreezeRule) -> FreezeRule:
        """Adds a prebuilt :class:`FreezeRule`; see :meth:`freeze` for errors."""
        refs = self._refs
        state = refs.planner.admit(rule, refs.state.infos, refs.state, step=refs.state.step, epoch=refs.state.epoch,
                                   update_mode=self.update_mode, apply=lambda paths: self._admitted(rule, paths),
                                   initial_value=lambda path: refs.state.initial_value(path, refs.initial_values))
        if rule.rescale_trainable and state.active:
            refs.state.rescale_trainable(state.paths, self.trainable_mask)
        return rule

    def _admitted(self, rule: FreezeRule, paths: Sequence[str]) -> None:
        self._apply(paths)
        if rule.regrow is not None:
            for path in paths:
                self._refs.regrower.add(path, self._refs.state.by_path[path].variable, rule.regrow)

    def _combine(self, path: str) -> VariablePlan:
        return self._refs.planner.combine(self._refs.state.rules_for(path), path)

    def _apply(self, paths: Sequence[str]) -> bool:
        try:
            return self._refs.state.apply(paths, self._combine)
        finally:
            self._refs.planner.fresh.clear()
            self._refs.held.refresh(self._refs.state)

    def optimizer_variables(self) -> List[keras.Variable]:
        """The variables the optimizer updates: compact variables in place of compactly updated ones.

        Variables frozen entirely by static rules are left out (they never train).
        """
        return self._refs.state.optimizer_variables()

    def attach_optimizer(self, optimizer: keras.optimizers.Optimizer) -> None:
        """Builds ``optimizer`` with :meth:`optimizer_variables` and remembers it.

        From now on the slot entries (momentum, velocity, ...) of elements whose
        (dense) mask changes are set to 0: nothing stale moves a frozen element.

        Raises:
          ValueError: the optimizer was built already on other variables while
            some variable has a compact update.
        """
        if not optimizer.built:
            optimizer.build(self.optimizer_variables())
        elif self.compact:
            raise ValueError("the optimizer is built already, but compact updates need it built on their compact "
                             "variables: pass an unbuilt optimizer (the registry builds it)")
        self._refs.state.attach(optimizer)
        self._refs.regrower.attached(self._refs.state, optimizer)  # forgets compiled updates, checks the momentum

    def update(self, step: int, epoch: int = 0) -> bool:
        """Switches scheduled rules on or off and re-selects gradual-pruning masks.

        Call between compiled executions with the optimizer step and the epoch
        (from 0). Newly active rules capture ``"current"`` values now; compact
        variables are refreshed from the model first (a ``set_weights`` is kept).

        Returns:
          True when any mask or pinned value changed.

        Raises:
          FreezeConfigError: two active rules pin an element differently.
        """
        state = self._refs.state
        state.set_clock(step, epoch)
        state.sync_compact()
        touched = self._refs.planner.advance(list(state.rules.values()), state.step, state.epoch)
        return self._apply(touched) if touched else False

    def gradients_due(self, step: int) -> bool:
        """True when a RigL rule updates at optimizer ``step``: the step before it must :meth:`capture_gradients`."""
        return Regrower.gradients_due(self._refs.state.rules.values(), step)

    def capture_gradients(self, grads: Sequence[Any], variables: Sequence[keras.Variable]) -> None:
        """Keeps the dense (unmasked) gradients of RigL variables for the next :meth:`regrow` (compiled-step API).

        Args:
          grads: the raw gradients from ``tape.gradient``, one per variable
            (before :meth:`update_gradients` masks them).
          variables: the model variables, in the same order.
        """
        self._refs.regrower.capture(grads, variables)

    def regrow(self, step: int, gradients: Optional[Mapping[str, Any]] = None) -> List[Dict[str, Any]]:
        """Runs every prune-and-regrow update due at optimizer ``step`` (eagerly, between steps).

        Each variable of a due rule drops its smallest-``|w|`` active elements
        (to exactly 0) and grows as many (SET: at random; RigL: largest
        ``|g|``) on the device, zeroing the slots of changed elements; the
        trainable count stays, so a compact update's indices and slots move.

        Args:
          step: the optimizer step (``optimizer.iterations``).
          gradients: RigL only, ``{variable path: dense gradient}``; by default what :meth:`capture_gradients` kept.

        Returns:
          Per updated variable: ``step``, ``path``, ``drop_fraction``, ``dropped``, ``grown``, ``active``.

        Raises:
          RuntimeError: called inside a ``tf.function``.
        """
        if not tf.executing_eagerly():
            raise RuntimeError("MaskRegistry.regrow() runs eagerly, between steps")
        return self._refs.regrower.run(int(step), self._refs.state, gradients)

    def after_restore(self) -> None:
        """Checks the restored registry after a checkpoint restored it.

        The restored masks and indices must be those the restored rule state gives.

        Raises:
          ValueError: the restored variables disagree with the restored rule state (another configuration's).
        """
        self._refs.state.check_restored(self._combine)

    def next_update_step(self, step: int) -> Optional[int]:
        """The first step after ``step`` at which :meth:`update` can change a mask because of a step.

        A rule's ``start_step`` / ``end_step`` bound, due re-selection or
        :meth:`regrow` update: a loop running several steps per compiled call
        ends a call there (and at epoch ends) so rules switch where they say.

        Returns:
          An ``int`` greater than ``step``, or ``None`` when no step-based change is ahead.
        """
        return schedules.next_update_step(self._refs.state.rules.values(), step)

    def trainable_variables(self) -> List[keras.Variable]:
        """The model's trainable variables minus those frozen entirely by static rules."""
        return self._refs.state.trainable_variables()

    def mask_gradients(self, grads: Sequence[Any], variables: Sequence[keras.Variable]) -> List[Any]:
        """The gradients with every frozen element exactly 0, in the variables' shapes (the plain Keras loop).

        Also copies each covered variable first, for :meth:`reproject` after ``optimizer.apply_gradients``:
        one copy of the variable (its bytes) per covered variable, on its device (:mod:`trainer.masks.held`).

        Args:
          grads: one per variable: a tensor of its shape, a ``tf.IndexedSlices`` (an ``Embedding``'s) or ``None``.
          variables: the variables, in the same order.

        Returns:
          A list of the same structure; gradients of uncovered variables are returned unchanged.
        """
        self._refs.held.take(self._refs.state, variables)
        return step_gradients(grads, variables, self._refs.state.lookup, gathered=False)

    def update_gradients(self, grads: Sequence[Any], variables: Sequence[keras.Variable]) -> List[Any]:
        """The gradients :meth:`apply_gradients` takes: masked (dense updates) or gathered ``[k]`` (compact).

        Args:
          grads: one gradient per variable (tensor, ``IndexedSlices`` or ``None``).
          variables: the model variables, in the same order.

        Returns:
          A list of the same length; its global norm equals that of :meth:`mask_gradients`.
        """
        return step_gradients(grads, variables, self._refs.state.lookup, gathered=True)

    def apply_gradients(self, optimizer: keras.optimizers.Optimizer, grads: Sequence[Any],
                        variables: Sequence[keras.Variable], *, apply_if: Optional[tf.Tensor] = None) -> None:
        """One optimizer update from :meth:`update_gradients`; frozen elements are never changed.

        Dense updates restore every frozen element after the optimizer (weight
        decay and momentum move elements whatever their gradient); compact ones
        scatter their values in. Works in a replica or cross-replica context.

        Args:
          optimizer: the optimizer given to :meth:`attach_optimizer`.
          grads: the output of :meth:`update_gradients`.
          variables: the model variables, in the same order.
          apply_if: ``None``, or a scalar bool tensor: where ``False`` the call
            writes nothing (bit-exact) although the optimizer runs (the
            non-finite guard without a ``tf.cond``; see
            :func:`trainer.masks.updates.apply_updates`).

        Raises:
          ValueError: ``apply_if`` with an optimizer not built yet (call :meth:`attach_optimizer`
            first: an unbuilt optimizer's slots are not known before the update).
        """
        if apply_if is not None and not optimizer.built:
            raise ValueError("apply_gradients(apply_if=...) needs a built optimizer: call "
                             "registry.attach_optimizer(optimizer) first")
        pinned = [u for u in self._refs.state.updates().values() if u.mode == "pinned"]
        apply_updates(optimizer, grads, variables, self._refs.state.lookup, pinned, apply_if)

    def reproject(self) -> None:
        """Sets frozen elements back to their pins after ``apply_gradients``: :func:`trainer.masks.held.reproject`.

        Raises:
          RuntimeError: a ``current``-pinned element changed where no copy restores it (the message names
            the variables), or, in a ``tf.function``, a variable with frozen elements was never copied.
        """
        reproject(self._refs.state, self._refs.held, self._combine)

    def drift(self) -> Dict[str, float]:
        """Per covered variable path, the max ``|value - pinned|`` over its frozen elements.

        0.0 is expected everywhere (and without frozen elements); NaN in a frozen element,
        or a changed ``current`` pin (no copy is kept to size it), gives ``inf``.
        """
        return audit.drift(self._refs.state, self._combine)

    def exact(self) -> bool:
        """True when every frozen element has its pin's exact bit pattern."""
        return audit.exact(self._refs.state, self._combine)

    def trainable_mask(self, path: str) -> np.ndarray:
        """The trainable-mask of one variable (all True for uncovered ones), by path or unique trailing sub-path.

        Raises:
          KeyError: no variable has that path (the message lists the paths), or several end with it.
        """
        return self._refs.state.trainable_mask(resolve_path(path, list(self._refs.state.by_path)))

    def trainable_masks(self) -> Dict[str, np.ndarray]:
        """``{variable path: bool trainable-mask}`` for every trainable variable."""
        return {i.path: self.trainable_mask(i.path) for i in self._refs.state.infos if i.trainable}

    def update_modes(self) -> Dict[str, str]:
        """``{variable path: "dense" | "compact" | "pinned" | "frozen"}`` for every covered variable.

        ``pinned``: a non-trainable variable held at its pins (``non_trainable: pin``);
        ``frozen``: frozen entirely by static rules, left out of the step.
        """
        return {p: getattr(self._refs.state.update(p), "mode", "frozen") for p in self._refs.state.covered}

    def plan(self) -> List[Dict[str, Any]]:
        """The resolved freeze plan: one row per trainable (or pinned) variable.

        Each row has ``path``, ``shape``, ``dtype``, ``frozen_elements``, ``frozen_fraction``,
        ``value`` (the value specs of the rules covering it, e.g. ``"zero"``) and ``rules``
        (their names); :meth:`update_modes` tells how each is updated.
        """
        return audit.plan_rows(self._refs.state)

    def memory_bytes(self) -> Dict[str, int]:
        """Bytes of per-element state the registry keeps (host and device), per covered variable path.

        The dense mask (1 byte per element) or compact indices and values (8 bytes
        per trainable float32 element), initial values of ``value: initial`` rules,
        captured selections (1 bit per element) and RigL's gradient buffers (4 bytes
        per element); not the optimizer's slots nor O(1) bookkeeping.
        """
        refs = self._refs
        return audit.memory_bytes(refs.state, refs.planner.initial_values, refs.regrower.memory_bytes)

    def describe(self) -> str:
        """A Markdown table of :meth:`plan` with each variable's update (:meth:`update_modes`)."""
        return audit.describe(self.plan(), self.update_modes())

    def covered_paths(self) -> List[str]:
        """The paths of the variables some rule targets, in the order they were first covered."""
        return list(self._refs.state.covered)

    def internals(self):
        """``(store, planner)``: what :mod:`trainer.masked_saving` saves and restores (not for other callers)."""
        return self._refs.state, self._refs.planner

    def is_dynamic(self) -> bool:
        """True when some rule switches on or off, or re-selects, during training."""
        return any(s.rule.dynamic for s in self._refs.state.rules.values())
