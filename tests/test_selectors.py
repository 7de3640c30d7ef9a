"""Selectors, pinned values and variable selection: exact frozen masks from Python, YAML and the command line.

Every case of a table is run three ways (``registry.freeze(...)``, a YAML
config, ``+freeze.rules.<name>=...`` overrides composed by Hydra) and the
resolved frozen mask is compared with the expected one by exact equality.
"""

import keras
import numpy as np
import pytest

from tests.rule_forms import FORMS, precompose, registry_from
from trainer.masks import ElementContext, MaskRegistry, select_elements

# net/fc/kernel, shape (4, 3); magnitudes all distinct. Flat (row-major) index = 3 * row + column.
W = np.array([[0.1, -2.0, 0.3],
              [-0.05, 1.0, -0.7],
              [0.2, 0.9, -1.5],
              [3.0, -0.4, 0.6]], np.float32)
B = np.array([0.5, -0.25, 0.0], np.float32)  # net/fc/bias


def dense_net():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")], name="net")
    model.get_layer("fc").kernel.assign(W)
    model.get_layer("fc").bias.assign(B)
    return model


def conv_net():
    # cnet/conv/kernel: (2, 2, 2, 3) = (height, width, input channels, filters).
    model = keras.Sequential([keras.Input((3, 3, 2)), keras.layers.Conv2D(3, 2, name="conv")], name="cnet")
    kernel = model.get_layer("conv").kernel
    kernel.assign((np.arange(24) - 11.3).astype(np.float32).reshape(kernel.shape))
    return model


def embed_net():
    # enet/emb/embeddings: (6, 2), one row per token.
    return keras.Sequential([keras.Input((2,), dtype="int32"), keras.layers.Embedding(6, 2, name="emb")], name="enet")


MODELS = {"dense": dense_net, "conv": conv_net, "embed": embed_net}


def F(rows):
    """An expected frozen mask written as 0/1 rows (1 = frozen)."""
    return np.array(rows, dtype=bool)


def conv_mask(index):
    frozen = np.zeros((2, 2, 2, 3), dtype=bool)
    frozen[index] = True
    return frozen


MASK = [[1, 0, 1], [1, 1, 1], [0, 0, 1], [1, 1, 0]]  # a connectivity matrix: 1 = trainable
MASK_FROZEN = F([[0, 1, 0], [0, 0, 0], [1, 1, 0], [0, 0, 1]])

