"""Every registry method that takes a variable path accepts the forms freeze does: a unique trailing sub-path."""

import keras
import numpy as np
import pytest

from trainer import MaskRegistry
from trainer.masks.paths import resolve_path


class Net(keras.Model):
    def __init__(self):
        super().__init__(name="net")
        self.fc1 = keras.layers.Dense(4, name="fc1")
        self.out = keras.layers.Dense(2, name="out")

    def call(self, x):
        return self.out(self.fc1(x))


def named_model():
    model = Net()
    model(np.zeros((1, 3), "float32"))
    return model


def test_trainable_mask_takes_the_sub_path_freeze_takes():
    registry = MaskRegistry(named_model())
    registry.freeze("fc1/kernel", {"indices": [[0, 0]]})
    assert registry.covered_paths() == ["net/fc1/kernel"]
    short, full = registry.trainable_mask("fc1/kernel"), registry.trainable_mask("net/fc1/kernel")
    np.testing.assert_array_equal(short, full)
    assert not short[0, 0] and short.sum() == 11
    assert registry.trainable_mask("out/bias").all()


def test_ambiguous_and_unknown_paths_name_the_candidates():
    registry = MaskRegistry(named_model())
    with pytest.raises(KeyError) as info:
        registry.trainable_mask("kernel")
    assert info.value.args[0] == ("'kernel' is ambiguous: it ends 2 variable paths: net/fc1/kernel, net/out/kernel; "
                                  "pass a longer sub-path")
    with pytest.raises(KeyError) as info:
        registry.trainable_mask("fc2/kernel")
    assert info.value.args[0] == ("no variable 'fc2/kernel'; the variable paths are: net/fc1/kernel, net/fc1/bias, "
                                  "net/out/kernel, net/out/bias")


def test_sub_paths_match_whole_path_components_only():
    assert resolve_path("c1/kernel", ["net/fc1/kernel", "net/c1/kernel"]) == "net/c1/kernel"
