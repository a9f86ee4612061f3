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
  next exchange, or at :meth:`AllReduceTransport.finish_check` at the latest, never a hang.
  Every exchange carries each rank's step counter: EASGD's sum in its own buffer's
  reserved tail (the same collective: ``p * (digits + 1)`` extra elements), the means in a
  small float64 collective issued just before the data and read before it is waited for.
  The finish check has the shape of the rank's exchanges, so it pairs with a peer's next
  exchange if that peer is still training, and both raise.
"""

from __future__ import annotations

import datetime
import logging
import math
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from easgd.algorithms import CompressedSum, Mode, Op, Request
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
        check_steps: every exchange also carries each rank's step counter (see the module
            notes; reserve :meth:`reserve` elements at the end of EASGD's sum buffer) and
            raises :class:`OutOfStepError` when the ranks disagree; call
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
        compress: str = "none",
    ) -> None:
        from easgd.compress import codec

        self.codec = codec(compress)  # validates the name
        self.compress = compress
        self._sums: dict[tuple[int, torch.dtype], CompressedSum] = {}
        self.group = group
        self.overlap = overlap
        self.owns_group = owns_group
        self.check_steps = check_steps
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.traffic = Traffic()
        # payload data_ptr -> (work, seconds to start it, the step check in flight)
        self._in_flight: dict[int, tuple[Any, float, _Check | None]] = {}
        self._sum_like: Tensor | None = None  # the shape of this rank's sums (finish_check)
        self._tails: dict[tuple[int, int, int], _Counters] = {}
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
        if req.op is Op.SUM and self.compress != "none":
            self._serve_compressed(req, started)
            return
        if req.op is Op.MEAN and self.compress != "none":
            raise ValueError(
                f"compress={self.compress!r} compresses EASGD's sums of elastic differences; "
                "the means of all-reduce SGD and local SGD are not compressed: use "
                "compress='none' with them"
            )
        check: _Check | None = None
        if self.check_steps and req.tail:
            # The counters ride in the payload's reserved tail: the same collective.
            if req.tail != self.reserve(req.payload.dtype):
                raise ValueError(
                    f"the request reserves {req.tail} elements; this transport needs "
                    f"{self.reserve(req.payload.dtype)} (Worker(reserve=transport.reserve(dtype)))"
                )
            counters = self._tail_counters(req.payload, req.tail)
            counters.write(self.rank, req.step, finishing=False)
            check = _Check(None, counters)
            self._sum_like = req.payload
        elif self.check_steps:
            check = self._start_check(req.step, finishing=False)
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
            if check is None or check.work is None:
                dist.all_reduce(req.payload, op=dist.ReduceOp.SUM, group=self.group)
                if check is not None:
                    check.verify()
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

    def _serve_compressed(self, req: Request, started: float) -> None:
        # Phase 1 (the all-to-all) completes here, on every rank at the same exchange; only
        # phase 2 (the all-gather) overlaps the next local steps, so that waiting for it
        # stays local (one rank may settle alone: a snapshot, ``center``), as for the sum.
        check = self._start_check(req.step, finishing=False) if self.check_steps else None
        work, cs = self._start_compressed(req)
        if check is not None:
            check.verify()  # a peer out of step raises here, not in the all-to-all
        work.wait()
        own = cs.reduce_owned()
        gather = dist.all_gather_single(cs.gathered, own, group=self.group, async_op=True)
        pending = _CompressedWork(gather, cs, req.payload)
        self.traffic.exchanges += 1
        if self.overlap:
            key = req.payload.data_ptr()
            if key in self._in_flight:
                raise RuntimeError("a SUM on this buffer is already in flight: WAIT for it first")
            self._in_flight[key] = (pending, time.perf_counter() - started, None)
            req.deferred = True
            return
        pending.wait()
        self.traffic.last_exchange_seconds = time.perf_counter() - started

    def _wait(self, payload: Tensor) -> None:
        entry = self._in_flight.pop(payload.data_ptr(), None)
        if entry is None:
            raise RuntimeError("WAIT for a buffer with no SUM in flight")
        work, start_seconds, check = entry
        started = time.perf_counter()
        if check is not None and check.work is not None:
            check.verify()  # a separate collective: its counters before the data
        work.wait()
        if check is not None and check.work is None:
            check.verify()  # counters in the payload's tail
        self.traffic.last_exchange_seconds = start_seconds + time.perf_counter() - started

    def _tail_counters(self, payload: Tensor, tail: int) -> _Counters:
        """The counters in ``payload``'s reserved tail (one object per buffer, reused)."""
        key = (payload.data_ptr(), payload.numel(), tail)
        counters = self._tails.get(key)
        if counters is None:
            counters = self._tails[key] = _Counters(payload[-tail:], self.world)
        return counters

    def reserve(self, dtype: torch.dtype) -> int:
        """How many trailing elements of an EASGD sum buffer the step counters need.

        None when compressing: the counters then travel in their own small collective.
        """
        if not self.check_steps or self.compress != "none":
            return 0
        return _Counters.size(dtype, self.world)

    def _compressed_sum(self, payload: Tensor) -> CompressedSum:
        key = (payload.numel(), payload.dtype)
        if key not in self._sums:
            if payload.device.type != "cpu":
                raise ValueError(
                    f"compress={self.compress!r} runs its two-phase sum on CPU tensors "
                    f"(gloo); this payload is on {payload.device}: use compress='none' "
                    "with NCCL"
                )
            self._sums[key] = CompressedSum(self.codec, payload.numel(), self.world,
                                            payload.dtype)  # fmt: skip
        return self._sums[key]

    def _start_compressed(self, req: Request) -> tuple[Any, CompressedSum]:
        """Phase 1 of a compressed sum (the all-to-all), started; see CompressedSum."""
        cs = self._compressed_sum(req.payload)
        packed = cs.encode_local(req.payload)
        work = dist.all_to_all_single(cs.parts, packed, group=self.group, async_op=True)
        moved = 2 * (self.world - 1) * cs.shard_bytes  # the all-to-all, then the all-gather
        self.traffic.bytes_sent += moved
        self.traffic.bytes_received += moved
        return work, cs

    def _start_check(self, step: int, *, finishing: bool) -> _Check:
        slots = torch.zeros(_Counters.size(torch.float64, self.world), dtype=torch.float64)
        counters = _Counters(slots, self.world)
        counters.write(self.rank, step, finishing=finishing)
        work = dist.all_reduce(slots, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        moved = 2 * (self.world - 1) * slots.numel() * 8 // max(self.world, 1)
        self.traffic.bytes_sent += moved
        self.traffic.bytes_received += moved
        return _Check(work, counters)

    def finish_check(self, step: int) -> None:
        """End of training, on every rank: check that every rank finishes at ``step`` too.

        It has the shape of this rank's exchanges (an EASGD sum with its counters, or the
        small counter collective), so it pairs with a peer's next exchange if that peer is
        still training (the peer then raises there too): a rank that took fewer steps is an
        error on both sides, not a hang. Call it after every exchange has completed.
        """
        if not self.check_steps:
            return
        like = self._sum_like
        if like is None:
            self._start_check(step, finishing=True).verify()
            return
        final = torch.zeros_like(like)
        counters = _Counters(final[-self.reserve(like.dtype) :], self.world)
        counters.write(self.rank, step, finishing=True)
        dist.all_reduce(final, op=dist.ReduceOp.SUM, group=self.group)
        _Check(None, counters).verify()

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
            if check is not None and check.work is not None:
                check.verify()
            work.wait()
            if check is not None and check.work is None:
                check.verify()
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


#: Step counters are exact below 2**_COUNTER_BITS (written in digits the dtype holds exactly).
_COUNTER_BITS = 40


class _Counters:
    """Every rank's step counter and finishing flag, in ``p * (digits + 1)`` elements.

    Rank r writes only its own block (the others are zero), so the all-reduced sum holds
    every rank's values exactly, in any floating dtype: a counter is written as base
    ``2**bits`` digits, ``bits`` small enough for the dtype to hold each digit exactly.
    """

    def __init__(self, slots: Tensor, world: int) -> None:
        self.slots, self.world = slots, world
        self.bits = self.digit_bits(slots.dtype)
        self.digits = math.ceil(_COUNTER_BITS / self.bits)
        # NumPy's view of the slots where it has the dtype: element writes without a tensor.
        plain = slots.device.type == "cpu" and slots.dtype is not torch.bfloat16
        self._view = slots.numpy() if plain else None

    @staticmethod
    def digit_bits(dtype: torch.dtype) -> int:
        mantissa = round(-math.log2(torch.finfo(dtype).eps))  # bf16 7, fp16 10, fp32 23
        return min(mantissa, 20)

    @classmethod
    def size(cls, dtype: torch.dtype, world: int) -> int:
        return world * (math.ceil(_COUNTER_BITS / cls.digit_bits(dtype)) + 1)

    def write(self, rank: int, step: int, *, finishing: bool) -> None:
        if not 0 <= step < 2**_COUNTER_BITS:
            raise ValueError(f"step counter {step} outside [0, 2**{_COUNTER_BITS})")
        mask = (1 << self.bits) - 1
        block = [float((step >> (self.bits * i)) & mask) for i in range(self.digits)]
        block.append(1.0 if finishing else 0.0)
        width = self.digits + 1
        view = self._view
        if view is not None:  # a few element writes, no tensor made (this is per exchange)
            view[:] = 0.0
            view[rank * width : (rank + 1) * width] = block
            return
        self.slots.zero_()
        values = torch.tensor(block, dtype=self.slots.dtype, device=self.slots.device)
        self.slots[rank * width : (rank + 1) * width].copy_(values)

    def read(self) -> tuple[list[int], list[bool]]:
        view = self._view
        values = view.tolist() if view is not None else self.slots.tolist()
        width = self.digits + 1
        steps, finishing = [], []
        for r in range(self.world):
            block = values[r * width : (r + 1) * width]
            steps.append(sum(round(d) << (self.bits * i) for i, d in enumerate(block[:-1])))
            finishing.append(block[-1] > 0.5)
        return steps, finishing


class _CompressedWork:
    """A compressed sum's all-gather in flight: ``wait()`` (local) decodes the sum."""

    def __init__(self, work: Any, cs: CompressedSum, payload: Tensor) -> None:
        self.work, self.cs, self.payload = work, cs, payload

    def wait(self) -> None:
        self.work.wait()
        self.cs.decode_all(self.payload)


class _Check:
    """The step counters of one exchange (see ``check_steps``).

    ``work`` is the separate counter collective in flight, or None when the counters ride
    in the payload's tail (read them once the payload's collective completed).
    """

    def __init__(self, work: Any, counters: _Counters) -> None:
        self.work, self.counters = work, counters

    def verify(self) -> None:
        if self.work is not None:
            self.work.wait()
        problem = _out_of_step(*self.counters.read())
        if problem is not None:
            raise OutOfStepError(problem)
