"""Rules that switch on and off (steps, epochs) and gradual magnitude pruning, through the Trainer.

After each compiled execution a callback records the weights, the masks, the
registry's ``structure_version`` and the Trainer's compiled function: frozen
elements are compared by exact equality, and the compiled function must be the
same object, traced once, across every switch.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.rule_forms import composed_rules
from trainer import MaskRegistry, Trainer
from trainer.callbacks import Callback
from trainer.masks import PolynomialSparsity, rules_from_config


def mlp(hidden=8):
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(hidden, activation="tanh", name="fc1"),
                             keras.layers.Dense(4, name="fc2")], name="mlp")


def dataset(n=24, batch=4, seed=0):
    """``n / batch`` steps per epoch (6 by default)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = rng.integers(0, 4, size=n).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


class Recorder(Callback):
    """After each execution: ``records[step] = {weights, frozen masks, version, train_fn, traces}``.

    ``records[s]`` holds the state after ``s`` steps; the masks in it are the
    ones step ``s - 1`` ran with (the registry is updated before each execution).
    """

    def __init__(self, trainer):
        self.records = {}
        self.trainer = trainer  # for its compiled functions, which hooks are not given

    def on_train_begin(self, state):
        self.records[state.step] = self._snapshot(state)

    def on_execution_end(self, state, step_before, step, logs):
        self.records[step] = self._snapshot(state)

    def _snapshot(self, state):
        registry = state.registry
        fn = self.trainer.train_functions.get(False)
        return {
            "weights": {v.path: v.numpy().copy() for v in state.model.variables},
            "frozen": {p: ~m for p, m in registry.trainable_masks().items()},
            "version": registry.structure_version,
            "train_fn": id(fn) if fn is not None else None,
            "traces": fn.experimental_get_tracing_count() if fn is not None else 0,
            "slots": {v.name: v.numpy().copy() for v in state.optimizer.variables if "_kernel_" in v.name},
        }


def fit(model, registry, steps, optimizer=None, epochs=10):
    trainer = Trainer(model, optimizer or keras.optimizers.Adam(0.01),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True), registry=registry,
                      steps_per_execution=1)  # a record after every step
    recorder = Recorder(trainer)
    trainer.fit(dataset(), epochs=epochs, max_steps=steps, callbacks=[recorder])
    return trainer, recorder.records


def assert_one_compiled_function(records):
    """The step was traced once, and neither re-made nor re-traced when rules switched."""
    after = [r for s, r in sorted(records.items()) if s > 0]
    assert len({r["train_fn"] for r in after}) == 1
    assert {r["traces"] for r in after} == {1}
    assert len({r["version"] for r in records.values()}) == 1


def test_step_window_freezes_then_unfreezes_without_retracing():
    keras.utils.set_random_seed(0)
    model = mlp()
    registry = MaskRegistry(model)
    registry.freeze("fc1/kernel", elements={"units": [0, 1]}, value="current", name="window", start_step=3, end_step=7)
    registry.freeze("fc2/kernel", elements={"indices": [0, 5]}, value="current", name="later", start_step=4)
    trainer, rec = fit(model, registry, steps=10)
    assert trainer.step == 10
    assert_one_compiled_function(rec)
    k1 = {s: r["weights"]["mlp/fc1/kernel"] for s, r in rec.items()}
    k2 = {s: r["weights"]["mlp/fc2/kernel"].ravel() for s, r in rec.items()}
    columns = np.zeros((6, 8), bool)
    columns[:, :2] = True
    for s in range(1, 11):
        window_on = 3 <= s - 1 < 7  # step s - 1 ran inside [start_step, end_step)
        np.testing.assert_array_equal(rec[s]["frozen"]["mlp/fc1/kernel"], columns & window_on)
        if window_on:
            np.testing.assert_array_equal(k1[s][:, :2], k1[3][:, :2])  # held at the value of step 3
        else:
            assert np.all(k1[s][:, :2] != k1[s - 1][:, :2]), s
        assert np.all(k1[s][:, 2:] != k1[s - 1][:, 2:]), s  # the other units always train
        later_on = s - 1 >= 4
        assert rec[s]["frozen"]["mlp/fc2/kernel"].ravel()[[0, 5]].tolist() == [later_on, later_on]
        if later_on:
            np.testing.assert_array_equal(k2[s][[0, 5]], k2[4][[0, 5]])  # frozen from step 4 on, at that value
        else:
            assert np.all(k2[s][[0, 5]] != k2[s - 1][[0, 5]]), s
    assert registry.exact()
    assert [r["frozen_elements"] for r in registry.plan()] == [0, 0, 2, 0]


