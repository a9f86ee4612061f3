"""The simulator at scale: P = 16-1024 workers, a 5M-parameter cost model, 0.1-100 Gbit/s.

Two questions, answered with :func:`easgd.sim.simulate`:

1. **Speed of the simulator**: real seconds per simulated hour for P = 64 workers whose
   messages are 5M float32 (20 MB; ``CostModel(numel=5_000_000)``), local steps of 0.1 s
   (virtual), 50 us latency, at 1 Gbit/s. Measured on two compute problems: a
   ``Quadratic`` (1000 coordinates: the simulator's own overhead, events and update rules)
   and the ``digits`` ``ModelObjective`` (64 real CNN replicas: the gradients dominate).
   Then at P = 1024 on a quadratic of 10 coordinates per worker: synchronous EAMSGD
   (tau = 10) and all-reduce SGD on the batched engine (``simulate(engine="batched")``: all
   workers as rows of one population) against the per-worker engine (the baseline, on
   fewer steps), and asynchronous EAMSGD (tau = 10, unqueued center: the workers' events
   fall on the same instants) on both engines likewise.
2. **Simulated time to accuracy**: virtual seconds until the center (all-reduce: the model)
   first reaches a test error (5%) on digits, at P = 16, 64 and 256 (``--quick``: P = 8),
   every method at its best learning rate of a small grid (extended, at most twice, past an
   edge that is best; at P = 16 and 256 the grid is P = 64's best and its two neighbours):

   * ``allreduce``: the library's all-reduce SGD (gradients averaged every step, as DDP;
     plain SGD, no momentum), ring all-reduce cost ``2(p-1)(latency + bytes/(p*bw))``;
   * ``allreduce_nesterov``: the same method with Nesterov momentum 0.9, as DDP users run
     it (``Hyperparams(method="allreduce", momentum=0.9)``, the authors' form:
     ``v = d*v; x += v; g = mean of the gradients at x; x -= lr*g; v -= lr*g``);
   * ``eamsgd sync`` and ``eamsgd sync bf16`` / ``int8``: synchronous EAMSGD, one sum of the
     elastic differences per exchange (overlapped with the next tau local steps, as the
     runtime does), full float32 or compressed with error feedback (the two-phase
     ``CompressedSum``: 2x and 3.9x fewer bytes in the cost model); tau 10 and 30,
     momentum 0.99 (the default) and 0.9;
   * ``diloco``: DiLoCo, tau = H = 10 or 30 inner Nesterov (0.9) steps, then the outer
     Nesterov step (outer lr 0.7, momentum 0.9) on the averaged pseudo-gradient (its sum is
     not overlapped: charged in full);
   * ``eamsgd S=16``: asynchronous EAMSGD (tau 10) with the center on 16 servers whose links
     are shared: each exchange occupies the server for ``2 * bytes / (S * bw)``
     (``CostModel.server_time``; requests queue). P = 16 and 64, at 1 and 10 Gbit/s.

   Some settings run at P = 16 and 64 only (``Variant.only``), to fit the budget.
   On the synchronous schedule with a constant step time the trajectory does not depend on
   the bandwidth, only the clock does: each synchronous run is evaluated after every global
   step and stops at the target (or once it can no longer beat the best run of its
   settings, which shares its clock); its time at any link is the simulator's own clock at
   that step (:func:`clock`, run on a one-coordinate quadratic). So the link at which each
   method stops beating the best all-reduce SGD is read on a scan of 0.1-100 Gbit/s
   (4 per decade, log-log interpolation between points). One seed (the simulator is
   deterministic); no weight decay. Every variant is a method of the library, run by the
   simulator on the schedule of its mode.

Usage, from the repository root::

    python -m benchmarks.sim_scale [--quick] [--only speed|accuracy] [--target 0.05] [--json PATH]

The figures and what limits them: ``benchmarks/RESULTS.md``, section 5.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

from benchmarks._common import (
    base_parser,
    machine_info,
    partial_json,
    print_table,
    ratio,
    single_thread,
    write_json,
)
from easgd.algorithms import METHODS, Exchange, Hyperparams, Mode

NUMEL = 5_000_000
STEP_TIME = 0.1
LATENCY = 50e-6
BANDWIDTHS = {"1Gbit": 1.25e8, "10Gbit": 1.25e9, "100Gbit": 1.25e10}
#: The workers of the time-to-accuracy tables (--quick: QUICK_P).
SCALE_P = (64, 16, 256)  # in this order: 16 and 256 start from 64's best lr
QUICK_P = (8,)
#: The links of the asynchronous runs (whose trajectory depends on the link).
ASYNC_LINKS = ("1Gbit", "10Gbit")
#: The bandwidths (bytes/s) of the crossover scan: 0.1 to 100 Gbit/s, 4 per decade.
SCAN = tuple(1.25e8 * 10 ** (k / 4) for k in range(-4, 9))
QUICK_SCAN = (1.25e7, 1.25e8, 1.25e10)
TAU = 10
BATCH = 32


@dataclass(frozen=True)
class Variant:
    """One method of the time-to-accuracy table and its learning-rate grid."""

    name: str
    method: str  # a method of easgd.algorithms.METHODS
    grid: tuple[float, ...]
    tau: int = 1
    momentum: float | None = None  # None: the method's default
    servers: float = math.inf  # asynchronous: shards of the center (inf: no contention)
    steps: int = 200  # local steps per worker (async) or global steps (sync)
    schedule: str | None = None  # None: the method's default mode
    compress: str = "none"  # synchronous EASGD/EAMSGD: compressed exchanges
    only: tuple[int, ...] = ()  # time to accuracy: run at these P only (empty: every P)

    def hyperparams(self, lr: float, workers: int) -> Hyperparams:
        given: dict[str, Any] = {} if self.momentum is None else {"momentum": self.momentum}
        return Hyperparams(method=self.method, lr=lr, tau=self.tau, workers=workers, **given)

    @property
    def label(self) -> str:
        """The variant's settings beyond its name and learning rate."""
        m = "" if self.momentum is None else f" m={self.momentum:g}"
        return f"tau={self.tau}{m}"

    def clock_key(self, workers: int) -> tuple[str, int, str, int]:
        """What the synchronous clock depends on (not the learning rate nor the momentum)."""
        return (self.method, self.tau, self.compress, workers)

    @property
    def mode(self) -> Mode:
        return METHODS[self.method].resolve_mode()

    @property
    def allreduce(self) -> bool:
        """Whether it averages gradients at every step (the data-parallel baselines)."""
        return METHODS[self.method].exchange is Exchange.GRAD_MEAN


