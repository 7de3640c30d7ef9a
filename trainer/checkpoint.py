"""Checkpoints through ``tf.train.CheckpointManager``: model, optimizer slots, registry, step, RNG.

A checkpoint holds the model, the optimizer with its slots and step
(``optimizer.iterations``), the registry (masks, pinned values and each rule's
captured state), the trainer's counters (batches drawn from the input
pipeline, so a resumed run continues the same data order; skipped steps;
examples seen; the training metrics' running state) and the global RNG states
of TensorFlow and Keras.

``CheckpointManager`` writes the data files first and then replaces the
``checkpoint`` index atomically. On restore the index is not trusted: the
candidates are the ``ckpt-<step>.index`` files, newest first; a checkpoint
whose files were cut or corrupted is detected (every tensor is read back) and
skipped with a warning, and the index is rebuilt from the files up to the one
restored. With a ``record``, each checkpoint also stores the run's
fingerprint, epoch history and segments as JSON (``run_record``).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import tensorflow as tf

from trainer.callbacks import Callback, crossed
from trainer.rundir import checkpoint_steps, write_text
from trainer.writes import writing

__all__ = ["CheckpointError", "Checkpointing", "checkpoint_is_readable", "latest_good", "make_checkpoint",
           "write_index"]

log = logging.getLogger("trainer")


class CheckpointError(RuntimeError):
    """No usable checkpoint could be restored."""


def _rng_state() -> Dict[str, Any]:
    state: Dict[str, Any] = {"tf_global_generator": tf.random.get_global_generator()}
    try:  # Keras 3's global SeedGenerator (dropout and other random layers draw from it)
        from keras.src.random.seed_generator import global_seed_generator

        state["keras_seed_state"] = global_seed_generator().state.value
    except (ImportError, AttributeError):
        pass
    return state


RECORD_KEY = "run_record/.ATTRIBUTES/VARIABLE_VALUE"


def make_checkpoint(state, record: Optional[tf.Variable] = None) -> tf.train.Checkpoint:
    """A ``tf.train.Checkpoint`` of a run's whole training state.

    Args:
      state: a :class:`~trainer.controller.LoopState` (``trainer.state()``):
        its ``checkpoint_objects`` (model, optimizer, registry, counters, the
        running epoch's metrics) are saved, with the Keras random generators.
      record: an optional scalar ``tf.string`` variable saved as ``run_record``
        (the run's fingerprint, history and segments as JSON).
    """
    extra = {"run_record": record} if record is not None else {}
    return tf.train.Checkpoint(**state.checkpoint_objects, **extra, **_rng_state())


def checkpoint_is_readable(path: str) -> Optional[str]:
    """Reads every tensor of a checkpoint; returns ``None`` if all read, else the error text."""
    try:
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except Exception as err:  # noqa: BLE001 - a cut file raises OpError, IndexError, ValueError... alike
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def latest_good(run_dir: str) -> Tuple[Optional[str], Optional[Dict[str, Any]], List[Tuple[str, str]]]:
    """The newest checkpoint of ``run_dir`` that reads back whole, found from its ``ckpt-*.index`` files.

    The ``checkpoints/checkpoint`` index is not trusted (it may be missing, cut,
    empty or name paths elsewhere): candidates are the regular files
    ``checkpoints/ckpt-<step>.index``, newest step first.

    Returns:
      ``(path, record, bad)``: the checkpoint prefix (``None`` when there is
      none), its ``run_record`` as a dict (``None`` when it has none), and
      ``(path, problem)`` for each newer checkpoint that did not read back.
    """
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    bad = []
    for step in reversed(checkpoint_steps(run_dir)):
        path = os.path.join(ckpt_dir, f"ckpt-{step}")
        problem = checkpoint_is_readable(path)
        if problem is not None:
            bad.append((path, problem))
            continue
        reader = tf.train.load_checkpoint(path)
        record = None
        if reader.has_tensor(RECORD_KEY):
            try:
                record = json.loads(reader.get_tensor(RECORD_KEY).decode("utf-8"))
            except ValueError:
                record = None
        return path, record, bad
    return None, None, bad


def _index_names(ckpt_dir: str) -> Optional[Tuple[str, List[str]]]:
    """``(latest, all)`` checkpoint names of the index, when it parses and names only files in ``ckpt_dir``."""
    try:
        state = tf.train.get_checkpoint_state(ckpt_dir)
    except Exception:  # noqa: BLE001 - a cut or crafted index raises a parse error of several kinds
        return None
    if state is None:
        return None
    paths = [state.model_checkpoint_path, *state.all_model_checkpoint_paths]
    if any(os.path.dirname(os.path.abspath(os.path.join(ckpt_dir, p))) != os.path.abspath(ckpt_dir) for p in paths):
        return None
    return os.path.basename(paths[0]), [os.path.basename(p) for p in paths[1:]]


def write_index(ckpt_dir: str, latest_step: int) -> None:
    """Rewrites ``checkpoints/checkpoint`` (atomically) to name ``ckpt-<latest_step>`` and the older ones.

    Paths are relative to ``ckpt_dir``, so nothing outside it is ever named
    (``CheckpointManager`` deletes what the index lists beyond ``max_to_keep``).
    An index that already names exactly these is left as it is (a resume,
    even a refused one, changes no byte of a sound index).
    """
    run_dir = os.path.dirname(ckpt_dir)
    steps = [s for s in checkpoint_steps(run_dir) if s <= latest_step]
    if _index_names(ckpt_dir) == (f"ckpt-{latest_step}", [f"ckpt-{s}" for s in steps]):
        return  # already right: left as written, timestamps and bytes included
    lines = [f'model_checkpoint_path: "ckpt-{latest_step}"']
    lines += [f'all_model_checkpoint_paths: "ckpt-{s}"' for s in steps]
    write_text(os.path.join(ckpt_dir, "checkpoint"), "\n".join(lines) + "\n")


class Checkpointing(Callback):
    """Saves every ``every_n_steps`` steps and at the end; restores the latest good checkpoint on request.

    A save due at an epoch's last step waits for ``on_epoch_end``, so the
    checkpoint's record includes that epoch (a resumed run never trains it
    again, so its history row would be lost otherwise).

    Args:
      directory: the ``checkpoints/`` directory.
      every_n_steps: the save interval in optimizer steps.
      keep: how many checkpoints ``CheckpointManager`` keeps.
      record: called at each save with ``(state, status)`` (a
        :class:`~trainer.controller.LoopState`); returns a JSON-able
        dict stored in the checkpoint as ``run_record`` (``status`` is
        ``"running"`` except in the save at the end of training).
    """

    def __init__(self, directory: str, *, every_n_steps: int = 1000, keep: int = 3,
                 record: Optional[Callable[[Any, str], Dict[str, Any]]] = None):
        self.directory = directory
        self.every_n_steps = every_n_steps
        self.keep = keep
        self.record = record
        self.manager: Optional[tf.train.CheckpointManager] = None
        self.restored_from: Optional[str] = None
        self.restored_record: Optional[Dict[str, Any]] = None
        self._record_var: Optional[tf.Variable] = None
        self._pending = False
        self._saved: Optional[Tuple[int, str]] = None

    def _manager(self, state) -> tf.train.CheckpointManager:
        if self.manager is None:
            if self.record is not None:
                with tf.init_scope():
                    self._record_var = tf.Variable("", dtype=tf.string, trainable=False, name="run_record")
            self.manager = tf.train.CheckpointManager(
                make_checkpoint(state, self._record_var), self.directory, max_to_keep=self.keep,
                step_counter=state.optimizer.iterations,
            )
        return self.manager

    def restore_now(self, state) -> Optional[str]:
        """Restores the latest good checkpoint into ``state``'s objects (once); returns its path or ``None``.

        ``state`` is ``trainer.state()`` (a :class:`~trainer.controller.LoopState`);
        its ``step`` is from before the restore.

        The ``checkpoint`` index is rebuilt from the ``ckpt-*.index`` files up
        to the restored one first, so a cut, empty or crafted index neither
        hides intact checkpoints nor names files outside ``checkpoints/``.

        Raises:
          CheckpointError: checkpoints exist but none reads back whole.
        """
        path, record, bad = latest_good(os.path.dirname(self.directory))
        if path is None:
            if bad:
                raise CheckpointError("no readable checkpoint in " + self.directory + ": "
                                      + "; ".join(f"{p} ({e})" for p, e in bad))
            return None
        if bad:
            log.warning("checkpoint %s is unreadable (%s); falling back to %s", bad[0][0], bad[0][1], path)
        write_index(self.directory, int(path.rsplit("-", 1)[1]))
        manager = self._manager(state)
        manager.checkpoint.restore(path).assert_existing_objects_matched()
        self.restored_from, self.restored_record = path, record
        state.registry.after_restore()
        step = int(state.optimizer.iterations.numpy())
        self._saved = (step, "restored")
        log.info("restored %s at step %d", self.restored_from, step)
        return self.restored_from

    def save(self, state, status: str = "running") -> str:
        """Writes a checkpoint at the current step (with the record, if any); returns its path.

        Raises:
          WriteError: the checkpoint could not be written (disk full, ...), in
            one line (:mod:`trainer.writes`); the earlier checkpoints stay.
        """
        manager = self._manager(state)
        if self._record_var is not None:
            self._record_var.assign(json.dumps(self.record(state, status)))
        with writing(f"the checkpoint of step {state.step} in {self.directory}"):
            path = manager.save(checkpoint_number=state.step)
        self._saved, self._pending = (state.step, status), False
        log.info("checkpoint %s", path)
        return path

    def on_execution_end(self, state, step_before: int, step: int, logs: Dict[str, Any]) -> None:
        if crossed(step_before, step, self.every_n_steps):
            if step % state.steps_per_epoch == 0:
                self._pending = True  # on_epoch_end follows at once: save there, with the epoch's row
            else:
                self.save(state)

    def on_epoch_end(self, state, epoch: int, step: int, logs: Dict[str, Any]) -> None:
        if self._pending:
            self.save(state)

    def on_train_end(self, state, step: int, logs: Dict[str, Any], status: str) -> None:
        if status == "failed":
            return  # keep the last good checkpoint as the latest
        if self._saved != (step, status):  # the last save is earlier, or recorded another status
            self.save(state, status)
