"""``MaskedOptimizer``: element freezing inside ``model.fit``, as a Keras optimizer wrapping another.

Built the way Keras wraps optimizers in ``keras.optimizers.LossScaleOptimizer``
(the inner optimizer does the update; this class decides what it sees)::

    registry = trainer.MaskRegistry(model)
    registry.freeze("*/kernel", elements={"random": 0.9, "seed": 0}, value="zero")
    model.compile(optimizer=trainer.MaskedOptimizer(keras.optimizers.AdamW(1e-3), registry), loss=...)
    model.fit(x, y, epochs=3)  # every frozen element keeps its bit pattern

Each step runs the registry's own step (:meth:`~trainer.masks.registry.MaskRegistry.update_gradients` and
:meth:`~trainer.masks.registry.MaskRegistry.apply_gradients`): dense updates restore frozen elements after
the inner optimizer, compact ones update ``[k]`` variables and scatter them in, in a replica context of a
``tf.distribute`` strategy too. Variables frozen entirely are left out of the inner optimizer. The
registry's state (masks, pins, compact values, rule state, ``initial`` pins) and the inner optimizer's
slots are saved by ``model.save`` / restored by ``keras.saving.load_model`` (:mod:`trainer.masked_saving`)
and are checkpoint dependencies of this optimizer for ``tf.train.Checkpoint``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import keras
import tensorflow as tf

from trainer.masked_saving import load_state, loop_refusal, pending_registry, refusal, rule_configs, save_state
from trainer.masks import MaskRegistry

__all__ = ["MaskedOptimizer", "STATELESS_REFUSAL"]

STATELESS_REFUSAL = ("MaskedOptimizer has no stateless apply: the registry keeps frozen elements exact by updating "
                     "its variables in place; run Keras on the TensorFlow backend (KERAS_BACKEND=tensorflow), "
                     "where model.fit calls apply")


@keras.saving.register_keras_serializable(package="trainer")
class MaskedOptimizer(keras.optimizers.Optimizer):
    """A ``keras.optimizers.Optimizer`` that keeps a registry's frozen elements bit-exact under ``model.fit``.

    Args:
      inner: the optimizer doing the update (any ``keras.optimizers.Optimizer``, unbuilt: the registry
        builds it here on :meth:`~trainer.masks.registry.MaskRegistry.optimizer_variables`, so add every
        rule before, and create this optimizer in the strategy's scope under ``tf.distribute``).
      registry: the :class:`~trainer.masks.registry.MaskRegistry` of the model being compiled. ``None``
        only from :meth:`from_config`: the registry is then rebuilt from the saved rules on the
        variables :meth:`build` gets.
      rules: only from :meth:`from_config`: the saved rules and update mode.
      name: the optimizer's name.

    Raises:
      ValueError: a rule changes its mask during training (a schedule, an active window, gradual
        pruning, prune-and-regrow / RigL: ``model.fit`` gives no place between steps to update masks),
        the registry samples gradients (``update="sampled"``), the inner optimizer is not a Keras
        optimizer, or a base optimizer argument (``weight_decay``, ``clipnorm``...) is given here
        instead of to ``inner``; when the step is traced, ``steps_per_execution > 1`` under a strategy
        whose all-reduce is TensorFlow's collective one (:func:`trainer.masked_saving.loop_refusal`).
    """

    def __init__(self, inner: keras.optimizers.Optimizer, registry: Optional[MaskRegistry] = None, *,
                 rules: Optional[Dict[str, Any]] = None, name: Optional[str] = None, **kwargs):
        if not isinstance(inner, keras.optimizers.Optimizer):
            raise ValueError(f"MaskedOptimizer wraps a keras.optimizers.Optimizer, got {type(inner).__name__}")
        if kwargs:
            raise ValueError(f"MaskedOptimizer does not take {sorted(kwargs)}: give them to the inner optimizer")
        if registry is None and rules is None:
            raise ValueError("MaskedOptimizer needs the MaskRegistry of the model: MaskedOptimizer(inner, registry)")
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner
        self._pending = rules
        if registry is not None:
            self._check(registry)
        self.registry = registry
        if registry is not None:  # built now, eagerly (in the strategy's scope where compiled there)
            self.build(registry.trainable_variables())

    @staticmethod
    def _check(registry: MaskRegistry) -> None:
        reason = refusal(registry)
        if reason:
            raise ValueError(reason)

    def build(self, var_list: List[keras.Variable]) -> None:
        """Builds the registry (when restored from a config) and the inner optimizer on its optimizer variables."""
        if self.built:  # built in __init__ (compile_from_config builds again)
            return
        if self.registry is None:
            self.registry = pending_registry(self._pending, var_list)
        self._check(self.registry)
        if not self.inner_optimizer.built:
            self.registry.attach_optimizer(self.inner_optimizer)
        super().build(var_list)

    @property
    def variables(self) -> List[keras.Variable]:
        return self._variables + self.inner_optimizer.variables

    def apply(self, grads, trainable_variables=None):
        """One masked step: ``grads`` (one per variable) through the registry into the inner optimizer."""
        variables = list(trainable_variables if trainable_variables is not None else self._trainable_variables)
        if not self.built:
            with tf.init_scope(), keras.name_scope(self.name, caller=self):  # eagerly: the registry reads masks
                self.build(variables)
            self.built = True
        registry = self.registry
        self._check(registry)  # a rule added after compile is checked when the step is traced
        reason = loop_refusal()
        if reason:
            raise ValueError(reason)
        state, _ = registry.internals()
        kept = [(g, v) for g, v in zip(grads, variables) if not state.lookup(v.path)[1]]  # frozen entirely: out
        grads, variables = [g for g, _ in kept], [v for _, v in kept]
        registry.apply_gradients(self.inner_optimizer, registry.update_gradients(grads, variables), variables)
        return self.iterations

    def sync(self) -> None:
        """Re-reads the trainable elements of compactly updated variables into their ``[k]`` variables (eagerly).

        Call it after the model's weights changed outside ``fit`` (``set_weights``, ``load_weights``,
        ``EarlyStopping(restore_best_weights=True)``) and before fitting again: the step updates the
        ``[k]`` values and scatters them in, so stale ones would overwrite the new weights' trainable
        elements. (Re-reading every step instead cost about 20 % of LeNet's step time.)
        """
        self.registry.internals()[0].sync_compact()

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        """Refused: the registry keeps frozen elements exact by updating its variables in place.

        Keras calls this only on the JAX backend; this project runs on the TensorFlow backend (its step and
        the registry's updates are ``tf.function`` s writing ``tf.Variable`` s), where Keras uses :meth:`apply`.

        Raises:
          RuntimeError: always, with what to do instead.
        """
        raise RuntimeError(STATELESS_REFUSAL)

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self) -> Dict[str, Any]:
        """The inner optimizer's config and the registry's rules (static ones; variable paths resolved)."""
        return {"name": self.name, "inner": keras.saving.serialize_keras_object(self.inner_optimizer),
                "rules": rule_configs(self.registry) if self.registry is not None else self._pending}

    @classmethod
    def from_config(cls, config: Dict[str, Any], custom_objects=None) -> "MaskedOptimizer":
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("inner"), custom_objects=custom_objects)
        return cls(inner, None, **config)

    def save_own_variables(self, store) -> None:
        """Writes the inner optimizer's variables and the registry's state into a Keras weights store."""
        save_state(store, self.registry, self.inner_optimizer)

    def load_own_variables(self, store) -> None:
        """Restores what :meth:`save_own_variables` wrote (the model's weights must be loaded already)."""
        load_state(store, self.registry, self.inner_optimizer)
