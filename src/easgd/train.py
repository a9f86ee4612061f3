"""The training configuration and the roles of a run: worker and server.

A worker reads top to bottom: build the model (same seed everywhere), make its parameters
views of one flat buffer, pick the transport (all-reduce or the parameter server), then run
:func:`easgd.algorithms.run_step` until its budget is spent, logging every exchange. The
update rules themselves live in :mod:`easgd.algorithms`; nothing here computes one.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from easgd.algorithms import Mode, Op, Request, Worker, run_settle, run_step
from easgd.runlog import JsonlWriter, RunPaths, atomic_torch_save

__all__ = ["RoleContext", "TrainConfig", "run_server", "run_worker", "server_addresses"]

from easgd.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class RoleContext:
    """Where a process stands in the run: its rank, the shared store, the run directory."""

    rank: int
    world_size: int
    local_rank: int
    store: Any  # torch.distributed.Store
    paths: RunPaths
    start: float  # time.time() at the start of the run, shared by every process

    def wall(self) -> float:
        return time.time() - self.start


def resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device(device)


def server_addresses(store: Any, servers: int, timeout: float) -> list[tuple[str, int]]:
    """Wait (up to ``timeout`` seconds) for every server to publish its address."""
    import datetime

    keys = [f"easgd/server/{s}" for s in range(servers)]
    try:
        store.wait(keys, datetime.timedelta(seconds=timeout))
    except RuntimeError as exc:
        raise ConnectionError(
            f"no parameter server published its address within {timeout:g} s ({exc}); "
            "is the server process running?"
        ) from None
    out = []
    for key in keys:
        host, port = store.get(key).decode().rsplit(":", 1)
        out.append((host, int(port)))
    return out


def _staged(serve: Callable[[Request], None], device: torch.device) -> Callable[[Request], None]:
    """Route requests of CUDA workers through pinned CPU buffers (the server lives on CPU)."""
    if device.type != "cuda":
        return serve
    staging: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def staged(req: Request) -> None:
        key = id(req.payload)
        if key not in staging:
            pay = torch.empty(req.payload.shape, dtype=req.payload.dtype, pin_memory=True)
            staging[key] = (pay, torch.empty_like(pay))
        pay, rep = staging[key]
        pay.copy_(req.payload)
        serve(Request(req.op, pay, rep if req.reply is not None else None))
        if req.reply is not None:
            req.reply.copy_(rep, non_blocking=True)
        else:
            req.payload.copy_(pay, non_blocking=True)

    return staged


def run_worker(cfg: TrainConfig, ctx: RoleContext, index: int) -> None:
    """Train as worker ``index`` until the budget is spent."""
    from easgd.data.loader import BatchStream
    from easgd.models import parameters_to_flat_views
    from easgd.problem import build_problem_parts, model_grad_fn

    torch.set_num_threads(1)
    device = resolve_device(cfg.device, ctx.local_rank)
    hp = cfg.hyperparams()
    mode = cfg.resolved_mode()
    parts = build_problem_parts(cfg.dataset, cfg.model, seed=cfg.seed, data_dir=cfg.data_dir)
    model = parts.build().to(device)
    flat = parameters_to_flat_views(model)
    stream = BatchStream(
        parts.train[0], parts.train[1], cfg.batch_size, seed=cfg.seed + index,
        transform=parts.transform,
    )  # fmt: skip
    grad_fn = model_grad_fn(model, flat, stream, device)
    budget = cfg.steps_per_worker(len(parts.train[0]))

    client: Any = None
    transport: Any = None
    if mode is Mode.ASYNC:
        from easgd.comm.ps import PSClient

        addresses = server_addresses(ctx.store, cfg.servers, cfg.timeout)
        client = PSClient(
            addresses, flat.numel, worker_id=index, secret=_secret(), timeout=cfg.timeout
        )
        serve = _staged(client.serve, device)
        if device.type == "cuda":
            host = torch.empty(flat.numel)
            client.join(host)
            flat.params.copy_(host)
        else:
            client.join(flat.params)
    elif mode is Mode.SYNC:
        from easgd.comm.allreduce import AllReduceTransport, default_backend, init_group

        init_group(default_backend(device), timeout=cfg.timeout)
        transport = AllReduceTransport()
        serve = transport.serve
    else:

        def serve(req: Request) -> None:
            raise RuntimeError(f"a sequential method made a {req.op.value!r} request")

    worker = Worker(hp, flat.params, mode, grad=flat.grads)
    snapshots = index == 0 and mode is not Mode.ASYNC
    stats = client if client is not None else transport
    next_snapshot = ctx.wall()
    next_checkpoint = ctx.wall() + cfg.checkpoint_interval
    losses: list[float] = []
    stop_check = _StopCheck(torch.zeros(1, device=device))
    metrics = JsonlWriter(ctx.paths.metrics)
    log_every = max(1, min(hp.tau, 50))
    try:
        while budget is None or worker.t < budget:
            if cfg.time_budget is not None and _out_of_time(cfg, ctx, worker, mode, stop_check):
                break
            comm = worker.communicates()
            losses.append(run_step(worker, grad_fn, serve))
            if comm or worker.t % log_every == 0:
                event: dict[str, Any] = {
                    "event": "exchange" if comm else "step",
                    "wall": ctx.wall(),
                    "worker": index,
                    "pid": os.getpid(),
                    "step": worker.t,
                    "loss": sum(losses) / len(losses),
                }
                losses.clear()
                if stats is not None:
                    event.update(
                        exchanges=stats.exchanges,
                        bytes_sent=stats.bytes_sent,
                        bytes_received=stats.bytes_received,
                        exchange_seconds=stats.last_exchange_seconds if comm else 0.0,
                    )
                metrics.write(event)
            if snapshots and ctx.wall() >= next_snapshot and _center_is_current(worker):
                run_settle(worker, serve)  # the center of the last exchange, if in flight
                atomic_torch_save(ctx.paths.snapshot(ctx.wall()), _center(worker).cpu())
                next_snapshot = ctx.wall() + cfg.eval_interval
            if snapshots and ctx.wall() >= next_checkpoint:
                run_settle(worker, serve)
                _save_sync_checkpoint(cfg, ctx, worker)
                next_checkpoint = ctx.wall() + cfg.checkpoint_interval
    finally:
        metrics.write({"event": "worker_done", "wall": ctx.wall(), "worker": index,
                       "pid": os.getpid(), "step": worker.t})  # fmt: skip
        metrics.close()
    run_settle(worker, serve)  # every rank: no collective may be left in flight
    if stop_check.work is not None:
        stop_check.work.wait()
    if snapshots:
        if mode is Mode.SYNC and not worker.result_is_current():
            serve(Request(Op.MEAN, worker.x))  # end on an average, as local SGD does
        _save_sync_checkpoint(cfg, ctx, worker)
    if mode is Mode.SYNC:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    if client is not None:
        client.bye()
        client.close()
    ctx.store.add("easgd/workers_done", 1)


def _center(worker: Worker) -> torch.Tensor:
    return worker.evaluation_vector()


def _center_is_current(worker: Worker) -> bool:
    """Local SGD's rank-0 model is the center only right after an average."""
    if worker.spec.exchange.value == "param-mean" and worker.mode is Mode.SYNC:
        return worker.t % worker.hp.tau == 0
    return True


