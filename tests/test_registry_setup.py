"""Registry set-up at scale (issue 29): the digests and random selections are those of earlier versions, bit for bit
(checkpoints store both: the digests in the rule state, the selection as compact indices), and set-up makes no
full-size copy of a variable.

The expected strings below were computed by the code before set-up was vectorised (commit f458293); never
recompute them to make a test pass: a changed digest fails the audit of every checkpoint written before.
"""

import tracemalloc
import zlib

import keras
import ml_dtypes
import numpy as np
import pytest

from trainer import MaskRegistry
from trainer.masks.audit import digest
from trainer.masks.bitmask import PackedMask
from trainer.masks.elements import ElementContext
from trainer.masks.selectors import select_elements


def values(n, dtype=np.float32, seed=0):
    v = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    v[:3] = [-0.0, np.nan, np.inf]
    return v.astype(dtype)


def elements(n, fraction, seed=1):
    return np.random.default_rng(seed).random(n) < fraction


DIGESTS = [  # name, elements, fraction selected, expected digest
    ("every element", 10_000, 1.0, "5418e6ae1f9cac8e"),
    ("no element", 10_000, 0.0, "bade293e00000000"),
    ("99.9 %: the runs between the excluded", 1_000_000, 0.999, "c62c671359bd0994"),
    ("99.95 %, an odd size", 2_000_003, 0.9995, "836b15b55fe13b19"),
    ("half: chunks of a boolean selection", 3_000_000, 0.5, "ecf0918833973cc8"),
    ("0.1 %", 100_000, 0.001, "a03a8cf25da49e57"),
]


@pytest.mark.parametrize("name,n,fraction,expected", DIGESTS, ids=[c[0] for c in DIGESTS])
def test_a_digest_is_the_one_earlier_versions_wrote(name, n, fraction, expected):
    assert digest(values(n), elements(n, fraction)) == expected


def test_digests_of_bfloat16_two_axes_and_a_scalar_are_unchanged():
    assert digest(values(500_001, ml_dtypes.bfloat16), elements(500_001, 0.999)) == "71e70a8e78a6f19c"
    assert digest(values(600 * 700).reshape(600, 700), elements(600 * 700, 0.999).reshape(600, 700)) == (
        "7002ef88c00ae17f")
    assert digest(np.float32(1.5).reshape(()), np.array(True)) == "3fba6cad5cd8256f"


def test_a_digest_given_the_excluded_positions_is_the_same():
    value, chosen = values(1_000_000), elements(1_000_000, 0.999)
    assert digest(value, chosen, excluded=np.flatnonzero(~chosen)) == "c62c671359bd0994"


@pytest.mark.parametrize("size,fraction", [(1, 1.0), (7, 0.5), (8, 0.0), (1001, 0.999), (100_003, 0.9999)])
def test_a_packed_mask_counts_and_finds_its_false_entries_as_numpy_does(size, fraction):
    mask = elements(size, fraction).reshape(-1, 1)
    packed = PackedMask.pack(mask)
    np.testing.assert_array_equal(packed.false_positions(), np.flatnonzero(~mask))
    np.testing.assert_array_equal(packed.unpack(), mask)
    assert (packed.count, packed.all(), packed.shape) == (int(mask.sum()), bool(mask.all()), mask.shape)


SELECTIONS = [  # path, shape, frozen fraction, seed, (frozen count, CRC-32 of the packed frozen mask)
    ("m/a/kernel", (64, 32), 0.9, 0, (1843, "60745d3d")),
    ("m/b/kernel", (300, 700), 0.999, 3, (209790, "f2e115a7")),
    ("m/c/kernel", (1000, 500), 0.5, 1, (250000, "a551cf22")),
    ("m/d/bias", (10_000,), 0.001, 2, (10, "554fd6ea")),
    ("m/e/kernel", (2048, 256), 0.97, 0, (508559, "4f6a3f62")),
    ("m/f/kernel", (4096, 4), 0.03, 5, (492, "ea4e1ac7")),
]


