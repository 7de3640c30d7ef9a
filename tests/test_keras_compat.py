"""Trainer takes what Keras compile/fit take: string identifiers, Keras callbacks; fit returns a History."""

import csv

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import MaskRegistry, Trainer
from trainer.history import History


def small_model(name="net"):
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(16, activation="relu", name="fc1")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(hidden), name=name)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0).astype("int32")
    return x, y


def trainer_of(model, registry=None, optimizer="adam"):
    return Trainer(model, optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   metrics=["accuracy"], registry=registry, steps_per_execution=2, jit_compile=False)


def test_string_identifiers_as_in_compile(data):
    x, y = data
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3, activation="softmax")])
    trainer = Trainer(model, "adam", "sparse_categorical_crossentropy", metrics=["sparse_categorical_accuracy"],
                      jit_compile=False, steps_per_execution=2)
    assert isinstance(trainer.optimizer, keras.optimizers.Adam)
    history = trainer.fit(x, y, batch_size=32, epochs=2, verbose=False)
    assert sorted(history.history) == ["loss", "sparse_categorical_accuracy"]
    assert len(history.history["loss"]) == 2


def test_fit_returns_a_history_that_stays_a_list(data):
    x, y = data
    trainer = trainer_of(small_model())
    history = trainer.fit(x, y, batch_size=32, epochs=3, validation_split=0.25, verbose=False)
    assert isinstance(history, History) and isinstance(history, list) and len(history) == 3
    assert history.history["val_loss"] == [logs["val_loss"] for logs in history]
    assert sorted(history.history) == ["accuracy", "loss", "val_accuracy", "val_loss"]
    assert history.epoch == [0, 1, 2] and history.params == {"epochs": 3, "steps": 3}
    assert trainer.fit(x, y, batch_size=32, epochs=1, verbose=False).epoch == [3]


def test_keras_early_stopping_model_checkpoint_csv_logger(tmp_path, data):
    x, y = data
    model = small_model()
    registry = MaskRegistry(model)
    registry.freeze("fc1/kernel", {"mask": np.arange(8 * 16).reshape(8, 16) % 2 == 0})
    frozen = model.get_layer("fc1").kernel.numpy()
    events = []
    callbacks = [
        keras.callbacks.EarlyStopping("val_loss", patience=0, min_delta=10.0, restore_best_weights=True),
        keras.callbacks.ModelCheckpoint(str(tmp_path / "best.keras"), monitor="val_loss", save_best_only=True),
        keras.callbacks.CSVLogger(str(tmp_path / "log.csv")),
        keras.callbacks.ReduceLROnPlateau("val_loss", factor=0.5, patience=0, min_delta=10.0),
        keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: events.append(("begin", epoch)),
                                       on_epoch_end=lambda epoch, logs: events.append(("end", epoch)),
                                       on_train_end=lambda logs: events.append("train_end")),
    ]
    trainer = trainer_of(model, registry)
    history = trainer.fit(x, y, batch_size=32, epochs=10, validation_split=0.25, callbacks=callbacks, verbose=False)
    assert len(history) == 2  # min_delta=10: epoch 2 does not improve on epoch 1, patience 0
    assert trainer.status == "completed"
    assert events == [("begin", 0), ("end", 0), ("begin", 1), ("end", 1), "train_end"]
    assert float(trainer.optimizer.learning_rate.numpy()) == pytest.approx(0.0005)
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [row["epoch"] for row in rows] == ["0", "1"]
    assert keras.saving.load_model(tmp_path / "best.keras").count_params() == model.count_params()
    kernel = model.get_layer("fc1").kernel.numpy()
    mask = ~np.asarray(registry.trainable_mask("fc1/kernel"))  # the frozen elements
    assert mask.sum() == 64
    np.testing.assert_array_equal(kernel.view(np.uint32)[mask], frozen.view(np.uint32)[mask])


def test_keras_tensorboard_writes_epoch_scalars(tmp_path, data):
    x, y = data
    trainer = trainer_of(small_model())
    trainer.fit(x, y, batch_size=32, epochs=2, validation_split=0.25, verbose=False,
                callbacks=[keras.callbacks.TensorBoard(str(tmp_path / "tb"))])
    tags = set()
    for path in (tmp_path / "tb" / "train").glob("events.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update(value.tag for value in event.summary.value)
    assert {"epoch_loss", "epoch_accuracy"} <= tags


def test_other_objects_are_refused_by_name(data):
    x, y = data
    with pytest.raises(TypeError, match=r"^callbacks\[0\] is a int, not a keras.callbacks.Callback or a "
                                        r"trainer.callbacks.Callback$"):
        trainer_of(small_model()).fit(x, y, epochs=1, callbacks=[3], verbose=False)
