"""The end of a run: the final center, the snapshots still to evaluate, and the summary.

:func:`finalize` evaluates every snapshot the evaluator role did not (all of them with
``eval_deferred``), evaluates the final center (from the server checkpoints or worker 0's
checkpoint) and writes ``summary.json`` through :func:`easgd.runlog.write_summary`.
:class:`CenterEvaluation` is the evaluation both this and the evaluator role use.

Every file is read through :func:`easgd.runlog.load_checkpoint`, verified. A damaged file
never stops the summary: a snapshot that does not verify is skipped, a checkpoint that does
not verify is replaced by its previous one when that one verifies, and the summary's
``skipped_files`` says which file was skipped and why. When no final center can be read at
all, the summary is still written, with null center fields, and :func:`finalize` raises
:class:`NoFinalCenterError` so that the caller exits non-zero.

A center that verifies but holds NaN (a diverged run) is the run's true result: it is
evaluated as it is, not replaced by an older checkpoint, and the summary's ``status`` says
``diverged``. A final center equal to the initial one (no exchange ever reached it, e.g.
``--steps`` below ``--tau``) is recorded as ``center_moved: false``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import torch

from easgd.config import TrainConfig
from easgd.runlog import (
    CheckpointError,
    CheckpointKind,
    Event,
    JsonlWriter,
    RunPaths,
    eval_line,
    iter_jsonl,
    load_checkpoint,
    previous_checkpoint,
    snapshot_wall,
    training_span,
    write_summary,
)

__all__ = [
    "CenterEvaluation",
    "FinalCenter",
    "NoFinalCenterError",
    "final_center",
    "finalize",
    "read_final_center",
]

log = logging.getLogger(__name__)

#: A summary's ``skipped_files`` entry: ``{"file": path in the run directory, "reason": ...}``.
Skipped = dict[str, str]


class NoFinalCenterError(CheckpointError):
    """No final center could be read; ``summary`` is the summary written (center fields null)."""

    def __init__(self, path: str | os.PathLike[str], problem: str, summary: dict[str, Any]):
        advice = (
            "summary.json was written with null center fields; its skipped_files says which "
            "files were refused and why"
        )
        super().__init__(path, problem, advice)
        self.summary = summary


@dataclasses.dataclass(frozen=True)
class FinalCenter:
    """The final center (None when none could be read) and the files skipped to get it."""

    center: torch.Tensor | None
    skipped: list[Skipped]


class CenterEvaluation:
    """Evaluates centers: the model, data and flat views, built once per process."""

    def __init__(self, cfg: TrainConfig) -> None:
        from easgd.flat import parameters_to_flat_views
        from easgd.roles.context import resolve_device
        from easgd.task import task_from_config

        self.task = task_from_config(cfg)
        self.device = resolve_device(cfg.eval_device, 0)
        self.model = self.task.build().to(self.device)
        self.flat = parameters_to_flat_views(self.model)
        #: The run's initial center (every worker starts from it: the same seed), on the CPU.
        self.initial = self.flat.params.detach().cpu().clone()

    def __call__(self, center: torch.Tensor) -> dict[str, float]:
        from easgd.evaluation import evaluate_center

        return evaluate_center(self.model, self.flat, center, self.task.test, self.task.train[0],
                               transform=self.task.transform)  # fmt: skip


def read_final_center(
    cfg: TrainConfig, paths: RunPaths, *, numel: int | None = None
) -> FinalCenter:
    """The center at the end of the run, from the verified checkpoints the run left.

    ``numel``: the model's size (each server shard must then be the one it needs). A file
    that does not verify falls back to its previous checkpoint; what was skipped, and why,
    is in :attr:`FinalCenter.skipped`. Never raises for a damaged or missing file.
    """
    if not cfg.servers_used:
        try:
            ckpt = load_checkpoint(
                paths.sync_checkpoint, CheckpointKind.CENTER, method=cfg.method, numel=numel,
                allow_nonfinite=True,
            )  # fmt: skip
        except CheckpointError as exc:
            return FinalCenter(None, [_refused(paths, exc)])
        return FinalCenter(
            ckpt.center, [_fell_back(paths, e, ckpt.path, ckpt.t) for e in ckpt.refused]
        )
    from easgd.comm.ps import read_checkpoint
    from easgd.comm.wire import shard_ranges

    ranges = shard_ranges(numel, cfg.servers) if numel is not None else [None] * cfg.servers
    skipped: list[Skipped] = []
    shards: list[dict[str, Any]] = []
    for shard, where in enumerate(ranges):
        try:
            state = read_checkpoint(
                paths.server_checkpoint(shard), method=cfg.method,
                offset=None if where is None else where[0],
                numel=None if where is None else where[1] - where[0], allow_nonfinite=True,
            )  # fmt: skip
        except CheckpointError as exc:
            skipped.append(_refused(paths, exc))
            continue
        skipped += [_fell_back(paths, e, state["file"], state["t"]) for e in state["refused"]]
        shards.append(state)
    if len(shards) < cfg.servers:
        return FinalCenter(None, skipped)
    shards.sort(key=lambda s: int(s["offset"]))
    end = 0
    for state in shards:  # without numel: the shards must still tile [0, n)
        if int(state["offset"]) != end:
            reason = f"starts at offset {state['offset']}, but the shards before it end at {end}"
            return FinalCenter(None, [*skipped, _entry(paths, state["file"], reason)])
        end += int(state["numel"])
    return FinalCenter(torch.cat([s["evaluation"] for s in shards]), skipped)


def final_center(cfg: TrainConfig, paths: RunPaths, *, numel: int | None = None) -> torch.Tensor:
    """The center at the end of the run; raises :class:`easgd.runlog.CheckpointError` if none.

    See :func:`read_final_center` (previous checkpoints are used, with a warning).
    """
    final = read_final_center(cfg, paths, numel=numel)
    if final.center is None:
        reasons = "; ".join(f"{s['file']}: {s['reason']}" for s in final.skipped)
        raise CheckpointError(paths.checkpoints, f"no final center can be read ({reasons})",
                              "the run left no checkpoint that verifies")  # fmt: skip
    return final.center


def finalize(
    cfg: TrainConfig, paths: RunPaths, wall_seconds: float, **extra: Any
) -> dict[str, Any]:
    """Evaluate the final center, add up the traffic, and write ``summary.json``.

    Snapshots the evaluator did not evaluate (all of them with ``eval_deferred``; in a
    synchronous run, those written after its last look) are evaluated here first and added
    to ``eval.jsonl`` in the order of their wall times. ``extra``: optional summary fields
    (:data:`easgd.runlog.SUMMARY_FIELDS`), e.g. the launcher's ``restarts``. The summary's
    ``skipped_files`` lists every file refused, and why.

    Raises :class:`NoFinalCenterError` (its ``summary`` is the summary written, with null
    center fields) when no final center could be read: the run must not exit 0.
    """
    evaluate = CenterEvaluation(cfg)
    skipped = _evaluate_remaining_snapshots(cfg, paths, evaluate)
    final = read_final_center(cfg, paths, numel=evaluate.flat.numel)
    skipped += final.skipped
    # An interrupted or diverged run may end before its first checkpoint: not news.
    level = logging.INFO if extra.get("status") in ("interrupted", "diverged") else logging.WARNING
    for entry in skipped:
        log.log(level, "skipped %s: %s", entry["file"], entry["reason"])
    result = None if final.center is None else evaluate(final.center)
    if final.center is not None:
        extra.setdefault("center_moved", not torch.equal(final.center, evaluate.initial))
        if not bool(torch.isfinite(final.center).all()) and extra.get("status") in (
            None,
            "completed",
            "workers_lost",
        ):
            extra["status"] = "diverged"
    events = list(iter_jsonl(paths.metrics))
    # A worker's events carry its running totals; a restarted worker (new pid) starts again.
    totals: dict[tuple[int, int], dict[str, Any]] = {}
    steps: dict[tuple[int, int], int] = {}
    resumed: dict[tuple[int, int], int] = {}  # a resumed process counts from its saved step
    for event in events:
        kind = event.get("event")
        if kind in (Event.EXCHANGE, Event.STEP, Event.WORKER_DONE, Event.TRAIN_START):
            key = (int(event["worker"]), int(event.get("pid", 0)))
            if kind == Event.TRAIN_START:
                resumed[key] = int(event.get("resumed_step") or 0)
                continue
            steps[key] = max(steps.get(key, 0), int(event["step"]))
            if kind != Event.WORKER_DONE or "exchanges" in event:  # its end: every exchange
                totals[key] = event
    workers = [e for e in totals.values() if "exchanges" in e]
    local_steps = sum(max(0, n - resumed.get(key, 0)) for key, n in steps.items())
    start, train_seconds = _training_time(events)
    if result is not None and not any(True for _ in iter_jsonl(paths.eval)):
        # A run too short for the evaluator's first look: its curve is the final center,
        # at the end of training, rather than no point at all.
        end = max((float(e["wall"]) for e in events if e.get("event") == Event.WORKER_DONE),
                  default=wall_seconds)  # fmt: skip
        with JsonlWriter(paths.eval) as out:
            out.write(eval_line(end, result))
    summary = write_summary(
        paths, cfg, runtime="real", center=result,
        curve=[math.nan if e["test_error"] is None else float(e["test_error"])
               for e in iter_jsonl(paths.eval)],
        wall_seconds=wall_seconds, startup_seconds=start, train_seconds=train_seconds,
        exchanges=sum(int(e["exchanges"]) for e in workers),
        bytes_sent=sum(int(e["bytes_sent"]) for e in workers),
        bytes_received=sum(int(e["bytes_received"]) for e in workers),
        local_steps=local_steps, skipped_files=skipped, **extra,
    )  # fmt: skip
    if result is not None:
        return summary
    raise NoFinalCenterError(paths.checkpoints, "no final center can be read", summary)


def _evaluate_remaining_snapshots(
    cfg: TrainConfig, paths: RunPaths, evaluate: CenterEvaluation
) -> list[Skipped]:
    """Evaluate the snapshots not in eval.jsonl yet; returns those that do not verify."""
    done = {e.get("snapshot") for e in iter_jsonl(paths.eval)}
    todo = [p for p in paths.snapshot_files() if p.name not in done]
    skipped: list[Skipped] = []
    if not todo:
        return skipped
    with JsonlWriter(paths.eval) as out:
        for path in todo:
            try:
                snapshot = load_checkpoint(
                    path, CheckpointKind.SNAPSHOT, method=cfg.method,
                    numel=evaluate.flat.numel, allow_nonfinite=True, fallback=False,
                )  # fmt: skip
            except CheckpointError as exc:  # e.g. cut short by a crash: skip it, say so
                skipped.append(_entry(paths, path, f"{exc.problem}; not evaluated"))
                continue
            out.write(eval_line(snapshot_wall(path), evaluate(snapshot.center), path))
    return skipped


def _entry(paths: RunPaths, path: str | os.PathLike[str], reason: str) -> Skipped:
    """A ``skipped_files`` entry; ``file`` relative to the run directory."""
    try:
        name = os.path.relpath(path, paths.root)
    except ValueError:  # another drive (Windows)
        name = str(path)
    return {"file": name, "reason": reason}


def _refused(paths: RunPaths, exc: CheckpointError) -> Skipped:
    """The entry of a checkpoint that could not be used at all (nor its previous one)."""
    if not exc.path.exists() and not previous_checkpoint(exc.path).exists():
        return _entry(paths, exc.path, "missing: the run ended before its first checkpoint")
    return _entry(paths, exc.path, f"{exc.problem}; {exc.advice}")


def _fell_back(paths: RunPaths, exc: CheckpointError, used: os.PathLike[str], t: int) -> Skipped:
    """The entry of a checkpoint replaced by its previous one."""
    used_name = _entry(paths, used, "")["file"]
    return _entry(paths, exc.path, f"{exc.problem}; used the previous checkpoint {used_name} "
                  f"(t={t}) instead")  # fmt: skip


def _training_time(events: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """The first part's start-up, and the training seconds of every part added up.

    A resumed run (``run_resume``) or a restarted synchronous group (``group_restart``) is
    several parts on one clock: the time between them trained nothing.
    """
    parts: list[list[dict[str, Any]]] = [[]]
    for event in events:
        if event.get("event") in (Event.RUN_RESUME, Event.GROUP_RESTART):
            parts.append([])
        parts[-1].append(event)
    spans = [training_span(part) for part in parts]
    seconds = [end - start for start, end in spans if start is not None and end is not None]
    first = next((start for start, _ in spans if start is not None), None)
    return first, (sum(seconds) if seconds else None)
