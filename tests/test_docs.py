"""The docs site builds with `mkdocs build --strict`, and docs/project-structure.md matches the checkout.

The Python examples of the pages run in tests/test_readme.py.
"""

import fnmatch
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

STRUCTURE = os.path.join(REPO, "docs", "project-structure.md")


def test_mkdocs_build_strict(tmp_path):
    """Every page, link, anchor and docstring of the reference builds without a warning (a few seconds)."""
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    # no --quiet: mkdocs 1.6 does not count the warnings it does not print, and --strict then passes
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                             "-f", os.path.join(REPO, "mkdocs.yml"), "-d", str(site)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    reference = (site / "reference" / "trainer" / "index.html").read_text(encoding="utf-8")
    for name in ("Trainer", "MaskRegistry", "FreezeRule", "FreezeConfigError", "LoopState"):
        assert f'id="trainer.{name}"' in reference, f"trainer.{name} is missing from the API reference"
    # a docstring's own text reached the page (the registry's first line)
    assert "Element-level freezing for the variables of one Keras model." in reference
    for page in ("getting-started", "python", "freeze-rules", "sparse-training", "sparse-finetuning", "scale",
                 "reliability", "benchmarks", "tensorboard", "sweeps", "project-structure", "building-docs"):
        assert (site / page / "index.html").is_file(), page


def structure_entries():
    """The paths the Project structure block lists ('trainer/masks/registry.py', '.ci/run', ...)."""
    with open(STRUCTURE, encoding="utf-8") as f:
        block = re.search(r"^```\n(.*?)^```", f.read(), flags=re.S | re.M).group(1)
    entries, parents = [], []  # parents: (indent, directory path) of the enclosing directories
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        name = line.split()[0]
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = (parents[-1][1] if parents else "") + name
        entries.append(path.rstrip("/"))
        if name.endswith("/"):
            parents.append((indent, path))
    return entries


def ignored(name):
    with open(os.path.join(REPO, ".gitignore"), encoding="utf-8") as f:
        patterns = [p.strip().rstrip("/") for p in f if p.strip() and not p.startswith("#")]
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def test_project_structure_matches_the_tree():
    entries = structure_entries()
    assert len(entries) == len(set(entries)), sorted(e for e in entries if entries.count(e) > 1)
    missing = [e for e in entries if not os.path.exists(os.path.join(REPO, e))]
    assert not missing, f"docs/project-structure.md lists paths that do not exist: {missing}"
    for package in ("trainer", "trainer/masks"):
        modules = sorted(f"{package}/{f}" for f in os.listdir(os.path.join(REPO, package)) if f.endswith(".py"))
        unlisted = [m for m in modules if m not in entries]
        assert not unlisted, f"docs/project-structure.md does not list {unlisted}: add a line with its one job"
    top = sorted(d for d in os.listdir(REPO) if os.path.isdir(os.path.join(REPO, d))
                 and not d.startswith(".") and not ignored(d))
    unlisted = [d for d in top if not any(e == d or e.startswith(d + "/") for e in entries)]
    assert not unlisted, f"docs/project-structure.md does not list the directories {unlisted}"


@pytest.mark.parametrize("page", ["README.md", "docs/getting-started.md"])
def test_the_test_command_is_what_ci_runs(page):
    """The documented test command is .ci/run's: `python -m pytest`, with TRAINER_DATA_DIR set."""
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    assert re.search(r"^export TRAINER_DATA_DIR=", ci, flags=re.M) and re.search(r"^python -m pytest$", ci, flags=re.M)
    with open(os.path.join(REPO, page), encoding="utf-8") as f:
        text = f.read()
    assert re.search(r"^(TRAINER_DATA_DIR=\S+ )?python -m pytest ", text, flags=re.M), page
    assert "TRAINER_DATA_DIR" in text
