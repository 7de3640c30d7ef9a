"""Trainer.fit / evaluate / predict as a Keras user calls them: arrays, validation, repeated calls, early stopping.

The trainers here keep the default 100 steps per execution but compile without XLA: these tests are about
the API, and XLA's compile time was most of theirs (the README examples run the default XLA step).
"""

import io
import re
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from rich.console import Console

from trainer import MaskRegistry, Trainer
from trainer.callbacks import BestWeights, EarlyStopping, LogLines
from trainer.data import load_digits
from trainer.loop import default_display
from trainer.progress import ProgressBar


@pytest.fixture(scope="module")
def digits():
    splits = load_digits(validation_size=180)
    x = splits.x_train.reshape(len(splits.x_train), -1)
    return x, splits.y_train


def make_trainer(lr=1e-2, freeze=True):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(16, activation="relu", name="fc1"),
                              keras.layers.Dense(10, name="out")], name="net")
    registry = MaskRegistry(model)
    if freeze:
        registry.freeze("fc1/kernel", elements={"random": 0.5, "seed": 0}, value="zero")
    return Trainer(model, keras.optimizers.Adam(lr), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   metrics=["accuracy"], registry=registry, jit_compile=False)


def batched(x, y, batch=64):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def test_each_fit_call_trains_epochs_more_epochs(digits):
    # Issue 11, finding 11: after a 50-step warm-up, three fit(ds, epochs=1) calls trained [380, 0, 0] steps.
    x, y = digits
    trainer = make_trainer()
    ds = batched(x, y)
    per_epoch = int(ds.cardinality())
    trainer.fit(ds, epochs=100, max_steps=50)
    assert trainer.step == 50
    steps = []
    for _ in range(3):
        before = trainer.step
        history = trainer.fit(ds, epochs=1)
        steps.append(trainer.step - before)
        assert len(history) == 1
    assert steps == [per_epoch] * 3


def test_a_new_dataset_gets_a_new_iterator(digits):
    x, y = digits
    trainer = make_trainer(lr=5e-2, freeze=False)
    trainer.fit(batched(x, np.zeros_like(y)), epochs=2)  # task A: every label 0
    assert (trainer.predict(x).argmax(-1) == 0).all()
    trainer.fit(batched(x, np.full_like(y, 3)), epochs=2)  # task B: every label 3
    assert (trainer.predict(x).argmax(-1) == 3).all()


