"""The evaluator role: the center's test error against wall time, never slowing training.

It lives in its own process. Where the result lives on the parameter servers (asynchronous
runs) it pulls it every ``eval_interval`` seconds and saves it as a timestamped snapshot;
otherwise worker 0 writes the snapshots and the evaluator reads them. Either way each
snapshot's test loss and error go to ``eval.jsonl`` against the wall time at which the
snapshot was taken, as in the paper's figures. With ``eval_deferred`` it only snapshots, and
:func:`easgd.finalize.finalize` evaluates the snapshots after training.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from easgd.config import TrainConfig
from easgd.finalize import CenterEvaluation
from easgd.roles.context import RoleContext, server_addresses
from easgd.runlog import JsonlWriter, atomic_torch_save, eval_line, snapshot_wall

__all__ = ["run_evaluator"]

#: A snapshot to evaluate: its wall time, its file, and how to read it.
Snapshot = tuple[float, Path, Callable[[], torch.Tensor]]


def run_evaluator(cfg: TrainConfig, ctx: RoleContext, stop: threading.Event) -> None:
    """Evaluate snapshots of the center until ``stop`` is set."""
    torch.set_num_threads(1)
    if cfg.eval_deferred and not cfg.servers_used:
        stop.wait()  # worker 0 writes the snapshots; finalize evaluates them
        return
    evaluate = CenterEvaluation(cfg)
    source = _ServerSnapshots(cfg, ctx, evaluate.flat.numel) if cfg.servers_used else None
    seen: set[str] = set()
    out = JsonlWriter(ctx.paths.eval)
    try:
        while not stop.is_set():
            began = time.monotonic()
            try:
                snapshots = source() if source is not None else _new_snapshots(ctx, seen)
            except ConnectionError:
                break  # the servers are gone: the run is over
            for wall, path, read in [] if cfg.eval_deferred else snapshots:
                out.write(eval_line(wall, evaluate(read()), path))
                if stop.is_set():
                    break
            stop.wait(max(0.05, cfg.eval_interval - (time.monotonic() - began)))
    finally:
        out.close()
        if source is not None:
            source.close()


class _ServerSnapshots:
    """Pulls the result from the parameter servers and saves it as a snapshot."""

    def __init__(self, cfg: TrainConfig, ctx: RoleContext, numel: int) -> None:
        from easgd.comm.ps_client import PSClient

        self.ctx = ctx
        addresses = server_addresses(ctx.store, cfg.servers, cfg.timeout)
        self.client = PSClient(addresses, numel, worker_id=-1, timeout=cfg.timeout)
        self.buffer = torch.empty(numel)

    def __call__(self) -> list[Snapshot]:
        self.client.pull(self.buffer, evaluation=True)
        wall = self.ctx.wall()
        path = self.ctx.paths.snapshot(wall)
        atomic_torch_save(path, self.buffer)
        return [(wall, path, lambda: self.buffer)]

    def close(self) -> None:
        self.client.close(clean=False)  # an evaluator never joined: nothing to say goodbye to


def _new_snapshots(ctx: RoleContext, seen: set[str]) -> list[Snapshot]:
    """The snapshots worker 0 wrote since the last look, in wall order."""
    new = [p for p in ctx.paths.snapshot_files() if p.name not in seen]
    seen.update(p.name for p in new)
    return [(snapshot_wall(p), p, functools.partial(_load, p)) for p in new]


def _load(path: Path) -> torch.Tensor:
    center: torch.Tensor = torch.load(path, weights_only=True)
    return center
