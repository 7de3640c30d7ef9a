"""Divergence, exports and hostile input: nothing is silently wrong."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import REPO
from tests.inprocess import run_trainer
from trainer import MaskRegistry, Trainer
from trainer.data import DataError, check_arrays, load_mnist
from trainer.controller import NonFiniteLossError


def env(**extra):
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **extra)


def small_model():
    keras.utils.set_random_seed(7)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, activation="relu", name="fc1"),
                             keras.layers.Dense(3, name="out")], name="small")


def batches(rng, n):
    return [(rng.normal(size=(8, 4)).astype(np.float32), rng.integers(0, 3, size=8).astype(np.int32)) for _ in range(n)]


def dataset(items):
    xs = np.concatenate([x for x, _ in items])
    ys = np.concatenate([y for _, y in items])
    return tf.data.Dataset.from_tensor_slices((xs, ys)).batch(8)


def trainer_for(policy, guard="auto", update="auto"):
    model = small_model()
    registry = MaskRegistry(model, update=update)
    registry.freeze("*/kernel", elements={"random": 0.5, "seed": 1}, value="current")
    trainer = Trainer(model, keras.optimizers.AdamW(0.01, weight_decay=0.1),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True), registry=registry,
                      nan_policy=policy, guard=guard)
    return trainer


# Both guards on both kinds of update: the select undoes compact [k] variables, biases, slots and the step
# counter and restores dense updates in their release; the cond never runs the update.
GUARD_CASES = [("select", "compact"), ("select", "dense"), ("cond", "compact"), ("cond", "dense")]


def state(trainer):
    return [v.numpy().copy() for v in trainer.model.variables] + [v.numpy().copy() for v in trainer.optimizer.variables]


@pytest.mark.parametrize("guard,update", GUARD_CASES)
def test_skip_step_drops_the_nonfinite_update_entirely(guard, update):
    rng = np.random.default_rng(0)
    c0, c1, c2, c3 = batches(rng, 4)
    bad = (np.full((8, 4), np.nan, np.float32), c0[1])
    reference = trainer_for("stop", guard, update)
    reference.fit(dataset([c0, c1, c2, c3, c0]), epochs=1)
    skipping = trainer_for("skip_step", guard, update)
    assert skipping.guard_in_use == guard and set(skipping.registry.update_modes().values()) == {update}
    skipping.fit(dataset([c0, c1, bad, c2, c3]), epochs=1)
    assert skipping.step == 5 and skipping.skipped_steps == 1
    for a, b in zip(state(reference), state(skipping)):
        np.testing.assert_array_equal(a, b)  # weights, slots and step as if the bad batch never came
    assert skipping.registry.exact()


@pytest.mark.parametrize("guard,update", GUARD_CASES)
def test_stop_raises_naming_the_step_and_keeps_the_last_good_state(guard, update):
    rng = np.random.default_rng(0)
    c0, c1, c2 = batches(rng, 3)
    bad = (c2[0] * np.float32(np.inf), c2[1])
    reference = trainer_for("stop", guard, update)
    reference.fit(dataset([c0, c1]), epochs=1)
    stopping = trainer_for("stop", guard, update)
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        stopping.fit(dataset([c0, c1, bad, c2]), epochs=1)
    assert stopping.step == 2
    for a, b in zip(state(reference), state(stopping)):
        np.testing.assert_array_equal(a, b)
    assert stopping.registry.exact()


def test_unchecked_applies_every_update_and_still_keeps_frozen_elements():
    """The ablation policy: no guard in the step, so a NaN batch is applied, yet the registry keeps every frozen bit."""
    rng = np.random.default_rng(0)
    c0, c1 = batches(rng, 2)
    bad = (np.full((8, 4), np.nan, np.float32), c0[1])
    trainer = trainer_for("unchecked")
    frozen_before = frozen_bits(trainer)
    trainer.fit(dataset([c0, c1, bad]), epochs=1)
    assert trainer.step == 3 and trainer.skipped_steps == 0
    kernel = trainer.model.get_layer("fc1").kernel.numpy()
    trainable = trainer.registry.trainable_mask(trainer.model.get_layer("fc1").kernel.path)
    assert np.isnan(kernel[trainable]).all()  # the NaN update was applied to every trainable element
    assert frozen_bits(trainer) == frozen_before and trainer.registry.exact()
    assert float(trainer.counters.grad_norm.numpy()) == 0.0  # no gradient norm is computed in the step


def test_guard_auto_follows_the_plan_and_a_bad_guard_is_refused():
    assert trainer_for("stop", "auto", "compact").guard_in_use == "select"
    assert trainer_for("stop", "auto", "dense").guard_in_use == "cond"
    assert trainer_for("skip_step", "cond", "compact").guard_in_use == "cond"
    assert trainer_for("unchecked", "select", "compact").guard_in_use is None
    with pytest.raises(ValueError) as error:
        trainer_for("stop", "where")
    assert str(error.value) == "guard must be one of ['auto', 'select', 'cond'], got 'where'"


def bn_dropout_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, name="fc1"),
                             keras.layers.BatchNormalization(name="bn"), keras.layers.Dropout(0.3, seed=1, name="drop"),
                             keras.layers.Dense(3, name="out")], name="bnm")


@pytest.mark.parametrize("guard", ["select", "cond"])
def test_a_skipped_step_undoes_what_the_forward_pass_wrote(guard):
    """BatchNorm's moving statistics and dropout's seed state are set back too: no NaN reaches them."""
    rng = np.random.default_rng(0)
    good = batches(rng, 3)
    bad = (np.full((8, 4), np.nan, np.float32), good[0][1])

    def run(items, policy):
        model = bn_dropout_model()
        trainer = Trainer(model, keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          nan_policy=policy, guard=guard, steps_per_execution=2)
        trainer.fit(dataset(items), epochs=1)
        return trainer, all_bits(model, trainer.optimizer)

    _, expected = run(good + good[:1], "stop")  # an epoch is 4 steps: the skipping run draws the first batch again
    skipping, got = run(good[:2] + [bad] + good[2:], "skip_step")
    assert skipping.skipped_steps == 1 and skipping.step == 4 and skipping.guard_in_use == guard
    assert got == expected
    assert np.isfinite(skipping.model.get_layer("bn").moving_mean.numpy()).all()


def all_bits(model, optimizer):
    return [v.numpy().tobytes() for v in model.variables] + [v.numpy().tobytes() for v in optimizer.variables]


@pytest.mark.parametrize("update", ["compact", "dense"])
def test_apply_gradients_apply_if_false_writes_nothing(update):
    """registry.apply_gradients(apply_if=False) leaves every weight, slot and the step bit-exact; True applies."""
    model = small_model()
    registry = MaskRegistry(model, update=update)
    registry.freeze("fc1/kernel", elements={"random": 0.5, "seed": 1}, value="zero")
    optimizer = keras.optimizers.AdamW(0.01, weight_decay=0.1)
    registry.attach_optimizer(optimizer)
    variables = registry.trainable_variables()
    x, y = np.ones((8, 4), np.float32), np.zeros(8, np.int32)

    @tf.function(jit_compile=True)
    def step(apply_if):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True))
        grads = registry.update_gradients(tape.gradient(loss, variables), variables)
        registry.apply_gradients(optimizer, grads, variables, apply_if=apply_if)

    step(tf.constant(True))
    before = all_bits(model, optimizer)
    step(tf.constant(False))
    assert all_bits(model, optimizer) == before
    step(tf.constant(True))
    assert int(optimizer.iterations.numpy()) == 2 and all_bits(model, optimizer) != before
    assert registry.exact()


def test_apply_gradients_apply_if_needs_a_built_optimizer():
    model = small_model()
    registry = MaskRegistry(model)
    variables = registry.trainable_variables()
    with pytest.raises(ValueError) as error:
        registry.apply_gradients(keras.optimizers.SGD(0.1), [tf.zeros_like(v) for v in variables], variables,
                                 apply_if=tf.constant(True))
    assert str(error.value) == ("apply_gradients(apply_if=...) needs a built optimizer: call "
                                "registry.attach_optimizer(optimizer) first")


def frozen_bits(trainer):
    out = {}
    for layer in ("fc1", "out"):
        kernel = trainer.model.get_layer(layer).kernel
        frozen = ~trainer.registry.trainable_mask(kernel.path)
        out[layer] = kernel.numpy()[frozen].view(np.uint32).tobytes()
    return out


def test_input_shape_mismatch_is_refused_before_training():
    trainer = trainer_for("stop")
    wrong = tf.data.Dataset.from_tensor_slices((np.zeros((8, 5), np.float32), np.zeros(8, np.int32))).batch(4)
    with pytest.raises(ValueError, match=r"expects inputs of shape \(batch, 4\)"):
        trainer.fit(wrong, epochs=1)
    assert trainer.step == 0


@pytest.mark.parametrize("x, y, message", [
    (np.zeros((5, 2, 2), np.float32), np.zeros(4, np.int64), "5 inputs but 4 labels"),
    (np.zeros((4, 2, 2), np.float32), np.array([0, 1, 10, -1]), r"labels must lie in \[0, 9\]; found \[-1, 10\]"),
    (np.full((4, 2, 2), np.nan, np.float32), np.zeros(4, np.int64), "16 NaN or infinite"),
    (np.zeros((4, 2, 2), np.float32), np.zeros(4, np.float32), "1-D integer array"),
])
def test_bad_arrays_are_refused(x, y, message):
    with pytest.raises(DataError, match=message):
        check_arrays(x, y, 10, "set")


def write_npz(path, x_train, y_train, x_test, y_test):
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return str(path)


def test_hostile_mnist_files(tmp_path):
    ok_x, ok_y = np.zeros((20, 28, 28), np.uint8), np.arange(20, dtype=np.uint8) % 10
    with pytest.raises(DataError, match="20 inputs but 19 labels"):
        load_mnist(write_npz(tmp_path / "a.npz", ok_x, ok_y[:19], ok_x, ok_y), validation_size=5)
    with pytest.raises(DataError, match="training inputs have shape"):
        load_mnist(write_npz(tmp_path / "b.npz", ok_x, ok_y, np.zeros((20, 32, 32), np.uint8), ok_y),
                   validation_size=5)
    with pytest.raises(DataError, match=r"labels must lie in \[0, 9\]"):
        load_mnist(write_npz(tmp_path / "c.npz", ok_x, ok_y + 5, ok_x, ok_y), validation_size=5)
    np.savez(tmp_path / "d.npz", x_train=np.array([object()] * 20, dtype=object), y_train=ok_y, x_test=ok_x,
             y_test=ok_y)
    with pytest.raises(DataError, match="without pickle"):
        load_mnist(str(tmp_path / "d.npz"), validation_size=5)
    with pytest.raises(DataError, match="lacks the arrays"):
        np.savez(tmp_path / "e.npz", x_train=ok_x)
        load_mnist(str(tmp_path / "e.npz"))
    with pytest.raises(DataError, match="is not a file"):
        load_mnist(str(tmp_path))


def test_missing_mnist_says_what_to_pass(monkeypatch):
    monkeypatch.delenv("TRAINER_DATA_DIR", raising=False)

    def offline():
        raise OSError("no network")

    monkeypatch.setattr(keras.datasets.mnist, "load_data", offline)
    with pytest.raises(DataError, match=r"pass data.path=.*TRAINER_DATA_DIR.*data=digits"):
        load_mnist(None)


@pytest.mark.parametrize("override, message", [
    ("trainer.batch_size=-5", "trainer.batch_size must be a positive integer, got -5"),
    ("trainer.epochs=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
    ("trainer.nan_policy=ignore", "trainer.nan_policy must be 'stop', 'skip_step' or 'unchecked'"),
])
def test_bad_config_fails_before_anything_is_written(tmp_path, override, message):
    (tmp_path / "report.json").write_text('{"earlier": true}')
    proc = run_trainer([f"hydra.run.dir={tmp_path}", override])  # python -m trainer, in this process
    assert proc.returncode != 0
    assert message in proc.stderr
    assert json.loads((tmp_path / "report.json").read_text()) == {"earlier": True}
    assert not (tmp_path / "checkpoints").exists()


def test_pickled_mask_file_is_refused(tmp_path):
    from trainer.masks import FreezeConfigError

    path = tmp_path / "mask.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    model = small_model()
    with pytest.raises(FreezeConfigError, match="could not be loaded without pickle"):
        MaskRegistry(model).freeze("fc1/kernel", elements={"mask_file": str(path)})
    with pytest.raises(FreezeConfigError, match="is a directory"):
        MaskRegistry(model).freeze("fc1/kernel", elements={"mask_file": str(tmp_path)})
    with pytest.raises(FreezeConfigError, match="does not exist"):
        MaskRegistry(model).freeze("fc1/kernel", elements={"mask_file": str(tmp_path / "missing.npy")})
    np.save(path, np.ones((3, 3), bool))
    with pytest.raises(FreezeConfigError, match=r"has shape \(3, 3\) but variable 'small/fc1/kernel' has shape \(4, 6\)"):
        MaskRegistry(model).freeze("fc1/kernel", elements={"mask_file": str(path)})


def test_no_eval_or_exec_in_the_package():
    root = os.path.join(REPO, "trainer")
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(folder, name)).read()
                assert "eval(" not in text.replace("evaluate(", "").replace("_eval(", ""), name
                assert "exec(" not in text, name


@pytest.mark.slow
def test_exports_load_without_trainer_and_predict_the_same(tmp_path):
    # the run in this process; the exports are then loaded in a process that never imports trainer
    proc = run_trainer([f"hydra.run.dir={tmp_path}", "trainer.epochs=1", "freeze=random_90", "export.saved_model=true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = f"""
