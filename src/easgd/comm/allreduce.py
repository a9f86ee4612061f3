"""Synchronous methods over ``torch.distributed`` collectives: no server.

Every rank holds an identical copy of the center (synchronous EASGD) or of the model
(all-reduce SGD, local SGD). Each exchange is ONE flat ``all_reduce`` of a preallocated
buffer: the sum of the differences ``x_i - c`` (EASGD, from which every rank applies the
same center update; overlapped with the next tau local steps, see ``overlap``), the mean
gradient (all-reduce SGD, as DDP does), or the mean parameters
(local SGD). gloo on CPU, NCCL on GPU.

Failure behaviour:

* a rank that dies makes the others' next collective fail (gloo: connection reset) or time
  out after ``timeout`` seconds (set short by :func:`init_group`, not the 30-minute default);
  the launcher sees the dead process at once and ends the run with its error.
* synchronous methods cannot go on without a rank: use the asynchronous parameter server
  (``easgd.comm.ps``) where workers must come and go.
* with ``check_steps``, ranks that fall out of step (one took more ``step()`` calls than
  another) get an :class:`OutOfStepError` naming the ranks and their step counters at the
  next exchange, or at :meth:`AllReduceTransport.finish_check` at the latest, never a hang:
  every exchange carries each rank's step counter in a small collective issued just
  before its data, and the counters are read before the data is waited for.
"""

from __future__ import annotations

import datetime
import logging
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from easgd.algorithms import Mode, Op, Request
from easgd.comm.base import Traffic, Transport

__all__ = ["AllReduceTransport", "OutOfStepError", "default_backend", "init_group"]

log = logging.getLogger(__name__)


def default_backend(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_group(backend: str, *, timeout: float = 120.0) -> None:
    """Join the default process group from the ``env://`` variables (torchrun's or ours)."""
    if dist.is_initialized():
        return
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))


class OutOfStepError(RuntimeError):
    """Ranks met at a synchronous exchange with different step counters (or one finished)."""


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _out_of_step(steps: list[int], finishing: list[bool]) -> str | None:
    """What is wrong with the counters the ranks brought to one exchange, or None."""
    if len(set(steps)) == 1 and len(set(finishing)) == 1:
        return None
    fix = (
        "every rank must call step() the same number of times: a step skipped on some ranks "
        "only (a GradScaler that found inf/nan gradients on one rank: pass the wrapper to "
        "scaler.step(), which keeps the ranks in step; or a data loader with fewer batches "
        "on one rank: use DistributedSampler) leaves the synchronous exchanges of the ranks "
        "out of step"
    )
    if len(set(finishing)) > 1:
        done = [r for r, f in enumerate(finishing) if f]
        going = [r for r, f in enumerate(finishing) if not f]
        return (
            f"{_ranks(done)} finished after "
            f"{', '.join(str(steps[r]) for r in done)} step() calls while {_ranks(going)} "
            f"{'is' if len(going) == 1 else 'are'} still exchanging, in step() call number "
            f"{', '.join(str(steps[r] + 1) for r in going)}; {fix}"
        )
    by_step: dict[int, list[int]] = {}
    for r, t in enumerate(steps):
        by_step.setdefault(t, []).append(r)
    if all(finishing):
        seen = "; ".join(f"{_ranks(rs)} after {t}" for t, rs in sorted(by_step.items()))
        return f"the ranks finished after different numbers of step() calls ({seen}); {fix}"
    seen = "; ".join(f"{_ranks(rs)} in step() call {t + 1}" for t, rs in sorted(by_step.items()))
    return f"ranks out of step at a synchronous exchange ({seen}); {fix}"


