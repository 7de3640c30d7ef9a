"""Argument checks shared by every module: whole numbers in a range, and keys against the allowed ones.

Pure Python, so that :mod:`trainer.masks` and the modules above it use the
same checks (and the same wording) without importing each other.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence, Type

import numpy as np


def is_whole(value: Any, minimum: Optional[int] = None, maximum: Optional[int] = None) -> bool:
    """True for an integer (Python or NumPy, never a bool) with ``minimum <= value < maximum`` where given.

    Args:
      value: anything.
      minimum: the smallest value allowed (inclusive), or ``None``.
      maximum: the first value not allowed (exclusive), or ``None``.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        return False
    return (minimum is None or value >= minimum) and (maximum is None or value < maximum)


def positive_int(name: str, value: Any, *, error: Type[Exception] = ValueError) -> int:
    """``value`` as an ``int`` when it is a positive integer.

    Raises:
      error: (``ValueError`` by default) ``"<name> must be a positive integer, got <value!r>"``.
    """
    if not is_whole(value, 1):
        raise error(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_known(given: Iterable[str], allowed: Iterable[str], *, error: Type[Exception],
                what: str = "unknown key(s) {unknown}", shown: Optional[Sequence[Any]] = None) -> None:
    """Refuses keys outside ``allowed``, naming them and what is allowed.

    Args:
      given: the keys given.
      allowed: the keys allowed.
      error: the exception class raised.
      what: the message's start, with ``{unknown}`` for the sorted unknown keys
        (e.g. ``"rule 'a': unknown key(s) {unknown}"``).
      shown: what the message lists as allowed (default ``list(allowed)``).

    Raises:
      error: ``"<what>; allowed: <shown>"`` when some key is unknown.
    """
    allowed = list(allowed)
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise error(f"{what.replace('{unknown}', str(unknown))}; allowed: {allowed if shown is None else list(shown)}")


def step_span(what: str, begin_step: Any, end_step: Any, *, error: Type[Exception] = ValueError) -> None:
    """Checks the ``begin_step`` and ``end_step`` of a schedule: non-negative integers, ``end_step > begin_step``.

    Args:
      what: the schedule's name in messages, e.g. ``"schedule"``.
      begin_step, end_step: the values given.
      error: the exception class raised.

    Raises:
      error: ``"<what>.<name> must be a non-negative integer, got <value!r>"``, or
        ``"<what>.end_step (<end>) must be greater than begin_step (<begin>)"``.
    """
    for name, value in (("begin_step", begin_step), ("end_step", end_step)):
        if not is_whole(value, 0):
            raise error(f"{what}.{name} must be a non-negative integer, got {value!r}")
    if end_step <= begin_step:
        raise error(f"{what}.end_step ({end_step}) must be greater than begin_step ({begin_step})")
