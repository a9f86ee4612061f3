"""Figures and tables like the paper's, from run directories alone (it never trains).

:func:`load_runs` walks folders for run directories (``summary.json`` beside
``config.json``, ``eval.jsonl``, ``metrics.jsonl``), :func:`build_report` keeps the best run
(learning rate, seed) of every method per panel, the way the paper reports its best run, and
:func:`write_report` draws ``figure.png``/``figure.svg`` (training loss, center test loss and
center test error against time, one panel per tau or per p, the sequential reference in every
panel) and writes ``table.md`` and ``report.json``.

Time axis. A real run's clock starts when the launcher starts, process start-up included; the
report puts time zero at the first training step (the first ``train_start`` event in
``metrics.jsonl``; in runs older than that event, the first join, step or exchange) and cuts
the curves at the run's training budget (``run.json``, written by ``easgd experiment``).
Simulated runs are on their virtual clock. The training loss is the workers' mini-batch loss,
averaged in time bins (all workers together); test loss and error are the center's.
"""

from __future__ import annotations

import io
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from easgd.algorithms import METHODS
from easgd.experiments import grid_edge, seed_medians, select_best
from easgd.runlog import (
    PROGRESS_EVENTS,
    SUMMARY_FILE,
    ReportPaths,
    RunPaths,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    iter_jsonl,
    steps_per_second,
    training_span,
)

__all__ = [
    "Line",
    "Report",
    "Run",
    "build_report",
    "detect_panel",
    "load_run",
    "load_runs",
    "write_report",
]

_COLORS = {
    "eamsgd": "#d62728", "easgd": "#1f77b4", "downpour": "#2ca02c", "adownpour": "#9467bd",
    "mvadownpour": "#8c564b", "mdownpour": "#17becf", "msgd": "#000000", "sgd": "#7f7f7f",
    "asgd": "#bcbd22", "mvasgd": "#e377c2", "allreduce": "#ff7f0e", "localsgd": "#aec7e8",
}  # fmt: skip
_PANEL_SYMBOL = {"tau": "τ", "workers": "p"}


