"""The worker's side of the asynchronous parameter server (see :mod:`easgd.comm.ps`).

:class:`PSClient` is the asynchronous :class:`easgd.comm.base.Transport`: it holds one TCP
connection per server shard and fulfils the exchange requests of
:class:`easgd.algorithms.Worker`; payloads go out of and replies come back into the
caller's own tensors, without copies. A background thread pings the servers while the
trainer computes, so a long local phase is not mistaken for a dead worker. Every failure of
a server becomes a :class:`PSConnectionError` naming its address; after any error the
client is closed. With a shared secret every frame is authenticated both ways
(:mod:`easgd.comm.wire`): a reply altered, replayed or dropped in transit is an
:class:`easgd.comm.wire.IntegrityError` (within a ``PSConnectionError``), never used.
:func:`send_control` sends one CONTROL message (the launcher's, at the end of a run).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NoReturn

import torch
from torch import Tensor

from easgd.algorithms import (
    Hyperparams,
    Mode,
    Op,
    Request,
    compressed_elastic_receive_,
    compressed_elastic_send_,
    contribution,
)
from easgd.comm.base import Traffic, Transport
from easgd.comm.shm import SHM_MIN, Segment, ShmUnavailable, is_loopback, resolve_shm
from easgd.comm.wire import (
    BYE_DONE,
    CMD_OP,
    COMPRESS_CODES,
    COMPRESS_SHIFT,
    DEFAULT_HEARTBEAT,
    DEFAULT_TIMEOUT,
    ERRORS,
    JOIN_RECOVER,
    OP_CMD,
    SHM_CONFIRM,
    SHM_DECLINE,
    AuthenticationError,
    Channel,
    Cmd,
    DeclaredDeadError,
    Header,
    IntegrityError,
    PeerClosedError,
    client_handshake,
    configure_socket,
    dtype_code,
    pack_json,
    resolve_secret,
    shard_ranges,
    tensor_bytes,
)
from easgd.compress import codec, padded

__all__ = [
    "DEFAULT_HEARTBEAT",
    "DEFAULT_TIMEOUT",
    "PSClient",
    "PSConnectionError",
    "send_control",
]

logger = logging.getLogger(__name__)


class PSConnectionError(ConnectionError):
    """A parameter server is gone (dead, hung or unreachable); ``address`` names it."""

    def __init__(self, message: str, address: tuple[str, int]) -> None:
        super().__init__(message)
        self.address = address


class _Conn:
    """The client's connection to one server."""

    def __init__(
        self,
        address: tuple[str, int],
        secret: bytes | None,
        heartbeat: float,
        timeout: float,
        connect_timeout: float,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.address = (str(address[0]), int(address[1]))
        self.where = f"parameter server {self.address[0]}:{self.address[1]}"
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                sock = socket.create_connection(self.address, timeout=timeout)
                break
            except ConnectionRefusedError as exc:
                if time.monotonic() >= deadline:
                    raise PSConnectionError(
                        f"cannot reach {self.where}: connection refused; is it running?",
                        self.address,
                    ) from exc
                time.sleep(0.1)
            except OSError as exc:
                raise PSConnectionError(f"cannot reach {self.where}: {exc}", self.address) from exc
        try:
            configure_socket(sock)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=self.address[0])
            self.chan: Channel = client_handshake(sock, secret, heartbeat, self.where)
        except AuthenticationError:
            sock.close()
            raise
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise AuthenticationError(
                f"{self.where} did not present a certificate this client trusts: {exc}"
            ) from exc
        except (OSError, ConnectionError) as exc:
            sock.close()
            hint = ""
            if tls is None and isinstance(exc, PeerClosedError | ConnectionResetError):
                hint = " (a server that speaks TLS closes a plain client's connection: tls=?)"
            raise PSConnectionError(
                f"handshake with {self.where} failed: {exc}{hint}", self.address
            ) from exc
        self.sock = sock
        self.session = 0
        self.t = 0
        # Recovery (wire.py): this worker's contributions by the checkpoint that will hold
        # them, [sum, count]; the exchanges the shard acknowledged; why it was lost.
        self.buckets: dict[int, list[Any]] = {}
        self.acked = 0
        self.pending, self.durable = 1, 0  # the shard's checkpoint numbers, last heard
        self.lost: PSConnectionError | None = None
        self.shm: bool | None = None  # bodies through shared memory (None: not asked yet)

    def carry_over(self, old: _Conn) -> None:
        """A reconnection keeps what the worker knows of its contributions."""
        self.buckets, self.acked = old.buckets, old.acked
        self.pending, self.durable = old.pending, old.durable


_PIECE = 1 << 18  # elements: a piece of a transfer that is still in cache when it is added


def _moved_adding(
    move: Callable[[memoryview], None],
    data: Tensor,
    total: Tensor,
    finish: Callable[[], None] | None = None,
) -> None:
    """Send or receive ``data`` piece by piece, adding each piece to ``total`` while it is
    still in cache (no extra pass over memory), then ``finish`` (the frame's tag); a
    transfer cut short, or a reply that fails its integrity check, takes its add back."""
    done = 0
    try:
        for s in range(0, data.numel(), _PIECE):
            e = min(data.numel(), s + _PIECE)
            move(tensor_bytes(data[s:e]))
            total[s:e].add_(data[s:e])
            done = e
        if finish is not None:
            finish()
    except BaseException:
        total[:done].sub_(data[:done])
        raise


class _Lost(PSConnectionError):
    """One shard's connection is gone and the client may reconnect to it."""

    def __init__(self, conn: _Conn, message: str) -> None:
        super().__init__(message, conn.address)
        self.conn = conn


