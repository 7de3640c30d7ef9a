"""Sparse fine-tuning: turns the ``sft`` config block into explicit trainable-masks before training.

Selectors (the kept elements train, every other element of the selected
variables is pinned at its current value, bit-exactly):

- ``fish``: the top-k elements by Fisher information, the mean of squared
  batch gradients over ``batches`` batches of the new task (Sung et al. 2021,
  "Training Neural Networks with Fixed Sparse Masks");
- ``snip``: the top-k by ``|g * w|`` at the starting weights (Lee et al. 2019);
- ``random``: a uniformly random top-k (SHiRA's default, Bhardwaj et al. 2024);
- ``magnitude``: the top-k by ``|w|``;
- ``delta``: the top-k by ``|w_dense - w|``, ``w_dense`` read from
  ``sft.dense_weights`` (a ``weights.npz``) — the mask of LT-SFT (Ansell et
  al. 2022, "Composable Sparse Fine-Tuning"), whose two phases
  ``scripts/lt_sft.py`` runs.

``k`` is a fraction in (0, 1) of the selected elements, or an integer count.
Scores are ranked across all the selected variables together
(``ranking: global``) or within each (``ranking: layerwise``, fractions
only), with :mod:`trainer.masks.scores`' tie rule. Embedding tables and the
``EinsumDense`` kernels of ``MultiHeadAttention`` are variables like any other.
The masks reach the registry as ordinary freeze rules (``elements: {mask: ...}``,
one rule ``sft:<path>`` per variable), so they appear in the plan, the
report and ``masks.npz``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import keras
import numpy as np
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from trainer.masks import MaskRegistry
from trainer.masks.checks import check_known, is_whole
from trainer.masks.scores import gradient_scores, magnitude_scores, random_scores, topk_mask
from trainer.masks.variables import path_matches

__all__ = ["SFTConfigError", "apply_sft", "kept_masks", "selected_variables", "sft_options", "sft_scores",
           "trainable_elements"]

METHODS = ("fish", "snip", "random", "magnitude", "delta")
RANKINGS = ("global", "layerwise")
KEYS = ("method", "k", "batches", "batch_size", "select", "exclude", "ranking", "seed", "dense_weights", "value")
VALUES = ("current", "zero")


class SFTConfigError(ValueError):
    """A bad ``sft`` value (raised before training starts)."""


def sft_options(cfg: Any) -> Optional[Dict[str, Any]]:
    """The ``sft`` block as a checked dict, or None when ``sft.method`` is null.

    Raises:
      SFTConfigError: one line naming the bad key or value and what is allowed.
    """
    if cfg is None:
        return None
    options = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    check_known(options, KEYS, error=SFTConfigError, what="sft: unknown key(s) {unknown}")
    method = options.get("method")
    if method is None:
        return None
    if method not in METHODS:
        raise SFTConfigError(f"sft.method must be one of {list(METHODS)} or null, got {method!r}")
    k = options.get("k")
    if not (is_whole(k, 1) or (isinstance(k, float) and 0 < k < 1)):
        raise SFTConfigError(f"sft.k must be a fraction in (0, 1) or a positive integer count, got {k!r}")
    ranking = options.get("ranking") or "global"
    if ranking not in RANKINGS:
        raise SFTConfigError(f"sft.ranking must be one of {list(RANKINGS)}, got {ranking!r}")
    if ranking == "layerwise" and is_whole(k):
        raise SFTConfigError(f"sft.ranking=layerwise needs k as a fraction in (0, 1), got the count {k}")
    batches = options.get("batches", 8)
    if method in ("fish", "snip") and not is_whole(batches, 1):
        raise SFTConfigError(f"sft.batches must be a positive integer, got {batches!r}")
    batch_size = options.get("batch_size")
    if batch_size is not None and not is_whole(batch_size, 1):
        raise SFTConfigError(f"sft.batch_size must be a positive integer or null, got {batch_size!r}")
    seed = options.get("seed", 0)
    if not is_whole(seed, 0):
        raise SFTConfigError(f"sft.seed must be a non-negative integer, got {seed!r}")
    if method == "delta" and not options.get("dense_weights"):
        raise SFTConfigError("sft.method=delta needs sft.dense_weights, the weights.npz of the dense phase")
    pinned = options.get("value") or "current"
    if pinned not in VALUES:
        raise SFTConfigError(f"sft.value must be one of {list(VALUES)} (what the elements outside the top-k are "
                             f"pinned to), got {pinned!r}")
    select = options.get("select") or ["*"]
    exclude = options.get("exclude") or []
    for key, value in (("select", select), ("exclude", exclude)):
        if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
            raise SFTConfigError(f"sft.{key} must be a list of globs over variable paths, got {value!r}")
    return {"method": method, "k": k, "batches": batches, "batch_size": batch_size, "select": select,
            "exclude": exclude, "ranking": ranking, "seed": seed, "dense_weights": options.get("dense_weights"),
            "value": pinned}


def selected_variables(model: keras.Model, select: List[str], exclude: List[str]) -> List[keras.Variable]:
    """The model's trainable variables matching a ``select`` glob and no ``exclude`` glob.

    Raises:
      SFTConfigError: a ``select`` glob that matches no trainable variable, or nothing left.
    """
    variables = list(model.trainable_variables)
    for pattern in select:
        if not any(path_matches(pattern, v.path) for v in variables):
            raise SFTConfigError(f"sft.select {pattern!r} matches no trainable variable; "
                                 f"variables: {[v.path for v in variables][:20]}")
    chosen = [v for v in variables if any(path_matches(p, v.path) for p in select)
              and not any(path_matches(p, v.path) for p in exclude)]
    if not chosen:
        raise SFTConfigError(f"sft.select {select} minus sft.exclude {exclude} leaves no variable")
    return chosen


def kept_masks(scores: Mapping[str, np.ndarray], k: Any, ranking: str = "global") -> Dict[str, np.ndarray]:
    """The top-k trainable-masks of ``scores`` (``True`` = kept).

    Args:
      scores: ``{path: float array}``, no NaN.
      k: a fraction in (0, 1) of all the elements (``round(k * N)``, at least
        1) or an integer count in [1, N].
      ranking: ``global`` (one ranking over the variables, in path order, as
        :func:`trainer.masks.scores.global_topk_masks`) or ``layerwise``
        (``round(k * size)`` per variable).

    Returns:
      ``{path: bool array}`` with exactly the count kept (global).

    Raises:
      SFTConfigError: a count larger than the selected elements.
    """
    if ranking == "layerwise":
        return {p: topk_mask(s, max(1, int(round(k * np.size(s)))), path=p) for p, s in scores.items()}
    order = sorted(scores)
    total = int(sum(np.size(scores[p]) for p in order))
    count = int(k) if is_whole(k) else max(1, int(round(float(k) * total)))
    if count > total:
        raise SFTConfigError(f"sft.k={k} is more than the {total:,} selected elements")
    keep = topk_mask(np.concatenate([np.asarray(scores[p], np.float64).reshape(-1) for p in order]), count,
                     path="sft")
    result, start = {}, 0
    for p in order:
        size = int(np.size(scores[p]))
        result[p] = keep[start:start + size].reshape(np.shape(scores[p]))
        start += size
    return result


def sft_scores(options: Mapping[str, Any], model: keras.Model, variables: List[keras.Variable],
               dataset: Optional[tf.data.Dataset], loss: Any = None) -> Dict[str, np.ndarray]:
    """The scores of ``options["method"]`` for ``variables`` (float64, keyed by path).

    Args:
      options: from :func:`sft_options`.
      model: the model at its starting weights.
      variables: the selected variables.
      dataset: ``(x, y)`` batches of the new task (``fish``, ``snip``).
      loss: the run's loss for the gradients (default sparse categorical cross-entropy of logits).

    Raises:
      SFTConfigError: a ``dense_weights`` file that lacks a variable or has another shape.
    """
    method = options["method"]
    weights = {v.path: np.asarray(v.numpy()) for v in variables}
    if method in ("fish", "snip"):
        loss = loss if loss is not None else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        stats = gradient_scores(model, dataset, loss=loss,
                                num_batches=int(options["batches"]), variables=variables)
        return stats.fisher if method == "fish" else stats.snip
    if method == "magnitude":
        return magnitude_scores(weights)
    if method == "random":
        return random_scores({p: w.shape for p, w in weights.items()}, seed=int(options["seed"]))
    from trainer.npfiles import NpzReader

    scores = {}
    with NpzReader(options["dense_weights"], "sft.dense_weights") as data:
        for path, w in weights.items():
            if path not in data.files:
                raise SFTConfigError(f"sft.dense_weights {options['dense_weights']!r} has no array {path!r}")
            dense = np.asarray(data.array(path))
            if dense.shape != w.shape:
                raise SFTConfigError(f"sft.dense_weights {path!r} has shape {dense.shape}, the model's {w.shape}")
            scores[path] = np.abs(dense.astype(np.float64) - w.astype(np.float64))
    return scores


def apply_sft(cfg: Any, *, model: keras.Model, registry: MaskRegistry, x: Any = None, y: Any = None,
              batch_size: int = 60, seed: int = 0, loss: Any = None) -> int:
    """Resolves the ``sft`` block into one freeze rule per selected variable; returns the kept count (0: no sft).

    Each selected variable ``v`` gets ``registry.freeze(v.path, elements={"mask": kept}, value=sft.value,
    name="sft:" + v.path)``: its elements outside the top-k are pinned at
    their current (starting) values, or to zero with ``sft.value=zero``
    (pruning at initialisation, e.g. SNIP).

    Args:
      cfg: the ``sft`` config block (or None).
      model: the built model at its starting weights (after ``init_from``).
      registry: the run's registry (its config rules added already).
      x, y: the new task's training set (``fish``, ``snip``), batched as the
        run's (shuffled with ``seed``) in batches of ``sft.batch_size``
        (default ``batch_size``).
      batch_size: the run's batch size.
      seed: the run's seed (the data order).
      loss: the run's loss, for ``fish`` / ``snip`` gradients (default: cross-entropy of logits).

    Raises:
      SFTConfigError: a bad value (see :func:`sft_options`).
      FreezeConfigError: a mask that conflicts with another rule.
    """
    options = sft_options(cfg)
    if options is None:
        return 0
    variables = selected_variables(model, options["select"], options["exclude"])
    dataset = None
    if options["method"] in ("fish", "snip"):
        from trainer.data import make_dataset

        dataset = make_dataset(x, y, int(options["batch_size"] or batch_size), shuffle=True, seed=int(seed))
    masks = kept_masks(sft_scores(options, model, variables, dataset, loss), options["k"], options["ranking"])
    for v in variables:
        registry.freeze(v.path, elements={"mask": masks[v.path]}, value=options["value"], name=f"sft:{v.path}")
    return int(sum(int(m.sum()) for m in masks.values()))


def trainable_elements(registry: MaskRegistry) -> int:
    """Elements that may change: the trainable-mask ``True`` entries of every trainable variable.

    With LoRA this counts the adapters (the frozen kernels are non-trainable
    variables) plus whatever else trains, e.g. a new head.
    """
    return int(sum(int(np.count_nonzero(m)) for m in registry.trainable_masks().values()))
