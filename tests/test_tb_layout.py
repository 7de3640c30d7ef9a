"""TensorBoard: the Custom Scalars layout puts drift and sparsity of the frozen variables first."""

import glob

import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins.custom_scalar import layout_pb2, metadata

from trainer import MaskRegistry, Trainer
from trainer.summaries import FreezeSummaries


def read_layout(run_dir):
    for path in glob.glob(str(run_dir / "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == metadata.CONFIG_SUMMARY_TAG:
                    return layout_pb2.Layout.FromString(tf.make_ndarray(value.tensor).item())
    raise AssertionError("no layout written")


def test_freezing_view_first_without_statistics_of_unfrozen_variables(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc"), keras.layers.Dense(2, name="out")],
                             name="net")
    registry = MaskRegistry(model)
    registry.freeze("fc/kernel", elements={"indices": [0, 1]}, value="zero")
    trainer = Trainer(model, "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      registry=registry, jit_compile=False)
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    board = FreezeSummaries(str(tmp_path), summary_every_n_steps=1)
    trainer.fit(x, (x[:, 0] > 0).astype("int32"), batch_size=8, epochs=1, callbacks=[board], verbose=False)
    board.close()
    layout = read_layout(tmp_path / "train")
    first = layout.category[0]
    assert first.title == "freezing"
    tags = [tag for chart in first.chart for tag in chart.multiline.tag]
    assert tags[:2] == [r"^masks/(net/fc/kernel)/frozen_drift$", r"^masks/(net/fc/kernel)/sparsity$"]
    assert not any("out/" in tag or "bias" in tag for tag in tags)
    assert [c.title for c in layout.category] == ["freezing", "training"]
