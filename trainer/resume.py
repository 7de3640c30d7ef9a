"""``resume=<run dir>`` and ``resume=true``: find the run directory to continue in place.

Hydra picks the run directory before the job starts, so the entry point
resolves ``resume`` from the command line first and passes
``hydra.run.dir=<that directory>`` on to Hydra.
"""

from __future__ import annotations

import os
from typing import List, Optional

TRUE = ("true", "True", "yes", "1")


class ResumeError(ValueError):
    """The run to resume does not exist or holds no checkpoint."""


def has_checkpoint(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, "checkpoints", "checkpoint"))


def _override(argv: List[str], key: str) -> Optional[str]:
    for arg in argv:
        for prefix in (f"{key}=", f"+{key}=", f"++{key}="):
            if arg.startswith(prefix):
                return arg[len(prefix):]
    return None


def latest_run(outputs_root: str, name: str) -> str:
    """The newest run directory of experiment ``name`` under ``outputs_root`` that has a checkpoint.

    Raises:
      ResumeError: none exists (the message names the directory searched).
    """
    base = os.path.join(outputs_root, name)
    runs = [os.path.join(base, d) for d in os.listdir(base)] if os.path.isdir(base) else []
    runs = [r for r in runs if has_checkpoint(r)]
    if not runs:
        raise ResumeError(f"resume=true: no run with a checkpoint under {base!r}; "
                          "pass resume=<run dir> or start a new run without resume")
    return max(runs, key=lambda r: os.path.getmtime(os.path.join(r, "checkpoints", "checkpoint")))


def resolve_resume(argv: List[str], outputs_root: str = "outputs") -> List[str]:
    """Returns ``argv`` with ``hydra.run.dir`` set to the run that ``resume=`` names.

    ``resume=true`` takes the latest run of the experiment (``name=`` or
    ``+experiment=`` on the command line, else ``default``); ``resume=<dir>``
    takes that directory; no ``resume`` (or ``resume=null``) changes nothing.

    Raises:
      ResumeError: the directory is missing or has no checkpoint.
    """
    value = _override(argv, "resume")
    if value in (None, "", "null", "None", "false", "False"):
        return argv
    if value in TRUE:
        name = _override(argv, "name") or _override(argv, "experiment") or "default"
        run_dir = latest_run(outputs_root, name)
    else:
        run_dir = os.path.expanduser(value)
        if not os.path.isdir(run_dir):
            raise ResumeError(f"resume={value!r} is not a directory; pass the run directory of an earlier run")
        if not has_checkpoint(run_dir):
            raise ResumeError(f"resume={value!r} has no checkpoints/checkpoint to continue from")
    run_dir = os.path.abspath(run_dir)
    argv = [a for a in argv if not a.startswith(("hydra.run.dir=", "+resume=", "++resume=", "resume="))]
    return argv + [f"resume={run_dir}", f"hydra.run.dir={run_dir}"]
