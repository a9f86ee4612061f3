"""Running an experiment: every run not yet done, into ``out/<run name>/``, resumably.

:func:`run_sweep` resolves the experiment's runs, hands each to a runtime
(:mod:`~easgd.experiments.real` or :mod:`~easgd.experiments.simulated`), and writes
``experiment.json`` (the resolved runs) and ``sweep.json`` (what happened, and the best
learning rate per (method, tau, p), chosen by :func:`select_best`).

Learning-rate grids that cannot fool you: when the best rate of a setting is the largest
(smallest) of its grid, the optimum may lie beyond it, so the sweep extends that setting's
grid in that direction by the grid's own step at that edge (:func:`next_rates`), runs the
new rate for every seed, and looks again, up to ``max_extensions`` times (default
:data:`MAX_EXTENSIONS`). A setting whose best is still on an edge after that is recorded as
such (``edge`` in ``sweep.json``; :func:`grid_edge`), and tables mark it.

Failure behaviour:

* a run whose ``summary.json`` exists is skipped, so an interrupted sweep resumes where it
  stopped; a folder without ``summary.json`` (a failed or interrupted run) is cleared and
  run again.
* a run that raises is recorded (``failed.json`` in its folder, and in ``sweep.json``) and
  the sweep goes on; :attr:`SweepResult.failed` lists them.
* an output folder that already holds another experiment, version, runtime or scale is
  refused, so runs of different budgets never mix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import statistics
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from easgd.experiments.definition import Experiment, RunSpec
from easgd.experiments.real import RealRuntime
from easgd.experiments.runtime import Runner, Runtime, SweepContext
from easgd.experiments.simulated import SimRuntime
from easgd.runlog import RunStatus, SweepPaths, SweepStatus, atomic_write_json

T = TypeVar("T")

__all__ = [
    "MAX_EXTENSIONS",
    "RUNTIMES",
    "SweepEvent",
    "SweepResult",
    "grid_edge",
    "next_rates",
    "run_sweep",
    "seed_medians",
    "select_best",
    "summary_medians",
]

log = logging.getLogger(__name__)

RUNTIMES = (RealRuntime.name, SimRuntime.name)
#: What an output folder must agree on with the sweep writing into it, and the value a
#: folder written before the field existed holds.
_IDENTITY = {"experiment": None, "version": None, "runtime": None, "scale": None,
             "device": "cpu", "same_init": False}  # fmt: skip
#: How many times a setting's grid is extended past an edge its best rate sits on.
MAX_EXTENSIONS = 3
#: The step of an extension from a grid of one rate (no step of its own): x2 and /2.
_SINGLE_RATE_STEP = 2.0

Setting = tuple[str, int, int]  # (method, tau, workers)


@dataclass(frozen=True)
class SweepEvent:
    """Progress of a sweep: one run started, done, skipped (already done) or failed."""

    index: int
    total: int
    run: RunSpec
    status: SweepStatus
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
    best: dict[Setting, Mapping[str, Any]] = field(default_factory=dict)
    #: The rates added past an edge of each setting's grid, in the order they were run.
    extended: dict[Setting, list[float]] = field(default_factory=dict)
    #: Each setting's rates tried, ascending (the grid and its extensions).
    grids: dict[Setting, list[float]] = field(default_factory=dict)

    def edge(self, key: Setting) -> str | None:
        """``"top"``/``"bottom"``: the best rate of ``key`` is still on that edge of its grid."""
        best = self.best.get(key)
        return None if best is None else grid_edge(float(best["lr"]), self.grids.get(key, []))


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


def seed_medians(
    items: Iterable[T],
    *,
    setting: Callable[[T], tuple[str, int, int, float]],
    best: Callable[[T], float],
    final: Callable[[T], float],
    seed: Callable[[T], int],
) -> list[dict[str, Any]]:
    """One record per ``(method, tau, workers, lr)`` for :func:`select_best`: the median
    over the seeds of the best and the final error, the median seed (``run``: by best error,
    then final error, then seed) and every seed (``runs``).

    A learning rate is judged by its median seed (the paper keeps its best of 3 runs; the
    median is what a reader can expect of one run). The sweep's grid extension and ``easgd
    report`` both choose by this one rule, so a rate the table shows on an edge of its grid
    is the one the sweep extended.
    """
    groups: dict[tuple[str, int, int, float], list[T]] = {}
    for item in items:
        groups.setdefault(setting(item), []).append(item)
    records = []
    for (method, tau, workers, lr), group in groups.items():
        group.sort(key=lambda r: (_score(best(r)), _score(final(r)), seed(r)))
        records.append({
            "method": method, "tau": tau, "workers": workers, "lr": lr,
            "best_center_test_error": statistics.median(_score(best(r)) for r in group),
            "center_test_error": statistics.median(_score(final(r)) for r in group),
            "run": group[(len(group) - 1) // 2], "runs": group,
        })  # fmt: skip
    return records


def summary_medians(summaries: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """:func:`seed_medians` of run summaries (``summary.json`` with the run's seed)."""
    return seed_medians(
        summaries,
        setting=lambda s: (str(s["method"]), int(s["tau"]), int(s["workers"]), float(s["lr"])),
        best=lambda s: _score(s.get("best_center_test_error")),
        final=lambda s: _score(s.get("center_test_error")),
        seed=lambda s: int(s.get("seed") or 0),
    )


def grid_edge(best_lr: float, lrs: Iterable[float]) -> str | None:
    """Where ``best_lr`` sits in the grid ``lrs``: ``"top"``, ``"bottom"`` or None (inside).

    A grid of one rate is its own top and bottom: ``"only"``.
    """
    grid = sorted(set(float(lr) for lr in lrs))
    if len(grid) < 1 or best_lr not in grid:
        return None
    if len(grid) == 1:
        return "only"
    if best_lr == grid[-1]:
        return "top"
    if best_lr == grid[0]:
        return "bottom"
    return None


def _nice(lr: float) -> float:
    return float(f"{lr:.3g}")  # three significant digits: readable run names


def next_rates(best_lr: float, lrs: Iterable[float]) -> list[float]:
    """The rates to add to the grid ``lrs`` whose best is ``best_lr`` (none: inside it).

    Past the top edge: the top rate times the grid's step there (``lrs[-1] / lrs[-2]``);
    past the bottom: the bottom rate divided by the step there. A one-rate grid grows both
    ways by x2 and /2. Rounded to three significant digits.

    >>> next_rates(0.1, [0.01, 0.02, 0.05, 0.1]), next_rates(0.01, [0.01, 0.02, 0.05, 0.1])
    ([0.2], [0.005])
    """
    grid = sorted(set(float(lr) for lr in lrs))
    edge = grid_edge(best_lr, grid)
    up = grid[-1] / grid[-2] if len(grid) > 1 else _SINGLE_RATE_STEP
    down = grid[1] / grid[0] if len(grid) > 1 else _SINGLE_RATE_STEP
    out = []
    if edge in ("top", "only"):
        out.append(_nice(grid[-1] * up))
    if edge in ("bottom", "only"):
        out.insert(0, _nice(grid[0] / down))
    return [lr for lr in out if lr > 0 and math.isfinite(lr) and lr not in grid]


def _make_runtime(runtime: str, *, step_time: float | None) -> Runtime:
    makers: dict[str, Callable[[], Runtime]] = {
        RealRuntime.name: RealRuntime,
        SimRuntime.name: lambda: SimRuntime(step_time),
    }
    return makers[runtime]()


def _check_out(sweep: SweepPaths, header: dict[str, Any]) -> None:
    path = sweep.experiment
    if not path.exists():
        return
    old = json.loads(path.read_text())
    for key, before in _IDENTITY.items():
        if old.get(key, before) != header[key]:
            raise ValueError(
                f"--out {sweep.root} holds {key}={old.get(key, before)!r} ({path.name}), this "
                "sweep has "
                f"{key}={header[key]!r}; choose another --out so that runs of different "
                "settings do not mix"
            )


def _sweep_record(experiment: Experiment, result: SweepResult) -> dict[str, Any]:
    """The contents of ``sweep.json``."""
    return {
        "experiment": experiment.name, "version": experiment.version,
        "done": result.done, "skipped": result.skipped, "failed": result.failed,
        "best": [
            {"method": m, "tau": t, "workers": p, "lr": s["lr"],
             "best_center_test_error": s.get("best_center_test_error"),
             "center_test_error": s.get("center_test_error"),
             "grid": result.grids.get((m, t, p), []), "edge": result.edge((m, t, p))}
            for (m, t, p), s in sorted(result.best.items())
        ],
        "extended": [
            {"method": m, "tau": t, "workers": p, "lrs": lrs}
            for (m, t, p), lrs in sorted(result.extended.items())
        ],
    }  # fmt: skip


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
    device: str = "cpu",
    same_init: bool | None = None,
    max_extensions: int = MAX_EXTENSIONS,
    progress: Callable[[SweepEvent], None] | None = None,
    runner: Runner | None = None,
) -> SweepResult:
    """Run every run of ``experiment`` not yet done into ``out/<run name>/``.

    ``device``: the workers' (resolved: ``cpu``, ``cuda``, ``cuda:N``; the real runtime
    only). ``same_init``: every seed from one initial network (None: the experiment's).
    ``max_extensions``: how often a grid is extended past an edge its best rate sits on (0:
    never; see the module docstring; only with ``lr_grid``). ``runner(ctx, run, folder) ->
    summary`` replaces the runtime's call (tests inject failures with it). See the module
    docstring for resumption and failures, and the runtimes' for budgets (a real run's
    budget counts from its first training step, so start-up needs no allowance).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale={scale!r} must be > 0 (e.g. 0.2 for a smoke run)")
    if step_time is not None and not step_time > 0:
        raise ValueError(f"step_time={step_time!r} must be > 0 seconds")
    if device != "cpu" and runtime != RealRuntime.name:
        raise ValueError(
            f"device={device!r} applies to the real runtime (the simulator computes on the "
            "CPU); use runtime='real' or device='cpu'"
        )
    if max_extensions < 0:
        raise ValueError(f"max_extensions={max_extensions!r} must be >= 0 (0: never extend)")
    out = Path(out)
    runs = experiment.runs(lr_grid=lr_grid, seeds=seeds, only=only)
    shared = experiment.same_init if same_init is None else same_init
    ctx = SweepContext(experiment, out, runtime, scale, data_dir, device, shared)
    rt = _make_runtime(runtime, step_time=step_time)
    sweep = SweepPaths(out)
    header = {
        "experiment": experiment.name, "version": experiment.version, "runtime": runtime,
        "scale": scale, "device": device, "same_init": shared, "lr_grid": lr_grid,
        "seeds": seeds or experiment.seeds, "max_extensions": max_extensions if lr_grid else 0,
        "only": sorted(only) if only is not None else None, "train_budget": ctx.budget,
        "definition": experiment.to_dict(),
    }  # fmt: skip
    _check_out(sweep, header)
    out.mkdir(parents=True, exist_ok=True)
    result = SweepResult(out, [])
    summaries: list[Mapping[str, Any]] = []

    def execute(batch: list[RunSpec]) -> None:
        """Run ``batch`` (appended to the plan first, so experiment.json lists it)."""
        result.runs.extend(batch)
        header["runs"] = [{"name": r.name, **dataclasses.asdict(r)} for r in result.runs]
        atomic_write_json(sweep.experiment, header)
        for run in batch:
            key = (run.method, run.tau, run.workers)
            result.grids[key] = sorted({*result.grids.get(key, []), run.lr})
            summary = _run_one(ctx, rt, runner or rt, sweep, run, result, progress)
            if summary is not None:
                summaries.append(_as_reported(sweep.run(run.name).root, summary))

    execute(runs)
    if lr_grid:
        for key in list(result.grids):
            for _ in range(max_extensions):
                mine = [s for s in summaries if _setting(s) == key]
                best = select_best(summary_medians(mine)).get(key)
                new = [] if best is None else next_rates(float(best["lr"]), result.grids[key])
                if not new:
                    break
                assert best is not None
                log.info("%s tau=%d p=%d: best lr %g on an edge of %s; adding %s", *key,
                         best["lr"], result.grids[key], new)  # fmt: skip
                result.extended.setdefault(key, []).extend(new)
                n_seeds = seeds or experiment.seeds
                execute([RunSpec(*key, lr, s) for lr in new for s in range(n_seeds)])
    result.best = select_best(summary_medians(summaries))
    atomic_write_json(sweep.sweep, _sweep_record(experiment, result))
    return result


def _as_reported(folder: Path, summary: Mapping[str, Any]) -> Mapping[str, Any]:
    """``summary`` with the best and final center test errors that ``easgd report`` reads
    from ``folder``: the evaluations up to the training budget.

    A real run's final center is evaluated when its last worker stops, a little past the
    budget, so its own summary can hold an error the table never shows. The sweep chooses
    (and extends) by the table's numbers, so that a rate the table shows on an edge is one
    the sweep has extended. A run without a budget to cut at (a simulated run) and one the
    report cannot read (with a warning: ``easgd report`` will name the problem) keep their
    own summary.
    """
    from easgd.report import load_run  # easgd.report imports this package

    try:
        run = load_run(folder)
    except (OSError, ValueError) as exc:
        log.warning("%s: judged by its own summary, as the report cannot read it: %s",
                    folder, exc)  # fmt: skip
        return summary
    if run.horizon is None:
        return summary
    return {**summary, "best_center_test_error": run.best_error,
            "center_test_error": run.final_error}  # fmt: skip


def _setting(summary: Mapping[str, Any]) -> Setting:
    return (str(summary["method"]), int(summary["tau"]), int(summary["workers"]))


class SweepInterrupted(RuntimeError):
    """A signal stopped the sweep during one of its runs; ``exit_status`` is the run's."""

    def __init__(self, run: str, cause: BaseException) -> None:
        super().__init__(
            f"interrupted during run {run}: the runs done so far are kept; run the same "
            "command again to continue from there"
        )
        self.run = run
        self.exit_status = int(getattr(cause, "exit_status", 130))


