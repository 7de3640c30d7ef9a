"""Errors raised while declaring or resolving freeze rules."""

from __future__ import annotations


class FreezeConfigError(ValueError):
    """A freeze rule is invalid for the model it is applied to.

    Raised before any training step runs: for a selector that matches no
    variable, an unknown key, an index out of range, a mask of the wrong shape,
    a fraction outside [0, 1], a non-numeric value, an unparseable slice, a
    missing or pickled mask file, or two rules that pin one element to
    different values. The message names the bad value and what is allowed.
    It subclasses :class:`ValueError`, so ``except ValueError`` also catches it.
    """
