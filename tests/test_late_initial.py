"""Issue 26, item 10: ``value: initial`` means the value before training; a rule added after training is refused."""

import keras
import numpy as np
import pytest

from trainer import MaskRegistry, Trainer
from trainer.masks import FreezeConfigError


def trainer():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")], name="net")
    registry = MaskRegistry(model)
    return Trainer(model, keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   registry=registry, jit_compile=False)


def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(16, 4)).astype("float32"), rng.integers(0, 3, 16)


def test_initial_before_training_pins_the_value_at_creation():
    t = trainer()
    before = t.model.get_layer("fc").kernel.numpy().copy()
    t.registry.freeze("fc/kernel", value="initial", name="keep")
    t.fit(*data(), batch_size=8, epochs=2, verbose=False)
    np.testing.assert_array_equal(t.model.get_layer("fc").kernel.numpy(), before)


def test_initial_added_after_training_is_refused_in_one_line():
    t = trainer()
    t.fit(*data(), batch_size=8, epochs=1, verbose=False)
    with pytest.raises(FreezeConfigError) as caught:
        t.registry.freeze("fc/kernel", value="initial", name="late")
    assert str(caught.value) == (
        "value 'initial' pins 'net/fc/kernel' to its value before training, but the optimizer has applied 2 "
        "update(s) since: add the rule before training, pass MaskRegistry(initial_values={path: array}), or use "
        "value 'current' (the value now)")
    assert [r.name for r in t.registry.rules] == []
    t.registry.freeze("fc/kernel", value="current", name="now")  # the documented alternative works
