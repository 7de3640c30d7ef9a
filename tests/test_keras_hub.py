"""A keras_hub backbone works with the registry unchanged (optional extra: ``pip install -e ".[hub]"``).

The BERT backbone is built from its constructor arguments with random
weights (presets cannot be downloaded here), wrapped in a classifier head,
and trained through ``Trainer`` on dict inputs with 99.5 % of the backbone
frozen (compact updates): every frozen element keeps its bits, the trainable
ones move.
"""

import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from trainer import MaskRegistry, Trainer  # noqa: E402


def test_a_keras_hub_bert_trains_with_99_5_percent_frozen_bit_exactly():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(vocabulary_size=64, num_layers=2, num_heads=2, hidden_dim=32,
                                             intermediate_dim=64, max_sequence_length=12)
    inputs = {name: keras.Input((12,), dtype="int32", name=name) for name in ("token_ids", "segment_ids",
                                                                               "padding_mask")}
    pooled = backbone(inputs)["pooled_output"]
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(pooled), name="bert_classifier")
    registry = MaskRegistry(model)
    registry.freeze("*", exclude="head/*", non_trainable="skip", elements={"random": 0.995, "seed": 0},
                    value="current", name="sparse")  # the backbone's variable paths carry no model prefix
    modes = registry.update_modes()
    assert any(m == "compact" and "attention" in p for p, m in modes.items())  # small vectors: wholly frozen
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(0, 64, (64, 12)).astype("int32"),
         "segment_ids": np.zeros((64, 12), "int32"), "padding_mask": np.ones((64, 12), "int32")}
    y = rng.integers(0, 3, 64)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    trainer = Trainer(model, keras.optimizers.AdamW(1e-2, weight_decay=1e-2),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True), registry=registry,
                      steps_per_execution=4, jit_compile=False)
    trainer.fit(ds, epochs=2)
    assert trainer.step == 8 and registry.exact()
    moved = 0
    for v in model.trainable_variables:
        mask = registry.trainable_mask(v.path)
        now = v.numpy()
        np.testing.assert_array_equal(now[~mask].view(np.uint32), before[v.path][~mask].view(np.uint32),
                                      err_msg=v.path)
        moved += int((now[mask] != before[v.path][mask]).sum())
    assert moved > 0
