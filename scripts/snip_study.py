"""SNIP at initialisation (Lee et al. 2019) and its layer-wise shuffle control (Frankle et al. 2021).

For every seed:

1. compose ``+experiment=snip_mlp seed=S`` (``--experiment``: another config, e.g.
   ``snip_lenet_lee``; plus extra overrides) and build the
   run's model with ``trainer.run.build``: the same seeded construction as the
   run itself. Its weights are written to ``<out>/seed<S>/init.npz`` and every
   run of that seed starts from them (``model.init_from``), so the weights the
   scores were computed on are exactly the weights training starts from;
2. SNIP scores ``|g * w|`` of the kernels (``trainer.masks.scores.gradient_scores``
   and ``snip_scores``), ``g`` the gradient of the cross-entropy on
   ``--batches`` batches of ``--batch-size`` training images (Lee et al.: one
   batch of 100 for MNIST), drawn from the training set with the seed;
3. per density, the global top-k of the scores over all kernels
   (``global_topk_masks``) is the SNIP mask, written as
   ``<out>/seed<S>/snip_d<P>.npz`` (bool trainable-masks keyed by variable path,
   1 = trainable); its layer-wise shuffle (each kernel's mask permuted with
   ``np.random.default_rng([S, crc32(path)])``: same count per layer, random
   positions) is ``shuffled_d<P>.npz``;
4. each mask is trained with the command line, in a fresh process::

       python -m trainer +experiment=snip_mlp seed=S name=snip|snip_shuffled \\
           model.init_from=<out>/seed<S>/init.npz \\
           '+freeze.rules.snip={select:"*/kernel",elements:{mask_file:<mask.npz>},value:zero}' \\
           hydra.run.dir=<out>/runs/<name>_d<P>_seed<S>

   (pruned weights are pinned to 0; kept weights start at their initial
   values, not rescaled, as in SNIP; ``--rescale`` adds ``rescale_trainable:
   true`` to the rule and ``_rescaled`` to the run names). A run whose
   ``report.json`` exists is skipped, so an interrupted study resumes.

``--score-biases`` ranks the biases too, as ``namhoonlee/snip-public`` does: for
the scores only, every bias is drawn from the kernels' variance-scaling
initialiser (their ``initializer_b_bp='vs'``: fan-in = the bias length, truncated
normal, seeded with the seed); the global top-k then runs over kernels and
biases together (``round(density * (kernels + biases))`` kept), the masks hold
the biases too, and the runs (``_biases`` appended to their names) pin the
pruned biases at 0 (rule ``select: "*"``) and start every bias at 0 (their
``initializer_b_ap='zeros'``; ``init.npz`` is unchanged).

``<out>/masks.json`` lists the per-layer kept fractions of every mask.
Only the public API of ``trainer`` is used. Example::

    python scripts/snip_study.py --seeds 0 1 2 --densities 0.02 0.05 --out /tmp/snip_study
    python scripts/aggregate_reports.py /tmp/snip_study/runs --x kept_percent --series name \\
        --metric test_accuracy --published 2=97.6 --published 5=98.4 --log-x \\
        --table experiments/snip/results.md --plot experiments/snip/accuracy.png
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
import zlib
from typing import Dict, List, Optional, Sequence

import numpy as np

from _study import REPO, compose, configs, finished, read_report

log = logging.getLogger("snip_study")


def percent_tag(density: float) -> str:
    """``0.02`` -> ``"2"``, ``0.005`` -> ``"0.5"``: the density in percent, for file names."""
    return f"{100 * density:g}"


def shuffle_within_layers(masks: Dict[str, np.ndarray], seed: int) -> Dict[str, np.ndarray]:
    """Each mask's elements permuted at random within its variable (same kept count per layer)."""
    out = {}
    for path, mask in masks.items():
        rng = np.random.default_rng([int(seed), zlib.crc32(path.encode())])
        out[path] = rng.permutation(mask.reshape(-1)).reshape(mask.shape)
    return out


def kept_fractions(masks: Dict[str, np.ndarray]) -> Dict[str, float]:
    """``{path: kept fraction}`` plus ``"total"`` over all the masks."""
    out = {p: float(m.mean()) for p, m in masks.items()}
    out["total"] = float(sum(m.sum() for m in masks.values()) / sum(m.size for m in masks.values()))
    return out


