"""trainer.strip: smaller models without the units frozen at zero, equal outputs, refusals by exact text."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import trainer
from trainer import MaskRegistry
from trainer.stripping import StripError

L = keras.layers


def randomize(model, seed=0):
    """Every weight random (BatchNorm variances positive), so biases and statistics are non-zero."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = [rng.standard_normal(w.shape).astype(np.float32) * 0.5 for w in layer.get_weights()]
        if isinstance(layer, L.BatchNormalization):
            weights[-1] = np.abs(weights[-1]) + 0.5
        layer.set_weights(weights)
    return model


def mlp():
    return randomize(keras.Sequential([keras.Input((12,)), L.Dense(16, activation="relu", name="fc1"),
                                       L.Dropout(0.5, name="drop"), L.Dense(10, activation="tanh", name="fc2"),
                                       L.Dense(4, name="out")], name="mlp"))


def cnn():
    return randomize(keras.Sequential([
        keras.Input((9, 9, 3)), L.Conv2D(8, 3, padding="same", name="conv1"), L.BatchNormalization(name="bn1"),
        L.ReLU(name="relu1"), L.MaxPooling2D(name="pool"), L.Conv2D(6, 2, name="conv2"),
        L.BatchNormalization(name="bn2"), L.Activation("sigmoid", name="act2"), L.Flatten(name="flat"),
        L.Dense(5, name="out")], name="cnn"))


def max_diff(a, b, x):
    return float(np.max(np.abs(np.asarray(a(x, training=False)) - np.asarray(b(x, training=False)))))


def widths(model):
    return {l.name: l.kernel.shape[-1] for l in model.layers if hasattr(l, "kernel")}


def test_dense_units_removed_with_constants_folded():
    model = mlp()
    registry = MaskRegistry(model)
    registry.freeze("fc1/kernel", elements={"magnitude": 0.5, "groups": "units"}, value="zero", name="p1")
    registry.freeze("fc2/kernel", elements={"magnitude": 0.3, "groups": "units", "norm": "l2"}, value="zero",
                    name="p2")
    small = trainer.strip(model, registry)
    assert widths(small) == {"fc1": 8, "fc2": 7, "out": 4}
    assert small.count_params() == (12 * 8 + 8) + (8 * 7 + 7) + (7 * 4 + 4)
    x = np.random.default_rng(1).standard_normal((64, 12)).astype(np.float32)
    assert max_diff(model, small, x) <= 1e-5


def test_unused_units_removed_by_frozen_rows():
    model = mlp()
    registry = MaskRegistry(model)
    registry.freeze("fc2/kernel", elements={"inputs": [0, 3, 5]}, value="zero", name="rows")
    registry.freeze("out/kernel", elements={"inputs": [9]}, value="zero", name="rows_out")
    small = trainer.strip(model, registry)
    assert widths(small) == {"fc1": 13, "fc2": 9, "out": 4}
    x = np.random.default_rng(2).standard_normal((32, 12)).astype(np.float32)
    assert max_diff(model, small, x) <= 1e-5


