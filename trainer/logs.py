"""Quiet runs and one-line errors: what a run prints besides its own progress.

- TensorFlow's native start-up lines (``oneDNN custom operations are on``,
  ``Could not find cuda drivers``, ``failed call to cuInit`` on every CPU
  machine, printed before absl logging is initialized and so deaf to
  ``TF_CPP_MIN_LOG_LEVEL``) are caught on file descriptor 2 while TensorFlow
  is imported and its devices listed; every other line there is passed on.
- TensorFlow's and absl's Python INFO records (``Sharding callback
  duration`` at every checkpoint) are raised to WARNING.
- A user error (config, data, freeze rules, resume) ends the run with one
  line naming the problem and one line of hint, without a traceback.

``log.verbose=true`` (or ``TRAINER_VERBOSE=1``) keeps everything, as does
``HYDRA_FULL_ERROR=1`` for errors.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import tempfile
from typing import Callable, List, Optional, Sequence

__all__ = ["ConsoleFilter", "ConsoleFormatter", "NATIVE_NOISE", "VERBOSE_ENV", "error_lines", "full_errors_requested", "hint_for",
           "import_tensorflow_quietly", "one_line", "quiet_python_loggers", "remember_existing_dirs",
           "remove_made_empty_dirs", "run_job",
           "run_reporting_errors", "user_errors", "verbose_requested"]

VERBOSE_ENV = "TRAINER_VERBOSE"
NATIVE_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|"
    r"^[IWE]\d{4} [\d:. ]+\d+ (port|cudart_stub|cuda_platform|cpu_feature_guard|cuda_executor|cuda_dnn|cuda_blas|"
    r"cuda_fft|gpu_device|dso_loader)\.cc:\d+\]|"
    r"^To enable the following instructions: .*rebuild TensorFlow"
)
QUIET_LOGGERS = ("absl", "tensorflow", "h5py", "matplotlib")


def verbose_requested(argv: Optional[Sequence[str]] = None) -> bool:
    """True when ``log.verbose=true`` is on the command line or ``TRAINER_VERBOSE`` is set to a true value."""
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes"):
        return True
    return any(re.fullmatch(r"\+*log\.verbose=(true|True|1|yes)", arg) for arg in argv)


def import_tensorflow_quietly(*, verbose: Optional[bool] = None) -> None:
    """Imports TensorFlow and lists its devices, dropping only its known start-up noise from stderr.

    When TensorFlow was imported before (``import keras`` first), its import
    lines are already written, but the device listing's (``failed call to
    cuInit``, which would come at the first op) is still caught here. Nothing
    happens when verbose. Lines that are not known noise (warnings, errors)
    are written to stderr after the import.
    """
    if verbose_requested() if verbose is None else verbose:
        return
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        stderr_fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # no real stderr (a notebook): nothing to catch
        stderr_fd = None
    if stderr_fd is None:
        importlib.import_module("tensorflow")
        return
    sys.stderr.flush()
    saved = os.dup(stderr_fd)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), stderr_fd)
        try:
            tf = importlib.import_module("tensorflow")
            tf.config.list_physical_devices()  # the "failed call to cuInit" line comes here
        finally:
            os.dup2(saved, stderr_fd)
            os.close(saved)
        caught.seek(0)
        text = caught.read().decode("utf-8", errors="replace")
    kept = [line for line in text.splitlines() if line.strip() and not NATIVE_NOISE.search(line)]
    if kept:
        sys.stderr.write("\n".join(kept) + "\n")


class ConsoleFormatter(logging.Formatter):
    """The console's format under Hydra: the ``trainer`` logger's INFO lines as they are, others prefixed.

    Hydra's ``[2026-12-03 16:31:32,758][trainer][INFO] - `` (44 characters)
    is kept for other loggers and levels (``[tensorflow][WARNING] - ...``) and
    for the run's log file (its own formatter).
    """

    def format(self, record: logging.LogRecord) -> str:
        if record.name.split(".")[0] == "trainer" and record.levelno == logging.INFO:
            return record.getMessage()
        return f"[{record.name}][{record.levelname}] - {super().format(record)}"


class ConsoleFilter(logging.Filter):
    """Keeps the per-save ``checkpoint <path>`` lines off the console (the run's log file still has them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "trainer" and record.msg == "checkpoint %s")


def quiet_python_loggers(verbose: bool) -> None:
    """Raises TensorFlow's and absl's Python loggers to WARNING unless ``verbose``."""
    level = logging.INFO if verbose else logging.WARNING
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)


def user_errors() -> tuple:
    """The exception classes that mean bad input (shown as one line), not a bug."""
    from trainer.allocator import AllocatorError
    from trainer.checkpoint import CheckpointError
    from trainer.config import ConfigError
    from trainer.data import DataError
    from trainer.controller import NonFiniteLossError
    from trainer.masks import FreezeConfigError
    from trainer.resume import ResumeError
    from trainer.rundir import RunDirError

    return (FreezeConfigError, DataError, ConfigError, ResumeError, RunDirError, CheckpointError, NonFiniteLossError,
            AllocatorError, ValueError, FileNotFoundError)


