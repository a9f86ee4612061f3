"""The one interface every transport implements, and the factory that picks one.

A transport fulfils the exchange requests of :class:`easgd.algorithms.Worker` (the
``serve`` callable of :func:`easgd.algorithms.drive`). Three exist:

* :class:`easgd.comm.allreduce.AllReduceTransport`, synchronous: collectives over
  ``torch.distributed`` (gloo on CPU, NCCL on GPU);
* :class:`easgd.comm.ps_client.PSClient`, asynchronous: the parameter server over TCP;
* :class:`LocalTransport`, sequential: serves nothing (a sequential method never asks).

CUDA workers talking to a CPU server go through :class:`easgd.comm.staging.Staged`
(pinned host buffers); :func:`make_transport` adds it where it is needed.

Lifecycle: ``start(x)`` makes ``x`` the center (pulled from the servers, or broadcast from
rank 0), ``serve`` answers requests, ``settle`` completes anything still in flight,
``close(clean=True)`` ends (a goodbye to the servers, a barrier for the group);
``close(clean=False)`` ends after an error without waiting for anyone.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar

import torch
from torch import Tensor

from easgd.algorithms import Mode, Request

__all__ = ["LocalTransport", "Traffic", "Transport", "make_transport"]


@dataclass
class Traffic:
    """What a transport moved: the counters every exchange event carries."""

    exchanges: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    #: Seconds the caller was blocked by its last exchange.
    last_exchange_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Transport(abc.ABC):
    """Fulfils a worker's exchange requests (see the module docstring)."""

    #: The worker mode this transport serves.
    mode: ClassVar[Mode]
    traffic: Traffic

    @abc.abstractmethod
    def start(self, x: Tensor) -> None:
        """Begin: ``x`` becomes the center every worker starts from."""

    @abc.abstractmethod
    def serve(self, request: Request) -> None:
        """Fulfil one request in place (``request.reply``, or ``request.payload``)."""

    def settle(self) -> None:  # noqa: B027 - a no-op unless something can be in flight
        """Complete everything this transport still has in flight."""

    def stop_vote(self, over: bool) -> bool:
        """Whether to stop on a time budget, given whether this process's budget is ``over``.

        Synchronous ranks must stop at the same step: the all-reduce transport agrees on it
        with a non-blocking vote (one call late). Everyone else stops when it is over.
        """
        return over

    @abc.abstractmethod
    def close(self, *, clean: bool = True) -> None:
        """End: ``clean`` waits for the others (goodbye, barrier); else just let go."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(clean=exc_type is None)


class LocalTransport(Transport):
    """The transport of a sequential method: there is no one to exchange with."""

    mode = Mode.SEQUENTIAL

    def __init__(self) -> None:
        self.traffic = Traffic()

    def start(self, x: Tensor) -> None:
        pass

    def serve(self, request: Request) -> None:
        raise RuntimeError(f"a sequential method made a {request.op.value!r} request")

    def close(self, *, clean: bool = True) -> None:
        pass


def make_transport(
    mode: Mode,
    *,
    device: torch.device | None = None,
    numel: int = 0,
    addresses: list[tuple[str, int]] | None = None,
    worker_id: int = 0,
    secret: bytes | None = None,
    timeout: float = 60.0,
    group: Any = None,
    reconnect_timeout: float = 0.0,
    resolve: Callable[[int], tuple[str, int]] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    tls: Any = None,
    compress: str = "none",
) -> Transport:
    """The transport of ``mode``: a parameter-server client, an all-reduce group, or none.

    Asynchronous: ``addresses`` of the servers (in shard order), ``numel`` of the flat
    vector, ``worker_id``, ``secret`` and ``timeout``; with ``reconnect_timeout`` > 0 a lost
    shard is dialled again (at the address ``resolve(shard)`` gives) and sent the updates
    its restarted server lacks, reporting ``server_lost``/``server_back`` to ``on_event``;
    ``tls``: an ``ssl.SSLContext`` for servers that speak TLS
    (:func:`easgd.comm.wire.client_tls_context`).
    ``compress``: EASGD's exchanges compressed (synchronous: :class:`AllReduceTransport`;
    asynchronous: both directions of every elastic exchange, :class:`PSClient`).
    Synchronous: joins the default process group from the ``env://`` variables
    (``timeout``; gloo, or NCCL for a CUDA ``device``) unless ``group`` is given.
    CUDA workers of a CPU server are staged through pinned memory.
    """
    device = device or torch.device("cpu")
    if mode is Mode.ASYNC:
        from easgd.comm.ps_client import PSClient
        from easgd.comm.staging import Staged

        if not addresses:
            raise ValueError("an asynchronous transport needs the servers' addresses")
        client = PSClient(
            addresses, numel, worker_id=worker_id, secret=secret, timeout=timeout,
            reconnect_timeout=reconnect_timeout, resolve=resolve, on_event=on_event, tls=tls,
            compress=compress,
        )  # fmt: skip
        return Staged(client, device) if device.type == "cuda" else client
    if mode is Mode.SYNC:
        from torch.distributed import is_initialized

        from easgd.comm.allreduce import AllReduceTransport, default_backend, init_group

        owns = group is None and not is_initialized()
        if group is None:
            init_group(default_backend(device), timeout=timeout)
        return AllReduceTransport(group, owns_group=owns, compress=compress)
    return LocalTransport()
