"""CUDA workers and a CPU parameter server: requests staged through pinned host memory.

The parameter server keeps the center on the CPU (our choice: paper-spec only says a
centralized parameter server; CPU memory is the larger and cheaper) and its wire
format is raw host bytes; a worker whose parameters live on a GPU copies each payload into
a pinned host buffer, exchanges it, and copies the reply back without blocking the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

from easgd.algorithms import Op, Request
from easgd.comm.base import Traffic, Transport

__all__ = ["Staged"]


class Staged(Transport):
    """Wraps a host-memory transport for a worker on ``device`` (a no-op on the CPU)."""

    def __init__(self, inner: Transport, device: torch.device) -> None:
        self.inner = inner
        self.device = device
        self.mode = inner.mode  # type: ignore[misc]
        self.traffic: Traffic = inner.traffic  # the inner transport's counters, shared
        self._buffers: dict[int, tuple[Tensor, Tensor]] = {}  # payload data_ptr -> host pair
        self._flying: tuple[Tensor, Tensor] | None = None  # a deferred reply: (device, host)

    def _host(self, like: Tensor) -> tuple[Tensor, Tensor]:
        key = like.data_ptr()
        if key not in self._buffers:
            pinned = self.device.type == "cuda"
            pay = torch.empty(like.shape, dtype=like.dtype, pin_memory=pinned)
            self._buffers[key] = (pay, torch.empty_like(pay))
        return self._buffers[key]

    def start(self, x: Tensor) -> None:
        if x.device.type == "cpu":
            self.inner.start(x)
            return
        host, _ = self._host(x)
        self.inner.start(host)
        x.copy_(host)

    def serve(self, request: Request) -> None:
        if request.payload.device.type == "cpu":
            self.inner.serve(request)
            return
        if request.op is Op.WAIT:  # an overlapped exchange's reply: into the worker's buffer
            flying, self._flying = self._flying, None
            self.inner.serve(Request(Op.WAIT, request.payload))
            if flying is not None:
                reply, host = flying
                reply.copy_(host, non_blocking=True)
            return
        pay, rep = self._host(request.payload)
        pay.copy_(request.payload)
        staged = Request(request.op, pay, rep if request.reply is not None else None,
                         step=request.step, deferrable=request.deferrable)  # fmt: skip
        self.inner.serve(staged)
        if staged.deferred:  # the reply lands in rep later: copied at the WAIT
            assert request.reply is not None
            request.deferred = True
            self._flying = (request.reply, rep)
        elif request.reply is not None:
            request.reply.copy_(rep, non_blocking=True)
        else:
            request.payload.copy_(pay, non_blocking=True)

    def settle(self) -> None:
        self.inner.settle()

    def stop_vote(self, over: bool) -> bool:
        return self.inner.stop_vote(over)

    def close(self, *, clean: bool = True) -> None:
        self.inner.close(clean=clean)

    def __getattr__(self, name: str) -> object:
        # Everything else (server_hp, pull, session ids...) is the inner transport's.
        return getattr(self.inner, name)
