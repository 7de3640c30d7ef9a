"""``trainer.MaskedOptimizer`` under ``model.fit``: frozen elements bit-exact, saved and resumed exactly."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import MaskedOptimizer, MaskRegistry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(seed=0):
    """An MLP with a compact (fc1/kernel), a dense (fc2/kernel) and a wholly frozen (fc1/bias) variable."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh", name="fc1"),
                              keras.layers.Dense(3, name="fc2")], name="mlp")
    registry = MaskRegistry(model)
    registry.freeze("fc1/kernel", elements={"random": 0.8, "seed": 0}, name="a")
    registry.freeze("fc2/kernel", elements={"random": 0.3, "seed": 0}, value=0.25, name="b")
    registry.freeze("fc1/bias", value="zero", name="c")
    assert registry.update_modes() == {"mlp/fc1/kernel": "compact", "mlp/fc2/kernel": "dense",
                                       "mlp/fc1/bias": "frozen"}
    return model, registry


def compile_(model, registry, **kwargs):
    model.compile(optimizer=MaskedOptimizer(keras.optimizers.AdamW(0.05, weight_decay=0.1), registry),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), **kwargs)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(64, 6)).astype("float32"), rng.integers(0, 3, 64)


def bits(model):
    return [v.numpy().view(np.uint32).copy() for v in model.trainable_variables]


def assert_frozen_kept(model, registry, before):
    moved = 0
    for v in model.trainable_variables:
        mask, now = registry.trainable_mask(v.path), v.numpy()
        np.testing.assert_array_equal(now[~mask].view(np.uint32), before[v.path][~mask].view(np.uint32),
                                      err_msg=v.path)
        moved += int((now[mask] != before[v.path][mask]).sum())
    assert moved > 0 and registry.exact()


def test_fit_xla_k2_callbacks_then_load_model_continues_bit_exactly(tmp_path, data):
    x, y = data
    model, registry = build()
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    compile_(model, registry, jit_compile=True, steps_per_execution=2)
    callbacks = [keras.callbacks.ModelCheckpoint(str(tmp_path / "e{epoch}.keras"), save_weights_only=False),
                 keras.callbacks.EarlyStopping(monitor="loss", patience=3),
                 keras.callbacks.TensorBoard(str(tmp_path / "tb"))]
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=callbacks)
    assert int(model.optimizer.iterations) == 8
    assert_frozen_kept(model, registry, before)
    assert os.listdir(tmp_path / "tb")

    resumed = keras.saving.load_model(tmp_path / "e1.keras")
    assert isinstance(resumed.optimizer, MaskedOptimizer) and int(resumed.optimizer.iterations) == 4
    assert resumed.optimizer.registry.update_modes() == registry.update_modes()
    assert [v.path for v in resumed.trainable_variables] == [v.path for v in model.trainable_variables]
    assert resumed.optimizer.registry.exact()
    resumed.fit(x, y, batch_size=16, epochs=2, initial_epoch=1, shuffle=False, verbose=0)
    for a, b in zip(bits(model), bits(resumed)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(model.optimizer.variables, resumed.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a.numpy()), np.asarray(b.numpy()), err_msg=a.path)


def test_tf_train_checkpoint_restores_masks_compact_values_and_slots(tmp_path, data):
    x, y = data
    model, registry = build()
    compile_(model, registry)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(str(tmp_path / "ckpt"))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)

    other, other_registry = build(seed=1)  # other initial weights: everything must come from the checkpoint
    compile_(other, other_registry)
    tf.train.Checkpoint(model=other, optimizer=other.optimizer).read(path).assert_consumed()
    other_registry.after_restore()
    other.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(bits(model), bits(other)):
        np.testing.assert_array_equal(a, b)

    # Weights set outside fit reach the compact [k] values through sync().
    kernel, compact, indices = (other.get_layer("fc1").kernel, other_registry.compact["mlp/fc1/kernel"],
                                other_registry.indices["mlp/fc1/kernel"].numpy())
    kernel.assign(kernel.numpy() + 1.0)  # frozen elements too: reproject-free check of the [k] values only
    assert not np.array_equal(compact.numpy(), kernel.numpy().reshape(-1)[indices])
    other.optimizer.sync()
    np.testing.assert_array_equal(compact.numpy(), kernel.numpy().reshape(-1)[indices])


