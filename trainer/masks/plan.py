"""The freeze plan: rules + variables + step -> per variable path, which elements are frozen and their pins.

Pure NumPy: nothing here touches TensorFlow. A :class:`RuleState` remembers what a rule captured when it was
applied: whether it is active, when it last re-selected, and, only for selectors whose result depends on values
at that moment (``magnitude``, ``magnitude_threshold``, ``mask_file``), the frozen elements as packed bits. Every
other selector (``all``, ``random`` with its seed, ``indices``, ``slice``...) is a pure function of the rule and
the variable's shape, recomputed when needed: the registry keeps no dense host copy of masks or values.

Pins are bit patterns: ``zero`` is +0.0, a constant is the value cast to the variable's dtype (``-0.0`` stays
``-0.0``), ``initial`` the value read when the rule was added (or given in ``initial_values``) and ``current``
whatever the variable holds when the rule is applied. Since the update never writes a frozen element (see
:mod:`trainer.masks.updates`), a ``current`` pin is the variable's own value and needs no copy.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from trainer.masks.admission import admissible_paths
from trainer.masks.allocation import LayerAllocation, allocate_densities
from trainer.masks.bitmask import PackedMask
from trainer.masks.conflicts import check_window_conflicts
from trainer.masks.elements import ElementContext, selector_name
from trainer.masks.scores import global_topk_masks
from trainer.masks.errors import FreezeConfigError
from trainer.masks.rules import FreezeRule
from trainer.masks.schedules import due_change
from trainer.masks.selectors import load_weights, select_elements
from trainer.masks.values import constant_pin
from trainer.masks.variables import VariableInfo, select_variables

# Selectors whose choice depends on values or files at the moment the rule is applied: captured.
CAPTURED_SELECTORS = ("magnitude", "magnitude_threshold", "mask_file", "n_m", "fan_in")
# Selectors that read the variable's value.
VALUE_SELECTORS = ("magnitude", "magnitude_threshold", "n_m", "fan_in")


def bits(array: np.ndarray) -> np.ndarray:
    """The raw bit patterns of a float (or int) array as unsigned integers of the same width."""
    array = np.asarray(array)
    return array.view(np.dtype(f"u{array.dtype.itemsize}"))


@dataclasses.dataclass
class RuleState:
    """What one rule froze and when.

    Attributes:
      rule: the rule.
      paths: the variable paths it targets, in model order.
      active: whether it is applied now.
      last_update_step: the step of its last (re-)selection.
      captured: per path, the frozen elements as ``np.packbits`` of the flat
        mask, only for :data:`CAPTURED_SELECTORS`.
    """

    rule: FreezeRule
    paths: List[str]
    active: bool = False
    last_update_step: Optional[int] = None
    captured: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def captures(self) -> bool:
        """Whether the selection is stored: value- or file-dependent, and not moved by regrowth.

        A regrowing rule's selection lives in the device mask it moves, read back when needed.
        """
        return selector_name(self.rule.elements) in CAPTURED_SELECTORS and self.rule.regrow is None


@dataclasses.dataclass
class VariablePlan:
    """The combined plan of one variable (transient: built, used and dropped).

    Attributes:
      path: the variable path.
      selection: the frozen elements: a bool array of the variable's shape, or the
        :class:`~trainer.masks.bitmask.PackedMask` of a single rule's selection (read it through
        :attr:`frozen` or :attr:`packed`).
      target: what the variable must hold: its value with every derivable pin
        (zero, constant, initial) written in.
      derivable: bool array, frozen elements whose pin is known without the
        variable (not only ``current``).
      rules: the names of the rules targeting the variable (active or not).
      static_full: every element is frozen by rules that never switch off.
      dynamic: some rule targeting it changes its mask during training.
      live: the variable's value when the plan was made (a read-only view of it where the store gives one).
      has_derivable: ``False`` when no rule pins a derivable value (``derivable`` is all False).
    """

    path: str
    selection: Union[np.ndarray, PackedMask]
    target: np.ndarray
    derivable: np.ndarray
    rules: List[str]
    static_full: bool
    dynamic: bool
    live: np.ndarray
    has_derivable: bool = True

    @functools.cached_property
    def frozen(self) -> np.ndarray:
        """Bool array of the variable's shape, ``True`` = frozen (unpacked once where the selection is packed)."""
        return self.selection.unpack() if isinstance(self.selection, PackedMask) else self.selection

    @functools.cached_property
    def packed(self) -> PackedMask:
        """The frozen elements packed, 1 bit each (packed once where the selection is a bool array)."""
        return self.selection if isinstance(self.selection, PackedMask) else PackedMask.pack(self.selection)

    @functools.cached_property
    def frozen_count(self) -> int:
        """How many elements are frozen (counted once)."""
        return self.packed.count if isinstance(self.selection, PackedMask) else int(np.count_nonzero(self.frozen))


