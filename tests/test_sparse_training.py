"""Prune-and-regrow freeze rules (SET, RigL) and layer-wise allocations, through the public API.

Exact checks: the trainable count of every variable never changes; dropped
elements are +0.0 and stay so until grown; grown elements start at +0.0 with
zero optimizer slots; RigL grows exactly the top-|g| candidates of the dense
gradient of the step before the update (NumPy oracle); nothing retraces; an
ERK rule keeps exactly the allocation's counts; SIGKILL + resume in the middle
of a drop-fraction schedule is bit-exact.
"""

import json
import os
import subprocess

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.util import tensor_util

from tests.conftest import REPO
from tests.test_regrow import oracle_rigl
from tests.test_resume import env, kill_and_resume
from trainer import MaskRegistry, Trainer
from trainer.callbacks import Callback
from trainer.masks import FreezeConfigError
from trainer.masks.allocation import allocate_densities
from trainer.summaries import TensorBoard

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


def mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((12,)), keras.layers.Dense(16, activation="relu", name="fc1"),
                             keras.layers.Dense(4, name="out")], name="net")


def data(n=160, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 12)).astype("float32"), rng.integers(0, 4, n)


class Recorder(Callback):
    """Masks, weights, slots and the compiled functions after every execution."""

    def __init__(self, trainer):
        self.records = {}
        self.trainer = trainer  # for its compiled functions, which hooks are not given

    def on_execution_end(self, state, step_before, step, logs):
        self.records[step] = {
            "masks": state.registry.trainable_masks(),
            "weights": {v.path: v.numpy().copy() for v in state.model.trainable_variables},
            "events": list(state.regrow_events),
            "functions": {k: (id(f), f.experimental_get_tracing_count())
                          for k, f in self.trainer.train_functions.items()},
        }


REGROW = {"drop_fraction": {"kind": "cosine", "initial": 0.5, "end_step": 40}, "update_every_n_steps": 5}


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_regrow_keeps_density_moves_masks_only_at_updates_and_never_retraces(method):
    model = mlp()
    registry = MaskRegistry(model)
    registry.freeze("*/kernel", elements={"random": 0.75, "seed": 1}, value="zero", name="sparse",
                    regrow=dict(REGROW, method=method))
    start = registry.trainable_masks()
    trainer = Trainer(model, keras.optimizers.Adam(0.02), LOSS, registry=registry, steps_per_execution=3)
    recorder = Recorder(trainer)
    x, y = data()
    trainer.fit(x, y, batch_size=16, epochs=5, callbacks=[recorder])  # 10 steps an epoch, 50 steps
    previous = start
    updates = []
    for step, record in sorted(recorder.records.items()):
        for path, mask in record["masks"].items():
            assert mask.sum() == start[path].sum(), (step, path)  # the trainable count never changes
            frozen = ~mask
            if "kernel" in path:  # every inactive element is +0.0 (dropped ones stay 0 until grown)
                np.testing.assert_array_equal(bits(record["weights"][path][frozen]), 0)
        moved = any(not np.array_equal(previous[p], record["masks"][p]) for p in start)
        assert moved == (step % 5 == 0 and step <= 40 and any(e["dropped"] for e in record["events"])), step
        updates += [e["step"] for e in record["events"]]
        previous = record["masks"]
    assert sorted(set(updates)) == [5, 10, 15, 20, 25, 30, 35, 40]
    functions = [r["functions"] for s, r in sorted(recorder.records.items())]
    final = functions[-1]
    assert set(final) == ({False, True} if method == "rigl" else {False})
    assert all(count == 1 for _, count in final.values())  # traced once each, whatever the masks
    assert all(f[False] == final[False] for f in functions)  # never rebuilt
    assert registry.exact()