@pytest.mark.parametrize("path,shape,fraction,seed,expected", SELECTIONS, ids=[c[0] for c in SELECTIONS])
def test_a_random_selection_is_the_one_earlier_versions_made(path, shape, fraction, seed, expected):
    frozen = select_elements({"random": fraction, "seed": seed}, ElementContext(path, shape, None, None))
    assert frozen.shape == shape and frozen.dtype == bool
    assert (int(frozen.sum()), f"{zlib.crc32(np.packbits(frozen.reshape(-1))):08x}") == expected


@pytest.mark.parametrize("path,shape,fraction,seed,expected", SELECTIONS, ids=[c[0] for c in SELECTIONS])
@pytest.mark.parametrize("invert", [False, True])
def test_a_packed_random_selection_is_the_packed_bool_one(path, shape, fraction, seed, expected, invert):
    spec, ctx = {"random": fraction, "seed": seed, "invert": invert}, ElementContext(path, shape, None, None)
    np.testing.assert_array_equal(select_elements(spec, ctx, packed=True),
                                  np.packbits(select_elements(spec, ctx).reshape(-1)))
    odd = ElementContext(path, (3, 333), None, None)  # 999 entries: the last byte's padding stays 0
    np.testing.assert_array_equal(select_elements(spec, odd, packed=True),
                                  np.packbits(select_elements(spec, odd).reshape(-1)))


def net():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(512, name="a"), keras.layers.Dense(256, name="b"),
                             keras.layers.Dense(8, name="c")], name="net")


@pytest.mark.parametrize("update", ["compact", "dense"])
def test_a_registry_pins_and_selects_what_earlier_versions_did(update):
    registry = MaskRegistry(net(), update=update)
    registry.freeze("c/kernel", elements={"random": 0.5, "seed": 1}, value="zero", name="half")
    registry.freeze("*", elements={"random": 0.999, "seed": 0}, name="most")
    assert registry.rule_state.digests == {
        "net/a/bias": "06c09a3fa0bcb4d2", "net/a/kernel": "d388f692b7c8820a", "net/b/bias": "ff6cab0befb5af2e",
        "net/b/kernel": "521caf8cf4db3ee5", "net/c/bias": "ff000000190a55ad", "net/c/kernel": "c1041dac265185e5"}
    masks = {p: f"{zlib.crc32(np.packbits(registry.trainable_mask(p).reshape(-1))):08x}"
             for p in registry.covered_paths()}
    assert masks == {"net/c/kernel": "fe3d4ced", "net/a/kernel": "e5c09189", "net/a/bias": "7c2c7eb3",
                     "net/b/kernel": "90434ad9", "net/b/bias": "190a55ad", "net/c/bias": "d202ef8d"}
    assert registry.exact()


def traced_peak(fn):
    """``(fn(), the peak bytes NumPy and Python allocated while it ran)``: deterministic, whatever the machine's load."""
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_digest_at_99_9_percent_copies_no_value():
    value, chosen = values(4_000_000), elements(4_000_000, 0.999)
    result, peak = traced_peak(lambda: digest(value, chosen))
    assert result == digest(value.copy(), chosen.copy())
    assert peak < value.nbytes / 4  # the packed mask (1/32 of the value) and the runs; the old selection was 4n


@pytest.mark.parametrize("update,bound", [("compact", 0.5), ("dense", 5.0)])
def test_set_up_makes_no_full_size_copy_of_a_variable(update, bound):
    """Set-up reads a 4M-element float32 kernel in place. What NumPy allocates at once, per element: for ``compact``
    the packed selection and the trainable positions (1/8 and a little), never a bool mask of the kernel's size;
    for ``dense`` also the frozen and trainable masks and TensorFlow's conversion of the one its mask variable is
    made from (measured: 0.27 compact, 3.1 to 4.1 dense). One copy of the value is 4 more; the code before this test
    peaked at 12.1 bytes per element either way."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2048,)), keras.layers.Dense(2048, name="big")], name="net")
    kernel = model.get_layer("big").kernel
    registry, peak = traced_peak(lambda: _set_up(model, update))
    size = int(np.prod(kernel.shape))
    assert registry.update_modes()[kernel.path] == update
    assert int((~registry.trainable_mask(kernel.path)).sum()) == round(0.999 * size)
    assert peak < bound * size, peak / size
    assert registry.exact()


def _set_up(model, update):
    registry = MaskRegistry(model, update=update)
    registry.freeze("*", elements={"random": 0.999, "seed": 0}, value="current")
    return registry