def hint_for(error: BaseException) -> str:
    """One line of advice for a user error (its own ``hint`` where it has one)."""
    if getattr(error, "hint", None):
        return str(error.hint)
    from trainer.config import ConfigError
    from trainer.data import DataError
    from trainer.controller import NonFiniteLossError
    from trainer.masks import FreezeConfigError
    from trainer.resume import ResumeError
    from trainer.rundir import RunDirError

    if isinstance(error, FreezeConfigError):
        advice = "check freeze.rules; add dry_run=true to list the variable paths and what each rule selects"
    elif isinstance(error, DataError):
        advice = ("pass data.path=/path/to/mnist.npz, set TRAINER_DATA_DIR to the directory holding mnist.npz, "
                  "or use data=digits (no download)")
    elif isinstance(error, ConfigError):
        advice = "configs/config.yaml lists every key with its allowed values"
    elif isinstance(error, ResumeError):
        advice = "resume=<run dir> continues that run; leave resume out to start a new run"
    elif isinstance(error, RunDirError):
        advice = "docs/reliability.md (\"Nothing lost\") says what a run directory guarantees and refuses"
    elif isinstance(error, NonFiniteLossError):
        advice = "lower optimizer.learning_rate, or set trainer.nan_policy=skip_step"
    else:
        advice = "check the value named above"
    return f"{advice} (add log.verbose=true or set HYDRA_FULL_ERROR=1 for the traceback)"


def full_errors_requested(verbose: bool) -> bool:
    """True when tracebacks are wanted: ``HYDRA_FULL_ERROR=1`` or verbose."""
    return verbose or os.environ.get("HYDRA_FULL_ERROR") == "1"


def one_line(error: BaseException) -> str:
    """``<type>: <first line of the message>``."""
    message = str(error).strip()
    return f"{type(error).__name__}: {message.splitlines()[0]}" if message else type(error).__name__


def error_lines(error: BaseException) -> str:
    """``Error: <type>: <message>`` and ``Hint: ...``: what a user error prints instead of a traceback."""
    return f"Error: {one_line(error)}\nHint: {hint_for(error)}"


def run_reporting_errors(fn: Callable, *args, verbose: bool,
                         on_error: Optional[Callable[[BaseException], None]] = None):
    """Calls ``fn(*args)``; a user error becomes :func:`error_lines` on stderr instead of a traceback.

    Args:
      fn, args: what to call.
      verbose: re-raise every error (as does ``HYDRA_FULL_ERROR=1``).
      on_error: called with a user error after it is printed; then ``None``
        is returned instead of exiting (a multirun job: the sweep goes on).

    Returns:
      ``fn``'s result, or ``None`` after a user error handled by ``on_error``.

    Raises:
      SystemExit: code 2 after a user error when ``on_error`` is ``None``.
      BaseException: anything else, and every error when tracebacks are wanted.
    """
    try:
        return fn(*args)
    except user_errors() as err:
        if full_errors_requested(verbose):
            raise
        sys.stderr.write(error_lines(err) + "\n")
        if on_error is None:
            raise SystemExit(2) from None
        on_error(err)
        return None


EXISTING_DIRS: set = set()  # the given run directory and its ancestors that existed before Hydra ran


def remember_existing_dirs(args: Sequence[str]) -> None:
    """Notes which of ``hydra.run.dir=<dir>`` (from the command line) and its ancestors exist now, before Hydra."""
    for arg in args:
        key, _, value = arg.partition("=")
        path = os.path.abspath(value) if key == "hydra.run.dir" and value else None
        while path and os.path.dirname(path) != path:
            if os.path.exists(path):
                EXISTING_DIRS.add(path)
            path = os.path.dirname(path)


def remove_made_empty_dirs(run_dir: str) -> List[str]:
    """Removes the run directory a refused run leaves empty, and its empty parents this run made.

    A directory that existed before Hydra ran (:func:`remember_existing_dirs`),
    the working directory and anything not empty are kept.

    Returns:
      The removed directories, innermost first.
    """
    removed, path, stop = [], os.path.abspath(run_dir), os.path.abspath(os.getcwd())
    while path != stop and path not in EXISTING_DIRS and os.path.isdir(path) and not os.listdir(path):
        try:
            os.rmdir(path)
        except OSError:
            break
        removed.append(path)
        path = os.path.dirname(path)
    return removed


def run_job(run: Callable, cfg) -> Optional[dict]:
    """One Hydra job, quiet unless ``log.verbose``: ``run(cfg)`` with user errors as one line.

    In a multirun a user error is also left in the job's folder
    (:func:`trainer.sweep.write_error`) and the sweep goes on; in a single
    run, the run directory Hydra made for it is removed if the refusal left
    it empty (:func:`remove_made_empty_dirs`), and so are the empty parents it made.

    Returns:
      ``run``'s report, or ``None`` after a user error in a multirun job.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from trainer.sweep import write_error

    verbose = bool(cfg.log.get("verbose", False))
    quiet_python_loggers(verbose)
    on_error, run_dir = None, None
    try:
        hydra_cfg = HydraConfig.get()
        run_dir = hydra_cfg.runtime.output_dir
        if hydra_cfg.mode == RunMode.MULTIRUN:
            job_dir = hydra_cfg.runtime.output_dir
            overrides = list(hydra_cfg.overrides.task)
            on_error = lambda err: write_error(job_dir, one_line(err), overrides)  # noqa: E731
    except ValueError:  # outside Hydra
        pass
    try:
        return run_reporting_errors(run, cfg, verbose=verbose, on_error=on_error)
    except SystemExit:
        if run_dir is not None:
            remove_made_empty_dirs(run_dir)
        raise