def test_regrow_update_zeroes_values_and_slots_of_changed_elements_and_matches_the_oracle():
    model = mlp(3)
    registry = MaskRegistry(model)
    registry.freeze("fc1/kernel", elements={"random": 0.6, "seed": 2}, value="zero", name="sparse",
                    regrow={"method": "rigl", "drop_fraction": 0.4, "update_every_n_steps": 1})
    optimizer = keras.optimizers.Adam(0.05)
    registry.attach_optimizer(optimizer)
    variables = registry.trainable_variables()
    x, y = data(32, 1)
    for _ in range(3):  # a few real steps so that slots and weights are non-zero
        with tf.GradientTape() as tape:
            loss = LOSS(y, model(x, training=True))
        grads = registry.update_gradients(tape.gradient(loss, variables), variables)
        registry.apply_gradients(optimizer, grads, variables)
    kernel = model.get_layer("fc1").kernel
    path = kernel.path
    slots = [v for v in optimizer.variables if v.name.startswith("net_fc1_kernel_")]
    assert len(slots) == 2
    w0, m0 = kernel.numpy().copy(), registry.trainable_mask(path)
    s0 = [s.numpy().copy() for s in slots]
    g = np.random.default_rng(5).normal(size=w0.shape).astype(np.float32)
    events = registry.regrow(3, gradients={path: g})
    mask, dropped, grown = oracle_rigl(w0, m0, g, 0.4)
    mask, dropped, grown = (a.reshape(w0.shape) for a in (mask, dropped, grown))
    np.testing.assert_array_equal(registry.trainable_mask(path), mask)
    assert events == [{"step": 3, "path": path, "drop_fraction": 0.4, "dropped": int(dropped.sum()),
                       "grown": int(grown.sum()), "active": int(m0.sum())}]
    assert dropped.sum() == round(0.4 * m0.sum()) > 0
    changed = dropped | grown
    w1 = kernel.numpy()
    np.testing.assert_array_equal(bits(w1[changed]), 0)  # dropped and grown: +0.0
    np.testing.assert_array_equal(bits(w1[~changed]), bits(w0[~changed]))  # the rest keeps its bits
    for before, slot in zip(s0, slots):
        np.testing.assert_array_equal(bits(slot.numpy()[changed]), 0)
        np.testing.assert_array_equal(bits(slot.numpy()[~changed]), bits(before[~changed]))
    assert registry.regrow(3, gradients={path: g}) == []  # done for this step
    assert registry.exact()


def test_rigl_in_the_trainer_grows_by_the_dense_gradient_of_the_step_before_the_update():
    model = mlp(4)
    registry = MaskRegistry(model)
    registry.freeze("fc1/kernel", elements={"random": 0.7, "seed": 3}, value="zero", name="sparse",
                    regrow={"method": "rigl", "drop_fraction": 0.3, "update_every_n_steps": 5})
    x, y = data(80, 2)
    kernel = model.get_layer("fc1").kernel
    w0, m0 = kernel.numpy().copy(), registry.trainable_mask(kernel.path)
    with tf.GradientTape() as tape:  # lr 0: weights stay, so the 5th batch's gradient is known beforehand
        loss = LOSS(y[64:80], model(x[64:80], training=True))
    g = tape.gradient(loss, kernel).numpy()
    trainer = Trainer(model, keras.optimizers.SGD(0.0), LOSS, registry=registry, steps_per_execution=4)
    trainer.fit(x, y, batch_size=16, epochs=1, shuffle=False)  # 5 steps: the update at step 5 ends the run
    mask, dropped, grown = oracle_rigl(w0, m0, g, 0.3)
    np.testing.assert_array_equal(registry.trainable_mask(kernel.path), mask.reshape(w0.shape))
    assert grown.sum() == round(0.3 * m0.sum())