class Planner:
    """Resolves rules against variables (NumPy only).

    Args:
      shapes: ``{path: (shape, numpy dtype)}`` of every variable.
      read: ``path -> np.ndarray``, the variable's value now (called lazily).
      initial: ``path -> np.ndarray``, the value ``value: initial`` pins to;
        by default :attr:`initial_values`, which :meth:`admit` fills.
      trainable_now: ``path -> bool array or None``, the mask a regrowing
        rule moved on the device.
      heads: ``{path: heads axis}`` of the attention projections (``groups: heads``, :mod:`trainer.masks.heads`).
    """

    def __init__(self, *, shapes: Dict[str, tuple], read: Callable[[str], np.ndarray],
                 initial: Optional[Callable[[str], np.ndarray]] = None,
                 trainable_now: Optional[Callable[[str], Optional[np.ndarray]]] = None,
                 heads: Optional[Dict[str, int]] = None):
        self.shapes = shapes
        self.heads = dict(heads or {})
        self.read = read
        self.initial_values: Dict[str, np.ndarray] = {}  # read when a `value: initial` rule is added
        self.initial = initial if initial is not None else self.initial_values.__getitem__
        self.trainable_now = trainable_now
        self.fresh: Dict[tuple, np.ndarray] = {}  # (rule, path) -> packed selection, until applied

    def allocation(self, state: RuleState, fraction: float) -> Optional[LayerAllocation]:
        """The layer-wise allocation of ``state``'s rule at a frozen ``fraction`` over all its variables.

        ``None`` when the rule's selector has no ``allocation``. The global
        density is ``1 - fraction``; see :func:`trainer.masks.allocation.allocate_densities`.
        """
        spec = state.rule.elements
        if spec.get("allocation") is None:
            return None
        shapes = {p: self.shapes[p][0] for p in state.paths}
        try:
            if spec["allocation"] == "global":
                return self._global_magnitude(state, shapes, 1.0 - fraction)
            return allocate_densities(shapes, 1.0 - fraction, distribution=spec["allocation"],
                                      erk_power_scale=spec.get("erk_power_scale", 1.0))
        except FreezeConfigError as err:
            raise FreezeConfigError(f"rule {state.rule.name!r}: elements.allocation: {err}") from None

    def _global_magnitude(self, state: RuleState, shapes: Dict[str, tuple], density: float) -> LayerAllocation:
        """Counts of a global magnitude ranking: the ``round(density * N)`` largest ``|w|`` over all the variables.

        Read once per rule and density (one selection reads every variable),
        until the registry applies the selection (:attr:`fresh` is cleared).
        """
        key = ("global", state.rule.name, density)
        if key not in self.fresh:
            weights = state.rule.elements.get("weights_file")
            if weights is not None:
                values = {p: load_weights(weights, p) for p in state.paths}
            else:
                values = {p: self.read(p) for p in state.paths}
            kept = global_topk_masks({p: np.abs(np.asarray(v, np.float64)) for p, v in values.items()}, density)
            self.fresh[key] = np.array([int(kept[p].sum()) for p in state.paths], dtype=np.int64)
        counts = dict(zip(state.paths, (int(c) for c in self.fresh[key])))
        sizes = {p: int(np.prod(s, dtype=np.int64)) for p, s in shapes.items()}
        return LayerAllocation(distribution="global", density=density, sizes=sizes,
                               densities={p: counts[p] / sizes[p] for p in sizes}, counts=counts,
                               dense=tuple(p for p in sizes if counts[p] == sizes[p]))

    def select(self, state: RuleState, path: str, step: int, value: Optional[np.ndarray] = None, *,
               packed: bool = False) -> np.ndarray:
        """The elements ``state``'s rule freezes in ``path`` (bool, the variable's shape), resolved now.

        With ``packed``, their ``np.packbits`` (a random selection never makes the bool array).

        Raises:
          FreezeConfigError: the selector does not fit the variable (named in the message).
        """
        rule = state.rule
        shape, _ = self.shapes[path]
        fraction = rule.schedule(step) if rule.schedule is not None else None
        layers = self.allocation(state, fraction if fraction is not None else rule.elements[selector_name(rule.elements)])
        if layers is not None:  # this variable's share: exactly counts[path] elements kept
            fraction = (layers.sizes[path] - layers.counts[path]) / layers.sizes[path]
        if selector_name(rule.elements) in VALUE_SELECTORS and value is None:
            value = self.read(path)
        ctx = ElementContext(path, tuple(shape), value, None, self.heads.get(path))
        try:
            return select_elements(rule.elements, ctx, fraction=fraction, packed=packed)
        except FreezeConfigError as err:
            raise FreezeConfigError(f"rule {rule.name!r}, variable {path!r}: {err}") from None

    def frozen_by(self, state: RuleState, path: str) -> np.ndarray:
        """The elements an active rule froze (unpacked when captured or just selected, else recomputed)."""
        selection = self.selection(state, path)
        return selection.unpack() if isinstance(selection, PackedMask) else selection

    def selection(self, state: RuleState, path: str) -> Union[np.ndarray, PackedMask]:
        """:meth:`frozen_by`, left packed where it is held packed (captured, or selected and not yet applied)."""
        shape, _ = self.shapes[path]
        packed = state.captured.get(path)
        if packed is None:
            packed = self.fresh.get((state.rule.name, path))
        if packed is None and state.rule.regrow is not None and self.trainable_now is not None:
            trainable = self.trainable_now(path)  # moved by regrowth on the device
            if trainable is not None:
                return ~trainable
        if packed is not None:
            return PackedMask(packed, shape)
        return self.select(state, path, state.last_update_step or 0)

    def activate(self, state: RuleState, step: int) -> None:
        """Applies the rule at ``step``: checks every target and captures value-dependent selections."""
        captured = {}
        for path in state.paths:
            packed = self.select(state, path, step, packed=True)
            if state.captures:
                captured[path] = packed
            else:  # kept (1 bit per element) until the registry has applied it: no second selection
                self.fresh[(state.rule.name, path)] = packed
        state.captured, state.active, state.last_update_step = captured, True, step

    def pins(self, rule: FreezeRule, path: str, live: np.ndarray) -> Optional[np.ndarray]:
        """The pins of ``rule`` for ``path`` (array or 0-d), or ``None`` for ``current`` (the live value)."""
        _, dtype = self.shapes[path]
        if rule.value == "current":
            return None
        if rule.value == "zero":
            return np.zeros((), dtype)
        if rule.value == "initial":
            return np.asarray(self.initial(path), dtype=dtype)
        return constant_pin(rule.value, dtype, f"rule {rule.name!r}, variable {path!r}")

    def combine(self, states: Sequence[RuleState], path: str) -> VariablePlan:
        """Combines every rule targeting ``path`` into one :class:`VariablePlan`.

        Rules are taken in the order they were added; two active rules that
        pin one element to different bit patterns are refused.

        Raises:
          FreezeConfigError: conflicting pins (names both rules, the element and both values).
        """
        shape, dtype = self.shapes[path]
        live = self.read(path)
        ours = [s for s in states if path in s.paths]
        active = [s for s in ours if s.active]
        if len(active) == 1 and active[0].rule.value == "current":  # one rule, its own values pinned: left packed
            rule, selection = active[0].rule, self.selection(active[0], path)
            static_full = bool((np.zeros(shape, bool) if rule.dynamic else selection).all())
            nothing = np.broadcast_to(np.False_, shape)  # derivable: none, and no memory for it
            return VariablePlan(path, selection, live, nothing, [s.rule.name for s in ours],
                                static_full, any(s.rule.dynamic for s in ours), live, has_derivable=False)
        frozen = derivable = static = None  # bool masks, made by the first rule that adds to each (never written)
        target = live
        earlier: List[tuple] = []  # (rule, its frozen elements), for naming a conflict
        names, dynamic = [], False
        for state in states:
            if path not in state.paths:
                continue
            names.append(state.rule.name)
            dynamic = dynamic or state.rule.dynamic
            if not state.active:
                continue
            f = self.frozen_by(state, path)
            pin = self.pins(state.rule, path, live)
            if pin is not None:
                p = np.broadcast_to(pin, shape)
                if frozen is not None:
                    overlap = f & frozen
                    if overlap.any():
                        differs = overlap & (bits(p) != bits(target))
                        if differs.any():
                            self._conflict(earlier, state.rule, path, differs, target, p)
                new = f if frozen is None else f & ~frozen
                if new.any():
                    target = np.where(new, p, target)
                derivable = f if derivable is None else derivable | f
            elif derivable is not None and (f & derivable).any():  # a `current` pin over elements another rule pinned
                differs = f & derivable & (bits(live) != bits(target))
                if differs.any():
                    self._conflict(earlier, state.rule, path, differs, target, live)
            earlier.append((state.rule, f))
            frozen = f if frozen is None else frozen | f
            if not state.rule.dynamic:
                static = f if static is None else static | f
        has_derivable, none = derivable is not None, np.zeros(shape, bool)
        frozen, derivable, static = (none if mask is None else mask for mask in (frozen, derivable, static))
        return VariablePlan(path, frozen, target, derivable, names, bool(static.all()), dynamic, live, has_derivable)

    @staticmethod
    def _conflict(earlier, rule: FreezeRule, path: str, differs: np.ndarray, target: np.ndarray, p: np.ndarray):
        other = next(r for r, f in earlier if (f & differs).any())
        index = np.unravel_index(int(np.flatnonzero(differs)[0]), differs.shape)
        raise FreezeConfigError(
            f"rules {other.name!r} (value {other.value}) and {rule.name!r} (value {rule.value}) pin "
            f"{int(differs.sum())} element(s) of variable {path!r} to different values, e.g. element "
            f"{tuple(int(i) for i in index)}: {float(target[index])!r} and {float(p[index])!r}; give them "
            "the same value or make their element selections disjoint (e.g. with 'exclude' or 'invert')"
        )

    def admit(self, rule: FreezeRule, infos: Sequence[VariableInfo], rules: Any, *, step: int, epoch: int,
              update_mode: str, initial_value: Callable[[str], np.ndarray],
              apply: Callable[[List[str]], Any]) -> RuleState:
        """Checks a rule against its target variables, resolves it and applies it; on an error undoes all.

        Args:
          rule: the rule.
          infos: the model's variables (:func:`~trainer.masks.variables.index_variables`).
          rules: the store of rule states (``rules`` mapping, ``add_rule``, ``remove_rule``).
          step, epoch: now.
          update_mode: the registry's ``update`` (``compact`` refuses rules whose count changes).
          initial_value: ``path -> array`` for a ``value: initial`` rule (read once, kept in
            :attr:`initial_values`).
          apply: ``paths -> ...``, writes the combined plans of ``paths`` (after the rule is stored).

        Returns:
          The rule's :class:`RuleState`.

        Raises:
          FreezeConfigError: the rule is refused (the message says why); nothing is left changed.
        """
        if rule.name in rules.rules:
            raise FreezeConfigError(f"a rule named {rule.name!r} exists already; rule names: {list(rules.rules)}")
        targets = select_variables(infos, rule.select, rule.layer_type, rule.exclude, rule.name)
        paths = admissible_paths(rule, targets, rules.rules.values(), update_mode, self.shapes)
        state = RuleState(rule, paths)
        added_initial = []
        try:
            if rule.value != "initial":  # refuse a constant the dtype cannot hold, before anything changes
                for path in paths:
                    self.pins(rule, path, None)
            else:
                added_initial = [p for p in paths if p not in self.initial_values]
                for path in added_initial:
                    self.initial_values[path] = initial_value(path)
            # Resolve once against every target now so that bad specs fail before training.
            if not rule.dynamic or rule.window.active(step, epoch):
                self.activate(state, step)
            else:
                for path in paths:
                    self.select(state, path, step)
            check_window_conflicts(self, state, rules.rules.values(), step)  # pins of overlapping windows
            rules.add_rule(state)
            apply(paths)
        except FreezeConfigError:
            self.fresh.clear()
            rules.remove_rule(rule.name)
            for path in added_initial:
                self.initial_values.pop(path, None)  # a refused read leaves none
            raise
        return state

    def advance(self, states: Sequence[RuleState], step: int, epoch: int) -> List[str]:
        """Switches scheduled rules on or off and re-selects due gradual-pruning rules at ``step`` / ``epoch``.

        Returns:
          The paths of the variables whose rules changed (to apply), in rule order.
        """
        touched: List[str] = []
        for state in states:
            change = due_change(state, step, epoch)
            if change is None:
                continue
            if change == "off":
                state.active, state.captured = False, {}
            else:
                self.activate(state, change)
                state.last_update_step = step
            touched += [p for p in state.paths if p not in touched]
        return touched
