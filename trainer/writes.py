"""Writing a run's files when the disk may be full: one error line instead of a traceback, and what was not written.

Every file of a run directory is written atomically (:func:`trainer.rundir.atomic_write`),
so a failed write leaves the earlier file, or none, never a cut one. What
this module adds is the message: :func:`writing` turns the ``OSError`` (disk
full, a read-only directory, a quota) or TensorFlow ``OpError`` (a checkpoint
save) of one write into a :class:`WriteError` that names the file, which the
command line prints as one line and exits non-zero with
(:mod:`trainer.logs`; a :class:`~trainer.rundir.RunDirError` is a user error).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import tensorflow as tf

from trainer.rundir import RunDirError

__all__ = ["WriteError", "failure_text", "writing"]


class WriteError(RunDirError):
    """A file of the run could not be written (disk full, no permission, ...); the message names it."""


def failure_text(err: BaseException) -> str:
    """The first line of an ``OSError`` / ``OpError``'s message (``"[Errno 28] No space left on device"``)."""
    if isinstance(err, tf.errors.OpError):
        text = err.message or str(err)
    else:
        text = str(err)
    text = text.strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def writing(what: str) -> Iterator[None]:
    """Turns an ``OSError`` or ``tf.errors.OpError`` raised in the block into a one-line :class:`WriteError`.

    Args:
      what: the file or thing written, as the message names it
        (``"weights.npz in /runs/a"``).

    Raises:
      WriteError: ``"could not write <what>: <first line of the error>"``,
        chained to the original error.
    """
    try:
        yield
    except (OSError, tf.errors.OpError) as err:
        raise WriteError(f"could not write {what}: {failure_text(err)}") from err
