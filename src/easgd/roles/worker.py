"""The worker role: train one replica until its budget is spent.

It reads top to bottom: build the model (the same init seed everywhere) with its parameters as
views of one flat buffer, open the transport the method's mode needs (parameter server,
all-reduce group, or none), start from the center, then drive
:func:`easgd.algorithms.run_step` until the budget is spent, logging every exchange, and
finish. The update rules live in :mod:`easgd.algorithms`; nothing here computes one, and
nothing here asks which method or mode it runs: the method table and the transport know.

A non-finite mini-batch loss (a learning rate far too large) ends the worker at once with
a ``diverged`` event and :class:`DivergedError`, which the process turns into exit status
:data:`DIVERGED_EXIT`: the launcher then stops the run as ``diverged`` instead of restarting
anyone (training on would only spread NaN through the center).

The time budget counts from the first training step (the ``train_start`` event), so a
slow start-up (importing torch, loading data, waiting for the servers) does not eat it.

Every worker saves its own state, ``checkpoints/worker-<i>.pt`` (:class:`_State`), every
``checkpoint_steps`` local steps (at the same steps on every rank) and at the end, so that
``easgd train --resume`` continues the run: a synchronous or sequential worker bitwise (x,
momentum, center copy, average, step, data-stream position and RNG state), an asynchronous
one from its step and data position, rejoining the restored servers like a restarted worker.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import time
from typing import Any

import torch

from easgd.algorithms import Mode, Worker, run_finish, run_settle, run_step
from easgd.comm.base import Transport, make_transport
from easgd.config import TrainConfig
from easgd.roles.context import (
    RESUME_ENV,
    RoleContext,
    resolve_device,
    secret,
    server_addresses,
)
from easgd.roles.group import group_gradient, group_transport
from easgd.runlog import (
    Checkpoint,
    CheckpointError,
    CheckpointKind,
    Event,
    JsonlWriter,
    load_checkpoint,
    previous_checkpoint,
    save_checkpoint,
)

__all__ = ["DIVERGED_EXIT", "RESUME_ENV", "DivergedError", "ResumeError", "run_worker"]

log_ = logging.getLogger(__name__)

_RESUME_STEP_KEY = "easgd/resume_step"  # the step every synchronous rank continues from
_PERIOD_KEY = "easgd/checkpoint_steps"  # worker 0's checkpoint period, shared by every rank
_WARMUP = 20  # steps timed to derive the checkpoint period from checkpoint_interval


#: The exit status of a worker process whose training diverged (:class:`DivergedError`).
DIVERGED_EXIT = 3


class ResumeError(RuntimeError):
    """A run that cannot be resumed: the message names the files and what to do."""


class DivergedError(RuntimeError):
    """A worker's mini-batch loss was not finite: the run diverged (one line, the fix)."""

    def __init__(self, index: int, step: int, loss: float, lr: float, what: str = "") -> None:
        found = f"its {what} are not finite" if what else f"the training loss is {loss}"
        super().__init__(
            f"worker {index}: {found} at step {step} (lr {lr:g}): the run diverged; lower "
            "--lr (or raise --batch-size)"
        )
        self.index, self.step, self.loss, self.lr = index, step, loss, lr


def run_worker(cfg: TrainConfig, ctx: RoleContext, index: int) -> None:
    """Train as worker ``index`` until the budget is spent."""
    from easgd.data.loader import BatchStream
    from easgd.flat import parameters_to_flat_views
    from easgd.task import model_grad_fn, task_from_config

    # Setup: the model, its flat views, the data stream, the transport, the worker.
    torch.set_num_threads(1)
    # Per-rank seed of the global RNG (dropout), so that a run is reproducible from its seed
    # and a resumed one (which restores this RNG's state) can be checked against a fresh one.
    torch.manual_seed(cfg.seed + index)
    device = resolve_device(cfg.device, ctx.local_rank)
    hp, mode = cfg.hyperparams(), cfg.resolved_mode()
    task = task_from_config(cfg)
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
    # With --group-size, a group's leader opens this transport for the group (roles.group).
    transport = group_transport(
        mode=mode, group_size=cfg.group_size, workers=cfg.workers, index=index, device=device,
        store=ctx.store, timeout=cfg.timeout,
        make_inner=lambda group: make_transport(
            mode, device=device, numel=flat.numel, addresses=addresses, worker_id=index,
            secret=secret(), timeout=cfg.timeout, group=group,
            reconnect_timeout=_reconnect_timeout(cfg),
            resolve=lambda shard: server_addresses(ctx.store, cfg.servers, cfg.timeout)[shard],
            on_event=lambda event: log.event(**event), tls=cfg.client_tls(),
            compress=cfg.compress,
        ),
    )  # fmt: skip
    grad_fn = group_gradient(transport, grad_fn)  # the group's mean gradient, if grouped
    transport.start(flat.params)  # every worker starts from the center
    worker = Worker(hp, flat.params, mode, grad=flat.grads, overlap=cfg.overlap)
    state = _State(cfg, ctx, index, worker, stream)
    if os.environ.get(RESUME_ENV, "") not in ("", "0"):
        state.resume()  # after start(): the broadcast or the pull must not overwrite it
    budget = _Budget(cfg.steps_per_worker(len(task.train[0])), cfg.time_budget, hp.tau)
    log = _Log(ctx, index, worker, transport)
    keeper = _Keeper(cfg, ctx, worker, transport) if _keeps_result(worker, index) else None

    # The loop.
    try:
        log.train_start(state.resumed)
        budget.start(state.train_seconds)
        state.start()
        while not budget.spent(worker, transport):
            comm = worker.communicates()
            if comm and not _finite(worker.x):
                # Never send a non-finite x: it would poison the center (or the peers).
                log.diverged(math.nan)
                raise DivergedError(index, worker.t, math.nan, hp.lr_at(max(0, worker.t - 1)),
                                    what="parameters")  # fmt: skip
            loss = run_step(worker, grad_fn, transport.serve)
            log.step(comm, loss)
            if not math.isfinite(loss):
                log.diverged(loss)
                raise DivergedError(index, worker.t, loss, hp.lr_at(worker.t - 1))
            state.tick(transport)
            if keeper is not None:
                keeper.tick()
        # The state a longer run continues from: before local SGD's final average.
        run_settle(worker, transport.serve)
        state.save_final()
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


