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
import threading
import time
from pathlib import Path
from typing import Any

import torch

from easgd.algorithms import Mode
from easgd.config import TrainConfig
from easgd.runlog import JsonlWriter, RunPaths, atomic_torch_save, atomic_write_json, iter_jsonl
from easgd.train import RoleContext, server_addresses

__all__ = ["final_center", "finalize", "run_evaluator", "snapshot_wall"]

log = logging.getLogger(__name__)


def snapshot_wall(path: Path) -> float:
    """The wall time encoded in a snapshot's name (``center-<seconds>.pt``)."""
    return float(path.stem.split("-", 1)[1])


class _Evaluation:
    """The model, data and flat views used to evaluate centers, built once."""

    def __init__(self, cfg: TrainConfig) -> None:
        from easgd.models import parameters_to_flat_views
        from easgd.problem import build_problem_parts

        self.parts = build_problem_parts(
            cfg.dataset, cfg.model, seed=cfg.seed, data_dir=cfg.data_dir
        )
        self.model = self.parts.build()
        self.flat = parameters_to_flat_views(self.model)

    def __call__(self, center: torch.Tensor) -> dict[str, float]:
        from easgd.evaluate import evaluate_center

        return evaluate_center(self.model, self.flat, center, self.parts.test, self.parts.train[0])


def run_evaluator(cfg: TrainConfig, ctx: RoleContext, stop: threading.Event) -> None:
    """Evaluate snapshots of the center until ``stop`` is set."""
    torch.set_num_threads(1)
    evaluate = _Evaluation(cfg)
    paths = ctx.paths
    out = JsonlWriter(paths.eval)
    client: Any = None
    if cfg.resolved_mode() is Mode.ASYNC:
        from easgd.comm.ps import PSClient

        addresses = server_addresses(ctx.store, cfg.servers, cfg.timeout)
        client = PSClient(addresses, evaluate.flat.numel, worker_id=-1, timeout=cfg.timeout)
        buffer = torch.empty(evaluate.flat.numel)
    seen: set[str] = set()
    try:
        while not stop.is_set():
            began = time.monotonic()
            if client is not None:
                try:
                    client.pull(buffer, evaluation=True)
                except ConnectionError:
                    break  # the servers are gone: the run is over
                wall = ctx.wall()
                atomic_torch_save(paths.snapshot(wall), buffer)
                # eval_deferred: snapshots only; finalize evaluates them after training.
                todo = [] if cfg.eval_deferred else [(wall, paths.snapshot(wall))]
            elif cfg.eval_deferred:
                todo = []  # rank 0 writes the snapshots; finalize evaluates them
            else:
                files = sorted(p for p in paths.snapshots.glob("center-*.pt") if p.name not in seen)
                todo = [(snapshot_wall(p), p) for p in files]
            for wall, path in todo:
                seen.add(path.name)
                center = buffer if client is not None else torch.load(path, weights_only=True)
                out.write(_eval_event(wall, evaluate(center), path))
                if stop.is_set():
                    break
            stop.wait(max(0.05, cfg.eval_interval - (time.monotonic() - began)))
    finally:
        out.close()
        if client is not None:
            client.close()


def final_center(cfg: TrainConfig, paths: RunPaths) -> torch.Tensor:
    """The center at the end of the run, from the checkpoints the run left."""
    if cfg.resolved_mode() is Mode.ASYNC:
        from easgd.comm.ps import read_checkpoint

        shards = [read_checkpoint(paths.server_checkpoint(s)) for s in range(cfg.servers)]
        shards.sort(key=lambda s: int(s["offset"]))
        return torch.cat([s["evaluation"] for s in shards])
    path = paths.sync_checkpoint
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the run ended before its first checkpoint")
    return torch.load(path, weights_only=False)["center"]


def finalize(
    cfg: TrainConfig, paths: RunPaths, wall_seconds: float, **extra: Any
) -> dict[str, Any]:
    """Evaluate the final center, add up the traffic, and write ``summary.json``.

    Snapshots the evaluator did not evaluate (all of them with ``eval_deferred``; in a
    synchronous run, those written after its last look) are evaluated here first and added
    to ``eval.jsonl`` in the order of their wall times.
    """
    evaluate = _Evaluation(cfg)
    _evaluate_remaining_snapshots(paths, evaluate)
    center = final_center(cfg, paths)
    result = evaluate(center)
    # A worker's events carry its running totals; a restarted worker (new pid) starts again.
    totals: dict[tuple[int, int], dict[str, Any]] = {}
    steps: dict[tuple[int, int], int] = {}
    for event in iter_jsonl(paths.metrics):
        if event.get("event") in ("exchange", "step", "worker_done"):
            key = (int(event["worker"]), int(event.get("pid", 0)))
            steps[key] = max(steps.get(key, 0), int(event["step"]))
            if event["event"] != "worker_done":
                totals[key] = event
    workers = [e for e in totals.values() if "exchanges" in e]
    curve = list(iter_jsonl(paths.eval))
    best = min((e["test_error"] for e in curve), default=result["error"])
    summary = {
        "method": cfg.method,
        "mode": cfg.resolved_mode().value,
        "workers": cfg.workers,
        "servers": cfg.servers if cfg.resolved_mode() is Mode.ASYNC else 0,
        "tau": cfg.tau,
        "lr": cfg.lr,
        "dataset": cfg.dataset,
        "center_test_error": result["error"],
        "center_test_loss": result["loss"],
        "best_center_test_error": min(best, result["error"]),
        "wall_seconds": wall_seconds,
        "exchanges": sum(int(e["exchanges"]) for e in workers),
        "bytes_sent": sum(int(e["bytes_sent"]) for e in workers),
        "bytes_received": sum(int(e["bytes_received"]) for e in workers),
        "local_steps": sum(steps.values()),
        "evaluations": len(curve),
        **extra,
    }
    atomic_write_json(paths.summary, summary)
    return summary


def _eval_event(wall: float, result: dict[str, float], snapshot: Path) -> dict[str, Any]:
    """One line of ``eval.jsonl``."""
    return {"wall": wall, "test_loss": result["loss"], "test_error": result["error"],
            "snapshot": snapshot.name}  # fmt: skip


def _evaluate_remaining_snapshots(paths: RunPaths, evaluate: _Evaluation) -> None:
    done = {e.get("snapshot") for e in iter_jsonl(paths.eval)} if paths.eval.exists() else set()
    todo = sorted(
        (p for p in paths.snapshots.glob("center-*.pt") if p.name not in done), key=snapshot_wall
    )
    if not todo:
        return
    out = JsonlWriter(paths.eval)
    try:
        for path in todo:
            try:
                center = torch.load(path, weights_only=True)
            except Exception as exc:  # a snapshot cut short by a crash: skip it, say so
                log.warning("skipping unreadable snapshot %s: %s", path, exc)
                continue
            out.write(_eval_event(snapshot_wall(path), evaluate(center), path))
    finally:
        out.close()