@pytest.mark.parametrize("selector", ["random", "magnitude"])
@pytest.mark.parametrize("allocation", ["uniform", "erdos_renyi", "erk"])
def test_an_allocation_keeps_exactly_the_counts_it_chooses(selector, allocation):
    model = keras.Sequential([keras.Input((30,)), keras.layers.Dense(20, name="a"), keras.layers.Dense(8, name="b"),
                              keras.layers.Dense(3, name="c")], name="m")
    registry = MaskRegistry(model)
    registry.freeze("*/kernel", elements={selector: 0.85, "allocation": allocation}, value="zero")
    kernels = [v for v in model.trainable_variables if v.path.endswith("kernel")]
    chosen = allocate_densities({v.path: tuple(v.shape) for v in kernels}, 0.15, distribution=allocation)
    assert {v.path: int(registry.trainable_mask(v.path).sum()) for v in kernels} == chosen.counts
    assert sum(chosen.counts.values()) == round(0.15 * sum(int(np.prod(v.shape)) for v in kernels))
    if selector == "magnitude":  # within each kernel, the largest |w| are kept
        for v in kernels:
            kept = np.abs(v.numpy())[registry.trainable_mask(v.path)]
            dropped = np.abs(v.numpy())[~registry.trainable_mask(v.path)]
            assert kept.size == 0 or dropped.size == 0 or dropped.max() <= kept.min()


def test_global_magnitude_ranking_keeps_the_largest_weights_over_all_kernels():
    model = keras.Sequential([keras.Input((30,)), keras.layers.Dense(20, name="a"), keras.layers.Dense(8, name="b")],
                             name="m")
    model.get_layer("b").kernel.assign(model.get_layer("b").kernel * 3.0)  # layers of different scales
    kernels = [v for v in model.trainable_variables if v.path.endswith("kernel")]
    flat = np.concatenate([np.abs(v.numpy()).reshape(-1) for v in kernels])
    threshold = np.sort(flat)[::-1][round(0.2 * flat.size) - 1]  # the smallest kept |w| (no ties in floats)
    registry = MaskRegistry(model)
    registry.freeze("*/kernel", elements={"magnitude": 0.8, "allocation": "global"}, value="zero")
    for v in kernels:
        np.testing.assert_array_equal(registry.trainable_mask(v.path), np.abs(v.numpy()) >= threshold)
    fractions = {row["path"]: row["frozen_fraction"] for row in registry.plan()}
    assert fractions["m/b/kernel"] < 0.8 < fractions["m/a/kernel"]  # global, not uniform


@pytest.mark.parametrize("shape,axis", [((8, 6), None), ((3, 3, 8, 5), None), ((8, 12), 1)])
def test_n_m_keeps_the_n_largest_of_every_m_along_the_input_axis(shape, axis):
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape[:-1] if len(shape) == 2 else (6, 6, shape[2]))
    layer = (keras.layers.Dense(shape[-1], name="k") if len(shape) == 2
             else keras.layers.Conv2D(shape[-1], shape[:2], name="k"))
    model = keras.Model(inputs, layer(inputs), name="n")
    elements = {"n_m": [2, 4]} if axis is None else {"n_m": [2, 4], "axis": axis}
    registry = MaskRegistry(model)
    registry.freeze("k/kernel", elements=elements, value="zero")
    w = np.abs(layer.kernel.numpy())
    along = (0 if len(shape) == 2 else 2) if axis is None else axis
    moved = np.moveaxis(w, along, 0)  # oracle: per block of 4 along the axis, the 2 largest
    expected = np.zeros(moved.shape, bool)
    for start in range(0, moved.shape[0], 4):
        block = moved[start:start + 4]
        ranks = (-block).argsort(axis=0).argsort(axis=0)
        expected[start:start + 4] = ranks < 2
    np.testing.assert_array_equal(registry.trainable_mask(layer.kernel.path), np.moveaxis(expected, 0, along))