def test_epoch_window_trains_the_head_first_then_unfreezes_the_backbone():
    keras.utils.set_random_seed(1)
    model = mlp()
    registry = MaskRegistry(model)
    registry.freeze("fc1/*", value="current", name="backbone", end_epoch=2)          # epochs 0-1: steps 0-11
    registry.freeze("fc2/bias", value="zero", name="bias_off", start_epoch=1, end_epoch=2)  # steps 6-11
    assert [v.path for v in registry.trainable_variables()] == [v.path for v in model.trainable_variables]
    start = {v.path: v.numpy().copy() for v in model.variables}
    trainer, rec = fit(model, registry, steps=16)
    assert_one_compiled_function(rec)
    for s in range(1, 17):
        w = rec[s]["weights"]
        backbone_on = s - 1 < 12
        for path in ("mlp/fc1/kernel", "mlp/fc1/bias"):
            assert rec[s]["frozen"][path].all() == backbone_on and rec[s]["frozen"][path].any() == backbone_on
            if backbone_on:
                np.testing.assert_array_equal(w[path], start[path])
            else:
                assert np.all(w[path] != rec[s - 1]["weights"][path]), (s, path)
        assert np.all(w["mlp/fc2/kernel"] != rec[s - 1]["weights"]["mlp/fc2/kernel"]), s  # the head always trains
        bias = w["mlp/fc2/bias"]
        if 6 <= s - 1 < 12:
            np.testing.assert_array_equal(bias.view(np.uint32), np.zeros(4, np.float32).view(np.uint32))
        elif s - 1 == 12:
            assert np.all(bias != 0.0)  # unfrozen: trains again from zero
    assert registry.plan()[0]["rules"] == ["backbone"]
    assert sum(r["frozen_elements"] for r in registry.plan()) == 0


def test_a_scheduled_rule_never_makes_a_variable_statically_frozen():
    model = mlp()
    registry = MaskRegistry(model)
    registry.freeze("fc1/*", value="current", name="backbone", end_epoch=3)  # every element, for a while
    registry.freeze("fc2/bias", value="current", name="static")
    # The scheduled rule keeps fc1 in the compiled step (its mask switches); the static rule drops fc2/bias.
    assert [v.path for v in registry.trainable_variables()] == ["mlp/fc1/kernel", "mlp/fc1/bias", "mlp/fc2/kernel"]
    assert sorted(registry.masks) == ["mlp/fc1/bias", "mlp/fc1/kernel"]  # keyed by variable path
    version = registry.structure_version
    assert registry.update(0, epoch=2) is False  # still active: nothing changes
    assert registry.update(18, epoch=3) is True
    assert registry.trainable_mask("mlp/fc1/kernel").all()
    assert registry.update(6, epoch=1) is True  # and back on
    assert not registry.trainable_mask("mlp/fc1/kernel").any()
    assert registry.structure_version == version
    assert [v.path for v in registry.trainable_variables()] == ["mlp/fc1/kernel", "mlp/fc1/bias", "mlp/fc2/kernel"]


def _slots(optimizer, prefix):
    return [v for v in optimizer.variables if v.name.startswith(prefix)]


