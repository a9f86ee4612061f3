"""Named, versioned experiments: the paper's figures as sweeps of runs, and small twins.

``easgd experiment NAME`` runs one; ``easgd report DIR`` draws its figures. The package is
split by what changes together:

* :mod:`~easgd.experiments.definition`: what an experiment is (:class:`Experiment`,
  :class:`MethodPlan`, :class:`RunSpec`) and how it resolves into runs and configurations;
* :mod:`~easgd.experiments.registry`: the named experiments (:data:`EXPERIMENTS`,
  :func:`get_experiment`) and their learning-rate grids;
* :mod:`~easgd.experiments.runtime`: what a sweep hands a runtime (:class:`SweepContext`)
  and what a runtime does (:class:`Runtime`);
* :mod:`~easgd.experiments.real`: runs as ``easgd train`` runs them (:class:`RealRuntime`);
* :mod:`~easgd.experiments.simulated`: runs on the simulator's virtual clock
  (:class:`SimRuntime`), with the measured step time (:func:`measure_step_time`);
* :mod:`~easgd.experiments.sweep`: :func:`run_sweep` (resuming, recording failures, refusing
  to mix settings, extending a learning-rate grid whose best is on its edge) and
  :func:`select_best`.

Both runtimes leave the same run-directory files (``config.json``, ``eval.jsonl``,
``metrics.jsonl``, ``summary.json``, plus ``run.json`` with the experiment's budget), so
``easgd report`` treats them alike.
"""

from __future__ import annotations

from easgd.experiments.definition import Experiment, MethodPlan, RunSpec
from easgd.experiments.real import RealRuntime
from easgd.experiments.registry import EXPERIMENTS, get_experiment
from easgd.experiments.runtime import Runner, Runtime, SweepContext
from easgd.experiments.simulated import SimRuntime, measure_step_time
from easgd.experiments.sweep import (
    MAX_EXTENSIONS,
    RUNTIMES,
    SweepEvent,
    SweepResult,
    grid_edge,
    next_rates,
    run_sweep,
    seed_medians,
    select_best,
    summary_medians,
)

__all__ = [
    "EXPERIMENTS",
    "MAX_EXTENSIONS",
    "RUNTIMES",
    "Experiment",
    "MethodPlan",
    "RealRuntime",
    "RunSpec",
    "Runner",
    "Runtime",
    "SimRuntime",
    "SweepContext",
    "SweepEvent",
    "SweepResult",
    "get_experiment",
    "grid_edge",
    "measure_step_time",
    "next_rates",
    "run_sweep",
    "seed_medians",
    "select_best",
    "summary_medians",
]