def test_numpy_arrays_with_batch_size_and_validation_split(digits):
    x, y = digits
    trainer = make_trainer()
    history = trainer.fit(x, y, batch_size=100, epochs=2, validation_split=0.2, seed=0)
    cut = int(len(x) * 0.8)
    assert trainer.step == 2 * -(-cut // 100)
    assert len(history) == 2 and {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(history[0])
    assert history[-1]["val_loss"] == pytest.approx(trainer.evaluate(x[cut:], y[cut:])["loss"], rel=1e-6)
    assert trainer.registry.exact()


def test_validation_data_as_arrays_and_keras_defaults(digits):
    x, y = digits
    trainer = make_trainer()
    history = trainer.fit(x[:320], y[:320], validation_data=(x[320:400], y[320:400]), epochs=1)
    assert trainer.step == 10  # Keras' default batch size, 32
    assert "val_accuracy" in history[0]


@pytest.mark.parametrize("call, message", [
    (lambda t, x, y: t.fit(batched(x, y), y), "x is a dataset of (x, y) pairs: leave y out"),
    (lambda t, x, y: t.fit(batched(x, y), batch_size=8), "x is a dataset, which is already batched"),
    (lambda t, x, y: t.fit(x, y, validation_split=1.5), "validation_split must be a fraction in (0, 1), got 1.5"),
    (lambda t, x, y: t.fit(x), "x is an array: pass its labels as y"),
    (lambda t, x, y: t.fit((x, y)), "x must be a batched tf.data.Dataset of (x, y) pairs or a NumPy array"),
    (lambda t, x, y: t.fit(x, y[:10]), "x has 1257 examples but y has 10"),
    (lambda t, x, y: t.fit(tf.data.Dataset.from_tensor_slices((x, y))), "yields single examples, not batches"),
])
def test_bad_fit_inputs_are_named(digits, call, message):
    x, y = digits
    trainer = make_trainer()
    with pytest.raises((ValueError, TypeError)) as info:
        call(trainer, x, y)
    assert message in str(info.value)
    assert trainer.step == 0


def test_predict_matches_the_model(digits):
    x, y = digits
    trainer = make_trainer()
    trainer.fit(x, y, epochs=1)
    out = trainer.predict(x[:70], batch_size=32)
    np.testing.assert_allclose(out, trainer.model(x[:70], training=False).numpy(), rtol=1e-5, atol=1e-6)
    from_dataset = trainer.predict(batched(x[:70], y[:70]))
    np.testing.assert_allclose(from_dataset, out, rtol=1e-5, atol=1e-6)


def test_initial_epoch_is_keras_resume_form(digits):
    x, y = digits
    ds = batched(x, y)
    per_epoch = int(ds.cardinality())
    trainer = make_trainer()
    with pytest.raises(ValueError) as info:
        trainer.fit(ds, epochs=3, initial_epoch=1)
    assert str(info.value) == (
        f"initial_epoch=1 with epochs=3 covers optimizer steps [{per_epoch}, {3 * per_epoch}] at {per_epoch} steps "
        "per epoch, but the trainer is at step 0: restore a checkpoint of that epoch first, raise epochs, or leave "
        "initial_epoch out to train `epochs` more epochs from here")
    trainer.fit(ds, epochs=100, max_steps=per_epoch + 5)  # a run cut inside epoch 2 ...
    assert trainer.step == per_epoch + 5
    history = trainer.fit(ds, epochs=3, initial_epoch=1)  # ... continued to the end of epoch 3
    assert trainer.step == 3 * per_epoch and len(history) == 2


def test_early_stopping_with_patience_restores_the_best_weights(digits):
    x, y = digits
    trainer = make_trainer(lr=0.3)  # too high: validation loss soon stops improving
    stopper = EarlyStopping("val_loss", patience=1, restore_best_weights=True)
    history = trainer.fit(x, y, validation_split=0.2, epochs=30, batch_size=64, callbacks=[stopper])
    losses = [h["val_loss"] for h in history]
    assert stopper.stopped_epoch == len(history) < 30
    best = int(np.argmin(losses)) + 1
    assert stopper.best_epoch == best and stopper.best == losses[best - 1]
    assert all(loss >= stopper.best for loss in losses[best:])
    assert len(history) == best + 2  # patience 1: stops after the second epoch without improvement
    cut = int(len(x) * 0.8)
    assert trainer.evaluate(x[cut:], y[cut:])["loss"] == pytest.approx(stopper.best, rel=1e-5)
    assert trainer.registry.exact()


def test_best_weights_follow_validation_accuracy(digits, tmp_path):
    x, y = digits
    trainer = make_trainer(lr=0.3)
    keeper = BestWeights(str(tmp_path / "best.npz"), "val_accuracy")
    history = trainer.fit(x, y, validation_split=0.2, epochs=6, batch_size=64, callbacks=[keeper])
    accuracies = [h["val_accuracy"] for h in history]
    assert keeper.best == max(accuracies) and keeper.best_epoch == accuracies.index(max(accuracies)) + 1
    with np.load(tmp_path / "best.npz") as saved:
        assert sorted(saved.files) == sorted(v.path for v in trainer.model.variables)
    with pytest.raises(ValueError, match="the monitored metric 'val_loss' is not in the epoch's logs"):
        trainer.fit(x, y, epochs=1, callbacks=[EarlyStopping("val_loss")])


def test_fit_shows_a_bar_only_in_a_terminal(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert default_display("auto") is None
    monkeypatch.setattr(sys, "stdout", Tty())
    assert isinstance(default_display("auto"), ProgressBar)
    monkeypatch.setenv("CI", "true")
    assert default_display("auto") is None
    assert isinstance(default_display(True), ProgressBar) and default_display(False) is None
    with pytest.raises(ValueError, match="verbose must be 'auto', True or False, got 2"):
        default_display(2)


def test_fit_from_python_draws_a_bar_on_a_terminal(digits, monkeypatch):
    x, y = digits
    out = io.StringIO()
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr("trainer.progress.Console", lambda: Console(file=out, force_terminal=True, width=80))
    trainer = make_trainer()
    trainer.fit(x, y, epochs=1, batch_size=100, verbose=True)
    assert "epoch 1/1" in out.getvalue() and "13/13" in out.getvalue()
    quiet = io.StringIO()
    trainer.fit(x, y, epochs=1, batch_size=100, verbose=True, callbacks=[LogLines()])  # a display given: no bar
    assert quiet.getvalue() == "" and out.getvalue().count("epoch 2/2") == 0


@pytest.mark.parametrize("width", [80, 100, 160])
def test_progress_bar_fits_the_terminal(digits, width):
    x, y = digits
    out = io.StringIO()
    trainer = make_trainer()
    trainer.fit(x[:600], y[:600], validation_split=0.1, epochs=2, batch_size=50,
                callbacks=[ProgressBar(Console(file=out, force_terminal=True, width=width))])
    text = out.getvalue()
    assert "…" not in text  # nothing cut: "100…  0:00…  -:-…" was the bar at 80 columns
    assert "epoch 2/2" in text and "11/11" in text and "loss" in text
    frames = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "\n", text).replace("\r", "\n").splitlines()
    assert max(map(len, frames)) <= width and any("loss" in f and "accuracy" in f for f in frames)
