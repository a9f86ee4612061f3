"""Named, versioned experiments: the paper's figures as sweeps of runs, and small twins.

An :class:`Experiment` is a frozen description (data set, network, methods with their
learning-rate grids, communication periods, worker counts, hyperparameters, time budget);
:meth:`Experiment.runs` resolves it into a list of :class:`RunSpec`, one per
(method, tau, p, lr, seed), each with a deterministic folder name. :func:`run_sweep` runs the
list into ``out/<run name>/`` with the real runtime (:func:`easgd.launch.launch_local`) or the
simulator (:func:`easgd.sim.simulate` on a :class:`easgd.sim.TorchProblem` with a virtual
clock), and writes ``experiment.json`` (the resolved runs) and ``sweep.json`` (what happened,
and the best learning rate per (method, tau, p)).

Both runtimes leave the same run-directory files (``config.json``, ``eval.jsonl``,
``metrics.jsonl``, ``summary.json``, plus ``run.json`` with the experiment's budget), so
``easgd report`` treats them alike.

Failure behaviour:

* a run whose ``summary.json`` exists is skipped, so an interrupted sweep resumes where it
  stopped; a folder without ``summary.json`` (a failed or interrupted run) is cleared and
  run again.
* a run that raises is recorded (``failed.json`` in its folder, and in ``sweep.json``) and
  the sweep goes on; :attr:`SweepResult.failed` lists them.
* an output folder that already holds another experiment, version, runtime or scale is
  refused, so runs of different budgets never mix.

Time budgets. ``time_budget`` is the training time of one run in seconds. The real launcher
counts its budget from the start of the launch, process start-up included, so a real run is
given ``startup allowance + time_budget`` and the report measures time from the first
training step and cuts every curve at ``time_budget``. The allowance is 3 s + 1 s per process
until a run of the same size has been seen, then 1.25 x the longest start-up seen + 1 s; a run
whose start-up still ate into its training is run once more with 1.5 x its start-up + 2 s.
In the simulator the budget is in virtual seconds: each worker runs ``time_budget /
step_time`` local steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from easgd.algorithms import METHODS
from easgd.runlog import atomic_write_json

__all__ = [
    "EXPERIMENTS",
    "RUNTIMES",
    "Experiment",
    "MethodPlan",
    "RunSpec",
    "SweepEvent",
    "SweepResult",
    "get_experiment",
    "measure_step_time",
    "run_sweep",
    "select_best",
]

log = logging.getLogger(__name__)

RUNTIMES = ("real", "sim")
PANELS = ("tau", "workers")


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
    def sequential(self) -> bool:
        return METHODS[self.method].sequential


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
    def sequential(self) -> bool:
        return METHODS[self.method].sequential


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
        batch_size, weight_decay, beta, momentum, moving_rate: the paper's by default.
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
            if plan.method == "mdownpour" and any(t != 1 for t in self._taus(plan)):
                raise ValueError(f"{self.name}: mdownpour runs with tau = 1 only")

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
    ) -> Any:
        """The :class:`easgd.config.TrainConfig` of ``run`` writing into ``out``."""
        from easgd.config import TrainConfig

        spec = METHODS[run.method]
        return TrainConfig(
            method=run.method, workers=run.workers, tau=run.tau, lr=run.lr,
            momentum=self.momentum if spec.momentum_default else None,
            beta=self.beta if spec.uses("beta") else None,
            weight_decay=self.weight_decay,
            moving_rate=self.moving_rate if spec.uses("moving_rate") else None,
            batch_size=self.batch_size, time_budget=time_budget, steps=steps,
            dataset=self.dataset, model=self.model, data_dir=data_dir, seed=run.seed,
            out=str(out), eval_interval=eval_interval or self.eval_interval,
            checkpoint_interval=max(5.0, self.time_budget / 4),
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The paper tuned the learning rate per method over a "wide range" (supplement Tables 1-3, not
# retrieved): these grids are our choice, log spaced in 1-2-5 steps, around the authors'
# MNIST demo (lr 0.1 without momentum, 0.01 with delta = 0.99). Nesterov methods with
# delta = 0.99 take a 100x larger effective step, hence their lower grid.
_SGD_GRID = (0.01, 0.02, 0.05, 0.1)
_MOM_GRID = (0.0005, 0.001, 0.002, 0.005)
_UNPUBLISHED = (
    "Learning-rate grids are ours: the paper's (supplement Tables 1-3) are not published "
    "in what we could retrieve."
)


Grid = tuple[tuple[float, ...], float]  # (learning-rate grid, single default)


def _fig_plans(fig3: bool, sgd: Grid, mom: Grid) -> tuple[MethodPlan, ...]:
    """The methods of Fig. 2 (or Fig. 3) with the grid ``sgd`` or, with momentum, ``mom``."""

    def plan(method: str, taus: tuple[int, ...] | None = None) -> MethodPlan:
        lrs, lr = mom if METHODS[method].momentum_default else sgd
        return MethodPlan(method, lrs, lr, taus)

    if fig3:  # tau = 10 for the elastic methods, 1 for the DOWNPOUR ones (paper-spec 3)
        methods = [plan("easgd", (10,)), plan("eamsgd", (10,)), plan("downpour", (1,))]
    else:
        methods = [plan(m) for m in ("easgd", "eamsgd", "downpour", "adownpour", "mvadownpour")]
    return (*methods, plan("mdownpour", (1,)), plan("msgd"))


_PAPER_SGD: Grid = (_SGD_GRID, 0.05)
_PAPER_MOM: Grid = (_MOM_GRID, 0.001)
# Two-point grids for digits, from a simulator sweep of 0.02-0.2 (0.0005-0.005 with
# momentum) at tau 1 and 16 (results/digits-fig2/README.md): the DOWNPOUR family is best
# near 0.02-0.05, EASGD near 0.1-0.2, the Nesterov methods near 0.001-0.002.
_DIGITS_SGD: Grid = ((0.03, 0.1), 0.03)
_DIGITS_MOM: Grid = ((0.001, 0.002), 0.001)


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment(
            name="paper-fig2",
            version="1",
            description="Fig. 2: CIFAR-10, p = 4, tau in {1, 4, 16, 64}; MSGD as reference",
            dataset="cifar10", model="cifar-paper", plans=_fig_plans(False, _PAPER_SGD, _PAPER_MOM),
            taus=(1, 4, 16, 64), workers=(4,), panel="tau", time_budget=3600.0, seeds=3,
            eval_interval=30.0, notes=_UNPUBLISHED,
        ),
        Experiment(
            name="paper-fig3",
            version="1",
            description=(
                "Fig. 3: CIFAR-10, p in {4, 8, 16}; tau = 10 for EASGD/EAMSGD, tau = 1 for "
                "DOWNPOUR/MDOWNPOUR; MSGD as reference"
            ),
            dataset="cifar10", model="cifar-paper", plans=_fig_plans(True, _PAPER_SGD, _PAPER_MOM),
            taus=(1,), workers=(4, 8, 16), panel="workers", time_budget=3600.0, seeds=3,
            eval_interval=30.0, notes=_UNPUBLISHED,
        ),
        Experiment(
            name="report-mnist",
            version="1",
            description="The seed report: asynchronous EASGD against SGD, LeNet-5 on MNIST",
            dataset="mnist", model="lenet5-report",
            plans=(
                MethodPlan("easgd", lrs=(0.01, 0.03, 0.1), lr=0.05),
                MethodPlan("sgd", lrs=(0.01, 0.03, 0.1), lr=0.05),
            ),
            taus=(1, 4, 16), workers=(4,), panel="tau", time_budget=600.0, seeds=1,
            batch_size=64, weight_decay=0.0, eval_interval=10.0,
            notes="The report's batch size and grid are not in the spec; ours: 64, 0.01-0.1.",
        ),
        Experiment(
            name="digits-fig2",
            version="1",
            description="Fig. 2 on scikit-learn digits: p = 4, tau in {1, 4, 16, 64}, minutes",
            dataset="digits", model="digits-cnn", plans=_fig_plans(False, _DIGITS_SGD, _DIGITS_MOM),
            taus=(1, 4, 16, 64), workers=(4,), panel="tau", time_budget=6.0, seeds=1,
            eval_interval=0.25, notes=_UNPUBLISHED,
        ),
        Experiment(
            name="digits-fig3",
            version="1",
            description="Fig. 3 on scikit-learn digits: p in {2, 4, 8}, minutes",
            dataset="digits", model="digits-cnn", plans=_fig_plans(True, _DIGITS_SGD, _DIGITS_MOM),
            taus=(1,), workers=(2, 4, 8), panel="workers", time_budget=8.0, seeds=1,
            eval_interval=0.25, notes=_UNPUBLISHED,
        ),
    )
}  # fmt: skip


def get_experiment(name: str) -> Experiment:
    """The registered experiment ``name``, or a ValueError listing them."""
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise ValueError(
            f"no experiment named {name!r}; choose one of {', '.join(EXPERIMENTS)}"
        ) from None


def _score(value: Any) -> float:
    v = float(value) if value is not None else math.inf
    return v if math.isfinite(v) else math.inf


def select_best(
    summaries: Iterable[Mapping[str, Any]],
) -> dict[tuple[str, int, int], Mapping[str, Any]]:
    """Per ``(method, tau, workers)``: the run with the lowest best center test error.

    The paper reports the best run of each setting. Ties go to the lower final error, then
    the smaller learning rate. Non-finite errors (a diverged run) rank last.
    """
    best: dict[tuple[str, int, int], Mapping[str, Any]] = {}

    def rank(s: Mapping[str, Any]) -> tuple[float, float, float]:
        return (
            _score(s.get("best_center_test_error")),
            _score(s.get("center_test_error")),
            float(s["lr"]),
        )

    for s in summaries:
        key = (str(s["method"]), int(s["tau"]), int(s["workers"]))
        if key not in best or rank(s) < rank(best[key]):
            best[key] = s
    return best


# ------------------------------------------------------------------------------------------
# Runtimes
# ------------------------------------------------------------------------------------------


def _processes(run: RunSpec) -> int:
    return run.workers + 1 + (0 if run.sequential else 1)  # workers, evaluator, server


def default_startup_allowance(run: RunSpec) -> float:
    """Seconds the real launcher may need before training (2 loaded cores: ~1 s/process)."""
    return 3.0 + 1.0 * _processes(run)


def measure_step_time(
    dataset: str,
    model: str | None,
    batch_size: int,
    *,
    data_dir: str | None = None,
    steps: int = 20,
) -> float:
    """Median seconds of one gradient step of ``model`` on one thread (the sim's step cost)."""
    import statistics

    import torch

    from easgd.problem import build_problem_parts
    from easgd.sim import TorchProblem

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        parts = build_problem_parts(dataset, model, data_dir=data_dir)
        problem = TorchProblem(parts.build, parts.train, parts.test, batch_size, parts.transform)
        fn, x = problem.grad_fn(0, 0), problem.worker_vector(0)
        grad = problem.grad_buffer(0)
        assert grad is not None
        times = []
        for i in range(steps + 3):
            began = time.perf_counter()
            fn(x, grad)
            if i >= 3:
                times.append(time.perf_counter() - began)
        return statistics.median(times)
    finally:
        torch.set_num_threads(threads)


class _LossLog:
    """A problem proxy that records every worker's mini-batch losses (for metrics.jsonl)."""

    def __init__(self, problem: Any) -> None:
        self.problem = problem
        self.losses: dict[int, list[float]] = {}

    def initial_point(self) -> Any:
        return self.problem.initial_point()

    def grad_buffer(self, rank: int) -> Any:
        return self.problem.grad_buffer(rank)

    def worker_vector(self, rank: int) -> Any:
        return self.problem.worker_vector(rank)

    def evaluate(self, x: Any) -> dict[str, float]:
        result: dict[str, float] = self.problem.evaluate(x)
        return result

    def grad_fn(self, rank: int, seed: int) -> Callable[[Any, Any], float]:
        fn = self.problem.grad_fn(rank, seed)
        losses = self.losses.setdefault(rank, [])

        def logged(x: Any, out: Any) -> float:
            loss = float(fn(x, out))
            losses.append(loss)
            return loss

        return logged


@dataclass
class _Context:
    """What the runtimes need besides the run: the sweep's resolved options."""

    experiment: Experiment
    out: Path
    runtime: str
    scale: float
    data_dir: str | None
    step_time: float | None
    startup: float | None
    parts: dict[int, Any] = field(default_factory=dict)
    startups: dict[int, float] = field(default_factory=dict)  # processes -> seconds

    @property
    def budget(self) -> float:
        return self.experiment.time_budget * self.scale

    @property
    def eval_interval(self) -> float:
        return self.experiment.eval_interval * self.scale

    def run_info(self, run: RunSpec) -> dict[str, Any]:
        e = self.experiment
        info: dict[str, Any] = {
            "experiment": e.name, "version": e.version, "runtime": self.runtime,
            "scale": self.scale, "train_budget": self.budget, "run": dataclasses.asdict(run),
            "name": run.name,
        }  # fmt: skip
        if self.runtime == "real":
            info["startup_allowance"] = self.startup_allowance(run)
        else:
            info["step_time"] = self.sim_step_time()
        return info

    def startup_allowance(self, run: RunSpec) -> float:
        """The given allowance, else 1.25 x the longest start-up seen at this size, plus 1 s."""
        if self.startup is not None:
            return self.startup
        seen = self.startups.get(_processes(run))
        return default_startup_allowance(run) if seen is None else 1.25 * seen + 1.0

    def observe_startup(self, run: RunSpec, seconds: float) -> None:
        key = _processes(run)
        self.startups[key] = max(seconds, self.startups.get(key, 0.0))

    def sim_step_time(self) -> float:
        if self.step_time is None:
            e = self.experiment
            self.step_time = measure_step_time(
                e.dataset, e.model, e.batch_size, data_dir=self.data_dir
            )
            log.info("measured step time: %.4g s", self.step_time)
        return self.step_time


def _training_span(folder: Path) -> tuple[float | None, float | None]:
    """Launcher seconds of a real run's first training event and of its last worker's end."""
    from easgd.runlog import iter_jsonl

    starts, ends = [], []
    for e in iter_jsonl(folder / "metrics.jsonl"):
        if e.get("event") in ("join", "step", "exchange"):
            starts.append(float(e["wall"]))
        elif e.get("event") == "worker_done":
            ends.append(float(e["wall"]))
    return min(starts, default=None), max(ends, default=None)


def _run_real(ctx: _Context, run: RunSpec, folder: Path) -> dict[str, Any]:
    """Launch the run; once more, with a longer allowance, if start-up ate into training."""
    from easgd.launch import launch_local

    allowance = ctx.startup_allowance(run)
    for attempt in (1, 2):
        cfg = ctx.experiment.train_config(
            run, folder, data_dir=ctx.data_dir, time_budget=allowance + ctx.budget,
            eval_interval=max(0.1, ctx.eval_interval),
        )  # fmt: skip
        summary = launch_local(cfg)
        start, end = _training_span(folder)
        trained = None if start is None or end is None else end - start
        if start is not None:
            ctx.observe_startup(run, start)
        short = trained is not None and start is not None and trained < 0.97 * ctx.budget
        if not short or attempt == 2 or ctx.startup is not None:
            break
        assert start is not None
        log.warning("%s: start-up took %.1f s, training only %.1f s of %.1f; running it again",
                    run.name, start, trained, ctx.budget)  # fmt: skip
        allowance = 1.5 * start + 2.0
        shutil.rmtree(folder)
        folder.mkdir()
        atomic_write_json(folder / "run.json",
                          {**ctx.run_info(run), "startup_allowance": allowance})  # fmt: skip
    summary.update(runtime="real", experiment=ctx.experiment.name, attempts=attempt,
                   startup_seconds=start, train_seconds=trained)  # fmt: skip
    atomic_write_json(folder / "summary.json", summary)
    return summary


def _run_sim(ctx: _Context, run: RunSpec, folder: Path) -> dict[str, Any]:
    import torch

    from easgd.problem import build_problem_parts
    from easgd.runlog import JsonlWriter
    from easgd.sim import CostModel, TorchProblem, simulate

    e = ctx.experiment
    step_time = ctx.sim_step_time()
    steps = max(1, round(ctx.budget / step_time))
    cfg = e.train_config(run, folder, data_dir=ctx.data_dir, steps=steps,
                         eval_interval=ctx.eval_interval)  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "config.json", cfg.to_dict())
    if run.seed not in ctx.parts:
        ctx.parts[run.seed] = build_problem_parts(
            e.dataset, e.model, seed=run.seed, data_dir=ctx.data_dir
        )
    parts = ctx.parts[run.seed]
    problem = _LossLog(
        TorchProblem(parts.build, parts.train, parts.test, e.batch_size, parts.transform)
    )
    cost = CostModel(step_time=step_time, latency=e.sim_latency, bandwidth=e.sim_bandwidth)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a real worker: the simulated cluster has a core per worker
    try:
        res = simulate(problem, cfg.hyperparams(), schedule="async", steps=steps,
                       seed=run.seed, cost=cost, eval_interval=ctx.eval_interval)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    with JsonlWriter(folder / "eval.jsonl") as out:
        for t, m in zip(res.times, res.metrics, strict=True):
            out.write({"wall": t, "test_loss": m["loss"], "test_error": m["error"]})
    # The simulator does not timestamp gradients: a worker's k-th loss is placed at k/steps of
    # the run's virtual length (exact for constant step and message costs).
    every = max(1, min(run.tau, 50))
    with JsonlWriter(folder / "metrics.jsonl") as out:
        for rank, losses in sorted(problem.losses.items()):
            for k in range(every, len(losses) + every, every):
                chunk = losses[k - every : k]
                if chunk:
                    out.write({"event": "step", "worker": rank, "step": min(k, len(losses)),
                               "wall": res.virtual_seconds * min(k, len(losses)) / len(losses),
                               "loss": sum(chunk) / len(chunk)})  # fmt: skip
    final = res.metrics[-1]
    errors = [m["error"] for m in res.metrics]
    summary = {
        "method": run.method, "mode": cfg.resolved_mode().value, "workers": run.workers,
        "servers": 0, "tau": run.tau, "lr": run.lr, "dataset": e.dataset,
        "center_test_error": final["error"], "center_test_loss": final["loss"],
        "best_center_test_error": min(errors), "wall_seconds": res.virtual_seconds,
        "exchanges": res.exchanges, "bytes_sent": res.bytes_moved // 2,
        "bytes_received": res.bytes_moved - res.bytes_moved // 2,
        "local_steps": res.local_steps, "evaluations": len(res.metrics), "runtime": "sim",
        "experiment": e.name, "real_seconds": res.real_seconds, "step_time": step_time,
    }  # fmt: skip
    atomic_write_json(folder / "summary.json", summary)
    return summary


