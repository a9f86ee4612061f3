"""The evaluator role and the end of a run.

The evaluator lives in its own process so that evaluating the center never slows training:
in asynchronous runs it pulls the center from the servers every ``eval_interval`` seconds and
saves it as a timestamped snapshot; in synchronous runs rank 0 writes the snapshots and the
evaluator reads them. Either way each snapshot's test loss and error go to ``eval.jsonl``
against the wall time at which the snapshot was taken, as in the paper's figures.

:func:`finalize` evaluates the final center (from the server checkpoints or the synchronous
checkpoint) and writes ``summary.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path
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

__all__ = ["final_center", "finalize", "snapshot_wall"]

log = logging.getLogger(__name__)


class _Evaluation:
    """The model, data and flat views used to evaluate centers, built once."""

    def __init__(self, cfg: TrainConfig) -> None:
        from easgd.flat import parameters_to_flat_views
        from easgd.problem import build_problem_parts

        self.parts = build_problem_parts(
            cfg.dataset, cfg.model, seed=cfg.seed, data_dir=cfg.data_dir
        )
        self.model = self.parts.build()
        self.flat = parameters_to_flat_views(self.model)

    def __call__(self, center: torch.Tensor) -> dict[str, float]:
        from easgd.evaluate import evaluate_center

        return evaluate_center(self.model, self.flat, center, self.parts.test, self.parts.train[0])


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
    evaluate = _Evaluation(cfg)
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


def _eval_event(wall: float, result: dict[str, float], snapshot: Path) -> dict[str, Any]:
    """One line of ``eval.jsonl`` (:func:`easgd.runlog.eval_line`)."""
    return eval_line(wall, result, snapshot)


def _evaluate_remaining_snapshots(paths: RunPaths, evaluate: _Evaluation) -> None:
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
            out.write(_eval_event(snapshot_wall(path), evaluate(center), path))
