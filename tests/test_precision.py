"""A bfloat16 / float16 base: float32 master values and slots, frozen elements bit-exact, training that moves."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import MaskRegistry, Trainer
from trainer.masks import FreezeConfigError


def dense_model(dtype="bfloat16", name="net"):
    return keras.Sequential([keras.Input((32,)), keras.layers.Dense(256, dtype=dtype, name="fc")], name=name)


def u16(a):
    return np.asarray(tf.bitcast(tf.convert_to_tensor(a), tf.uint16))


def data():
    rng = np.random.default_rng(0)
    return tf.constant(rng.normal(size=(16, 32)), tf.float32), tf.constant(rng.normal(size=(16, 256)), tf.float32)


def setup(dtype="bfloat16", update="auto", seed=3):
    keras.utils.set_random_seed(seed)
    model = dense_model(dtype)
    registry = MaskRegistry(model, update=update)
    registry.freeze("fc/kernel", elements={"random": 0.99, "seed": 0}, value="current")
    optimizer = keras.optimizers.AdamW(1e-4)
    registry.attach_optimizer(optimizer)
    return model, registry, optimizer


def stepper(model, registry, optimizer):
    variables = registry.trainable_variables()
    x, y = data()

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            out = tf.cast(model(x, training=True), tf.float32)
            loss = tf.reduce_mean(tf.square(out - y))
        grads = registry.update_gradients(tape.gradient(loss, variables), variables)
        registry.apply_gradients(optimizer, grads, variables)

    return step


@pytest.mark.parametrize("update", ["auto", "sampled"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_frozen_elements_keep_their_bits_and_trainable_ones_move_after_50_adamw_steps(dtype, update):
    model, registry, optimizer = setup(dtype, update)
    kernel = model.get_layer("fc").kernel
    trainable = registry.trainable_mask(kernel.path)
    assert 0 < trainable.sum() < 0.02 * trainable.size
    before = u16(kernel.value)
    step = stepper(model, registry, optimizer)
    for _ in range(50):
        step()
    after = u16(kernel.value)
    np.testing.assert_array_equal(after[~trainable], before[~trainable])
    moved = np.count_nonzero(after[trainable] != before[trainable])
    assert moved >= 0.9 * trainable.sum(), (moved, trainable.sum())
    assert registry.exact() and registry.update_modes()[kernel.path] == "compact"
    # The compact values and every optimizer slot of them are float32 masters; the variable is written rounded.
    compact = [v for v in optimizer.variables if tuple(v.shape) == (int(trainable.sum()),)]
    assert len(compact) == 2 and {str(v.dtype) for v in compact} == {"float32"}
    masters = registry.optimizer_variables()[0]
    assert str(masters.dtype) == "float32" and str(kernel.dtype) == dtype
    np.testing.assert_array_equal(u16(tf.cast(masters.value, dtype)), after[trainable])


def test_the_control_without_masters_moves_nothing():
    # What the issue measured: AdamW(1e-4) steps on the bfloat16 variable itself round away entirely.
    keras.utils.set_random_seed(3)
    model = dense_model()
    kernel = model.get_layer("fc").kernel
    optimizer = keras.optimizers.AdamW(1e-4)
    before = u16(kernel.value)
    x, y = data()
    for _ in range(5):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(tf.cast(model(x), tf.float32) - y))
        optimizer.apply_gradients([(tape.gradient(loss, kernel), kernel)])
    assert np.count_nonzero(u16(kernel.value) != before) < 0.01 * before.size


def test_a_dense_update_of_a_bfloat16_variable_is_refused_in_one_line_and_changes_nothing():
    model = dense_model()
    registry = MaskRegistry(model, update="dense")
    with pytest.raises(FreezeConfigError, match=r"'net/fc/kernel' is bfloat16.*update='compact'") as info:
        registry.freeze("fc/kernel", elements={"random": 0.99, "seed": 0})
    assert "\n" not in str(info.value)
    assert registry.rules == [] and registry.covered_paths() == [] and registry.update_modes() == {}


def test_auto_uses_compact_masters_for_a_bfloat16_variable_at_any_fraction():
    model = dense_model()
    registry = MaskRegistry(model)
    registry.freeze("fc/kernel", elements={"random": 0.1, "seed": 0})
    assert registry.update_modes() == {"net/fc/kernel": "compact"}


def test_plan_describe_and_float32_rows_say_each_parts_precision():
    model, registry, _ = setup()
    row = [r for r in registry.plan() if r["path"] == "net/fc/kernel"][0]
    assert row["dtype"] == "bfloat16"
    assert row["precision"] == {"variable": "bfloat16", "values": "float32", "slots": "float32"}
    assert "| compact (bfloat16 base, float32 masters) |" in registry.describe()
    _, float32, _ = setup("float32")
    assert all("precision" not in r for r in float32.plan())  # float32 rows keep exactly their keys
    assert "masters" not in float32.describe()


def test_update_between_executions_keeps_the_masters_and_takes_a_set_weights():
    model, registry, optimizer = setup()
    kernel = model.get_layer("fc").kernel
    step = stepper(model, registry, optimizer)
    for _ in range(3):
        step()
    masters = registry.optimizer_variables()[0]
    kept = masters.numpy().copy()
    assert not np.array_equal(kept, tf.cast(tf.cast(kept, tf.bfloat16), tf.float32).numpy())  # finer than bf16
    registry.update(3)  # syncs the compact values from the model
    np.testing.assert_array_equal(masters.numpy(), kept)
    value = kernel.numpy()
    trainable = registry.trainable_mask(kernel.path)
    value[trainable] = np.asarray(2.0, value.dtype)
    kernel.assign(value)
    registry.update(3)
    np.testing.assert_array_equal(masters.numpy(), np.full_like(kept, 2.0))


def test_save_and_restore_of_a_bfloat16_run_continues_bit_exactly(tmp_path):
    model, registry, optimizer = setup()
    step = stepper(model, registry, optimizer)
    for _ in range(10):
        step()
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, registry=registry)
    path = checkpoint.write(str(tmp_path / "ckpt"))
    for _ in range(10):
        step()
    expected = [v.numpy().copy() for v in model.variables + optimizer.variables]

    other, other_registry, other_optimizer = setup(seed=11)  # other weights, restored from the checkpoint
    tf.train.Checkpoint(model=other, optimizer=other_optimizer, registry=other_registry).read(path).assert_consumed()
    other_registry.after_restore()
    other_step = stepper(other, other_registry, other_optimizer)
    for _ in range(10):
        other_step()
    got = [v.numpy() for v in other.variables + other_optimizer.variables]
    assert len(got) == len(expected)
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(np.atleast_1d(a).view(np.uint8), np.atleast_1d(b).view(np.uint8))
    assert other_registry.exact()


def test_trainer_fit_of_a_bfloat16_model_trains_and_keeps_frozen_bits():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(64, dtype="bfloat16", name="fc"),
                              keras.layers.Dense(1, dtype="bfloat16", name="out")], name="mlp")
    registry = MaskRegistry(model)
    registry.freeze("fc/kernel", elements={"random": 0.95, "seed": 0})
    kernel = model.get_layer("fc").kernel
    before = u16(kernel.value)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(64, 8)).astype(np.float32), rng.normal(size=(64, 1)).astype(np.float32)
    trainer = Trainer(model, keras.optimizers.AdamW(1e-4), keras.losses.MeanSquaredError(), registry=registry,
                      jit_compile=False)
    trainer.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), epochs=5)
    trainable = registry.trainable_mask(kernel.path)
    after = u16(kernel.value)
    np.testing.assert_array_equal(after[~trainable], before[~trainable])
    assert np.count_nonzero(after[trainable] != before[trainable]) >= 0.5 * trainable.sum()
    assert registry.exact()
