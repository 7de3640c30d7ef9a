"""Sampled kernel gradients (``update="sampled"``): equal to the gathered dense gradient, never forming it."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import MaskRegistry, Trainer
from trainer.masks.sampled import CHUNK_ELEMENTS, Equation, kernel_coordinates, sampled_kernel_gradient
from trainer.masks.writeback import unravel

# The two-operand equations of the keras-hub Llama, Gemma and BERT (keras MultiHeadAttention) projections.
EQUATIONS = {
    "llama_query": ("bqm,muh->bquh", (2, 5, 12), (12, 4, 3)),
    "llama_key_value": ("bkm,mvh->bkvh", (2, 5, 12), (12, 2, 3)),
    "llama_output": ("bquh,uhm->bqm", (2, 5, 4, 3), (4, 3, 12)),
    "gemma_query": ("btd,ndh->btnh", (2, 5, 12), (4, 12, 3)),
    "gemma_key_value": ("bsd,kdh->bskh", (2, 5, 12), (2, 12, 3)),
    "gemma_output": ("btnh,nhd->btd", (2, 5, 4, 3), (4, 3, 12)),
    "gemma_ffn_in": ("btd,df->btf", (2, 5, 12), (12, 20)),
    "gemma_ffn_out": ("btf,fd->btd", (2, 5, 20), (20, 12)),
    "bert_query": ("abc,cde->abde", (2, 5, 12), (12, 4, 3)),
    "bert_output": ("abcd,cde->abe", (2, 5, 4, 3), (4, 3, 12)),
}


def einsum_case(equation, x_shape, kernel_shape):
    def build():
        out = equation.split("->")[1]
        x_letters = equation.split(",")[0]
        output_shape = [kernel_shape[equation.split(",")[1].split("-")[0].index(a)] if a not in x_letters
                        else x_shape[x_letters.index(a)] for a in out][1:]
        inp = keras.Input(x_shape[1:])
        layer = keras.layers.EinsumDense(equation, output_shape=output_shape, bias_axes=out[-1], name="proj")
        return keras.Model(inp, layer(inp), name="m"), "proj/kernel", x_shape
    return build


def dense_case(rank):
    def build():
        shape = (2, 5, 12)[:rank]
        inp = keras.Input(shape[1:])
        return keras.Model(inp, keras.layers.Dense(7, activation="tanh", name="fc")(inp), name="m"), "fc/kernel", shape
    return build


def reversible_case(tied, path):
    def build():
        from keras_hub.layers import ReversibleEmbedding

        inp = keras.Input((6,), dtype="int32")
        embedding = ReversibleEmbedding(11, 8, tie_weights=tied, name="tok")
        hidden = keras.layers.Dense(8, activation="tanh", name="mix")(embedding(inp))
        return keras.Model(inp, embedding(hidden, reverse=True), name="m"), path, (3, 6)
    return build


def embedding_case():
    inp = keras.Input((6,), dtype="int32")
    model = keras.Model(inp, keras.layers.Dense(3, name="head")(keras.layers.Embedding(11, 8, name="tok")(inp)))
    return model, "tok/embeddings", (3, 6)


CASES = {"dense_2d": dense_case(2), "dense_3d": dense_case(3), "embedding": embedding_case,
         "reversible_untied_reverse": reversible_case(False, "tok/reverse_embeddings"),
         "reversible_untied_lookup": reversible_case(False, "tok/embeddings"),
         "reversible_tied": reversible_case(True, "tok/embeddings"),
         **{name: einsum_case(*spec) for name, spec in EQUATIONS.items()}}


def inputs(model, shape):
    rng = np.random.default_rng(0)
    if model.inputs[0].dtype == "int32":
        return tf.constant(rng.integers(0, 11, shape), tf.int32)
    return tf.constant(rng.normal(size=shape), tf.float32)


def gradients(model, variables, x, weights, jit):
    @tf.function(jit_compile=jit)
    def run():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x) * weights)
        return tape.gradient(loss, variables)
    return run()


@pytest.mark.parametrize("method", ["pairs", "dense_blocks"])
@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_sampled_gradients_equal_the_gathered_dense_gradient(case, jit, method, monkeypatch):
    if method == "pairs":  # 30 % trainable: gathered pairs only when forced
        monkeypatch.setattr("trainer.masks.sampled.DENSE_DENSITY", 1.0)
    else:  # blocks of 3 rows, the last padded, wherever the kernel has over 3 rows
        monkeypatch.setattr("trainer.masks.sampled.BLOCK_ELEMENTS", 3 * 12)
    keras.utils.set_random_seed(0)
    model, path, shape = CASES[case]()
    twin = keras.Model.from_config(model.get_config())
    twin.set_weights(model.get_weights())
    registry = MaskRegistry(model, update="sampled")
    registry.freeze(path, elements={"random": 0.7, "seed": 0})
    assert [r["gradient"] for r in registry.plan() if r["path"] == path] == ["sampled"]
    variables = registry.trainable_variables()
    assert path not in [v.path for v in variables]  # the compact [k] variable stands in for it
    x = inputs(model, shape)
    weights = tf.constant(np.random.default_rng(1).normal(size=model.outputs[0].shape[1:]), tf.float32)
    got = gradients(model, variables, x, weights, jit)
    dense = gradients(twin, twin.trainable_variables, x, weights, False)
    mask = registry.trainable_mask(path)
    for variable, grad, ref in zip(variables, got, dense):
        grad, ref = tf.convert_to_tensor(grad).numpy(), tf.convert_to_tensor(ref).numpy()
        if tuple(grad.shape) != ref.shape:  # the sampled one: [k]
            ref = ref[mask]
        scale = float(np.max(np.abs(ref)))
        np.testing.assert_allclose(np.asarray(grad), ref, rtol=1e-6, atol=1e-6 * scale, err_msg=variable.path)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(twin(x)), rtol=1e-6, atol=1e-6)  # same forward


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("equation, kernel_shape", [(e, k) for e, _, k in EQUATIONS.values()]
                         + [("by,zy->bz", (11, 8)), ("tv,vh->th", (11, 8)), ("bt,d->btd", (6,))])
def test_kernel_coordinates_are_numpys_rows_and_columns_of_every_element(equation, kernel_shape, dtype):
    eq = Equation(equation)
    flat = np.arange(int(np.prod(kernel_shape)), dtype=dtype)
    rows, cols = kernel_coordinates(tf.constant(flat), kernel_shape, eq)
    coords, dims = dict(zip(eq.kernel, np.unravel_index(flat, kernel_shape))), dict(zip(eq.kernel, kernel_shape))

    def ravel(axes):
        return np.ravel_multi_index([coords[a] for a in axes], [dims[a] for a in axes]) if axes else 0 * flat

    assert rows.dtype == cols.dtype == tf.as_dtype(dtype)
    np.testing.assert_array_equal(rows.numpy(), ravel(eq.contracted))
    np.testing.assert_array_equal(cols.numpy(), ravel(eq.outputs))


@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 4), (5, 1, 3)])
def test_unravel_gives_numpys_coordinates(shape):
    flat = np.arange(int(np.prod(shape)), dtype=np.int64)
    for got, want in zip(unravel(tf.constant(flat), shape), np.unravel_index(flat, shape), strict=True):
        np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("mode", ["graph", "xla", "unknown_tokens"])
def test_chunks_over_the_trainable_elements_give_the_unchunked_sum(monkeypatch, mode):
    monkeypatch.setattr("trainer.masks.sampled.DENSE_DENSITY", 1.0)  # 20 of 54 trainable: pairs only when forced
    equation = Equation("btd,df->btf")
    rng = np.random.default_rng(0)
    x, dy = tf.constant(rng.normal(size=(3, 50, 6)), tf.float32), tf.constant(rng.normal(size=(3, 50, 9)), tf.float32)
    indices = tf.constant(rng.permutation(54)[:20].astype(np.int32))  # any order: the result keeps it
    whole = sampled_kernel_gradient(x, dy, indices, (6, 9), equation)
    dense = tf.einsum("btd,btf->df", x, dy).numpy().reshape(-1)[indices.numpy()]
    np.testing.assert_allclose(whole.numpy(), dense, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr("trainer.masks.sampled.CHUNK_ELEMENTS", 150 * 3)  # 150 tokens: 3 pairs a chunk, 7 chunks
    if mode == "unknown_tokens":
        run = tf.function(lambda x, dy: sampled_kernel_gradient(x, dy, indices, (6, 9), equation),
                          input_signature=[tf.TensorSpec((None, None, 6)), tf.TensorSpec((None, None, 9))])
    else:
        run = tf.function(lambda x, dy: sampled_kernel_gradient(x, dy, indices, (6, 9), equation),
                          jit_compile=mode == "xla")
    np.testing.assert_allclose(run(x, dy).numpy(), whole.numpy(), rtol=1e-6, atol=1e-6)
    assert CHUNK_ELEMENTS == 1 << 15


def test_every_kernel_chunked_over_its_pairs_shares_one_loop(monkeypatch):
    """TensorFlow keeps a graph and an executor per tf.while_loop (about 1.9 MiB): one shared loop, not one a kernel."""
    monkeypatch.setattr("trainer.masks.sampled.DENSE_DENSITY", 1.0)
    monkeypatch.setattr("trainer.masks.sampled.CHUNK_ELEMENTS", 10 * 4)  # 10 tokens: 4 pairs a chunk
    keras.utils.set_random_seed(0)
    inp = keras.Input((5, 24))
    out = keras.layers.Dense(16, name="a")(keras.layers.Dense(40, name="b")(keras.layers.Dense(30, name="c")(inp)))
    model = keras.Model(inp, out)
    registry = MaskRegistry(model, update="sampled")
    registry.freeze("*/kernel", elements={"random": 0.9, "seed": 0})
    variables = registry.trainable_variables()
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 5, 24)), tf.float32)

    @tf.function
    def grads():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x))
        return tape.gradient(loss, variables)

    loops = [op for op in walk(grads.get_concrete_function().graph, set()) if op.type in ("While", "StatelessWhile")]
    assert len(loops) == 1
    dense = keras.Model.from_config(model.get_config())
    dense.set_weights(model.get_weights())
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(dense(x))
    reference = tape.gradient(loss, dense.trainable_variables)  # the registry's order, a [k] where a kernel is
    assert len(reference) == len(variables) == 6
    for twin, grad, ref in zip(dense.trainable_variables, grads(), reference):
        ref = ref.numpy()
        if ref.shape != tuple(grad.shape):
            ref = ref[registry.trainable_mask(twin.path)]
        np.testing.assert_allclose(grad.numpy(), ref, rtol=1e-5, atol=1e-6, err_msg=twin.path)


def test_embedding_gradient_sums_repeated_ids_and_is_zero_for_rows_no_token_read():
    from trainer.masks.sampled import segment_gradient

    rng = np.random.default_rng(0)
    ids = np.array([4, 1, 4, 7, 1, 4, 0], np.int32)
    dy = rng.normal(size=(7, 5)).astype(np.float32)
    table = np.zeros((9, 5), np.float32)
    np.add.at(table, ids, dy)  # the dense gradient of the lookup
    flat = rng.permutation(45)[:30].astype(np.int32)
    rows, cols = tf.constant(flat // 5), tf.constant(flat % 5)
    for run in (segment_gradient, tf.function(segment_gradient, jit_compile=True)):
        got = run(tf.constant(ids), tf.constant(dy), rows, cols).numpy()
        np.testing.assert_allclose(got, table.reshape(-1)[flat], rtol=1e-6, atol=1e-6)
        assert np.all(got[np.isin(flat // 5, ids, invert=True)] == 0)


def walk(graph, seen):
    yield from graph.get_operations()
    for function in graph._functions.values():
        inner = getattr(function, "graph", None)
        if inner is not None and id(inner) not in seen:
            seen.add(id(inner))
            yield from walk(inner, seen)


def projection(layer):
    """A one-layer model (``Dense`` or ``EinsumDense`` on ``[2, 5, 24]``), 99 % of its kernel frozen, sampled."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((5, 24))
    proj = (keras.layers.Dense(40, name="proj") if layer == "dense"
            else keras.layers.EinsumDense("btd,ndh->btnh", output_shape=(5, 4, 10), name="proj"))
    model = keras.Model(inp, proj(inp), name="m")
    registry = MaskRegistry(model, update="sampled")
    registry.freeze("proj/kernel", elements={"random": 0.99, "seed": 0})
    return model, proj.kernel, registry