# (id, model, select, elements, expected frozen mask of the one selected variable)
CASES = [
    ("all", "dense", "fc/kernel", "all", np.ones((4, 3), bool)),
    ("all_mapping", "dense", "fc/kernel", {"all": True}, np.ones((4, 3), bool)),
    ("indices_flat", "dense", "fc/kernel", {"indices": [0, 5, 11]}, F([[1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 0, 1]])),
    ("indices_flat_one", "dense", "fc/kernel", {"indices": 7}, F([[0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]])),
    ("indices_multi", "dense", "fc/kernel", {"indices": [[0, 1], [3, 0]]},
     F([[0, 1, 0], [0, 0, 0], [0, 0, 0], [1, 0, 0]])),
    ("indices_flat_invert", "dense", "fc/kernel", {"indices": [0, 5, 11], "invert": True},
     F([[0, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 0]])),
    ("slice_columns", "dense", "fc/kernel", {"slice": "[:, :2]"}, F([[1, 1, 0]] * 4)),
    ("slice_rows", "dense", "fc/kernel", {"slice": "[1:3]"}, F([[0, 0, 0], [1, 1, 1], [1, 1, 1], [0, 0, 0]])),
    ("slice_step_negative", "dense", "fc/kernel", {"slice": "[::2, -1]"},
     F([[0, 0, 1], [0, 0, 0], [0, 0, 1], [0, 0, 0]])),
    ("slice_ellipsis", "dense", "fc/kernel", {"slice": "[..., 0]"}, F([[1, 0, 0]] * 4)),
    ("slice_no_brackets", "dense", "fc/kernel", {"slice": " 1:3 , 1 "},
     F([[0, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 0]])),
    ("slice_element", "dense", "fc/kernel", {"slice": "[3, 0]"}, F([[0, 0, 0], [0, 0, 0], [0, 0, 0], [1, 0, 0]])),
    ("slice_invert", "dense", "fc/kernel", {"slice": "[:, :2]", "invert": True}, F([[0, 0, 1]] * 4)),
    ("mask_inline", "dense", "fc/kernel", {"mask": MASK}, MASK_FROZEN),
    ("mask_inline_invert", "dense", "fc/kernel", {"mask": MASK, "invert": True}, ~MASK_FROZEN),
    ("mask_file_bool", "dense", "fc/kernel", {"mask_file": "{tmp}/mask_bool.npy"}, MASK_FROZEN),
    ("mask_file_01", "dense", "fc/kernel", {"mask_file": "{tmp}/mask_01.npy"}, MASK_FROZEN),
    # |W| sorted: 0.05 (1,0), 0.1 (0,0), 0.2 (2,0), 0.3 (0,2), 0.4 (3,1), 0.6 (3,2), 0.7, 0.9, 1.0, 1.5, 2.0, 3.0
    ("magnitude_quarter", "dense", "fc/kernel", {"magnitude": 0.25}, F([[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0]])),
    ("magnitude_half", "dense", "fc/kernel", {"magnitude": 0.5}, F([[1, 0, 1], [1, 0, 0], [1, 0, 0], [0, 1, 1]])),
    ("magnitude_zero", "dense", "fc/kernel", {"magnitude": 0.0}, np.zeros((4, 3), bool)),
    ("magnitude_invert", "dense", "fc/kernel", {"magnitude": 0.25, "invert": True},
     F([[0, 1, 1], [0, 1, 1], [0, 1, 1], [1, 1, 1]])),
    ("magnitude_weights_file", "dense", "fc/kernel", {"magnitude": 0.25, "weights_file": "{tmp}/weights.npz"},
     F([[1, 1, 1], [0, 0, 0], [0, 0, 0], [0, 0, 0]])),
    ("magnitude_threshold", "dense", "fc/kernel", {"magnitude_threshold": 0.35},
     F([[1, 0, 1], [1, 0, 0], [1, 0, 0], [0, 0, 0]])),
    ("magnitude_threshold_bias", "dense", "fc/bias", {"magnitude_threshold": 0.3}, F([0, 1, 1])),
    ("units", "dense", "fc/kernel", {"units": [0, 2]}, F([[1, 0, 1]] * 4)),
    ("units_bias", "dense", "fc/bias", {"units": [1]}, F([0, 1, 0])),
    ("units_invert", "dense", "fc/kernel", {"units": [0, 2], "invert": True}, F([[0, 1, 0]] * 4)),
    ("inputs", "dense", "fc/kernel", {"inputs": [1, 3]}, F([[0, 0, 0], [1, 1, 1], [0, 0, 0], [1, 1, 1]])),
    ("conv_units", "conv", "conv/kernel", {"units": [1]}, conv_mask((..., 1))),
    ("conv_inputs", "conv", "conv/kernel", {"inputs": [0]}, conv_mask((slice(None), slice(None), 0))),
    ("conv_slice", "conv", "conv/kernel", {"slice": "[0, :, :, 2]"}, conv_mask((0, slice(None), slice(None), 2))),
    ("conv_indices_multi", "conv", "conv/kernel", {"indices": [[1, 0, 1, 2], [0, 1, 0, 0]]},
     conv_mask(([1, 0], [0, 1], [1, 0], [2, 0]))),
    ("conv_indices_flat", "conv", "conv/kernel", {"indices": [0, 23]}, conv_mask(([0, 1], [0, 1], [0, 1], [0, 2]))),
    ("conv_magnitude", "conv", "conv/kernel", {"magnitude": 0.125},  # |flat k - 11.3|: 0.3 (11), 0.7 (12), 1.3 (10)
     conv_mask(np.unravel_index([11, 12, 10], (2, 2, 2, 3)))),
    ("embedding_rows", "embed", "emb/embeddings", {"rows": [0, 4]},
     F([[1, 1], [0, 0], [0, 0], [0, 0], [1, 1], [0, 0]])),
    ("embedding_rows_invert", "embed", "emb/embeddings", {"rows": [0, 4], "invert": True},
     F([[0, 0], [1, 1], [1, 1], [1, 1], [0, 0], [1, 1]])),
    ("embedding_inputs_are_rows", "embed", "emb/embeddings", {"inputs": [2]}, F([[0, 0]] * 2 + [[1, 1]] + [[0, 0]] * 3)),
]
FULL_PATH = {"dense": "net/", "conv": "cnet/", "embed": "enet/"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("selector_files")
    trainable = np.array(MASK, dtype=bool)
    np.save(tmp_path / "mask_bool.npy", trainable)
    np.save(tmp_path / "mask_01.npy", trainable.astype(np.int64))
    # Magnitudes from a file: 0..11 in row-major order, so the 3 smallest are row 0.
    np.savez(tmp_path / "weights.npz", **{"net/fc/kernel": np.arange(12, dtype=np.float32).reshape(4, 3)})
    return tmp_path


def _fill(spec, tmp):
    if isinstance(spec, dict):
        return {k: _fill(v, tmp) for k, v in spec.items()}
    return spec.replace("{tmp}", str(tmp)) if isinstance(spec, str) else spec


@pytest.fixture(scope="module", autouse=True)
def _compose_the_command_line_of_every_case_at_once(files):
    precompose([{"select": c[2], "elements": _fill(c[3], files)} for c in CASES])
    precompose([{"select": "fc/kernel", "elements": {"indices": [0, 4]}, **({} if v[1] is None else {"value": v[1]})}
                for v in VALUES])
    precompose([dict(c[1], value="current") for c in VARIABLE_CASES])


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case_id, model_name, select, elements, expected", CASES, ids=[c[0] for c in CASES])
def test_selector_freezes_exactly_the_expected_elements(files, form, case_id, model_name, select, elements, expected):
    model = MODELS[model_name]()
    path = FULL_PATH[model_name] + select
    before = {v.path: v.numpy().copy() for v in model.variables}
    registry = registry_from(form, model, {"r": {"select": select, "elements": _fill(elements, files)}})
    frozen = ~registry.trainable_mask(path)
    assert frozen.dtype == bool and frozen.shape == expected.shape
    np.testing.assert_array_equal(frozen, expected)
    assert registry.covered_paths() == [path]
    for other, mask in registry.trainable_masks().items():
        if other != path:
            assert mask.all(), other
    # value "current" (the default): nothing moved when the rule was applied.
    for v in model.variables:
        np.testing.assert_array_equal(v.numpy(), before[v.path])
    row = [r for r in registry.plan() if r["path"] == path][0]
    assert row["frozen_elements"] == int(expected.sum())
    assert row["rules"] == ["r"]


# ------------------------------------------------------------------ random
def big_net():
    return keras.Sequential([keras.Input((50,)), keras.layers.Dense(40, name="a"), keras.layers.Dense(40, name="b")],
                            name="big")


@pytest.mark.parametrize("fraction, count", [(0.0, 0), (0.1, 200), (0.25, 500), (0.9, 1800), (0.9999, 2000),
                                             (1.0, 2000)])
def test_random_freezes_exactly_round_fraction_times_size(fraction, count):
    registry = registry_from("python", big_net(), {"r": {"select": "a/kernel", "elements": {"random": fraction}}})
    assert int((~registry.trainable_mask("big/a/kernel")).sum()) == count


def test_random_is_the_same_from_python_yaml_and_cli_and_depends_on_seed_and_variable():
    rule = {"select": "*/kernel", "elements": {"random": 0.5, "seed": 7}}
    masks = [registry_from(form, big_net(), {"r": rule}).trainable_masks() for form in FORMS]
    for other in masks[1:]:
        for path in ("big/a/kernel", "big/b/kernel"):
            np.testing.assert_array_equal(other[path], masks[0][path])
    # A per-variable stream, not one mask copied into every variable.
    assert not np.array_equal(masks[0]["big/a/kernel"][:40], masks[0]["big/b/kernel"])
    seed8 = registry_from("python", big_net(), {"r": {"select": "a/kernel", "elements": {"random": 0.5, "seed": 8}}})
    assert not np.array_equal(seed8.trainable_mask("big/a/kernel"), masks[0]["big/a/kernel"])
    default = registry_from("python", big_net(), {"r": {"select": "a/kernel", "elements": {"random": 0.5}}})
    seed0 = registry_from("python", big_net(), {"r": {"select": "a/kernel", "elements": {"random": 0.5, "seed": 0}}})
    np.testing.assert_array_equal(default.trainable_mask("big/a/kernel"), seed0.trainable_mask("big/a/kernel"))
    inverted = registry_from("python", big_net(), {"r": {"select": "a/kernel",
                                                         "elements": {"random": 0.5, "seed": 7, "invert": True}}})
    np.testing.assert_array_equal(inverted.trainable_mask("big/a/kernel"), ~masks[0]["big/a/kernel"])


def test_selectors_are_pure_functions_of_the_context():
    ctx = ElementContext("net/fc/kernel", (4, 3), W, W)
    first = select_elements({"random": 0.5, "seed": 1}, ctx)
    np.testing.assert_array_equal(select_elements({"random": 0.5, "seed": 1}, ctx), first)
    # A gradual-pruning schedule replaces the magnitude fraction.
    np.testing.assert_array_equal(select_elements({"magnitude": 0.9}, ctx, fraction=0.25),
                                  F([[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0]]))


# ------------------------------------------------------------------ values
# (id, value spec, expected pinned values of the frozen elements 0 and 4 of net/fc/kernel). The kernel
# is W when the registry is built and W + 10 when the rule is applied: "current" is W + 10 there,
# "initial" is W (W[0, 0] = 0.1, W[1, 1] = 1.0).
MOVED = W + np.float32(10.0)
VALUES = [
    ("current", "current", MOVED.ravel()[[0, 4]]),
    ("default_is_current", None, MOVED.ravel()[[0, 4]]),
    ("initial", "initial", np.array([0.1, 1.0], np.float32)),
    ("zero", "zero", np.array([0.0, 0.0], np.float32)),
    ("float", 0.25, np.array([0.25, 0.25], np.float32)),
    ("negative_float", -1.5, np.array([-1.5, -1.5], np.float32)),
    ("int", 2, np.array([2.0, 2.0], np.float32)),
    ("numeric_string", "-0.5", np.array([-0.5, -0.5], np.float32)),
]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case_id, value, expected", VALUES, ids=[v[0] for v in VALUES])
def test_pinned_value(form, case_id, value, expected):
    model = dense_net()
    kernel = model.get_layer("fc").kernel
    registry = MaskRegistry(model, initial_values={kernel.path: W})  # initial is read lazily: W given
    kernel.assign(MOVED)  # the kernel moves after the build, as training would move it
    rule = {"select": "fc/kernel", "elements": {"indices": [0, 4]}}
    if value is not None:
        rule["value"] = value
    registry_from(form, model, {"r": rule}, registry=registry)
    flat = kernel.numpy().ravel()
    # Bit patterns, so that zero is +0.0 and not -0.0.
    np.testing.assert_array_equal(flat[[0, 4]].view(np.uint32), expected.view(np.uint32))
    np.testing.assert_array_equal(np.delete(flat, [0, 4]), np.delete(MOVED.ravel(), [0, 4]))
    assert registry.exact()
    assert registry.drift() == {"net/fc/kernel": 0.0}
    assert registry.plan()[0]["value"] == str(registry.rules[0].value)


# ------------------------------------------------------------ variable selection
def layered_net():
    """A Sequential ``net``: fc1 (Dense 4->3), bn (BatchNormalization), out (Dense 3->2)."""
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc1"),
                             keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(2, name="out")],
                            name="net")


