"""``trainer.remat`` measured: step time and peak RSS of a small Llama at 1,024 tokens, with and without.

Each case runs in its own process (this script's ``--case``), so its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own: a keras-hub
``LlamaBackbone`` built by :func:`trainer.causal_lm.causal_lm` (byte
vocabulary), ``trainer.Trainer`` (AdamW, no freezing, ``jit_compile`` off as
in ``configs/config.yaml``), one sequence of ``--tokens`` tokens a step;
``--warmup`` steps (compilation) are left out of the time. With
``remat``, :func:`trainer.remat.apply_remat` wraps every block in
``tf.recompute_grad``. Public API only.

Example::

    python scripts/remat_bench.py --tokens 1024 --out experiments/sparse_llm/remat.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ("off", "on")


def run_case(remat: bool, args) -> Dict[str, Any]:
    """One case in this process: ``{"remat", "parameters", "seconds_per_step", "peak_rss_mib", "loss"}``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, REPO)
    import keras
    import numpy as np
    import tensorflow as tf

    from trainer import Trainer
    from trainer.causal_lm import causal_lm
    from trainer.remat import apply_remat

    keras.utils.set_random_seed(0)
    model = causal_lm((args.tokens,), 256, backbone=dict(
        num_layers=args.layers, hidden_dim=args.hidden, intermediate_dim=args.intermediate,
        num_query_heads=args.heads, num_key_value_heads=args.kv_heads))
    if remat:
        apply_remat(model)
    tokens = np.random.default_rng(0).integers(1, 256, (args.steps + args.warmup, args.tokens + 1)).astype(np.int32)
    data = tf.data.Dataset.from_tensor_slices((tokens[:, :-1], tokens[:, 1:])).batch(1)
    trainer = Trainer(model, keras.optimizers.AdamW(1e-4),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True), steps_per_execution=1,
                      jit_compile=False)
    trainer.fit(data.take(args.warmup), epochs=1, verbose=False)
    started = time.perf_counter()
    history = trainer.fit(data.skip(args.warmup), epochs=1, verbose=False)
    seconds = (time.perf_counter() - started) / args.steps
    return {"remat": remat, "parameters": int(model.count_params()), "tokens": args.tokens,
            "seconds_per_step": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loss": float(history[-1]["loss"])}


def measure(args) -> List[Dict[str, Any]]:
    """Both cases, each in a subprocess of this script, one after the other."""
    rows = []
    for case in CASES:
        command = [sys.executable, os.path.abspath(__file__), "--case", case, *sys.argv[1:]]
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def table(rows: Sequence[Dict[str, Any]]) -> str:
    """A Markdown table of the cases."""
    lines = ["| trainer.remat | parameters | tokens | s / step | peak RSS (MiB) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {'true' if r['remat'] else 'false'} | {r['parameters']:,} | {r['tokens']:,} | "
              f"{r['seconds_per_step']:.2f} | {r['peak_rss_mib']:,.0f} |" for r in rows]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--intermediate", type=int, default=1152)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the time (compilation)")
    parser.add_argument("--out", help="also write the table here")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case == "on", args)))
        return
    text = table(measure(args))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
