"""What :class:`trainer.MaskedOptimizer` refuses, serializes and restores (``model.save`` / ``load_model``).

A ``.keras`` file holds the optimizer's config (the inner optimizer's and the rules) and, in the
optimizer's weights store, the registry's device state (masks, pins, compact indices and values), its
rule state (captured selections, pin digests, clock: :class:`trainer.masks.state.RuleStateTrackable`),
the ``initial`` pins and the inner optimizer's variables (slots, iterations). ``load_model`` builds the
optimizer from its config on the new model's trainable variables (the rules are applied to them), then
restores that state over it once the weights are loaded.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import keras
import numpy as np
import tensorflow as tf

from trainer.masks import FreezeRule, MaskRegistry

__all__ = ["load_state", "loop_refusal", "pending_registry", "refusal", "rule_configs", "save_state"]

# CrossDeviceOps that reduce without TensorFlow's collective ops (no call-time instance key).
_PLAIN_REDUCTIONS = (tf.distribute.ReductionToOneDevice, tf.distribute.HierarchicalCopyAllReduce,
                     tf.distribute.NcclAllReduce)

_KINDS = ("masks", "pins", "indices", "compact")


def refusal(registry: MaskRegistry) -> Optional[str]:
    """The reason ``registry`` cannot run under ``model.fit`` (one line), or ``None`` when it can.

    ``model.fit`` runs many steps per compiled call and calls nothing of ours between them, so a rule
    whose mask changes during training (:class:`trainer.Trainer` calls ``registry.update`` / ``regrow``
    between executions) is refused by name, and so is ``update="sampled"``.
    """
    if registry.update_mode == "sampled":
        return ("MaskedOptimizer cannot use a registry with update='sampled': model.fit differentiates the "
                "model variables, not the sampled layers' compact ones; use update='auto', 'dense' or 'compact'")
    for rule in registry.rules:
        if rule.regrow is not None:
            what = "prune-and-regrow (regrow) moves its trainable elements during training"
        elif rule.dynamic:
            what = ("its mask changes during training (start/end step or epoch, update_every_n_steps or "
                    "schedule)")
        else:
            continue
        return (f"MaskedOptimizer cannot run rule {rule.name!r}: {what}, and model.fit calls nothing between "
                "steps to change masks; use trainer.Trainer, or a custom loop calling registry.update")
    return None


def _nested_in_control_flow() -> bool:
    """True where the graph being traced is a function called from inside another function's loop or cond.

    Keras's multi-step execution (``steps_per_execution > 1``) calls its one-step ``tf.function`` inside
    a ``tf.cond`` in a ``tf.while_loop``; one step per execution calls it directly.
    """
    graph = tf.compat.v1.get_default_graph()
    while getattr(graph, "is_control_flow_graph", False):  # this function's own loops and conds
        graph = graph.outer_graph
    graph = getattr(graph, "outer_graph", None)
    while graph is not None:
        if getattr(graph, "is_control_flow_graph", False):
            return True
        graph = getattr(graph, "outer_graph", None)
    return False


def loop_refusal() -> Optional[str]:
    """Why this step cannot run where it is being traced (one line), or ``None``; call it in the step.

    TensorFlow's collective all-reduce (``MirroredStrategy``'s default cross-device ops, and
    ``MultiWorkerMirroredStrategy``'s) feeds its instance key at call time, and that value is never fed
    to a function called inside another function's ``tf.while_loop``: Keras's multi-step loop fails
    then with "You must feed a value for placeholder tensor ... while/cond", with any optimizer (Keras
    issue 19246). Reductions without collectives (``ReductionToOneDevice``...) run there.
    """
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return None
    strategy = tf.distribute.get_strategy()
    reduction = getattr(strategy.extended, "_cross_device_ops", None)  # no public getter
    if strategy.num_replicas_in_sync < 2 or reduction is None or isinstance(reduction, _PLAIN_REDUCTIONS):
        return None
    if not _nested_in_control_flow():
        return None
    return (f"MaskedOptimizer cannot run under {type(strategy).__name__} with steps_per_execution > 1 and "
            "the strategy's collective all-reduce: Keras runs these steps inside a tf.while_loop, where the "
            "collective's instance key is never fed (this fails with any optimizer, Keras issue 19246); "
            "create the strategy with cross_device_ops=tf.distribute.ReductionToOneDevice(), or compile "
            "with steps_per_execution=1")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in np.asarray(value, dtype=object).tolist()] if isinstance(value, np.ndarray) \
            else [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def _glob_escaped(path: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in path)


def rule_configs(registry: MaskRegistry) -> Dict[str, Any]:
    """``{"update": mode, "rules": {name: rule mapping}}``: the static rules, JSON-serializable.

    A ``layer_type`` selection is written as the variable paths it chose (a restored registry sees
    variables, not layers).

    Raises:
      ValueError: a rule pins non-trainable variables (``non_trainable: pin``), which a restored
        optimizer never sees.
    """
    store, _ = registry.internals()
    rules = {}
    for rule in registry.rules:
        if rule.non_trainable == "pin":
            raise ValueError(f"MaskedOptimizer cannot save rule {rule.name!r}: non_trainable='pin' holds "
                             "non-trainable variables, which a restored optimizer is not given")
        select = list(rule.select)
        if rule.layer_type:
            select = [_glob_escaped(p) for p in sorted(store.rules[rule.name].paths)]
        rules[rule.name] = _plain({"select": select, "exclude": list(rule.exclude), "elements": rule.elements,
                                   "value": rule.value, "non_trainable": rule.non_trainable,
                                   "rescale_trainable": rule.rescale_trainable})
    variables = [i.variable for i in store.infos if i.trainable]
    return {"update": registry.update_mode, "rules": rules, "paths": [v.path for v in variables],
            "shapes": [[int(d) for d in v.shape] for v in variables]}


class _Variables:
    """A stand-in model for a restored registry: the variables ``build`` was given, no layers."""

    def __init__(self, variables: List[keras.Variable]):
        self.name, self.variables, self.weights, self._layers = "restored", list(variables), [], []


def _keep_paths(pending: Dict[str, Any], variables: List[keras.Variable]) -> None:
    """Gives the variables of a loaded model the paths they were saved with, where Keras dropped a prefix.

    ``keras.saving.load_model`` builds a ``Sequential``'s layers while deserializing them, outside the
    model's name scope: a saved ``mlp/fc1/kernel`` comes back as ``fc1/kernel`` (functional models keep
    their paths). The registry keys its state by path and seeds ``random`` selections by path, so the
    restored one must see the saved paths. Keras has no public way to set a path (``Variable.path`` is
    read-only, taken from the name scope when the variable is created, before this optimizer is
    deserialized), so the path is written where ``keras.Variable`` keeps it, and only where the saved
    path is the loaded one with a prefix before it (``with keras.name_scope("mlp"): load_model(...)``
    restores the same paths without this).

    Raises:
      ValueError: the variables are not those saved (count, shapes, or paths other than a dropped prefix).
    """
    paths, shapes = pending.get("paths"), pending.get("shapes")
    if paths is None or [v.path for v in variables] == paths:
        return
    have = [[int(d) for d in v.shape] for v in variables]
    if have != shapes or any(saved != v.path and not saved.endswith("/" + v.path)
                             for saved, v in zip(paths, variables)):
        raise ValueError(f"MaskedOptimizer was saved for trainable variables {list(zip(paths, shapes))}, "
                         f"and is built for {[(v.path, s) for v, s in zip(variables, have)]}")
    for variable, path in zip(variables, paths):
        variable._path = path  # no public setter (see above)


def pending_registry(pending: Dict[str, Any], variables: List[keras.Variable]) -> MaskRegistry:
    """A registry over ``variables`` with the rules of :func:`rule_configs` added (``MaskedOptimizer.build``)."""
    _keep_paths(pending, variables)
    registry = MaskRegistry(_Variables(variables), update=pending["update"])
    for name, mapping in pending["rules"].items():
        registry.add_rule(FreezeRule.from_mapping(name, mapping))
    return registry


def _bytes(array: np.ndarray) -> bytes:
    return np.asarray(array, dtype=np.uint8).tobytes()


def save_state(store, registry: MaskRegistry, inner: keras.optimizers.Optimizer) -> None:
    """Writes the registry's state and ``inner``'s variables into a Keras weights store (string keys)."""
    state, planner = registry.internals()
    header = {kind: list(getattr(registry, kind)) for kind in _KINDS}
    header["initial"] = sorted(p for p in planner.initial_values if p in state.by_path)
    header["inner"] = len(inner.variables)
    store["header"] = np.frombuffer(json.dumps(header).encode("utf-8"), np.uint8)
    store["rule_state"] = np.frombuffer(registry.rule_state.serialize(), np.uint8)
    for kind in _KINDS:
        for j, variable in enumerate(getattr(registry, kind).values()):
            store[f"{kind}_{j}"] = np.asarray(variable.numpy())
    for j, path in enumerate(header["initial"]):
        store[f"initial_{j}"] = np.asarray(planner.initial_values[path])
    for j, variable in enumerate(inner.variables):
        store[f"inner_{j}"] = np.asarray(variable.numpy())


def load_state(store, registry: MaskRegistry, inner: keras.optimizers.Optimizer) -> None:
    """Restores what :func:`save_state` wrote over a registry built from the same rules, and checks it.

    Raises:
      ValueError: the saved state covers other variables or another optimizer than this one's (the
        message names the difference), or its masks disagree with its rule state.
    """
    state, planner = registry.internals()
    header = json.loads(_bytes(store["header"]).decode("utf-8"))
    for kind in _KINDS:
        have = list(getattr(registry, kind))
        if header[kind] != have:
            raise ValueError(f"the saved MaskedOptimizer has {kind} for {header[kind]}, this one for {have}")
    if header["inner"] != len(inner.variables):
        raise ValueError(f"the saved inner optimizer has {header['inner']} variables, this one "
                         f"{len(inner.variables)}: was it saved with another optimizer?")
    for kind in _KINDS:
        for j, variable in enumerate(getattr(registry, kind).values()):
            variable.assign(np.asarray(store[f"{kind}_{j}"]))
    for j, path in enumerate(header["initial"]):
        planner.initial_values[path] = np.asarray(store[f"initial_{j}"])
    for j, variable in enumerate(inner.variables):
        variable.assign(np.asarray(store[f"inner_{j}"]))
    registry.rule_state.deserialize(_bytes(store["rule_state"]))
    registry.after_restore()
