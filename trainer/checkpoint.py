"""Checkpoints through ``tf.train.CheckpointManager``: model, optimizer slots, registry, step.

The registry's masks and pinned values are ``tf.Variable`` s tracked by the
checkpoint, so a restore brings back exactly what was frozen and to what.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional

import tensorflow as tf

from trainer.callbacks import Callback, crossed

log = logging.getLogger("trainer")


def make_checkpoint(trainer) -> tf.train.Checkpoint:
    """A ``tf.train.Checkpoint`` of the trainer's model, optimizer, registry and counters."""
    return tf.train.Checkpoint(
        model=trainer.model,
        optimizer=trainer.optimizer,
        registry=trainer.registry,
        skipped_steps=trainer.skipped,
        examples_seen=trainer.examples,
    )


class Checkpointing(Callback):
    """Saves every ``every_n_steps`` steps and at the end; optionally restores the latest first.

    Args:
      directory: the ``checkpoints/`` directory.
      every_n_steps: the save interval in optimizer steps.
      keep: how many checkpoints ``CheckpointManager`` keeps.
      restore: restore the latest checkpoint in ``on_train_begin``.
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
                make_checkpoint(trainer), self.directory, max_to_keep=self.keep, step_counter=trainer.optimizer.iterations
            )
        return self.manager

    def on_train_begin(self, trainer) -> None:
        manager = self._manager(trainer)
        if self.restore and manager.latest_checkpoint:
            manager.checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
            self.restored_from = manager.latest_checkpoint
            log.info("restored %s at step %d", manager.latest_checkpoint, trainer.step)

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
        manager = self._manager(trainer)
        latest = manager.latest_checkpoint
        if latest is None or not latest.endswith(f"-{step}"):
            self.save(trainer)
