"""LT-SFT (Ansell et al. 2022, "Composable Sparse Fine-Tuning"): a dense phase, then only the top-k |w - w0| train.

Three steps through the public API (``hydra.compose`` + ``trainer.run``):

1. ``<out>/w0.npz``: the starting weights ``w0`` of the configured run
   (``trainer.run.build``: ``model.init_from`` loaded, a new head initialised
   from ``seed``), written with ``trainer.report.export_weights``.
2. ``<out>/dense/``: an ordinary run from ``w0`` (``model.init_from=<out>/w0.npz``,
   ``model.init_exclude=[]``) with every weight trainable (``sft.method=null``),
   for ``--dense-steps`` steps.
3. ``<out>/sparse/``: a new run from the same ``w0.npz`` — so every weight is
   reset to ``w0`` bit-exactly and the optimizer is created afresh (step 0,
   empty slots) — with ``sft.method=delta``, ``sft.dense_weights=<out>/dense/weights.npz``:
   the top-k elements by ``|w_dense - w0|`` among ``sft.select`` train, the
   other selected elements stay pinned at ``w0``.

A step whose ``report.json`` exists is skipped, so an interrupted driver resumes
(the Hydra start-up and the resumable run are ``_study.py``'s, shared with the other studies).

Example::

    python scripts/lt_sft.py --out multirun/lt_sft/k0.005 --k 0.005 --dense-steps 500 \\
        +experiment=transformer_sft seed=0
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Dict, Optional, Sequence

from _study import compose, configs, run_once

log = logging.getLogger("lt_sft")


def write_w0(overrides: Sequence[str], path: str) -> str:
    """Builds the configured run's model at its starting weights and writes them to ``path`` (``weights.npz`` form)."""
    if not os.path.isfile(path):
        import keras

        from trainer.report import export_weights
        from trainer.run import build

        keras.backend.clear_session()
        _, model, _, _ = build(compose([*overrides, "sft.method=null"]))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        export_weights(model, path)
    return path


def lt_sft(overrides: Sequence[str], out: str, *, k: float, dense_steps: Optional[int] = None) -> Dict[str, Dict]:
    """Runs the three steps (see the module docstring; inside ``_study.configs()``); returns
    ``{"dense": report, "sparse": report}``.

    Args:
      overrides: the run's config overrides (e.g. ``+experiment=transformer_sft``, ``seed=0``).
      out: the output directory.
      k: ``sft.k`` of the sparse phase (a fraction in (0, 1) or an integer count).
      dense_steps: ``trainer.max_steps`` of the dense phase (default: the config's).
    """
    out = os.path.abspath(out)
    w0 = write_w0(overrides, os.path.join(out, "w0.npz"))
    start = [*overrides, f"model.init_from={w0}", "model.init_exclude=[]"]
    dense = run_once([*start, "sft.method=null"] + ([f"trainer.max_steps={dense_steps}"] if dense_steps else []),
                     os.path.join(out, "dense"))
    sparse = run_once([*start, "sft.method=delta", f"sft.k={k!r}",
                       f"sft.dense_weights={os.path.join(out, 'dense', 'weights.npz')}"],
                      os.path.join(out, "sparse"))
    return {"dense": dense, "sparse": sparse}


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--k", type=float, required=True, help="a fraction in (0, 1), or a count >= 1")
    parser.add_argument("--dense-steps", type=int, default=None)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. +experiment=transformer_sft seed=0")
    args = parser.parse_args(argv)

    k = int(args.k) if args.k >= 1 else args.k
    started = time.perf_counter()
    with configs():
        reports = lt_sft(args.overrides, args.out, k=k, dense_steps=args.dense_steps)
    log.info("LT-SFT | dense test accuracy %.4f | sparse test accuracy %.4f (%d trainable) | %.1f s",
             reports["dense"]["test_accuracy"], reports["sparse"]["test_accuracy"],
             reports["sparse"]["trainable_elements"], time.perf_counter() - started)


if __name__ == "__main__":
    main()