ERRORS = [
    ({"value": "current", "regrow": {"method": "set", "drop_fraction": 0.3, "update_every_n_steps": 10}},
     "rule 'r': regrow drops elements to zero, so it needs value: zero, got value 'current'"),
    ({"start_step": 5, "regrow": {"method": "set", "drop_fraction": 0.3, "update_every_n_steps": 10}},
     "rule 'r': a regrow rule is active for the whole run and times its own updates; remove start/end bounds, "
     "update_every_n_steps and schedule (use regrow.update_every_n_steps and regrow.end_step)"),
    ({"regrow": {"method": "set", "drop_fraction": 1.0, "update_every_n_steps": 10}},
     "rule 'r': drop_fraction.value must be a number in [0, 1), got 1.0"),
    ({"regrow": {"method": "snip", "drop_fraction": 0.3, "update_every_n_steps": 10}},
     "rule 'r': regrow.method must be one of ['set', 'rigl', 'momentum'], got 'snip'"),
    ({"regrow": {"method": "rigl", "drop_fraction": 0.3}},
     "rule 'r': regrow is missing ['update_every_n_steps'] (e.g. {method: rigl, drop_fraction: 0.3, "
     "update_every_n_steps: 100})"),
    ({"regrow": {"method": "rigl", "drop_fraction": 0.3, "update_every_n_steps": 0}},
     "rule 'r': regrow.update_every_n_steps must be a positive integer, got 0"),
    ({"regrow": {"method": "rigl", "drop_fraction": 0.3, "update_every_n_steps": 5, "every": 3}},
     "rule 'r': unknown regrow key(s) ['every']; allowed: ['method', 'drop_fraction', 'update_every_n_steps', "
     "'end_step', 'seed', 'reset_slots', 'frozen_gradients']"),
    ({"elements": {"random": 0.9, "allocation": "er"}},
     "rule 'r': elements.allocation of a random selector must be one of ['uniform', 'erdos_renyi', 'erk'], "
     "got 'er'"),
    ({"elements": {"random": 0.9, "allocation": "global"}},
     "rule 'r': elements.allocation of a random selector must be one of ['uniform', 'erdos_renyi', 'erk'], "
     "got 'global'"),
    ({"elements": {"n_m": [2, 3]}},
     "rule 'r', variable 'net/out/kernel': N:M 2:3 needs axis 0 of 'net/out/kernel' (shape (16, 4)) to be a "
     "multiple of M=3, got length 16"),
    ({"elements": {"n_m": [5, 4]}}, "rule 'r': N:M sparsity needs integers 1 <= N <= M, got N=5, M=4"),
    ({"elements": {"n_m": 2}},
     "rule 'r': elements.n_m must be [N, M] (N of every M consecutive elements train, e.g. [2, 4]), got 2"),
    ({"elements": {"random": 1.0, "allocation": "erk"}},
     "rule 'r': elements.random with an allocation must be below 1 (the fraction frozen over all selected "
     "variables; some elements must stay trainable), got 1.0"),
    ({"elements": {"random": 0.9, "erk_power_scale": 0.5}},
     "rule 'r': elements.erk_power_scale needs allocation: erk, got allocation None"),
]


