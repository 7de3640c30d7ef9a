"""Group-wise magnitude selection (``elements: {magnitude, groups, norm, block}``) against a NumPy oracle.

The oracle scores each group with a Python loop over its elements and freezes the lowest-scoring groups
(ties by position); the registry's frozen mask must equal it exactly.
"""

import itertools

import keras
import numpy as np
import pytest

from trainer.masks import FreezeConfigError, FreezeRule, MaskRegistry


def oracle(w, fraction, groups, norm, block=None):
    """Frozen mask by loops: one group at a time, its norm, the smallest ``round(fraction * n)`` frozen."""
    w = np.asarray(w, np.float64)
    members = {}  # group id -> list of element indices
    for index in itertools.product(*[range(n) for n in w.shape]):
        if groups == "units":
            gid = index[-1]
        elif groups == "inputs":
            gid = index[0] if w.ndim == 2 else index[-2]
        else:
            gid = (index[-2] // block[0], index[-1] // block[1])
        members.setdefault(gid, []).append(index)
    ids = sorted(members)
    scores = []
    for gid in ids:
        values = [abs(w[i]) for i in members[gid]]
        scores.append(sum(values) if norm == "l1" else sum(v * v for v in values) ** 0.5)
    order = sorted(range(len(ids)), key=lambda k: (scores[k], k))
    frozen = np.zeros(w.shape, bool)
    for k in order[:int(round(fraction * len(ids)))]:
        for i in members[ids[k]]:
            frozen[i] = True
    return frozen


def net(kernel_shape):
    rng = np.random.default_rng(sum(kernel_shape))
    if len(kernel_shape) == 2:
        model = keras.Sequential([keras.Input((kernel_shape[0],)), keras.layers.Dense(kernel_shape[1], name="layer")],
                                    name="net")
    else:
        kh, kw, cin, cout = kernel_shape
        model = keras.Sequential([keras.Input((6, 6, cin)), keras.layers.Conv2D(cout, (kh, kw), name="layer")],
                                    name="net")
    kernel = model.get_layer("layer").kernel
    kernel.assign(rng.standard_normal(kernel.shape).astype(np.float32))
    return model, np.asarray(kernel)


CASES = [  # (id, kernel shape, fraction, elements options)
    ("dense-units-l1", (12, 10), 0.5, {"groups": "units", "norm": "l1"}),
    ("dense-units-l2", (12, 10), 0.7, {"groups": "units", "norm": "l2"}),
    ("dense-units-default-l1", (5, 8), 0.25, {"groups": "units"}),
    ("dense-inputs-l2", (12, 10), 0.5, {"groups": "inputs", "norm": "l2"}),
    ("dense-blocks", (8, 12), 0.5, {"groups": "blocks", "block": [2, 3], "norm": "l1"}),
    ("conv-channels-l1", (3, 3, 4, 8), 0.75, {"groups": "units", "norm": "l1"}),
    ("conv-channels-l2", (3, 3, 4, 8), 0.5, {"groups": "units", "norm": "l2"}),
    ("conv-inputs", (2, 2, 6, 3), 0.5, {"groups": "inputs"}),
    ("conv-blocks", (2, 2, 4, 6), 0.5, {"groups": "blocks", "block": [2, 2], "norm": "l2"}),
    ("none", (6, 4), 0.0, {"groups": "units"}),
    ("all", (6, 4), 1.0, {"groups": "units"}),
]


@pytest.mark.parametrize("shape, fraction, options", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_group_selection_equals_oracle(shape, fraction, options):
    model, w = net(shape)
    registry = MaskRegistry(model)
    registry.freeze("layer/kernel", elements={"magnitude": fraction, **options}, value="zero", name="prune")
    frozen = ~registry.trainable_mask("layer/kernel")
    expected = oracle(w, fraction, options["groups"], options.get("norm", "l1"), options.get("block"))
    np.testing.assert_array_equal(frozen, expected)
    assert np.all(np.asarray(model.get_layer("layer").kernel)[expected] == 0)
    assert np.array_equal(np.asarray(model.get_layer("layer").kernel)[~expected], w[~expected])


def test_ties_broken_by_position():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(4, name="layer")])
    model.get_layer("layer").kernel.assign(np.array([[1, -1, 2, 1], [1, 1, 0, -1]], np.float32))
    registry = MaskRegistry(model)  # L1 norms 2, 2, 2, 2: the first two units go
    registry.freeze("layer/kernel", elements={"magnitude": 0.5, "groups": "units"}, value="zero")
    np.testing.assert_array_equal(~registry.trainable_mask("layer/kernel"), [[1, 1, 0, 0], [1, 1, 0, 0]])


def test_plan_counts_whole_groups():
    model, _ = net((12, 10))
    registry = MaskRegistry(model)
    registry.freeze("layer/kernel", elements={"magnitude": 0.3, "groups": "units", "norm": "l2"}, value="zero",
                    name="prune")
    row = next(r for r in registry.plan() if r["path"].endswith("layer/kernel"))
    assert row["groups"] == "3/10 units" and row["frozen_elements"] == 36
    assert "groups" not in next(r for r in registry.plan() if r["path"].endswith("layer/bias"))
    assert registry.rules[0].describe() == "prune: layer/kernel magnitude=0.3 by units -> zero"


def test_gradual_schedule_prunes_whole_units():
    model, w = net((12, 10))
    registry = MaskRegistry(model)
    registry.freeze("layer/kernel", elements={"magnitude": 0.8, "groups": "units"}, value="zero", name="gmp",
                    update_every_n_steps=10,
                    schedule={"kind": "polynomial", "initial_sparsity": 0.0, "final_sparsity": 0.8,
                              "begin_step": 0, "end_step": 20})
    for step in (0, 10, 20):
        registry.update(step)
        frozen = ~registry.trainable_mask("layer/kernel")
        assert np.array_equal(frozen, np.broadcast_to(frozen[0], frozen.shape))  # whole columns only
    assert frozen[0].sum() == 8


