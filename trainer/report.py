"""The end-of-run audit, ``report.json``, and exports (``model.keras``, ``masks.npz``)."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List

import numpy as np

from trainer.masks import audit as masks_audit


def audit(registry) -> List[Dict[str, Any]]:
    """Per trainable variable: path, shape, frozen_elements, sparsity (exact zeros), drift.

    ``drift`` is the max |value - pinned| over frozen elements (0.0 expected)
    and ``exact`` whether every frozen element is bit-for-bit its pinned value.
    The statistics are :func:`trainer.masks.audit.variable_rows`, shared with the summaries.
    """
    keys = ("path", "shape", "frozen_elements", "frozen_fraction", "sparsity", "drift", "rules")
    return [{k: row[k] for k in keys} for row in masks_audit.variable_rows(registry)]


def audit_line(rows: List[Dict[str, Any]], exact: bool) -> str:
    """``"266,200 frozen elements in 3 variables, all bit-exact"``."""
    frozen = sum(r["frozen_elements"] for r in rows)
    n = sum(1 for r in rows if r["frozen_elements"])
    state = "all bit-exact" if exact else "NOT exact: see drift in report.json"
    return f"{frozen:,} frozen elements in {n} variables, {state}"


def write_json(path: str, data: Dict[str, Any]) -> None:
    """Writes JSON atomically (a temporary file, then ``os.replace``)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def export_masks(registry, path: str) -> None:
    """Writes ``masks.npz``: each trainable variable's bool trainable-mask under its variable path."""
    tmp = path + ".tmp.npz"
    np.savez(tmp, **registry.trainable_masks())
    os.replace(tmp, path)


def export_weights(model, path: str) -> None:
    """Writes every variable's value under its variable path (``weights.npz``)."""
    tmp = path + ".tmp.npz"
    np.savez(tmp, **{v.path: np.asarray(v.numpy()) for v in model.variables})
    os.replace(tmp, path)


def export_model(model, path: str) -> None:
    """Saves ``model.keras`` (a plain Keras model; loading it needs no import of this package)."""
    tmp = path[: -len(".keras")] + ".tmp.keras" if path.endswith(".keras") else path + ".tmp.keras"
    model.save(tmp)
    os.replace(tmp, path)


def export_saved_model(model, directory: str) -> None:
    """Writes a TensorFlow SavedModel with a ``serving_default`` signature."""
    model.export(directory, format="tf_saved_model")