@pytest.mark.parametrize("options,message", ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_bad_regrow_and_allocation_rules_are_refused_with_one_line(options, message):
    registry = MaskRegistry(mlp())
    spec = dict({"elements": {"random": 0.9, "seed": 0}, "value": "zero"}, **options)
    with pytest.raises(FreezeConfigError) as err:
        registry.freeze("*/kernel", name="r", **spec)
    assert str(err.value) == message
    assert registry.rules == [] and all(m.all() for m in registry.trainable_masks().values())


def test_a_regrowing_variable_is_covered_by_that_rule_only_and_dense_under_auto():
    regrow = {"method": "set", "drop_fraction": 0.3, "update_every_n_steps": 10}
    registry = MaskRegistry(mlp())
    registry.freeze("*/kernel", elements={"random": 0.9}, value="zero", name="sparse", regrow=regrow)
    with pytest.raises(FreezeConfigError) as err:
        registry.freeze("out/kernel", elements={"indices": [0]}, value="zero", name="pin")
    assert str(err.value) == ("rules 'sparse' and 'pin' both cover ['net/out/kernel'], but 'sparse' regrows its "
                              "elements, which needs a variable to itself; narrow 'select' or add 'exclude'")
    assert registry.update_modes() == {"net/fc1/kernel": "dense", "net/out/kernel": "dense"}
    compact = MaskRegistry(mlp(), update="compact")
    compact.freeze("*/kernel", elements={"random": 0.9}, value="zero", name="sparse", regrow=regrow)
    assert compact.update_modes() == {"net/fc1/kernel": "compact", "net/out/kernel": "compact"}
    with pytest.raises(FreezeConfigError) as err:  # a rule that changes the count cannot be compact
        MaskRegistry(mlp(), update="compact").freeze("*/kernel", elements={"random": 0.9}, value="zero",
                                                     name="later", start_step=10)
    assert str(err.value) == ("rule 'later' changes how many elements it freezes during training (start/end "
                              "bounds or update_every_n_steps), which update 'compact' does not support; use "
                              "update 'auto' (dense where masks change) or 'dense'")


def test_tensorboard_shows_dropped_grown_density_per_update(tmp_path):
    model = mlp()
    registry = MaskRegistry(model)
    registry.freeze("*/kernel", elements={"random": 0.75, "seed": 1}, value="zero", name="sparse",
                    regrow=dict(REGROW, method="set"))
    trainer = Trainer(model, keras.optimizers.Adam(0.02), LOSS, registry=registry, steps_per_execution=10)
    board = TensorBoard(str(tmp_path), summary_every_n_steps=10, histogram_every_n_steps=20)
    x, y = data()
    trainer.fit(x, y, batch_size=16, epochs=3, callbacks=[board])
    board.close()
    acc = ea.EventAccumulator(str(tmp_path / "train"), size_guidance={ea.TENSORS: 0})
    acc.Reload()

    def scalars(tag):
        return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]

    path = "net/fc1/kernel"
    dropped = scalars(f"regrow/{path}/dropped")
    assert [s for s, _ in dropped] == [5, 10, 15, 20, 25, 30]
    assert scalars(f"regrow/{path}/grown") == dropped
    assert dropped[0][1] == round(0.5 * (1 + np.cos(np.pi * 5 / 40)) / 2 * 48)  # 25 % of 192 kept = 48
    assert {v for _, v in scalars(f"regrow/{path}/density")} == {0.25}
    assert [e.step for e in acc.Tensors(f"masks/{path}/trainable")] == [0, 20]  # start, then every 20 steps


@pytest.mark.slow
def test_sigkill_then_resume_in_the_middle_of_a_rigl_schedule_is_bit_exact(tmp_path):
    """In compact mode: the moved [k] indices, values and carried slots are what a resume must restore.

    This is also the suite's SIGKILL case for compact updates (it was a test of its own without regrowth,
    folded in here: a compact run with RigL restores all that one restored, and more)."""
    common = ["trainer.deterministic=true", "trainer.epochs=4", "trainer.checkpoint_every_n_steps=25",
              "freeze.update=compact",
              "trainer.keep_checkpoints=50", "optimizer=adamw", "freeze=random_90", "export.keras=false",
              "+freeze.rules.sparse.regrow={method:rigl,drop_fraction:{kind:cosine,initial:0.3,end_step:150},"
              "update_every_n_steps:20}", "freeze.rules.sparse.rescale_trainable=false"]
    a, b = kill_and_resume(tmp_path, common)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    indices = [k for k in a if k.startswith("registry/indices/")]
    assert len(indices) == 3 and not any(k.startswith("registry/masks/") for k in a)  # compact, 3 kernels
    # The compact values are saved once, where the checkpoint meets them first: as the optimizer's variables.
    optimized = sorted(a[k].size for k in a if k.startswith("optimizer/_trainable_variables/"))
    assert all(a[k].size in optimized for k in indices) and max(optimized) < 64 * 300 // 2  # no dense kernel
    report = json.loads((killed / "report.json").read_text())
    assert report["status"] == "completed" and report["frozen_exact"] is True
    assert report["history"] == json.loads((straight / "report.json").read_text())["history"]
    masks = np.load(killed / "masks.npz")
    off = [k for k in masks.files if k.endswith("kernel") and masks[k].mean() != pytest.approx(0.1, abs=1e-3)]
    assert not off  # every kernel still trains 10 % of its elements


