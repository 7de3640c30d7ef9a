"""``groups: heads``: attention heads ranked by the norm of their slice, against a NumPy oracle.

The oracle loops over every element, groups it by its index on the heads axis written out by hand for each
variable (query/key/value kernels ``(in, heads, head_dim)``: axis 1; their biases ``(heads, head_dim)``: axis
0; the output kernel ``(heads, head_dim, out)``: axis 0), and freezes the lowest-scoring heads (ties by
position). The registry's frozen mask must equal it exactly.
"""

import itertools

import keras
import numpy as np
import pytest

from trainer.masks import FreezeConfigError, MaskRegistry
from trainer.masks.heads import head_axes

L = keras.layers


def oracle(w, fraction, axis, norm):
    w = np.asarray(w, np.float64)
    members = {}
    for index in itertools.product(*[range(n) for n in w.shape]):
        members.setdefault(index[axis], []).append(index)
    ids = sorted(members)
    scores = []
    for gid in ids:
        values = [abs(w[i]) for i in members[gid]]
        scores.append(sum(values) if norm == "l1" else sum(v * v for v in values) ** 0.5)
    frozen = np.zeros(w.shape, bool)
    for k in sorted(range(len(ids)), key=lambda k: (scores[k], k))[:int(round(fraction * len(ids)))]:
        for i in members[ids[k]]:
            frozen[i] = True
    return frozen


def attention_model(seed=0):
    x = keras.Input((5, 8))
    y = L.MultiHeadAttention(num_heads=4, key_dim=3, value_dim=2, name="mha")(x, x)
    model = keras.Model(x, y, name="net")
    rng = np.random.default_rng(seed)
    for v in model.variables:
        v.assign(rng.standard_normal(v.shape).astype(np.float32))
    return model


CASES = [  # (variable, heads axis, fraction, norm)
    ("mha/attention_output/kernel", 0, 0.5, "l1"),
    ("mha/attention_output/kernel", 0, 0.75, "l2"),
    ("mha/query/kernel", 1, 0.5, "l2"),
    ("mha/key/kernel", 1, 0.25, "l1"),
    ("mha/value/kernel", 1, 0.5, "l1"),
    ("mha/value/bias", 0, 0.5, "l2"),
]


@pytest.mark.parametrize("path, axis, fraction, norm", CASES)
def test_head_selection_equals_oracle(path, axis, fraction, norm):
    model = attention_model()
    w = np.asarray(model.get_layer("mha").weights[[v.path for v in model.get_layer("mha").weights].index(path)])
    registry = MaskRegistry(model)
    registry.freeze(path, elements={"magnitude": fraction, "groups": "heads", "norm": norm}, value="zero",
                    name="heads")
    expected = oracle(w, fraction, axis, norm)
    np.testing.assert_array_equal(~registry.trainable_mask(path), expected)
    value = np.asarray(next(v for v in model.variables if v.path == path))
    assert np.all(value[expected] == 0) and np.array_equal(value[~expected], w[~expected])
    row = next(r for r in registry.plan() if r["path"] == path)
    assert row["groups"] == f"{int(round(fraction * 4))}/4 heads"


def test_keras_hub_encoder_heads_equal_oracle():
    keras_hub = pytest.importorskip("keras_hub")
    x = keras.Input((6, 16))
    model = keras.Model(x, keras_hub.layers.TransformerEncoder(32, 4, name="enc")(x), name="bert_block")
    path = "enc/self_attention_layer/attention_output/kernel"
    w = np.asarray(next(v for v in model.variables if v.path == path))
    assert w.shape == (4, 4, 16)
    registry = MaskRegistry(model)
    registry.freeze("*/attention_output/kernel", elements={"magnitude": 0.5, "groups": "heads"}, value="zero")
    np.testing.assert_array_equal(~registry.trainable_mask(path), oracle(w, 0.5, 0, "l1"))
    assert next(r for r in registry.plan() if r["path"] == path)["groups"] == "2/4 heads"


class GemmaLikeAttention(L.Layer):
    """EinsumDense projections as keras-hub's Gemma holds them: query kernel (heads, in, head_dim)."""

    def build(self, shape):
        self.query_dense = L.EinsumDense("btd,ndh->btnh", output_shape=(None, 3, 4), name="query")
        self.query_dense.build(shape)
        self.output_dense = L.EinsumDense("btnh,nhd->btd", output_shape=(None, shape[-1]), name="attention_output")
        self.output_dense.build((None, None, 3, 4))

    def call(self, x):
        return self.output_dense(self.query_dense(x))


