"""Hydra entry point: ``python -m trainer +experiment=sparse_mlp [overrides]``.

Parses the command line (resolving ``resume=`` to a run directory), calls
``run(cfg)`` (a user error prints one line and a hint: :mod:`trainer.logs`),
exits non-zero when the run was interrupted, and returns the configured
``optimized_metric`` to a sweeper (:mod:`trainer.sweep`).
"""

import os
import sys
from typing import Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from trainer.cli_errors import preflight  # noqa: E402
from trainer.config import ConfigError, register  # noqa: E402
from trainer.logs import error_lines, remember_existing_dirs, run_job  # noqa: E402
from trainer.sweep import optimized_value  # noqa: E402
from trainer.resume import ResumeError, resolve_resume  # noqa: E402

__all__ = ["entry", "main"]

register()
EXIT_INTERRUPTED = 130


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    """Runs one job; returns ``optimized_metric`` of its report (what a sweeper optimizes), else ``None``."""
    from trainer.run import run

    result = run_job(run, cfg)
    if result is not None and result.get("status") == "interrupted":
        sys.exit(EXIT_INTERRUPTED)
    return optimized_value(cfg, result)


def entry() -> None:
    """Console entry point (also used by ``python -m trainer``)."""
    try:
        sys.argv = [sys.argv[0]] + resolve_resume(sys.argv[1:])
        remember_existing_dirs(sys.argv[1:])  # a refused run removes only the directories Hydra made for it
        if os.environ.get("HYDRA_FULL_ERROR") != "1":
            preflight(sys.argv[1:])  # our one-line errors, before Hydra makes a run directory
    except (ResumeError, ConfigError) as err:
        sys.stderr.write(error_lines(err) + "\n")
        sys.exit(2)
    main()


if __name__ == "__main__":
    entry()
