"""Running an experiment: every run not yet done, into ``out/<run name>/``, resumably.

:func:`run_sweep` resolves the experiment's runs, hands each to a runtime
(:mod:`~easgd.experiments.real` or :mod:`~easgd.experiments.simulated`), and writes
``experiment.json`` (the resolved runs) and ``sweep.json`` (what happened, and the best
learning rate per (method, tau, p), chosen by :func:`select_best`).

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
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from easgd.experiments.definition import Experiment, RunSpec
from easgd.experiments.real import RealRuntime
from easgd.experiments.runtime import Runner, Runtime, SweepContext
from easgd.experiments.simulated import SimRuntime
from easgd.runlog import RunStatus, SweepPaths, SweepStatus, atomic_write_json

__all__ = ["RUNTIMES", "SweepEvent", "SweepResult", "run_sweep", "select_best"]

log = logging.getLogger(__name__)

RUNTIMES = (RealRuntime.name, SimRuntime.name)
#: What an output folder must agree on with the sweep writing into it.
_IDENTITY = ("experiment", "version", "runtime", "scale")


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
    best: dict[tuple[str, int, int], Mapping[str, Any]] = field(default_factory=dict)


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
    for key in _IDENTITY:
        if old.get(key) != header[key]:
            raise ValueError(
                f"--out {sweep.root} holds {key}={old.get(key)!r} ({path.name}), this sweep has "
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
             "center_test_error": s.get("center_test_error")}
            for (m, t, p), s in sorted(result.best.items())
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
    progress: Callable[[SweepEvent], None] | None = None,
    runner: Runner | None = None,
) -> SweepResult:
    """Run every run of ``experiment`` not yet done into ``out/<run name>/``.

    ``runner(ctx, run, folder) -> summary`` replaces the runtime's call (tests inject
    failures with it). See the module docstring for resumption and failures, and the
    runtimes' for budgets (a real run's budget counts from its first training step, so
    start-up needs no allowance).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale={scale!r} must be > 0 (e.g. 0.2 for a smoke run)")
    if step_time is not None and not step_time > 0:
        raise ValueError(f"step_time={step_time!r} must be > 0 seconds")
    out = Path(out)
    runs = experiment.runs(lr_grid=lr_grid, seeds=seeds, only=only)
    ctx = SweepContext(experiment, out, runtime, scale, data_dir)
    rt = _make_runtime(runtime, step_time=step_time)
    sweep = SweepPaths(out)
    header = {
        "experiment": experiment.name, "version": experiment.version, "runtime": runtime,
        "scale": scale, "lr_grid": lr_grid, "seeds": seeds or experiment.seeds,
        "only": sorted(only) if only is not None else None, "train_budget": ctx.budget,
        "definition": experiment.to_dict(),
    }  # fmt: skip
    _check_out(sweep, header)
    header["runs"] = [{"name": r.name, **dataclasses.asdict(r)} for r in runs]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(sweep.experiment, header)
    run_fn: Runner = runner or rt
    result = SweepResult(out, runs)
    summaries: list[Mapping[str, Any]] = []
    for i, run in enumerate(runs, 1):
        paths = sweep.run(run.name)
        folder = paths.root
        done = json.loads(paths.summary.read_text()) if paths.summary.exists() else None
        if done is not None and not paths.failed.exists() and _finished(done):
            result.skipped.append(run.name)
            summaries.append(done)
            if progress:
                progress(SweepEvent(i, len(runs), run, SweepStatus.SKIPPED, summary=summaries[-1]))
            continue
        if folder.exists():  # a failed or interrupted attempt: start it afresh
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        if progress:
            progress(SweepEvent(i, len(runs), run, SweepStatus.START))
        began = time.perf_counter()
        try:
            atomic_write_json(paths.run_info, {**ctx.run_info(run), **rt.run_info(ctx, run)})
            summary = run_fn(ctx, run, folder)
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            atomic_write_json(paths.failed,
                              {"error": message, "traceback": traceback.format_exc()})  # fmt: skip
            result.failed[run.name] = message
            log.warning("run %s failed: %s", run.name, message)
            if progress:
                progress(SweepEvent(i, len(runs), run, SweepStatus.FAILED,
                                    time.perf_counter() - began, error=message))  # fmt: skip
            continue
        result.done.append(run.name)
        summaries.append(summary)
        if progress:
            seconds = time.perf_counter() - began
            progress(SweepEvent(i, len(runs), run, SweepStatus.DONE, seconds, summary))
    result.best = select_best(summaries)
    atomic_write_json(sweep.sweep, _sweep_record(experiment, result))
    return result


def _finished(summary: Mapping[str, Any]) -> bool:
    """Whether a run's summary is a result to keep (a failed run leaves one too: run it again).

    A summary with no status is a simulated run's or an older one's; a real run is kept when
    it completed, or lost some workers but still has a center.
    """
    status = summary.get("status")
    kept = (None, RunStatus.COMPLETED.value, RunStatus.WORKERS_LOST.value)
    return status in kept and summary.get("center_test_error") is not None