def _finite(x: torch.Tensor) -> bool:
    """Whether every element of ``x`` is finite: a finite sum proves it (one pass, no
    allocation); only a non-finite sum (an overflow, or a NaN) needs the exact test."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


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

    def start(self, already: float = 0.0) -> None:
        """Start the clock; ``already``: seconds trained before a resume (they count)."""
        self.started = time.monotonic() - already

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

    def train_start(self, resumed: int | None) -> None:
        wall = self.ctx.wall()
        extra = {} if resumed is None else {"resumed_step": resumed}
        self._write(Event.TRAIN_START, step=self.worker.t, startup_seconds=wall, **extra)

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

    def diverged(self, loss: float) -> None:
        lr = self.worker.hp.lr_at(self.worker.t - 1)
        self._write(Event.DIVERGED, step=self.worker.t, loss=loss, lr=lr)

    def done(self) -> None:
        """The worker's end, with its traffic in all (what the summary adds up): after the
        loop settled, every exchange in flight has completed and is counted here."""
        traffic = self.transport.traffic
        self._write(Event.WORKER_DONE, step=self.worker.t, exchanges=traffic.exchanges,
                    bytes_sent=traffic.bytes_sent,
                    bytes_received=traffic.bytes_received)  # fmt: skip
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


class _State:
    """This worker's own state in ``checkpoints/worker-<i>.pt``, for ``easgd train --resume``.

    A synchronous or sequential worker keeps everything its run continues from: x, the
    momentum v, DOWNPOUR's accumulator, the center copy (synchronous EASGD; DiLoCo's global
    parameters), DiLoCo's outer momentum and AdamW moments, the average z, the step t, the
    data stream's position and torch's RNG state (dropout). An asynchronous worker keeps t,
    the stream and the RNG: on resume it pulls the center from the restored servers, as a
    restarted worker does. The file is an ``easgd.checkpoint/1`` of kind ``center`` whose
    ``meta["state"]`` is ``"worker"`` (its ``center`` tensor is the center copy where the
    worker holds one, else x).

    Saved every ``every`` steps, at the same steps on every rank (after settling the
    exchange in flight), and at the end of training before local SGD's final average.
    ``every`` is ``checkpoint_steps``, or, when that is None, the steps that take
    ``checkpoint_interval`` seconds as worker 0 timed its first ``_WARMUP`` steps (shared
    through the store). Synchronous periods are multiples of tau, so that no rank gets two
    checkpoints ahead of another (each period holds an exchange that every rank joins).
    """

    def __init__(
        self, cfg: TrainConfig, ctx: RoleContext, index: int, worker: Worker, stream: Any
    ) -> None:
        self.cfg, self.ctx, self.index, self.worker, self.stream = cfg, ctx, index, worker, stream
        self.path = ctx.paths.worker_checkpoint(index)
        self.sync = worker.mode is Mode.SYNC
        self.full = worker.mode is not Mode.ASYNC
        self.every = self._round(cfg.checkpoint_steps) if cfg.checkpoint_steps else None
        self.warmup_end: int | None = None
        self.started = math.inf
        self.train_seconds = 0.0  # trained before this process (the earlier part of a resume)
        self.resumed: int | None = None  # the step resumed from
        self.saved_t: int | None = None

    def _round(self, steps: int) -> int:
        tau = self.worker.hp.tau
        return math.ceil(steps / tau) * tau if self.sync else steps

    def start(self) -> None:
        self.started = time.monotonic()
        if self.every is None:
            self.warmup_end = self.worker.t + _WARMUP

    def tick(self, transport: Transport) -> None:
        t = self.worker.t
        if t == self.warmup_end:
            self.warmup_end = None
            self.every = self._agree_period(time.monotonic() - self.started)
        if self.every and t % self.every == 0:
            run_settle(self.worker, transport.serve)
            self.save()

    def _agree_period(self, seconds: float) -> int:
        per_step = max(seconds, 1e-9) / _WARMUP
        every = self._round(max(1, math.ceil(self.cfg.checkpoint_interval / per_step)))
        if not self.sync:
            return every
        if self.index == 0:
            self.ctx.store.set(_PERIOD_KEY, str(every))
        return int(self.ctx.store.get(_PERIOD_KEY))  # worker 0's, on every rank

    def save_final(self) -> None:
        if self.saved_t != self.worker.t:
            self.save()

    def seconds(self) -> float:
        return self.train_seconds + max(0.0, time.monotonic() - self.started)

    def save(self) -> None:
        w = self.worker
        state = w.state_dict()
        tensors: dict[str, torch.Tensor | None] = {
            "center": state["center"] if state["center"] is not None else w.x,
            "rng": torch.get_rng_state(),
        }
        if self.full:
            tensors.update(x=state["x"], v=state["v"], acc=state["acc"], z=state["z"],
                           outer_v=state["outer_v"], exp_avg=state["exp_avg"],
                           exp_avg_sq=state["exp_avg_sq"])  # fmt: skip
        meta = {
            "state": "worker", "worker": self.index, "mode": w.mode.value,
            "stream": self.stream.state_dict(), "train_seconds": self.seconds(),
            "wall": self.ctx.wall(), "config": self.cfg.to_dict(),
        }  # fmt: skip
        save_checkpoint(self.path, CheckpointKind.CENTER, tensors, method=self.cfg.method,
                        t=w.t, meta=meta)  # fmt: skip
        self.saved_t = w.t

    # Resuming.

    def _candidates(self, index: int) -> list[Checkpoint]:
        """Worker ``index``'s verified states: its newest file and the previous one."""
        path = self.ctx.paths.worker_checkpoint(index)
        found = []
        for p in (path, previous_checkpoint(path)):
            if not p.exists():
                continue
            try:
                ckpt = load_checkpoint(p, CheckpointKind.CENTER, method=self.cfg.method,
                                       numel=self.worker.x.numel(), fallback=False,
                                       allow_nonfinite=True)  # fmt: skip
            except CheckpointError as exc:
                log_.warning("not resuming from %s", exc)
                continue
            if ckpt.meta.get("state") == "worker" and ckpt.meta.get("worker") == index:
                found.append(ckpt)
        return found

    def _common_step(self) -> int:
        """The latest step at which every synchronous rank saved its state."""
        steps = [{c.t for c in self._candidates(i)} for i in range(self.cfg.workers)]
        common = set.intersection(*steps)
        if not common:
            have = "; ".join(f"worker {i}: {sorted(s) or 'none'}" for i, s in enumerate(steps))
            raise ResumeError(
                f"{self.ctx.paths.checkpoints}: no step at which every worker saved its state "
                f"(steps found: {have}); the run cannot resume, start it again"
            )
        return max(common)

    def resume(self) -> None:
        """Load this worker's state (synchronous ranks: at the step all of them hold)."""
        step: int | None = None
        if self.sync:
            if self.index == 0:
                self.ctx.store.set(_RESUME_STEP_KEY, str(self._common_step()))
            self.ctx.store.wait([_RESUME_STEP_KEY], datetime.timedelta(seconds=self.cfg.timeout))
            step = int(self.ctx.store.get(_RESUME_STEP_KEY))
        found = [c for c in self._candidates(self.index) if step is None or c.t == step]
        if not found:
            if self.full:
                raise ResumeError(
                    f"{self.path}: no verified state of worker {self.index}"
                    + ("" if step is None else f" at step {step}")
                    + "; the run cannot resume, start it again"
                )
            log_.warning("worker %d has no state in %s; it starts at step 0", self.index,
                         self.path)  # fmt: skip
            return
        ckpt = max(found, key=lambda c: c.t)
        w = self.worker
        if self.full:
            tensors = dict(ckpt.tensors)
            if w.center is None:
                tensors.pop("center")
            w.load_state_dict({**tensors, "t": ckpt.t})
        else:
            w.load_state_dict({"t": ckpt.t})  # x: the center just pulled
        self.stream.load_state_dict(ckpt.meta["stream"])
        torch.set_rng_state(ckpt.tensors["rng"])
        self.train_seconds = float(ckpt.meta.get("train_seconds", 0.0))
        self.resumed = self.saved_t = ckpt.t
        log_.info("worker %d resumes from %s at step %d", self.index, ckpt.path, ckpt.t)
