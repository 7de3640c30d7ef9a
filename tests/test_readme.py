"""Every fenced ```python block of the README runs as written (on the bundled digits)."""

import os
import re

import pytest

from tests.conftest import REPO

BLOCKS = re.findall(r"^```python\n(.*?)^```", open(os.path.join(REPO, "README.md")).read(), flags=re.S | re.M)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CI", "true")  # no progress bar in the test log
    exec(compile(BLOCKS[index], f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})