_G99 = (0.005, 0.0025, 0.01)  # EAMSGD's momentum 0.99 (the default): lr/(1 - 0.99) = 100 lr
_G90 = (0.025, 0.0125, 0.05)  # momentum 0.9
FULL = (
    Variant("allreduce", "allreduce", (0.3, 0.1, 1.0), steps=150),
    Variant("allreduce_nesterov", "allreduce", (0.03, 0.01, 0.1), momentum=0.9, steps=150),
    Variant("eamsgd sync", "eamsgd", _G99, tau=10, steps=250, only=(16, 64), schedule="sync"),
    Variant("eamsgd sync", "eamsgd", _G99, tau=30, steps=250, only=(16, 64), schedule="sync"),
    Variant("eamsgd sync", "eamsgd", _G90, tau=10, momentum=0.9, steps=250, schedule="sync"),
    Variant("eamsgd sync", "eamsgd", _G90, tau=30, momentum=0.9, steps=250, only=(16, 64),
            schedule="sync"),
    Variant("eamsgd sync bf16", "eamsgd", _G99, tau=10, steps=250, compress="bf16",
            only=(16, 64), schedule="sync"),
    Variant("eamsgd sync bf16", "eamsgd", _G90, tau=10, momentum=0.9, steps=250,
            compress="bf16", only=(16, 64), schedule="sync"),
    Variant("eamsgd sync int8", "eamsgd", _G99, tau=10, steps=250, compress="int8",
            only=(16, 64), schedule="sync"),
    Variant("eamsgd sync int8", "eamsgd", _G90, tau=10, momentum=0.9, steps=250,
            compress="int8", schedule="sync"),
    Variant("diloco", "diloco", (0.03, 0.01, 0.1), tau=10, momentum=0.9, steps=250,
            schedule="sync"),
    Variant("diloco", "diloco", (0.03, 0.01, 0.1), tau=30, momentum=0.9, steps=250,
            only=(16, 64), schedule="sync"),
    Variant("eamsgd S=16", "eamsgd", (0.005, 0.01), tau=10, servers=16, steps=150,
            only=(16, 64)),
)  # fmt: skip
QUICK = (
    Variant("allreduce", "allreduce", (0.3,), steps=8),
    Variant("allreduce_nesterov", "allreduce", (0.03,), momentum=0.9, steps=8),
    Variant("eamsgd sync", "eamsgd", (0.01,), tau=2, steps=10, schedule="sync"),
    Variant("eamsgd sync int8", "eamsgd", (0.01,), tau=2, steps=10, compress="int8",
            schedule="sync"),
    Variant("diloco", "diloco", (0.03,), tau=2, momentum=0.9, steps=10, schedule="sync"),
    Variant("eamsgd S=16", "eamsgd", (0.01,), tau=2, servers=16, steps=20),
)  # fmt: skip
#: The simulator's speed: one run of each method, at these hyperparameters.
SPEED = {
    "eamsgd": Variant("eamsgd", "eamsgd", (0.005,), tau=TAU),
    "allreduce": Variant("allreduce", "allreduce", (0.1,)),
}


