"""``hydra/launcher=processes``: every job of a multirun in its own local process, ``n_jobs`` at a time.

Hydra's joblib launcher runs jobs in a shared pool of loky workers: when one
worker dies (the out-of-memory killer, ``kill -9``), loky breaks the pool, the
other running jobs are killed with it and ``Parallel`` raises
``TerminatedWorkerError``, so the sweep ends with a traceback and no results
table. Here each job is one ``python`` child process (as submitit does): a
child that dies takes only its own job with it. That job's folder gets
``error.txt`` saying how its process ended (the sweep table lists it as
``failed: ...``), it returns ``nan`` to the sweeper (the Optuna sweeper of
``hydra/sweeper=optuna_safe`` records a failed trial), and the other jobs go on.

A job function that raises is handled the same way (its traceback is printed
by the child), so a multirun always reaches its end and its results table.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

POLL_SECONDS = 0.1
CHILD = ("import os, sys; sys.path[:] = sys.argv[3].split(os.pathsep); "
         "from hydra_plugins.trainer_sweep.process_launcher import run_child; run_child(sys.argv[1], sys.argv[2])")


def job_config(hydra_context: HydraContext, config: DictConfig, overrides: Sequence[str], idx: int) -> DictConfig:
    """The config of job ``idx`` (as Hydra's joblib launcher builds it): sweep overrides applied, ``job.num`` set."""
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
        sweep_config.hydra.job.num = idx
    return sweep_config


def job_dir(sweep_config: DictConfig) -> str:
    """The job's folder, ``hydra.sweep.dir/hydra.sweep.subdir``, resolved as ``hydra.core.utils.run_job`` does."""
    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(sweep_config)
    try:
        return os.path.abspath(os.path.join(str(OmegaConf.select(sweep_config, "hydra.sweep.dir")),
                                            str(OmegaConf.select(sweep_config, "hydra.sweep.subdir"))))
    finally:
        HydraConfig.instance().cfg = previous


def run_child(payload_path: str, result_path: str) -> None:
    """The child process: runs one job from ``payload_path``; writes ``(JobReturn, error)`` to ``result_path``.

    A job function that raises has its traceback printed here (it does not
    survive pickling); ``error`` is then its one-line message, else ``None``.
    """
    import cloudpickle

    from trainer.logs import one_line

    with open(payload_path, "rb") as f:
        job = pickle.load(f)
    setup_globals()
    Singleton.set_state(job.pop("singleton_state"))
    ret = run_job(hydra_context=job["hydra_context"], config=job["config"], task_function=job["task_function"],
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    error = None
    if ret.status == JobStatus.FAILED:
        try:
            ret.return_value
        except Exception as err:  # the job's own exception, raised again by JobReturn
            traceback.print_exception(type(err), err, err.__traceback__)
            error = one_line(err)
        ret.status, ret.return_value = JobStatus.COMPLETED, float("nan")
    with open(result_path + ".tmp", "wb") as f:
        cloudpickle.dump((ret, error), f)
    os.replace(result_path + ".tmp", result_path)


def how_it_ended(pid: int, code: int) -> str:
    """One line on a child that left no result: killed by a signal, or exited with a code."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        why = " (the out-of-memory killer, or kill -9)" if -code == signal.SIGKILL else ""
        return f"JobProcessDied: the job's process (pid {pid}) was killed by {name}{why}; the other jobs went on"
    return f"JobProcessDied: the job's process (pid {pid}) exited with code {code} before the job ended"


class _Child:
    """One job: its config and folder, and the process running it once started."""

    def __init__(self, idx: int, overrides: Sequence[str], config: DictConfig, folder: str, tmp: str):
        self.idx, self.overrides, self.config, self.folder = idx, list(overrides), config, folder
        self.payload, self.result = os.path.join(tmp, f"{idx}.job"), os.path.join(tmp, f"{idx}.ret")
        self.process: Optional[subprocess.Popen] = None

    def start(self, shared: Dict[str, Any]) -> None:
        import cloudpickle

        with open(self.payload, "wb") as f:
            cloudpickle.dump({**shared, "config": self.config}, f)
        self.process = subprocess.Popen([sys.executable, "-c", CHILD, self.payload, self.result,
                                         os.pathsep.join(sys.path)])

    def outcome(self) -> JobReturn:
        """The child's ``JobReturn``; a failure becomes ``nan`` with the reason in the job's ``error.txt``."""
        from trainer.sweep import ERROR_FILE, write_error

        assert self.process is not None
        ret, error = None, None
        if os.path.isfile(self.result):
            with open(self.result, "rb") as f:
                ret, error = pickle.load(f)
        else:
            error = how_it_ended(self.process.pid, self.process.returncode)
        if error is None:
            return ret
        if not os.path.isfile(os.path.join(self.folder, ERROR_FILE)):
            write_error(self.folder, error, self.overrides)
        log.warning("job #%d (%s) failed: %s", self.idx, " ".join(filter_overrides(self.overrides)), error)
        if ret is None:
            ret = JobReturn(overrides=self.overrides, working_dir=os.getcwd(), status=JobStatus.COMPLETED)
            ret.return_value = float("nan")
        return ret


class ProcessLauncher(Launcher):
    """Hydra launcher: each job in its own ``python`` process, at most ``n_jobs`` at once (see the module).

    Args:
      n_jobs: how many jobs run at the same time (>= 1).

    Raises:
      ValueError: ``n_jobs`` is not a positive integer.
    """

    def __init__(self, n_jobs: int = 2) -> None:
        if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs < 1:
            raise ValueError(f"hydra.launcher.n_jobs must be a positive integer (jobs at once), got {n_jobs!r}")
        self.n_jobs = n_jobs
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.task_function: Optional[TaskFunction] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Runs the jobs, ``n_jobs`` at a time; returns one ``JobReturn`` per job, in order.

        A job whose process died or whose function raised returns ``nan``
        (status completed, so that no sweeper stops at it); why is in its
        folder's ``error.txt``. Ctrl-C waits for the running jobs (they get the
        signal too, and checkpoint) before it is raised.
        """
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("Launching %d jobs, %d at a time, each in its own process; sweep output dir: %s",
                 len(job_overrides), self.n_jobs, sweep_dir)
        shared = {"hydra_context": self.hydra_context, "task_function": self.task_function,
                  "singleton_state": Singleton.get_state()}
        with tempfile.TemporaryDirectory(prefix="trainer-jobs-") as tmp:
            children = []
            for offset, overrides in enumerate(job_overrides):
                idx = initial_job_idx + offset
                log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
                config = job_config(self.hydra_context, self.config, overrides, idx)
                children.append(_Child(idx, overrides, config, job_dir(config), tmp))
            return self._run(children, shared)

    def _run(self, children: List[_Child], shared: Dict[str, Any]) -> List[JobReturn]:
        waiting, running, returns = list(children), [], {}
        try:
            while waiting or running:
                while waiting and len(running) < self.n_jobs:
                    running.append(waiting.pop(0))
                    running[-1].start(shared)
                time.sleep(POLL_SECONDS)
                for child in [c for c in running if c.process.poll() is not None]:
                    running.remove(child)
                    returns[child.idx] = child.outcome()
        except KeyboardInterrupt:
            for child in running:
                child.process.wait()
            raise
        return [returns[child.idx] for child in children]