import sys, numpy as np, keras, tensorflow as tf
x = np.random.default_rng(0).random((16, 8, 8, 1)).astype(np.float32)
m = keras.saving.load_model({str(tmp_path / 'model.keras')!r})
saved = tf.saved_model.load({str(tmp_path / 'saved_model')!r})
serve = saved.signatures["serving_default"]
out = list(serve(tf.constant(x)).values())[0].numpy()
assert 'trainer' not in sys.modules
np.save({str(tmp_path / 'pred_keras.npy')!r}, m.predict(x, verbose=0))
np.save({str(tmp_path / 'pred_saved.npy')!r}, out)
np.savez({str(tmp_path / 'loaded.npz')!r}, **{{v.path: v.numpy() for v in m.variables}})
"""
    out = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    from trainer.models import build_model

    weights = np.load(tmp_path / "weights.npz")
    masks = np.load(tmp_path / "masks.npz")
    loaded = np.load(tmp_path / "loaded.npz")
    model = build_model("mlp", (8, 8, 1), 10)
    for v in model.variables:
        v.assign(weights[v.path])
        reloaded = loaded[v.path.split("/", 1)[1]]  # a loaded model's paths lack the model name
        np.testing.assert_array_equal(reloaded, weights[v.path])
        if v.path in masks.files and not masks[v.path].all():
            assert np.all(reloaded[~masks[v.path]] == 0.0)  # frozen elements at their pinned zero
    x = np.random.default_rng(0).random((16, 8, 8, 1)).astype(np.float32)
    expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(np.load(tmp_path / "pred_keras.npy"), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "pred_saved.npy"), expected, rtol=1e-5, atol=1e-5)
    assert sorted(masks.files) == sorted(v.path for v in model.trainable_variables)


def test_skipped_steps_are_counted_in_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.summaries import TensorBoard

    rng = np.random.default_rng(0)
    c0, c1 = batches(rng, 2)
    bad = (np.full((8, 4), np.nan, np.float32), c0[1])
    trainer = trainer_for("skip_step")
    board = TensorBoard(str(tmp_path), summary_every_n_steps=1, histogram_every_n_steps=1000)
    trainer.fit(dataset([c0, bad, c1]), epochs=1, callbacks=[board])
    board.close()
    events = EventAccumulator(str(tmp_path / "train"), size_guidance={"tensors": 0}).Reload()
    values = [float(tf.make_ndarray(e.tensor_proto)) for e in events.Tensors("skipped_steps")]
    assert values and values[-1] == 1.0
    assert trainer.registry.exact()