def test_a_restored_optimizer_refuses_variables_other_than_those_saved():
    """Paths that differ by more than the prefix load_model drops from a Sequential's layers are refused."""
    model, registry = build()
    config = MaskedOptimizer(keras.optimizers.SGD(0.1), registry).get_config()
    other = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="h1"), keras.layers.Dense(3, name="h2")],
                             name="mlp")
    with pytest.raises(ValueError) as error:
        MaskedOptimizer.from_config(config).build(other.trainable_variables)
    assert str(error.value) == (
        "MaskedOptimizer was saved for trainable variables [('mlp/fc1/kernel', [6, 8]), ('mlp/fc1/bias', [8]), "
        "('mlp/fc2/kernel', [8, 3]), ('mlp/fc2/bias', [3])], and is built for [('mlp/h1/kernel', [6, 8]), "
        "('mlp/h1/bias', [8]), ('mlp/h2/kernel', [8, 3]), ('mlp/h2/bias', [3])]")


@pytest.mark.parametrize("rule, message", [
    (dict(select="fc1/kernel", elements={"random": 0.5, "seed": 0}, end_step=10),
     "MaskedOptimizer cannot run rule 'r': its mask changes during training (start/end step or epoch, "
     "update_every_n_steps or schedule), and model.fit calls nothing between steps to change masks; use "
     "trainer.Trainer, or a custom loop calling registry.update"),
    (dict(select="fc1/kernel", elements={"random": 0.5, "seed": 0}, value="zero",
          regrow={"method": "set", "drop_fraction": 0.3, "update_every_n_steps": 5}),
     "MaskedOptimizer cannot run rule 'r': prune-and-regrow (regrow) moves its trainable elements during "
     "training, and model.fit calls nothing between steps to change masks; use trainer.Trainer, or a custom "
     "loop calling registry.update"),
])
def test_rules_that_change_masks_are_refused_by_name(rule, message):
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="fc1")], name="mlp")
    registry = MaskRegistry(model)
    registry.freeze(name="r", **rule)
    with pytest.raises(ValueError) as error:
        MaskedOptimizer(keras.optimizers.SGD(0.1), registry)
    assert str(error.value) == message


def test_sampled_gradients_are_refused():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="fc1")], name="mlp")
    with pytest.raises(ValueError) as error:
        MaskedOptimizer(keras.optimizers.SGD(0.1), MaskRegistry(model, update="sampled"))
    assert str(error.value) == (
        "MaskedOptimizer cannot use a registry with update='sampled': model.fit differentiates the model "
        "variables, not the sampled layers' compact ones; use update='auto', 'dense' or 'compact'")


def test_the_stateless_apply_of_other_backends_is_refused_with_what_to_do():
    model, registry = build()
    optimizer = MaskedOptimizer(keras.optimizers.SGD(0.1), registry)
    before = bits(model)
    with pytest.raises(RuntimeError) as error:
        optimizer.stateless_apply(optimizer.variables, [tf.zeros_like(v) for v in model.trainable_variables],
                                  model.trainable_variables)
    assert str(error.value) == (
        "MaskedOptimizer has no stateless apply: the registry keeps frozen elements exact by updating its "
        "variables in place; run Keras on the TensorFlow backend (KERAS_BACKEND=tensorflow), where model.fit "
        "calls apply")
    assert all(np.array_equal(a, b) for a, b in zip(bits(model), before))