@pytest.mark.parametrize("make_optimizer, names", [
    (lambda: keras.optimizers.SGD(0.1, momentum=0.9), ["momentum"]),
    (lambda: keras.optimizers.Adam(0.01), ["momentum", "velocity"]),
])
def test_slots_of_frozen_and_unfrozen_elements_start_from_zero(make_optimizer, names):
    model = mlp()
    optimizer = make_optimizer()
    registry = MaskRegistry(model)
    registry.freeze("fc1/kernel", elements={"units": [0]}, name="window", start_step=2, end_step=4)
    registry.attach_optimizer(optimizer)
    slots = _slots(optimizer, "mlp_fc1_kernel_")
    assert sorted(s.name.rsplit("_", 1)[1] for s in slots) == names
    column = np.zeros((6, 8), bool)
    column[:, 0] = True
    for slot in slots:
        slot.assign(np.full((6, 8), 0.5, np.float32))  # stale optimizer state
    registry.update(2)  # frozen: their slots are cleared so nothing stale moves them
    for slot in slots:
        np.testing.assert_array_equal(slot.numpy(), np.where(column, 0.0, 0.5).astype(np.float32))
        slot.assign(np.full((6, 8), 0.5, np.float32))  # e.g. restored from an older checkpoint
    registry.update(4)  # unfrozen: they start from zero
    for slot in slots:
        np.testing.assert_array_equal(slot.numpy(), np.where(column, 0.0, 0.5).astype(np.float32))
    for slot in _slots(optimizer, "mlp_fc2_kernel_"):
        assert not slot.numpy().any()  # untouched (never trained here, still zero)


def test_slots_stay_zero_while_frozen_in_the_trainer():
    keras.utils.set_random_seed(2)
    model = mlp()
    registry = MaskRegistry(model)
    registry.freeze("fc1/kernel", elements={"units": [0]}, name="window", start_step=3, end_step=6)
    trainer, rec = fit(model, registry, steps=8, optimizer=keras.optimizers.Adam(0.01))
    for s in range(1, 9):
        for name in ("mlp_fc1_kernel_momentum", "mlp_fc1_kernel_velocity"):
            slot = rec[s]["slots"][name]
            if 3 <= s - 1 < 6:
                assert not slot[:, 0].any(), (s, name)
            assert np.all(slot[:, 1:] != 0.0), (s, name)
        if s - 1 < 3 or s - 1 >= 6:
            assert np.all(rec[s]["slots"]["mlp_fc1_kernel_velocity"][:, 0] != 0.0), s


# --------------------------------------------------------- gradual magnitude pruning
def zhu_gupta(step, initial, final, begin, end, power=3.0):
    """s(t) = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3; s_i before t0, s_f after t1."""
    if step <= begin:
        return initial
    t = min(step, end)
    return final + (initial - final) * (1.0 - (t - begin) / (end - begin)) ** power


def test_polynomial_schedule_values():
    s = PolynomialSparsity(0.1, 0.8, 2, 10)
    assert [s(0), s(2), s(10), s(50)] == [0.1, 0.1, 0.8, 0.8]
    assert s(6) == pytest.approx(0.8 - 0.7 * 0.5 ** 3, abs=1e-15)
    assert PolynomialSparsity(0.0, 0.5, 0, 4, power=1.0)(1) == 0.125