def schedule_of(v: Variant) -> str:
    """The simulator's schedule for a variant: its own, or its method's default mode."""
    return v.schedule or v.mode.value


def cost_model(bandwidth: float, servers: float = math.inf) -> Any:
    from easgd.sim import CostModel

    server_time = 0.0 if math.isinf(servers) else 2 * NUMEL * 4 / (servers * bandwidth)
    return CostModel(
        step_time=STEP_TIME,
        latency=LATENCY,
        bandwidth=bandwidth,
        numel=NUMEL,
        server_time=server_time,
    )


def digits_problem() -> Any:
    from easgd.sim import ModelObjective
    from easgd.task import build_task

    parts = build_task("digits")
    return ModelObjective(parts.build, parts.train, parts.test, BATCH, parts.transform)


# ---------------------------------------------------------------------------------------
# 1. Real seconds per simulated hour.
# ---------------------------------------------------------------------------------------


#: The large-P rows: P = 1024 workers on a quadratic of SCALE_DIM coordinates each. The
#: batched engine's step costs a few tensor operations on P * dim values, so dim sets its
#: cost: at 10 (10,240 values, float64) the step is still mostly Python, at 100 the noise
#: draws (one normal per value) already cost more than the rest; 10 coordinates per worker
#: are 10 independent problems (Monte Carlo), and the 5M parameters are the cost model's.
SCALE_WORKERS = 1024
SCALE_DIM = 10


@dataclass(frozen=True)
class SpeedRun:
    """One row of the speed table: a method on a problem, schedule and engine."""

    problem: str  # "quadratic" or "digits"
    method: str  # a key of SPEED
    steps: int
    workers: int | None = None  # None: the benchmark's --workers
    schedule: str | None = None  # None: the method's default mode
    engine: str = "auto"
    dim: int = 1000  # the quadratic's coordinates per worker


