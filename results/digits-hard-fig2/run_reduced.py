"""The reduced digits-hard-fig2 sweep shipped here (see README.md): tau in {1, 16} only.

`easgd experiment` selects methods (--only) but not taus, so this calls the same sweep with
the registered experiment's taus narrowed; everything else is digits-hard-fig2 v1's.
Run from the repository root: python results/digits-hard-fig2/run_reduced.py OUT
"""

import dataclasses
import sys

from easgd.experiments import get_experiment
from easgd.experiments.sweep import run_sweep

experiment = dataclasses.replace(get_experiment("digits-hard-fig2"), taus=(1, 16))
run_sweep(
    experiment,
    sys.argv[1],
    runtime="sim",
    scale=0.125,
    step_time=0.02,
    lr_grid=False,
    only=["easgd", "eamsgd", "downpour", "msgd"],
)
