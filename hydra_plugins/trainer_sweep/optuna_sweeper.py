"""``hydra/sweeper=optuna_safe``: Hydra's Optuna sweeper, with every failed or non-finite trial recorded as failed.

hydra-optuna-sweeper tells Optuna ``COMPLETE`` with the job's return value;
Optuna refuses ``nan`` (``Trial 0 failed, because the objective function
returned nan``) and the sweeper's fallback, ``FAIL`` with the same values, is
refused too (``Values cannot be specified when state is ... FAIL``): the sweep
ended at the first failed job with a traceback, no further trials and no
results. The trainer returns ``nan`` for a job that failed (an invalid config,
a divergence, a dead process) or that ended before the first value of a
``val_*`` metric (:func:`trainer.sweep.optimized_value`).

:class:`RecordingOptunaSweeper` gives the plugin's sweeper a launcher that turns
each such job into a failed ``JobReturn`` (a :class:`TrialFailed`), which the
plugin records as ``TrialState.FAIL`` without values; the job's folder gets the
reason in ``error.txt`` unless it already has one. With
``max_failure_rate: 1.0`` (the config's default) the sweep runs all
``n_trials``. A sweep in which no trial completed writes
``optimization_results.yaml`` with ``best_value: null`` instead of raising, and
one stopped by a lower ``max_failure_rate`` ends normally: in both cases the
results table of every job is written.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from typing import Any, List, Optional, Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class TrialFailed(Exception):
    """A job that failed or returned no finite number: an Optuna trial recorded as ``FAIL``."""


def _folder(ret: JobReturn) -> Optional[str]:
    return OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir") if ret.hydra_cfg is not None else None


def failure(ret: JobReturn) -> Optional[str]:
    """Why a job's return is not a trial value (one line), or ``None`` when it is a finite number."""
    from trainer.logs import one_line

    if ret.status != JobStatus.COMPLETED:
        try:
            ret.return_value
        except Exception as err:  # JobReturn raises the job's exception
            return one_line(err)
    value = ret.return_value
    values = value if isinstance(value, (list, tuple)) and value else [value]  # one value per direction
    if all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        return None
    metric = OmegaConf.select(ret.cfg, "optimized_metric") if ret.cfg is not None else None
    named = f" for optimized_metric={metric}" if metric else ""
    return (f"TrialFailed: returned {value!r}{named} (a failed run, or one that ended before the metric's first "
            "value); recorded as a failed trial")


class _RecordingLauncher:
    """Wraps the sweeper's (set-up) launcher: a failed or non-finite job comes back ``FAILED`` with a TrialFailed.

    Not a ``Launcher`` subclass, so that Hydra does not list it as a plugin; it
    counts the completed and failed trials for :class:`RecordingOptunaSweeper`.
    """

    def __init__(self, inner: Launcher) -> None:
        self.inner, self.completed, self.failed = inner, 0, 0

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from trainer.sweep import ERROR_FILE, write_error

        returns = list(self.inner.launch(job_overrides, initial_job_idx))
        for number, ret in enumerate(returns, start=initial_job_idx):
            why = failure(ret)
            if why is None:
                self.completed += 1
                continue
            self.failed += 1
            folder = _folder(ret)
            if folder and not os.path.isfile(os.path.join(folder, ERROR_FILE)):
                write_error(folder, why, [str(o) for o in ret.overrides or []])
            log.warning("trial %d failed: %s", number, why)
            ret.status, ret.return_value = JobStatus.FAILED, TrialFailed(why)
        return returns


class RecordingOptunaSweeper(OptunaSweeper):
    """hydra-optuna-sweeper's ``OptunaSweeper``, recording failed trials and going on (see the module).

    Takes the plugin's arguments (``sampler``, ``direction``, ``n_trials``,
    ``n_jobs``, ``max_failure_rate``, ``params``, ...) unchanged.
    """

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.recorder = _RecordingLauncher(self.sweeper.launcher)
        self.sweeper.launcher = self.recorder
        self.results_file = os.path.join(str(config.hydra.sweep.dir), "optimization_results.yaml")

    def sweep(self, arguments: List[str]) -> Any:
        """Runs the study to ``n_trials``; never raises for failed trials (the results table follows)."""
        try:
            return super().sweep(arguments)
        except TrialFailed:
            log.error("the sweep stopped after %d failed trials (hydra.sweeper.max_failure_rate=%s); "
                      "%d trials completed", self.recorder.failed, self.sweeper.max_failure_rate,
                      self.recorder.completed)
        except ValueError as err:  # optuna: "No trials are completed yet." from study.best_trial
            if self.recorder.completed or not self.recorder.failed:
                raise
            log.error("no trial completed (%d failed: see each job's error.txt and sweep_results.md)",
                      self.recorder.failed)
            OmegaConf.save(OmegaConf.create({"name": "optuna", "best_params": None, "best_value": None,
                                             "failed_trials": self.recorder.failed, "error": str(err)}),
                           self.results_file)
        return None
