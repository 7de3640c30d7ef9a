"""The options the published LeNet-300-100 recipes need, each checked by exact values through public names.

``optimizer.schedule: {kind: step}`` (PyTorch's StepLR per batch),
``data.standardize``, ``model.use_bias`` / ``batch_norm`` / ``coupled_l2`` (PyTorch's coupled
``weight_decay``), and the experiments ``dst_lenet_sm`` / ``dst_lenet_set`` / ``dst_lenet_rigl`` /
``snip_lenet_lee`` composed and run for a few steps on the bundled digits.
"""

import numpy as np
import pytest
import tensorflow as tf
import keras

from tests.test_experiments import compose_cfg, in_tmp  # noqa: F401  (in_tmp: a fixture)
from trainer.data import DataError, Splits, standardize
from trainer.models import mlp
from trainer.optimizer_config import optimizer_problem, schedule_problem, step_decay
from trainer.run import make_optimizer, run


def test_step_decay_is_pytorchs_steplr_stepped_before_each_batch():
    schedule = step_decay(0.1, 5, 0.1, 20)
    for i in range(20):  # optimizer.iterations i trains PyTorch's batch b = i + 1: lr * 0.1 ** floor(b / 5)
        expected = np.float32(0.1 * 0.1 ** ((i + 1) // 5))
        assert np.float32(schedule(i)) == expected, i
    assert step_decay(0.1, 25000, 0.1, 20000) == 0.1  # no decay inside the run: a constant


SCHEDULE_ERRORS = [
    ("linear", "optimizer.schedule must be one of ['constant', 'cosine'] or a mapping {kind: step, every_n_steps, "
               "factor}, got 'linear'"),
    ({"kind": "exp", "every_n_steps": 5, "factor": 0.1},
     "optimizer.schedule as a mapping takes keys ['kind', 'every_n_steps', 'factor'] with kind: step, got "
     "{'kind': 'exp', 'every_n_steps': 5, 'factor': 0.1}"),
    ({"kind": "step", "every_n_steps": 0, "factor": 0.1},
     "optimizer.schedule.every_n_steps must be an integer >= 1, got 0"),
    ({"kind": "step", "every_n_steps": 5, "factor": 1.5},
     "optimizer.schedule.factor must be a number in (0, 1], got 1.5"),
]


@pytest.mark.parametrize("schedule,message", SCHEDULE_ERRORS, ids=[str(i) for i in range(len(SCHEDULE_ERRORS))])
def test_a_bad_schedule_is_named_in_one_line_before_anything_is_built(schedule, message):
    assert schedule_problem(schedule) == message
    assert optimizer_problem({"name": "sgd", "learning_rate": 0.1, "schedule": schedule})[0] == message


def test_the_step_schedule_reaches_the_keras_optimizer_from_a_config():
    cfg = compose_cfg(["+experiment=dst_lenet_sm"])
    optimizer = make_optimizer(cfg.optimizer, 54000)
    assert isinstance(optimizer, keras.optimizers.SGD) and optimizer.nesterov and optimizer.momentum == 0.9
    lr = optimizer._learning_rate
    assert [float(lr(i)) for i in (0, 24998, 24999, 49998, 49999)] == [
        float(np.float32(v)) for v in (0.1, 0.1, 0.1 * 0.1, 0.1 * 0.1, 0.1 * 0.1 ** 2)]


def test_standardize_is_x_minus_mean_over_std_in_float32():
    x = np.array([[0.0, 0.5], [1.0, 0.25]], np.float32)
    splits = Splits(x, np.zeros(2, np.int32), x[:1], np.zeros(1, np.int32), x, np.zeros(2, np.int32), 2, "t")
    out = standardize(splits, [0.1307, 0.3081])
    expected = (x - np.float32(0.1307)) / np.float32(0.3081)
    np.testing.assert_array_equal(out.x_train.view(np.uint32), expected.view(np.uint32))
    np.testing.assert_array_equal(out.x_val.view(np.uint32), expected[:1].view(np.uint32))
    assert out.x_train.dtype == np.float32
    with pytest.raises(DataError) as err:
        standardize(splits, [0.1, 0.0])
    assert str(err.value) == ("data.standardize must be [mean, std], two numbers with std > 0 (e.g. [0.1307, "
                              "0.3081] for MNIST), got [0.1, 0.0]")


def test_mlp_without_biases_with_batchnorm_after_every_layer():
    model = mlp((28, 28, 1), 10, use_bias=False, batch_norm=True)
    assert [v.path for v in model.trainable_weights] == [
        "lenet/fc1/kernel", "lenet/fc1_bn/gamma", "lenet/fc1_bn/beta", "lenet/fc2/kernel", "lenet/fc2_bn/gamma",
        "lenet/fc2_bn/beta", "lenet/out/kernel", "lenet/out_bn/gamma", "lenet/out_bn/beta"]
    bn = model.get_layer("out_bn")
    assert bn.epsilon == 1e-5 and bn.momentum == 0.9
    assert [type(layer).__name__ for layer in model.layers][-2:] == ["Dense", "BatchNormalization"]  # logits: no ReLU


def test_coupled_l2_adds_lambda_times_w_to_every_gradient_as_pytorch_weight_decay():
    x = np.random.default_rng(0).random((8, 28, 28, 1), dtype=np.float32)
    y = np.arange(8) % 10
    keras.utils.set_random_seed(3)
    model = mlp((28, 28, 1), 10, coupled_l2=5e-4, batch_norm=True)
    with tf.GradientTape(persistent=True) as tape:
        data_loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, model(x, training=True),
                                                                              from_logits=True))
        reg = tf.add_n(model.losses)
        total = data_loss + reg
    variables = model.trainable_weights
    assert len(model.losses) == len(variables) == 12  # kernels, biases, gamma and beta of three layers
    for v, g_reg, g_data, g in zip(variables, tape.gradient(reg, variables), tape.gradient(data_loss, variables),
                                   tape.gradient(total, variables)):
        expected = np.float32(5e-4) * v.numpy()  # PyTorch: d_p = grad + weight_decay * p
        np.testing.assert_array_equal(g_reg.numpy().view(np.uint32), expected.view(np.uint32))  # bit for bit
        np.testing.assert_array_equal(g.numpy().view(np.uint32), (g_data.numpy() + expected).view(np.uint32))
    with pytest.raises(ValueError) as err:
        mlp((4,), 2, coupled_l2=-1)
    assert str(err.value) == "model.coupled_l2 must be a number >= 0 (PyTorch's weight_decay, e.g. 5e-4), got -1"


