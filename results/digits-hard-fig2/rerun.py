"""Run digits-hard-fig2 again at the learning rate the shipped table chose for each setting.

The sweep's raw runs were lost before they were packed (COMMANDS.md), so the shipped table
cannot be drawn again from them. This is the check that is left: the same experiment
(digits-hard-fig2 v1: p = 4, 40 s, batch 128, 3 seeds from one initial network), one run
per seed of each (method, tau) at the rate ``report.json`` names, nothing else. Its report
and its packed raw runs are in ``rerun/``; the README compares the two sweeps.

Run from the repository root (about 50 minutes on 2 cores):

    python results/digits-hard-fig2/rerun.py runs/experiments/digits-hard-fig2-rerun
"""

import dataclasses
import json
import sys
from pathlib import Path

from easgd.cli.experiment import _progress
from easgd.experiments import get_experiment
from easgd.experiments.definition import MethodPlan
from easgd.experiments.sweep import run_sweep

HERE = Path(__file__).resolve().parent


def chosen_plans() -> tuple[MethodPlan, ...]:
    """One plan per (method, tau) of the shipped table, at its best rate (MSGD once)."""
    lines = json.loads((HERE / "report.json").read_text())["lines"]
    plans: dict[tuple[str, int], MethodPlan] = {}
    for line in lines:
        key = (line["method"], int(line["tau"]))
        lr = float(line["lr"])
        plans.setdefault(key, MethodPlan(line["method"], lrs=(lr,), lr=lr, taus=(key[1],)))
    return tuple(plans.values())


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        raise SystemExit("usage: python results/digits-hard-fig2/rerun.py OUT | --dry-run")
    experiment = dataclasses.replace(get_experiment("digits-hard-fig2"), plans=chosen_plans())
    if sys.argv[1] == "--dry-run":  # the runs it would do
        for run in experiment.runs(lr_grid=False):
            print(run.name)
        raise SystemExit(0)
    result = run_sweep(experiment, sys.argv[1], lr_grid=False, progress=_progress)
    raise SystemExit(len(result.failed))
