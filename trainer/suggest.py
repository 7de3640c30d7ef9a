"""Nearest valid names for a mistyped key or option (``difflib``), as one line of hint.

Example: ``trainer.epoch`` -> "did you mean trainer.epochs? valid keys of trainer: epochs, max_steps, ...".
"""

from __future__ import annotations

import difflib
from typing import Optional, Sequence

__all__ = ["nearest", "suggestion"]


def nearest(name: str, valid: Sequence[str]) -> Optional[str]:
    """The valid name closest to ``name`` (``difflib.get_close_matches``, cutoff 0.6), or ``None``."""
    matches = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return matches[0] if matches else None


def suggestion(name: str, valid: Sequence[str], what: str, *, prefix: str = "") -> str:
    """``did you mean <prefix><nearest>? <what>: a, b, c`` (``no close match; ...`` when none is near).

    Args:
      name: the mistyped name (without ``prefix``).
      valid: the names allowed in its place.
      what: how the list is introduced, e.g. ``valid keys of trainer``.
      prefix: put before the suggested name (``trainer.``).
    """
    match = nearest(name, valid)
    head = f"did you mean {prefix}{match}?" if match is not None else "no close match;"
    return f"{head} {what}: {', '.join(valid)}"
