"""Checkpoints through ``tf.train.CheckpointManager``: model, optimizer slots, registry, step, RNG.

A checkpoint holds the model, the optimizer with its slots and step
(``optimizer.iterations``), the registry (masks, pinned values and each rule's
captured state), the trainer's counters (batches drawn from the input
pipeline, so a resumed run continues the same data order; skipped steps;
examples seen) and the global RNG states of TensorFlow and Keras.

``CheckpointManager`` writes the data files first and then replaces the
``checkpoint`` index atomically, so the index never names a half-written
checkpoint. A checkpoint whose files were cut or corrupted afterwards is
detected on restore (every tensor is read back) and skipped with a warning.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional

import tensorflow as tf

from trainer.callbacks import Callback, crossed

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


def make_checkpoint(trainer) -> tf.train.Checkpoint:
    """A ``tf.train.Checkpoint`` of a :class:`~trainer.Trainer`'s whole training state."""
    return tf.train.Checkpoint(
        model=trainer.model,
        optimizer=trainer.optimizer,
        registry=trainer.registry,
        skipped_steps=trainer.skipped,
        examples_seen=trainer.examples,
        batches_drawn=trainer.batches,
        **_rng_state(),
    )


def checkpoint_is_readable(path: str) -> Optional[str]:
    """Reads every tensor of a checkpoint; returns ``None`` if all read, else the error text."""
    try:
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except Exception as err:  # noqa: BLE001 - a cut file raises OpError, IndexError, ValueError... alike
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def restore_latest_good(checkpoint: tf.train.Checkpoint, manager: tf.train.CheckpointManager) -> Optional[str]:
    """Restores the newest checkpoint that reads back whole; warns about each bad one it skips.

    Returns:
      The path restored, or ``None`` when the directory has no checkpoint.

    Raises:
      CheckpointError: checkpoints exist but none is readable (names each).
    """
    candidates: List[str] = list(reversed(manager.checkpoints))
    if not candidates:
        return None
    bad = []
    for path in candidates:
        problem = checkpoint_is_readable(path)
        if problem is None:
            if bad:
                log.warning("checkpoint %s is unreadable (%s); falling back to %s",
                            bad[0][0], bad[0][1], path)
            checkpoint.restore(path).assert_existing_objects_matched()
            return path
        bad.append((path, problem))
    raise CheckpointError("no readable checkpoint in " + os.path.dirname(candidates[0]) + ": "
                          + "; ".join(f"{p} ({e})" for p, e in bad))


class Checkpointing(Callback):
    """Saves every ``every_n_steps`` steps and at the end; optionally restores the latest good one first.

    Args:
      directory: the ``checkpoints/`` directory.
      every_n_steps: the save interval in optimizer steps.
      keep: how many checkpoints ``CheckpointManager`` keeps.
      restore: restore in ``on_train_begin`` (a resumed run).
    """

    def __init__(self, directory: str, *, every_n_steps: int = 1000, keep: int = 3, restore: bool = False):
        self.directory = directory
        self.every_n_steps = every_n_steps
        self.keep = keep
        self.restore = restore
        self.manager: Optional[tf.train.CheckpointManager] = None
        self.restored_from: Optional[str] = None

    def _manager(self, trainer) -> tf.train.CheckpointManager:
        if self.manager is None:
            self.manager = tf.train.CheckpointManager(
                make_checkpoint(trainer), self.directory, max_to_keep=self.keep,
                step_counter=trainer.optimizer.iterations,
            )
        return self.manager

    def restore_now(self, trainer) -> Optional[str]:
        """Restores the latest good checkpoint into ``trainer`` (once); returns its path or ``None``.

        Raises:
          CheckpointError: checkpoints exist but none reads back whole.
        """
        self.restore = False
        manager = self._manager(trainer)
        self.restored_from = restore_latest_good(manager.checkpoint, manager)
        if self.restored_from is not None:
            trainer.registry.after_restore()
            log.info("restored %s at step %d", self.restored_from, trainer.step)
        return self.restored_from

    def on_train_begin(self, trainer) -> None:
        if self.restore:
            self.restore_now(trainer)

    def save(self, trainer) -> str:
        path = self._manager(trainer).save(checkpoint_number=trainer.step)
        log.info("checkpoint %s", path)
        return path

    def on_execution_end(self, trainer, step_before: int, step: int, logs: Dict[str, Any]) -> None:
        if crossed(step_before, step, self.every_n_steps):
            self.save(trainer)

    def on_train_end(self, trainer, step: int, logs: Dict[str, Any], status: str) -> None:
        if status == "failed":
            return  # keep the last good checkpoint as the latest
        latest = self._manager(trainer).latest_checkpoint
        if latest is None or not latest.endswith(f"-{step}"):
            self.save(trainer)