@pytest.mark.parametrize("method", ["pairs", "dense_blocks"])
@pytest.mark.parametrize("layer", ["dense", "einsum"])
def test_no_op_of_the_traced_step_but_the_variable_read_forms_a_kernel_shaped_tensor(layer, method, monkeypatch):
    if method == "pairs":
        monkeypatch.setattr("trainer.masks.sampled.DENSE_DENSITY", 1.0)
    else:  # the kernel is [24 rows, 40 columns]: blocks of 8 rows
        monkeypatch.setattr("trainer.masks.sampled.DENSE_DENSITY", 0.0)
        monkeypatch.setattr("trainer.masks.sampled.BLOCK_ELEMENTS", 8 * 40)
    model, kernel, registry = projection(layer)
    optimizer = keras.optimizers.AdamW(1e-3)
    registry.attach_optimizer(optimizer)
    variables = registry.trainable_variables()
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 5, 24)), tf.float32)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x)))
        registry.apply_gradients(optimizer, registry.update_gradients(tape.gradient(loss, variables), variables),
                                 variables)

    before = kernel.numpy().copy()
    graph = step.get_concrete_function().graph
    shaped = [(op.type, op.name) for op in walk(graph, set()) for t in op.outputs
              if t.shape.rank is not None and tuple(t.shape.as_list()) == tuple(kernel.shape)]
    assert [t for t, _ in shaped] == ["ReadVariableOp"], shaped
    step()
    mask = registry.trainable_mask(kernel.path)
    assert np.all(kernel.numpy()[mask] != before[mask]) and registry.exact()


