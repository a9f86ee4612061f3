"""Which moving rate alpha is best for p workers, against the default alpha = beta/p.

The simulator (:func:`easgd.sim.simulate`, synchronous schedule, EASGD) on two problems:

* ``quadratic``: the simulator's noisy quadratic (dimension 256, sigma 0.5, lr 0.1,
  tau 4, from x0 = 1): the score is the center's mean loss over the whole run (how fast it
  gets down and how low it stays: a small alpha couples the workers weakly, which lowers
  the stationary error and slows the start), median of 3 seeds;
* ``digits``: the ``digits`` ``ModelObjective`` (the digits CNN, batch 32, lr 0.05, tau 10):
  the score is the center's test error at the end of the run, median of 3 seeds.

For every p the grid is alpha = m * beta/p, m in ``MULTIPLES`` (beta = 0.9; the synchronous
rule keeps beta fixed, so only the workers' pull changes), capped below 1. The table gives
each setting's best multiple and its score against the default's (m = 1): a rule of thumb
that beats beta/p would show the same best multiple at every p on both problems.

Usage, from the repository root::

    python -m benchmarks.alpha_study [--quick] [--json PATH]

The figures and what limits them: ``benchmarks/RESULTS.md``, section 13.
"""

from __future__ import annotations

import sys
from typing import Any

from benchmarks._common import (
    base_parser,
    machine_info,
    median,
    print_table,
    single_thread,
    write_json,
)

BETA = 0.9
MULTIPLES = (0.0625, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
SEEDS = (0, 1, 2)


def _problem(name: str, quick: bool) -> tuple[Any, dict[str, Any], int]:
    from easgd.sim import ModelObjective, Quadratic

    if name == "quadratic":
        return Quadratic(sigma=0.5, x0=1.0, dim=256), {"lr": 0.1, "tau": 4}, 60 if quick else 600
    from easgd.task import build_task

    parts = build_task("digits")
    objective = ModelObjective(parts.build, parts.train, parts.test, 32, parts.transform)
    return objective, {"lr": 0.05, "tau": 10}, 10 if quick else 150


def score(problem: str, workers: int, multiple: float, seed: int, quick: bool) -> float:
    """The setting's score (lower is better): see the module docstring."""
    from easgd.algorithms import Hyperparams
    from easgd.sim import simulate

    objective, kw, steps = _problem(problem, quick)
    alpha = min(multiple * BETA / workers, 0.99)
    hp = Hyperparams(method="easgd", workers=workers, beta=BETA, alpha=alpha, **kw)
    if problem == "quadratic":
        res = simulate(objective, hp, schedule="sync", steps=steps, seed=seed, trajectory=True)
        losses = [objective.evaluate(c)["loss"] for c in res.center_trajectory]
        return float(sum(losses) / len(losses))  # the whole run: speed and stationary error
    res = simulate(objective, hp, schedule="sync", steps=steps, seed=seed)
    return float(res.metrics[-1]["error"])


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("alpha_study", __doc__)
    args = parser.parse_args(argv)
    single_thread()
    problems = {"quadratic": (2, 4, 8, 16), "digits": (4, 8)}
    if args.quick:
        problems = {"quadratic": (2, 4), "digits": (4,)}
    seeds = SEEDS[:1] if args.quick else SEEDS
    rows, table = [], []
    for problem, ps in problems.items():
        for p in ps:
            scores = {m: median([score(problem, p, m, s, args.quick) for s in seeds])
                      for m in MULTIPLES}  # fmt: skip
            best = min(scores, key=lambda m: scores[m])
            # A best on the edge of the grid is marked, never reported as the best alpha.
            edge = "bottom" if best == MULTIPLES[0] else "top" if best == MULTIPLES[-1] else ""
            rows.append({"problem": problem, "workers": p, "scores": scores, "best": best,
                         "default": scores[1.0], "edge": edge})  # fmt: skip
            gain = scores[best] / scores[1.0] if scores[1.0] else 1.0
            table.append([problem, p, best, min(best * BETA / p, 0.99), scores[best],
                          scores[1.0], gain, edge or "-"])  # fmt: skip
            print(f"  {problem:<9} p={p:<3} " + "  ".join(f"{m:g}x: {v:.4g}" for m, v in
                  scores.items()), flush=True)  # fmt: skip
    print_table(
        "Best alpha = m * beta/p per p (lower score is better; median of seeds)",
        ["problem", "p", "best m", "best alpha", "best score", "beta/p score", "ratio", "edge"],
        table,
    )
    write_json(args.json, {"benchmark": "alpha_study", "quick": args.quick,
                       "machine": machine_info(), "beta": BETA, "multiples": MULTIPLES,
                       "seeds": seeds, "rows": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