def test_rigl_experiment_runs_through_the_cli_config_and_exports_sparse_weights(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONFIGS
    from trainer.config import register
    from trainer.run import run
    from trainer.sparse_export import load_sparse_weights

    register()
    monkeypatch.chdir(tmp_path)  # outside Hydra, run() writes to the current directory
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "+experiment=rigl_mlp", "data=digits", "trainer.epochs=2", "trainer.steps_per_execution=7",
            "trainer.jit_compile=false", "freeze.rules.sparse.regrow.drop_fraction.end_step=40",
            "freeze.rules.sparse.regrow.update_every_n_steps=10", "export.sparse=true", "export.keras=false"])
    report = run(cfg)
    assert report["status"] == "completed" and report["frozen_exact"] is True
    weights = dict(np.load(tmp_path / "weights.npz"))
    masks = np.load(tmp_path / "masks.npz")
    sparse = load_sparse_weights(str(tmp_path / "sparse_weights.npz"))
    assert sorted(sparse) == sorted(weights)
    for path in weights:
        np.testing.assert_array_equal(sparse[path].view(np.uint8), weights[path].view(np.uint8), err_msg=path)
    kernels = [p for p in weights if p.endswith("kernel")]
    counts = allocate_densities({p: weights[p].shape for p in kernels}, 0.1, distribution="erk").counts
    assert {p: int(masks[p].sum()) for p in kernels} == counts  # ERK's counts, kept through every update
    size = report["sparse_export"]
    assert size["nonzero"] <= sum(counts.values()) and size["elements"] == sum(weights[p].size for p in kernels)
    assert size["bytes"] == os.path.getsize(tmp_path / "sparse_weights.npz") < size["dense_bytes"] / 3


MIRRORED = '''
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import json, keras, numpy as np
from trainer import MaskRegistry, Trainer
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
rng = np.random.default_rng(0)
x, y = rng.normal(size=(256, 12)).astype("float32"), rng.integers(0, 4, 256)
out = {}
for method in ["rigl"]:  # SET's update is the same function with other grow scores
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(16, activation="relu", name="fc1"),
                                  keras.layers.Dense(4, name="out")], name="net")
        registry = MaskRegistry(model)
        registry.freeze("fc1/kernel", elements={"random": 0.75, "seed": 1}, value="zero", name="s",
                        regrow={"method": method, "drop_fraction": 0.5, "update_every_n_steps": 5})
        start = registry.trainable_mask("net/fc1/kernel")
        trainer = Trainer(model, keras.optimizers.Adam(0.02), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          registry=registry, strategy=strategy, steps_per_execution=3, jit_compile=True)
    trainer.fit(x, y, batch_size=32, epochs=3)
    copies = []
    for v in model.trainable_variables + trainer.optimizer.variables:
        local = [c.numpy().tobytes() for c in strategy.experimental_local_results(v.value)]
        copies += [v.path for c in local[1:] if c != local[0]]
    mask = registry.trainable_mask("net/fc1/kernel")
    out[method] = {"differing_copies": len(copies), "kept": [int(start.sum()), int(mask.sum())],
                   "moved": int((start != mask).sum()), "exact": registry.exact()}
print(json.dumps(out))
'''


