"""Group-wise magnitude selection: whole units, input features or b×b blocks of a kernel, ranked by their norm.

``elements: {magnitude: 0.5, groups: units, norm: l1}`` freezes the ``round(0.5 * n_groups)`` groups whose
weights have the smallest norm, every element of each. A group is

- ``units``: one output unit of a Dense kernel ``(in, out)`` or one filter (output channel) of a conv kernel
  ``(kh, kw, in, out)``: everything along the last axis's position ``j`` (the elements of ``elements.units``);
  removing a unit or a filter gives a smaller dense layer (:func:`trainer.strip`). Li et al. (2017), *Pruning
  Filters for Efficient ConvNets*, rank filters by their L1 norm;
- ``inputs``: one input feature of a Dense kernel or one input channel of a conv kernel (the elements of
  ``elements.inputs``);
- ``blocks``: a ``[b_in, b_out]`` tile of the (input, output) axes of a kernel, every spatial position of a
  conv kernel included (block sparsity, as jaxpruner's and Cerebras' block patterns);
- ``heads``: one attention head of a ``MultiHeadAttention`` (or keras-hub attention) projection: one index of
  the variable's heads axis, which :mod:`trainer.masks.heads` reads from the layer (each variable is ranked
  by its own heads' slices; Michel et al. 2019, *Are Sixteen Heads Really Better than One?*).

Pure NumPy, deterministic: ties are broken by the group's position (a stable sort), as the element-wise
``magnitude`` selector breaks them by flat index.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np

from trainer.masks.errors import FreezeConfigError

GROUPS = ("units", "inputs", "blocks", "heads")
NORMS = ("l1", "l2")
DEFAULT_NORM = "l1"  # Li et al. (2017)


def check_groups(spec: Mapping[str, Any]) -> None:
    """Checks ``groups``, ``norm`` and ``block`` of a ``magnitude`` spec (no variable needed).

    Raises:
      FreezeConfigError: an unknown group kind or norm, ``norm`` / ``block`` without the ``groups`` that use
        them, a missing or malformed ``block``, or ``allocation: global`` (a global ranking is element-wise).
    """
    groups = spec.get("groups")
    if groups is None:
        for key in ("norm", "block"):
            if key in spec:
                raise FreezeConfigError(f"elements.{key} needs elements.groups (one of {list(GROUPS)}), "
                                        f"got {key}: {spec[key]!r} without groups")
        return
    if groups not in GROUPS:
        hint = " (a conv kernel's output channels are its units, its last axis)" if groups == "channels" else ""
        raise FreezeConfigError(f"elements.groups must be one of {list(GROUPS)}, got {groups!r}{hint}")
    if "norm" in spec and spec["norm"] not in NORMS:
        raise FreezeConfigError(f"elements.norm must be one of {list(NORMS)}, got {spec['norm']!r}")
    if groups == "blocks":
        block = spec.get("block")
        if not (isinstance(block, Sequence) and not isinstance(block, str) and len(block) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)):
            raise FreezeConfigError(f"elements.groups: blocks needs elements.block: [b_in, b_out], two positive "
                                    f"integers, got {block!r}")
    elif "block" in spec:
        raise FreezeConfigError(f"elements.block needs elements.groups: blocks, got groups {groups!r}")
    if spec.get("allocation") == "global":
        raise FreezeConfigError("elements.groups cannot be combined with allocation: global (one ranking of "
                                "single elements); use allocation: uniform, erdos_renyi or erk, or none")


def _input_axis(shape: tuple) -> int:
    """The input axis of a kernel: 0 for a Dense kernel ``(in, out)`` (and a vector), ``-2`` (channels in) above."""
    return 0 if len(shape) <= 2 else len(shape) - 2


def _heads_axis(shape: tuple, heads_axis: Optional[int], path: str) -> int:
    if heads_axis is None:
        raise FreezeConfigError(
            f"elements.groups: heads needs a variable with an attention heads axis (the query, key and value "
            f"kernels and biases and the output kernel of a MultiHeadAttention); {path!r} of shape {shape} has "
            "none. Select e.g. '*/attention_output/kernel'")
    return int(heads_axis)


def group_scores(weights: np.ndarray, groups: str, norm: str = DEFAULT_NORM,
                 block: Optional[Sequence[int]] = None, *, path: str = "?",
                 heads_axis: Optional[int] = None) -> np.ndarray:
    """The norm of every group of ``weights``.

    Args:
      weights: a kernel, any float dtype (scored in float64): ``(in, out)`` Dense, ``(..., in, out)`` conv; a
        vector is one axis of units (its elements are the groups).
      groups: ``"units"`` (last axis), ``"inputs"`` (axis 0 of a Dense kernel, -2 of a conv kernel),
        ``"blocks"`` or ``"heads"`` (axis ``heads_axis``).
      norm: ``"l1"`` (sum of ``|w|``) or ``"l2"`` (square root of the sum of squares).
      block: ``[b_in, b_out]`` for ``"blocks"``; the input and output axes must be multiples of them.
      path: the variable's path, for messages.
      heads_axis: for ``"heads"``, the variable's heads axis (:func:`trainer.masks.heads.head_axes`).

    Returns:
      float64 array: ``(out,)`` for units, ``(in,)`` for inputs, ``(in // b_in, out // b_out)`` for blocks,
      ``(heads,)`` for heads.

    Raises:
      FreezeConfigError: ``inputs`` or ``blocks`` of a variable with fewer than two axes; a kernel that the
        block does not tile; ``heads`` of a variable without a heads axis.
    """
    w = np.abs(np.asarray(weights, dtype=np.float64))
    if norm == "l2":
        w = w * w
    shape = tuple(w.shape)
    if groups == "units":
        if not shape:
            raise FreezeConfigError(f"elements.groups: units needs a variable with an axis; {path!r} is a scalar")
        scores = w.reshape(-1, shape[-1]).sum(axis=0)
    elif groups == "heads":
        axis = _heads_axis(shape, heads_axis, path)
        scores = np.moveaxis(w, axis, 0).reshape(shape[axis], -1).sum(axis=1)
    elif len(shape) < 2:
        raise FreezeConfigError(f"elements.groups: {groups} needs a kernel with an input axis; {path!r} has shape "
                                f"{shape}. Select only kernels (e.g. select: '*/kernel') or use groups: units")
    elif groups == "inputs":
        axis = _input_axis(shape)
        scores = np.moveaxis(w, axis, 0).reshape(shape[axis], -1).sum(axis=1)
    else:
        n_in, n_out = shape[-2], shape[-1]
        b_in, b_out = int(block[0]), int(block[1])
        if n_in % b_in or n_out % b_out:
            raise FreezeConfigError(
                f"elements.block {[b_in, b_out]} does not tile variable {path!r} of shape {shape}: its input and "
                f"output axes ({n_in}, {n_out}) must be multiples of the block")
        tiles = w.reshape(-1, n_in // b_in, b_in, n_out // b_out, b_out)
        scores = tiles.sum(axis=(0, 2, 4))
    return np.sqrt(scores) if norm == "l2" else scores


def expand_groups(frozen_groups: np.ndarray, shape: tuple, groups: str,
                  block: Optional[Sequence[int]] = None, heads_axis: Optional[int] = None) -> np.ndarray:
    """A per-group bool array (as :func:`group_scores` returns) spread over every element of its group.

    Returns:
      bool array of ``shape``.
    """
    shape = tuple(shape)
    if groups == "units":
        return np.broadcast_to(frozen_groups, shape).copy()
    if groups in ("inputs", "heads"):
        axis = _input_axis(shape) if groups == "inputs" else int(heads_axis)
        index = [None] * len(shape)
        index[axis] = slice(None)
        return np.broadcast_to(frozen_groups[tuple(index)], shape).copy()
    tiles = np.repeat(np.repeat(frozen_groups, block[0], axis=0), block[1], axis=1)
    return np.broadcast_to(tiles, shape).copy()


def smallest_groups(weights: np.ndarray, fraction: float, groups: str, norm: str = DEFAULT_NORM,
                    block: Optional[Sequence[int]] = None, *, path: str = "?",
                    heads_axis: Optional[int] = None) -> np.ndarray:
    """The elements of the ``round(fraction * n_groups)`` groups with the smallest norm.

    Args:
      weights: the variable's values (or those of ``elements.weights_file``).
      fraction: in ``[0, 1]``, the fraction of groups frozen.
      groups, norm, block, path, heads_axis: as in :func:`group_scores`.

    Returns:
      bool array of ``weights.shape``, ``True`` = frozen; whole groups only.

    Raises:
      FreezeConfigError: as :func:`group_scores`.

    Examples:
      >>> w = np.array([[1.0, -0.1, 3.0], [2.0, 0.2, -0.5]])
      >>> smallest_groups(w, 1 / 3, "units", "l1").astype(int).tolist()
      [[0, 1, 0], [0, 1, 0]]
    """
    scores = group_scores(weights, groups, norm, block, path=path, heads_axis=heads_axis)
    count = int(round(float(fraction) * scores.size))
    frozen = np.zeros(scores.size, dtype=bool)
    if count > 0:
        frozen[np.argsort(scores.reshape(-1), kind="stable")[:count]] = True
    return expand_groups(frozen.reshape(scores.shape), np.shape(weights), groups, block, heads_axis)


def count_frozen_groups(frozen: np.ndarray, groups: str, block: Optional[Sequence[int]] = None,
                        heads_axis: Optional[int] = None) -> tuple:
    """``(whole groups frozen, groups)`` of a frozen mask: what the dry run shows, e.g. ``(150, 300)`` units.

    A group counts when every one of its elements is frozen (by any rule). ``heads`` needs ``heads_axis``
    (without one, the variable's last axis is counted, as for units).
    """
    frozen = np.asarray(frozen, dtype=bool)
    shape = frozen.shape
    if groups == "heads" and heads_axis is not None:
        whole = np.moveaxis(frozen, int(heads_axis), 0).reshape(shape[int(heads_axis)], -1).all(axis=1)
    elif groups in ("units", "heads") or len(shape) < 2:
        whole = frozen.reshape(-1, shape[-1]).all(axis=0) if shape else frozen.reshape(1)
    elif groups == "inputs":
        axis = _input_axis(shape)
        whole = np.moveaxis(frozen, axis, 0).reshape(shape[axis], -1).all(axis=1)
    else:
        b_in, b_out = int(block[0]), int(block[1])
        whole = frozen.reshape(-1, shape[-2] // b_in, b_in, shape[-1] // b_out, b_out).all(axis=(0, 2, 4))
    return int(whole.sum()), int(whole.size)


def check_fan_in(value: Any) -> int:
    """``elements.fan_in`` as an int: a positive integer, the inputs every output unit keeps.

    Raises:
      FreezeConfigError: not a positive integer.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FreezeConfigError(f"elements.fan_in must be a positive integer (the inputs each output unit keeps), "
                                f"got {value!r}")
    return int(value)


def fan_in_keep(weights: np.ndarray, k: int, *, path: str = "?") -> np.ndarray:
    """Constant fan-in: the ``k`` largest ``|w|`` inputs of every output unit (last axis) train, the rest freeze.

    Every output unit then has exactly ``k`` trainable inputs (SRigL: Lasby et al. 2023, *Dynamic Sparse
    Training with Structured Sparsity*), so the kernel condenses to ``[out, k]`` values and indices
    (:func:`trainer.condensed.condense`). A conv kernel's fan-in is ``kh * kw * in``.

    Args:
      weights: a kernel ``(..., out)`` with at least two axes, any float dtype.
      k: inputs kept per output unit, ``1 <= k <= fan-in``.
      path: the variable's path, for messages.

    Returns:
      bool array of ``weights.shape``, ``True`` = kept (trainable); ties broken by the lower position.

    Raises:
      FreezeConfigError: a variable with fewer than two axes, or ``k`` above the fan-in.
    """
    shape = np.shape(weights)
    if len(shape) < 2:
        raise FreezeConfigError(f"elements.fan_in needs a kernel with an input axis; {path!r} has shape {tuple(shape)}")
    magnitudes = np.abs(np.asarray(weights, np.float64)).reshape(-1, shape[-1])
    if k > magnitudes.shape[0]:
        raise FreezeConfigError(f"elements.fan_in {k} is more than the {magnitudes.shape[0]} inputs of each unit of "
                                f"variable {path!r} of shape {tuple(shape)}; fan_in must lie in "
                                f"[1, {magnitudes.shape[0]}]")
    order = np.argsort(-magnitudes, axis=0, kind="stable")[:k]  # per column, the k largest
    keep = np.zeros(magnitudes.shape, dtype=bool)
    np.put_along_axis(keep, order, True, axis=0)
    return keep.reshape(shape)
