"""What a sweep hands a runtime, and what a runtime must do with one run.

A runtime turns one :class:`~easgd.experiments.definition.RunSpec` into a run directory
(``config.json``, ``eval.jsonl``, ``metrics.jsonl``, ``summary.json``) and returns the
summary. Two exist: :class:`easgd.experiments.real.RealRuntime` (worker processes, as
``easgd train``) and :class:`easgd.experiments.simulated.SimRuntime` (the simulator on a
virtual clock). A runtime keeps what it learns over a sweep on itself (the simulator's
measured step time); what every run shares is the :class:`SweepContext`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from easgd.experiments.definition import Experiment, RunSpec

__all__ = ["Runner", "Runtime", "SweepContext"]


@dataclass(frozen=True)
class SweepContext:
    """The sweep's resolved options, the same for every run."""

    experiment: Experiment
    out: Path
    runtime: str
    scale: float
    data_dir: str | None
    #: The workers' device (resolved: ``cpu``, ``cuda`` or ``cuda:N``); servers use the CPU.
    device: str = "cpu"
    #: Every seed of a setting starts from the same network (:meth:`Experiment.init_seed`).
    same_init: bool = False

    @property
    def budget(self) -> float:
        """Training seconds of one run (virtual seconds in the simulator)."""
        return self.experiment.time_budget * self.scale

    @property
    def eval_interval(self) -> float:
        return self.experiment.eval_interval * self.scale

    def run_info(self, run: RunSpec) -> dict[str, Any]:
        """What ``run.json`` says about ``run`` whatever the runtime."""
        e = self.experiment
        return {
            "experiment": e.name, "version": e.version, "runtime": self.runtime,
            "scale": self.scale, "train_budget": self.budget, "run": dataclasses.asdict(run),
            "name": run.name, "device": self.device, "same_init": self.same_init,
            "init_seed": e.init_seed(run, self.same_init),
        }  # fmt: skip


class Runtime(Protocol):
    """One way of executing the runs of a sweep."""

    #: The name ``--runtime`` takes and ``summary.json`` records.
    name: ClassVar[str]

    def run_info(self, ctx: SweepContext, run: RunSpec) -> dict[str, Any]:
        """This runtime's additions to ``run.json`` (the simulator: its step time)."""
        ...

    def __call__(self, ctx: SweepContext, run: RunSpec, folder: Path) -> Mapping[str, Any]:
        """Execute ``run`` into the empty ``folder``; return its summary."""
        ...


#: ``runner(ctx, run, folder) -> summary``: a runtime's call alone (tests inject failures).
Runner = Callable[[SweepContext, RunSpec, Path], Mapping[str, Any]]