@pytest.mark.parametrize("seed", range(6))
def test_random_unit_and_row_freezes_equal_outputs(seed):
    """Random units and input rows frozen in every layer: removals interact (a unit read only by removed units)."""
    rng = np.random.default_rng(seed)
    model = randomize(keras.Sequential([keras.Input((7,)), L.Dense(9, activation="relu", name="a"),
                                        L.Dense(8, activation="sigmoid", name="b"), L.Dense(6, name="c"),
                                        L.Dense(3, name="out")], name="net"), seed)
    registry = MaskRegistry(model)
    for name, units in (("a", 9), ("b", 8), ("c", 6)):
        registry.freeze(f"{name}/kernel", elements={"units": rng.choice(units, units // 2, replace=False).tolist()},
                        value="zero", name=f"{name}_units")
    for name, inputs in (("b", 9), ("c", 8), ("out", 6)):
        registry.freeze(f"{name}/kernel", elements={"inputs": rng.choice(inputs, 2, replace=False).tolist()},
                        value="zero", name=f"{name}_rows")
    small = trainer.strip(model, registry)
    x = rng.standard_normal((32, 7)).astype(np.float32)
    assert max_diff(model, small, x) <= 1e-5
    assert small.count_params() < model.count_params()


def test_only_frozen_zeros_count_unless_no_registry():
    model = mlp()
    model.get_layer("fc1").kernel.assign(np.where(np.arange(16) < 4, 0.0, model.get_layer("fc1").kernel))
    assert widths(trainer.strip(model, MaskRegistry(model))) == {"fc1": 16, "fc2": 10, "out": 4}  # zeros, not frozen
    assert widths(trainer.strip(model)) == {"fc1": 12, "fc2": 10, "out": 4}


def test_conv_batchnorm_channels():
    model = cnn()
    registry = MaskRegistry(model)
    # conv1 feeds conv2 (padding valid): its 4 pruned channels' constants relu(bn1(b)) are folded into conv2's bias;
    # conv2's pruned channels reach `out` through Flatten: one folded row per position.
    registry.freeze("conv1/kernel", elements={"magnitude": 0.5, "groups": "units"}, value="zero", name="c1")
    registry.freeze("conv2/kernel", elements={"magnitude": 0.5, "groups": "units", "norm": "l2"}, value="zero",
                    name="c2")
    small = trainer.strip(model, registry)
    assert widths(small) == {"conv1": 4, "conv2": 3, "out": 5}
    assert small.get_layer("bn1").moving_mean.shape == (4,) and small.get_layer("bn2").gamma.shape == (3,)
    x = np.random.default_rng(3).standard_normal((16, 9, 9, 3)).astype(np.float32)
    assert max_diff(model, small, x) <= 1e-5
    assert small.count_params() < model.count_params() / 2


def test_batchnorm_after_flatten_per_position():
    model = randomize(keras.Sequential([keras.Input((5, 5, 2)), L.Conv2D(4, 3, name="conv"), L.Flatten(name="flat"),
                                        L.BatchNormalization(name="bn"), L.ReLU(name="relu"), L.Dense(3, name="out")],
                                       name="net"))
    registry = MaskRegistry(model)
    registry.freeze("conv/kernel", elements={"units": [1, 2]}, value="zero")  # constants differ per position after bn
    small = trainer.strip(model, registry)
    assert widths(small) == {"conv": 2, "out": 3} and small.get_layer("bn").moving_mean.shape == (18,)
    x = np.random.default_rng(7).standard_normal((8, 5, 5, 2)).astype(np.float32)
    assert max_diff(model, small, x) <= 1e-5


def test_stripped_model_keras_loads_without_trainer(tmp_path):
    model = cnn()
    registry = MaskRegistry(model)
    registry.freeze("conv1/kernel", elements={"magnitude": 0.5, "groups": "units"}, value="zero")
    small = trainer.strip(model, registry)
    x = np.random.default_rng(4).standard_normal((4, 9, 9, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.asarray(model(x, training=False)))
    small.save(tmp_path / "model.keras")
    code = ("import sys, numpy as np, keras; m = keras.saving.load_model(sys.argv[1] + '/model.keras'); "
            "d = np.abs(np.asarray(m(np.load(sys.argv[1] + '/x.npy'))) - np.load(sys.argv[1] + '/y.npy')).max(); "
            "assert 'trainer' not in sys.modules; print(d)")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) <= 1e-5


def refusal(model, registry=None):
    with pytest.raises(StripError) as err:
        trainer.strip(model, registry)
    return str(err.value)


def test_refuses_unknown_layer_type():
    model = keras.Sequential([keras.Input((4,)), L.Dense(3, name="fc"), L.LayerNormalization(name="ln"),
                              L.Dense(2, name="out")], name="net")
    assert refusal(model) == (
        "trainer.strip: layer 'ln' is of type LayerNormalization, which strip does not know; it knows "
        "['Activation', 'AveragePooling1D', 'AveragePooling2D', 'AveragePooling3D', 'BatchNormalization', "
        "'Conv1D', 'Conv2D', 'Conv3D', 'Dense', 'Dropout', 'ELU', 'Flatten', 'GlobalAveragePooling1D', "
        "'GlobalAveragePooling2D', 'GlobalAveragePooling3D', 'GlobalMaxPooling1D', 'GlobalMaxPooling2D', "
        "'GlobalMaxPooling3D', 'LeakyReLU', 'MaxPooling1D', 'MaxPooling2D', 'MaxPooling3D', 'ReLU', 'Softmax']")


def test_refuses_a_residual_branch():
    x = keras.Input((4,))
    h = L.Dense(4, name="fc")(x)
    model = keras.Model(x, L.Dense(2, name="out")(L.Add(name="add")([x, h])))
    assert refusal(model).startswith("trainer.strip: layer 'add' is of type Add, which strip does not know")
    x = keras.Input((4,))
    shared = L.Dense(4, name="shared")
    model = keras.Model(x, L.Dense(2, name="out")(shared(shared(x))))  # one layer called twice
    assert refusal(model) == ("trainer.strip: layer 'shared' (Dense) does not simply follow the model's input: "
                              "strip removes units along a chain of layers only (a residual or other branch is not "
                              "supported)")


def test_refuses_a_constant_into_same_padding():
    model = randomize(keras.Sequential([keras.Input((6, 6, 2)), L.Conv2D(3, 3, name="c1"),
                                        L.Conv2D(2, 3, padding="same", name="c2"), L.Flatten(), L.Dense(2)]))
    registry = MaskRegistry(model)
    registry.freeze("c1/kernel", elements={"units": [1]}, value="zero")
    bias = float(np.asarray(model.get_layer("c1").bias)[1])
    assert refusal(model, registry) == (
        f"trainer.strip: unit 1 of 'c1' is frozen at zero but outputs the constant {bias:.6g} into 'c2', a "
        "convolution with padding='same': the zero padding makes its contribution depend on the position, so it "
        "cannot be folded into the bias; pin that unit's bias (and BatchNorm offset) to zero too, or use "
        "padding='valid'")
    registry.freeze("c1/bias", elements={"units": [1]}, value="zero", name="bias")  # the way out it names
    small = trainer.strip(model, registry)
    assert widths(small)["c1"] == 2
    x = np.random.default_rng(5).standard_normal((8, 6, 6, 2)).astype(np.float32)
    assert max_diff(model, small, x) <= 1e-5


def test_refuses_removing_every_unit_and_softmax():
    model = mlp()
    registry = MaskRegistry(model)
    registry.freeze("fc2/kernel", value="zero")
    assert refusal(model, registry) == ("trainer.strip: every unit of 'fc1' would be removed (frozen at zero, or "
                                        "read by no kept unit): the model's output no longer depends on its input, "
                                        "so there is no smaller model to build")
    model = randomize(keras.Sequential([keras.Input((4,)), L.Dense(3, activation="softmax", name="fc"),
                                        L.Dense(2, name="out")]))
    registry = MaskRegistry(model)
    registry.freeze("fc/kernel", elements={"units": [0]}, value="zero")
    assert refusal(model, registry) == ("trainer.strip: layer 'fc' has a softmax activation, which mixes its units, "
                                        "so removing some of them would change the others")


def test_export_strip_and_tflite_from_a_run(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONFIGS
    from trainer.config import register
    from trainer.lite_export import TFLiteModel
    from trainer.run import run

    register()
    monkeypatch.chdir(tmp_path)  # outside Hydra, run() writes to the current directory
    rule = "{select:'fc1/kernel',elements:{magnitude:0.5,groups:units},value:zero}"
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["trainer.max_steps=3", f"+freeze.rules.prune={rule}",
                                                       "export.strip=true", "export.tflite=true"])
    report = run(cfg)
    assert report["status"] == "completed"
    assert report["strip"] == {"params": 64 * 150 + 150 + 150 * 100 + 100 + 100 * 10 + 10,
                               "params_before": 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10,
                               "units": {"fc1": [150, 300], "fc2": [100, 100], "out": [10, 10]}}
    full = keras.saving.load_model(tmp_path / "model.keras")
    small = keras.saving.load_model(tmp_path / "stripped.keras")
    x = np.random.default_rng(6).random((8,) + tuple(full.inputs[0].shape[1:])).astype(np.float32)
    assert max_diff(full, small, x) <= 1e-5
    lite = TFLiteModel(str(tmp_path / "model.tflite"), 8)
    assert np.max(np.abs(lite(x) - np.asarray(small(x)))) <= 1e-5


def test_strip_for_export_reports_a_refusal():
    from trainer.stripping import strip_for_export

    model = keras.Sequential([keras.Input((4,)), L.Dense(3, name="fc"), L.LayerNormalization(name="ln"),
                              L.Dense(2, name="out")], name="net")
    small, summary = strip_for_export(model, MaskRegistry(model))
    assert small is None and summary == {"refused": refusal(model)}
    model = mlp()
    registry = MaskRegistry(model)
    registry.freeze("fc2/kernel", elements={"units": [0, 1, 2]}, value="zero")
    small, summary = strip_for_export(model, registry)
    assert summary == {"params": small.count_params(), "params_before": model.count_params(),
                       "units": {"fc1": [16, 16], "fc2": [7, 10], "out": [4, 4]}}
