"""Bad freeze rules are refused before training, with a message naming the bad value and what to write instead.

Each case checks the message text: the bad value (or the variable it does not
fit) and the allowed alternatives. A refused rule leaves the registry and the
model exactly as they were.
"""

import pickle

import keras
import numpy as np
import pytest

from tests.rule_forms import registry_from
from trainer.masks import FreezeConfigError, MaskRegistry, rules_from_config

SELECTORS = "['all', 'indices', 'slice', 'mask', 'mask_file', 'random', 'magnitude', 'magnitude_threshold', " \
            "'units', 'inputs', 'rows', 'n_m', 'fan_in']"
RULE_KEYS = "['select', 'layer_type', 'exclude', 'elements', 'value', 'start_step', 'end_step', 'start_epoch', " \
            "'end_epoch', 'update_every_n_steps', 'schedule', 'non_trainable', 'rescale_trainable', 'regrow']"
PATHS = "net/fc/kernel, net/fc/bias, net/bn/gamma, net/bn/beta, net/bn/moving_mean, net/bn/moving_variance"
SCHEDULE = {"kind": "polynomial", "initial_sparsity": 0.0, "final_sparsity": 0.9, "begin_step": 0, "end_step": 10}


def net():
    """``net``: fc (Dense 5 -> 3, kernel (5, 3), 15 elements), bn (BatchNormalization)."""
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, name="fc"),
                             keras.layers.BatchNormalization(name="bn")], name="net")


@pytest.fixture
def bad_files(tmp_path):
    np.save(tmp_path / "wrong_shape.npy", np.ones((3, 5), bool))
    np.save(tmp_path / "not_01.npy", np.full((5, 3), 2, np.int64))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with open(tmp_path / "pickled.npy", "wb") as f:
        pickle.dump(np.ones((5, 3), bool), f)
    np.savez(tmp_path / "archive.npz", mask=np.ones((5, 3), bool))
    np.savez(tmp_path / "weights.npz", other=np.ones((5, 3), np.float32))
    np.savez(tmp_path / "nan_weights.npz", **{"net/fc/kernel": np.full((5, 3), np.nan, np.float32)})
    np.savez(tmp_path / "bool_weights.npz", **{"net/fc/kernel": np.ones((5, 3), bool)})
    np.save(tmp_path / "structured.npy", np.zeros((5, 3), dtype=[("a", "i4"), ("b", "f4")]))
    return tmp_path


