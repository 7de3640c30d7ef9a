"""Hydra entry point: ``python -m trainer +experiment=sparse_mlp [overrides]``.

Parses the command line (resolving ``resume=`` to a run directory), calls
``run(cfg)``, and exits non-zero when the run was interrupted.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from trainer.config import register  # noqa: E402
from trainer.resume import ResumeError, resolve_resume  # noqa: E402

register()
EXIT_INTERRUPTED = 130


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> None:
    from trainer.run import run

    result = run_or_refuse(run, cfg)
    if result.get("status") == "interrupted":
        sys.exit(EXIT_INTERRUPTED)


def run_or_refuse(run, cfg: DictConfig) -> dict:
    """Calls ``run(cfg)``; a refused run directory or resume ends with one line on stderr and exit code 2."""
    from trainer.checkpoint import CheckpointError
    from trainer.rundir import RunDirError

    try:
        return run(cfg)
    except (RunDirError, ResumeError, CheckpointError) as err:
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(2)


def entry() -> None:
    """Console entry point (also used by ``python -m trainer``)."""
    try:
        sys.argv = [sys.argv[0]] + resolve_resume(sys.argv[1:])
    except ResumeError as err:
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    entry()
