"""The worker role: train one replica until its budget is spent.

It reads top to bottom: build the model (the same seed everywhere) with its parameters as
views of one flat buffer, open the transport the method's mode needs (parameter server,
all-reduce group, or none), start from the center, then drive
:func:`easgd.algorithms.run_step` until the budget is spent, logging every exchange, and
finish. The update rules live in :mod:`easgd.algorithms`; nothing here computes one, and
nothing here asks which method or mode it runs: the method table and the transport know.

The time budget counts from the first training step (the ``train_start`` event), so a
slow start-up (importing torch, loading data, waiting for the servers) does not eat it.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import torch

from easgd.algorithms import Worker, run_finish, run_settle, run_step
from easgd.comm.base import Transport, make_transport
from easgd.config import TrainConfig
from easgd.roles.context import RoleContext, resolve_device, secret, server_addresses
from easgd.runlog import CheckpointKind, Event, JsonlWriter, save_checkpoint

__all__ = ["run_worker"]


def run_worker(cfg: TrainConfig, ctx: RoleContext, index: int) -> None:
    """Train as worker ``index`` until the budget is spent."""
    from easgd.data.loader import BatchStream
    from easgd.flat import parameters_to_flat_views
    from easgd.task import build_task, model_grad_fn

    # Setup: the model, its flat views, the data stream, the transport, the worker.
    torch.set_num_threads(1)
    device = resolve_device(cfg.device, ctx.local_rank)
    hp, mode = cfg.hyperparams(), cfg.resolved_mode()
    task = build_task(cfg.dataset, cfg.model, seed=cfg.seed, data_dir=cfg.data_dir)
    model = task.build().to(device)
    flat = parameters_to_flat_views(model)
    stream = BatchStream(
        task.train[0], task.train[1], cfg.batch_size, seed=cfg.seed + index,
        transform=task.transform,
    )  # fmt: skip
    grad_fn = model_grad_fn(model, flat, stream, device)
    addresses = server_addresses(ctx.store, cfg.servers, cfg.timeout) if cfg.servers_used else []
    # Under --max-restarts the launcher restarts a dead server shard: follow it to its new
    # address (the store) and re-send what its checkpoint lacks.
    transport = make_transport(
        mode, device=device, numel=flat.numel, addresses=addresses, worker_id=index,
        secret=secret(), timeout=cfg.timeout,
        reconnect_timeout=_reconnect_timeout(cfg),
        resolve=lambda shard: server_addresses(ctx.store, cfg.servers, cfg.timeout)[shard],
        on_event=lambda event: log.event(**event),
    )  # fmt: skip
    transport.start(flat.params)  # every worker starts from the center
    worker = Worker(hp, flat.params, mode, grad=flat.grads)
    budget = _Budget(cfg.steps_per_worker(len(task.train[0])), cfg.time_budget, hp.tau)
    log = _Log(ctx, index, worker, transport)
    keeper = _Keeper(cfg, ctx, worker, transport) if _keeps_result(worker, index) else None

    # The loop.
    try:
        log.train_start()
        budget.start()
        while not budget.spent(worker, transport):
            comm = worker.communicates()
            log.step(comm, run_step(worker, grad_fn, transport.serve))
            if keeper is not None:
                keeper.tick()
        run_finish(worker, transport.serve)  # every rank: nothing left in flight
        transport.settle()
        if keeper is not None:
            keeper.checkpoint()
    except BaseException:
        log.done()
        transport.close(clean=False)
        raise

    # Teardown.
    log.done()
    transport.close()
    ctx.store.add("easgd/workers_done", 1)


def _reconnect_timeout(cfg: TrainConfig) -> float:
    """How long a worker waits for a restarted shard (0: a lost server ends the worker)."""
    return 2 * cfg.timeout if cfg.max_restarts else 0.0


def _keeps_result(worker: Worker, index: int) -> bool:
    """Worker 0 snapshots and checkpoints the result when it is not kept by a server."""
    return index == 0 and not worker.spec.evaluated_on_server(worker.mode)


class _Budget:
    """A step budget, a time budget from the first step, or both (whichever ends first).

    The time budget is checked every ``max(tau, 10)`` steps, at the same steps on every
    rank, because synchronous ranks agree on it through the transport's vote.
    """

    def __init__(self, steps: int | None, seconds: float | None, tau: int) -> None:
        self.steps = steps
        self.seconds = seconds
        self.every = max(tau, 10)
        self.started = math.inf

    def start(self) -> None:
        self.started = time.monotonic()

    def spent(self, worker: Worker, transport: Transport) -> bool:
        if self.steps is not None and worker.t >= self.steps:
            return True
        if self.seconds is None or worker.t % self.every != 0:
            return False
        return transport.stop_vote(time.monotonic() - self.started >= self.seconds)


class _Log:
    """The worker's events in ``metrics.jsonl``: its start, its exchanges and steps, its end."""

    def __init__(self, ctx: RoleContext, index: int, worker: Worker, transport: Transport):
        self.ctx, self.index, self.worker, self.transport = ctx, index, worker, transport
        self.out = JsonlWriter(ctx.paths.metrics)
        self.losses: list[float] = []
        self.every = max(1, min(worker.hp.tau, 50))
        self.pid = os.getpid()

    def _write(self, event: Event, **fields: Any) -> None:
        self.out.write({"event": event, "wall": self.ctx.wall(), "worker": self.index,
                        "pid": self.pid, **fields})  # fmt: skip

    def event(self, event: str, **fields: Any) -> None:
        """A transport's event (``server_lost``, ``server_back``), with this worker's fields."""
        self._write(Event(event), step=self.worker.t, **fields)

    def train_start(self) -> None:
        wall = self.ctx.wall()
        self._write(Event.TRAIN_START, step=self.worker.t, startup_seconds=wall)

    def step(self, comm: bool, loss: float) -> None:
        self.losses.append(loss)
        if not comm and self.worker.t % self.every != 0:
            return
        traffic = self.transport.traffic
        self._write(
            Event.EXCHANGE if comm else Event.STEP, step=self.worker.t,
            loss=sum(self.losses) / len(self.losses), exchanges=traffic.exchanges,
            bytes_sent=traffic.bytes_sent, bytes_received=traffic.bytes_received,
            exchange_seconds=traffic.last_exchange_seconds if comm else 0.0,
        )  # fmt: skip
        self.losses.clear()

    def done(self) -> None:
        self._write(Event.WORKER_DONE, step=self.worker.t)
        self.out.close()


