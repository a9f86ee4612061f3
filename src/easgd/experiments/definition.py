"""What an experiment is: its methods, its grid, and the runs it resolves into.

An :class:`Experiment` is a frozen description (data set, network, methods with their
learning-rate grids, communication periods, worker counts, hyperparameters, time budget);
:meth:`Experiment.runs` resolves it into a list of :class:`RunSpec`, one per
(method, tau, p, lr, seed), each with a deterministic folder name, and
:meth:`Experiment.train_config` turns one run into the :class:`easgd.config.TrainConfig`
that both runtimes execute. The named experiments themselves are in
:mod:`easgd.experiments.registry`.

Everything about a method (sequential or not, which hyperparameters it takes, a period it
requires) is asked of :data:`easgd.algorithms.METHODS`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from easgd.algorithms import METHODS, MethodSpec

if TYPE_CHECKING:
    from easgd.config import TrainConfig

__all__ = ["PANELS", "SHARED_INIT_SEED", "Experiment", "MethodPlan", "RunSpec"]

PANELS = ("tau", "workers")
#: The init seed of every run of a ``same_init`` experiment, whatever its seed.
SHARED_INIT_SEED = 0


@dataclass(frozen=True)
class MethodPlan:
    """One method of an experiment.

    Args:
        method: a key of :data:`easgd.algorithms.METHODS`.
        lrs: the learning-rate grid (log spaced) used with ``lr_grid=True``.
        lr: the single learning rate used with ``lr_grid=False``.
        taus: communication periods of this method (None: the experiment's ``taus``).
        workers: worker counts (None: the experiment's ``workers``; sequential methods: 1).
    """

    method: str
    lrs: tuple[float, ...]
    lr: float
    taus: tuple[int, ...] | None = None
    workers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}; choose one of {', '.join(METHODS)}")
        if not self.lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in (*self.lrs, self.lr)):
            raise ValueError(f"{self.method}: learning rates {self.lrs}, {self.lr} must be > 0")

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    @property
    def sequential(self) -> bool:
        return self.spec.sequential


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep; ``name`` is its folder, a pure function of the five fields."""

    method: str
    tau: int
    workers: int
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}_tau{self.tau}_p{self.workers}_lr{self.lr:g}_s{self.seed}"

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    @property
    def sequential(self) -> bool:
        return self.spec.sequential


@dataclass(frozen=True)
class Experiment:
    """A named, versioned sweep. Bump ``version`` whenever a field changes.

    Args:
        name, version, description: identity; ``notes`` says what is not the paper's.
        dataset, model: the problem (see ``easgd models``).
        plans: the methods; the sequential ones are the reference, run once with p = 1.
        taus, workers: the grid of the distributed methods (a plan may narrow it).
        panel: ``"tau"`` (one panel per tau, the paper's Fig. 2) or ``"workers"`` (Fig. 3).
        time_budget: training seconds per run (virtual seconds in the simulator).
        seeds: independent runs per setting (the paper: 3 on CIFAR, keeping the best).
        same_init: every seed starts from one initial network (init seed
            :data:`SHARED_INIT_SEED`); the seed changes the data order and dropout only. The
            paper makes its 3 CIFAR runs "from the same initialization" (paper-spec 3); False:
            the seed is the init seed too (a run per seed is then also a draw of the init).
        batch_size, weight_decay, beta, momentum, moving_rate: the paper's by default; each
            is given only to the methods that use it.
        eval_interval: seconds between evaluations of the center.
        sim_latency, sim_bandwidth: the simulator's message costs (seconds, bytes/s).
    """

    name: str
    version: str
    description: str
    dataset: str
    model: str
    plans: tuple[MethodPlan, ...]
    taus: tuple[int, ...]
    workers: tuple[int, ...]
    panel: str
    time_budget: float
    seeds: int = 1
    same_init: bool = False
    batch_size: int = 128
    weight_decay: float = 1e-4
    beta: float = 0.9
    momentum: float = 0.99
    moving_rate: float = 0.001
    eval_interval: float = 1.0
    sim_latency: float = 50e-6
    sim_bandwidth: float = 1e9
    notes: str = ""

    def __post_init__(self) -> None:
        if self.panel not in PANELS:
            raise ValueError(f"panel={self.panel!r}; choose one of {', '.join(PANELS)}")
        if not (self.time_budget > 0 and math.isfinite(self.time_budget)):
            raise ValueError(f"time_budget={self.time_budget!r} must be > 0 seconds")
        if self.seeds < 1:
            raise ValueError(f"seeds={self.seeds!r} must be >= 1")
        for plan in self.plans:
            fixed = plan.spec.fixed_tau
            if fixed is not None and any(t != fixed for t in self._taus(plan)):
                raise ValueError(f"{self.name}: {plan.method} runs with tau = {fixed} only")

    def _taus(self, plan: MethodPlan) -> tuple[int, ...]:
        if plan.sequential:
            return (1,)
        return plan.taus if plan.taus is not None else self.taus

    def _workers(self, plan: MethodPlan) -> tuple[int, ...]:
        if plan.sequential:
            return (1,)
        return plan.workers if plan.workers is not None else self.workers

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(p.method for p in self.plans)

    @property
    def reference(self) -> str | None:
        """The sequential reference method (shown in every panel), if any."""
        return next((p.method for p in self.plans if p.sequential), None)

    def runs(
        self, *, lr_grid: bool = True, seeds: int | None = None, only: Iterable[str] | None = None
    ) -> list[RunSpec]:
        """The resolved runs, in plan order: method, then tau, p, lr, seed."""
        keep = None if only is None else {m.strip().lower() for m in only if m.strip()}
        if keep is not None and (unknown := keep - set(self.methods)):
            raise ValueError(
                f"--only {','.join(sorted(unknown))}: not in experiment {self.name!r}; "
                f"its methods are {','.join(self.methods)}"
            )
        n_seeds = self.seeds if seeds is None else seeds
        if n_seeds < 1:
            raise ValueError(f"seeds={n_seeds!r} must be >= 1")
        out: list[RunSpec] = []
        for plan in self.plans:
            if keep is not None and plan.method not in keep:
                continue
            lrs = plan.lrs if lr_grid else (plan.lr,)
            for tau in self._taus(plan):
                for p in self._workers(plan):
                    for lr in lrs:
                        out.extend(RunSpec(plan.method, tau, p, lr, s) for s in range(n_seeds))
        return out

    def train_config(
        self,
        run: RunSpec,
        out: str | Path,
        *,
        data_dir: str | None = None,
        time_budget: float | None = None,
        steps: int | None = None,
        eval_interval: float | None = None,
        device: str = "cpu",
        same_init: bool | None = None,
    ) -> TrainConfig:
        """The :class:`easgd.config.TrainConfig` of ``run`` writing into ``out``.

        A hyperparameter goes only to the methods that use it (``Hyperparams`` refuses the
        others); the experiment's momentum goes to the methods whose default has momentum
        (all-reduce and local SGD keep their default of none). ``device``: the workers'
        (servers stay on the CPU, as ``easgd train --device`` does); ``same_init``: overrides
        the experiment's (:meth:`init_seed`).
        """
        from easgd.config import TrainConfig

        spec = run.spec
        return TrainConfig(
            method=run.method, workers=run.workers, tau=run.tau, lr=run.lr,
            momentum=self.momentum if spec.uses("momentum") and spec.momentum_default else None,
            beta=self.beta if spec.uses("beta") else None,
            weight_decay=self.weight_decay,
            moving_rate=self.moving_rate if spec.uses("moving_rate") else None,
            batch_size=self.batch_size, time_budget=time_budget, steps=steps,
            dataset=self.dataset, model=self.model, data_dir=data_dir, seed=run.seed,
            init_seed=self.init_seed(run, same_init), device=device, out=str(out),
            eval_interval=eval_interval or self.eval_interval,
            checkpoint_interval=max(5.0, self.time_budget / 4),
        )  # fmt: skip

    def init_seed(self, run: RunSpec, same_init: bool | None = None) -> int:
        """The seed of ``run``'s initial network: shared, or its own seed (see ``same_init``)."""
        shared = self.same_init if same_init is None else same_init
        return SHARED_INIT_SEED if shared else run.seed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
