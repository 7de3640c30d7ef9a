"""Layer-wise densities (uniform, Erdős–Rényi, ERK) against the formulas written out independently."""

import math

import numpy as np
import pytest

from trainer.masks import FreezeConfigError
from trainer.masks.allocation import allocate_densities, kept_count

LENET = {"lenet/fc1/kernel": (784, 300), "lenet/fc2/kernel": (300, 100), "lenet/fc3/kernel": (100, 10)}
CONVNET = {"c1/kernel": (3, 3, 3, 16), "c2/kernel": (3, 3, 16, 32), "fc/kernel": (512, 10), "fc/bias": (10,)}


def oracle(shapes, density, raw):
    """Densities from ``eps * raw`` with the largest-raw layers made dense one group at a time.

    Tries dense sets of growing size (all layers whose raw probability is at
    least a threshold) and returns the first for which every other layer's
    density is at most 1.
    """
    sizes = {p: math.prod(s) for p, s in shapes.items()}
    total = sum(sizes.values())
    for threshold in [math.inf] + sorted(set(raw.values()), reverse=True):
        dense = {p for p in shapes if raw[p] >= threshold}
        rest = [p for p in shapes if p not in dense]
        eps = (density * total - sum(sizes[p] for p in dense)) / sum(raw[p] * sizes[p] for p in rest)
        if all(eps * raw[p] <= 1 for p in rest):
            return {p: 1.0 if p in dense else eps * raw[p] for p in shapes}
    raise AssertionError("no valid eps")


def erk_raw(shapes, power=1.0):
    return {p: (sum(s) / math.prod(s)) ** power for p, s in shapes.items()}


def er_raw(shapes):
    return {p: (s[-2] + s[-1]) / (s[-2] * s[-1]) for p, s in shapes.items()}


def test_erk_on_lenet_at_ten_percent_is_the_closed_form():
    # By hand: fc3 (raw 0.11) would get 1.84 > 1 and is dense; eps = (26620 - 1000) / (1084 + 400).
    a = allocate_densities(LENET, 0.1, distribution="erk")
    eps = (0.1 * 266200 - 1000) / (1084 + 400)
    assert a.dense == ("lenet/fc3/kernel",)
    assert a.densities["lenet/fc3/kernel"] == 1.0
    assert a.densities["lenet/fc1/kernel"] == pytest.approx(eps * 1084 / 235200, rel=1e-12)
    assert a.densities["lenet/fc2/kernel"] == pytest.approx(eps * 400 / 30000, rel=1e-12)
    assert a.counts == {"lenet/fc1/kernel": 18714, "lenet/fc2/kernel": 6906, "lenet/fc3/kernel": 1000}
    assert a.kept == 26620 and a.total == 266200
    assert a.lines() == [
        "lenet/fc1/kernel: density 0.07957 (18714 of 235200 kept)",
        "lenet/fc2/kernel: density 0.2302 (6906 of 30000 kept)",
        "lenet/fc3/kernel: density 1 (1000 of 1000 kept), dense (erk density capped at 1)",
    ]


@pytest.mark.parametrize("density", [0.5, 0.1, 0.05, 0.02, 0.01, 0.003])
@pytest.mark.parametrize("shapes", [LENET, CONVNET], ids=["lenet", "convnet"])
def test_erk_densities_equal_the_formula(shapes, density):
    a = allocate_densities(shapes, density, distribution="erk")
    expected = oracle(shapes, density, erk_raw(shapes))
    assert a.densities == pytest.approx(expected, rel=1e-12)
    assert a.dense == tuple(p for p in shapes if expected[p] == 1.0)


@pytest.mark.parametrize("density", [0.1, 0.02])
def test_erk_power_scale_is_applied_to_the_ratio(density):
    a = allocate_densities(CONVNET, density, distribution="erk", erk_power_scale=0.5)
    assert a.densities == pytest.approx(oracle(CONVNET, density, erk_raw(CONVNET, 0.5)), rel=1e-12)


