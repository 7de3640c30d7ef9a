"""Variable paths as every registry method takes them: the full path or a unique trailing sub-path.

A Keras 3 variable path is ``<layer path>/<variable name>``; a functional or
sequential model puts nothing before its layers (``fc1/kernel``), a subclassed
or nested one its own name (``lenet/fc1/kernel``). ``"fc1/kernel"`` then names
``lenet/fc1/kernel`` as it does in a freeze rule's ``select``.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["resolve_path"]


def resolve_path(path: str, paths: Sequence[str]) -> str:
    """The one variable path of ``paths`` that is ``path`` or ends with ``/<path>``.

    Raises:
      KeyError: none matches (the message lists the paths), or several do
        (the message lists those: pass a longer sub-path).
    """
    if path in paths:
        return path
    matches = [p for p in paths if p.endswith("/" + path)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise KeyError(f"{path!r} is ambiguous: it ends {len(matches)} variable paths: {', '.join(matches)}; "
                       "pass a longer sub-path")
    raise KeyError(f"no variable {path!r}; the variable paths are: {', '.join(paths)}")