def test_a_layer_it_cannot_serve_falls_back_to_the_dense_gradient_and_the_plan_says_why():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    out = keras.layers.Conv1D(4, 3, name="conv")(keras.layers.Reshape((6, 1))(inp))
    out = keras.layers.EinsumDense("...b,bc->...c", output_shape=5, name="ellipsis")(keras.layers.Flatten()(out))
    model = keras.Model(inp, out, name="m")
    registry = MaskRegistry(model, update="sampled")
    registry.freeze(["conv/kernel", "ellipsis/kernel"], elements={"random": 0.9, "seed": 0})
    rows = {r["path"]: r["gradient"] for r in registry.plan() if "gradient" in r}
    assert rows["conv/kernel"].startswith("dense (no served layer reads it")
    assert rows["ellipsis/kernel"] == "dense (equation '...b,bc->...c' has an ellipsis; write every axis)"
    assert {"conv/kernel", "ellipsis/kernel"} <= {v.path for v in registry.trainable_variables()}
    assert registry.update_modes() == {"conv/kernel": "compact", "ellipsis/kernel": "compact"}
    assert "(sampled gradient)" not in registry.describe()


@pytest.mark.parametrize("steps_per_execution", [1, 3])
def test_trainer_with_sampled_gradients_trains_like_compact_bit_for_bit(steps_per_execution):
    def fit(update):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh", name="fc1"),
                                  keras.layers.Dense(1, name="out")], name="mlp")
        registry = MaskRegistry(model, update=update)
        registry.freeze("*/kernel", elements={"random": 0.9, "seed": 0})
        rng = np.random.default_rng(1)
        x, y = rng.normal(size=(48, 8)).astype(np.float32), rng.normal(size=(48, 1)).astype(np.float32)
        trainer = Trainer(model, keras.optimizers.AdamW(1e-2), keras.losses.MeanSquaredError(), registry=registry,
                          steps_per_execution=steps_per_execution, jit_compile=False)
        trainer.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), epochs=2)
        assert registry.exact()
        return [v.numpy() for v in model.variables]

    compact, sampled = fit("compact"), fit("sampled")
    for a, b in zip(compact, sampled):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def causal_lm(arch):
    import keras_hub

    keras.utils.set_random_seed(0)
    common = dict(vocabulary_size=50, num_layers=1, num_query_heads=4, num_key_value_heads=2, hidden_dim=16,
                  intermediate_dim=24)
    backbone = (keras_hub.models.LlamaBackbone(**common) if arch == "llama"
                else keras_hub.models.GemmaBackbone(head_dim=4, **common))
    inputs = {"token_ids": keras.Input((8,), dtype="int32", name="token_ids"),
              "padding_mask": keras.Input((8,), dtype="int32", name="padding_mask")}
    return keras.Model(inputs, backbone.token_embedding(backbone(inputs), reverse=True), name=arch)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_a_keras_hub_decoder_samples_every_projection_and_matches_the_gathered_dense_gradient(arch):
    pytest.importorskip("keras_hub")
    rng = np.random.default_rng(0)
    x = {"token_ids": tf.constant(rng.integers(0, 50, (2, 8)), tf.int32), "padding_mask": tf.ones((2, 8), tf.int32)}
    y = tf.constant(rng.integers(0, 50, (2, 8)))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    out = {}
    for update in ("compact", "sampled"):
        model = causal_lm(arch)
        registry = MaskRegistry(model, update=update)
        registry.freeze("*", elements={"random": 0.9, "seed": 0})
        variables = registry.trainable_variables()
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x))
        out[update] = (registry, registry.update_gradients(tape.gradient(loss, variables), variables))
    registry = out["sampled"][0]
    sampled = {r["path"] for r in registry.plan() if r.get("gradient") == "sampled"}
    kernels = {r["path"] for r in registry.plan() if len(r["shape"]) >= 2}
    assert sampled == kernels and len(kernels) == (9 if arch == "llama" else 8)  # every projection, the embeddings
    assert len(out["compact"][1]) == len(out["sampled"][1])
    for a, b in zip(out["compact"][1], out["sampled"][1]):
        a, b = tf.convert_to_tensor(a).numpy(), tf.convert_to_tensor(b).numpy()
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6 * float(np.max(np.abs(a))))


