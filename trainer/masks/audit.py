"""The audit of frozen elements: drift, exactness and mask statistics, for summaries and reports alike.

Exactness is judged on bit patterns: ``-0.0`` is not ``+0.0`` and a NaN is
never its pin. Pins the registry can rebuild (zero, constants, initial values)
are compared element by element; ``current`` pins are the variable's own
value, so the registry keeps a digest (two CRC-32s: of which elements, and of
their bit patterns) taken when they were pinned and compares that.
"""

from __future__ import annotations

import zlib
from typing import Any, Dict, List

import numpy as np

from trainer.masks.plan import VariablePlan, bits


def digest(value: np.ndarray, elements: np.ndarray) -> str:
    """A checksum of the bit patterns of ``value[elements]`` and of which elements they are.

    CRC-32 (``zlib``) detects every change of up to 32 consecutive bits and
    any other change with probability 1 - 2**-32; it is an audit, not a
    defence against deliberate collisions.
    """
    where = zlib.crc32(memoryview(np.packbits(elements.reshape(-1))))
    values = zlib.crc32(memoryview(np.ascontiguousarray(bits(value)[elements])))
    return f"{where:08x}{values:08x}"


def variable_drift(plan: VariablePlan, value: np.ndarray, current_digest: str) -> float:
    """Max ``|value - pin|`` over the frozen elements of one variable.

    0.0 when every frozen element is bit-exact; ``inf`` for a non-finite
    difference, or when a ``current`` pin changed (its size is not known: no
    copy of it is kept).
    """
    drift = 0.0
    derivable = plan.derivable & plan.frozen
    if derivable.any():
        diff = np.abs(value[derivable].astype(np.float64) - plan.target[derivable].astype(np.float64))
        drift = float(np.inf) if not np.isfinite(diff).all() else float(diff.max(initial=0.0))
    if current_digest and digest(value, plan.frozen & ~plan.derivable) != current_digest:
        drift = float(np.inf)
    return drift


def variable_exact(plan: VariablePlan, value: np.ndarray, current_digest: str) -> bool:
    """True when every frozen element of one variable has its pin's exact bit pattern."""
    derivable = plan.derivable & plan.frozen
    if not np.array_equal(bits(value)[derivable], bits(plan.target)[derivable]):
        return False
    return not current_digest or digest(value, plan.frozen & ~plan.derivable) == current_digest


def variable_rows(registry) -> List[Dict[str, Any]]:
    """Per variable of the registry's plan: the statistics summaries and reports show.

    Returns:
      One dict per row of ``registry.plan()`` with ``path``, ``shape``,
      ``frozen_elements``, ``frozen_fraction``, ``rules``, ``sparsity`` (the
      fraction of elements exactly 0), ``drift`` (see :func:`variable_drift`)
      and ``trainable_norm`` (L2 norm of the trainable elements), as Python
      numbers.
    """
    drift = registry.drift()
    values = {v.path: v for v in registry.model.variables}
    rows = []
    for row in registry.plan():
        path = row["path"]
        value = np.asarray(values[path].numpy())
        trainable = registry.trainable_mask(path)
        rows.append({
            "path": path,
            "shape": row["shape"],
            "frozen_elements": row["frozen_elements"],
            "frozen_fraction": float(row["frozen_fraction"]),
            "rules": row["rules"],
            "sparsity": float(np.count_nonzero(value == 0) / max(value.size, 1)),
            "drift": float(drift.get(path, 0.0)),
            "trainable_norm": float(np.linalg.norm(value[trainable].astype(np.float64))),
        })
    return rows


def model_stats(rows: List[Dict[str, Any]]) -> Dict[str, float]:
    """Sparsity and frozen fraction over all rows of :func:`variable_rows`, weighted by element count."""
    size = zeros = frozen = 0
    for row in rows:
        n = int(np.prod(row["shape"], dtype=np.int64))
        size += n
        zeros += round(row["sparsity"] * n)
        frozen += int(row["frozen_elements"])
    return {"sparsity": zeros / max(size, 1), "frozen_fraction": frozen / max(size, 1)}
