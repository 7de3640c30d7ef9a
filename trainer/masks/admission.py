"""Admission of a rule against its targets and the rules added before: what is refused before anything changes.

Non-trainable targets (``non_trainable: error | skip | pin``), a rule whose frozen count changes under a compact
update, a variable a ``regrow`` rule would share, and ``regrow`` on non-float or scalar variables, RigL with
sampled gradients, or Sparse Momentum / ``frozen_gradients: pass`` with a compact update. Conflicting pins
are :mod:`~trainer.masks.conflicts`'s.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Sequence

import numpy as np

from trainer.masks.errors import FreezeConfigError
from trainer.masks.rules import FreezeRule


def admissible_paths(rule: FreezeRule, targets: Sequence[Any], states: Iterable[Any], update_mode: str,
                     shapes: Dict[str, tuple]) -> List[str]:
    """The paths ``rule`` may cover, after the checks that need only its targets and the other rules.

    Args:
      rule: the rule being added.
      targets: the :class:`~trainer.masks.variables.VariableInfo` of the variables it selects.
      states: the :class:`~trainer.masks.plan.RuleState` of the rules added before.
      update_mode: the registry's ``update``.
      shapes: ``{path: (shape, numpy dtype)}`` of every variable.

    Raises:
      FreezeConfigError: the rule is refused (the message says why and what to write instead).
    """
    non_trainable = [t.path for t in targets if not t.trainable]
    if non_trainable and rule.non_trainable == "error":
        raise FreezeConfigError(
            f"rule {rule.name!r} selects non-trainable variables {non_trainable}: gradients do not train "
            "them, so freezing has no effect there. Narrow 'select' / add 'exclude', or set "
            "non_trainable: skip (leave them out) or non_trainable: pin (hold them at the pinned value)"
        )
    if rule.non_trainable == "skip":
        targets = [t for t in targets if t.trainable]
        if not targets:
            raise FreezeConfigError(f"rule {rule.name!r} selects only non-trainable variables {non_trainable}")
    if rule.dynamic and rule.regrow is None and update_mode in ("compact", "sampled"):
        raise FreezeConfigError(
            f"rule {rule.name!r} changes how many elements it freezes during training (start/end bounds or "
            "update_every_n_steps), which update 'compact' does not support; use update 'auto' (dense where "
            "masks change) or 'dense'"
        )
    paths = [t.path for t in targets]
    for state in states:  # a variable a `regrow` rule moves is covered by that rule only
        shared = [p for p in paths if p in state.paths]
        if shared and (rule.regrow is not None or state.rule.regrow is not None):
            mover = rule.name if rule.regrow is not None else state.rule.name
            raise FreezeConfigError(
                f"rules {state.rule.name!r} and {rule.name!r} both cover {shared}, but {mover!r} regrows "
                "its elements, which needs a variable to itself; narrow 'select' or add 'exclude'"
            )
    if rule.regrow is not None:
        not_float = [p for p in paths if not np.issubdtype(shapes[p][1], np.floating)]
        scalars = [p for p in paths if len(shapes[p][0]) == 0]
        if not_float or scalars:
            raise FreezeConfigError(f"rule {rule.name!r}: regrow needs float variables with at least one "
                                    f"axis, got {not_float + scalars}")
        if rule.regrow.method == "rigl" and update_mode == "sampled":  # RigL grows where |dense grad| is largest
            raise FreezeConfigError(f"rule {rule.name!r}: regrow method 'rigl' needs the dense gradient, which "
                                    "update 'sampled' never forms; use method 'set' or update 'compact'")
        if update_mode in ("compact", "sampled") and (rule.regrow.method == "momentum"
                                                      or rule.regrow.frozen_gradients == "pass"):
            what = "method 'momentum'" if rule.regrow.method == "momentum" else "frozen_gradients 'pass'"
            raise FreezeConfigError(f"rule {rule.name!r}: regrow {what} needs the optimizer's slots of frozen "
                                    f"elements, which update {update_mode!r} does not keep; use update 'auto' or "
                                    "'dense'")
    return paths
