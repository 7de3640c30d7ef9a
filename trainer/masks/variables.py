"""Variable selection: which variables of a model a rule applies to.

Variables are named by their Keras 3 ``variable.path`` (e.g.
``"lenet/fc1/kernel"``). A glob pattern matches a path when it matches the whole
path or a trailing sub-path of it, so ``"fc1/kernel"`` and ``"*/kernel"`` both
match ``"lenet/fc1/kernel"``. A pattern starting with ``re:`` is a regular
expression in RE2 syntax (google-re2), matched in full against the same
candidates. RE2 runs in time linear in the input whatever the pattern, so a
pathological selector such as ``re:(.*)*(.*)*z`` cannot hang a run; it has no
backreferences or lookaround (Python's ``re`` backtracks exponentially).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
from typing import Iterable, List, Optional, Sequence, Tuple

import keras
import re2

from trainer.masks.errors import FreezeConfigError
from trainer.masks.heads import head_axes


@dataclasses.dataclass(frozen=True)
class VariableInfo:
    """One variable of a model, with what selection needs to know of it.

    Attributes:
      path: ``variable.path``.
      variable: the ``keras.Variable``.
      trainable: ``variable.trainable``.
      layer_types: class names (and base class names) of every layer that owns
        the variable, nested models included, e.g. ``("Dense", "Layer", ...)``.
      heads_axis: the axis indexing attention heads of an attention projection's kernel or bias
        (:func:`trainer.masks.heads.head_axes`), else ``None``.
    """

    path: str
    variable: keras.Variable
    trainable: bool
    layer_types: Tuple[str, ...]
    heads_axis: Optional[int] = None


def _flatten_layers(model: keras.layers.Layer) -> List[keras.layers.Layer]:
    layers, stack, seen = [], [model], set()
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        layers.append(layer)
        stack.extend(reversed(getattr(layer, "_layers", []) or []))
    return layers


def index_variables(model: keras.layers.Layer) -> List[VariableInfo]:
    """Lists every variable of a built model, in ``model.variables`` order.

    Raises:
      FreezeConfigError: the model is not built (it has no variables) or two
        variables share one path.
    """
    variables = list(model.variables)
    if not variables:
        raise FreezeConfigError(
            f"model {model.name!r} has no variables; build it (call it on an input) before creating its MaskRegistry"
        )
    owners, layers = {}, _flatten_layers(model)
    axes = head_axes(layers)
    for layer in layers:
        names = tuple(c.__name__ for c in type(layer).__mro__ if issubclass(c, keras.layers.Layer))
        for v in layer.weights:
            owners.setdefault(id(v), set()).update(names)
    infos, seen = [], {}
    for v in variables:
        if v.path in seen:
            raise FreezeConfigError(f"two variables share the path {v.path!r}; give their layers distinct names")
        seen[v.path] = v
        infos.append(VariableInfo(v.path, v, bool(v.trainable), tuple(sorted(owners.get(id(v), ()))), axes.get(id(v))))
    return infos


@functools.lru_cache(maxsize=256)
def compile_regex(pattern: str):
    """Compiles an RE2 regular expression (without RE2's own error logging).

    Raises:
      FreezeConfigError: not valid RE2 syntax (the message names the pattern and RE2's reason).
    """
    options = re2.Options()
    options.log_errors = False
    try:
        return re2.compile(pattern, options=options)
    except re2.error as err:
        reason = err.args[0].decode() if err.args and isinstance(err.args[0], bytes) else str(err)
        raise FreezeConfigError(f"'re:{pattern}' is not a valid regular expression ({reason}); selectors use "
                                "RE2 syntax, without backreferences or lookaround") from None


def path_matches(pattern: str, path: str) -> bool:
    """True when ``pattern`` (glob or ``re:`` regex) matches ``path`` or a trailing sub-path."""
    parts = path.split("/")
    candidates = ["/".join(parts[i:]) for i in range(len(parts))]
    if pattern.startswith("re:"):
        regex = compile_regex(pattern[3:])
        return any(regex.fullmatch(c) for c in candidates)
    return any(fnmatch.fnmatchcase(c, pattern) for c in candidates)


def validate_pattern(pattern: object, key: str) -> str:
    """Checks one pattern's type and, for ``re:``, that it compiles."""
    if not isinstance(pattern, str) or not pattern:
        raise FreezeConfigError(f"{key} must be a non-empty string glob or 're:<regex>', got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            compile_regex(pattern[3:])
        except FreezeConfigError as err:
            raise FreezeConfigError(f"{key}: {err}") from None
    return pattern


def select_variables(
    infos: Sequence[VariableInfo],
    select: Sequence[str],
    layer_types: Sequence[str],
    exclude: Sequence[str],
    rule_name: str,
) -> List[VariableInfo]:
    """The variables a rule selects, in model order.

    A variable is selected when it matches any ``select`` pattern (all
    variables if ``select`` is empty) and, if ``layer_types`` is given, is owned
    by a layer of one of those classes, and matches no ``exclude`` pattern.

    Raises:
      FreezeConfigError: a ``select`` or ``exclude`` pattern or a
        ``layer_type`` matches no variable of the model (the message lists the
        paths or layer types that exist), or the rule selects nothing after
        ``exclude``.
    """
    all_paths = [i.path for i in infos]
    for pattern in select:
        if not any(path_matches(pattern, p) for p in all_paths):
            raise FreezeConfigError(
                f"rule {rule_name!r}: select {pattern!r} matches no variable; the variable paths are: "
                + ", ".join(all_paths)
            )
    for pattern in exclude:
        if not any(path_matches(pattern, p) for p in all_paths):
            raise FreezeConfigError(
                f"rule {rule_name!r}: exclude {pattern!r} matches no variable (a typo would freeze more than "
                "intended); the variable paths are: " + ", ".join(all_paths)
            )
    known_types = sorted({t for i in infos for t in i.layer_types})
    for layer_type in layer_types:
        if not any(layer_type in i.layer_types for i in infos):
            raise FreezeConfigError(
                f"rule {rule_name!r}: layer_type {layer_type!r} owns no variable; layer types in the model: "
                + ", ".join(known_types)
            )
    chosen = [
        i
        for i in infos
        if (not select or any(path_matches(p, i.path) for p in select))
        and (not layer_types or any(t in i.layer_types for t in layer_types))
        and not any(path_matches(p, i.path) for p in exclude)
    ]
    if not chosen:
        raise FreezeConfigError(
            f"rule {rule_name!r} selects no variable (select={list(select)}, layer_type={list(layer_types)}, "
            f"exclude={list(exclude)}); the variable paths are: " + ", ".join(all_paths)
        )
    return chosen


def as_list(value: object, key: str) -> List[str]:
    """A pattern or list of patterns as a list of validated strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [validate_pattern(value, key)]
    if isinstance(value, Iterable):
        return [validate_pattern(v, key) for v in value]
    raise FreezeConfigError(f"{key} must be a string or a list of strings, got {value!r}")
