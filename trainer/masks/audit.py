"""The audit of frozen elements: drift, exactness and mask statistics, for summaries and reports alike.

Exactness is judged on bit patterns: ``-0.0`` is not ``+0.0`` and a NaN is
never its pin. Pins the registry can rebuild (zero, constants, initial values)
are compared element by element; ``current`` pins are the variable's own
value, so the registry keeps a digest (two CRC-32s: of which elements, and of
their bit patterns) taken when they were pinned and compares that.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import numpy as np

from trainer.masks import precision
from trainer.masks.bitmask import PackedMask
from trainer.masks.groups import count_frozen_groups
from trainer.masks.plan import VariablePlan, bits
from trainer.masks.sampled_layers import describe_fallback


CHUNK = 1 << 20  # elements selected at a time where many are left out of a digest (a bounded copy)
RUNS = 256  # the runs between left-out elements are read in place where at most 1 in RUNS is left out


def digest(value: np.ndarray, elements: Union[np.ndarray, PackedMask], excluded: Optional[np.ndarray] = None) -> str:
    """A checksum of the bit patterns of ``value[elements]`` and of which elements they are.

    CRC-32 (``zlib``) detects every change of up to 32 consecutive bits and
    any other change with probability 1 - 2**-32; it is an audit, not a
    defence against deliberate collisions.

    No copy of ``value`` is made: zlib reads the whole buffer when every
    element is in, the runs between the left-out elements in place when at
    most one in :data:`RUNS` is left out (at 99.9 % frozen), and otherwise
    chunks of :data:`CHUNK` elements selected one at a time. Every way gives
    the checksum of ``value[elements]``'s bytes, the one earlier versions stored.

    Args:
      value: an array (C order).
      elements: a bool array of its shape, or its :class:`~trainer.masks.bitmask.PackedMask`.
      excluded: optionally, the sorted flat positions where ``elements`` is
        False (:func:`trainer.masks.bitmask.false_positions`), when the caller has them.
    """
    raw = np.ascontiguousarray(bits(value)).reshape(-1)
    packed = elements if isinstance(elements, PackedMask) else PackedMask.pack(elements)
    if excluded is None and raw.size and (raw.size - packed.count) * RUNS <= raw.size:
        excluded = packed.false_positions()
    if excluded is not None and excluded.size * RUNS <= max(raw.size, 1):
        values = _crc_of_runs(raw, np.asarray(excluded, np.int64))
    else:
        chosen = (packed.unpack() if isinstance(elements, PackedMask) else np.asarray(elements)).reshape(-1)
        values = 0
        for start in range(0, raw.size, CHUNK):
            values = zlib.crc32(memoryview(raw[start:start + CHUNK][chosen[start:start + CHUNK]]), values)
    return f"{zlib.crc32(memoryview(packed.packed)):08x}{values:08x}"


def _crc_of_runs(raw: np.ndarray, excluded: np.ndarray) -> int:
    """The CRC-32 of the bytes of ``raw`` (flat) less the elements at ``excluded``, read in place, run by run."""
    data, item = memoryview(raw).cast("B"), raw.itemsize
    starts = np.concatenate(([0], excluded + 1)) * item
    ends = np.concatenate((excluded, [raw.size])) * item
    crc = 0
    for start, end in zip(starts.tolist(), ends.tolist()):
        crc = zlib.crc32(data[start:end], crc)
    return crc


def variable_drift(plan: VariablePlan, value: np.ndarray, current_digest: str) -> float:
    """Max ``|value - pin|`` over the frozen elements of one variable.

    0.0 when every frozen element is bit-exact; ``inf`` for a non-finite
    difference, or when a ``current`` pin changed (its size is not known: no
    copy of it is kept).
    """
    drift = 0.0
    derivable = plan.derivable & plan.frozen if plan.has_derivable else None
    if derivable is not None and derivable.any():
        diff = np.abs(value[derivable].astype(np.float64) - plan.target[derivable].astype(np.float64))
        drift = float(np.inf) if not np.isfinite(diff).all() else float(diff.max(initial=0.0))
    if current_digest and digest(value, _current(plan)) != current_digest:
        drift = float(np.inf)
    return drift


def variable_exact(plan: VariablePlan, value: np.ndarray, current_digest: str) -> bool:
    """True when every frozen element of one variable has its pin's exact bit pattern."""
    if plan.has_derivable:
        derivable = plan.derivable & plan.frozen
        if not np.array_equal(bits(value)[derivable], bits(plan.target)[derivable]):
            return False
    return not current_digest or digest(value, _current(plan)) == current_digest


def _current(plan: VariablePlan) -> Union[np.ndarray, PackedMask]:
    """The frozen elements pinned to their own (``current``) value: all of them, packed, where no pin is derivable."""
    return plan.frozen & ~plan.derivable if plan.has_derivable else plan.packed