def test_heads_axis_read_from_the_equation():
    model = keras.Sequential([keras.Input((5, 8)), GemmaLikeAttention(name="att")], name="net")
    layer = model.get_layer("att")
    axes = head_axes([layer])
    assert axes == {id(layer.query_dense.kernel): 0, id(layer.output_dense.kernel): 0}
    assert tuple(layer.query_dense.kernel.shape) == (3, 8, 4)
    registry = MaskRegistry(model)
    registry.freeze("att/query/kernel", elements={"magnitude": 1 / 3, "groups": "heads"}, value="zero")
    w = np.asarray(layer.query_dense.kernel)
    assert np.array_equal(~registry.trainable_mask("att/query/kernel"), oracle(w, 1 / 3, 0, "l1"))


def test_heads_refused_where_there_is_no_heads_axis():
    model = attention_model()
    registry = MaskRegistry(model)
    with pytest.raises(FreezeConfigError) as err:
        registry.freeze("mha/attention_output/bias", elements={"magnitude": 0.5, "groups": "heads"}, name="b")
    assert str(err.value) == (
        "rule 'b', variable 'mha/attention_output/bias': elements.groups: heads needs a variable with an attention "
        "heads axis (the query, key and value kernels and biases and the output kernel of a MultiHeadAttention); "
        "'mha/attention_output/bias' of shape (8,) has none. Select e.g. '*/attention_output/kernel'")


BACKBONES = [  # keras-hub decoders: (class, kwargs, query kernel path, its heads axis, output kernel path)
    ("LlamaBackbone", dict(vocabulary_size=10, num_layers=1, num_query_heads=4, hidden_dim=16, intermediate_dim=32,
                           num_key_value_heads=2), "transformer_layer_0/self_attention/query/kernel", 1,
     "transformer_layer_0/self_attention/attention_output/kernel"),
    ("GemmaBackbone", dict(vocabulary_size=10, num_layers=1, num_query_heads=4, num_key_value_heads=1, hidden_dim=16,
                           intermediate_dim=32, head_dim=4), "decoder_block_0/attention/query/kernel", 0,
     "decoder_block_0/attention/attention_output/kernel"),
]


@pytest.mark.parametrize("backbone, kwargs, query, axis, output", BACKBONES, ids=[b[0] for b in BACKBONES])
def test_keras_hub_decoder_heads_equal_oracle(backbone, kwargs, query, axis, output):
    """Llama's query kernel is (in, heads, head_dim), Gemma's (heads, in, head_dim): both read from the equation."""
    keras_hub = pytest.importorskip("keras_hub")
    model = getattr(keras_hub.models, backbone)(**kwargs)
    values = {v.path: np.asarray(v) for v in model.variables}
    registry = MaskRegistry(model)
    registry.freeze([query, output], elements={"magnitude": 0.5, "groups": "heads", "norm": "l2"}, value="zero")
    np.testing.assert_array_equal(~registry.trainable_mask(query), oracle(values[query], 0.5, axis, "l2"))
    np.testing.assert_array_equal(~registry.trainable_mask(output), oracle(values[output], 0.5, 0, "l2"))
    assert {r["path"]: r["groups"] for r in registry.plan() if "groups" in r} == {query: "2/4 heads",
                                                                                  output: "2/4 heads"}


def test_gradual_schedule_prunes_whole_heads():
    model = attention_model()
    registry = MaskRegistry(model)
    registry.freeze("mha/attention_output/kernel", elements={"magnitude": 0.75, "groups": "heads"}, value="zero",
                    name="gmp", update_every_n_steps=10,
                    schedule={"kind": "polynomial", "initial_sparsity": 0.0, "final_sparsity": 0.75,
                              "begin_step": 0, "end_step": 20})
    counts = []
    for step in (0, 10, 20):
        registry.update(step)
        frozen = ~registry.trainable_mask("mha/attention_output/kernel")
        per_head = frozen.reshape(4, -1)
        assert np.all(per_head.all(axis=1) | ~per_head.any(axis=1))  # every head wholly frozen or wholly free
        counts.append(int(per_head.all(axis=1).sum()))
    assert counts[0] == 0 and counts[-1] == 3 and counts == sorted(counts)
