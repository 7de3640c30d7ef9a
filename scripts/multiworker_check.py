"""Runs a two-process MultiWorkerMirroredStrategy job on 127.0.0.1 and checks both workers agree.

    python scripts/multiworker_check.py [--run-dir DIR] [extra overrides...]

Each worker is ``python -m trainer distribute.strategy=multi_worker ...`` with its
own ``TF_CONFIG``; worker 0 writes the run directory, worker 1 writes
``<run dir>/worker_1``. Exits 0 when both end with identical weights and every
frozen element exact, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np


def free_ports(count: int) -> list:
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default=None, help="run directory (default: a new temporary one)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds to wait for the workers")
    args, overrides = parser.parse_known_args(argv)
    run_dir = os.path.abspath(args.run_dir or tempfile.mkdtemp(prefix="multiworker_"))
    cluster = [f"127.0.0.1:{p}" for p in free_ports(2)]
    base = [sys.executable, "-m", "trainer", f"hydra.run.dir={run_dir}", "distribute.strategy=multi_worker",
            "freeze=random_90", "trainer.max_steps=10", "trainer.epochs=1", "export.keras=false", *overrides]
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                   TF_CONFIG=json.dumps({"cluster": {"worker": cluster}, "task": {"type": "worker", "index": index}}))
        log = open(os.path.join(tempfile.gettempdir(), f"multiworker_{os.getpid()}_{index}.log"), "w")
        procs.append((subprocess.Popen(base, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    codes = []
    for proc, log in procs:
        try:
            codes.append(proc.wait(timeout=args.timeout))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append("timeout")
        log.close()
    if codes != [0, 0]:
        for _, log in procs:
            print(open(log.name).read()[-3000:], file=sys.stderr)
        print(f"workers exited with {codes}", file=sys.stderr)
        return 1
    dirs = [run_dir, os.path.join(run_dir, "worker_1")]
    weights = [np.load(os.path.join(d, "weights.npz")) for d in dirs]
    reports = [json.load(open(os.path.join(d, "report.json"))) for d in dirs]
    same = all(np.array_equal(weights[0][k], weights[1][k]) for k in weights[0].files)
    exact = all(r["frozen_exact"] for r in reports)
    print(json.dumps({"run_dir": run_dir, "steps": [r["steps"] for r in reports], "identical_weights": same,
                      "frozen_exact": exact, "test_accuracy": [r["test_accuracy"] for r in reports]}))
    return 0 if same and exact else 1


if __name__ == "__main__":
    sys.exit(main())