DIGITS = ["data=digits", "data.validation_size=180", "trainer.max_steps=12", "export.keras=false",
          "trainer.steps_per_execution=3", "freeze.rules.sparse.regrow.update_every_n_steps=3",
          "freeze.rules.sparse.regrow.end_step=9", "freeze.rules.sparse.elements.random=0.9"]


@pytest.mark.parametrize("name", ["dst_lenet_sm", "dst_lenet_set", "dst_lenet_rigl"])
def test_the_dst_experiments_run_with_exact_frozen_elements_and_keep_the_total(in_tmp, name):  # noqa: F811
    cfg = compose_cfg([f"+experiment={name}", *DIGITS])
    assert cfg.name == name and cfg.trainer.epochs == 100 and cfg.trainer.batch_size == 100
    report = run(cfg)
    assert report["status"] == "completed" and report["steps"] == 12 and report["frozen_exact"] is True
    kernels = [r for r in report["variables"] if r["path"].endswith("/kernel")]
    total = sum(int(np.prod(r["shape"])) for r in kernels)
    assert sum(r["frozen_elements"] for r in kernels) == total - round(0.1 * total)


def test_the_snip_recipe_composes():
    cfg = compose_cfg(["+experiment=snip_lenet_lee"])
    assert (cfg.optimizer.options.nesterov, cfg.model.coupled_l2, cfg.data.validation_size) == (False, 5e-4, 6000)
