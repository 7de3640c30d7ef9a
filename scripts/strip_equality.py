"""Where the stripped CNN's logits differ from the masked model's: float32 evaluation or the stripping itself.

Rebuilds ``bench_export.py``'s ``struct<p>`` CNN case (seed 0, Adam 1e-3, batch 100, one thread), strips it,
and compares on the 10,000 MNIST test images:

- the stripped and masked models in float32 (the number the benchmark reports);
- each of them in float32 against a float64 evaluation of the *same* weights (``clone_model`` with a float64
  dtype policy), and the two float64 evaluations against each other: if the stripping is exact, the float64
  models agree to ~1e-14 and the float32 difference is the two models' own rounding;
- layer by layer, the stripped model's outputs against the masked model's kept channels / units: where
  the first difference appears (a layer whose sum runs over fewer terms) and how BatchNorm scales it.

    python scripts/strip_equality.py --epochs 2 --fraction 0.9
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import trainer  # noqa: E402
from bench_export import build, logits, prune_structured, train  # noqa: E402
from trainer.data import load_mnist  # noqa: E402
from trainer.stripping import plan_strip  # noqa: E402


def as_float64(model):
    """The same model and weights, computed in float64."""
    clone = keras.models.clone_model(
        model, clone_function=lambda l: type(l).from_config({**l.get_config(), "dtype": "float64"}))
    clone.set_weights([np.asarray(w, np.float64) for w in model.get_weights()])
    return clone


def by_layer(masked, small, registry, x, names):
    """``{layer: max |stripped - masked|}`` over the masked model's kept channels / units."""
    plans = plan_strip(masked, registry)
    owner, kept = {}, None
    for name in names:  # each layer's channels are those of the last producer before it
        kept = plans[name]["kept"] if name in plans else kept
        owner[name] = kept
    out = {}
    for name in names:
        a = np.asarray(keras.Model(masked.input, masked.get_layer(name).output)(x, training=False))
        b = np.asarray(keras.Model(small.input, small.get_layer(name).output)(x, training=False))
        if name == "flatten":
            units = masked.get_layer("conv2").filters
            a = a.reshape(len(x), -1, units)[..., owner[name]].reshape(len(x), -1)
        elif a.shape != b.shape:
            a = a[..., owner[name]]
        out[name] = (float(np.abs(a - b).max()), float(np.abs(a).max()))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--fraction", type=float, default=0.9)
    args = parser.parse_args(argv)
    tf.config.threading.set_intra_op_parallelism_threads(1)  # as bench_export.py
    tf.config.threading.set_inter_op_parallelism_threads(1)
    splits = load_mnist()
    model = build("cnn")
    registry = prune_structured(model, "cnn", args.fraction)
    train(model, registry, splits, args.epochs)
    small = trainer.strip(model, registry)
    x = splits.x_test
    m32, s32 = logits(model, x).astype(np.float64), logits(small, x).astype(np.float64)
    m64, s64 = logits(as_float64(model), x), logits(as_float64(small), x)
    print(f"oneDNN: {os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'default')}; max |logit| {np.abs(m64).max():.4g}")
    print(f"stripped32 - masked32   {np.abs(s32 - m32).max():.3e}  (what bench_export.py reports)")
    print(f"masked32   - masked64   {np.abs(m32 - m64).max():.3e}  (the masked model's float32 error)")
    print(f"stripped32 - masked64   {np.abs(s32 - m64).max():.3e}  (the stripped model's float32 error)")
    print(f"stripped64 - masked64   {np.abs(s64 - m64).max():.3e}  (the stripping itself, in float64)")
    worst = tuple(int(i) for i in np.unravel_index(np.argmax(np.abs(s32 - m32)), m32.shape))
    print(f"worst logit {worst}: masked32 {m32[worst]:.7f}, stripped32 {s32[worst]:.7f}, float64 {m64[worst]:.7f}, "
          f"float32 spacing there {np.spacing(np.float32(abs(m64[worst]))):.2e}")
    names = ["conv1", "bn1", "pool1", "conv2", "bn2", "flatten", "fc1", "fc2", "out"]
    for name, (diff, top) in by_layer(model, small, registry, x[:2000], names).items():
        print(f"{name:8s} max |stripped - masked| on kept channels {diff:.3e} (max |value| {top:.3g})")
    bn = model.get_layer("bn2")
    gamma, _, _, var = (np.asarray(w) for w in bn.get_weights())
    scale = np.abs(gamma) / np.sqrt(var + bn.epsilon)
    print("bn2 scale |gamma| / sqrt(var + eps) of conv2's kept channels:",
          [round(float(v), 3) for v in scale[plan_strip(model, registry)["conv2"]["kept"]]])


if __name__ == "__main__":
    main()
