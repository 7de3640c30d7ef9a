"""Issue 26, item 6: conflicting pins in overlapping rule windows are refused when the rule is added (and by dry runs)."""

import keras
import pytest

from trainer.masks import FreezeConfigError, MaskRegistry


def registry():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")], name="net")
    return MaskRegistry(model)


def test_overlapping_windows_with_different_pins_are_refused_naming_both_rules_the_element_and_the_steps():
    reg = registry()
    reg.freeze("fc/kernel", value="zero", name="a", end_step=10)
    with pytest.raises(FreezeConfigError) as caught:
        reg.freeze("fc/kernel", value=0.5, name="b", start_step=5)
    assert str(caught.value) == (
        "rules 'a' (value zero) and 'b' (value 0.5) are both active at steps 5-9 and pin 12 element(s) of variable "
        "'net/fc/kernel' to different values, e.g. element (0, 0): 0.0 and 0.5; give them the same value, make their "
        "element selections disjoint, or end one window where the other starts")
    assert [r.name for r in reg.rules] == ["a"]  # nothing of 'b' is left


def test_windows_that_do_not_overlap_or_selections_that_do_not_meet_are_accepted():
    reg = registry()
    reg.freeze("fc/kernel", value="zero", name="a", end_step=5)
    reg.freeze("fc/kernel", value=0.5, name="b", start_step=5, end_step=20)
    reg.freeze("fc/kernel", elements={"slice": "[0, :]"}, value=1.0, name="c", start_step=20)
    reg.freeze("fc/kernel", elements={"slice": "[1, :]"}, value=2.0, name="d", start_step=30)
    reg.freeze("fc/kernel", elements={"slice": "[2, :]"}, value=0.5, name="e", start_step=7)  # same pin as 'b'
    assert [r.name for r in reg.rules] == ["a", "b", "c", "d", "e"]


def test_an_open_window_is_named_as_such():
    reg = registry()
    reg.freeze("fc/kernel", elements={"slice": "[0, :]"}, value=1.0, name="late", start_step=8)
    with pytest.raises(FreezeConfigError, match=r"are both active at step 12 on and pin 3 element\(s\)"):
        reg.freeze("fc/kernel", elements={"slice": "[0, :]"}, value="zero", name="later", start_step=12)
