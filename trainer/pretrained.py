"""Initial weights for a built model from a ``weights.npz`` (``model.init_from``), checked before any is assigned.

Kept apart from :mod:`trainer.models`, which knows nothing of masks: the
``exclude`` globs are the freeze rules' variable-path patterns
(:func:`trainer.masks.variables.path_matches`: a glob or ``re:<regex>``
matching the path or a trailing sub-path).
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

import keras

from trainer.masks.variables import path_matches
from trainer.npfiles import NpzReader, check_values

__all__ = ["load_initial_weights", "made_by_for"]


def made_by_for(path: str, command: Optional[str]) -> Optional[str]:
    """``command`` when it writes ``path``: it runs into the file's directory (``hydra.run.dir=<dir>``).

    An experiment names the run that makes its default ``model.init_from`` (``model.init_from_made_by``);
    after ``model.init_from=<another file>`` that command would make another file, and is not named.
    """
    if not command:
        return None
    return command if f"hydra.run.dir={os.path.dirname(os.fspath(path))}" in command.split() else None


def load_initial_weights(model: keras.Model, path: str, exclude: Sequence[str], partial: bool = False,
                         made_by: Optional[str] = None) -> List[str]:
    """Assigns values from a ``weights.npz`` (arrays keyed by variable path) to matching variables.

    Variables matching an ``exclude`` pattern are left at their initialization
    (e.g. a new output head). Every array is checked before any is assigned
    (:mod:`trainer.npfiles`): a regular ``.npz`` file within the size limit,
    the variable's shape read from the header before the data, numbers that
    are finite and representable in the variable's dtype (an array of another
    numeric dtype is cast to it).

    Args:
      model: the built model.
      path: the ``.npz`` file (``model.init_from``): one array per variable
        path, each of that variable's shape.
      exclude: globs (or ``re:`` regexes) of variable paths to leave alone
        (``model.init_exclude``).
      partial: allow variables that the file lacks to keep their random
        initialization (``model.init_from_partial``).
      made_by: the command that writes ``path`` (``model.init_from_made_by``, e.g.
        ``"python -m trainer +experiment=transformer_task_a seed=0 hydra.run.dir=multirun/transformer/task_a/seed0"``):
        a missing file is refused naming it (:func:`made_by_for`).

    Returns:
      The variable paths loaded, in model order.

    Raises:
      ValueError: one line naming the file and the problem: missing (with the
        command that makes it, where ``made_by`` writes it), not a regular
        ``.npz`` file, a shape, dtype or value that does not fit, variables the
        file lacks (without ``partial``), or none of the model's variables.
    """
    where = f"model.init_from {str(path)!r}"
    wanted = [v for v in model.variables if not any(path_matches(p, v.path) for p in exclude)]
    values = {}
    with NpzReader(path, "model.init_from", made_by=made_by_for(path, made_by)) as data:
        for v in wanted:
            if v.path not in data.files:
                continue
            shape, _ = data.header(v.path)
            if tuple(shape) != tuple(v.shape):
                raise ValueError(f"{where}: {v.path!r} has shape {shape}, the model's has {tuple(v.shape)}; "
                                 "exclude it with model.init_exclude")
            values[v.path] = check_values(v.path, data.array(v.path), v.dtype, where)
        if not values:
            raise ValueError(f"{where} holds none of the model's variables; it has {sorted(data.files)[:10]}")
    missing = [v.path for v in wanted if v.path not in values]
    if missing and not partial:
        raise ValueError(f"{where} has no array for {len(missing)} of the model's variables ({', '.join(missing[:5])}"
                         f"{', ...' if len(missing) > 5 else ''}); they would keep their random initialization: "
                         "exclude them with model.init_exclude, or set model.init_from_partial=true")
    for v in wanted:
        if v.path in values:
            v.assign(values[v.path])
    return list(values)