def drift(state: Any, combine: Callable[[str], VariablePlan]) -> Dict[str, float]:
    """Per covered variable path of a :class:`~trainer.masks.state.MaskState`: :func:`variable_drift`.

    ``combine`` gives a path's :class:`VariablePlan`; a variable without frozen elements gives 0.0.
    """
    result = {}
    for path, covered in state.covered.items():
        if not covered.frozen_elements:
            result[path] = 0.0
            continue
        value = state.read(path)  # a read-only view
        result[path] = variable_drift(combine(path), value, state.digests.get(path, ""))
    return result


def exact(state: Any, combine: Callable[[str], VariablePlan]) -> bool:
    """True when every frozen element of a :class:`~trainer.masks.state.MaskState` has its pin's bits."""
    for path, covered in state.covered.items():
        if covered.frozen_elements:
            value = state.read(path)  # a read-only view
            if not variable_exact(combine(path), value, state.digests.get(path, "")):
                return False
    return True


def plan_rows(state: Any) -> List[Dict[str, Any]]:
    """One row per trainable (or pinned) variable of a store: ``MaskRegistry.plan``.

    A row of a variable whose compact values are float32 masters of a
    bfloat16 / float16 variable also has ``precision``
    (:func:`trainer.masks.precision.precision`); with ``update="sampled"`` a
    compact row has ``gradient``: ``"sampled"``, or why the dense gradient is gathered.
    """
    rows = []
    for info in state.infos:
        covered = state.covered.get(info.path)
        if not info.trainable and covered is None:
            continue
        size = int(np.prod(info.variable.shape, dtype=np.int64))
        frozen = covered.frozen_elements if covered is not None else 0
        rules = list(covered.rules) if covered is not None else []
        values = sorted({str(state.rules[r].rule.value) for r in rules})
        rows.append({
            "path": info.path,
            "shape": [int(d) for d in info.variable.shape],
            "dtype": str(info.variable.dtype),
            "frozen_elements": frozen,
            "frozen_fraction": frozen / size if size else 0.0,
            "value": ", ".join(values) if values else None,
            "rules": rules,
        })
        grouped = [state.rules[r].rule.elements for r in rules if "groups" in state.rules[r].rule.elements]
        if grouped:  # whole groups frozen, as "150/300 units" (trainer.masks.groups)
            spec = grouped[0]
            count, total = count_frozen_groups(~state.trainable_mask(info.path), spec["groups"], spec.get("block"),
                                               info.heads_axis)
            rows[-1]["groups"] = f"{count}/{total} {spec['groups']}"
        compact = state.compact.get(info.path) if covered is not None else None
        parts = precision.precision(info.variable.dtype, None if compact is None else compact.dtype)
        if parts is not None:
            rows[-1]["precision"] = parts
        if compact is not None and state.requested == "sampled":
            served = compact.path in state.sampled
            rows[-1]["gradient"] = "sampled" if served else describe_fallback(info.path, state.owners.get(info.path))
    return rows


def describe(rows: List[Dict[str, Any]], modes: Mapping[str, str]) -> str:
    """A Markdown table of :func:`plan_rows` with each variable's update mode (and masters' precision)."""
    lines = ["| variable | shape | frozen | fraction | value | rules | update |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['path']} | {tuple(row['shape'])} | {row['frozen_elements']:,} | "
            f"{row['frozen_fraction']:.4f} | {row['value'] or '-'} | {', '.join(row['rules']) or '-'} | "
            f"{modes.get(row['path'], '-')}{precision.label(row.get('precision'))}"
            f"{' (sampled gradient)' if row.get('gradient') == 'sampled' else ''} |"
        )
    return "\n".join(lines)


def memory_bytes(state: Any, initial: Mapping[str, np.ndarray], buffers: Callable[[str], int]) -> Dict[str, int]:
    """Bytes of per-element state kept per covered variable: ``MaskRegistry.memory_bytes``.

    Args:
      state: the :class:`~trainer.masks.state.MaskState`.
      initial: the initial values kept for ``value: initial`` rules, per path.
      buffers: ``path -> bytes`` of prune-and-regrow buffers.
    """
    out = {}
    for path in state.covered:
        update = state.update(path)
        total = update.memory_bytes() if update is not None else 0
        total += buffers(path)
        if path in initial:
            total += int(initial[path].nbytes)
        total += sum(int(s.captured[path].nbytes) for s in state.rules.values() if path in s.captured)
        out[path] = total
    return out


def variable_rows(registry) -> List[Dict[str, Any]]:
    """Per variable of the registry's plan: the statistics summaries and reports show.

    Returns:
      One dict per row of ``registry.plan()`` with ``path``, ``shape``,
      ``frozen_elements``, ``frozen_fraction``, ``rules``, ``sparsity`` (the
      fraction of elements exactly 0), ``drift`` (see :func:`variable_drift`)
      and ``trainable_norm`` (L2 norm of the trainable elements), as Python
      numbers; and ``precision`` where the plan row has it.
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
            **({"precision": row["precision"]} if "precision" in row else {}),
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