class AllReduceTransport(Transport):
    """Fulfils the synchronous requests of :class:`easgd.algorithms.Worker` with collectives.

    Args:
        group: the process group (default: the default group), as in PyTorch's
            model-averaging utilities.
        overlap: start EASGD's ``SUM`` as an asynchronous all-reduce and let the worker go
            on with its next local steps; the worker yields ``WAIT`` before it reads the sum
            (at its next exchange, or when it settles). Exact: the local steps in between
            use only the worker's own difference, never the sum. ``MEAN`` (all-reduce SGD's
            gradients, local SGD's parameters) is needed at once and always blocks.
        owns_group: ``close()`` destroys the default group (the transport created it).
        check_steps: every exchange also all-reduces each rank's step counter (``2p``
            float64 values, issued just before the data and read before it is waited for)
            and raises :class:`OutOfStepError` when the ranks disagree; call
            :meth:`finish_check` at the end of training on every rank.
    """

    mode = Mode.SYNC

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        overlap: bool = True,
        owns_group: bool = False,
        check_steps: bool = False,
    ) -> None:
        self.group = group
        self.overlap = overlap
        self.owns_group = owns_group
        self.check_steps = check_steps
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.traffic = Traffic()
        # payload data_ptr -> (work, seconds to start it, the step check in flight)
        self._in_flight: dict[int, tuple[Any, float, _Check | None]] = {}
        self._vote = torch.zeros(1)
        self._vote_work: Any = None  # the time-budget vote in flight

    def start(self, x: Tensor) -> None:
        """Every rank starts from rank 0's parameters (the group's first rank)."""
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        dist.broadcast(x, src=src, group=self.group)

    def serve(self, req: Request) -> None:
        if req.op is Op.WAIT:
            self._wait(req.payload)
            return
        if req.op not in (Op.SUM, Op.MEAN):
            raise ValueError(
                f"{req.op.value!r} needs a parameter server; the synchronous runtime serves "
                "only collectives (sum, mean)"
            )
        started = time.perf_counter()
        check = self._start_check(req.step, finishing=False) if self.check_steps else None
        if req.op is Op.SUM and self.overlap:
            key = req.payload.data_ptr()
            if key in self._in_flight:
                raise RuntimeError("a SUM on this buffer is already in flight: WAIT for it first")
            work = dist.all_reduce(
                req.payload, op=dist.ReduceOp.SUM, group=self.group, async_op=True
            )
            self._in_flight[key] = (work, time.perf_counter() - started, check)
            req.deferred = True
        else:
            if check is None:
                dist.all_reduce(req.payload, op=dist.ReduceOp.SUM, group=self.group)
            else:
                # Both in flight; the counters first: a peer out of step raises here
                # instead of leaving this rank waiting for data that never comes.
                work = dist.all_reduce(
                    req.payload, op=dist.ReduceOp.SUM, group=self.group, async_op=True
                )
                check.verify()
                work.wait()
            if req.op is Op.MEAN:
                req.payload.div_(self.world)
            self.traffic.last_exchange_seconds = time.perf_counter() - started
        self.traffic.exchanges += 1
        # A ring all-reduce sends and receives 2(p-1)/p of the buffer per rank.
        nbytes = req.payload.numel() * req.payload.element_size()
        moved = 2 * (self.world - 1) * nbytes // max(self.world, 1)
        self.traffic.bytes_sent += moved
        self.traffic.bytes_received += moved

    def _wait(self, payload: Tensor) -> None:
        entry = self._in_flight.pop(payload.data_ptr(), None)
        if entry is None:
            raise RuntimeError("WAIT for a buffer with no SUM in flight")
        work, start_seconds, check = entry
        started = time.perf_counter()
        if check is not None:
            check.verify()
        work.wait()
        self.traffic.last_exchange_seconds = start_seconds + time.perf_counter() - started

    def _start_check(self, step: int, *, finishing: bool) -> _Check:
        slots = torch.zeros(2 * self.world, dtype=torch.float64)
        slots[self.rank] = float(step)
        slots[self.world + self.rank] = 1.0 if finishing else 0.0
        work = dist.all_reduce(slots, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        moved = 2 * (self.world - 1) * slots.numel() * 8 // max(self.world, 1)
        self.traffic.bytes_sent += moved
        self.traffic.bytes_received += moved
        return _Check(work, slots, self.world)

    def finish_check(self, step: int) -> None:
        """End of training, on every rank: check that every rank finishes at ``step`` too.

        Pairs with a peer's next exchange if that peer is still training (it then raises
        there too), so a rank that took fewer steps is an error on both sides, not a hang.
        Call it after every exchange has completed (settle first).
        """
        if self.check_steps:
            self._start_check(step, finishing=True).verify()

    def stop_vote(self, over: bool) -> bool:
        """Agree on a time budget: MAX over the ranks of "my budget is over", one call late.

        Each call reads the vote started by the previous call and starts the next one,
        asynchronously, so the vote never blocks a step (nor the exchange in flight) and every
        rank stops at the same call.
        """
        stop = False
        if self._vote_work is not None:
            self._vote_work.wait()
            self._vote_work = None
            stop = bool(self._vote.item() > 0)
        if stop:
            return True
        self._vote.fill_(1.0 if over else 0.0)
        self._vote_work = dist.all_reduce(
            self._vote, op=dist.ReduceOp.MAX, group=self.group, async_op=True
        )
        return False

    def settle(self) -> None:
        """Wait for every collective still in flight (sums nobody waited for, the vote)."""
        for work, _, check in self._in_flight.values():
            if check is not None:
                check.verify()
            work.wait()
        self._in_flight.clear()
        if self._vote_work is not None:
            self._vote_work.wait()
            self._vote_work = None

    def close(self, *, clean: bool = True) -> None:
        """Clean: settle, meet every rank at a barrier, and leave the group if it is ours."""
        if not clean:
            return  # a peer may be gone: waiting for it would hang until the timeout
        self.settle()
        dist.barrier(group=self.group)
        if self.owns_group:
            dist.destroy_process_group()


class _Check:
    """The step counters of one exchange, all-reduced in flight (see ``check_steps``)."""

    def __init__(self, work: Any, slots: Tensor, world: int) -> None:
        self.work, self.slots, self.world = work, slots, world

    def verify(self) -> None:
        self.work.wait()
        values = self.slots.tolist()
        steps = [int(v) for v in values[: self.world]]
        finishing = [v > 0 for v in values[self.world :]]
        problem = _out_of_step(steps, finishing)
        if problem is not None:
            raise OutOfStepError(problem)