@pytest.mark.slow
def test_regrow_under_mirrored_strategy_keeps_every_replica_copy_identical():
    proc = subprocess.run([os.sys.executable, "-c", MIRRORED], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for method in ("rigl",):
        assert result[method]["differing_copies"] == 0  # weights and slots equal on both replicas, bit for bit
        assert result[method]["kept"] == [48, 48] and result[method]["moved"] > 0 and result[method]["exact"]


OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.05),
    "momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(0.01),
}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("method", ["set", "rigl"])
def test_compact_regrowth_moves_indices_and_carries_slots_as_the_dense_update_does(method, optimizer):
    x, y = data(160, 3)
    runs = {}
    for mode in ("dense", "compact"):
        model = mlp(7)
        registry = MaskRegistry(model, update=mode)
        registry.freeze("fc1/kernel", elements={"random": 0.8, "seed": 4}, value="zero", name="sparse",
                        regrow={"method": method, "drop_fraction": 0.5, "update_every_n_steps": 5})
        trainer = Trainer(model, OPTIMIZERS[optimizer](), LOSS, registry=registry, steps_per_execution=3,
                          jit_compile=False)
        start = registry.trainable_mask("net/fc1/kernel")
        trainer.fit(x, y, batch_size=16, epochs=3, shuffle=False)  # 30 steps, 6 updates
        assert registry.update_modes()["net/fc1/kernel"] == mode
        mask = registry.trainable_mask("net/fc1/kernel")
        k = int(mask.sum())
        slots = [v.numpy() for v in trainer.optimizer.variables
                 if tuple(v.shape) == ((k,) if mode == "compact" else mask.shape) and v.name != "iteration"]
        if mode == "dense":
            slots = [s[mask] for s in slots]  # the trainable entries, in row-major order like the indices
        runs[mode] = (start, mask, model.get_layer("fc1").kernel.numpy(), slots, registry.exact())
    (start, dense_mask, dense_w, dense_slots, dense_exact), (_, compact_mask, compact_w, compact_slots, c_exact) = (
        runs["dense"], runs["compact"])
    assert dense_exact and c_exact
    np.testing.assert_array_equal(compact_mask, dense_mask)
    assert compact_mask.sum() == start.sum() and (compact_mask != start).any()  # moved, same count
    np.testing.assert_array_equal(bits(compact_w[~dense_mask]), 0)
    np.testing.assert_array_equal(bits(dense_w[~dense_mask]), 0)
    np.testing.assert_allclose(compact_w[dense_mask], dense_w[dense_mask], rtol=1e-6, atol=1e-7)
    assert len(compact_slots) == len(dense_slots) == {"sgd": 0, "momentum": 1, "adam": 2}[optimizer]
    for a, b in zip(compact_slots, dense_slots):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_sft_value_zero_prunes_at_initialisation_and_a_bad_value_is_named():
    from trainer.sft import SFTConfigError, apply_sft

    model = mlp(2)
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    registry = MaskRegistry(model)
    x, y = data(64, 4)
    kept = apply_sft({"method": "snip", "k": 0.1, "batches": 1, "select": ["*/kernel"], "value": "zero"},
                     model=model, registry=registry, x=x, y=y, batch_size=32)
    kernels = [v for v in model.trainable_variables if v.path.endswith("kernel")]
    assert kept == round(0.1 * sum(int(np.prod(v.shape)) for v in kernels))
    for v in kernels:
        mask = registry.trainable_mask(v.path)
        np.testing.assert_array_equal(bits(v.numpy()[~mask]), 0)  # pruned: +0.0
        np.testing.assert_array_equal(bits(v.numpy()[mask]), bits(before[v.path][mask]))  # kept: untouched
    with pytest.raises(SFTConfigError) as err:
        apply_sft({"method": "snip", "k": 0.1, "value": "initial"}, model=mlp(), registry=MaskRegistry(mlp()),
                  x=x, y=y)
    assert str(err.value) == ("sft.value must be one of ['current', 'zero'] (what the elements outside the top-k "
                              "are pinned to), got 'initial'")
