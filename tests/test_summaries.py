"""TensorBoard content, progress display and end summary, checked by reading the written event files.

One tiny run on the bundled digits (30 steps, 90 % of every kernel pinned to
zero) writes the event files most tests read; one Hydra multirun of two jobs
checks the HParams records.
"""

import io
import logging
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from hydra import compose, initialize_config_dir
from rich.console import Console
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.util import tensor_util

from tests.conftest import CONFIGS
from tests.inprocess import run_trainer
from trainer import MaskRegistry, Trainer
from trainer.callbacks import LogLines, Throughput
from trainer.config import register
from trainer.progress import ProgressBar, print_summary, progress_callback, summary_rows
from trainer.run import run
from trainer.summaries import Profile, mask_image

register()

KERNELS = {"lenet/fc1/kernel": (64, 300), "lenet/fc2/kernel": (300, 100), "lenet/out/kernel": (100, 10)}
VARIABLES = [p for k in KERNELS for p in (k, k[: -len("kernel")] + "bias")]
STATS = ("sparsity", "frozen_fraction", "frozen_drift", "trainable_norm")


def load(path):
    acc = ea.EventAccumulator(str(path), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    return acc


def scalars(acc, tag):
    """``[(step, value)]`` of a ``tf.summary.scalar`` series."""
    return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]


