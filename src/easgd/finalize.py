"""The end of a run: the final center, the snapshots still to evaluate, and the summary.

:func:`finalize` evaluates every snapshot the evaluator role did not (all of them with
``eval_deferred``), evaluates the final center (from the server checkpoints or worker 0's
checkpoint) and writes ``summary.json`` through :func:`easgd.runlog.write_summary`.
:class:`CenterEvaluation` is the evaluation both this and the evaluator role use.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from easgd.config import TrainConfig
from easgd.runlog import (
    Event,
    JsonlWriter,
    RunPaths,
    eval_line,
    iter_jsonl,
    snapshot_wall,
    training_span,
    write_summary,
)

__all__ = ["CenterEvaluation", "final_center", "finalize"]

log = logging.getLogger(__name__)


class CenterEvaluation:
    """Evaluates centers: the model, data and flat views, built once per process."""

    def __init__(self, cfg: TrainConfig) -> None:
        from easgd.flat import parameters_to_flat_views
        from easgd.task import build_task

        self.task = build_task(cfg.dataset, cfg.model, seed=cfg.seed, data_dir=cfg.data_dir)
        self.model = self.task.build()
        self.flat = parameters_to_flat_views(self.model)

    def __call__(self, center: torch.Tensor) -> dict[str, float]:
        from easgd.evaluation import evaluate_center

        return evaluate_center(self.model, self.flat, center, self.task.test, self.task.train[0])


def final_center(cfg: TrainConfig, paths: RunPaths) -> torch.Tensor:
    """The center at the end of the run, from the checkpoints the run left."""
    if cfg.servers_used:  # the result lives on the parameter servers
        from easgd.comm.ps import read_checkpoint

        shards = [read_checkpoint(paths.server_checkpoint(s)) for s in range(cfg.servers)]
        shards.sort(key=lambda s: int(s["offset"]))
        return torch.cat([s["evaluation"] for s in shards])
    path = paths.sync_checkpoint
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the run ended before its first checkpoint")
    return torch.load(path, weights_only=True)["center"]


def finalize(
    cfg: TrainConfig, paths: RunPaths, wall_seconds: float, **extra: Any
) -> dict[str, Any]:
    """Evaluate the final center, add up the traffic, and write ``summary.json``.

    Snapshots the evaluator did not evaluate (all of them with ``eval_deferred``; in a
    synchronous run, those written after its last look) are evaluated here first and added
    to ``eval.jsonl`` in the order of their wall times. ``extra``: optional summary fields
    (:data:`easgd.runlog.SUMMARY_FIELDS`), e.g. the launcher's ``restarts``.
    """
    evaluate = CenterEvaluation(cfg)
    _evaluate_remaining_snapshots(paths, evaluate)
    result = evaluate(final_center(cfg, paths))
    events = list(iter_jsonl(paths.metrics))
    # A worker's events carry its running totals; a restarted worker (new pid) starts again.
    totals: dict[tuple[int, int], dict[str, Any]] = {}
    steps: dict[tuple[int, int], int] = {}
    for event in events:
        if event.get("event") in (Event.EXCHANGE, Event.STEP, Event.WORKER_DONE):
            key = (int(event["worker"]), int(event.get("pid", 0)))
            steps[key] = max(steps.get(key, 0), int(event["step"]))
            if event["event"] != Event.WORKER_DONE:
                totals[key] = event
    workers = [e for e in totals.values() if "exchanges" in e]
    start, end = training_span(events)
    return write_summary(
        paths, cfg, runtime="real", center=result,
        curve=[float(e["test_error"]) for e in iter_jsonl(paths.eval)],
        wall_seconds=wall_seconds, startup_seconds=start,
        train_seconds=None if start is None or end is None else end - start,
        exchanges=sum(int(e["exchanges"]) for e in workers),
        bytes_sent=sum(int(e["bytes_sent"]) for e in workers),
        bytes_received=sum(int(e["bytes_received"]) for e in workers),
        local_steps=sum(steps.values()), **extra,
    )  # fmt: skip


def _evaluate_remaining_snapshots(paths: RunPaths, evaluate: CenterEvaluation) -> None:
    done = {e.get("snapshot") for e in iter_jsonl(paths.eval)}
    todo = [p for p in paths.snapshot_files() if p.name not in done]
    if not todo:
        return
    with JsonlWriter(paths.eval) as out:
        for path in todo:
            try:
                center = torch.load(path, weights_only=True)
            except Exception as exc:  # a snapshot cut short by a crash: skip it, say so
                log.warning("skipping unreadable snapshot %s: %s", path, exc)
                continue
            out.write(eval_line(snapshot_wall(path), evaluate(center), path))
