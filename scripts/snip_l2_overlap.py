"""How much the coupled-L2 term changes SNIP's masks in ``snip_study.py --experiment snip_lenet_lee``.

``trainer.masks.scores.gradient_scores`` differentiates the loss plus ``model.losses``, so with
``model.coupled_l2: 5e-4`` our SNIP scores are ``|(g + 5e-4 w) * w|``; snip-public differentiates the
cross-entropy alone. For one seed this rebuilds the study's model (checking it against the study's
``init.npz``), takes the same scoring batch, computes both scores and prints, per density and kernel, the
kept counts with and without the L2 term and how many kept weights they share. Example::

    PYTHONPATH=. python scripts/snip_l2_overlap.py --seed 0 --study /tmp/dst_runs/snip_lee
"""

from __future__ import annotations

import argparse
import os

import numpy as np


def main() -> None:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--study", required=True, help="the --out directory of snip_study.py")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.02])
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from _study import compose, configs
    from trainer.data import make_dataset
    from trainer.masks.scores import global_topk_masks, gradient_scores, snip_scores
    from trainer.run import build

    with configs():
        cfg = compose(["+experiment=snip_lenet_lee", f"seed={args.seed}"])
        keras.backend.clear_session()
        splits, model, _, _ = build(cfg)
    init = np.load(os.path.join(args.study, f"seed{args.seed}", "init.npz"))
    for v in model.variables:
        if v.path in init.files and not np.array_equal(v.numpy(), init[v.path]):
            raise SystemExit(f"{v.path} differs from the study's init.npz")
    kernels = [v for v in model.trainable_variables if v.path.endswith("/kernel")]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def batches():  # the study's scoring batch: the first batch of a fresh seeded pipeline
        return make_dataset(splits.x_train, splits.y_train, 100, shuffle=True, seed=args.seed)

    with_l2 = gradient_scores(model, batches(), loss=loss, num_batches=1, variables=kernels).mean_gradient
    x, y = next(iter(batches()))
    with tf.GradientTape() as tape:
        value = loss(y, model(x, training=False))
    data_only = {v.path: g.numpy().astype(np.float64) for v, g in zip(kernels, tape.gradient(value, kernels))}
    weights = {v.path: v.numpy() for v in kernels}
    for density in args.densities:
        a = global_topk_masks(snip_scores(weights, with_l2), density)
        b = global_topk_masks(snip_scores(weights, data_only), density)
        stored = os.path.join(args.study, f"seed{args.seed}", f"snip_d{100 * density:g}.npz")
        same = os.path.isfile(stored) and all(np.array_equal(a[k], np.load(stored)[k]) for k in a)
        print(f"density {density:g} (with-L2 mask identical to the study's: {same})")
        for k in a:
            print(f"  {k}: kept with L2 {int(a[k].sum())}, without {int(b[k].sum())}, "
                  f"shared {int((a[k] & b[k]).sum())}")
        shared = sum(int((a[k] & b[k]).sum()) for k in a)
        print(f"  all kernels: {shared} of {sum(int(m.sum()) for m in a.values())} kept weights shared")


if __name__ == "__main__":
    main()
