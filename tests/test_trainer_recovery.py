"""Issue 26, items 2 and 9: a Trainer that stopped on an error trains again, and fit/evaluate/predict check inputs first.

Small models, no XLA: these tests are about what a call leaves behind, not speed.
"""

import keras
import numpy as np
import pytest

from trainer import MaskRegistry, Trainer
from trainer.controller import NonFiniteLossError


def make_trainer(steps_per_execution=4):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="fc")], name="net")
    registry = MaskRegistry(model)
    registry.freeze("fc/kernel", elements={"random": 0.5, "seed": 0}, value="zero")
    return Trainer(model, keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   registry=registry, steps_per_execution=steps_per_execution, jit_compile=False)


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8)).astype("float32"), rng.integers(0, 4, size=n).astype("int64")


def test_a_trainer_that_stopped_on_a_nonfinite_loss_trains_again_on_good_data():
    # Item 2: the flag `nonfinite` was never reset, so every later fit raised after its first execution.
    trainer = make_trainer()
    x, y = data()
    bad = x.copy()
    bad[8:] = 3e38  # finite (fit's input check passes), but the logits overflow: batch 1 is fine, batch 2 is not
    with pytest.raises(NonFiniteLossError, match=r"^non-finite loss or gradient at step 2 \(steps 1-4 were in this "
                                                 r"execution\); the update was not applied"):
        trainer.fit(bad, y, batch_size=8, epochs=1, shuffle=False, verbose=False)
    assert trainer.step == 1
    kernel = trainer.model.get_layer("fc").kernel.numpy().copy()
    history = trainer.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=False)
    assert trainer.step == 1 + 8 and len(history) == 2 and trainer.status == "completed"
    assert not trainer.nonfinite_seen
    assert not np.array_equal(trainer.model.get_layer("fc").kernel.numpy(), kernel)


# ------------------------------------------------------------------ item 9: inputs and callbacks checked before any step
def fit_raises(trainer, kind, message, *args, **kwargs):
    with pytest.raises(kind) as caught:
        trainer.fit(*args, batch_size=8, epochs=1, verbose=False, **kwargs)
    assert str(caught.value) == message
    assert trainer.step == 0  # nothing was applied


X, Y = data()


@pytest.mark.parametrize("x, y, kind, message", [
    (np.where(np.arange(32)[:, None] == 20, np.nan, X).astype("float32"), Y, ValueError,
     "x holds 8 NaN or infinite values; clean or drop those examples first"),
    (X[:, :6], Y, ValueError, "the model expects x of shape (N, 8), got (32, 6)"),
    (X.astype(str), Y, TypeError, "x must hold numbers, got dtype <U32: convert it (e.g. x.astype('float32'))"),
    (X, Y.astype(str), TypeError, "y must hold numbers, got dtype <U21"),
    (X, np.eye(4, dtype="float32")[Y], ValueError,
     "y looks one-hot ((32, 4)) but the loss takes class indices: pass y.argmax(-1), or use "
     "keras.losses.CategoricalCrossentropy"),
    (X, Y + 2, ValueError, "y holds class indices in [2, 5] but the model has 4 classes: labels must be in [0, 4)"),
    (X, Y + 0.5, ValueError, "y must be whole class indices, got non-integer values"),
], ids=["nan", "shape", "string-x", "string-y", "one-hot", "range", "fractional"])
def test_fit_refuses_bad_arrays_before_any_step(x, y, kind, message):
    fit_raises(make_trainer(), kind, message, x, y)


def test_validation_data_is_checked_before_the_first_epoch():
    fit_raises(make_trainer(), ValueError, "the model expects validation_data x of shape (N, 8), got (32, 3)",
               X, Y, validation_data=(X[:, :3], Y))
    fit_raises(make_trainer(), ValueError, "validation_data y holds class indices in [0, 9] but the model has 4 "
                                           "classes: labels must be in [0, 4)", X, Y,
               validation_data=(X, np.arange(32) % 10))


def test_callbacks_are_checked_before_the_first_epoch(tmp_path):
    from trainer.callbacks import BestWeights, StopOnPlateau

    trainer = make_trainer()
    fit_raises(trainer, TypeError, "callbacks[0] is a object, not a keras.callbacks.Callback or a "
                                   "trainer.callbacks.Callback", X, Y, callbacks=[object()])
    fit_raises(trainer, ValueError, "callbacks[0]: StopOnPlateau: the monitored metric 'val_loss' is not in the "
                                    "epoch's logs ['loss']; fit has no validation data: pass validation_data or "
                                    "validation_split", X, Y, callbacks=[StopOnPlateau("val_loss")])
    fit_raises(trainer, ValueError, "callbacks[0]: StopOnPlateau: the monitored metric 'bogus' is not in the "
                                    "epoch's logs ['loss', 'val_loss']; monitor one of those", X, Y,
               validation_split=0.25, callbacks=[StopOnPlateau("bogus")])
    missing = tmp_path / "no" / "best.npz"
    fit_raises(trainer, ValueError, f"callbacks[0]: BestWeights cannot write '{missing}': its directory "
                                    f"'{missing.parent}' does not exist or is not writable", X, Y,
               callbacks=[BestWeights(str(missing), "loss")])


def test_evaluate_and_predict_refuse_wrong_inputs_in_one_line():
    trainer = make_trainer()
    with pytest.raises(ValueError) as caught:
        trainer.evaluate(X[:, :5], Y)
    assert str(caught.value) == "the model expects x of shape (N, 8), got (32, 5)"
    with pytest.raises(ValueError) as caught:
        trainer.predict(X[:, :5])
    assert str(caught.value) == "the model expects x of shape (N, 8), got (32, 5)"
    with pytest.raises(TypeError) as caught:
        trainer.predict(X.astype(object))
    assert str(caught.value) == "x must hold numbers, got dtype object: convert it (e.g. x.astype('float32'))"