def test_served_layers_keep_their_weights_paths_and_model_keras(tmp_path):
    keras.utils.set_random_seed(0)
    model, path, shape = CASES["llama_query"]()
    paths = [v.path for v in model.weights]
    registry = MaskRegistry(model, update="sampled")
    registry.freeze(path, elements={"random": 0.9, "seed": 0})
    optimizer = keras.optimizers.SGD(0.1)
    registry.attach_optimizer(optimizer)
    variables = registry.trainable_variables()
    x = inputs(model, shape)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(model(x)))
    registry.apply_gradients(optimizer, registry.update_gradients(tape.gradient(loss, variables), variables), variables)
    assert [v.path for v in model.weights] == paths and registry.exact()
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert [v.path for v in loaded.weights] == paths
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


@pytest.mark.parametrize("method", ["pairs", "dense_blocks"])
@pytest.mark.parametrize("layer", ["dense", "einsum"])
def test_the_sampled_gradient_reads_the_forward_only_once_the_output_gradient_exists(layer, method, monkeypatch):
    """TensorFlow's executor runs an op once its inputs exist: x's gathered rows must wait for dy (not be held)."""
    monkeypatch.setattr("trainer.masks.sampled.DENSE_DENSITY", 1.0 if method == "pairs" else 0.0)
    model, _, registry = projection(layer)
    variables = registry.trainable_variables()

    @tf.function
    def grads(x, seed):
        with tf.GradientTape() as tape:
            y = model(x)
        return tape.gradient(y, variables, output_gradients=seed)

    out_shape = (2, 5, 40) if layer == "dense" else (2, 5, 4, 10)
    graph = grads.get_concrete_function(tf.TensorSpec((2, 5, 24)), tf.TensorSpec(out_shape)).graph
    consumers = {}
    for op in graph.get_operations():
        for parent in [t.op for t in op.inputs] + list(op.control_inputs):
            consumers.setdefault(parent.name, []).append(op)
    after_seed, todo = set(), [graph.inputs[1].op]
    while todo:
        op = todo.pop()
        for child in consumers.get(op.name, []):
            if child.name not in after_seed:
                after_seed.add(child.name)
                todo.append(child)
    kinds = ("GatherV2", "FloorDiv", "FloorMod", "While", "StatelessWhile")
    gradient_ops = [op.name for op in graph.get_operations() if op.type in kinds]
    assert len(gradient_ops) >= 3 and [name for name in gradient_ops if name not in after_seed] == []