# (id, rule keywords, fragments that must all appear in the message)
CASES = [
    # --- selecting variables
    ("glob_matches_nothing", {"select": "conv*/kernel"},
     ["rule 'r'", "select 'conv*/kernel' matches no variable", "the variable paths are: " + PATHS]),
    ("one_glob_of_a_list_matches_nothing", {"select": ["fc/kernel", "fc2/*"]},
     ["select 'fc2/*' matches no variable", PATHS]),
    ("bad_regex", {"select": "re:fc/(kernel"}, ["'re:fc/(kernel' is not a valid regular expression", "missing )"]),
    ("regex_matches_nothing", {"select": "re:kern"}, ["select 're:kern' matches no variable", PATHS]),
    ("select_not_a_string", {"select": 3}, ["select must be a string or a list of strings, got 3"]),
    ("empty_pattern", {"select": ""}, ["must be a non-empty string glob or 're:<regex>', got ''"]),
    ("no_select_no_layer_type", {}, ["rule 'r' needs 'select'", "'*/kernel'", "'layer_type'"]),
    ("layer_type_matches_nothing", {"layer_type": "Conv2D"},
     ["layer_type 'Conv2D' owns no variable", "layer types in the model: BatchNormalization, Dense, Layer, Model, "
      "Sequential"]),
    ("exclude_matches_nothing", {"select": "*/kernel", "exclude": "fc2/*"},
     ["exclude 'fc2/*' matches no variable", PATHS]),
    ("exclude_removes_everything", {"select": "fc/kernel", "exclude": "*/kernel"},
     ["rule 'r' selects no variable (select=['fc/kernel'], layer_type=[], exclude=['*/kernel'])", PATHS]),
    ("non_trainable_selected", {"select": "bn/*"},
     ["selects non-trainable variables ['net/bn/moving_mean', 'net/bn/moving_variance']",
      "non_trainable: skip", "non_trainable: pin"]),
    ("non_trainable_only_skipped", {"select": "re:.*moving.*", "non_trainable": "skip"},
     ["selects only non-trainable variables ['net/bn/moving_mean', 'net/bn/moving_variance']"]),
    ("non_trainable_policy", {"select": "fc/*", "non_trainable": "ignore"},
     ["non_trainable must be one of ['error', 'skip', 'pin'], got 'ignore'"]),
    # --- unknown keys and selectors
    ("unknown_rule_key", {"select": "fc/kernel", "elemnts": "all"}, ["unknown key(s) ['elemnts']", RULE_KEYS]),
    ("unknown_selector", {"select": "fc/kernel", "elements": {"rnd": 0.5}},
     ["exactly one selector of " + SELECTORS, "got keys ['rnd']"]),
    ("two_selectors", {"select": "fc/kernel", "elements": {"random": 0.5, "magnitude": 0.5}},
     ["exactly one selector of " + SELECTORS, "got keys ['magnitude', 'random']"]),
    ("unknown_selector_string", {"select": "fc/kernel", "elements": "everything"},
     ["elements must be 'all' or a mapping with one of " + SELECTORS, "got 'everything'"]),
    ("unknown_option", {"select": "fc/kernel", "elements": {"random": 0.5, "sed": 1}},
     ["unknown option(s) ['sed'] for selector 'random'", "allowed: ['allocation', 'erk_power_scale', 'invert', 'seed']"]),
    ("option_of_another_selector", {"select": "fc/kernel", "elements": {"indices": [1], "seed": 1}},
     ["unknown option(s) ['seed'] for selector 'indices'", "allowed: ['invert']"]),
    ("invert_not_bool", {"select": "fc/kernel", "elements": {"all": True, "invert": "yes"}},
     ["elements.invert must be true or false, got 'yes'"]),
    # --- indices and axes out of range
    ("flat_index_out_of_range", {"select": "fc/kernel", "elements": {"indices": [3, 15, 20]}},
     ["elements.indices [15, 20] out of range for variable 'net/fc/kernel'", "shape (5, 3) and size 15",
      "flat indices must lie in [0, 14]"]),
    ("negative_flat_index", {"select": "fc/kernel", "elements": {"indices": [-1]}},
     ["elements.indices [-1] out of range", "[0, 14]"]),
    ("multi_index_out_of_range", {"select": "fc/kernel", "elements": {"indices": [[0, 0], [5, 1]]}},
     ["elements.indices [[0, 0], [5, 1]] out of range for variable 'net/fc/kernel' of shape (5, 3)",
      "axis 0 has 5 entries"]),
    ("multi_index_wrong_length", {"select": "fc/kernel", "elements": {"indices": [[1, 0, 0]]}},
     ["elements.indices [[1, 0, 0]]", "needs 2 entries for variable 'net/fc/kernel' of shape (5, 3)"]),
    ("indices_not_integers", {"select": "fc/kernel", "elements": {"indices": [1.5]}},
     ["elements.indices must be a list of integers, got [1.5]"]),
    ("units_out_of_range", {"select": "fc/kernel", "elements": {"units": [3]}},
     ["elements.units [3] out of range for variable 'net/fc/kernel' of shape (5, 3)", "axis 1 has 3 entries"]),
    ("inputs_out_of_range", {"select": "fc/kernel", "elements": {"inputs": [5, -6]}},
     ["elements.inputs [5, -6] out of range", "axis 0 has 5 entries"]),
    # one answer for positions: no negative ones, as elements.indices (issue 26, item 12)
    ("negative_unit", {"select": "fc/kernel", "elements": {"units": [-1]}},
     ["elements.units [-1] out of range for variable 'net/fc/kernel' of shape (5, 3): axis 1 has 3 entries, "
      "so positions must lie in [0, 2]"]),
    ("negative_row", {"select": "fc/kernel", "elements": {"rows": [0, -5]}},
     ["elements.rows [-5] out of range", "positions must lie in [0, 4]"]),
    ("empty_slice", {"select": "fc/kernel", "elements": {"slice": "[100:, :]"}},
     ["elements.slice '[100:, :]' selects no element of variable 'net/fc/kernel' of shape (5, 3)"]),
    ("value_underflows_to_zero", {"select": "fc/kernel", "elements": {"indices": [0]}, "value": 1e-46},
     ["value 1e-46 is not representable in float32 (it would become 0.0)"]),
    ("weights_file_nan", {"select": "fc/kernel", "elements": {"magnitude": 0.5, "weights_file": "{tmp}/nan_weights.npz"}},
     ["elements.weights_file '{tmp}/nan_weights.npz': 'net/fc/kernel' holds 15 non-finite values (NaN or infinity)"]),
    ("weights_file_bool", {"select": "fc/kernel", "elements": {"magnitude": 0.5, "weights_file": "{tmp}/bool_weights.npz"}},
     ["elements.weights_file '{tmp}/bool_weights.npz': 'net/fc/kernel' holds booleans, expected numbers"]),
    ("mask_file_structured", {"select": "fc/kernel", "elements": {"mask_file": "{tmp}/structured.npy"}},
     ["elements.mask_file '{tmp}/structured.npy' must hold booleans or 0/1 (1 = trainable), got dtype"]),
    ("rows_out_of_range", {"select": "fc/kernel", "elements": {"rows": [7]}},
     ["elements.rows [7] out of range for variable 'net/fc/kernel'", "axis 0 has 5 entries"]),
    ("inputs_of_a_bias", {"select": "fc/*", "elements": {"inputs": [0]}},
     ["variable 'net/fc/bias'", "elements.inputs needs a kernel with an input axis", "shape (3,)",
      "select: '*/kernel'", "elements.units"]),
    ("units_not_integers", {"select": "fc/kernel", "elements": {"units": ["a"]}},
     ["elements.units must be a list of integers, got ['a']"]),
    # --- masks
    ("mask_wrong_shape", {"select": "fc/kernel", "elements": {"mask": [[1, 0], [1, 1]]}},
     ["variable 'net/fc/kernel'", "has shape (2, 2) but variable 'net/fc/kernel' has shape (5, 3)",
      "give an array of shape (5, 3)"]),
    ("mask_not_01", {"select": "fc/kernel", "elements": {"mask": [[1, 2], [1, 1]]}},
     ["elements.mask must hold only 0 and 1 (1 = trainable), got [[1, 2], [1, 1]]"]),
    ("mask_ragged", {"select": "fc/kernel", "elements": {"mask": [[1, 0], [1]]}},
     ["elements.mask is not a rectangular array"]),
    ("mask_file_missing", {"select": "fc/kernel", "elements": {"mask_file": "{tmp}/missing.npy"}},
     ["elements.mask_file '{tmp}/missing.npy' does not exist", "np.save(path, bool_array)"]),
    ("mask_file_directory", {"select": "fc/kernel", "elements": {"mask_file": "{tmp}"}},
     ["elements.mask_file '{tmp}' is a directory, expected a .npy file"]),
    ("mask_file_wrong_shape", {"select": "fc/kernel", "elements": {"mask_file": "{tmp}/wrong_shape.npy"}},
     ["elements.mask_file '{tmp}/wrong_shape.npy' has shape (3, 5) but variable 'net/fc/kernel' has shape (5, 3)"]),
    ("mask_file_not_01", {"select": "fc/kernel", "elements": {"mask_file": "{tmp}/not_01.npy"}},
     ["elements.mask_file '{tmp}/not_01.npy' must hold booleans or 0/1 (1 = trainable), got dtype int64"]),
    ("mask_file_object_array", {"select": "fc/kernel", "elements": {"mask_file": "{tmp}/objects.npy"}},
     ["elements.mask_file '{tmp}/objects.npy' could not be loaded without pickle",
      "save it with np.save(path, bool_array)"]),
    ("mask_file_pickled", {"select": "fc/kernel", "elements": {"mask_file": "{tmp}/pickled.npy"}},
     ["elements.mask_file '{tmp}/pickled.npy' could not be loaded without pickle", "np.save(path, bool_array)"]),
    ("mask_file_npz", {"select": "fc/kernel", "elements": {"mask_file": "{tmp}/archive.npz"}},
     ["elements.mask_file '{tmp}/archive.npz' is an .npz archive without an array for variable 'net/fc/kernel'",
      "it holds ['mask']", "pass a run's masks.npz", "np.save(path, bool_array) (.npy)"]),
    ("mask_file_not_a_path", {"select": "fc/kernel", "elements": {"mask_file": 3}},
     ["elements.mask_file must be a path to a .npy file, got 3"]),
    ("weights_file_without_the_variable", {"select": "fc/kernel",
                                           "elements": {"magnitude": 0.5, "weights_file": "{tmp}/weights.npz"}},
     ["has no array for variable 'net/fc/kernel'", "it holds ['other']"]),
    # --- fractions and numbers
    ("random_above_one", {"select": "fc/kernel", "elements": {"random": 1.5}},
     ["elements.random must be a fraction in [0, 1], got 1.5"]),
    ("random_negative", {"select": "fc/kernel", "elements": {"random": -0.1}},
     ["elements.random must be a fraction in [0, 1], got -0.1"]),
    ("magnitude_above_one", {"select": "fc/kernel", "elements": {"magnitude": 90}},
     ["elements.magnitude must be a fraction in [0, 1], got 90"]),
    ("random_not_a_number", {"select": "fc/kernel", "elements": {"random": "most"}},
     ["elements.random must be a number in [0, 1], got 'most'"]),
    ("random_bool", {"select": "fc/kernel", "elements": {"random": True}},
     ["elements.random must be a number in [0, 1], got True"]),
    ("seed_negative", {"select": "fc/kernel", "elements": {"random": 0.5, "seed": -1}},
     ["elements.seed must be a non-negative integer, got -1"]),
    ("threshold_not_a_number", {"select": "fc/kernel", "elements": {"magnitude_threshold": "small"}},
     ["elements.magnitude_threshold must be a non-negative number, got 'small'"]),
    ("value_not_numeric", {"select": "fc/kernel", "value": "half"},
     ["value must be one of ['current', 'initial', 'zero'] or a number, got 'half'"]),
    ("value_nan", {"select": "fc/kernel", "value": float("nan")}, ["value must be a finite number, got nan"]),
    ("value_bool", {"select": "fc/kernel", "value": True},
     ["value must be one of ['current', 'initial', 'zero'] or a number, got True"]),
    ("value_list", {"select": "fc/kernel", "value": [0.5]},
     ["value must be one of ['current', 'initial', 'zero'] or a number, got [0.5]"]),
    # --- slices
    ("slice_unparseable", {"select": "fc/kernel", "elements": {"slice": "[1:2:3:4]"}},
     ["cannot parse slice '[1:2:3:4]'", "the part '1:2:3:4'", "Example: '[:, :10]'"]),
    ("slice_code", {"select": "fc/kernel", "elements": {"slice": "[__import__('os')]"}},
     ["cannot parse slice \"[__import__('os')]\"", "is not an integer, 'start:stop', 'start:stop:step' or '...'"]),
    ("slice_unclosed", {"select": "fc/kernel", "elements": {"slice": "[:, :10"}},
     ["cannot parse slice '[:, :10': '[' without a closing ']'"]),
    ("slice_empty", {"select": "fc/kernel", "elements": {"slice": "[]"}},
     ["cannot parse slice '[]': it is empty; write e.g. '[:, :10]'"]),
    ("slice_empty_part", {"select": "fc/kernel", "elements": {"slice": "[1,]"}}, ["the part ''"]),
    ("slice_zero_step", {"select": "fc/kernel", "elements": {"slice": "[::0]"}},
     ["cannot parse slice '[::0]': a slice step must not be 0"]),
    ("slice_two_ellipses", {"select": "fc/kernel", "elements": {"slice": "[..., 0, ...]"}},
     ["'...' may appear once at most"]),
    ("slice_not_a_string", {"select": "fc/kernel", "elements": {"slice": 3}},
     ["a slice must be a string such as '[:, :10]', got 3"]),
    ("slice_too_many_axes", {"select": "fc/kernel", "elements": {"slice": "[0, 0, 0]"}},
     ["elements.slice '[0, 0, 0]' does not fit variable 'net/fc/kernel' of shape (5, 3)", "too many indices"]),
    ("slice_index_out_of_range", {"select": "fc/kernel", "elements": {"slice": "[7]"}},
     ["elements.slice '[7]' does not fit variable 'net/fc/kernel' of shape (5, 3)", "index 7 is out of bounds"]),
    # --- schedules and windows
    ("end_before_start", {"select": "fc/kernel", "start_step": 5, "end_step": 2},
     ["end_step (2) must be greater than start_step (5)"]),
    ("end_epoch_before_start", {"select": "fc/kernel", "start_epoch": 3, "end_epoch": 3},
     ["end_epoch (3) must be greater than start_epoch (3)"]),
    ("negative_step", {"select": "fc/kernel", "start_step": -1},
     ["start_step must be a non-negative integer or null, got -1"]),
    ("step_not_an_integer", {"select": "fc/kernel", "end_epoch": 2.5},
     ["end_epoch must be a non-negative integer or null, got 2.5"]),
    ("update_without_magnitude", {"select": "fc/kernel", "elements": {"random": 0.5}, "update_every_n_steps": 10},
     ["update_every_n_steps and schedule need a 'magnitude' selector", "elements={'random': 0.5}"]),
    ("update_not_positive", {"select": "fc/kernel", "elements": {"magnitude": 0.5}, "update_every_n_steps": 0},
     ["update_every_n_steps must be a positive integer, got 0"]),
    ("schedule_without_update", {"select": "fc/kernel", "elements": {"magnitude": 0.5}, "schedule": SCHEDULE},
     ["a schedule needs update_every_n_steps"]),
    ("schedule_kind", {"select": "fc/kernel", "elements": {"magnitude": 0.5}, "update_every_n_steps": 2,
                       "schedule": dict(SCHEDULE, kind="cubic")},
     ["schedule.kind must be one of ['polynomial'], got 'cubic'"]),
    ("schedule_unknown_key", {"select": "fc/kernel", "elements": {"magnitude": 0.5}, "update_every_n_steps": 2,
                              "schedule": dict(SCHEDULE, final=0.9)},
     ["unknown schedule key(s) ['final']", "allowed: ['begin_step', 'end_step', 'final_sparsity', "
      "'initial_sparsity', 'kind', 'power']"]),
    ("schedule_missing_keys", {"select": "fc/kernel", "elements": {"magnitude": 0.5}, "update_every_n_steps": 2,
                               "schedule": {"kind": "polynomial", "final_sparsity": 0.9}},
     ["schedule is missing ['begin_step', 'end_step', 'initial_sparsity']"]),
    ("schedule_fraction", {"select": "fc/kernel", "elements": {"magnitude": 0.5}, "update_every_n_steps": 2,
                           "schedule": dict(SCHEDULE, final_sparsity=1.2)},
     ["schedule.final_sparsity must be a fraction in [0, 1], got 1.2"]),
    ("schedule_steps", {"select": "fc/kernel", "elements": {"magnitude": 0.5}, "update_every_n_steps": 2,
                        "schedule": dict(SCHEDULE, begin_step=10, end_step=10)},
     ["schedule.end_step (10) must be greater than begin_step (10)"]),
    ("schedule_power", {"select": "fc/kernel", "elements": {"magnitude": 0.5}, "update_every_n_steps": 2,
                        "schedule": dict(SCHEDULE, power="cubic")},
     ["schedule.power must be a positive number", "got 'cubic'"]),
    ("rescale_not_bool", {"select": "fc/kernel", "rescale_trainable": "yes"},
     ["rescale_trainable must be true or false, got 'yes'"]),
]