@dataclass
class Run:
    """One run directory, on the report's clock (seconds from the start of training)."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    runtime: str
    horizon: float | None
    times: list[float]
    errors: list[float]
    test_losses: list[float]
    loss_times: list[float]
    losses: list[float]
    #: exchanges and bytes (both directions) up to the plotted time (the budget), summed over
    #: the workers' counters in ``metrics.jsonl``; None when the run logged none.
    plotted_traffic: tuple[int, float] | None = None

    method: str = field(init=False)
    tau: int = field(init=False)
    workers: int = field(init=False)
    lr: float = field(init=False)
    seed: int = field(init=False)

    def __post_init__(self) -> None:
        c = self.config
        self.method, self.tau, self.workers = str(c["method"]), int(c["tau"]), int(c["workers"])
        self.lr, self.seed = float(c["lr"]), int(c.get("seed") or 0)

    @property
    def sequential(self) -> bool:
        return METHODS[self.method].sequential

    @property
    def best_error(self) -> float:
        return min((e for e in self.errors if math.isfinite(e)), default=math.nan)

    @property
    def final_error(self) -> float:
        return self.errors[-1] if self.errors else math.nan

    @property
    def exchanges(self) -> int:
        return int(float(self.summary.get("exchanges") or 0))

    @property
    def megabytes(self) -> float:
        s = self.summary
        return (float(s.get("bytes_sent") or 0) + float(s.get("bytes_received") or 0)) / 1e6

    @property
    def plotted_exchanges(self) -> int:
        """Exchanges up to the plotted time (the whole run's when no budget cuts it)."""
        if self.horizon is None or self.plotted_traffic is None:
            return self.exchanges
        return self.plotted_traffic[0]

    @property
    def plotted_megabytes(self) -> float:
        """MB moved (both directions) up to the plotted time (the whole run's without a cut)."""
        if self.horizon is None or self.plotted_traffic is None:
            return self.megabytes
        return self.plotted_traffic[1] / 1e6

    def time_to(self, target: float) -> float | None:
        """Seconds until the first evaluation with center test error <= ``target``."""
        return next((t for t, e in zip(self.times, self.errors, strict=True) if e <= target), None)

    @property
    def steps_per_second(self) -> float | None:
        """Every worker's local steps per second of training (virtual seconds for a
        simulated run); None where the summary has no steps or no training time."""
        return steps_per_second(self.summary)


_FIX = "remove that run directory or rerun it"


def _bad(path: Path, problem: str) -> ValueError:
    """A damaged file of a run directory: which file, what is wrong, and the fix."""
    return ValueError(f"{path}: {problem}; {_FIX}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        where = f"{exc.msg.removesuffix(' at')} at line {exc.lineno} column {exc.colno}"
        raise _bad(path, f"not valid JSON ({where})") from None
    except UnicodeDecodeError:
        raise _bad(path, "not valid JSON (not UTF-8 text)") from None
    except OSError as exc:
        raise ValueError(
            f"{path}: cannot be read ({exc.strerror}); check its permissions, or {_FIX}"
        ) from None
    if not isinstance(data, dict):
        raise _bad(path, f"holds a JSON {type(data).__name__}, not an object")
    return data


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        return list(iter_jsonl(path))
    except ValueError as exc:  # it names the file and the line
        raise ValueError(f"{exc}; {_FIX}") from None


def _number(record: dict[str, Any], key: str, path: Path, *, optional: bool = False) -> float:
    """``record[key]`` as a float; None (a non-finite value in strict JSON) is NaN if optional."""
    value = record.get(key)
    if value is None and optional and key in record:
        return math.nan
    if value is None:
        raise _bad(path, f"a record has no {key!r} ({json.dumps(record)[:60]})")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _bad(path, f"{key}={value!r} is not a number") from None


def _check_config(config: dict[str, Any], path: Path) -> None:
    missing = [k for k in ("method", "tau", "workers", "lr") if config.get(k) is None]
    if missing:
        raise _bad(path, f"has no {', '.join(missing)}")
    if config["method"] not in METHODS:
        raise _bad(path, f"method {config['method']!r} is not one of {', '.join(METHODS)}")
    for key, kind in (("tau", int), ("workers", int), ("lr", float), ("seed", int)):
        value: Any = config.get(key)
        if value is None and key == "seed":
            continue
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or (kind is int and value != int(value)) or not math.isfinite(value):
            raise _bad(
                path, f"{key}={value!r} is not {'an integer' if kind is int else 'a number'}"
            )


def load_run(root: str | Path) -> Run:
    """One run directory as the report reads it: evaluations up to the training budget."""
    root = Path(root)
    paths = RunPaths(root)
    summary = _read_json(paths.summary)
    config_path = paths.config if paths.config.exists() else paths.summary
    config = _read_json(config_path) if config_path != paths.summary else summary
    _check_config(config, config_path)
    info = _read_json(paths.run_info) if paths.run_info.exists() else {}
    runtime = str(summary.get("runtime", info.get("runtime", "real")))
    events, evals = _read_jsonl(paths.metrics), _read_jsonl(paths.eval)
    for e in events:  # every event has a wall time (the schema's common field)
        _number(e, "wall", paths.metrics)
    start, last_end = training_span(events)
    t0 = 0.0 if runtime == "sim" or start is None else start
    budget = info.get("train_budget") if runtime == "real" else None
    horizon = None if budget is None else _number(info, "train_budget", paths.run_info)
    wall = summary.get("wall_seconds")
    end = (
        last_end
        if last_end is not None
        else (0.0 if wall is None else _number(summary, "wall_seconds", paths.summary))
    ) - t0

    def keep(t: float) -> bool:
        return horizon is None or t <= horizon + 1e-9

    times: list[float] = []
    errors: list[float] = []
    test_losses: list[float] = []
    walls = [_number(e, "wall", paths.eval) for e in evals]
    for w, e in sorted(zip(walls, evals, strict=True), key=lambda we: we[0]):
        t = max(0.0, w - t0)  # evaluations before training: the initial center
        if not keep(t):
            break
        if times and times[-1] == t:
            times.pop(), errors.pop(), test_losses.pop()
        times.append(t)
        errors.append(_number(e, "test_error", paths.eval, optional=True))
        test_losses.append(_number(e, "test_loss", paths.eval, optional=True))
    if (
        summary.get("center_test_error") is not None
        and keep(end)
        and (not times or end >= times[-1])
    ):
        # The final center, evaluated when training stopped.
        times.append(max(end, times[-1] if times else 0.0))
        errors.append(_number(summary, "center_test_error", paths.summary))
        test_losses.append(_number(summary, "center_test_loss", paths.summary, optional=True)
                           if "center_test_loss" in summary else math.nan)  # fmt: skip
    for key in ("exchanges", "bytes_sent", "bytes_received"):
        if summary.get(key) is not None:
            _number(summary, key, paths.summary)
    loss_times: list[float] = []
    losses: list[float] = []
    for e in events:
        if e.get("event") in PROGRESS_EVENTS and "loss" in e:
            t = _number(e, "wall", paths.metrics) - t0
            if t >= 0 and keep(t):
                loss_times.append(t)
                losses.append(_number(e, "loss", paths.metrics, optional=True))
    return Run(root, config, summary, runtime, horizon, times, errors, test_losses,
               loss_times, losses, _traffic(events, t0, keep, paths.metrics))  # fmt: skip


def _traffic(
    events: Sequence[dict[str, Any]], t0: float, keep: Any, path: Path
) -> tuple[int, float] | None:
    """``(exchanges, bytes)`` up to the plotted time: each worker process's last counters
    (they count from its start, so a restarted worker's two processes add up)."""
    last: dict[tuple[Any, Any], tuple[int, float]] = {}
    for e in events:
        if "worker" not in e or "bytes_sent" not in e or not keep(_number(e, "wall", path) - t0):
            continue
        moved = _number(e, "bytes_sent", path) + float(e.get("bytes_received") or 0)
        last[(e["worker"], e.get("pid"))] = (int(e.get("exchanges") or 0), moved)
    if not last:
        return None
    return sum(x for x, _ in last.values()), sum(b for _, b in last.values())


def load_runs(dirs: Iterable[str | Path]) -> list[Run]:
    """Every run directory (a folder with ``summary.json``) under ``dirs``, recursively."""
    roots = [Path(d) for d in dirs]
    for d in roots:
        if d.is_dir():
            continue
        if not d.exists():
            raise FileNotFoundError(
                f"{d}: no such folder; give the folder holding the run directories "
                "(the --out of easgd experiment or easgd train)"
            )
        hint = f" (here {d.parent})" if d.name == SUMMARY_FILE else ""
        raise ValueError(
            f"{d} is a file, not a folder; give the folder holding the run directories{hint}"
        )
    found = sorted({p.parent for d in roots for p in d.rglob(SUMMARY_FILE)})
    if not found:
        where = ", ".join(str(d) for d in roots)
        raise ValueError(
            f"no run directories (summary.json) under {where}; run `easgd experiment NAME "
            f"--out {roots[0]}` or `easgd train --out {roots[0]}/run1` first"
        )
    return [load_run(p) for p in found]


def detect_panel(runs: Sequence[Run]) -> str | None:
    """The field that varies within a method besides lr: ``"tau"``, ``"workers"`` or None."""
    varies = {}
    for name in ("tau", "workers"):
        values: dict[str, set[int]] = {}
        for r in runs:
            if not r.sequential:
                values.setdefault(r.method, set()).add(getattr(r, name))
        varies[name] = any(len(v) > 1 for v in values.values())
    if varies["tau"] and varies["workers"]:
        raise ValueError(
            "both tau and p vary within a method; choose the panels with --panel tau or "
            "--panel workers"
        )
    return "workers" if varies["workers"] else "tau" if varies["tau"] else None


Stat = tuple[float, float, float]  # (median, min, max) over the seeds


def _stat(values: Sequence[float]) -> Stat:
    """``(median, min, max)`` of ``values``; NaN (a diverged run) ranks above every number."""
    ranked = sorted(v if math.isfinite(v) else math.inf for v in values)
    if not ranked:
        return (math.nan, math.nan, math.nan)
    med = statistics.median(ranked)
    return tuple(v if math.isfinite(v) else math.nan for v in (med, ranked[0], ranked[-1]))  # type: ignore[return-value]


@dataclass
class Line:
    """One method in one panel: the seeds of its best learning rate, with their numbers.

    ``run`` is the median seed (by best error), ``runs`` every seed of that rate. Times to the
    target are medians over the seeds (a seed that never reaches it counts as infinitely
    slow: the median is None when half of them do not), and so is the speedup's.
    """

    panel: int | None
    label: str
    run: Run
    tried: int
    time_to_target: float | None = None
    speedup: float | None = None
    #: ``"top"``/``"bottom"``: the best learning rate is the largest/smallest tried for this
    #: setting (the optimum may lie past the grid); ``"only"``: one rate tried; None: inside.
    edge: str | None = None
    runs: list[Run] = field(default_factory=list)
    #: The fastest and the slowest seed's time to the target (None: not reached).
    time_spread: tuple[float | None, float | None] = (None, None)
    #: How many seeds reached the target.
    reached: int = 0

    def __post_init__(self) -> None:
        if not self.runs:
            self.runs = [self.run]

    @property
    def seeds(self) -> int:
        return len(self.runs)

    @property
    def best_error(self) -> Stat:
        return _stat([r.best_error for r in self.runs])

    @property
    def final_error(self) -> Stat:
        return _stat([r.final_error for r in self.runs])

    def traffic(self, plotted: bool) -> tuple[float, float]:
        """Median exchanges and MB over the seeds, up to the plotted time or whole runs."""
        if plotted:
            pairs = [(r.plotted_exchanges, r.plotted_megabytes) for r in self.runs]
        else:
            pairs = [(r.exchanges, r.megabytes) for r in self.runs]
        return statistics.median(x for x, _ in pairs), statistics.median(m for _, m in pairs)

    @property
    def steps_per_second(self) -> float | None:
        """The median over the seeds that know it of :attr:`Run.steps_per_second`."""
        known = [v for v in (r.steps_per_second for r in self.runs) if v is not None]
        return statistics.median(known) if known else None

    def time_to(self, target: float) -> None:
        """Set the median, spread and count of the seeds' times to ``target``."""
        times = [r.time_to(target) for r in self.runs]
        reached = sorted(t for t in times if t is not None)
        self.reached = len(reached)
        med = statistics.median([math.inf if t is None else t for t in times])
        self.time_to_target = med if math.isfinite(med) else None
        slowest = reached[-1] if len(reached) == len(times) else None
        self.time_spread = (reached[0] if reached else None, slowest)


@dataclass
class Report:
    panel: str | None
    panels: list[int | None]
    lines: list[Line]
    reference: str | None
    target: float
    target_rule: str
    time_label: str


def _label(run: Run, panel: str | None, other_varies: bool) -> str:
    name = run.method.upper()
    if run.sequential:
        return name
    other = "workers" if panel == "tau" else "tau"
    if panel is None or other_varies:
        return f"{name} τ={run.tau} p={run.workers}" if panel is None else (
            f"{name} {_PANEL_SYMBOL[other]}={getattr(run, other)}"
        )  # fmt: skip
    return name


def build_report(
    runs: Sequence[Run],
    *,
    panel: str | None = None,
    target: float | None = None,
    reference: str | None = None,
) -> Report:
    """Pick the best run per (method, tau, p), place it in panels, and time it to a target."""
    if panel is None:
        panel = detect_panel(runs)
    elif panel not in _PANEL_SYMBOL:
        raise ValueError(f"panel={panel!r}; choose tau or workers")
    records = seed_medians(
        runs, setting=lambda r: (r.method, r.tau, r.workers, r.lr),
        best=lambda r: r.best_error, final=lambda r: r.final_error, seed=lambda r: r.seed,
    )  # fmt: skip
    best = select_best(records)
    tried: dict[tuple[str, int, int], int] = {}
    rates: dict[tuple[str, int, int], set[float]] = {}
    for r in runs:
        key = (r.method, r.tau, r.workers)
        tried[key] = tried.get(key, 0) + 1
        rates.setdefault(key, set()).add(r.lr)
    dist = [r for r in runs if not r.sequential]
    panels: list[int | None] = sorted({getattr(r, panel) for r in dist}) if panel else [None]
    if not panels:
        panels = [None]
    sequential = sorted({r.method for r in runs if r.sequential})
    if reference is None:
        reference = "msgd" if "msgd" in sequential else (sequential[0] if sequential else None)
    elif reference not in {r.method for r in runs}:
        found = ", ".join(sorted({r.method for r in runs}))
        raise ValueError(
            f"--reference {reference}: no run of that method was found; the runs are of {found}"
        )
    lines: list[Line] = []
    for pv in panels:
        chosen = [
            s
            for s in best.values()
            if s["run"].sequential or panel is None or getattr(s["run"], panel) == pv
        ]
        chosen.sort(key=lambda s: (s["run"].sequential, list(METHODS).index(s["run"].method),
                                   s["run"].tau, s["run"].workers))  # fmt: skip
        for s in chosen:
            r = s["run"]
            other_varies = sum(1 for c in chosen if c["run"].method == r.method) > 1
            key = (r.method, r.tau, r.workers)
            edge = grid_edge(r.lr, rates[key])
            label = _label(r, panel, other_varies)
            lines.append(Line(pv, label, r, tried[key], edge=edge, runs=list(s["runs"])))
    target, rule = _target(lines, target)
    for line in lines:
        line.time_to(target)
    for pv in panels:
        ref = next((ln for ln in lines if ln.panel == pv and ln.run.method == reference), None)
        for line in (ln for ln in lines if ln.panel == pv):
            t, t_ref = line.time_to_target, ref.time_to_target if ref else None
            if t is not None and t_ref is not None and t > 0:
                line.speedup = t_ref / t
    virtual = all(r.runtime == "sim" for r in runs)
    label = "virtual time (s)" if virtual else "wall-clock time since training start (s)"
    return Report(panel, panels, lines, reference, target, rule, label)


def _target(lines: Sequence[Line], target: float | None) -> tuple[float, str]:
    if target is not None:
        if not 0 < target <= 1:
            raise ValueError(f"--target {target!r} must be a test error in (0, 1], e.g. 0.05")
        return target, "given with --target"
    errors = sorted({id(ln.run): ln.best_error[0] for ln in lines}.values())
    errors = [e for e in errors if math.isfinite(e)]
    if not errors:
        return 1.0, "no finite test error: target 1"
    lowest, median = errors[0], statistics.median(errors)
    value = max(1.5 * lowest, median)
    rule = (
        f"max(1.5 × the lowest best error {lowest:.4f}, the median best error {median:.4f}) "
        "over the lines shown, so that at least half of them reach it"
    )
    return value, rule


# ------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str, missing: str = "—") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def _panel_name(report: Report, pv: int | None) -> str:
    return "all" if report.panel is None else f"{_PANEL_SYMBOL[report.panel]}={pv}"


def _fmt_stat(stat: Stat, spec: str) -> str:
    med, lo, hi = stat
    if lo == hi:  # one seed, or seeds that agree
        return _fmt(med, spec)
    return f"{_fmt(med, spec)} [{_fmt(lo, spec)}–{_fmt(hi, spec)}]"


def _fmt_time(ln: Line) -> str:
    med = _fmt(ln.time_to_target, ".2f", "not reached")
    if ln.seeds == 1:
        return med
    lo, hi = ln.time_spread
    return f"{med} [{_fmt(lo, '.2f', 'none')}–{_fmt(hi, '.2f', 'not reached')}]"


def table_markdown(report: Report, title: str | None = None) -> str:
    """The Markdown table: one row per method and panel, medians over seeds with their
    spread (min–max)."""
    ref = (report.reference or "none").upper()
    out = [f"# {title}", ""] if title else []
    out += [
        f"Target center test error: **{report.target:.4f}** ({report.target_rule}). "
        "Every number is the median over the seeds of the best learning rate, with the "
        "spread [min–max] over those seeds; two lines differ by more than the spread when "
        "their [min–max] do not overlap. Best lr: the rate whose median seed has the lowest "
        "best center test error. Time to target: from each run's first training step; a seed "
        "that never reaches the target counts as slowest ('not reached' as the median: half "
        f"of them or more did not). Speedup = median time of {ref} to the target / median "
        "time of the method, same panel. Exchanges and MB moved (both directions): up to the "
        "plotted time (the training budget) and over the whole run, which may go on past it. "
        f"Time: {report.time_label}. A best lr marked (top edge) or (bottom edge) is the "
        "largest or smallest rate tried for that setting, (one rate) the only one: the best "
        "rate may lie outside the grid. Local steps/s: every worker's local steps per second "
        "of training, summed over the workers (median over the seeds).",
        "",
        "| panel | method | best lr | seeds | runs | best error | final error "
        "| time to target (s) | reached | speedup | local steps/s | exchanges (plotted) "
        "| MB (plotted) | exchanges (whole run) | MB (whole run) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ln in report.lines:
        r = ln.run
        (px, pmb), (wx, wmb) = ln.traffic(True), ln.traffic(False)
        out.append(
            f"| {_panel_name(report, ln.panel)} | {ln.label} | {r.lr:g}{_edge_mark(ln.edge)} "
            f"| {ln.seeds} | {ln.tried} "
            f"| {_fmt_stat(ln.best_error, '.4f')} | {_fmt_stat(ln.final_error, '.4f')} "
            f"| {_fmt_time(ln)} | {ln.reached}/{ln.seeds} | {_fmt(ln.speedup, '.2f')} "
            f"| {_fmt(ln.steps_per_second, '.1f')} | {px:.0f} | {pmb:.1f} | {wx:.0f} | {wmb:.1f} |"
        )
    return "\n".join(out) + "\n"


def _binned(times: Sequence[float], values: Sequence[float], bins: int) -> tuple[list, list]:
    pairs = [(t, v) for t, v in zip(times, values, strict=True) if math.isfinite(v)]
    if not pairs:
        return [], []
    end = max(t for t, _ in pairs) or 1.0
    width = end / bins
    sums: dict[int, list[float]] = {}
    for t, v in pairs:
        sums.setdefault(min(int(t / width), bins - 1), []).append(v)
    keys = sorted(sums)
    return [(k + 0.5) * width for k in keys], [sum(sums[k]) / len(sums[k]) for k in keys]


def _step_values(times: Sequence[float], values: Sequence[float], grid: Sequence[float]) -> list:
    """The value of the last evaluation at or before each grid time (NaN before the first)."""
    out, k = [], -1
    for g in grid:
        while k + 1 < len(times) and times[k + 1] <= g:
            k += 1
        out.append(values[k] if k >= 0 else math.nan)
    return out


def _band(columns: Sequence[Sequence[float]]) -> tuple[list, list, list]:
    """Median, min and max across seeds at each point (NaN where a seed has no value)."""
    meds, los, his = [], [], []
    for col in zip(*columns, strict=True):
        finite = [v for v in col if math.isfinite(v)]
        full = len(finite) == len(col)
        meds.append(statistics.median(finite) if full else math.nan)
        los.append(min(finite) if full else math.nan)
        his.append(max(finite) if full else math.nan)
    return meds, los, his


def seed_curves(line: Line) -> dict[str, Any]:
    """The line's curves over its seeds: median, min and max on common time points.

    Test loss and error: at the union of the seeds' evaluation times, each seed holding its
    last evaluation, up to the earliest last evaluation of a seed (so every seed is in every
    point). Training loss: 60 time bins up to the earliest last step of a seed.
    """
    runs = line.runs
    ends = [r.times[-1] for r in runs if r.times]
    out: dict[str, Any] = {}
    if len(ends) == len(runs):
        grid = sorted({t for r in runs for t in r.times if t <= min(ends)})
        err = _band([_step_values(r.times, r.errors, grid) for r in runs])
        loss = _band([_step_values(r.times, r.test_losses, grid) for r in runs])
        out["time"], out["test_error"], out["test_loss"] = grid, err, loss
    else:
        out["time"], out["test_error"], out["test_loss"] = [], ([], [], []), ([], [], [])
    loss_ends = [max(r.loss_times) for r in runs if r.loss_times]
    if len(loss_ends) == len(runs):
        end, bins = min(loss_ends), 60
        width = (end or 1.0) / bins
        columns = []
        for r in runs:
            sums: dict[int, list[float]] = {}
            for t, v in zip(r.loss_times, r.losses, strict=True):
                if t <= end and math.isfinite(v):
                    sums.setdefault(min(int(t / width), bins - 1), []).append(v)
            columns.append([sum(sums[k]) / len(sums[k]) if k in sums else math.nan
                            for k in range(bins)])  # fmt: skip
        med, lo, hi = _band(columns)
        keep = [k for k in range(bins) if math.isfinite(med[k])]
        out["loss_time"] = [(k + 0.5) * width for k in keep]
        out["training_loss"] = tuple([v[k] for k in keep] for v in (med, lo, hi))
    else:
        out["loss_time"], out["training_loss"] = [], ([], [], [])
    return out


def draw_figure(report: Report, title: str | None = None) -> Any:
    """A matplotlib Figure (Agg, no pyplot): rows training loss, test loss, test error."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    n = len(report.panels)
    fig = Figure(figsize=(3.4 * n + 0.6, 8.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, n, sharex="col", sharey="row", squeeze=False)
    handles: dict[str, tuple[tuple[bool, int, str], Any]] = {}
    positive = [False, False]  # whether the loss rows have anything to put on a log scale
    for col, pv in enumerate(report.panels):
        for ln in (ln for ln in report.lines if ln.panel == pv):
            r = ln.run
            style = {"color": _COLORS.get(r.method), "linewidth": 1.6,
                     "linestyle": "--" if r.sequential else "-"}  # fmt: skip
            c = seed_curves(ln)
            (lv, llo, lhi), (tl, tlo, thi) = c["training_loss"], c["test_loss"]
            err = [[100 * e for e in v] for v in c["test_error"]]
            for row, values in enumerate((lv, tl)):
                positive[row] = positive[row] or any(v > 0 for v in values if math.isfinite(v))
            h = None
            for ax, x, (med, lo, hi) in (
                (axes[0][col], c["loss_time"], (lv, llo, lhi)),
                (axes[1][col], c["time"], (tl, tlo, thi)),
                (axes[2][col], c["time"], err),
            ):
                (h,) = ax.plot(x, med, **style)
                if ln.seeds > 1:  # the band: min to max over the seeds
                    ax.fill_between(x, lo, hi, color=style["color"], alpha=0.18, linewidth=0)
            order = (r.sequential, list(METHODS).index(r.method), ln.label)
            handles.setdefault(ln.label, (order, h))
        axes[0][col].set_title(_panel_name(report, pv), fontsize=11)
        target = axes[2][col].axhline(
            100 * report.target, color="0.5", linewidth=0.9, linestyle=":"
        )
        axes[2][col].set_xlabel(report.time_label, fontsize=9)
        for row in axes:
            row[col].grid(True, alpha=0.3)
            row[col].set_xlim(left=0)
    axes[0][0].set_ylabel("training loss\n(workers' mini-batches)")
    axes[1][0].set_ylabel("center test loss")
    axes[2][0].set_ylabel("center test error (%)")
    for row in (0, 1):
        ax = axes[row][0]
        if not positive[row]:
            continue  # nothing positive to draw (no losses logged): a log axis cannot be
        ax.set_yscale("log")
        lo, hi = ax.get_ylim()
        # Label 1-2-5 steps over a narrow range, decades over a wide one.
        subs = (1.0, 2.0, 5.0) if hi / max(lo, 1e-300) < 300 else (1.0,)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    # Test error: linear, up to 4x the target (a run stuck above it shows in the loss rows).
    axes[2][0].set_ylim(0, 100 * min(1.0, max(4 * report.target, 0.1)))
    ordered = sorted(handles.items(), key=lambda kv: kv[1][0])
    labels = [k for k, _ in ordered] + [f"target {100 * report.target:.3g}%"]
    lines = [v[1] for _, v in ordered] + [target]
    fig.legend(lines, labels, loc="outside lower center", ncol=min(len(labels), 8),
               fontsize=9, frameon=False)  # fmt: skip
    seeds = max((ln.seeds for ln in report.lines), default=1)
    if seeds > 1:
        note = f"lines: median over {seeds} seeds; bands: min to max over the seeds"
        title = f"{title}\n{note}" if title else note
    if title:
        fig.suptitle(title, fontsize=12)
    return fig


def _edge_mark(edge: str | None) -> str:
    return {"top": " (top edge)", "bottom": " (bottom edge)", "only": " (one rate)"}.get(
        edge or "", ""
    )


_KEYS = ("median", "min", "max")


def report_json(report: Report) -> dict[str, Any]:
    def r3(values: Sequence[float]) -> list[float | None]:
        return [round(v, 5) if math.isfinite(v) else None for v in values]

    def band(name: str, values: Sequence[Sequence[float]]) -> dict[str, list[float | None]]:
        return {f"{name}_{k}": r3(v) for k, v in zip(_KEYS, values, strict=True)}

    def stat(value: Stat) -> dict[str, float | None]:
        return dict(zip(("median", "min", "max"), r3(value), strict=True))

    lines = []
    for ln in report.lines:
        r = ln.run
        c = seed_curves(ln)
        (px, pmb), (wx, wmb) = ln.traffic(True), ln.traffic(False)
        lines.append({
            "panel": ln.panel, "label": ln.label, "method": r.method, "tau": r.tau,
            "workers": r.workers, "lr": r.lr, "seed": r.seed, "runtime": r.runtime,
            "run": r.path.name, "runs_tried": ln.tried, "grid_edge": ln.edge,
            "seeds": ln.seeds, "best_error": ln.best_error[0], "final_error": ln.final_error[0],
            "best_error_spread": stat(ln.best_error), "final_error_spread": stat(ln.final_error),
            "time_to_target": ln.time_to_target,
            "time_to_target_spread": {"min": ln.time_spread[0], "max": ln.time_spread[1]},
            "seeds_reaching_target": ln.reached, "speedup": ln.speedup,
            "exchanges": wx, "megabytes": wmb,
            "plotted_exchanges": px, "plotted_megabytes": pmb,
            "local_steps": r.summary.get("local_steps"),
            "local_steps_per_second": ln.steps_per_second,
            "per_seed": [
                {"seed": s.seed, "run": s.path.name, "best_error": s.best_error,
                 "final_error": s.final_error, "time_to_target": s.time_to(report.target),
                 "exchanges": s.exchanges, "megabytes": s.megabytes,
                 "plotted_exchanges": s.plotted_exchanges,
                 "plotted_megabytes": s.plotted_megabytes,
                 "local_steps_per_second": s.steps_per_second}
                for s in sorted(ln.runs, key=lambda run: run.seed)
            ],
            "curve": {"time": r3(c["time"]), **band("test_error", c["test_error"]),
                      **band("test_loss", c["test_loss"])},
            "training_loss": {"time": r3(c["loss_time"]),
                              **band("loss", c["training_loss"])},
        })  # fmt: skip
    return {"panel": report.panel, "panels": report.panels, "reference": report.reference,
            "target": report.target, "target_rule": report.target_rule,
            "time_axis": report.time_label, "lines": lines}  # fmt: skip


def write_report(report: Report, out: str | Path, title: str | None = None) -> list[Path]:
    """Write figure.png, figure.svg, table.md and report.json into ``out`` (atomically)."""
    paths = ReportPaths(out)
    fig = draw_figure(report, title)
    written = []
    for fmt in ReportPaths.FIGURE_FORMATS:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=110, metadata={"Date": None} if fmt == "svg" else None)
        atomic_write_bytes(paths.figure(fmt), buf.getvalue(), mode=0o644)
        written.append(paths.figure(fmt))
    atomic_write_text(paths.table, table_markdown(report, title), mode=0o644)
    atomic_write_json(paths.report, report_json(report), mode=0o644)
    written += [paths.table, paths.report]
    return written
