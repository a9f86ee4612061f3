"""Elastic averaging across groups: workers in a group (a node) average their gradients every
step, and each group exchanges elastically with the center as one worker.

``easgd train --group-size G`` makes P workers into P/G groups of G consecutive ranks. Inside
a group every step's gradient is all-reduced (mean) before the local step, as DDP does, so
the G ranks of a group hold the same x at every step: the group is one worker with a
G-times larger batch (held against :class:`easgd.sim.Grouped` by ``tests/test_groups.py``).
The update rules stay those of :mod:`easgd.algorithms`; the method sees ``P/G`` workers
(``TrainConfig.hyperparams``: ``p`` in ``alpha = beta/p`` and in the synchronous center
update is the number of groups).

The elastic exchange is done once per group, by its leader (its first rank), and its result
is broadcast within the group: synchronously an all-reduce of the elastic differences among
the leaders only, asynchronously one parameter-server session per group (the leader's).
Our choice, over every rank exchanging the same values: only one rank per node crosses the
slow link between nodes (1/G of the bytes), the server holds one session per group, and the
sum the leaders reduce is the one of a P/G-worker run, bitwise. The broadcast stays on the
fast link inside the node. Synchronously the exchange is overlapped with the next local
steps, as without groups: the leaders' all-reduce is in flight until the worker's ``WAIT``,
where the leader broadcasts the sum that the group's other ranks have been waiting for since
their ``SUM``, on a process group of its own (the gradient means go on meanwhile on the
group's other one). The asynchronous exchange blocks, unless overlapped (``--overlap K``):
then the leader's exchange goes out in the background and every rank of the group takes the
reply from the leader's broadcast at the worker's ``WAIT``, K steps later (the same step on
every rank: the lag is the rule's). With ``--compress`` the leader's
transport compresses (the leaders' two-phase compressed sum, or the leader's compressed
session with the server), and the broadcast carries the result in full precision: every rank
of the group holds what its leader holds, as without compression.

Failure behaviour:

* a rank of a group that dies makes its group's next collective fail: the group ends (its
  peers' errors name the collective); synchronous runs restart every rank together
  (``--max-restarts``), asynchronous ones refuse restarts with groups.
* the time budget is agreed within each group (and among the leaders, synchronously), so
  every rank of a group stops at the same step.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from easgd.algorithms import Mode, Op, Request
from easgd.comm.allreduce import AllReduceTransport, default_backend
from easgd.comm.base import Traffic, Transport

__all__ = ["GroupTransport", "group_gradient", "group_transport"]

GradFn = Callable[[Tensor, Tensor], float]


class GroupTransport(Transport):
    """One rank of a group: its leader's exchange with the center, shared in the group.

    Args:
        inner: the leader's transport to the center (the leaders' all-reduce group, or a
            parameter-server client); None on the other ranks of the group.
        intra: the group's own collectives (gradient means, votes, broadcasts of replies).
        sums: the group's process group for the broadcasts of overlapped sums (None: none).
        leader: the global rank of the group's leader.
        device: where the group's small tensors live (the device of its collectives).
        owns_group: ``close()`` destroys the default process group (this module made it).
    """

    def __init__(
        self,
        inner: Transport | None,
        intra: AllReduceTransport,
        *,
        mode: Mode,
        leader: int,
        sums: Any = None,
        device: torch.device | None = None,
        owns_group: bool = False,
    ) -> None:
        self.inner, self.intra, self.leader, self.sums = inner, intra, leader, sums
        self.group_mode = mode
        self.owns_group = owns_group
        self.traffic = Traffic()
        self._flag = torch.zeros(1, device=device)
        # payload data_ptr -> (payload, the non-leader's broadcast in flight, or None)
        self._in_flight: dict[int, tuple[Tensor, Any]] = {}
        # An overlapped elastic exchange (Worker(overlap=K)): the reply buffer that the
        # group's WAIT broadcasts from the leader, once the leader's exchange is answered.
        self._elastic: Request | None = None

    def _bcast(self, t: Tensor, group: Any = None) -> None:
        dist.broadcast(t, src=self.leader, group=self.intra.group if group is None else group)

    def _sum(self, req: Request) -> None:
        """Synchronous EASGD's sum: the leaders' all-reduce, in flight until ``WAIT``, where
        the leader broadcasts it to the group's other ranks, which wait for it from now."""
        key = req.payload.data_ptr()
        if key in self._in_flight:
            raise RuntimeError("a SUM on this buffer is already in flight: WAIT for it first")
        if self.inner is not None:
            self.inner.serve(req)
            if not req.deferred:  # a transport that does not overlap: the sum is here
                self._bcast(req.payload, self.sums)
                return
            self._in_flight[key] = (req.payload, None)
            return
        work = dist.broadcast(req.payload, src=self.leader, group=self.sums, async_op=True)
        self._in_flight[key] = (req.payload, work)
        req.deferred = True

    def _wait(self, payload: Tensor) -> None:
        """Complete an overlapped sum: the leader's all-reduce and broadcast, or the receipt."""
        entry = self._in_flight.pop(payload.data_ptr(), None)
        if entry is None:
            raise RuntimeError("WAIT for a buffer with no SUM in flight")
        if self.inner is not None:
            self.inner.serve(Request(Op.WAIT, payload))
            self._bcast(payload, self.sums)
        else:
            entry[1].wait()

    def _count(self) -> None:
        """The traffic of this rank: its exchanges, the leader's link, the group's collectives."""
        outer = self.inner.traffic if self.inner is not None else Traffic()
        self.traffic.bytes_sent = outer.bytes_sent + self.intra.traffic.bytes_sent
        self.traffic.bytes_received = outer.bytes_received + self.intra.traffic.bytes_received

    def start(self, x: Tensor) -> None:
        """The leaders meet the center (broadcast or pull), then every group takes its leader's."""
        if self.inner is not None:
            self.inner.start(x)
        self.intra.start(x)

    def gradient(self, grad_fn: GradFn) -> GradFn:
        """``grad_fn`` followed by the group's mean of the gradient (the local loss is kept)."""

        def fn(x: Tensor, out: Tensor) -> float:
            loss = grad_fn(x, out)
            self.intra.serve(Request(Op.MEAN, out))
            return loss

        return fn

    def serve(self, req: Request) -> None:
        started = time.perf_counter()
        if req.op is Op.WAIT and self._elastic is not None:
            flying, self._elastic = self._elastic, None
            assert flying.reply is not None
            if self.inner is not None and flying.deferred:
                self.inner.serve(Request(Op.WAIT, flying.reply))
            self._bcast(flying.reply)  # every rank of the group waits here, at the same step
            self.traffic.last_exchange_seconds = time.perf_counter() - started
            self._count()
            return
        if req.op is Op.WAIT:
            self._wait(req.payload)
            self.traffic.last_exchange_seconds = time.perf_counter() - started
            self._count()
            return
        if req.op is Op.SUM:
            self._sum(req)
        elif req.op is Op.ELASTIC and req.deferrable:  # overlapped: the reply at the WAIT
            assert req.reply is not None
            if self.inner is not None:
                self.inner.serve(req)
            self._elastic = Request(req.op, req.payload, req.reply, deferred=req.deferred)
            req.deferred = True  # on every rank: each waits for the leader's broadcast
        elif req.op is Op.ELASTIC:  # asynchronous: the leader's d = alpha*(x - c)
            assert req.reply is not None
            if self.inner is not None:
                self.inner.serve(req)
            self._bcast(req.reply)
        else:
            raise ValueError(
                f"a group of workers exchanges elastically; it does not serve {req.op.value!r} "
                "requests (use --method easgd or eamsgd with --group-size)"
            )
        self.traffic.exchanges += 1
        self.traffic.last_exchange_seconds = time.perf_counter() - started
        self._count()

    def stop_vote(self, over: bool) -> bool:
        """Stop when any rank of any group is over: the group's vote, the leaders', shared."""
        self._flag.fill_(1.0 if over else 0.0)
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.intra.group)
        stop = bool(self._flag.item() > 0)
        if self.inner is not None:
            stop = self.inner.stop_vote(stop)
        self._flag.fill_(1.0 if stop else 0.0)
        self._bcast(self._flag)
        return bool(self._flag.item() > 0)

    def settle(self) -> None:
        for payload, _ in list(self._in_flight.values()):
            self._wait(payload)
        if self.inner is not None:
            self.inner.settle()
        self.intra.settle()

    def close(self, *, clean: bool = True) -> None:
        if self.inner is not None:
            self.inner.close(clean=clean)
        if not clean:
            return
        self.intra.close()
        if self.owns_group:
            dist.destroy_process_group()

    @property
    def mode(self) -> Mode:  # type: ignore[override]
        return self.group_mode