@pytest.mark.parametrize("density", [0.1, 0.02, 0.01])
def test_erdos_renyi_uses_the_last_two_axes_only(density):
    shapes = {p: s for p, s in CONVNET.items() if len(s) >= 2}
    a = allocate_densities(shapes, density, distribution="erdos_renyi")
    assert a.densities == pytest.approx(oracle(shapes, density, er_raw(shapes)), rel=1e-12)
    assert er_raw(shapes)["c2/kernel"] == 48 / 512  # not ERK's 54 / 4608


def test_uniform_gives_every_variable_the_global_density():
    a = allocate_densities(LENET, 0.05, distribution="uniform")
    assert a.densities == {p: 0.05 for p in LENET}
    assert a.dense == ()
    assert a.counts == {"lenet/fc1/kernel": 11760, "lenet/fc2/kernel": 1500, "lenet/fc3/kernel": 50}


def test_density_one_makes_everything_dense():
    a = allocate_densities(CONVNET, 1.0, distribution="erk")
    assert a.densities == {p: 1.0 for p in CONVNET} and a.dense == tuple(CONVNET)
    assert a.counts == a.sizes


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_counts_add_up_to_the_rounded_global_count(distribution):
    rng = np.random.default_rng(0)
    for _ in range(40):
        shapes = {f"v{i}": tuple(int(d) for d in rng.integers(1, 40, size=rng.integers(1, 4))) for i in range(5)}
        total = sum(math.prod(s) for s in shapes.values())
        density = float(rng.uniform(1.0 / total, 1.0))
        a = allocate_densities(shapes, density, distribution=distribution)
        assert sum(a.counts.values()) == round(density * total) == kept_count(density, total)
        for p in shapes:
            exact = a.densities[p] * a.sizes[p]
            assert math.floor(exact + 1e-9) <= a.counts[p] <= math.ceil(exact - 1e-9)
            assert round(a.kept_densities[p] * a.sizes[p]) == a.counts[p]


def test_remainders_go_to_the_largest_fractional_parts_then_path_order():
    # 0.5 of 3 + 3 + 3 = 4.5 -> round half to even = 4; each layer 1.5: floors 1+1+1, one more to the first path.
    a = allocate_densities({"b": (3,), "a": (3,), "c": (3,)}, 0.5, distribution="uniform")
    assert a.counts == {"b": 1, "a": 2, "c": 1}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(density=0.0), "density must be a number in (0, 1] (fraction of elements kept), got 0.0"),
        (dict(density=1.5), "density must be a number in (0, 1] (fraction of elements kept), got 1.5"),
        (dict(density=True), "density must be a number in (0, 1] (fraction of elements kept), got True"),
        (dict(density="0.1"), "density must be a number in (0, 1] (fraction of elements kept), got '0.1'"),
        (dict(density=0.1, distribution="ERK"), "distribution must be one of ['uniform', 'erdos_renyi', 'erk'], got 'ERK'"),
        (dict(density=0.1, erk_power_scale=0), "erk_power_scale must be a positive number (1 in RigL), got 0"),
        (
            dict(density=0.1, distribution="erdos_renyi"),
            "distribution 'erdos_renyi' needs variables of rank >= 2 (fan-in and fan-out are the last two axes); "
            "'fc/bias' has shape (10,); use 'erk' or 'uniform', or leave it out",
        ),
        (dict(density=1e-7), "density 1e-07 keeps no element of 10170 (round(1e-07 * 10170) = 0); "
                             "use a density above 4.92e-05"),
    ],
)
def test_bad_input_is_refused_with_one_line(kwargs, message):
    with pytest.raises(FreezeConfigError) as info:
        allocate_densities(CONVNET, **kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "shapes, message",
    [
        ({}, "shapes must be a non-empty mapping of variable path to shape, got {}"),
        ({"a": (3, 0)}, "shape of 'a' must be a sequence of positive integers, got (3, 0)"),
        ({"a": 3}, "shape of 'a' must be a sequence of positive integers, got 3"),
        ({"a": ()}, "distribution 'erk' needs variables of rank >= 1; 'a' is a scalar"),
    ],
)
def test_bad_shapes_are_refused(shapes, message):
    with pytest.raises(FreezeConfigError) as info:
        allocate_densities(shapes, 0.5)
    assert str(info.value) == message