Runner = Callable[[_Context, RunSpec, Path], Mapping[str, Any]]
_RUNNERS: dict[str, Runner] = {"real": _run_real, "sim": _run_sim}


# ------------------------------------------------------------------------------------------
# The sweep
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepEvent:
    """Progress of a sweep: ``status`` is start, done, skipped or failed."""

    index: int
    total: int
    run: RunSpec
    status: str
    seconds: float = 0.0
    summary: Mapping[str, Any] | None = None
    error: str | None = None


@dataclass
class SweepResult:
    """What a sweep did, and the best learning rate per (method, tau, p)."""

    out: Path
    runs: list[RunSpec]
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    best: dict[tuple[str, int, int], Mapping[str, Any]] = field(default_factory=dict)


def _check_out(out: Path, header: dict[str, Any]) -> None:
    path = out / "experiment.json"
    if not path.exists():
        return
    old = json.loads(path.read_text())
    for key in ("experiment", "version", "runtime", "scale"):
        if old.get(key) != header[key]:
            raise ValueError(
                f"--out {out} holds {key}={old.get(key)!r} (experiment.json), this sweep has "
                f"{key}={header[key]!r}; choose another --out so that runs of different "
                "settings do not mix"
            )


def run_sweep(
    experiment: Experiment,
    out: str | Path,
    *,
    runtime: str = "real",
    scale: float = 1.0,
    seeds: int | None = None,
    lr_grid: bool = True,
    only: Iterable[str] | None = None,
    data_dir: str | None = None,
    step_time: float | None = None,
    startup_allowance: float | None = None,
    progress: Callable[[SweepEvent], None] | None = None,
    runner: Runner | None = None,
) -> SweepResult:
    """Run every run of ``experiment`` not yet done into ``out/<run name>/``.

    ``runner(ctx, run, folder) -> summary`` replaces the runtime (tests inject failures
    with it). See the module docstring for resumption, failures and budgets.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale={scale!r} must be > 0 (e.g. 0.2 for a smoke run)")
    if step_time is not None and not step_time > 0:
        raise ValueError(f"step_time={step_time!r} must be > 0 seconds")
    if startup_allowance is not None and not startup_allowance >= 0:
        raise ValueError(f"startup_allowance={startup_allowance!r} must be >= 0 seconds")
    out = Path(out)
    runs = experiment.runs(lr_grid=lr_grid, seeds=seeds, only=only)
    ctx = _Context(experiment, out, runtime, scale, data_dir, step_time, startup_allowance)
    header = {
        "experiment": experiment.name, "version": experiment.version, "runtime": runtime,
        "scale": scale, "lr_grid": lr_grid, "seeds": seeds or experiment.seeds,
        "only": sorted(only) if only is not None else None, "train_budget": ctx.budget,
        "definition": experiment.to_dict(),
    }  # fmt: skip
    _check_out(out, header)
    header["runs"] = [{"name": r.name, **dataclasses.asdict(r)} for r in runs]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "experiment.json", header)
    run_fn = runner or _RUNNERS[runtime]
    result = SweepResult(out, runs)
    summaries: list[Mapping[str, Any]] = []
    for i, run in enumerate(runs, 1):
        folder = out / run.name
        if (folder / "summary.json").exists():
            result.skipped.append(run.name)
            summaries.append(json.loads((folder / "summary.json").read_text()))
            if progress:
                progress(SweepEvent(i, len(runs), run, "skipped", summary=summaries[-1]))
            continue
        if folder.exists():  # a failed or interrupted attempt: start it afresh
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        if progress:
            progress(SweepEvent(i, len(runs), run, "start"))
        began = time.perf_counter()
        try:
            atomic_write_json(folder / "run.json", ctx.run_info(run))
            summary = run_fn(ctx, run, folder)
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            atomic_write_json(folder / "failed.json",
                              {"error": message, "traceback": traceback.format_exc()})  # fmt: skip
            result.failed[run.name] = message
            log.warning("run %s failed: %s", run.name, message)
            if progress:
                progress(SweepEvent(i, len(runs), run, "failed",
                                    time.perf_counter() - began, error=message))  # fmt: skip
            continue
        result.done.append(run.name)
        summaries.append(summary)
        if progress:
            progress(SweepEvent(i, len(runs), run, "done", time.perf_counter() - began, summary))
    result.best = select_best(summaries)
    atomic_write_json(
        out / "sweep.json",
        {
            "experiment": experiment.name, "version": experiment.version,
            "done": result.done, "skipped": result.skipped, "failed": result.failed,
            "best": [
                {"method": m, "tau": t, "workers": p, "lr": s["lr"],
                 "best_center_test_error": s.get("best_center_test_error"),
                 "center_test_error": s.get("center_test_error")}
                for (m, t, p), s in sorted(result.best.items())
            ],
        },
    )  # fmt: skip
    return result
