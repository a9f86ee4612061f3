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
"""

from __future__ import annotations

import datetime
import logging
import time
from typing import Any

import torch
import torch.distributed as dist

from easgd.algorithms import Op, Request

__all__ = ["AllReduceTransport", "default_backend", "init_group"]

log = logging.getLogger(__name__)


def default_backend(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_group(backend: str, *, timeout: float = 120.0) -> None:
    """Join the default process group from the ``env://`` variables (torchrun's or ours)."""
    if dist.is_initialized():
        return
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))


class AllReduceTransport:
    """Fulfils the synchronous requests of :class:`easgd.algorithms.Worker` with collectives.

    Args:
        group: the process group (default: the default group), as in PyTorch's
            model-averaging utilities.
        overlap: start EASGD's ``SUM`` as an asynchronous all-reduce and let the worker go
            on with its next local steps; the worker yields ``WAIT`` before it reads the sum
            (at its next exchange, or when it settles). Exact: the local steps in between
            use only the worker's own difference, never the sum. ``MEAN`` (all-reduce SGD's
            gradients, local SGD's parameters) is needed at once and always blocks.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *, overlap: bool = True) -> None:
        self.group = group
        self.overlap = overlap
        self.world = dist.get_world_size(group)
        self.exchanges = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        #: Seconds the caller was blocked by its last exchange (start + wait when deferred).
        self.last_exchange_seconds = 0.0
        self._in_flight: dict[int, tuple[Any, float]] = {}  # payload data_ptr -> (work, s)

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
        if req.op is Op.SUM and self.overlap:
            key = req.payload.data_ptr()
            if key in self._in_flight:
                raise RuntimeError("a SUM on this buffer is already in flight: WAIT for it first")
            work = dist.all_reduce(
                req.payload, op=dist.ReduceOp.SUM, group=self.group, async_op=True
            )
            self._in_flight[key] = (work, time.perf_counter() - started)
            req.deferred = True
        else:
            dist.all_reduce(req.payload, op=dist.ReduceOp.SUM, group=self.group)
            if req.op is Op.MEAN:
                req.payload.div_(self.world)
            self.last_exchange_seconds = time.perf_counter() - started
        self.exchanges += 1
        # A ring all-reduce sends and receives 2(p-1)/p of the buffer per rank.
        nbytes = req.payload.numel() * req.payload.element_size()
        moved = 2 * (self.world - 1) * nbytes // max(self.world, 1)
        self.bytes_sent += moved
        self.bytes_received += moved

    def _wait(self, payload: torch.Tensor) -> None:
        entry = self._in_flight.pop(payload.data_ptr(), None)
        if entry is None:
            raise RuntimeError("WAIT for a buffer with no SUM in flight")
        work, start_seconds = entry
        started = time.perf_counter()
        work.wait()
        self.last_exchange_seconds = start_seconds + time.perf_counter() - started