def _fill(value, tmp):
    if isinstance(value, dict):
        return {k: _fill(v, tmp) for k, v in value.items()}
    return value.replace("{tmp}", str(tmp)) if isinstance(value, str) else value


@pytest.mark.parametrize("case_id, rule, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_rule_is_refused_with_a_message_that_says_what_to_write(bad_files, case_id, rule, fragments):
    model = net()
    registry = MaskRegistry(model)
    registry.freeze("fc/bias", elements={"indices": [1]}, value="zero", name="ok")
    before = {v.path: v.numpy().copy() for v in model.variables}
    version = registry.structure_version
    with pytest.raises(FreezeConfigError) as info:
        registry.freeze(name="r", **_fill(rule, bad_files))
    message = str(info.value)
    for fragment in fragments:
        assert _fill(fragment, bad_files) in message, f"{fragment!r} not in {message!r}"
    # The registry and the model are unchanged.
    assert [r.name for r in registry.rules] == ["ok"]
    assert registry.covered_paths() == ["net/fc/bias"]
    assert registry.structure_version == version
    for v in model.variables:
        np.testing.assert_array_equal(v.numpy(), before[v.path])


@pytest.mark.parametrize("form", ["yaml", "cli"])
@pytest.mark.parametrize("case_id", ["unknown_rule_key", "unknown_selector", "flat_index_out_of_range",
                                     "random_above_one", "value_not_numeric", "slice_unparseable",
                                     "glob_matches_nothing"])
def test_bad_rule_from_a_config_gets_the_same_message(form, case_id):
    _, rule, fragments = next(c for c in CASES if c[0] == case_id)
    with pytest.raises(FreezeConfigError) as info:
        registry_from(form, net(), {"r": rule})
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("rules, fragments", [
    ([1, 2], ["freeze.rules must be a mapping of rule name to rule, got [1, 2]"]),
    ({"r": "fc/kernel"}, ["rule 'r' must be a mapping with keys " + RULE_KEYS, "got 'fc/kernel'"]),
])
def test_rules_config_must_be_a_mapping_of_mappings(rules, fragments):
    with pytest.raises(FreezeConfigError) as info:
        rules_from_config(rules)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_a_null_rule_is_removed_not_an_error():
    assert [r.name for r in rules_from_config({"a": {"select": "*/kernel"}, "b": None})] == ["a"]


def test_duplicate_rule_name():
    registry = MaskRegistry(net())
    registry.freeze("fc/kernel", name="a")
    with pytest.raises(FreezeConfigError, match=r"a rule named 'a' exists already; rule names: \['a'\]"):
        registry.freeze("fc/bias", name="a")


# --------------------------------------------------------------- conflicts
def test_conflicting_values_name_both_rules_and_the_variable():
    model = net()
    registry = MaskRegistry(model)
    registry.freeze("fc/kernel", elements={"slice": "[0]"}, value=0.5, name="half")
    kernel = model.get_layer("fc").kernel.numpy().copy()
    with pytest.raises(FreezeConfigError) as info:
        registry.freeze("*/kernel", elements={"indices": [1, 2, 3]}, value="zero", name="prune")
    message = str(info.value)
    assert "rules 'half' (value 0.5) and 'prune' (value zero)" in message
    assert "pin 2 element(s) of variable 'net/fc/kernel' to different values" in message
    assert "e.g. element (0, 1): 0.5 and 0.0" in message
    assert "give them the same value or make their element selections disjoint" in message
    assert [r.name for r in registry.rules] == ["half"]
    np.testing.assert_array_equal(model.get_layer("fc").kernel.numpy(), kernel)


def test_overlapping_rules_with_the_same_value_compose():
    registry = MaskRegistry(net())
    registry.freeze("fc/kernel", elements={"slice": "[0]"}, value="zero", name="a")
    registry.freeze("fc/kernel", elements={"units": [0]}, value=0.0, name="b")
    frozen = ~registry.trainable_mask("net/fc/kernel")
    np.testing.assert_array_equal(frozen, np.array([[1, 1, 1]] + [[1, 0, 0]] * 4, bool))
    assert registry.plan()[0]["rules"] == ["a", "b"]


def test_current_captures_what_an_earlier_rule_pinned_but_a_later_value_conflicts():
    """``current`` is the value when a rule is applied: after a zero rule it is 0 (no conflict);
    before it, the zero rule would move elements the ``current`` rule holds (a conflict)."""
    registry = MaskRegistry(net())
    registry.freeze("fc/kernel", elements={"indices": [4]}, value="zero", name="zero")
    registry.freeze("fc/kernel", value="current", name="all")
    assert registry.model.get_layer("fc").kernel.numpy().ravel()[4] == 0.0
    registry = MaskRegistry(net())
    registry.freeze("fc/kernel", value="current", name="all")
    with pytest.raises(FreezeConfigError, match=r"rules 'all' \(value current\) and 'zero' \(value zero\) pin 1 "):
        registry.freeze("fc/kernel", elements={"indices": [4]}, value="zero", name="zero")


def test_conflict_between_a_scheduled_rule_and_a_static_one_is_found_when_it_is_added():
    # Issue 26, item 6: found when the scheduled rule is added (it used to be found only when it switched on).
    registry = MaskRegistry(net())
    registry.freeze("fc/kernel", value="zero", name="static")
    with pytest.raises(FreezeConfigError, match=r"rules 'static' \(value zero\) and 'later' \(value 1.0\)"):
        registry.freeze("fc/kernel", elements={"indices": [0]}, value=1.0, name="later", start_step=3)