def session_hparams(hparams_dir):
    """``({name: value}, {final scalar tag: value})`` of the run directory holding the session record."""
    acc = load(hparams_dir)
    content = acc.PluginTagToContent("hparams")
    assert hparams_metadata.EXPERIMENT_TAG not in content  # TensorBoard builds the table from the sessions
    info = hparams_metadata.parse_session_start_info_plugin_data(content[hparams_metadata.SESSION_START_INFO_TAG])
    values = {k: getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}
    final = {tag: scalars(acc, tag)[-1][1] for tag in acc.Tags()[ea.TENSORS] if not tag.startswith("_hparams_")}
    return values, final


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A 30-step run (1.4 epochs) on digits; returns (run dir, report)."""
    run_dir = tmp_path_factory.mktemp("run")
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "freeze=random_90", "trainer.epochs=2", "trainer.max_steps=30", "log.summary_every_n_steps=5",
            "log.histogram_every_n_steps=10", "log.profile_steps=[3,5]", "log.progress=lines",
            "export.keras=false",
        ])
    cwd = os.getcwd()
    os.chdir(run_dir)
    try:
        report = run(cfg)
    finally:
        os.chdir(cwd)
    return run_dir, report


@pytest.fixture(scope="module")
def train_events(digits_run):
    return load(digits_run[0] / "tb" / "train")


@pytest.fixture(scope="module")
def validation_events(digits_run):
    return load(digits_run[0] / "tb" / "validation")


def test_train_and_validation_tags(train_events, validation_events):
    train = set(train_events.Tags()[ea.TENSORS])
    for tag in ("loss", "accuracy", "learning_rate", "gradient_norm", "examples_per_second", "seconds_per_step",
                "epoch", "model/sparsity", "model/frozen_fraction", "config", "freeze_plan"):
        assert tag in train, tag
    for path in VARIABLES:
        for stat in STATS:  # mask statistics only for the variables a rule covers: the kernels (random_90)
            assert (f"masks/{path}/{stat}" in train) == (path in KERNELS), (path, stat)
        assert f"weights/{path}" in train and f"gradients/{path}" in train
    assert not [t for t in train if t.startswith("masks/") and t.split("/", 1)[1].rsplit("/", 1)[0] not in KERNELS]
    validation = set(validation_events.Tags()[ea.TENSORS])
    assert {"loss", "accuracy", "test/loss", "test/accuracy"} <= validation
    assert [s for s, _ in scalars(train_events, "loss")] == [5, 10, 15, 20, 25, 30]
    assert [s for s, _ in scalars(validation_events, "accuracy")] == [21]  # one epoch end within 30 steps


def test_scalar_values_are_sane(train_events, validation_events, digits_run):
    for tag in ("gradient_norm", "examples_per_second", "seconds_per_step", "learning_rate"):
        values = [v for _, v in scalars(train_events, tag)]
        assert all(np.isfinite(v) and v > 0 for v in values), (tag, values)
    (step, test_accuracy), = scalars(validation_events, "test/accuracy")
    assert step == 30 and test_accuracy == pytest.approx(digits_run[1]["test_accuracy"])


def test_frozen_drift_is_exactly_zero_throughout(train_events):
    for path in KERNELS:
        series = scalars(train_events, f"masks/{path}/frozen_drift")
        assert len(series) == 6
        assert all(v == 0.0 for _, v in series), (path, series)


def test_sparsity_of_a_90_percent_zero_kernel(train_events):
    for path, shape in KERNELS.items():
        size = int(np.prod(shape))
        for _, value in scalars(train_events, f"masks/{path}/sparsity"):
            assert abs(value - 0.9) <= 1.0 / size, (path, value)
        frozen_fraction = scalars(train_events, f"masks/{path}/frozen_fraction")[-1][1]
        assert frozen_fraction == np.float32(round(0.9 * size) / size)  # scalars are stored as float32


def test_mask_images_have_the_kernel_shape_and_pattern(train_events, digits_run):
    masks = np.load(digits_run[0] / "masks.npz")
    for path, shape in KERNELS.items():
        events = train_events.Tensors(f"masks/{path}/trainable")
        assert len(events) == 1  # static masks: written once
        width, height, png = tensor_util.make_ndarray(events[0].tensor_proto)
        image = tf.io.decode_png(png).numpy()
        assert image.shape == shape + (1,)
        assert (int(width), int(height)) == (shape[1], shape[0])
        np.testing.assert_array_equal(image[..., 0] == 255, masks[path])


def test_histograms_cover_only_trainable_elements(train_events):
    for tag in ("weights/lenet/fc1/kernel", "gradients/lenet/fc1/kernel"):
        events = train_events.Tensors(tag)
        assert [e.step for e in events] == [10, 20, 30]
        buckets = tensor_util.make_ndarray(events[-1].tensor_proto)  # (k, 3): left, right, count
        assert buckets[:, 2].sum() == 64 * 300 - round(0.9 * 64 * 300)


def test_texts_hold_config_and_freeze_plan(train_events):
    config = tensor_util.make_ndarray(train_events.Tensors("config")[0].tensor_proto).item().decode()
    plan = tensor_util.make_ndarray(train_events.Tensors("freeze_plan")[0].tensor_proto).item().decode()
    assert "random: 0.9" in config and "summary_every_n_steps: 5" in config
    assert plan.startswith("| variable | shape | frozen | fraction | value | rules |")
    assert "| lenet/fc1/kernel | (64, 300) | 17,280 | 0.9000 | zero | sparse |" in plan


def test_single_run_writes_fixed_hparams_and_final_metrics(digits_run, validation_events):
    assert sorted(os.listdir(digits_run[0] / "tb")) == ["train", "validation"]  # no third run in the legend
    values, final = session_hparams(digits_run[0] / "tb" / "validation")
    assert values["seed"] == 0 and values["optimizer.name"] == "adam" and values["data.name"] == "digits"
    assert "log.summary_every_n_steps" not in values  # log.* overrides do not change results
    assert sorted(final) == ["accuracy", "loss", "model/sparsity", "test/accuracy", "test/loss"]
    assert [s for s, _ in scalars(validation_events, "model/sparsity")] == [30]  # one value, at the end
    assert 0.85 < final["model/sparsity"] < 0.9


def test_profile_steps_write_a_trace(digits_run):
    profile = digits_run[0] / "tb" / "train" / "plugins" / "profile"
    traces = [f for _, _, files in os.walk(profile) for f in files if f.endswith(".xplane.pb")]
    assert traces


def test_profile_steps_are_checked():
    with pytest.raises(ValueError, match=r"log.profile_steps must be \[start, stop\].*got \[5, 2\]"):
        Profile("/tmp/x", [5, 2])
    with pytest.raises(ValueError, match="got \\[3\\]"):
        Profile("/tmp/x", [3])


def test_multirun_jobs_write_their_own_hparams(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_trainer(["-m", f"hydra.sweep.dir={sweep}", "freeze=random_90",  # Hydra's basic launcher, in this process
                        "freeze.rules.sparse.elements.random=0.5,0.8", "trainer.max_steps=3", "trainer.epochs=1",
                        "log.progress=lines", "export.keras=false"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for num, sparsity in (("0", 0.5), ("1", 0.8)):
        (job,) = sweep.glob(f"{num}_*")  # job folders are named by their overrides
        values, final = session_hparams(job / "tb" / "validation")
        assert values["freeze.rules.sparse.elements.random"] == sparsity
        assert values["trainer.max_steps"] == 3 and values["freeze"] == "random_90"
        assert final["test/accuracy"] > 0 and 0 < final["model/sparsity"] <= sparsity


def test_mask_image_reshapes_conv_kernels():
    mask = np.zeros((5, 5, 3, 8), dtype=bool)
    mask[..., 0] = True
    image = mask_image(mask)
    assert image.shape == (1, 75, 8, 1) and image.dtype == np.float32
    assert image[0, :, 0, 0].all() and not image[0, :, 1:, 0].any()
    assert mask_image(np.ones(4, bool)).shape == (1, 1, 4, 1)


# ----------------------------------------------------------------- terminal


def tiny_trainer():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")], name="net")
    registry = MaskRegistry(model)
    registry.freeze("fc/kernel", elements={"indices": [0, 1]}, value="zero")
    trainer = Trainer(model, keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"], registry=registry, jit_compile=False)  # the display, not the step, is tested
    x = np.random.default_rng(0).normal(size=(40, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    return trainer, ds


def test_progress_bar_draws_each_epoch_with_rates():
    trainer, ds = tiny_trainer()
    out = io.StringIO()
    bar = ProgressBar(Console(file=out, force_terminal=True, width=160))
    trainer.fit(ds, ds, epochs=2, callbacks=[bar])
    text = out.getvalue()
    assert "epoch 1/2" in text and "epoch 2/2" in text
    assert "5/5" in text and "examples/s" in text and "accuracy" in text
    assert bar.progress is None  # stopped at the end


def test_progress_choice_follows_the_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert isinstance(progress_callback("auto", 7, stream=io.StringIO()), LogLines)
    assert isinstance(progress_callback("auto", stream=Tty()), ProgressBar)
    assert isinstance(progress_callback("lines", stream=Tty()), LogLines)
    with pytest.raises(ValueError, match="log.progress must be one of .*'bar'.*got 'fancy'"):
        progress_callback("fancy")


def test_log_lines_report_examples_per_second(caplog):
    trainer, ds = tiny_trainer()
    with caplog.at_level(logging.INFO, logger="trainer"):
        trainer.fit(ds, epochs=1, callbacks=[LogLines(every_n_steps=2)])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train |")]
    assert lines and "| examples/sec " in lines[0] and "| steps/sec " in lines[0]


def test_throughput_leaves_evaluation_out(monkeypatch):
    clock = iter([0.0, 1.0, 11.0, 12.0])  # start, tick, (10 s of evaluation) resume, tick

    class Fake:  # the two LoopState fields a Throughput reads
        step = 0
        examples = 0

    monkeypatch.setattr("trainer.callbacks.time.perf_counter", lambda: next(clock))
    meter, fake = Throughput(), Fake()
    meter.start(fake)
    fake.step, fake.examples = 10, 80
    meter.tick()
    meter.resume()
    fake.step, fake.examples = 20, 160
    meter.tick()
    rates = meter.measure(fake)
    assert rates == {"examples_per_second": 80.0, "steps_per_second": 10.0, "seconds_per_step": 0.1}


def test_summary_table_and_plain_lines(caplog):
    result = {"status": "completed", "test_loss": 0.1, "test_accuracy": 0.97, "steps": 100, "epochs": 2.0,
              "wall_seconds": 12.34, "examples_per_second": 4567.8,
              "audit": "266,200 frozen elements in 3 variables, all bit-exact"}
    assert ("test accuracy", "0.9700") in summary_rows(result)
    out = io.StringIO()
    print_summary(result, console=Console(file=out, width=120))
    text = out.getvalue()
    for part in ("test accuracy", "0.9700", "12.3 s", "4,568", "266,200 frozen elements in 3 variables, all bit-exact"):
        assert part in text
    with caplog.at_level(logging.INFO, logger="trainer"):
        print_summary(result, stream=io.StringIO())
    assert "summary | frozen: 266,200 frozen elements in 3 variables, all bit-exact" in caplog.text


def test_an_unchecked_run_writes_no_gradient_norm(tmp_path):
    """nan_policy=unchecked computes no norm in the step, so TensorBoard gets no (stale) gradient_norm."""
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "freeze=random_90", "trainer.max_steps=10", "log.summary_every_n_steps=5", "log.progress=lines",
            "trainer.nan_policy=unchecked", "export.keras=false",
        ])
    report = run(cfg, run_dir=str(tmp_path))
    assert report["status"] == "completed"
    train = set(load(tmp_path / "tb" / "train").Tags()[ea.TENSORS])
    assert {"loss", "learning_rate"} <= train and "gradient_norm" not in train
