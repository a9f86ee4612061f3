"""The real runtime: each run as ``easgd train`` runs it, worker processes and all.

A real run's time budget counts from its first training step (the workers' ``train_start``
event), so process start-up does not eat into it and needs no allowance; ``summary.json``
reports ``startup_seconds`` and ``train_seconds`` separately, and ``easgd report`` cuts
every curve at the experiment's budget. With ``--device cuda`` the workers train on the GPUs
(worker i on GPU ``i mod count``) and the parameter servers keep the center on the CPU, as
``easgd train --device cuda`` runs them (the paper's center lived on a separate parameter
server, paper-spec 3; that it is on the CPU is our reading). Start-up times as measured are in
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from easgd.experiments.definition import RunSpec
from easgd.experiments.runtime import SweepContext
from easgd.runlog import RunPaths, update_summary

__all__ = ["RealRuntime"]

#: The shortest evaluation interval a real run is given (seconds): the evaluator's own cost.
_MIN_EVAL_INTERVAL = 0.1


class RealRuntime:
    """Runs with :func:`easgd.launch.launch_local`, one run after another."""

    name: ClassVar[str] = "real"

    def run_info(self, ctx: SweepContext, run: RunSpec) -> dict[str, Any]:
        return {}

    def __call__(self, ctx: SweepContext, run: RunSpec, folder: Path) -> dict[str, Any]:
        """Launch the run for the sweep's budget; its summary says which experiment it is."""
        from easgd.launch import launch_local

        cfg = ctx.experiment.train_config(
            run, folder, data_dir=ctx.data_dir, time_budget=ctx.budget,
            eval_interval=max(_MIN_EVAL_INTERVAL, ctx.eval_interval), device=ctx.device,
            same_init=ctx.same_init,
        )  # fmt: skip
        launch_local(cfg)
        return update_summary(RunPaths(folder), experiment=ctx.experiment.name)
