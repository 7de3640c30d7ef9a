"""Constant fan-in condensed to a gather + [out, k] product: same outputs as the masked Dense model."""

import keras
import numpy as np
import pytest

from trainer import MaskRegistry
from trainer.condensed import CondensedDense, condense, condense_model
from trainer.lite_export import TFLiteModel, tflite_bytes


def test_condense_layout():
    kernel = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]], np.float32)
    indices, values = condense(kernel, kernel != 0)
    assert indices.tolist() == [[0, 2], [1, 2]] and values.tolist() == [[1.0, 3.0], [2.0, 4.0]]
    with pytest.raises(ValueError) as err:
        condense(kernel, np.array([[1, 0], [0, 0], [1, 1]], bool), name="fc")
    assert str(err.value) == ("condense: the units of 'fc' keep between 1 and 2 inputs; a condensed kernel needs "
                              "the same number for every unit (elements: {fan_in: k})")


def test_condensed_model_equals_masked_model_and_exports_to_tflite():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(16, activation="relu", name="fc1"),
                              keras.layers.Dense(8, activation="tanh", name="fc2"), keras.layers.Dense(3, name="out")],
                             name="net")
    for layer in model.layers:
        layer.bias.assign(np.random.default_rng(1).standard_normal(layer.bias.shape).astype(np.float32))
    registry = MaskRegistry(model)
    registry.freeze("fc1/kernel", elements={"fan_in": 4}, value="zero", name="f1")
    registry.freeze("fc2/kernel", elements={"fan_in": 2}, value="zero", name="f2")
    small = condense_model(model, registry)
    assert [type(l).__name__ for l in small.layers] == ["CondensedDense", "CondensedDense", "Dense"]
    assert small.get_layer("fc1").indices.shape == (16, 4) and small.get_layer("fc2").values.shape == (8, 2)
    x = np.random.default_rng(2).standard_normal((32, 20)).astype(np.float32)
    expected = np.asarray(model(x))
    assert np.max(np.abs(np.asarray(small(x)) - expected)) <= 1e-5
    lite = TFLiteModel(tflite_bytes(small, sparsity=False), 32)
    assert np.max(np.abs(lite(x) - expected)) <= 1e-5
    config = small.get_layer("fc1").get_config()
    assert (config["units"], config["fan_in"], config["activation"]) == (16, 4, "relu")
    assert isinstance(CondensedDense.from_config(config), CondensedDense)