def group_gradient(transport: Transport, grad_fn: GradFn) -> GradFn:
    """``grad_fn``, averaged over the group when ``transport`` is a group's (else as is)."""
    return transport.gradient(grad_fn) if isinstance(transport, GroupTransport) else grad_fn


def group_transport(
    *,
    mode: Mode,
    group_size: int,
    workers: int,
    index: int,
    device: torch.device,
    store: Any,
    timeout: float,
    make_inner: Callable[[Any], Transport],
) -> Transport:
    """The transport of worker ``index``: ``make_inner(group)`` alone when ``group_size`` is
    1, else a :class:`GroupTransport` over groups of ``group_size`` consecutive workers.

    ``make_inner(group)`` opens the leader's transport to the center: synchronously over
    ``group`` (the leaders' process group), asynchronously a parameter-server client.
    Synchronous workers join the default process group from ``env://`` (every rank trains);
    asynchronous ones make one among the workers over ``store`` (the servers are no part
    of it).
    """
    if group_size == 1:
        return make_inner(None)
    owns = not dist.is_initialized()
    if owns:
        backend = default_backend(device)
        span = datetime.timedelta(seconds=timeout)
        if mode is Mode.SYNC:
            dist.init_process_group(backend, timeout=span)
        else:
            dist.init_process_group(
                backend, store=dist.PrefixStore("easgd/groups/", store), rank=index,
                world_size=workers, timeout=span,
            )  # fmt: skip
    span = datetime.timedelta(seconds=timeout)
    first = index - index % group_size
    intra: Any = None
    sums: Any = None
    for start in range(0, workers, group_size):  # every rank makes every group, in order
        ranks = list(range(start, start + group_size))
        made = dist.new_group(ranks, timeout=span)
        made_sums = dist.new_group(ranks, timeout=span) if mode is Mode.SYNC else None
        if start == first:
            intra, sums = made, made_sums
    leaders = None
    if mode is Mode.SYNC:
        leaders = dist.new_group(list(range(0, workers, group_size)), timeout=span)
    inner = make_inner(leaders) if index == first else None
    return GroupTransport(
        inner, AllReduceTransport(intra, overlap=False), mode=mode, leader=first, sums=sums,
        device=device, owns_group=owns,
    )  # fmt: skip