K1, B1, K2, B2 = "net/fc1/kernel", "net/fc1/bias", "net/out/kernel", "net/out/bias"
G, BETA, MEAN, VAR = "net/bn/gamma", "net/bn/beta", "net/bn/moving_mean", "net/bn/moving_variance"

# (id, rule keywords, expected covered paths in model order)
VARIABLE_CASES = [
    ("full_path", {"select": "net/fc1/kernel"}, [K1]),
    ("trailing_subpath", {"select": "fc1/kernel"}, [K1]),
    ("last_part", {"select": "kernel"}, [K1, K2]),
    ("glob", {"select": "*/kernel"}, [K1, K2]),
    ("glob_full", {"select": "net/*/bias"}, [B1, B2]),
    ("glob_list", {"select": ["fc1/*", "out/bias"]}, [K1, B1, B2]),
    ("char_class", {"select": "fc[0-9]/kernel"}, [K1]),
    ("regex", {"select": "re:(fc1|out)/kernel"}, [K1, K2]),
    ("regex_full_path", {"select": "re:net/.*/bias"}, [B1, B2]),
    ("regex_and_glob", {"select": ["re:.*/beta", "out/*"]}, [BETA, K2, B2]),
    ("layer_type", {"layer_type": "Dense"}, [K1, B1, K2, B2]),
    ("layer_type_and_select", {"layer_type": "Dense", "select": "*/bias"}, [B1, B2]),
    ("layer_type_bn_skip", {"layer_type": "BatchNormalization", "non_trainable": "skip"}, [G, BETA]),
    ("layer_type_bn_pin", {"layer_type": "BatchNormalization", "non_trainable": "pin"}, [G, BETA, MEAN, VAR]),
    ("layer_types", {"layer_type": ["Dense", "BatchNormalization"], "exclude": "*/bias", "non_trainable": "skip"},
     [K1, G, BETA, K2]),
    ("exclude", {"select": "*", "exclude": ["bn/*"]}, [K1, B1, K2, B2]),
    ("exclude_glob", {"select": "*/kernel", "exclude": "out/*"}, [K1]),
    ("exclude_regex", {"select": "*/*", "exclude": ["re:.*moving.*", "re:bn/(gamma|beta)"]}, [K1, B1, K2, B2]),
    ("everything_skip", {"select": "*", "non_trainable": "skip"}, [K1, B1, G, BETA, K2, B2]),
]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case_id, rule, expected", VARIABLE_CASES, ids=[c[0] for c in VARIABLE_CASES])
def test_variable_selection(form, case_id, rule, expected):
    model = layered_net()
    registry = registry_from(form, model, {"r": dict(rule, value="current")})
    assert registry.covered_paths() == expected
    for path in expected:
        assert not registry.trainable_mask(path).any(), path
    planned = [row["path"] for row in registry.plan()]
    assert planned == [v.path for v in model.variables if v.trainable or v.path in expected]


