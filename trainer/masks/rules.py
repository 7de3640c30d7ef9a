"""A freeze rule: which variables, which elements, pinned to what, and when."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional

from trainer.masks.checks import check_known, positive_int
from trainer.masks.elements import normalize_elements, selector_name
from trainer.masks.errors import FreezeConfigError
from trainer.masks.group_regrow import check_group_regrow
from trainer.masks.regrow_spec import RegrowSpec
from trainer.masks.schedules import ActiveWindow, PolynomialSparsity, make_schedule
from trainer.masks.values import PinnedValue, normalize_value
from trainer.masks.variables import as_list

NON_TRAINABLE_POLICIES = ("error", "skip", "pin")


@dataclasses.dataclass(frozen=True)
class FreezeRule:
    """One declared freezing set. Build it with :meth:`FreezeRule.create`.

    Attributes:
      name: the rule's name, used in errors, plans and reports.
      select: glob / ``re:`` patterns over variable paths (empty: all).
      layer_type: Keras layer class names whose variables are selected.
      exclude: patterns removed from the selection.
      elements: a normalized element selector (see ``trainer.masks.elements``).
      value: the pinned value: ``"current"``, ``"initial"``, ``"zero"`` or a float.
      window: when the rule is active.
      update_every_n_steps: for ``magnitude`` selectors, re-select the
        elements every N steps (gradual pruning); ``None`` selects once.
      schedule: for ``magnitude`` selectors, the target sparsity over steps
        (replaces the fraction in ``elements``).
      non_trainable: what to do with non-trainable variables the rule selects:
        ``"error"`` (default) refuses them, ``"skip"`` leaves them out, ``"pin"``
        re-projects them after every step (e.g. fixes BatchNorm moving statistics).
      rescale_trainable: when the rule is added, multiply the trainable
        elements of each output unit (last axis) of a kernel by
        ``sqrt(fan_in / trainable fan_in)``, so a sparse layer starts with the
        activation variance its dense initializer intended (sparse-aware
        initialization, Evci et al., "Gradient Flow in Sparse Neural Networks
        and How Lottery Tickets Win", AAAI 2022). Variables with fewer than
        two axes are left alone.
      regrow: a :class:`~trainer.masks.regrow_spec.RegrowSpec`: the rule's
        trainable elements move by prune-and-regrow (SET, RigL) during
        training; needs ``value: zero`` and is the only rule on its variables.
    """

    name: str
    select: tuple = ()
    layer_type: tuple = ()
    exclude: tuple = ()
    elements: Dict[str, Any] = dataclasses.field(default_factory=lambda: {"all": True})
    value: PinnedValue = "current"
    window: ActiveWindow = ActiveWindow()
    update_every_n_steps: Optional[int] = None
    schedule: Optional[PolynomialSparsity] = None
    non_trainable: str = "error"
    rescale_trainable: bool = False
    regrow: Optional[RegrowSpec] = None

    KEYS = (
        "select",
        "layer_type",
        "exclude",
        "elements",
        "value",
        "start_step",
        "end_step",
        "start_epoch",
        "end_epoch",
        "update_every_n_steps",
        "schedule",
        "non_trainable",
        "rescale_trainable",
        "regrow",
    )

    @classmethod
    def create(
        cls,
        name: str,
        select: Any = None,
        elements: Any = "all",
        value: Any = "current",
        *,
        layer_type: Any = None,
        exclude: Any = None,
        start_step: Optional[int] = None,
        end_step: Optional[int] = None,
        start_epoch: Optional[int] = None,
        end_epoch: Optional[int] = None,
        update_every_n_steps: Optional[int] = None,
        schedule: Optional[Mapping[str, Any]] = None,
        non_trainable: str = "error",
        rescale_trainable: bool = False,
        regrow: Optional[Mapping[str, Any]] = None,
    ) -> "FreezeRule":
        """Validates a rule's parts and builds it.

        Raises:
          FreezeConfigError: any part is malformed; the message names it and
            what is allowed.
        """
        if not isinstance(name, str) or not name:
            raise FreezeConfigError(f"a rule name must be a non-empty string, got {name!r}")
        select_list = as_list(select, f"rule {name!r}: select")
        type_list = as_list(layer_type, f"rule {name!r}: layer_type")
        if not select_list and not type_list:
            raise FreezeConfigError(
                f"rule {name!r} needs 'select' (a glob over variable paths, e.g. '*/kernel') or 'layer_type'"
            )
        try:
            spec = normalize_elements(elements)
            pinned = normalize_value(value)
            window = ActiveWindow(start_step, end_step, start_epoch, end_epoch)
            sched = make_schedule(schedule)
            regrowth = None if regrow is None else RegrowSpec.from_mapping(regrow)
        except FreezeConfigError as err:
            raise FreezeConfigError(f"rule {name!r}: {err}") from None
        if non_trainable not in NON_TRAINABLE_POLICIES:
            raise FreezeConfigError(
                f"rule {name!r}: non_trainable must be one of {list(NON_TRAINABLE_POLICIES)}, got {non_trainable!r}"
            )
        magnitude = selector_name(spec) == "magnitude"
        if (update_every_n_steps is not None or sched is not None) and not magnitude:
            raise FreezeConfigError(
                f"rule {name!r}: update_every_n_steps and schedule need a 'magnitude' selector, "
                f"got elements={spec!r}"
            )
        if update_every_n_steps is not None:
            update_every_n_steps = positive_int(f"rule {name!r}: update_every_n_steps", update_every_n_steps,
                                                error=FreezeConfigError)
        if not isinstance(rescale_trainable, bool):
            raise FreezeConfigError(f"rule {name!r}: rescale_trainable must be true or false, got {rescale_trainable!r}")
        if sched is not None and update_every_n_steps is None:
            raise FreezeConfigError(f"rule {name!r}: a schedule needs update_every_n_steps")
        if regrowth is not None:
            if "groups" in spec:
                try:
                    check_group_regrow(spec["groups"], regrowth.method)
                except FreezeConfigError as err:
                    raise FreezeConfigError(f"rule {name!r}: {err}") from None
            if "fan_in" in spec:
                raise FreezeConfigError(f"rule {name!r}: regrow moves elements between units, so it cannot keep "
                                        "elements.fan_in constant; remove regrow or fan_in")
            if pinned != "zero":
                raise FreezeConfigError(f"rule {name!r}: regrow drops elements to zero, so it needs value: zero, "
                                        f"got value {pinned!r}")
            if not window.always or update_every_n_steps is not None or sched is not None:
                raise FreezeConfigError(
                    f"rule {name!r}: a regrow rule is active for the whole run and times its own updates; "
                    "remove start/end bounds, update_every_n_steps and schedule (use regrow.update_every_n_steps "
                    "and regrow.end_step)")
        return cls(
            name=name,
            select=tuple(select_list),
            layer_type=tuple(type_list),
            exclude=tuple(as_list(exclude, f"rule {name!r}: exclude")),
            elements=spec,
            value=pinned,
            window=window,
            update_every_n_steps=update_every_n_steps,
            schedule=sched,
            non_trainable=non_trainable,
            rescale_trainable=rescale_trainable,
            regrow=regrowth,
        )

    @classmethod
    def from_mapping(cls, name: str, mapping: Mapping[str, Any]) -> "FreezeRule":
        """Builds a rule from a config mapping such as ``{select, elements, value}``.

        Raises:
          FreezeConfigError: unknown keys (the allowed keys are listed) or bad values.
        """
        if not isinstance(mapping, Mapping):
            raise FreezeConfigError(f"rule {name!r} must be a mapping with keys {list(cls.KEYS)}, got {mapping!r}")
        check_known(mapping, cls.KEYS, error=FreezeConfigError, what=f"rule {name!r}: unknown key(s) {{unknown}}")
        return cls.create(name, **dict(mapping))

    @property
    def dynamic(self) -> bool:
        """True when the rule's frozen set can change during training."""
        return not self.window.always or self.update_every_n_steps is not None or self.regrow is not None

    def describe(self) -> str:
        """A one-line human description, e.g. ``"sparse: */kernel random=0.9 -> zero"``."""
        key = selector_name(self.elements)
        what = " ".join(self.select + tuple(f"type:{t}" for t in self.layer_type))
        regrow = f" ({self.regrow.describe()})" if self.regrow is not None else ""
        groups = f" by {self.elements['groups']}" if "groups" in self.elements else ""
        return f"{self.name}: {what} {key}={self.elements[key]}{groups} -> {self.value}{regrow}"


def rules_from_config(rules: Optional[Mapping[str, Any]]) -> List[FreezeRule]:
    """Builds rules from a mapping keyed by rule name (``freeze.rules`` in a config).

    A rule whose mapping is ``None`` is skipped, so a command-line override
    ``freeze.rules.sparse=null`` removes a rule.
    """
    if rules is None:
        return []
    if not isinstance(rules, Mapping):
        raise FreezeConfigError(f"freeze.rules must be a mapping of rule name to rule, got {rules!r}")
    return [FreezeRule.from_mapping(str(n), r) for n, r in rules.items() if r is not None]
