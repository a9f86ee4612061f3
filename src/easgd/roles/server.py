"""The server role: one shard of the center, served until every worker is done."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import torch

from easgd.config import TrainConfig
from easgd.roles.context import RoleContext, publish_server, secret
from easgd.runlog import Event, JsonlWriter

__all__ = ["run_server"]


def run_server(cfg: TrainConfig, ctx: RoleContext, shard: int) -> None:
    """Serve shard ``shard`` of the center until every worker is done or SIGTERM arrives."""
    from easgd.comm.ps import ParameterServer, shard_ranges
    from easgd.flat import parameters_to_flat_views
    from easgd.task import build_task

    torch.set_num_threads(1)
    task = build_task(cfg.dataset, cfg.model, seed=cfg.seed, data_dir=cfg.data_dir)
    center = parameters_to_flat_views(task.build()).params.detach().clone()
    lo, hi = shard_ranges(center.numel(), cfg.servers)[shard]
    metrics = JsonlWriter(ctx.paths.metrics)

    def on_event(event: dict[str, Any]) -> None:
        metrics.write({"wall": ctx.wall(), "shard": shard, "pid": os.getpid(), **event})

    server = ParameterServer(
        cfg.hyperparams(), center[lo:hi].clone(), offset=lo, host=cfg.host, port=0,
        secret=secret(), checkpoint_path=ctx.paths.server_checkpoint(shard),
        checkpoint_every=cfg.checkpoint_interval, on_event=on_event,
    )  # fmt: skip
    server.start()
    publish_server(ctx.store, shard, *server.address)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.2):
            if int(ctx.store.add("easgd/workers_done", 0)) >= cfg.workers:
                break
    finally:
        server.stop()
        metrics.write({"event": Event.SERVER_DONE, "wall": ctx.wall(), "shard": shard,
                       **_scalars(server.stats())})  # fmt: skip
        metrics.close()
        ctx.store.set(f"easgd/server_saved/{shard}", "1")


def _scalars(stats: dict[str, Any]) -> dict[str, Any]:
    """The server's counters that fit one JSON event (the per-session list does not)."""
    return {k: v for k, v in stats.items() if isinstance(v, int | float | str | bool)}
