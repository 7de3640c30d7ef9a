"""LLM-scale mechanics (issue 29): RigL refused with sampled gradients, the write-back outside the XLA step,
``steps_per_execution`` bit-exact, no retrace on a second ``fit``."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import MaskRegistry, Trainer
from trainer.masks import FreezeConfigError

VOCAB, TOKENS = 40, 6


def lm(dtype="float32"):
    """A dict-input token model (ids + padding mask, as keras-hub decoders take them): Embedding -> Dense -> Dense."""
    keras.utils.set_random_seed(0)
    ids = keras.Input((TOKENS,), dtype="int32", name="token_ids")
    mask = keras.Input((TOKENS,), dtype="int32", name="padding_mask")
    h = keras.layers.Embedding(VOCAB, 8, name="tok", dtype=dtype)(ids)
    h = h * keras.ops.cast(keras.ops.expand_dims(mask, -1), h.dtype)
    h = keras.layers.Dense(16, activation="tanh", name="fc", dtype=dtype)(h)
    out = keras.layers.Dense(VOCAB, name="head", dtype=dtype)(h)
    return keras.Model({"token_ids": ids, "padding_mask": mask}, out, name="lm")


def dataset(seed, batches=6):
    rng = np.random.default_rng(seed)
    n = 2 * batches
    x = {"token_ids": rng.integers(0, VOCAB, (n, TOKENS)).astype(np.int32),
         "padding_mask": np.ones((n, TOKENS), np.int32)}
    return tf.data.Dataset.from_tensor_slices((x, rng.integers(0, VOCAB, (n, TOKENS)).astype(np.int32))).batch(2)


def trainer_for(update, dtype, steps_per_execution, jit_compile=True):
    model = lm(dtype)
    registry = MaskRegistry(model, update=update)
    registry.freeze("*", elements={"random": 0.9, "seed": 0})
    trainer = Trainer(model, keras.optimizers.AdamW(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      registry=registry, steps_per_execution=steps_per_execution, jit_compile=jit_compile)
    return trainer


def bits(model):
    return {v.path: np.asarray(tf.bitcast(tf.convert_to_tensor(v.value), tf.uint16 if v.dtype == "bfloat16"
                                          else tf.uint32)) for v in model.weights}


def test_rigl_with_sampled_gradients_is_refused_by_name_at_admission_and_changes_nothing():
    model = lm()
    registry = MaskRegistry(model, update="sampled")
    with pytest.raises(FreezeConfigError) as info:
        registry.freeze("*/kernel", elements={"random": 0.9, "seed": 0}, value="zero", name="grow",
                        regrow={"method": "rigl", "drop_fraction": 0.3, "update_every_n_steps": 10})
    assert str(info.value) == ("rule 'grow': regrow method 'rigl' needs the dense gradient, which update 'sampled' "
                               "never forms; use method 'set' or update 'compact'")
    assert registry.rules == [] and registry.covered_paths() == [] and registry.update_modes() == {}


@pytest.mark.parametrize("update,dtype,jit_compile", [("sampled", "float32", True), ("compact", "bfloat16", True),
                                                      ("sampled", "float32", False)])
def test_three_steps_per_execution_give_the_bits_of_one(update, dtype, jit_compile):
    runs = {}
    for k in (1, 3):
        trainer = trainer_for(update, dtype, k, jit_compile)
        before = bits(trainer.model)
        trainer.fit(dataset(0), epochs=1, verbose=False)
        assert trainer.step == 6 and trainer.registry.exact()
        runs[k] = bits(trainer.model)
    for path, value in runs[1].items():
        np.testing.assert_array_equal(runs[3][path], value, err_msg=path)  # every step read the last update
        if path.endswith("kernel") or path.endswith("embeddings"):
            frozen = ~trainer.registry.trainable_mask(path)
            np.testing.assert_array_equal(value[frozen], before[path][frozen], err_msg=path)
            assert (value[~frozen] != before[path][~frozen]).mean() > 0.5, path  # trainable elements moved


def library_ops(graph_def):
    """``(ops inside XLA programs, ops outside)`` of a traced function and every function it calls."""
    functions = {f.signature.name: f for f in graph_def.library.function}

    def called(nodes):
        names = set()
        for node in nodes:
            names.add(node.op)
            for attr in node.attr.values():
                names.add(attr.func.name)
                names.update(f.name for f in attr.list.func)
        return {n for n in names if n in functions}

    def closure(roots):
        seen, todo = set(), list(roots)
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo += called(functions[name].node_def)
        return seen

    xla_roots = [n for n, f in functions.items() if f.attr["_XlaMustCompile"].b]
    inside = closure(xla_roots)
    outside = closure(called(graph_def.node)) - inside
    def ops(names):
        return {node.op for name in names for node in functions[name].node_def}

    return ops(inside), ops(outside) | {node.op for node in graph_def.node}


def test_the_xla_step_writes_no_model_variable_the_execution_scatters_after_it_and_a_second_fit_does_not_retrace():
    trainer = trainer_for("sampled", "float32", 3)
    trainer.fit(dataset(0), epochs=1, verbose=False)
    execution = trainer.train_functions[False]
    assert execution.experimental_get_tracing_count() == 1
    trainer.fit(dataset(1, batches=9), epochs=1, verbose=False)  # a new dataset of the same structure, longer
    assert trainer.step == 15 and trainer.registry.exact()
    assert execution.experimental_get_tracing_count() == 1 and trainer.train_functions[False] is execution
    concrete = execution.get_concrete_function(iter(dataset(2).repeat()), tf.constant(3, tf.int64))
    inside, outside = library_ops(concrete.graph.as_graph_def())
    assert "ResourceApplyAdam" in inside or "AssignVariableOp" in inside  # the optimizer runs in the XLA program
    assert not {op for op in inside if "Scatter" in op}  # no scatter into a model variable inside XLA
    assert "ResourceScatterNdUpdate" in outside  # the in-place write-back, by the TensorFlow runtime


def buffer_address(variable):
    """Where a read of ``variable`` lies in memory (a CPU tensor's NumPy view shares its buffer)."""
    return np.asarray(tf.convert_to_tensor(variable.value)).__array_interface__["data"][0]


@pytest.mark.parametrize("jit_compile", [True, False])
def test_after_the_in_place_write_back_reads_of_a_kernel_share_its_buffer_instead_of_copying_it(jit_compile):
    # A sparse write turns on TensorFlow's copy-on-read mode, where every read copies the whole variable (without
    # XLA: every kernel once more from the forward to the backward). The write-back turns it off again.
    trainer = trainer_for("sampled", "float32", 2, jit_compile)
    trainer.fit(dataset(0), epochs=1, verbose=False)
    for path in ("fc/kernel", "head/kernel"):
        kernel = next(v for v in trainer.model.weights if v.path == path)
        assert buffer_address(kernel) == buffer_address(kernel), path
        before = bits(trainer.model)[path]
        trainer.fit(dataset(1, batches=2), epochs=1, verbose=False)  # the next write-backs are still in place
        assert buffer_address(kernel) == buffer_address(kernel), path
        assert (bits(trainer.model)[path] != before).any() and trainer.registry.exact()