def speed(run: SpeedRun, workers: int) -> dict[str, Any]:
    from easgd.sim import Quadratic, simulate

    workers = run.workers or workers
    problem = Quadratic(sigma=1.0, dim=run.dim) if run.problem == "quadratic" else digits_problem()
    v = SPEED[run.method]
    schedule = run.schedule or schedule_of(v)
    res = simulate(
        problem,
        v.hyperparams(v.grid[0], workers),
        schedule=schedule,
        steps=run.steps,
        cost=cost_model(BANDWIDTHS["1Gbit"]),
        engine=run.engine,
    )
    return {
        "problem": run.problem,
        "dim": run.dim if run.problem == "quadratic" else None,
        "method": run.method,
        "schedule": schedule,
        "engine": res.engine,
        "workers": workers,
        "virtual_s": res.virtual_seconds,
        "real_s": res.real_seconds,
        "local_steps": res.local_steps,
        "real_s_per_sim_hour": ratio(res.real_seconds, res.virtual_seconds) * 3600,
        "local_steps_per_real_s": ratio(res.local_steps, res.real_seconds),
    }


# ---------------------------------------------------------------------------------------
# 2. Simulated time to accuracy.
# ---------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by :func:`_watched`'s objective to end a run: it reached the target, or gave up."""


def _watched(base: Any, target: float, give_up: bool) -> Any:
    """An objective, watched: each evaluation's global step (worker 0's gradients so far, as
    :class:`easgd.experiments.simulated._LossLog` records them) and test error go to
    ``curve``; the run stops at the target, or once hopeless (``give_up``: error above 0.5
    after 100 steps, or a non-finite loss)."""
    from easgd.experiments.simulated import _LossLog

    class Watched(_LossLog):
        def __init__(self) -> None:
            super().__init__(base)
            self.curve: list[tuple[int, float]] = []

        def evaluate(self, x: Any) -> dict[str, float]:
            m = super().evaluate(x)
            steps = len(self.losses.get(0, ()))
            self.curve.append((steps, m["error"]))
            hopeless = not math.isfinite(m["loss"]) or (steps >= 100 and m["error"] > 0.5)
            if m["error"] <= target or (give_up and hopeless):
                raise _Stop
            return m

    return Watched()


def run_sync(
    v: Variant, lr: float, workers: int, steps: int, target: float, give_up: bool
) -> tuple[int | None, list[tuple[int, float]], float]:
    """A synchronous run, evaluated after every global step until it reaches the target:
    ``(the step it reached it at or None, (step, error) curve, real seconds)``. The
    trajectory does not depend on the bandwidth (the clock does: :func:`clock`)."""
    from easgd.sim import simulate

    watched = _watched(digits_problem(), target, give_up)
    started = time.perf_counter()
    with contextlib.suppress(_Stop):
        simulate(watched, v.hyperparams(lr, workers), schedule="sync", steps=steps, seed=0,
                 cost=cost_model(BANDWIDTHS["1Gbit"]), eval_interval=STEP_TIME / 2,
                 compress=v.compress)  # fmt: skip
    k, err = watched.curve[-1]
    return (k if err <= target else None), watched.curve, time.perf_counter() - started


_CLOCKS: dict[tuple[Any, ...], list[float]] = {}


def clock(v: Variant, workers: int, bandwidth: float, steps: int) -> list[float]:
    """The virtual time after each of ``steps`` global steps of a synchronous variant (index
    0: the start): the simulator's own clock, run on a one-coordinate quadratic (the clock
    depends on the method, tau, compression, P and the cost model, not on the problem).

    A compressed variant's clock is its float32 clock with messages of the codec's wire
    bytes (what the simulator charges for a compressed sum): the batched engine runs it in
    a few tensor operations a step, where the compressed two-phase sum costs O(P^2) codec
    calls a step. Its first ``2 tau + 2`` steps are checked against the compressed clock
    once per variant and P."""
    from easgd.compress import codec
    from easgd.sim import Quadratic, simulate

    def times(n: int, compress: str, cost: Any) -> list[float]:
        res = simulate(Quadratic(dim=1), v.hyperparams(v.grid[0], workers), schedule="sync",
                       steps=n + 1, cost=cost, compress=compress,
                       eval_interval=STEP_TIME / 2)  # fmt: skip
        if len(res.times) < n + 1:
            raise RuntimeError(f"the clock of {v.name} recorded {len(res.times)} steps")
        return list(res.times[: n + 1])  # before the last step's final wait

    key = (*v.clock_key(workers), bandwidth)
    if len(_CLOCKS.get(key, ())) <= steps:
        cost = cost_model(bandwidth)
        if v.compress != "none":
            wire = math.ceil(NUMEL * codec(v.compress).bytes_per_value())
            cost = dataclasses.replace(cost, numel=wire, bytes_per_param=1)
            if (v, workers) not in _CHECKED:
                n = min(steps, 2 * v.tau + 2)
                if times(n, "none", cost) != times(n, v.compress, cost_model(bandwidth)):
                    raise RuntimeError(f"{v.name}: the wire-bytes clock is not the simulator's")
                _CHECKED.add((v, workers))
        _CLOCKS[key] = times(steps, "none", cost)
    return _CLOCKS[key]


