"""Synchronous methods over ``torch.distributed`` collectives: no server.

Every rank holds an identical copy of the center (synchronous EASGD) or of the model
(all-reduce SGD, local SGD). Each exchange is ONE flat ``all_reduce`` of a preallocated
buffer: the sum of the elastic differences (EASGD, from which every rank applies the same
center update), the mean gradient (all-reduce SGD, as DDP does), or the mean parameters
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
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.exchanges = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.last_exchange_seconds = 0.0

    def serve(self, req: Request) -> None:
        if req.op not in (Op.SUM, Op.MEAN):
            raise ValueError(
                f"{req.op.value!r} needs a parameter server; the synchronous runtime serves "
                "only collectives (sum, mean)"
            )
        started = time.perf_counter()
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
