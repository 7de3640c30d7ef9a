"""Iterative magnitude pruning with rewinding (lottery tickets, Frankle & Carbin 2019), round by round.

Each round is one ordinary run of ``+experiment=lottery_ticket`` through the
public API (``hydra.compose`` + ``trainer.run.run``); nothing here trains.
Round ``r`` adds two overrides to the experiment's freeze rules:

* ``prune_hidden`` (fc1, fc2 kernels): ``{magnitude: 1 - 0.8^r, weights_file: <round r-1>/weights.npz}``
* ``prune_out`` (out kernel): ``{magnitude: 1 - 0.9^r, weights_file: <round r-1>/weights.npz}``

with ``value: zero``. Weights pruned in earlier rounds are exactly 0 in the
previous round's weights, so they are the smallest and stay pruned; each
round prunes 20 % (10 % for ``out``) of the weights that survived. The
surviving weights rewind to the original initialization because the same
``seed`` builds the same initial model. At the rounds in ``--reinit-rounds``
the same mask is also trained from another initialization
(``model.init_seed=1000+seed``, ``name=lottery_ticket_reinit``).

Output: ``<out>/seed<S>/ticket/round<RR>/`` and ``<out>/seed<S>/reinit/round<RR>/``,
each an ordinary run directory plus the composed ``config.yaml``. Rounds whose
``report.json`` exists are skipped, so an interrupted study resumes.

Example::

    python scripts/lottery_ticket.py --seeds 0 1 2 --rounds 18 --out multirun/lottery_ticket
    python scripts/aggregate_reports.py multirun/lottery_ticket --x kept_percent --series name \\
        --metric early_stopping.test_accuracy --metric test_accuracy --log-x --invert-x \\
        --table experiments/lottery_ticket/results.md --plot experiments/lottery_ticket/accuracy.png
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import List, Optional, Sequence

from _study import configs, run_once

log = logging.getLogger("lottery_ticket")


def remaining_fraction(round_: int, hidden_rate: float = 0.2, out_rate: float = 0.1,
                       sizes: Sequence[int] = (784 * 300, 300 * 100, 100 * 10)) -> float:
    """The fraction of LeNet-300-100's kernel weights left after ``round_`` rounds (0.513 after 3)."""
    hidden = sum(sizes[:-1]) * (1 - hidden_rate) ** round_
    return (hidden + sizes[-1] * (1 - out_rate) ** round_) / sum(sizes)


def round_overrides(round_: int, previous_weights: Optional[str], hidden_rate: float = 0.2,
                    out_rate: float = 0.1) -> List[str]:
    """The command-line overrides of round ``round_`` (none for the dense round 0).

    Raises:
      ValueError: a round after 0 without the previous round's ``weights.npz``.
    """
    if round_ == 0:
        return []
    if not previous_weights:
        raise ValueError(f"round {round_} needs the weights.npz of round {round_ - 1}")
    out = []
    for rule, rate in (("prune_hidden", hidden_rate), ("prune_out", out_rate)):
        out += [f"freeze.rules.{rule}.elements.magnitude={1 - (1 - rate) ** round_!r}",
                f"++freeze.rules.{rule}.elements.weights_file={os.path.abspath(previous_weights)}"]
    return out


def run_one(overrides: Sequence[str], run_dir: str) -> dict:
    """Composes ``+experiment=lottery_ticket`` with ``overrides`` and runs it in ``run_dir`` (inside ``configs()``).

    Returns the run's report; an existing ``report.json`` is returned without training.
    """
    return run_once(["+experiment=lottery_ticket", *overrides], run_dir)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=18, help="pruning rounds after the dense round 0")
    parser.add_argument("--reinit-rounds", type=int, nargs="*", default=[3, 7, 9, 15, 18],
                        help="rounds whose mask is also trained from a random re-initialization")
    parser.add_argument("--out", default="multirun/lottery_ticket")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every run, e.g. trainer.epochs=5")
    args = parser.parse_args(argv)

    out = os.path.abspath(args.out)
    start = time.perf_counter()
    with configs():
        for seed in args.seeds:
            previous = None
            for r in range(args.rounds + 1):
                common = [f"seed={seed}", *args.overrides, *round_overrides(r, previous)]
                ticket_dir = os.path.join(out, f"seed{seed}", "ticket", f"round{r:02d}")
                report = run_one(common, ticket_dir)
                log.info("seed %d round %d | %.1f %% of weights | ticket test accuracy %.4f (early stop %s)",
                         seed, r, 100 * remaining_fraction(r), report["test_accuracy"],
                         (report.get("early_stopping") or {}).get("test_accuracy"))
                if r in args.reinit_rounds:
                    reinit = run_one([*common, f"model.init_seed={1000 + seed}", "name=lottery_ticket_reinit"],
                                     os.path.join(out, f"seed{seed}", "reinit", f"round{r:02d}"))
                    log.info("seed %d round %d | random re-init test accuracy %.4f", seed, r,
                             reinit["test_accuracy"])
                previous = os.path.join(ticket_dir, "weights.npz")
    log.info("lottery ticket study done in %.1f min", (time.perf_counter() - start) / 60)


if __name__ == "__main__":
    main()