REFUSALS = [
    ({"magnitude": 0.5, "groups": "channels"},
     "elements.groups must be one of ['units', 'inputs', 'blocks', 'heads'], got 'channels' (a conv kernel's "
     "output channels are its units, its last axis)"),
    ({"magnitude": 0.5, "groups": "units", "norm": "l3"}, "elements.norm must be one of ['l1', 'l2'], got 'l3'"),
    ({"magnitude": 0.5, "norm": "l2"},
     "elements.norm needs elements.groups (one of ['units', 'inputs', 'blocks', 'heads']), got norm: 'l2' without groups"),
    ({"magnitude": 0.5, "groups": "blocks"}, "elements.groups: blocks needs elements.block: [b_in, b_out], two "
     "positive integers, got None"),
    ({"magnitude": 0.5, "groups": "units", "block": [2, 2]},
     "elements.block needs elements.groups: blocks, got groups 'units'"),
    ({"magnitude": 0.5, "groups": "units", "allocation": "global"},
     "elements.groups cannot be combined with allocation: global (one ranking of single elements); use "
     "allocation: uniform, erdos_renyi or erk, or none"),
    ({"random": 0.5, "groups": "units"}, "unknown option(s) ['groups'] for selector 'random'"),
]


@pytest.mark.parametrize("elements, message", REFUSALS, ids=[str(i) for i in range(len(REFUSALS))])
def test_refusals(elements, message):
    with pytest.raises(FreezeConfigError) as err:
        FreezeRule.create("r", select="*/kernel", elements=elements, value="zero")
    assert str(err.value).startswith(f"rule 'r': {message}")


def test_refusals_against_a_variable():
    model, _ = net((6, 4))
    registry = MaskRegistry(model)
    with pytest.raises(FreezeConfigError) as err:
        registry.freeze("layer/kernel", elements={"magnitude": 0.5, "groups": "blocks", "block": [4, 4]}, name="b")
    assert str(err.value) == ("rule 'b', variable 'net/layer/kernel': elements.block [4, 4] does not tile variable "
                              "'net/layer/kernel' of shape (6, 4): its input and output axes (6, 4) must be multiples "
                              "of the block")
    with pytest.raises(FreezeConfigError) as err:
        registry.freeze("layer/bias", elements={"magnitude": 0.5, "groups": "inputs"}, name="i")
    assert str(err.value) == ("rule 'i', variable 'net/layer/bias': elements.groups: inputs needs a kernel with an "
                              "input axis; 'net/layer/bias' has shape (4,). Select only kernels (e.g. select: "
                              "'*/kernel') or use groups: units")
    with pytest.raises(FreezeConfigError) as err:
        registry.freeze("layer/kernel", elements={"magnitude": 0.5, "groups": "blocks", "block": [2, 2]},
                        value="zero", name="g",
                        regrow={"method": "set", "drop_fraction": 0.3, "update_every_n_steps": 10})
    assert str(err.value) == ("rule 'g': regrow keeps groups whole only for elements.groups ['units', 'inputs'] "
                              "with regrow.method ['set', 'rigl'], got groups 'blocks' and method 'set'; remove "
                              "regrow or groups")


def fan_in_oracle(w, k):
    """Per output unit (last axis), by a loop: its k largest |w| inputs (ties: the lower position) are kept."""
    flat = np.abs(np.asarray(w, np.float64)).reshape(-1, w.shape[-1])
    keep = np.zeros(flat.shape, bool)
    for o in range(flat.shape[1]):
        ranked = sorted(range(flat.shape[0]), key=lambda i: (-flat[i, o], i))
        keep[ranked[:k], o] = True
    return keep.reshape(w.shape)


@pytest.mark.parametrize("shape, k", [((12, 10), 3), ((12, 10), 12), ((3, 3, 4, 8), 5), ((5, 4), 1)])
def test_fan_in_equals_oracle(shape, k):
    model, w = net(shape)
    registry = MaskRegistry(model)
    registry.freeze("layer/kernel", elements={"fan_in": k}, value="zero", name="fan")
    trainable = registry.trainable_mask("layer/kernel")
    np.testing.assert_array_equal(trainable, fan_in_oracle(w, k))
    assert set(trainable.reshape(-1, shape[-1]).sum(axis=0).tolist()) == {k}


def test_fan_in_refusals():
    for value in (0, 2.5, True, "3"):
        with pytest.raises(FreezeConfigError) as err:
            FreezeRule.create("r", select="*/kernel", elements={"fan_in": value}, value="zero")
        assert str(err.value) == (f"rule 'r': elements.fan_in must be a positive integer (the inputs each output "
                                  f"unit keeps), got {value!r}")
    model, _ = net((6, 4))
    registry = MaskRegistry(model)
    with pytest.raises(FreezeConfigError) as err:
        registry.freeze("layer/kernel", elements={"fan_in": 7}, name="f")
    assert str(err.value) == ("rule 'f', variable 'net/layer/kernel': elements.fan_in 7 is more than the 6 inputs of "
                              "each unit of variable 'net/layer/kernel' of shape (6, 4); fan_in must lie in [1, 6]")
    with pytest.raises(FreezeConfigError) as err:
        registry.freeze("layer/kernel", elements={"fan_in": 2}, value="zero", name="g",
                        regrow={"method": "set", "drop_fraction": 0.3, "update_every_n_steps": 10})
    assert str(err.value) == ("rule 'g': regrow moves elements between units, so it cannot keep elements.fan_in "
                              "constant; remove regrow or fan_in")
