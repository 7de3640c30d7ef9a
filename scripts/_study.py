"""The start-up the study scripts share: logging, the config schema, Hydra's config directory, resumable runs.

A library of ``lottery_ticket.py``, ``lt_sft.py``, ``sft_study.py`` and ``snip_study.py``, not a command (the
scripts' own folder is on ``sys.path`` when one runs ``python scripts/<name>.py``). It uses only the public
API: ``trainer.config.register`` and ``trainer.run.run``.

Examples:
  >>> with configs():                                  # doctest: +SKIP
  ...     report = run_once(["+experiment=lottery_ticket", "seed=0"], "/tmp/lt/round00")
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Dict, Iterator, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs")
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # the format of the CLI's runs (Hydra's)
REPORT = "report.json"


@contextlib.contextmanager
def configs() -> Iterator[None]:
    """Within the block, :func:`compose` reads the project's ``configs/`` (Hydra's ``initialize_config_dir``).

    Also sets up logging at INFO in the CLI's format and registers the config
    schema (``trainer.config.register``), as ``python -m trainer`` does.
    """
    from hydra import initialize_config_dir

    from trainer.config import register

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    register()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        yield


def compose(overrides: Sequence[str]):
    """The run's config: ``hydra.compose`` of ``config`` with ``overrides`` (inside :func:`configs`).

    Returns:
      The composed ``DictConfig``.

    Raises:
      ValueError: outside :func:`configs` (Hydra is not initialised), or an override Hydra refuses.
    """
    from hydra import compose as hydra_compose

    return hydra_compose(config_name="config", overrides=list(overrides))


def finished(run_dir: str) -> bool:
    """Whether ``run_dir`` holds a finished run (its ``report.json``)."""
    return os.path.isfile(os.path.join(run_dir, REPORT))


def read_report(run_dir: str) -> Dict[str, Any]:
    """The ``report.json`` of a finished run.

    Raises:
      FileNotFoundError: the run did not finish.
    """
    with open(os.path.join(run_dir, REPORT)) as f:
        return json.load(f)


def run_once(overrides: Sequence[str], run_dir: str) -> Dict[str, Any]:
    """One ordinary run of ``overrides`` in ``run_dir`` (inside :func:`configs`); returns its report.

    The composed config is kept as ``<run_dir>/config.yaml``. A finished run
    is not run again: its report is returned, so an interrupted study resumes.

    Raises:
      whatever ``trainer.run.run`` raises (``RunDirError`` for a directory holding an unfinished run's files).
    """
    if finished(run_dir):
        return read_report(run_dir)
    import keras
    from omegaconf import OmegaConf

    from trainer.run import run

    cfg = compose(overrides)
    os.makedirs(run_dir, exist_ok=True)
    OmegaConf.save(cfg, os.path.join(run_dir, "config.yaml"))
    keras.backend.clear_session()
    return run(cfg, run_dir=run_dir)
