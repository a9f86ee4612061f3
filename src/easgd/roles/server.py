"""The server role: one shard of the center, served until every live worker is done.

The shard decides the end of the run from authenticated messages only
(:meth:`easgd.comm.ps_server.ParameterServer.finished`): every worker ``0..P-1`` said its
goodbye with its budget spent, or the launcher declared it lost (a CONTROL message
``{"lost": [ids]}``). No counter in the run's store does: anyone who can reach the store
could write one.

A shard the launcher starts again after its process died (``EASGD_RESTART`` = k > 0)
resumes from its checkpoint when there is one (else from the initial center), publishes its
new address under the same store key, so that workers that reconnect find it, and writes a
``server_restart`` event.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import torch

from easgd.config import TrainConfig
from easgd.roles.context import RESUME_ENV, RoleContext, publish_server, secret
from easgd.runlog import Event, JsonlWriter, previous_checkpoint

__all__ = ["RESTART_ENV", "WORKERS_DONE_KEY", "WORKERS_LOST_KEY", "run_server", "server_pid_key"]

#: The environment variable that tells a restarted process which restart it is (0: none).
RESTART_ENV = "EASGD_RESTART"
#: Store counters: workers that finished their budget (torchrun's rank 0 waits on it before
#: its summary), and workers the launcher gave up on. The servers read neither.
WORKERS_DONE_KEY = "easgd/workers_done"
WORKERS_LOST_KEY = "easgd/workers_lost"


def server_pid_key(shard: int) -> str:
    """The store key holding the pid of the server that published ``easgd/server/<shard>``.

    Set right after the address, so a reader that sees its own process's pid there knows the
    address key holds that process's address, not a dead predecessor's.
    """
    return f"easgd/server_pid/{shard}"


def run_server(cfg: TrainConfig, ctx: RoleContext, shard: int) -> None:
    """Serve shard ``shard`` until every worker finished or was lost, or SIGTERM arrives."""
    from easgd.comm.ps import ParameterServer, shard_ranges
    from easgd.comm.ps_server import default_max_connections
    from easgd.flat import parameters_to_flat_views
    from easgd.task import task_from_config

    torch.set_num_threads(1)
    restart = int(os.environ.get(RESTART_ENV, "0"))
    # A restarted shard, or a resumed run (easgd train --resume; a torchrun restart attempt):
    # continue from the checkpoint, never silently from the initial center.
    resumed = restart > 0 or os.environ.get(RESUME_ENV, "") not in ("", "0")
    metrics = JsonlWriter(ctx.paths.metrics)

    def on_event(event: dict[str, Any]) -> None:
        metrics.write({"wall": ctx.wall(), "shard": shard, "pid": os.getpid(), **event})

    path = ctx.paths.server_checkpoint(shard)
    common: dict[str, Any] = {
        "host": cfg.host, "port": 0, "secret": secret(), "checkpoint_path": path,
        "checkpoint_every": cfg.checkpoint_interval, "on_event": on_event,
        "workers": cfg.workers, "max_connections": default_max_connections(cfg.workers),
        "tls": cfg.server_tls(),
    }  # fmt: skip
    resumed_t: int | None = None
    task = task_from_config(cfg)
    center = parameters_to_flat_views(task.build()).params.detach().clone()
    lo, hi = shard_ranges(center.numel(), cfg.servers)[shard]
    if resumed and (path.exists() or previous_checkpoint(path).exists()):
        # A damaged newest file falls back to the previous one; if neither verifies, the
        # CheckpointError ends this shard with its message (never a silent fresh center).
        server = ParameterServer.from_checkpoint(
            path, hp=cfg.hyperparams(), numel=hi - lo, offset=lo, **common
        )
        resumed_t = server.t
    else:
        # The first start, or a restart before any checkpoint: the initial center (the
        # same seed), to which the reconnecting workers re-send everything.
        server = ParameterServer(cfg.hyperparams(), center[lo:hi].clone(), offset=lo, **common)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.start()
    publish_server(ctx.store, shard, *server.address)  # overwrites a dead predecessor's
    ctx.store.set(server_pid_key(shard), str(os.getpid()))
    if restart > 0:
        address = ctx.store.get(f"easgd/server/{shard}").decode()
        metrics.write({"event": Event.SERVER_RESTART, "wall": ctx.wall(), "shard": shard,
                       "pid": os.getpid(), "restart": restart, "resumed_t": resumed_t,
                       "address": address})  # fmt: skip
    try:
        while not stop.wait(0.2) and not server.finished():
            pass
    finally:
        server.stop()
        metrics.write({"event": Event.SERVER_DONE, "wall": ctx.wall(), "shard": shard,
                       **_scalars(server.stats())})  # fmt: skip
        metrics.close()
        ctx.store.set(f"easgd/server_saved/{shard}", "1")


def _scalars(stats: dict[str, Any]) -> dict[str, Any]:
    """The server's counters that fit one JSON event (the per-session list does not)."""
    return {k: v for k, v in stats.items() if isinstance(v, int | float | str | bool)}