def test_gradual_magnitude_pruning_reaches_the_final_sparsity_exactly():
    keras.utils.set_random_seed(3)
    model = mlp(hidden=32)  # kernels (6, 32) = 192 and (32, 4) = 128 elements
    registry = MaskRegistry(model)
    schedule = {"kind": "polynomial", "initial_sparsity": 0.1, "final_sparsity": 0.8, "begin_step": 2,
                "end_step": 10}
    registry.freeze("*/kernel", elements={"magnitude": 0.9}, value="zero", name="prune", update_every_n_steps=2,
                    schedule=schedule)
    trainer, rec = fit(model, registry, steps=14)
    assert_one_compiled_function(rec)
    sizes = {"mlp/fc1/kernel": 192, "mlp/fc2/kernel": 128}
    for s in range(1, 15):
        last_update = min(2 * ((s - 1) // 2), 10)  # the masks step s - 1 ran with
        for path, n in sizes.items():
            frozen = rec[s]["frozen"][path]
            expected = int(round(zhu_gupta(last_update, 0.1, 0.8, 2, 10) * n))
            assert int(frozen.sum()) == expected, (s, path)
            w = rec[s]["weights"][path]
            np.testing.assert_array_equal(w[frozen].view(np.uint32), np.zeros(expected, np.uint32))
            assert np.all(w[~frozen] != 0.0)
            assert np.all(frozen >= rec[s - 1]["frozen"][path])  # pruned elements stay pruned
    for path, n in sizes.items():
        assert int((~registry.trainable_mask(path)).sum()) == round(0.8 * n)
    assert [r["frozen_elements"] for r in registry.plan()] == [154, 0, 102, 0]  # round(0.8 * 192), round(0.8 * 128)
    assert registry.exact()


def test_schedules_from_the_command_line_and_presets():
    rules = rules_from_config(composed_rules(["freeze=[gradual_magnitude_90,head_first]",
                                              "freeze.rules.gradual_magnitude.schedule.end_step=50",
                                              "freeze.rules.head_first.end_epoch=2",
                                              "+freeze.rules.late={select:'fc2/*',start_step:7,end_step:9}"]))
    by_name = {r.name: r for r in rules}
    prune = by_name["gradual_magnitude"]
    assert prune.schedule == PolynomialSparsity(0.0, 0.9, 0, 50, 3.0)
    assert prune.update_every_n_steps == 100 and prune.dynamic
    head = by_name["head_first"]
    assert (head.select, head.exclude, head.window.end_epoch, head.non_trainable) == (("*",), ("out/*",), 2, "skip")
    late = by_name["late"]
    assert (late.window.start_step, late.window.end_step) == (7, 9)
    assert [late.window.active(s, 0) for s in (6, 7, 8, 9)] == [False, True, True, False]


def test_next_update_step_names_where_a_multi_step_execution_must_end():
    registry = MaskRegistry(mlp())
    assert registry.next_update_step(0) is None
    registry.freeze("fc1/kernel", name="window", start_step=3, end_step=7)
    registry.freeze("fc2/kernel", elements={"magnitude": 0.5}, value="zero", name="prune", update_every_n_steps=4,
                    schedule={"initial_sparsity": 0.0, "final_sparsity": 0.5, "begin_step": 0, "end_step": 8})
    ahead = {}
    for step in (0, 3, 4, 7, 8):  # as a loop does: update(step), then run up to the next change
        registry.update(step)
        ahead[step] = registry.next_update_step(step)
    assert ahead == {0: 3, 3: 4, 4: 7, 7: 8, 8: None}  # window at 3 and 7, pruning at 4 and 8 (its end)


def test_rules_switch_at_their_step_with_several_steps_per_execution():
    """An execution ends where a rule switches, so steps_per_execution > 1 keeps the named step."""
    import keras
    import numpy as np
    import tensorflow as tf

    from trainer import MaskRegistry, Trainer
    from trainer.callbacks import Callback

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="fc")], name="spe")
    registry = MaskRegistry(model)
    registry.freeze("fc/kernel", value="current", name="window", start_step=3, end_step=7)
    rng = np.random.default_rng(0)
    ds = tf.data.Dataset.from_tensor_slices((rng.normal(size=(80, 3)).astype(np.float32),
                                             rng.integers(0, 2, 80).astype(np.int32))).batch(8)
    trainer = Trainer(model, keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      registry=registry, steps_per_execution=5)
    kernel = model.get_layer("fc").kernel
    seen = {}

    class Record(Callback):
        def on_execution_end(self, state, step_before, step, logs):
            seen[step] = kernel.numpy().copy()

    trainer.fit(ds, epochs=1, callbacks=[Record()])
    assert sorted(seen) == [3, 7, 10]  # executions end at the rule's start and end steps
    np.testing.assert_array_equal(seen[7], seen[3])  # frozen for steps 3..6 exactly
    assert np.all(seen[10] != seen[7])  # trainable again from step 7