def _run_one(
    ctx: SweepContext,
    rt: Runtime,
    run_fn: Runner,
    sweep: SweepPaths,
    run: RunSpec,
    result: SweepResult,
    progress: Callable[[SweepEvent], None] | None,
) -> Mapping[str, Any] | None:
    """Run (or skip, when done) one run; its summary, or None when it failed."""
    i, total = len(result.done) + len(result.skipped) + len(result.failed) + 1, len(result.runs)
    paths = sweep.run(run.name)
    folder = paths.root
    done = json.loads(paths.summary.read_text()) if paths.summary.exists() else None
    if done is not None and not paths.failed.exists() and _finished(done):
        result.skipped.append(run.name)
        if progress:
            progress(SweepEvent(i, total, run, SweepStatus.SKIPPED, summary=done))
        return dict(done)
    if folder.exists():  # a failed or interrupted attempt: start it afresh
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    if progress:
        progress(SweepEvent(i, total, run, SweepStatus.START))
    began = time.perf_counter()
    try:
        atomic_write_json(paths.run_info, {**ctx.run_info(run), **rt.run_info(ctx, run)})
        summary = run_fn(ctx, run, folder)
    except Exception as exc:
        if getattr(exc, "status", None) == RunStatus.INTERRUPTED:
            # SIGINT/SIGTERM reached the run's launcher: the user stops the sweep, not this
            # run only (its folder has no result: a rerun of the sweep starts it afresh).
            raise SweepInterrupted(run.name, exc) from exc
        message = f"{type(exc).__name__}: {exc}"
        atomic_write_json(paths.failed,
                          {"error": message, "traceback": traceback.format_exc()})  # fmt: skip
        result.failed[run.name] = message
        log.warning("run %s failed: %s", run.name, message)
        if progress:
            progress(SweepEvent(i, total, run, SweepStatus.FAILED,
                                time.perf_counter() - began, error=message))  # fmt: skip
        return None
    result.done.append(run.name)
    if progress:
        progress(SweepEvent(i, total, run, SweepStatus.DONE, time.perf_counter() - began,
                            summary))  # fmt: skip
    return summary


def _finished(summary: Mapping[str, Any]) -> bool:
    """Whether a run's summary is a result to keep (a failed run leaves one too: run it again).

    A summary with no status is a simulated run's or an older one's; a real run is kept when
    it completed, or lost some workers but still has a center.
    """
    status = summary.get("status")
    kept = (None, RunStatus.COMPLETED.value, RunStatus.WORKERS_LOST.value)
    return status in kept and summary.get("center_test_error") is not None
