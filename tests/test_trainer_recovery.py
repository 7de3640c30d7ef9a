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
    bad[8:] = np.inf  # batches 1 and 2 (of 8 examples) are fine, batch 3 is not
    with pytest.raises(NonFiniteLossError, match=r"^non-finite loss or gradient at step 2 \(steps 1-4 were in this "
                                                 r"execution\); the update was not applied"):
        trainer.fit(bad, y, batch_size=8, epochs=1, shuffle=False, verbose=False)
    assert trainer.step == 1
    kernel = trainer.model.get_layer("fc").kernel.numpy().copy()
    history = trainer.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=False)
    assert trainer.step == 1 + 8 and len(history) == 2 and trainer.status == "completed"
    assert not trainer.nonfinite_seen
    assert not np.array_equal(trainer.model.get_layer("fc").kernel.numpy(), kernel)