class _Keeper:
    """Snapshots (every ``eval_interval`` s) and checkpoints of a result a worker holds."""

    def __init__(self, cfg: TrainConfig, ctx: RoleContext, worker: Worker, transport: Transport):
        self.cfg, self.ctx, self.worker, self.transport = cfg, ctx, worker, transport
        self.next_snapshot = ctx.wall()
        self.next_checkpoint = ctx.wall() + cfg.checkpoint_interval

    def tick(self) -> None:
        now = self.ctx.wall()
        due_snapshot, due_checkpoint = now >= self.next_snapshot, now >= self.next_checkpoint
        if not (due_snapshot or due_checkpoint) or not self.worker.result_is_current():
            return
        run_settle(self.worker, self.transport.serve)  # the last exchange, if in flight
        if due_snapshot:
            path = self.ctx.paths.snapshot(now)

            center = {"center": self.worker.evaluation_vector()}
            save_checkpoint(path, CheckpointKind.SNAPSHOT, center, method=self.cfg.method,
                            t=self.worker.t, meta={"wall": now})  # fmt: skip
            self.next_snapshot = now + self.cfg.eval_interval
        if due_checkpoint:
            self.checkpoint()
            self.next_checkpoint = now + self.cfg.checkpoint_interval

    def checkpoint(self) -> None:
        """Worker 0's center, verified on reading; the file it replaces is kept as previous."""

        save_checkpoint(
            self.ctx.paths.sync_checkpoint, CheckpointKind.CENTER,
            {"center": self.worker.evaluation_vector()}, method=self.cfg.method,
            t=self.worker.t, meta={"wall": self.ctx.wall(), "config": self.cfg.to_dict()},
        )  # fmt: skip