class PSClient(Transport):
    """A worker's connection to the S parameter servers that hold the center's shards.

    ``start(x)`` (or ``join(x)``) opens a session on every server and pulls the center into
    ``x``; ``serve`` is the ``serve`` callable of :func:`easgd.algorithms.run_step`: it
    fulfils ``Op.ELASTIC``, ``Op.PUSH_PULL`` and ``Op.GRAD_PULL`` over all shards, sending
    every shard's slice first and then receiving the replies, so the servers work in
    parallel. ``close()`` says goodbye (the servers record ``left``); ``close(clean=False)``
    just drops the connections (the servers record a death), as after a crash.
    Errors: :class:`PSConnectionError` when a server is gone, ``ValueError`` when a server
    refuses the input (another model size, dtype or method) or the servers disagree on the
    hyperparameters, :class:`AuthenticationError` for a wrong secret. After any of them the
    client is closed.

    Args:
        addresses: ``(host, port)`` of every server, in shard order.
        numel: size of the full flat parameter vector.
        worker_id: this worker's id (a restarted worker keeps its id, gets a new session).
        secret: shared secret (default ``EASGD_SECRET``); needed when the servers have one.
        timeout: seconds without progress before a server is declared gone (default 30).
        heartbeat: seconds between pings while idle (default 1; 0 disables them).
        connect_timeout: seconds to retry a refused connection while servers start
            (default 10).
        tls: a client TLS context (:func:`easgd.comm.wire.client_tls_context`) for servers
            that speak TLS (default None: plain TCP); the server's certificate is verified
            against the host name of its address.
        compress: ``"none"`` (default), ``"bf16"`` or ``"int8"``: elastic exchanges cross
            the wire compressed both ways (``Cmd.ELASTIC_PACKED``): this client and each
            server keep the same reference of the worker's x, the client sends
            ``encode(x - reference)`` and gets ``encode(d)`` back
            (:func:`easgd.algorithms.compressed_elastic_serve_`). With
            ``reconnect_timeout``, a restarted shard loses nothing here either: the
            contributions (the decoded ``d``, exactly what the center gained) are re-sent
            in full precision, and the reference restarts at the center of the new JOIN.
        shm: move the bodies through memory shared with a server on this host (reached
            over loopback, without TLS; :mod:`easgd.comm.shm`), asked for at each
            session's first large body (default ``EASGD_SHM``, else True). Where the
            server declines or the segment cannot be opened the session stays on TCP
            (a ``transport`` event and a log line say why).

    Overlapped exchanges: a request the worker marks ``deferrable`` (an elastic exchange of
    ``Worker(overlap=K)``, whose payload is the worker's own copy of x) is sent and answered
    on a background thread while the caller goes on computing; ``serve`` returns at once
    with ``request.deferred`` set, and the worker's ``WAIT`` blocks until the reply is in
    (``last_exchange_seconds`` is then the time it blocked; a failure of the exchange is
    raised there). The heartbeat is silent meanwhile: the exchange is the activity.

    Attributes:
        traffic: the counters for the metrics (:class:`easgd.comm.base.Traffic`; also as
            the properties ``exchanges``, ``bytes_sent``, ``bytes_received``,
            ``last_exchange_seconds``).
        server_hp: the servers' hyperparameters, after :meth:`join` (p, alpha, beta, tau).
        server_t: each server's clock after the last reply; join_t: at JOIN.

    Example:
        >>> with PSClient([("127.0.0.1", port)], x.numel(), worker_id=0) as client:
        ...     client.start(x)
        ...     run_step(worker, grad_fn, client.serve)
    """

    mode = Mode.ASYNC

    def __init__(
        self,
        addresses: Sequence[tuple[str, int]],
        numel: int,
        *,
        worker_id: int,
        secret: bytes | str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        heartbeat: float = DEFAULT_HEARTBEAT,
        connect_timeout: float = 10.0,
        reconnect_timeout: float = 0.0,
        resolve: Callable[[int], tuple[str, int]] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        tls: ssl.SSLContext | None = None,
        compress: str = "none",
        shm: bool | None = None,
    ) -> None:
        self.codec = codec(compress)
        self._shm = resolve_shm(shm)
        self._reference: Tensor | None = None  # what the servers reconstructed of x
        self._packed: list[tuple[Tensor, Tensor, Tensor]] = []  # per shard: in, out, scratch
        if not addresses:
            raise ValueError("addresses is empty; give the (host, port) of every server")
        if not timeout > 0:
            raise ValueError(f"timeout={timeout} must be > 0 seconds")
        if heartbeat < 0:
            raise ValueError(f"heartbeat={heartbeat} must be >= 0 seconds (0 disables it)")
        if reconnect_timeout < 0:
            raise ValueError(
                f"reconnect_timeout={reconnect_timeout} must be >= 0 seconds (0: a lost "
                "server is an error at once)"
            )
        self.reconnect_timeout = reconnect_timeout
        # Identifies this client's sessions across a server's restart (the server counts the
        # updates it applied per nonce, so a re-sent sum is matched to the right process).
        self.nonce = int.from_bytes(os.urandom(7), "little")
        self._resolve = resolve
        self._on_event = on_event
        self._connect_timeout = connect_timeout
        self._tls = tls
        self.ranges = shard_ranges(numel, len(addresses))
        self.numel = numel
        self.worker_id = worker_id
        self.timeout = timeout
        self.heartbeat = heartbeat
        self.traffic = Traffic()
        self.join_t: list[int] = []
        self._dtype: torch.dtype | None = None
        self._exchange_cmd: Cmd | None = None
        self._server_hp: Hyperparams | None = None
        self._broken: BaseException | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._io: ThreadPoolExecutor | None = None  # overlapped exchanges' thread
        self._flying: Future[None] | None = None
        self._last_io = time.monotonic()
        secret_b = self._secret = resolve_secret(secret)
        self._conns: list[_Conn] = []
        try:
            for i, address in enumerate(addresses):
                if resolve is not None and reconnect_timeout:
                    # A shard may restart before we first reach it: follow its address.
                    deadline = time.monotonic() + connect_timeout + reconnect_timeout
                    self._conns.append(self._dial(i, deadline, "joining", first=address))
                else:
                    self._conns.append(
                        _Conn(address, secret_b, heartbeat, timeout, connect_timeout, tls)
                    )
        except BaseException:
            self._close_sockets()
            raise
        self._hb_stop = threading.Event()
        self._hb_thread: threading.Thread | None = None
        if heartbeat > 0:
            self._hb_thread = threading.Thread(
                target=self._heartbeat_loop, name=f"ps-heartbeat-{worker_id}", daemon=True
            )
            self._hb_thread.start()

    @property
    def exchanges(self) -> int:
        return self.traffic.exchanges

    @property
    def bytes_sent(self) -> int:
        return self.traffic.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.traffic.bytes_received

    @property
    def last_exchange_seconds(self) -> float:
        return self.traffic.last_exchange_seconds

    @property
    def server_hp(self) -> Hyperparams:
        """The hyperparameters every server runs with (sent in the reply to JOIN)."""
        if self._server_hp is None:
            raise RuntimeError("server_hp is known after join(x)")
        return self._server_hp

    @property
    def server_t(self) -> list[int]:
        return [c.t for c in self._conns]

    @property
    def session_ids(self) -> list[int]:
        return [c.session for c in self._conns]

    # -- requests -------------------------------------------------------------------------

    def start(self, x: Tensor) -> None:
        """The :class:`Transport` start: :meth:`join`."""
        self.join(x)

    def join(self, x: Tensor) -> None:
        """Start a session on every server, pull the full center into ``x``, learn ``server_hp``."""
        self._check_vector("x", x)
        with self._lock:
            self._check_usable()
            if self._dtype is not None:
                raise RuntimeError("join() was already called; a new session needs a new client")
            code = dtype_code(x.dtype)
            flags = COMPRESS_CODES[self.codec.name] << COMPRESS_SHIFT
            for conn, (a, b) in zip(self._conns, self.ranges, strict=True):
                conn.session = self.nonce  # a JOIN's session field carries the client's nonce
                self._send(conn, Cmd.JOIN, None, dtype=code, numel=b - a, aux=a, flags=flags)
            hps = []
            for conn, (a, b) in zip(self._conns, self.ranges, strict=True):
                h = self._recv(conn, x[a:b], more=True)
                conn.session = h.session
                hps.append(self._recv_join_trailer(conn)[0])
            self.join_t = self.server_t
            self._dtype = x.dtype
            self._server_hp = self._agreed(hps)
            if self.codec.name != "none":
                if self._server_hp.spec.server_op is not Op.ELASTIC:
                    self._fail_value(
                        f"compress={self.codec.name!r}: the servers run "
                        f"{self._server_hp.method}, whose exchanges are not compressed"
                    )
                self._reference = x.detach().clone()  # the center each server also keeps
                for a, b in self.ranges:
                    n = padded(b - a, self.codec.align)
                    size = self.codec.packed_size(n, x.dtype)
                    self._packed.append((torch.zeros(size, dtype=torch.uint8),
                                         torch.zeros(size, dtype=torch.uint8),
                                         torch.zeros(n, dtype=x.dtype)))  # fmt: skip

    def _recv_join_trailer(self, conn: _Conn) -> tuple[Hyperparams, dict[str, Any]]:
        """The JSON trailer of a JOIN reply: the server's hyperparameters, and what a
        reconnecting worker needs (``restored_seq``, ``applied``)."""
        before = conn.chan.bytes_received
        try:
            trailer, _ = conn.chan.recv_json()  # ends the reply's frame: verified
        except (OSError, ConnectionError) as exc:
            self._fail_connection(conn, exc)
        self.traffic.bytes_received += conn.chan.bytes_received - before
        try:
            return Hyperparams.from_dict(trailer["hp"]), dict(trailer)
        except (KeyError, TypeError, ValueError) as exc:
            self._fail_value(f"{conn.where} sent hyperparameters this client cannot read: {exc}")

    def _agreed(self, hps: list[Hyperparams]) -> Hyperparams:
        """The one ``hp`` of all shards (a ValueError when they differ)."""
        first = hps[0].to_dict()
        for conn, hp in zip(self._conns[1:], hps[1:], strict=True):
            theirs = hp.to_dict()
            if theirs != first:
                diff = ", ".join(
                    f"{k}={first[k]!r} vs {theirs[k]!r}" for k in first if first[k] != theirs[k]
                )
                self._fail_value(
                    f"the parameter servers disagree on the hyperparameters ({diff} on "
                    f"{self._conns[0].where} and {conn.where}); start every server with one hp"
                )
        op = hps[0].spec.server_op
        if op is None:
            self._fail_value(f"the servers run {hps[0].method}, which has no server exchange")
        self._exchange_cmd = OP_CMD[op]
        return hps[0]

    def serve(self, request: Request) -> None:
        """Fulfil one exchange request of :class:`easgd.algorithms.Worker` on every shard
        (a ``deferrable`` one in the background: see Overlapped exchanges)."""
        if request.op is Op.WAIT:
            self._wait_flying()
            return
        if self._flying is not None:
            raise RuntimeError(
                f"a {request.op.value!r} request while an overlapped exchange is in flight: "
                "the worker must WAIT for its reply first (Worker(overlap=) does)"
            )
        cmd = OP_CMD.get(request.op)
        if cmd is None:
            raise ValueError(
                f"the parameter server does not serve {request.op.value!r} requests; "
                "synchronous methods use easgd.comm.allreduce"
            )
        if request.reply is None:
            raise ValueError(f"{request.op.value!r} request without a reply buffer")
        self._check_vector("payload", request.payload)
        self._check_vector("reply", request.reply)
        if request.deferrable:
            with self._lock:  # what can be refused is refused here, in the caller's thread
                self._check_joined(request.payload)
            if self._io is None:
                self._io = ThreadPoolExecutor(1, thread_name_prefix=f"ps-overlap-{self.worker_id}")
            request.deferred = True
            self._flying = self._io.submit(self._exchange, request, cmd, False)
            return
        self._exchange(request, cmd, True)

    def flush(self) -> None:
        """Block until the overlapped exchange in flight, if any, is answered (its reply is
        in the worker's buffer; the worker still applies it when it is due)."""
        self._wait_flying()

    def _wait_flying(self) -> None:
        """Block until the overlapped exchange in flight (if any) is answered."""
        flying, self._flying = self._flying, None
        if flying is None:
            return
        start = time.perf_counter()
        try:
            flying.result()
        finally:
            self.traffic.last_exchange_seconds = time.perf_counter() - start

    def _exchange(self, request: Request, cmd: Cmd, timed: bool) -> None:
        """One exchange on every shard (``timed``: the caller waits for it)."""
        assert request.reply is not None
        if self._reference is not None and request.op is Op.ELASTIC:
            self._serve_packed(request, timed)
            return
        with self._lock:
            self._check_joined(request.payload)
            if cmd != self._exchange_cmd:
                assert self._exchange_cmd is not None
                self._fail_value(
                    f"the servers answer {CMD_OP[self._exchange_cmd].value!r} exchanges, not "
                    f"{request.op.value!r}; do all workers and servers use the same method?"
                )
            start = time.perf_counter()
            lost: set[int] = set()
            # Recovery bookkeeping rides on the transfer: the contribution is added to its
            # sum piece by piece while each piece is still in cache (the payload as it is
            # sent, the reply as it arrives), so it costs no extra pass over memory.
            added = contribution(request) if self.reconnect_timeout else None
            on_send = added is not None and added is request.payload
            on_recv = added is not None and added is request.reply
            sent_seq: dict[int, int] = {}
            for i, (conn, (a, b)) in enumerate(zip(self._conns, self.ranges, strict=True)):
                try:
                    if conn.lost is not None:
                        raise _Lost(conn, str(conn.lost))
                    into = (
                        self._bucket(conn, conn.pending, conn.durable, b - a) if on_send else None
                    )
                    self._send(conn, cmd, request.payload[a:b], add_to=into)
                    if on_send:
                        sent_seq[i] = conn.pending
                except _Lost:
                    lost.add(i)
            for i, (conn, (a, b)) in enumerate(zip(self._conns, self.ranges, strict=True)):
                if i in lost:
                    continue
                try:
                    sink = None
                    if on_recv:
                        sink = lambda h, c=conn, n=b - a: self._bucket(c, h.pending, h.durable, n)  # noqa: E731
                    h = self._recv(conn, request.reply[a:b], add_to=sink)
                    self._account(conn, h, request, a, b, added_to=sent_seq.get(i, h.pending)
                                  if (on_send or on_recv) else None)  # fmt: skip
                except _Lost:
                    lost.add(i)
                    if i in sent_seq:  # sent, never acknowledged: the retry will count it
                        conn.buckets[sent_seq[i]][0].sub_(request.payload[a:b])
            for i in sorted(lost):  # only with reconnect_timeout > 0 (else _Lost is not raised)
                self._reconnect(i, cmd, request)
            if timed:
                self.traffic.last_exchange_seconds = time.perf_counter() - start
            self.traffic.exchanges += 1

    def _serve_packed(self, request: Request, timed: bool) -> None:
        """A compressed elastic exchange with every shard (see ``compress``); a lost shard
        is reached again as in :meth:`_exchange` (the reference restarts at its center)."""
        assert self._reference is not None and request.reply is not None
        with self._lock:
            self._check_joined(request.payload)
            start = time.perf_counter()
            lost: set[int] = set()
            for i, conn in enumerate(self._conns):
                try:
                    if conn.lost is not None:
                        raise _Lost(conn, str(conn.lost))
                    self._send_packed(i, request)
                except _Lost:
                    lost.add(i)
            for i in range(len(self._conns)):
                if i in lost:
                    continue
                try:
                    self._recv_packed(i, request)
                except _Lost:
                    lost.add(i)
            for i in sorted(lost):  # only with reconnect_timeout > 0 (else _Lost is not raised)
                self._reconnect(i, Cmd.ELASTIC_PACKED, request)
            if timed:
                self.traffic.last_exchange_seconds = time.perf_counter() - start
            self.traffic.exchanges += 1

    def _send_packed(self, i: int, request: Request) -> None:
        """Shard ``i``'s part of a compressed exchange: ``encode(x - reference)``."""
        assert self._reference is not None
        (a, b), (out, _, scratch) = self.ranges[i], self._packed[i]
        compressed_elastic_send_(request.payload[a:b], self._reference[a:b], self.codec,
                                 scratch, out)  # fmt: skip
        self._send(self._conns[i], Cmd.ELASTIC_PACKED, out)

    def _recv_packed(self, i: int, request: Request) -> None:
        """Shard ``i``'s reply ``encode(d)``: ``d`` into the reply, the reference moved by it,
        and the contribution remembered until it is durable (:meth:`_account`)."""
        assert self._reference is not None and request.reply is not None
        conn, (a, b), (_, back, scratch) = self._conns[i], self.ranges[i], self._packed[i]
        h = self._recv(conn, back)
        compressed_elastic_receive_(self._reference[a:b], back, request.reply[a:b], self.codec,
                                    scratch)  # fmt: skip
        self._account(conn, h, request, a, b, added_to=None)

    def _account(
        self, conn: _Conn, h: Header, request: Request, a: int, b: int, added_to: int | None
    ) -> None:
        """Remember this shard's part of an acknowledged contribution until it is durable.

        ``added_to``: the checkpoint whose sum the transfer already added it to (None: add
        it here). The reply says which checkpoint will hold it (``h.pending``); a payload
        added before a checkpoint began is moved to the right sum (once per checkpoint).
        """
        conn.acked += 1
        conn.pending, conn.durable = h.pending, h.durable
        added = contribution(request) if self.reconnect_timeout else None
        if added is None:
            return
        part = added[a:b]
        if added_to is None or added_to != h.pending:
            if added_to is not None and added_to in conn.buckets:
                conn.buckets[added_to][0].sub_(part)
            self._bucket(conn, h.pending, h.durable, b - a).add_(part)
        conn.buckets[h.pending][1] += 1

    def _bucket(self, conn: _Conn, seq: int, durable: int, size: int) -> Tensor:
        """The sum of this worker's contributions that checkpoint ``seq`` will hold.

        Sums are dropped once their checkpoint is durable, but for the newest durable one: a
        restart that finds that file damaged falls back to the one before it.
        """
        bucket = conn.buckets.get(seq)
        if bucket is None:
            done = sorted(s for s in conn.buckets if s < durable)
            reuse = conn.buckets.pop(done[0])[0].zero_() if done else None
            for s in done[1:]:
                del conn.buckets[s]
            dtype = self._dtype or torch.float32
            bucket = conn.buckets[seq] = [
                reuse if reuse is not None else torch.zeros(size, dtype=dtype),
                0,
            ]
        tensor: Tensor = bucket[0]
        return tensor

    def _reconnect(self, i: int, cmd: Cmd | None, request: Request | None) -> None:
        """Reach shard ``i`` again (its restarted server), re-send what it lacks, and finish
        the interrupted request on it; a PSConnectionError when it does not come back."""
        old = self._conns[i]
        a, b = self.ranges[i]
        began = time.monotonic()
        reason = str(old.lost) if old.lost is not None else "connection lost"
        self._emit("server_lost", shard=i, reason=reason)
        logger.warning("worker %d: %s; reconnecting for up to %g s", self.worker_id, reason,
                       self.reconnect_timeout)  # fmt: skip
        conn = self._dial(i, began + self.reconnect_timeout, reason)
        conn.carry_over(old)
        self._conns[i] = conn
        resent = lost = reply_lost = 0
        if self._dtype is not None:  # a worker: a new session, and its missing updates
            scratch = torch.empty(b - a, dtype=self._dtype)
            conn.session = self.nonce
            flags = JOIN_RECOVER | COMPRESS_CODES[self.codec.name] << COMPRESS_SHIFT
            self._send(conn, Cmd.JOIN, None, dtype=dtype_code(self._dtype), numel=b - a, aux=a,
                       flags=flags)  # fmt: skip
            conn.session = self._recv(conn, scratch, more=True).session
            hp, info = self._recv_join_trailer(conn)
            if hp.to_dict() != self.server_hp.to_dict():
                self._fail_value(f"{conn.where} came back with other hyperparameters")
            if self._reference is not None:
                # A compressed session's reference restarts, on both sides, at the center of
                # the JOIN reply (the server keeps no reference across a restart).
                self._reference[a:b].copy_(scratch)
            missing = conn.acked - int(info.get("applied", 0))
            if missing > 0:  # a restarted shard: its checkpoint lacks some of our updates
                resent = self._resend(conn, int(info.get("restored_seq", 0)), missing)
            lost, reply_lost = max(0, missing - resent), max(0, -missing)
            if lost:
                logger.warning("worker %d: shard %d restarted without %d of its updates "
                               "(%s keeps no sum of them)", self.worker_id, i, lost,
                               self.server_hp.method)  # fmt: skip
        if request is not None and cmd is not None:
            if reply_lost and request.reply is not None:
                # The interrupted exchange was applied (it is in the restored checkpoint)
                # but its reply is lost: count it once, and take no elastic pull from this
                # shard (a DOWNPOUR worker takes the center, as its reply would have been).
                logger.warning("worker %d: shard %d applied an update whose reply was lost",
                               self.worker_id, i)  # fmt: skip
                if contribution(request) is request.reply:
                    request.reply[a:b].zero_()
                else:
                    self._send(conn, Cmd.PULL, None, dtype=dtype_code(request.reply.dtype),
                               numel=b - a)  # fmt: skip
                    self._recv(conn, request.reply[a:b])
                conn.acked += 1
            elif cmd is Cmd.ELASTIC_PACKED:
                self._send_packed(i, request)
                self._recv_packed(i, request)
            else:
                self._send(conn, cmd, request.payload[a:b])
                h = self._recv(conn, request.reply[a:b] if request.reply is not None else None)
                if request.reply is not None:
                    self._account(conn, h, request, a, b, added_to=None)
        self._emit("server_back", shard=i, down_seconds=time.monotonic() - began,
                   resent=resent, lost=lost, reply_lost=reply_lost)  # fmt: skip

    def _dial(
        self, i: int, deadline: float, reason: str, first: tuple[str, int] | None = None
    ) -> _Conn:
        """Connect to shard ``i`` (its address as ``resolve`` says now), with backoff."""
        delay = 0.05
        while True:
            address = first if first is not None else self._conns[i].address
            try:
                if self._resolve is not None:
                    address = self._resolve(i)
                return _Conn(address, self._secret, self.heartbeat, self.timeout, 0.0, self._tls)
            except AuthenticationError:
                raise
            except (OSError, ConnectionError) as exc:
                if time.monotonic() + delay > deadline:
                    self._broken = PSConnectionError(
                        f"parameter server shard {i} did not come back within "
                        f"{self.reconnect_timeout:g} s ({reason}; last attempt: {exc})",
                        address,
                    )
                    self._close_sockets()
                    raise self._broken from exc
            if first is None:
                self._ping_others(i)  # the live shards must not take our wait for silence
            time.sleep(delay)
            delay = min(2.0, delay * 2)

    def _ping_others(self, i: int) -> None:
        """Heartbeats to every live shard but ``i`` (the heartbeat thread waits for our lock)."""
        if not self.heartbeat or time.monotonic() - self._last_io < self.heartbeat:
            return
        for j, conn in enumerate(self._conns):
            if j == i or conn.lost is not None:
                continue
            with contextlib.suppress(_Lost):
                self._send(conn, Cmd.PING, None)
                self._recv(conn, None)

    def _resend(self, conn: _Conn, restored_seq: int, missing: int) -> int:
        """RECOVER: the sum of this worker's contributions after ``restored_seq``.

        ``missing`` is how many of its acknowledged updates the shard lacks; the sums must
        account for exactly as many (else what cannot be re-sent is reported as lost).
        """
        keep = sorted(s for s in conn.buckets if s > restored_seq)
        if not self.server_hp.spec.recoverable or not keep:
            conn.buckets.clear()
            return 0
        total, count = conn.buckets[keep[0]]
        for s in keep[1:]:
            total.add_(conn.buckets[s][0])
            count += conn.buckets[s][1]
        if count != missing:
            logger.warning("worker %d: the shard lacks %d updates, the re-sent sums hold %d",
                           self.worker_id, missing, count)  # fmt: skip
        self._send(conn, Cmd.RECOVER, total, aux=count)
        h = self._recv(conn, None)
        # The re-sent sum now waits for the restarted shard's next checkpoint.
        conn.buckets = {h.pending: [total, count]}
        conn.pending, conn.durable = h.pending, h.durable
        return int(count)

    def pull(self, out: Tensor, *, evaluation: bool = False) -> None:
        """Copy the center (or, with ``evaluation``, the evaluated average) into ``out``.

        Needs no :meth:`join`: an evaluator pulls snapshots without being a worker.
        """
        self._check_vector("out", out)
        code = dtype_code(out.dtype)
        with self._lock:
            self._check_usable()
            if self._dtype is not None and out.dtype != self._dtype:
                raise ValueError(f"dtype {out.dtype}, the session was joined with {self._dtype}")
            for i, (a, b) in enumerate(self.ranges):
                for attempt in (0, 1):
                    try:
                        conn = self._conns[i]
                        if conn.lost is not None:
                            raise _Lost(conn, str(conn.lost))
                        self._send(conn, Cmd.PULL, None, dtype=code, numel=b - a,
                                   aux=int(evaluation))  # fmt: skip
                        self._recv(conn, out[a:b])
                        break
                    except _Lost:
                        if attempt:
                            raise
                        self._reconnect(i, None, None)

    def bye(self, *, done: bool = True) -> None:
        """End the sessions cleanly (recorded as a goodbye, not a death) and close.

        ``done``: this worker spent its budget (the BYE carries ``BYE_DONE``, so the servers
        count it as finished); ``done=False``: a worker that leaves before its end.
        """
        self.close(clean=True, done=done)

    def close(self, *, clean: bool = True, done: bool = True) -> None:
        """Close the connections. Idempotent.

        An overlapped exchange still in flight is waited for first; if it failed, the
        connections are dropped and its error is raised (never lost with the goodbye).
        ``clean``: say goodbye first, when joined and no server failed (the servers record
        ``left``; ``done`` as in :meth:`bye`: a worker's clean close at the end of its loop
        is its finish); ``clean=False`` just drops the connections (the servers record a
        death).
        """
        if clean:
            try:  # an overlapped exchange nobody waited for: its failure is not lost here
                self._wait_flying()
            except BaseException:
                self.close(clean=False, done=done)
                raise
            self._goodbye(done)
        self._closed = True
        if self._io is not None:
            self._io.shutdown(wait=False)
        if self._hb_thread is not None:
            self._hb_stop.set()
            if self._hb_thread is not threading.current_thread():
                self._hb_thread.join(timeout=self.timeout)
        with self._lock:
            self._close_sockets()

    def __enter__(self) -> PSClient:
        # Leaving the block closes it: clean (a goodbye) unless an exception escapes,
        # which is a crash and is recorded as one (Transport.__exit__).
        return self

    # -- internals ------------------------------------------------------------------------

    def _goodbye(self, done: bool) -> None:
        with self._lock:
            if self._broken is not None or self._closed or self._dtype is None:
                return
            try:
                live = [c for c in self._conns if c.lost is None]
                for conn in live:
                    self._send(conn, Cmd.BYE, None, flags=BYE_DONE if done else 0)
                for conn in live:
                    self._recv(conn, None)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                logger.warning("worker %d: goodbye failed: %s", self.worker_id, exc)

    def _check_vector(self, name: str, t: Tensor) -> None:
        if t.dim() != 1 or t.numel() != self.numel:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, the client was built for a flat vector of "
                f"{self.numel} elements; do all workers build the same model?"
            )

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise self._broken
        if self._closed:
            raise RuntimeError("the parameter-server client is closed")

    def _check_joined(self, t: Tensor) -> None:
        self._check_usable()
        if self._dtype is None:
            raise RuntimeError("call join(x) before exchanging with the parameter server")
        if t.dtype != self._dtype:
            raise ValueError(f"dtype {t.dtype}, the session was joined with {self._dtype}")

    def _fail_value(self, message: str) -> NoReturn:
        self._broken = ValueError(message)
        self._close_sockets()
        raise self._broken

    def _send(
        self,
        conn: _Conn,
        cmd: Cmd,
        payload: Tensor | None,
        add_to: Tensor | None = None,
        **fields: Any,
    ) -> None:
        if conn.shm is None and payload is not None and payload.nbytes >= SHM_MIN:
            self._share(conn)
        chan = conn.chan
        before = chan.bytes_sent
        try:
            if payload is None:
                chan.send_header(cmd, worker_id=self.worker_id, session=conn.session, **fields)
            else:
                chan.send_header(cmd, dtype=dtype_code(payload.dtype), worker_id=self.worker_id,
                                 session=conn.session, numel=payload.numel(),
                                 **fields)  # fmt: skip
                if add_to is None:
                    chan.send_body(tensor_bytes(payload))
                    chan.end_send()
                else:  # a request cut short is not applied: _moved_adding undoes its add
                    _moved_adding(chan.send_body, payload, add_to, finish=chan.end_send)
        except (OSError, ConnectionError) as exc:
            # A refused payload is answered with an error before the server closes.
            with contextlib.suppress(OSError, ConnectionError):
                self._recv(conn, None, timeout=0.5)
            self._fail_connection(conn, exc)
        finally:
            self.traffic.bytes_sent += chan.bytes_sent - before
        self._last_io = time.monotonic()

    def _recv(
        self,
        conn: _Conn,
        into: Tensor | None,
        timeout: float | None = None,
        add_to: Callable[[Header], Tensor] | None = None,
        more: bool = False,
    ) -> Header:
        """The next reply, into ``into``, verified (``more``: the frame's body goes on, the
        JOIN reply's JSON: the caller ends it with ``conn.chan.recv_json()``)."""
        chan = conn.chan
        before = chan.bytes_received
        try:
            conn.sock.settimeout(self.timeout if timeout is None else timeout)
            h = chan.recv_header()
            if h.cmd == Cmd.ERROR:
                text = chan.recv_error_text(h)
                kind = ERRORS.get(h.aux, RuntimeError)
                if issubclass(kind, ConnectionError):  # the session is over, not the client
                    raise kind(f"{conn.where}: {text}")
                err = kind(f"{conn.where}: {text}")
                self._broken = err
                self._close_sockets()
                raise err
            expected = 0 if into is None else into.numel()
            if h.cmd != Cmd.OK or h.numel != expected:
                raise ConnectionError(f"unexpected reply (command {h.cmd}, {h.numel} elements)")
            if into is not None:
                finish = None if more else chan.end_recv
                if add_to is None:
                    chan.recv_body(tensor_bytes(into))
                    if finish is not None:
                        finish()
                else:  # a reply cut short (or altered) is asked again: the add is undone
                    _moved_adding(chan.recv_body, into, add_to(h), finish=finish)
        except (AuthenticationError, ValueError, RuntimeError):
            raise
        except (OSError, ConnectionError) as exc:
            self._fail_connection(conn, exc)
        finally:
            self.traffic.bytes_received += chan.bytes_received - before
        conn.t = h.aux
        self._last_io = time.monotonic()
        return h

    def _share(self, conn: _Conn) -> None:
        """Ask ``conn``'s server for a shared segment (:mod:`easgd.comm.shm`), before the
        session's first large body; the session stays on TCP when either side declines."""
        conn.shm = False
        peer = conn.sock.getpeername()[0] if self._shm else ""
        if not self._shm:
            reason = "this client does not share memory (shm=False or EASGD_SHM=0)"
        elif self._tls is not None:
            reason = "the session is on TLS"
        elif not is_loopback(str(peer)):
            reason = f"{conn.where} is reached at {peer}, not over loopback"
        else:
            reason = self._negotiate_shm(conn)
        fields = {"worker_id": self.worker_id, "server": conn.where}
        if conn.shm:
            logger.debug("worker %d: %s: bodies through shared memory", self.worker_id, conn.where)
            self._emit("transport", shm=True, **fields)
        else:
            logger.info("worker %d: %s: bodies over TCP: %s", self.worker_id, conn.where, reason)
            self._emit("transport", shm=False, reason=reason, **fields)

    def _negotiate_shm(self, conn: _Conn) -> str:
        """SHM with the server: its offer, then our confirmation (or refusal); "" when the
        bodies go through the segment from now on, else why not."""
        chan, ids = conn.chan, {"worker_id": self.worker_id, "session": conn.session}
        try:
            conn.sock.settimeout(self.timeout)
            chan.send_header(Cmd.SHM, **ids)
            h = chan.recv_header()
            if h.cmd == Cmd.ERROR:
                raise ConnectionError(f"SHM refused: {chan.recv_error_text(h)}")
            if h.cmd != Cmd.OK:
                raise ConnectionError(f"unexpected reply to SHM (command {h.cmd})")
            offer, _ = chan.recv_json()
            reason = str(offer.get("reason", "")) if isinstance(offer, dict) else repr(offer)
            if reason:  # the server declined: nothing in flight
                return f"the server declined: {reason}"
            segment = None
            try:
                segment = Segment.open(offer)
            except ShmUnavailable as exc:
                reason = str(exc)
            if segment is not None:
                chan.send_frame(Cmd.SHM, segment.token, flags=SHM_CONFIRM,
                                dtype=dtype_code(torch.uint8), numel=len(segment.token),
                                **ids)  # fmt: skip
            else:
                chan.send_frame(Cmd.SHM, b"", flags=SHM_DECLINE, **ids)
            h = chan.recv_header()
            if h.cmd != Cmd.OK:
                raise ConnectionError(f"unexpected reply to SHM (command {h.cmd})")
        except (OSError, ConnectionError) as exc:
            self._fail_connection(conn, exc)
        if segment is not None and h.aux == 1:
            chan.use_shm(tx=segment.c2s, rx=segment.s2c)
            conn.shm = True
            return ""
        return reason or "the server did not take this client's token"

    def _fail_connection(self, conn: _Conn, exc: BaseException) -> NoReturn:
        if self._broken is not None:
            raise self._broken from exc
        if isinstance(exc, IntegrityError):
            msg = (
                f"the connection to {conn.where} failed its integrity check, so it was "
                f"closed and nothing of the frame was used: {exc} (is something between "
                "this worker and the server altering the traffic?)"
            )
        elif isinstance(exc, DeclaredDeadError):
            msg = (
                f"{exc} (the server is alive; this process was silent too long: stopped, "
                "swapped out or starved of CPU?)"
            )
        elif isinstance(exc, TimeoutError):
            msg = (
                f"{conn.where} did not answer within {self.timeout:g} s (hung, overloaded or "
                "unreachable); raise timeout= if the center is very large"
            )
        elif isinstance(exc, PeerClosedError | ConnectionResetError | BrokenPipeError):
            msg = f"{conn.where} closed the connection: the server stopped or died"
        else:
            msg = f"lost {conn.where}: {type(exc).__name__}: {exc}"
        if self.reconnect_timeout:  # only this shard: reconnect to it on the next request
            conn.lost = PSConnectionError(msg, conn.address)
            with contextlib.suppress(OSError):
                conn.sock.close()
            raise _Lost(conn, msg) from exc
        self._broken = PSConnectionError(msg, conn.address)
        self._close_sockets()
        raise self._broken from exc

    def _emit(self, event: str, **fields: Any) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event({"event": event, **fields})
        except Exception:
            logger.exception("on_event callback failed for %s", event)

    def _close_sockets(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.sock.close()
            conn.chan.release_shm()  # a closed client holds no shard-sized shared memory

    def _heartbeat_loop(self) -> None:
        while not self._hb_stop.wait(self.heartbeat / 2):
            if time.monotonic() - self._last_io < self.heartbeat:
                continue
            if not self._lock.acquire(blocking=False):
                continue  # an exchange is in flight: that is activity enough
            try:
                if self._broken is not None or self._closed:
                    return
                for conn in self._conns:
                    if conn.lost is not None:
                        continue  # the next request reconnects it
                    try:
                        self._send(conn, Cmd.PING, None)
                        self._recv(conn, None)
                    except _Lost:
                        continue
            except Exception as exc:
                logger.warning("worker %d: heartbeat failed: %s", self.worker_id, exc)
                return
            finally:
                self._lock.release()


def send_control(
    address: tuple[str, int],
    message: dict[str, Any],
    *,
    secret: bytes | str | None,
    timeout: float,
    tls: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    """Send one CONTROL message to the parameter server at ``address``; return its answer.

    Connects (one attempt), runs the handshake with ``secret`` (None: ``EASGD_SECRET``, if
    set), sends ``message`` as JSON in one authenticated frame, reads the server's JSON
    answer (``ParameterServer.control``), says goodbye and closes. No session is recorded.
    ``timeout`` bounds each wait.

    Raises:
        ValueError: the server refused the message (its reason, e.g. an unknown key).
        AuthenticationError: a wrong or missing secret, or refused for its origin.
        RuntimeError: the server failed answering it.
        PSConnectionError: the server is unreachable, or the connection was lost (an
            altered frame included) before the answer came.
    """
    if not isinstance(message, dict):
        raise ValueError(f"message={message!r} must be a dict (a JSON object)")
    if not timeout > 0:
        raise ValueError(f"timeout={timeout} must be > 0 seconds")
    body = pack_json(message)
    conn = _Conn(address, resolve_secret(secret), 0.0, timeout, 0.0, tls)
    chan = conn.chan
    try:
        conn.sock.settimeout(timeout)
        chan.send_frame(Cmd.CONTROL, body, numel=len(body))
        h = chan.recv_header()
        if h.cmd == Cmd.ERROR:
            text = chan.recv_error_text(h)
            raise ERRORS.get(h.aux, RuntimeError)(
                f"{conn.where} refused the control message: {text}"
            )
        if h.cmd != Cmd.OK:
            raise ConnectionError(f"unexpected reply to CONTROL (command {h.cmd})")
        answer, _ = chan.recv_json()
        if not isinstance(answer, dict):
            raise ConnectionError(f"the answer to CONTROL is not a JSON object: {answer!r}")
        with contextlib.suppress(OSError, ConnectionError):
            chan.send_frame(Cmd.BYE)
            chan.recv_header()
        return answer
    except (AuthenticationError, ValueError, RuntimeError):
        raise
    except (OSError, ConnectionError) as exc:
        raise PSConnectionError(
            f"control message to {conn.where} failed: {type(exc).__name__}: {exc}", conn.address
        ) from exc
    finally:
        with contextlib.suppress(OSError):
            conn.sock.close()
