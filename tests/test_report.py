"""The end-of-run audit line counts in words that agree with their numbers."""

import pytest

from trainer.report import audit_line


@pytest.mark.parametrize("rows, exact, expected", [
    ([{"frozen_elements": 900}], True, "900 frozen elements in 1 variable, all bit-exact"),
    ([{"frozen_elements": 1}, {"frozen_elements": 0}], True, "1 frozen element in 1 variable, all bit-exact"),
    ([{"frozen_elements": 211680}, {"frozen_elements": 27000}, {"frozen_elements": 900}], False,
     "239,580 frozen elements in 3 variables, NOT exact: see drift in report.json"),
])
def test_audit_line_words_agree_with_numbers(rows, exact, expected):
    assert audit_line(rows, exact) == expected
