"""The outer loop's hooks see a LoopState, not the trainer: its fields, request_stop, checkpoint_objects.

Small digits MLP, no XLA (these tests are about the loop, not the step's speed).
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import LoopState, MaskRegistry, Trainer
from trainer.callbacks import Callback
from trainer.data import load_digits

BATCH = 64


@pytest.fixture(scope="module")
def digits():
    splits = load_digits(validation_size=180)
    return splits.x_train.reshape(len(splits.x_train), -1), splits.y_train


def make_trainer(k=4, nan_policy="stop"):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(16, activation="relu", name="fc1"),
                              keras.layers.Dense(10, name="out")], name="net")
    registry = MaskRegistry(model)
    registry.freeze("fc1/kernel", elements={"random": 0.5, "seed": 0}, value="zero")
    return Trainer(model, keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   metrics=["accuracy"], registry=registry, steps_per_execution=k, jit_compile=False,
                   nan_policy=nan_policy)


class Record(Callback):
    def __init__(self, stop_at_execution=None):
        self.calls, self.stop_at_execution = [], stop_at_execution

    def on_train_begin(self, state):
        self.calls.append(("begin", state))

    def on_execution_end(self, state, step_before, step, logs):
        self.calls.append(("execution", state, step_before, step))
        if len([c for c in self.calls if c[0] == "execution"]) == self.stop_at_execution:
            state.request_stop()

    def on_epoch_end(self, state, epoch, step, logs):
        self.calls.append(("epoch", state, epoch, step))

    def on_train_end(self, state, step, logs, status):
        self.calls.append(("end", state, step, status))


def test_hooks_get_a_frozen_loop_state_that_says_where_the_run_stands(digits):
    x, y = digits
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH, drop_remainder=True)
    per_epoch = int(ds.cardinality())  # 25 steps; executions of 4 end at 4, 8, ..., 24, 25
    trainer, record = make_trainer(k=4), Record()
    trainer.fit(ds, epochs=2, callbacks=[record], verbose=False)
    kinds = [c[0] for c in record.calls]
    assert kinds[0] == "begin" and kinds[-1] == "end" and kinds.count("epoch") == 2
    for kind, state, *rest in record.calls:
        assert isinstance(state, LoopState)
        assert state.model is trainer.model and state.registry is trainer.registry
        assert (state.steps_per_epoch, state.total_steps, state.final_epoch) == (per_epoch, 2 * per_epoch, 2)
        assert state.examples == state.step * BATCH
        if kind == "execution":
            step_before, step = rest
            assert state.step == step
            assert state.epoch == step_before // per_epoch  # the epoch the execution ran in
            assert state.epoch_first_step == state.epoch * per_epoch
            assert step - step_before == min(4, (state.epoch + 1) * per_epoch - step_before)
            assert np.isfinite(state.gradient_norm) and state.gradient_norm > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.calls[0][1].step = 3
    assert record.calls[0][1].step == 0 and record.calls[-1][1].step == 2 * per_epoch
    assert record.calls[-1][3] == "completed" and trainer.state().step == 2 * per_epoch


def test_a_state_before_any_fit_and_under_unchecked():
    trainer = make_trainer(nan_policy="unchecked")
    state = trainer.state()
    assert (state.step, state.examples, state.skipped_steps) == (0, 0, 0)
    assert (state.steps_per_epoch, state.total_steps, state.final_epoch) == (None, None, None)
    assert state.gradient_norm is None  # unchecked computes no norm


def test_request_stop_ends_fit_after_that_execution_as_completed(digits):
    x, y = digits
    trainer, record = make_trainer(k=4), Record(stop_at_execution=2)
    history = trainer.fit(x, y, batch_size=BATCH, epochs=5, callbacks=[record], verbose=False)
    assert trainer.step == 8 and history == [] and trainer.status == "completed"
    assert [c[0] for c in record.calls] == ["begin", "execution", "execution", "end"]
    assert record.calls[-1][2:] == (8, "completed")
    trainer.fit(x, y, batch_size=BATCH, epochs=1, verbose=False)  # the next call starts afresh
    assert trainer.step > 8


def test_a_refused_fit_calls_no_hook(digits):
    x, y = digits
    trainer, record = make_trainer(), Record()
    with pytest.raises(ValueError, match=r"^initial_epoch=1 with epochs=3 covers optimizer steps"):
        trainer.fit(x, y, batch_size=BATCH, epochs=3, initial_epoch=1, callbacks=[record], verbose=False)
    assert record.calls == [] and trainer.step == 0


def test_checkpoint_objects_resume_the_run_exactly(digits, tmp_path):
    x, y = digits
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    trainer = make_trainer()
    trainer.fit(ds, epochs=1, max_steps=10, verbose=False)
    path = tf.train.Checkpoint(**trainer.state().checkpoint_objects).save(str(tmp_path / "ckpt"))
    weights = {v.path: v.numpy().view(np.uint32).copy() for v in trainer.model.variables}
    other = make_trainer()
    other.fit(ds, epochs=1, max_steps=3, verbose=False)  # different weights, slots and counters
    tf.train.Checkpoint(**other.state().checkpoint_objects).restore(path).assert_existing_objects_matched()
    other.registry.after_restore()
    state = other.state()
    assert (state.step, state.examples) == (10, 10 * BATCH)
    for v in other.model.variables:
        np.testing.assert_array_equal(v.numpy().view(np.uint32), weights[v.path])
    assert set(state.checkpoint_objects) == {"model", "optimizer", "registry", "skipped_steps", "examples_seen",
                                             "batches_drawn", "train_metrics"}