def prepare_seed(seed: int, densities: Sequence[float], out: str, overrides: Sequence[str], *,
                 batches: int, batch_size: int, experiment: str = "snip_mlp",
                 score_biases: bool = False) -> Dict[str, Dict[str, float]]:
    """Writes ``init.npz`` and the SNIP and shuffled masks of one seed; returns their per-layer kept fractions.

    ``score_biases``: the biases are scored too, at variance-scaling draws (see the module docstring), and
    the masks cover them."""
    import keras

    from trainer.data import make_dataset
    from trainer.masks.scores import global_topk_masks, gradient_scores, snip_scores
    from trainer.report import export_weights
    from trainer.run import build

    directory = os.path.join(out, f"seed{seed}")
    os.makedirs(directory, exist_ok=True)
    cfg = compose([f"+experiment={experiment}", f"seed={seed}", *overrides])
    keras.backend.clear_session()
    splits, model, _, _ = build(cfg)
    init_path = os.path.join(directory, "init.npz")
    export_weights(model, init_path)

    kernels = [v for v in model.trainable_variables if v.path.endswith("/kernel")]
    if score_biases:
        biases = [v for v in model.trainable_variables if v.path.endswith("/bias")]
        for i, v in enumerate(biases):
            init = keras.initializers.VarianceScaling(scale=1.0, mode="fan_in", distribution="truncated_normal",
                                                      seed=int(seed) * 1000 + i)
            v.assign(init(v.shape, dtype=v.dtype))
        kernels = kernels + biases  # scored together; the model is not trained, init.npz keeps zero biases
    dataset = make_dataset(splits.x_train, splits.y_train, batch_size, shuffle=True, seed=seed)
    grads = gradient_scores(model, dataset, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                            num_batches=batches, variables=kernels)
    scores = snip_scores({v.path: v.numpy() for v in kernels}, grads.mean_gradient)

    summary = {}
    for density in densities:
        snip = global_topk_masks(scores, density)
        shuffled = shuffle_within_layers(snip, seed)
        for kind, masks in (("snip", snip), ("shuffled", shuffled)):
            path = os.path.join(directory, f"{kind}_d{percent_tag(density)}.npz")
            np.savez(path, **{p: m.astype(bool) for p, m in masks.items()})
            summary[f"{kind}_d{percent_tag(density)}"] = kept_fractions(masks)
    return summary


def run_command(seed: int, name: str, init_path: str, mask_path: str, run_dir: str,
                overrides: Sequence[str], rescale: bool = False, experiment: str = "snip_mlp",
                select: str = "*/kernel") -> List[str]:
    """The command line of one training run (``rescale``: the rule also has ``rescale_trainable: true``;
    ``select``: the variables the mask file covers)."""
    extra = ",rescale_trainable:true" if rescale else ""
    rule = f"{{select:'{select}',elements:{{mask_file:'{mask_path}'}},value:zero{extra}}}"
    return [sys.executable, "-m", "trainer", f"+experiment={experiment}", f"seed={seed}", f"name={name}",
            f"model.init_from={init_path}", f"+freeze.rules.snip={rule}", f"hydra.run.dir={run_dir}",
            *overrides]


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--experiment", default="snip_mlp", help="the experiment config every run composes "
                        "(snip_lenet_lee: Lee et al.'s SGD recipe)")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.02, 0.05],
                        help="fractions of all kernel weights kept")
    parser.add_argument("--kinds", nargs="+", default=["snip", "shuffled"], choices=["snip", "shuffled"])
    parser.add_argument("--batches", type=int, default=1, help="batches the SNIP gradient is averaged over")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--out", default="/tmp/snip_study")
    parser.add_argument("--rescale", action="store_true",
                        help="rescale_trainable: true (kept weights of a unit scaled by sqrt(fan-in / kept fan-in)); "
                             "the run names get a _rescaled suffix")
    parser.add_argument("--score-biases", action="store_true",
                        help="rank the biases too, at variance-scaling draws, as snip-public (module docstring); "
                             "the run names get a _biases suffix")
    parser.add_argument("--prepare-only", action="store_true", help="write the masks, train nothing")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every run, e.g. trainer.epochs=5")
    args = parser.parse_args(argv)

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    summary_path = os.path.join(out, "masks.json")
    summary = {}
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
    with configs():
        for seed in args.seeds:
            needed = [os.path.join(out, f"seed{seed}", f"{k}_d{percent_tag(d)}.npz")
                      for k in ("snip", "shuffled") for d in args.densities]
            if not all(os.path.isfile(p) for p in needed + [os.path.join(out, f"seed{seed}", "init.npz")]):
                summary[f"seed{seed}"] = prepare_seed(seed, args.densities, out, args.overrides,
                                                      batches=args.batches, batch_size=args.batch_size,
                                                      experiment=args.experiment,
                                                      score_biases=args.score_biases)
                with open(summary_path, "w") as f:
                    json.dump(summary, f, indent=1)
            for key, fractions in sorted(summary.get(f"seed{seed}", {}).items()):
                log.info("seed %d %s kept: %s", seed, key,
                         " | ".join(f"{p} {100 * v:.2f} %" for p, v in fractions.items()))
    if args.prepare_only:
        return

    start = time.perf_counter()
    for density in args.densities:
        for kind in args.kinds:
            name = (("snip" if kind == "snip" else "snip_shuffled") + ("_rescaled" if args.rescale else "")
                    + ("_biases" if args.score_biases else ""))
            for seed in args.seeds:
                tag = percent_tag(density)
                run_dir = os.path.join(out, "runs", f"{name}_d{tag}_seed{seed}")
                if finished(run_dir):
                    log.info("skip %s (report.json exists)", run_dir)
                    continue
                command = run_command(seed, name, os.path.join(out, f"seed{seed}", "init.npz"),
                                      os.path.join(out, f"seed{seed}", f"{kind}_d{tag}.npz"), run_dir,
                                      args.overrides, rescale=args.rescale, experiment=args.experiment,
                                      select="*" if args.score_biases else "*/kernel")
                log.info("run %s", " ".join(command[1:]))
                subprocess.run(command, check=True, cwd=REPO)
                report = read_report(run_dir)
                log.info("%s density %s seed %d | test accuracy %.4f | %.1f s", name, tag, seed,
                         report["test_accuracy"], report["wall_seconds"])
    log.info("all runs: %.1f min", (time.perf_counter() - start) / 60)


if __name__ == "__main__":
    main()