def test_freeze_rule_from_every_form_resolves_to_one_rule():
    rule = {"select": ["fc1/*", "re:out/k.*"], "exclude": "*/bias", "elements": {"units": [1]}, "value": 0.5,
            "start_step": 2, "end_epoch": 4}
    described = {form: registry_from(form, layered_net(), {"r": rule}).rules[0] for form in FORMS}
    assert described["python"] == described["yaml"] == described["cli"]
    r = described["cli"]
    assert (r.select, r.exclude, r.elements, r.value) == (("fc1/*", "re:out/k.*"), ("*/bias",), {"units": [1]}, 0.5)
    assert (r.window.start_step, r.window.end_step, r.window.start_epoch, r.window.end_epoch) == (2, None, None, 4)


def test_mask_file_reads_a_runs_masks_npz_by_variable_path(tmp_path):
    """A run's masks.npz (trainable-masks keyed by variable path) freezes the same elements again."""
    import keras

    from trainer.masks import MaskRegistry
    from trainer.report import export_masks

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, name="fc1"),
                              keras.layers.Dense(3, name="out")], name="net")
    first = MaskRegistry(model)
    first.freeze("*/kernel", elements={"random": 0.6, "seed": 4}, value="zero")
    export_masks(first, str(tmp_path / "masks.npz"))
    again = MaskRegistry(model)
    again.freeze("*/kernel", elements={"mask_file": str(tmp_path / "masks.npz")}, value="zero")
    for path in ("net/fc1/kernel", "net/out/kernel"):
        np.testing.assert_array_equal(again.trainable_mask(path), first.trainable_mask(path))
        assert (~again.trainable_mask(path)).sum() == round(0.6 * np.prod(model.get_layer(path.split("/")[1]).kernel.shape))