_CHECKED: set[tuple[Variant, int]] = set()


def run_async(
    v: Variant, lr: float, bandwidth: float, workers: int, target: float
) -> tuple[float, list[tuple[float, float]], float]:
    """An asynchronous run (its trajectory depends on the bandwidth): ``(virtual time to the
    target or inf, (time, error) curve, real seconds)``."""
    from easgd.sim import simulate

    res = simulate(digits_problem(), v.hyperparams(lr, workers), schedule=schedule_of(v),
                   steps=v.steps, seed=0, cost=cost_model(bandwidth, v.servers),
                   eval_interval=_horizon(v, bandwidth, workers) / 60)  # fmt: skip
    errors = [m["error"] for m in res.metrics]
    curve = list(zip(res.times, errors, strict=True))
    return first_below(res.times, errors, target), curve, res.real_seconds


def first_below(times: list[float], errors: list[float], target: float) -> float:
    for t, e in zip(times, errors, strict=True):
        if e <= target:
            return t
    return math.inf


def _grid_step(grid: tuple[float, ...]) -> float:
    s = sorted(grid)
    return s[1] / s[0] if len(s) > 1 else 2.0


def grid_for(v: Variant, prev_lr: float | None) -> list[float]:
    """The learning rates to try: ``v.grid``, or at a later P the best of the first P and its
    two neighbours (the grid's step), best first."""
    if prev_lr is None:
        return list(v.grid)
    step = _grid_step(v.grid)
    return [prev_lr, prev_lr / step, prev_lr * step]


def _sync_score(r: dict[str, Any]) -> tuple[float, float]:
    k = r["steps_to_target"]
    return (math.inf if k is None else k, min(e for _, e in r["curve"]))


def tune_sync(
    v: Variant, workers: int, target: float, quick: bool, grid: list[float]
) -> list[dict[str, Any]]:
    """Every learning rate of ``grid`` (extended, at most twice, past an edge that is best),
    each run only as long as it can still beat the best so far (the same clock: fewer steps
    is faster at every bandwidth)."""
    runs: list[dict[str, Any]] = []
    todo, extended = list(grid), 0
    while todo:
        lr = todo.pop(0)
        best_k = min((_sync_score(r)[0] for r in runs), default=math.inf)
        steps = v.steps if math.isinf(best_k) else min(v.steps, int(best_k))
        k, curve, real = run_sync(v, lr, workers, steps, target, give_up=not quick)
        runs.append({"P": workers, "variant": v.name, "settings": v.label, "tau": v.tau,
                     "momentum": v.momentum, "compress": v.compress, "lr": lr,
                     "steps_to_target": k, "real_s": real, "curve": curve})  # fmt: skip
        reached = "never" if k is None else k
        print(f"  P={workers:<4} {v.name:<18} {v.label:<13} lr={lr:<7g} steps to {target:g}: "
              f"{reached} (of {steps}; real {real:.1f} s)", flush=True)  # fmt: skip
        if not todo and not quick and extended < 2 and len(runs) > 1:
            lrs = sorted(r["lr"] for r in runs)
            best = min(runs, key=_sync_score)["lr"]
            step = _grid_step(v.grid)
            if best == lrs[0]:
                todo, extended = [best / step], extended + 1
            elif best == lrs[-1]:
                todo, extended = [best * step], extended + 1
    return runs


