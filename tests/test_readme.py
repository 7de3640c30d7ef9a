"""Every fenced ```python block of the README and of docs/*.md runs as written (on the bundled digits).

A block that appears in several files (the README's examples are copies of the docs pages' blocks) runs
once, under the ids of all the places it appears in. Each block runs in this process with fresh globals.
"""

import glob
import os
import re

import pytest

from tests.conftest import REPO

FENCE = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)
DOC_FILES = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))


def python_blocks(name):
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
        return FENCE.findall(f.read())


BLOCKS = python_blocks("README.md")
PLACES = {}  # block text -> ["README.md:1", "docs/python.md:4", ...], in the order first seen
for _name in DOC_FILES:
    for _number, _block in enumerate(python_blocks(_name), 1):
        PLACES.setdefault(_block, []).append(f"{_name}:{_number}")
UNIQUE = list(PLACES)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 3


def test_the_docs_have_python_examples():
    in_docs = {place.split(":")[0] for places in PLACES.values() for place in places} - {"README.md"}
    for page in ("docs/getting-started.md", "docs/python.md", "docs/sparse-training.md", "docs/sparse-finetuning.md"):
        assert page in in_docs, f"{page} has no python block"


def test_every_readme_example_is_a_docs_example():
    """The README's examples are the docs pages' own (so each runs once, and the docs explain them)."""
    for block in BLOCKS:
        assert any(not place.startswith("README.md:") for place in PLACES[block]), (
            f"README.md's python block {BLOCKS.index(block) + 1} is in no docs/*.md page: put the same block on the page "
            "that explains it")


@pytest.mark.parametrize("index", range(len(UNIQUE)), ids=["+".join(PLACES[b]) for b in UNIQUE])
def test_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CI", "true")  # no progress bar in the test log
    block = UNIQUE[index]
    where = " and ".join(PLACES[block])
    if "mnist" in block.lower() and not os.environ.get("TRAINER_DATA_DIR"):
        pytest.fail(f"{where} reads MNIST: set TRAINER_DATA_DIR to the directory of mnist.npz, as .ci/run does")
    exec(compile(block, f"{where} python block", "exec"), {"__name__": "__readme__"})
