"""The sweep table: Optuna's full-precision draws written with 4 significant digits."""

import pytest

from trainer.sweep import short_override


@pytest.mark.parametrize("override,short", [
    ("optimizer.learning_rate=0.0012345678901234", "optimizer.learning_rate=0.001235"),
    ("freeze.rules.sparse.elements.random=0.9123456789", "freeze.rules.sparse.elements.random=0.9123"),
    ("optimizer.learning_rate=1.2345678e-05", "optimizer.learning_rate=1.235e-05"),
    ("optimizer.learning_rate=0.001", "optimizer.learning_rate=0.001"),
    ("seed=3", "seed=3"),
    ("data.path=/data/v1.123456", "data.path=/data/v1.123456"),
    ("freeze=[random_90,biases]", "freeze=[random_90,biases]"),
])
def test_long_floats_are_shortened_and_nothing_else(override, short):
    assert short_override(override) == short