def sync_time(
    v: Variant, runs: list[dict[str, Any]], workers: int, bw: float
) -> tuple[float, dict[str, Any] | None]:
    """The variant's time to the target at a bandwidth: its fastest run's, on its clock."""
    reached = [r for r in runs if r["steps_to_target"] is not None]
    if not reached:
        return math.inf, None
    best = min(reached, key=lambda r: r["steps_to_target"])
    return clock(v, workers, bw, best["steps_to_target"])[best["steps_to_target"]], best


def crossings(bws: list[float], speedups: list[float]) -> str:
    """Where a method's speedup over the best all-reduce crosses 1 on a bandwidth scan
    (log-log interpolation), in words: ``faster below 12 Gbit/s`` etc."""
    gbit = [b * 8 / 1e9 for b in bws]
    wins = [s > 1 for s in speedups]
    if all(wins):
        return f"faster at every scanned link ({gbit[0]:g}-{gbit[-1]:g} Gbit/s)"
    if not any(wins):
        return f"slower at every scanned link ({gbit[0]:g}-{gbit[-1]:g} Gbit/s)"
    parts = []
    for i in range(len(bws) - 1):
        if wins[i] != wins[i + 1]:
            a, b = (math.log(max(s, 1e-12)) for s in speedups[i : i + 2])
            f = a / (a - b) if math.isfinite(a - b) and a != b else 0.5
            at = math.exp(math.log(gbit[i]) + f * (math.log(gbit[i + 1]) - math.log(gbit[i])))
            parts.append(f"{'faster below' if wins[i] else 'faster above'} {at:.3g} Gbit/s")
    return "; ".join(parts)


