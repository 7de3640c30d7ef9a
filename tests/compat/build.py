"""The run that the checkpoint-compatibility fixture was written from (tests/test_checkpoint_compat.py).

Every part of a run's checkpoint is here: a compact update (fc1/kernel, 10 % trainable), a dense update with a
captured magnitude selection and a `current` pin (fc2/kernel), a SET prune-and-regrow rule on a dense update
(out/kernel), a pinned non-trainable variable (bn/moving_mean), AdamW slots, a skipped non-finite step and the
loop counters. Only public names are used, so the same code builds the run the fixture is restored into.

What the 8 continued steps compute depends, by a few ULPs, on the CPU's float kernels (oneDNN picks them by
instruction set): the code of 4c49d48, continued from the same checkpoint, gives ``expected.npz`` on the machine
that wrote it and ``expected_amd_epyc.npz`` on an AMD EPYC with AVX-512, each run twice identically. One file per
machine kind, each written by that code: to add one, extract 4c49d48 (``git archive 4c49d48``), copy this file
and ``v0_1/`` beside its ``trainer/``, and run :func:`write_expected` there with a new file name.
"""

from __future__ import annotations

import glob
import os

import keras
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

from trainer import MaskRegistry, Trainer

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "v0_1")  # written by the code of commit 83c9018 (= 4c49d48 for everything it runs)
PREFIX = os.path.join(FIXTURE, "ckpt")
EXPECTED = os.path.join(FIXTURE, "expected.npz")
EXPECTED_FILES = sorted(glob.glob(os.path.join(FIXTURE, "expected*.npz")))  # one per machine kind (see above)
BATCH, SAVED_AT, CONTINUE_TO = 64, 12, 20
NAN_BATCH = 3  # the 4th batch holds a NaN: skipped, so the step counter lags the batches drawn by one


def dataset() -> tf.data.Dataset:
    """The digits as float32 batches of 64, in file order, with one NaN pixel in batch NAN_BATCH."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    x[NAN_BATCH * BATCH, 0] = np.nan
    return tf.data.Dataset.from_tensor_slices((x, y.astype("int32"))).batch(BATCH)


def make_trainer() -> Trainer:
    """The model, registry and trainer, built the same way every time (weights from seed 0).

    TensorFlow's deterministic kernels are switched on first (a process-wide switch that cannot be undone, which
    a run with ``trainer.deterministic=true`` in the same test worker also throws): without it, the result of a
    step would depend on whether an earlier test in the process threw that switch.
    """
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(32, name="fc1"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.ReLU(),
        keras.layers.Dense(32, activation="relu", name="fc2"),
        keras.layers.Dense(10, name="out"),
    ], name="net")
    registry = MaskRegistry(model)
    registry.freeze("fc1/kernel", elements={"random": 0.9, "seed": 0}, value="zero", name="sparse")
    registry.freeze("fc2/kernel", elements={"magnitude": 0.3}, value="current", name="small")
    registry.freeze("out/kernel", elements={"random": 0.6, "seed": 1}, value="zero", name="set",
                    regrow={"method": "set", "drop_fraction": 0.3, "update_every_n_steps": 5, "seed": 2})
    registry.freeze("bn/moving_mean", elements={"indices": [0, 3, 7]}, value="current", name="stats",
                    non_trainable="pin")
    optimizer = keras.optimizers.AdamW(1e-2, weight_decay=0.05)
    return Trainer(model, optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   metrics=["accuracy"], registry=registry, steps_per_execution=4, jit_compile=False,
                   nan_policy="skip_step")


def checkpoint(trainer: Trainer) -> tf.train.Checkpoint:
    """What a run's checkpoint holds: ``trainer.state().checkpoint_objects``."""
    return tf.train.Checkpoint(**trainer.state().checkpoint_objects)


def snapshot(trainer: Trainer) -> dict:
    """Bit patterns of every model and optimizer variable, the masks and the counters."""
    state = trainer.state()
    out = {"model/" + v.path: np.asarray(v.numpy()) for v in trainer.model.variables}
    # optimizer variables by path without the optimizer's own name (Keras numbers it: adam_w, adam_w_1, ...)
    out.update({"optimizer/" + v.path.split("/", 1)[-1]: np.asarray(v.numpy()) for v in trainer.optimizer.variables})
    out.update({"mask/" + p: m for p, m in trainer.registry.trainable_masks().items()})
    out["counters"] = np.array([state.step, state.examples, state.skipped_steps,
                                int(state.checkpoint_objects["batches_drawn"].numpy())], np.int64)
    return out


def write_fixture() -> None:
    """Trains SAVED_AT steps and writes the checkpoint, then restores it into a new run, trains to CONTINUE_TO
    and writes what every variable then holds (expected.npz)."""
    os.makedirs(FIXTURE, exist_ok=True)
    trainer = make_trainer()
    trainer.fit(dataset(), epochs=1, max_steps=SAVED_AT, verbose=False)
    checkpoint(trainer).write(PREFIX)
    resumed = make_trainer()
    checkpoint(resumed).read(PREFIX).assert_consumed()
    resumed.registry.after_restore()
    resumed.fit(dataset(), epochs=1, max_steps=CONTINUE_TO, verbose=False)
    np.savez(EXPECTED, **{k.replace("/", "|"): v for k, v in snapshot(resumed).items()})


def write_expected(path: str) -> None:
    """Restores the fixture's checkpoint, continues to CONTINUE_TO and writes what every variable then holds
    to ``path``: the expected file of this machine kind (run with the code of 4c49d48, never today's)."""
    resumed = make_trainer()
    checkpoint(resumed).read(PREFIX).assert_consumed()
    resumed.registry.after_restore()
    resumed.fit(dataset(), epochs=1, max_steps=CONTINUE_TO, verbose=False)
    np.savez(path, **{k.replace("/", "|"): v for k, v in snapshot(resumed).items()})


if __name__ == "__main__":
    write_fixture()
