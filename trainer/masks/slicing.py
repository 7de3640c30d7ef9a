"""A small grammar for numpy-style basic slicing written as a string.

``parse_slice("[:, :10]")`` returns ``(slice(None), slice(None, 10))``. Only
integers, ``:``, ``::`` steps, ``...`` and ``,`` are understood; nothing is ever
passed to ``eval``.
"""

from __future__ import annotations

import re
from typing import Tuple, Union

from trainer.masks.errors import FreezeConfigError

Index = Union[int, slice, type(Ellipsis)]

_INT = r"[+-]?\d+"
_PART = re.compile(rf"^\s*({_INT})?\s*(?::\s*({_INT})?\s*(?::\s*({_INT})?\s*)?)?$")


def _parse_part(text: str, source: str) -> Index:
    text = text.strip()
    if text == "...":
        return Ellipsis
    match = _PART.match(text)
    if not match or text == "":
        raise FreezeConfigError(
            f"cannot parse slice {source!r}: the part {text!r} is not an integer, "
            "'start:stop', 'start:stop:step' or '...'. Example: '[:, :10]' or '[0, 2:5]'."
        )
    if ":" not in text:
        return int(match.group(1))
    start, stop, step = (int(g) if g is not None else None for g in match.groups())
    if step == 0:
        raise FreezeConfigError(f"cannot parse slice {source!r}: a slice step must not be 0")
    return slice(start, stop, step)


def parse_slice(text: str) -> Tuple[Index, ...]:
    """Parses a basic-slicing expression such as ``"[:, :10]"``.

    Args:
      text: a string of comma-separated parts in square brackets (the brackets
        may be left out); each part is an integer, ``start:stop[:step]`` with
        optional integers, or ``...``.

    Returns:
      A tuple of ``int``, ``slice`` and ``Ellipsis`` usable as a numpy index.

    Raises:
      FreezeConfigError: the text is not of that form (the message shows it).
    """
    if not isinstance(text, str):
        raise FreezeConfigError(f"a slice must be a string such as '[:, :10]', got {text!r}")
    body = text.strip()
    if body.startswith("["):
        if not body.endswith("]"):
            raise FreezeConfigError(f"cannot parse slice {text!r}: '[' without a closing ']'")
        body = body[1:-1]
    if not body.strip():
        raise FreezeConfigError(f"cannot parse slice {text!r}: it is empty; write e.g. '[:, :10]'")
    parts = tuple(_parse_part(p, text) for p in body.split(","))
    if sum(p is Ellipsis for p in parts) > 1:
        raise FreezeConfigError(f"cannot parse slice {text!r}: '...' may appear once at most")
    return parts