def time_to_accuracy(quick: bool, target: float) -> dict[str, Any]:
    """Section 2: every variant at every P, its best settings per link, and the crossovers."""
    variants = QUICK if quick else FULL
    scan = list(QUICK_SCAN if quick else SCAN)
    names = list(dict.fromkeys(v.name for v in variants))
    allreduce_names = [n for n in names if any(v.allreduce for v in variants if v.name == n)]
    runs: list[dict[str, Any]] = []
    best: list[dict[str, Any]] = []
    crossover: list[dict[str, Any]] = []
    first_best: dict[tuple[Variant, str], float] = {}  # the first P's best lr (per link)
    for p in QUICK_P if quick else SCALE_P:
        here_v = [v for v in variants if not v.only or p in v.only]
        sync_runs: dict[Variant, list[dict[str, Any]]] = {}
        for v in (v for v in here_v if schedule_of(v) == "sync"):
            rs = tune_sync(v, p, target, quick, grid_for(v, first_best.get((v, ""))))
            sync_runs[v] = rs
            runs.extend(rs)
            first_best.setdefault((v, ""), min(rs, key=_sync_score)["lr"])
        sync_names = [n for n in names if any(v.name == n for v in sync_runs)]

        def time_of(
            name: str, bw: float, p: int = p, sync_runs: dict[Variant, Any] = sync_runs
        ) -> tuple[float, dict[str, Any] | None]:
            options = [sync_time(v, rs, p, bw) for v, rs in sync_runs.items() if v.name == name]
            return min(options, key=lambda o: o[0])

        rows: list[dict[str, Any]] = []
        for bw_name, bw in BANDWIDTHS.items():
            for name in (n for n in names if any(v.name == n for v in here_v)):
                if name in sync_names:
                    t, r = time_of(name, bw)
                    row = {"steps_to_target": None if r is None else r["steps_to_target"]}
                else:  # asynchronous: a run per learning rate and link
                    if bw_name not in ASYNC_LINKS:
                        continue
                    v = next(v for v in here_v if v.name == name)
                    tried: list[dict[str, Any]] = []
                    for lr in grid_for(v, first_best.get((v, bw_name))):
                        tta, curve, real = run_async(v, lr, bw, p, target)
                        tried.append({"P": p, "variant": name, "settings": v.label,
                                      "tau": v.tau, "momentum": v.momentum, "lr": lr,
                                      "bandwidth": bw_name, "time_to_target_s": tta,
                                      "real_s": real, "curve": curve})  # fmt: skip
                        print(f"  P={p:<4} {name:<18} {bw_name:<7} lr={lr:<7g} time to "
                              f"{target:g}: {tta:.1f} s (real {real:.1f} s)",
                              flush=True)  # fmt: skip
                    runs.extend(tried)
                    r = min(tried, key=lambda x: (x["time_to_target_s"], x["lr"]))
                    first_best.setdefault((v, bw_name), r["lr"])
                    t, row = r["time_to_target_s"], {"steps_to_target": None}
                    if math.isinf(t):
                        r = None
                row.update({"P": p, "bandwidth": bw_name, "variant": name, "time_to_target_s": t,
                            "settings": None if r is None else r["settings"],
                            "lr": None if r is None else r["lr"]})  # fmt: skip
                rows.append(row)
            here = [b for b in rows if b["bandwidth"] == bw_name]
            ref = min((b["time_to_target_s"] for b in here if b["variant"] in allreduce_names),
                      default=math.inf)  # fmt: skip
            for b in here:
                b["speedup_vs_best_allreduce"] = ratio(ref, b["time_to_target_s"])
        best.extend(rows)
        ref_scan = [min(time_of(n, bw)[0] for n in allreduce_names) for bw in scan]
        cross: list[dict[str, Any]] = []
        for name in sync_names:
            if name in allreduce_names:
                continue
            speedups = [ratio(ref, time_of(name, bw)[0])
                        for ref, bw in zip(ref_scan, scan, strict=True)]  # fmt: skip
            cross.append({"P": p, "variant": name, "bandwidths": scan,
                          "speedups": speedups, "verdict": crossings(scan, speedups)})  # fmt: skip
        crossover.extend(cross)
        print()
        print_table(
            f"Simulated time (virtual s) to center test error <= {target:g} on digits, P={p}, "
            "best settings of each grid; speedup = best all-reduce time / this time",
            ["bandwidth", "variant", "settings", "lr", "steps", "time_to_target_s", "speedup"],
            [[b["bandwidth"], b["variant"], b["settings"], b["lr"], b["steps_to_target"],
              b["time_to_target_s"], b["speedup_vs_best_allreduce"]] for b in rows],
        )  # fmt: skip
        links = BANDWIDTHS.values()
        marks = [i for i, bw in enumerate(scan)
                 if i in (0, len(scan) - 1) or any(math.isclose(bw, x) for x in links)]  # fmt: skip
        print_table(
            f"P={p}: speedup over the best all-reduce SGD (at each link its best lr) against "
            "the link, synchronous methods (their trajectories do not depend on it)",
            ["variant", *(f"{scan[i] * 8 / 1e9:g}G" for i in marks), "faster than all-reduce"],
            [[c["variant"], *(c["speedups"][i] for i in marks), c["verdict"]] for c in cross],
        )  # fmt: skip
    return {"variants": [v.__dict__ for v in variants], "best": best, "crossover": crossover,
            "runs": runs}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("sim_scale", __doc__)
    parser.add_argument("--target", type=float, default=None, help="test error (0.05)")
    parser.add_argument("--workers", type=int, default=64, help="P (64)")
    parser.add_argument(
        "--only",
        choices=["speed", "accuracy"],
        default=None,
        help="only section 1 (the simulator's speed, a few minutes) or 2 (time to accuracy)",
    )
    args = parser.parse_args(argv)
    args.json = partial_json(args, "sim_scale")
    single_thread()
    workers = 16 if args.quick else args.workers
    target = args.target or (0.5 if args.quick else 0.05)
    info = machine_info()

    # 1. The simulator's speed: at --workers, then at P = 1024, where every row runs on both
    # engines (the per-worker one, the baseline, on fewer steps: its cost per step is
    # steady), the synchronous schedule and the asynchronous one (unqueued: lockstep).
    quick = args.quick

    def big(method: str, steps: int, schedule: str, engine: str = "auto") -> SpeedRun:
        return SpeedRun("quadratic", method, steps, SCALE_WORKERS, schedule, engine, SCALE_DIM)

    speed_plan = (
        [SpeedRun("quadratic", "eamsgd", 20), SpeedRun("digits", "eamsgd", 3)]
        if quick
        else [
            SpeedRun("quadratic", "eamsgd", 400),
            SpeedRun("quadratic", "allreduce", 400),
            SpeedRun("digits", "eamsgd", 60),
            SpeedRun("digits", "allreduce", 40),
        ]
    )
    for method, schedule in (("eamsgd", "sync"), ("allreduce", "sync"), ("eamsgd", "async")):
        speed_plan.append(big(method, 20 if quick else 2000, schedule, "batched"))
        speed_plan.append(big(method, 3 if quick else 30, schedule, "per-worker"))
    if args.only == "accuracy":
        speed_plan = []
    speed_rows = [speed(run, workers) for run in speed_plan]
    for r in speed_rows:  # the batched engine against the per-worker one, same setting
        same = ("problem", "dim", "method", "schedule", "workers")
        base = [b for b in speed_rows
                if b["engine"] == "per-worker" and all(b[k] == r[k] for k in same)]  # fmt: skip
        r["speedup_vs_per_worker"] = (
            ratio(base[0]["real_s_per_sim_hour"], r["real_s_per_sim_hour"])
            if r["engine"] == "batched" and base
            else None
        )
    print_table(
        f"Simulator speed: {NUMEL / 1e6:g}M-parameter messages, step "
        f"{STEP_TIME} s, 1 Gbit/s, latency {LATENCY * 1e6:g} us (one core)",
        [
            "problem",
            "dim",
            "method",
            "schedule",
            "engine",
            "P",
            "virtual_s",
            "real_s",
            "real_s_per_sim_hour",
            "steps_per_real_s",
            "speedup",
        ],
        [
            [
                r["problem"],
                r["dim"],
                r["method"],
                r["schedule"],
                r["engine"],
                r["workers"],
                r["virtual_s"],
                r["real_s"],
                r["real_s_per_sim_hour"],
                r["local_steps_per_real_s"],
                r["speedup_vs_per_worker"],
            ]
            for r in speed_rows
        ],
    )

    # 2. Time to accuracy at every P and link, and where each method stops winning.
    tta: dict[str, Any] = {"variants": [], "best": [], "crossover": [], "runs": []}
    if args.only != "speed":
        tta = time_to_accuracy(args.quick, target)
    write_json(
        args.json,
        {
            "benchmark": "sim_scale",
            "quick": args.quick,
            "machine": info,
            "settings": {
                "workers": workers,
                "time_to_accuracy_workers": QUICK_P if args.quick else SCALE_P,
                "numel": NUMEL,
                "step_time": STEP_TIME,
                "latency": LATENCY,
                "bandwidths": BANDWIDTHS,
                "tau": TAU,
                "batch": BATCH,
                "target_error": target,
                "variants": tta["variants"],
                "scan_bandwidths": QUICK_SCAN if args.quick else SCAN,
            },
            "speed": speed_rows,
            "best": tta["best"],
            "crossover": tta["crossover"],
            "runs": tta["runs"],
        },
    )
    return 0


def _horizon(v: Variant, bandwidth: float, workers: int) -> float:
    """Roughly the virtual seconds a run lasts (to space its evaluations)."""
    cost = cost_model(bandwidth, v.servers)
    if schedule_of(v) == "sync":  # at most one all-reduce per step
        return v.steps * (cost.step_time + cost.allreduce(NUMEL * 4, workers))
    exchange = 2 * cost.message(NUMEL * 4) + cost.server_time
    per_round = max(v.tau * cost.step_time + exchange, workers * cost.server_time)
    return v.steps / v.tau * per_round


if __name__ == "__main__":
    sys.exit(main())