def _save_sync_checkpoint(cfg: TrainConfig, ctx: RoleContext, worker: Worker) -> None:
    atomic_torch_save(
        ctx.paths.sync_checkpoint,
        {"center": _center(worker).detach().cpu(), "t": worker.t, "wall": ctx.wall(),
         "config": cfg.to_dict()},
    )  # fmt: skip


@dataclass
class _StopCheck:
    """The synchronous ranks' vote on the time budget: one float, all-reduced with MAX."""

    flag: torch.Tensor
    work: Any = None  # the vote in flight


def _out_of_time(
    cfg: TrainConfig, ctx: RoleContext, worker: Worker, mode: Mode, check: _StopCheck
) -> bool:
    """Whether the time budget is spent; synchronous ranks agree on it.

    Every ``max(tau, 10)`` steps each rank reads the vote it started at the previous check
    and starts the next one, asynchronously: the vote never blocks a step (nor the
    exchange in flight), and the ranks stop at the same step, one check late.
    """
    assert cfg.time_budget is not None
    over = ctx.wall() >= cfg.time_budget
    if mode is not Mode.SYNC:
        return over
    if worker.t % max(worker.hp.tau, 10) != 0:
        return False
    import torch.distributed as dist

    stop = False
    if check.work is not None:
        check.work.wait()
        stop = bool(check.flag.item() > 0)
    if stop:
        check.work = None
        return True
    check.flag.fill_(1.0 if over else 0.0)
    check.work = dist.all_reduce(check.flag, op=dist.ReduceOp.MAX, async_op=True)
    return False


def _secret() -> bytes | None:
    value = os.environ.get("EASGD_SECRET")
    return value.encode() if value else None


def run_server(cfg: TrainConfig, ctx: RoleContext, shard: int) -> None:
    """Serve shard ``shard`` of the center until every worker is done or SIGTERM arrives."""
    from easgd.comm.ps import ParameterServer, shard_ranges
    from easgd.models import parameters_to_flat_views
    from easgd.problem import build_problem_parts

    torch.set_num_threads(1)
    parts = build_problem_parts(cfg.dataset, cfg.model, seed=cfg.seed, data_dir=cfg.data_dir)
    center = parameters_to_flat_views(parts.build()).params.detach().clone()
    lo, hi = shard_ranges(center.numel(), cfg.servers)[shard]
    metrics = JsonlWriter(ctx.paths.metrics)

    def on_event(event: dict[str, Any]) -> None:
        metrics.write({"wall": ctx.wall(), "shard": shard, "pid": os.getpid(), **event})

    server = ParameterServer(
        cfg.hyperparams(), center[lo:hi].clone(), offset=lo, host=cfg.host, port=0,
        secret=_secret(), checkpoint_path=ctx.paths.server_checkpoint(shard),
        checkpoint_every=cfg.checkpoint_interval, on_event=on_event,
    )  # fmt: skip
    server.start()
    host, port = server.address
    ctx.store.set(f"easgd/server/{shard}", f"{_advertised(host)}:{port}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.2):
            if int(ctx.store.add("easgd/workers_done", 0)) >= cfg.workers:
                break
    finally:
        server.stop()
        metrics.write({"event": "server_done", "wall": ctx.wall(), "shard": shard,
                       **_jsonable(server.stats())})  # fmt: skip
        metrics.close()
        ctx.store.set(f"easgd/server_saved/{shard}", "1")


def _advertised(host: str) -> str:
    """The address workers should dial: a wildcard bind is reached through this host's name."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    import socket

    return os.environ.get("EASGD_ADVERTISE_HOST") or socket.gethostbyname(socket.gethostname())


def _jsonable(stats: Any) -> dict[str, Any]:
    if isinstance(stats, dict):
        return {k: v for k, v in stats.items() if isinstance(v, int | float | str | bool)}
    return {}
