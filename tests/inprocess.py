"""``python -m trainer <args>`` run in this process: the same entry point, exit code, stdout and stderr.

A process start costs about 6 s of CPU (TensorFlow, Keras, scikit-learn and matplotlib imports) before the
run does anything, which on the 2-core CI machine was most of the suite's time. Tests of what the CLI does
with its arguments (refusals by exact text and exit code, dry runs, resumes, sweeps with Hydra's basic
launcher) run it here instead. Tests of signals, of process boundaries (a killed job, a second process,
exports loaded by a process that never imported ``trainer``), of locks between processes, of several
logical devices (set before TensorFlow starts) or of what a fresh process prints at start-up keep a real
subprocess.

What a run changes in the process is put back afterwards: ``sys.argv``, the environment, the working
directory, every logger's handlers, level and switches (Hydra configures logging for each job), Hydra's
global state, the CLI's record of existing directories, TensorFlow's op determinism (which
``trainer.deterministic=true`` turns on) and Keras' dtype policy. Output is caught on file descriptors 1 and 2,
as a pipe would catch it.
"""

import contextlib
import logging
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from typing import IO, Dict, Iterator, Mapping, Optional, Sequence

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

__all__ = ["run_trainer"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def _environment(env: Mapping[str, Optional[str]]) -> Iterator[None]:
    """``os.environ`` with ``env`` applied (``None`` unsets a name), restored afterwards."""
    saved = dict(os.environ)
    try:
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _logging_restored() -> Iterator[None]:
    """Every logger as it was: the handlers Hydra adds for a job are closed and removed afterwards.

    Hydra's ``logging.config.dictConfig`` closes every handler the process ever made
    (``logging._handlerList``) before it adds its own; absl's handler then closes its stream unless it is
    ``sys.stderr``, which here is this run's, not the test's. The handlers made before the run are hidden
    from it, so that they stay open, and put back afterwards.
    """
    manager = logging.Logger.manager

    def all_loggers():
        return [logging.getLogger()] + [lg for lg in manager.loggerDict.values() if isinstance(lg, logging.Logger)]

    saved = [(lg, lg.level, list(lg.handlers), list(lg.filters), lg.propagate, lg.disabled) for lg in all_loggers()]
    before = {id(h) for _, _, handlers, *_ in saved for h in handlers}
    handler_list, named_handlers = list(logging._handlerList), dict(logging._handlers)  # type: ignore[attr-defined]
    disable = manager.disable
    logging._handlerList[:] = []  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for lg in all_loggers():
            for handler in list(lg.handlers):
                if id(handler) not in before:
                    lg.removeHandler(handler)
                    handler.close()
        logging._handlerList[:] = handler_list  # type: ignore[attr-defined]
        logging._handlers.clear()  # type: ignore[attr-defined]
        logging._handlers.update(named_handlers)  # type: ignore[attr-defined]
        for lg, level, handlers, filters, propagate, disabled in saved:
            lg.setLevel(level)
            lg.handlers[:] = handlers
            lg.filters[:] = filters
            lg.propagate, lg.disabled = propagate, disabled
        logging.disable(disable)  # also clears the levels that loggers cached


@contextlib.contextmanager
def _determinism_restored() -> Iterator[None]:
    """TensorFlow's op determinism as it was (a ``trainer.deterministic=true`` run turns it on for the process)."""
    from tensorflow.python.framework import config

    was = config.is_op_determinism_enabled()
    try:
        yield
    finally:
        if not was and config.is_op_determinism_enabled():
            config.disable_op_determinism()


@contextlib.contextmanager
def _keras_policy_restored() -> Iterator[None]:
    """Keras' global dtype policy as it was (``trainer.mixed_precision`` sets it for the process)."""
    import keras

    policy = keras.mixed_precision.global_policy()
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(policy)


@contextlib.contextmanager
def _captured_fds(out: IO[bytes], err: IO[bytes]) -> Iterator[None]:
    """File descriptors 1 and 2 (and ``sys.stdout``, ``sys.stderr`` on them) written to ``out`` and ``err``.

    On the descriptors, not only on Python's streams: what TensorFlow's C++ code writes is caught too, as a
    pipe to a process would catch it.
    """
    streams = (sys.stdout, sys.stderr)
    for stream in streams:
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout = open(1, "w", encoding="utf-8", errors="replace", buffering=1, closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def run_trainer(args: Sequence[str], *, cwd: Optional[str] = None,
                env: Optional[Dict[str, Optional[str]]] = None) -> subprocess.CompletedProcess:
    """Runs ``python -m trainer *args`` here, as its process would (``runpy``, ``__main__``).

    Args:
      args: the command line after ``python -m trainer``.
      cwd: the working directory of the run (default: the repository, as the tests' subprocesses had).
      env: environment variables to set for the run (``None`` unsets one).

    Returns:
      A ``CompletedProcess`` with the exit code (``SystemExit``'s; 1 for an exception that escapes, printed as
      the interpreter prints it; 0 at a normal end) and what was written to file descriptors 1 and 2.
    """
    from trainer import logs

    argv, cwd_before = list(sys.argv), os.getcwd()
    existing = set(logs.EXISTING_DIRS)
    logs.EXISTING_DIRS.clear()  # a fresh process's record of the directories that existed before the run
    GlobalHydra.instance().clear()
    code = 0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        with _environment(env or {}), _logging_restored(), _determinism_restored(), _keras_policy_restored():
            try:
                os.chdir(REPO if cwd is None else cwd)
                sys.argv = ["trainer", *args]
                with _captured_fds(out, err):
                    try:
                        runpy.run_module("trainer", run_name="__main__", alter_sys=True)  # as python -m trainer
                    except SystemExit as exit_:
                        code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
                        if not isinstance(exit_.code, (int, type(None))):
                            sys.stderr.write(f"{exit_.code}\n")
                    except Exception:  # noqa: BLE001 - what the interpreter does with an uncaught exception
                        traceback.print_exc()
                        code = 1
            finally:
                sys.argv = argv
                os.chdir(cwd_before)
                GlobalHydra.instance().clear()
                HydraConfig.instance().cfg = None
                logs.EXISTING_DIRS.clear()
                logs.EXISTING_DIRS.update(existing)
        texts = []
        for stream in (out, err):
            stream.seek(0)
            texts.append(stream.read().decode("utf-8", errors="replace"))
    return subprocess.CompletedProcess(["python", "-m", "trainer", *args], code, *texts)