MIRRORED = r'''
import json
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from tests.test_masked_optimizer import build, compile_, assert_frozen_kept
rng = np.random.default_rng(0)
x, y = rng.normal(size=(64, 6)).astype("float32"), rng.integers(0, 3, 64)


def fit(strategy, k):
    with strategy.scope():
        model, registry = build()
        compile_(model, registry, steps_per_execution=k)
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 8
    assert_frozen_kept(model, registry, before)
    for v in model.trainable_variables:  # every replica's copy
        frozen = ~registry.trainable_mask(v.path)
        for copy in getattr(v.value, "values", [v.value]):
            assert (copy.numpy()[frozen].view(np.uint32) == before[v.path][frozen].view(np.uint32)).all()
    return ([v.numpy().tobytes() for v in model.trainable_variables],
            [np.asarray(v.numpy()).tobytes() for v in model.optimizer.variables],
            [v.numpy() for v in model.trainable_variables])


def mirrored(**kwargs):
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"], **kwargs)


plain = dict(cross_device_ops=tf.distribute.ReductionToOneDevice())
k2, k1, collective, one = fit(mirrored(**plain), 2), fit(mirrored(**plain), 1), fit(mirrored(), 1), fit(
    tf.distribute.get_strategy(), 1)
try:
    fit(mirrored(), 2)
    refusal = None
except ValueError as error:
    refusal = str(error)
print(json.dumps({"k2_equals_k1": k2[:2] == k1[:2], "k2_equals_collective_k1": k2[:2] == collective[:2],
                  "max_diff_vs_one_device": max(float(abs(a - b).max()) for a, b in zip(k2[2], one[2])),
                  "refusal": refusal}))
'''


def test_fit_under_mirrored_strategy_on_two_logical_cpus_k2_equals_k1():
    """2 replicas: K=2 equals K=1 bit for bit (weights, slots), the default collective all-reduce too (K=1);
    frozen elements keep their bits on every replica's copy; trained ones match one device to reduction order
    (the loss is averaged per replica, then summed); K=2 with the collective all-reduce is refused."""
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", MIRRORED], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["k2_equals_k1"] and result["k2_equals_collective_k1"]
    assert result["max_diff_vs_one_device"] < 1e-6
    assert result["refusal"] == (
        "MaskedOptimizer cannot run under MirroredStrategy with steps_per_execution > 1 and the strategy's "
        "collective all-reduce: Keras runs these steps inside a tf.while_loop, where the collective's instance "
        "key is never fed (this fails with any optimizer, Keras issue 19246); create the strategy with "
        "cross_device_ops=tf.distribute.ReductionToOneDevice(), or compile with steps_per_execution=1")


def test_keras_hub_causal_lm_and_text_classifier_fine_tune_through_task_fit():
    keras_hub = pytest.importorskip("keras_hub")
    rng = np.random.default_rng(0)
    args = dict(vocabulary_size=100, num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64,
                max_sequence_length=16)
    keras.utils.set_random_seed(0)
    lm = keras_hub.models.GPT2CausalLM(backbone=keras_hub.models.GPT2Backbone(**args), preprocessor=None)
    clf = keras_hub.models.BertTextClassifier(backbone=keras_hub.models.BertBackbone(**args), num_classes=3,
                                              preprocessor=None)
    tokens = rng.integers(0, 100, (8, 16)).astype("int32")
    ones = np.ones((8, 16), "int32")
    for task, x, y, exclude in [
        (lm, {"token_ids": tokens, "padding_mask": ones}, rng.integers(0, 100, (8, 16)), None),
        (clf, {"token_ids": tokens, "segment_ids": 0 * ones, "padding_mask": ones}, rng.integers(0, 3, 8),
         ["pooled_dense/*", "logits/*"]),
    ]:
        registry = MaskRegistry(task)
        registry.freeze("*", exclude=exclude, non_trainable="skip", elements={"random": 0.995, "seed": 0},
                        name="sparse")
        backbone = [r for r in registry.plan() if r["rules"]]
        frozen = sum(r["frozen_elements"] for r in backbone) / sum(int(np.prod(r["shape"])) for r in backbone)
        assert frozen >= 0.995
        before = {v.path: v.numpy().copy() for v in task.trainable_variables}
        task.compile(optimizer=MaskedOptimizer(keras.optimizers.AdamW(1e-2), registry),
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), weighted_metrics=[],
                     jit_compile=False)  # XLA is tested above; here it would only cost compile time
        task.fit(x, y, batch_size=4, epochs=1, verbose=0)
        assert int(task.optimizer.iterations) == 2
        assert_frozen_kept(task, registry, before)
