"""The plan: pins are bit patterns, constants fit their dtype, variables are keyed by path end to end."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import MaskRegistry
from trainer.masks import FreezeConfigError
from trainer.masks.plan import Planner, RuleState
from trainer.masks.rules import FreezeRule


def net(name="net", first="fc"):
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, name=first), keras.layers.Dense(3, name="out")],
                            name=name)


@pytest.mark.parametrize("update", ["dense", "compact"])
def test_a_negative_zero_pin_stays_negative_zero(update):
    keras.utils.set_random_seed(0)
    model = net()
    registry = MaskRegistry(model, update=update)
    registry.freeze("fc/kernel", elements={"random": 0.9, "seed": 0}, value=-0.0)
    kernel = model.get_layer("fc").kernel
    frozen = ~registry.trainable_mask(kernel.path)
    optimizer = keras.optimizers.AdamW(0.1, weight_decay=0.5)
    registry.attach_optimizer(optimizer)
    variables = registry.trainable_variables()
    x = tf.constant(np.random.default_rng(0).normal(size=(4, 5)), tf.float32)
    for _ in range(5):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x) ** 2)
        registry.apply_gradients(optimizer, registry.update_gradients(tape.gradient(loss, variables), variables),
                                 variables)
    assert set(kernel.numpy()[frozen].view(np.uint32).tolist()) == {0x80000000}  # -0.0, not +0.0
    assert registry.exact() and registry.drift() == {kernel.path: 0.0}
    kernel.assign(np.where(frozen, np.float32(0.0), kernel.numpy()))  # +0.0 is another bit pattern
    assert not registry.exact()
    registry.reproject()
    assert registry.exact()


def test_a_constant_the_dtype_cannot_hold_is_refused_when_the_rule_is_added():
    model = net()
    registry = MaskRegistry(model)
    before = model.get_layer("fc").kernel.numpy().copy()
    with pytest.raises(FreezeConfigError) as err:
        registry.freeze("fc/kernel", value=1e39, name="huge")
    assert str(err.value) == ("rule 'huge', variable 'net/fc/kernel': value 1e+39 is not representable in float32 "
                              "(it would become inf); use a value within float32's range")
    assert "\n" not in str(err.value)
    assert registry.covered_paths() == [] and registry.rules == []
    np.testing.assert_array_equal(model.get_layer("fc").kernel.numpy(), before)


def test_paths_that_sanitize_alike_stay_distinct_through_a_checkpoint(tmp_path):
    def build(seed):
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, name="fc-1"),
                                  keras.layers.Dense(4, name="fc_1")], name="net")
        registry = MaskRegistry(model, update="dense")
        registry.freeze("*/kernel", elements={"magnitude": 0.5})  # captured: depends on the values
        return model, registry

    model, registry = build(1)
    assert registry.covered_paths() == ["net/fc-1/kernel", "net/fc_1/kernel"]
    masks = registry.trainable_masks()
    path = tf.train.Checkpoint(model=model, registry=registry).write(str(tmp_path / "ckpt"))
    keys = [k for k, _ in tf.train.list_variables(path) if "registry/masks" in k]
    assert len(keys) == 2, keys
    other, restored = build(2)  # other weights: magnitude would choose other elements
    assert not np.array_equal(restored.trainable_mask("net/fc-1/kernel"), masks["net/fc-1/kernel"])
    tf.train.Checkpoint(model=other, registry=restored).read(path).assert_existing_objects_matched()
    restored.after_restore()
    for p in ("net/fc-1/kernel", "net/fc_1/kernel"):
        np.testing.assert_array_equal(restored.trainable_mask(p), masks[p])
    assert restored.exact()


def test_the_planner_is_numpy_only_and_combines_rules_in_order():
    shapes = {"v": ((2, 3), np.dtype(np.float32))}
    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    planner = Planner(shapes=shapes, read=lambda p: value.copy(), initial=lambda p: value * 0 - 1)
    a = RuleState(FreezeRule.create("a", "v", {"indices": [0, 1]}, "zero"), ["v"])
    b = RuleState(FreezeRule.create("b", "v", {"indices": [[1, 2]]}, "initial"), ["v"])
    for state in (a, b):
        planner.activate(state, 0)
    plan = planner.combine([a, b], "v")
    np.testing.assert_array_equal(plan.frozen, [[True, True, False], [False, False, True]])
    np.testing.assert_array_equal(plan.target, [[0, 0, 2], [3, 4, -1]])
    assert plan.rules == ["a", "b"] and not plan.static_full and not plan.dynamic
    c = RuleState(FreezeRule.create("c", "v", {"indices": [1]}, 2.0), ["v"])
    planner.activate(c, 0)
    with pytest.raises(FreezeConfigError, match=r"^rules 'a' \(value zero\) and 'c' \(value 2.0\) pin 1 element"):
        planner.combine([a, b, c], "v")
