"""The worker's side of the asynchronous parameter server (see :mod:`easgd.comm.ps`).

:class:`PSClient` is the asynchronous :class:`easgd.comm.base.Transport`: it holds one TCP
connection per server shard and fulfils the exchange requests of
:class:`easgd.algorithms.Worker`; payloads go out of and replies come back into the
caller's own tensors, without copies. A background thread pings the servers while the
trainer computes, so a long local phase is not mistaken for a dead worker. Every failure of
a server becomes a :class:`PSConnectionError` naming its address; after any error the
client is closed.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import torch
from torch import Tensor

from easgd.algorithms import Hyperparams, Mode, Request
from easgd.comm.base import Traffic, Transport
from easgd.comm.wire import (
    CMD_OP,
    DEFAULT_HEARTBEAT,
    DEFAULT_TIMEOUT,
    ERRORS,
    HEADER,
    OP_CMD,
    AuthenticationError,
    Cmd,
    Header,
    PeerClosedError,
    client_handshake,
    configure_socket,
    dtype_code,
    recv_error_text,
    recv_exact,
    recv_header,
    recv_json,
    resolve_secret,
    send_all,
    send_header,
    shard_ranges,
    tensor_bytes,
)

__all__ = ["DEFAULT_HEARTBEAT", "DEFAULT_TIMEOUT", "PSClient", "PSConnectionError"]

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
            client_handshake(sock, secret, heartbeat, self.where)
        except AuthenticationError:
            sock.close()
            raise
        except (OSError, ConnectionError) as exc:
            sock.close()
            raise PSConnectionError(
                f"handshake with {self.where} failed: {exc}", self.address
            ) from exc
        self.sock = sock
        self.session = 0
        self.t = 0


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
    ) -> None:
        if not addresses:
            raise ValueError("addresses is empty; give the (host, port) of every server")
        if not timeout > 0:
            raise ValueError(f"timeout={timeout} must be > 0 seconds")
        if heartbeat < 0:
            raise ValueError(f"heartbeat={heartbeat} must be >= 0 seconds (0 disables it)")
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
        self._last_io = time.monotonic()
        secret_b = resolve_secret(secret)
        self._conns: list[_Conn] = []
        try:
            for address in addresses:
                self._conns.append(_Conn(address, secret_b, heartbeat, timeout, connect_timeout))
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
            for conn, (a, b) in zip(self._conns, self.ranges, strict=True):
                self._send(conn, Cmd.JOIN, None, dtype=code, numel=b - a, aux=a)
            hps = []
            for conn, (a, b) in zip(self._conns, self.ranges, strict=True):
                h = self._recv(conn, x[a:b])
                conn.session = h.session
                hps.append(self._recv_hp(conn))
            self.join_t = self.server_t
            self._dtype = x.dtype
            self._server_hp = self._agreed(hps)

    def _recv_hp(self, conn: _Conn) -> Hyperparams:
        """The JSON trailer of a JOIN reply: the server's hyperparameters."""
        try:
            trailer, nbytes = recv_json(conn.sock)
        except (OSError, ConnectionError) as exc:
            self._fail_connection(conn, exc)
        self.traffic.bytes_received += nbytes
        try:
            return Hyperparams.from_dict(trailer["hp"])
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
        """Fulfil one exchange request of :class:`easgd.algorithms.Worker` on every shard."""
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
        with self._lock:
            self._check_joined(request.payload)
            if cmd != self._exchange_cmd:
                assert self._exchange_cmd is not None
                self._fail_value(
                    f"the servers answer {CMD_OP[self._exchange_cmd].value!r} exchanges, not "
                    f"{request.op.value!r}; do all workers and servers use the same method?"
                )
            start = time.perf_counter()
            for conn, (a, b) in zip(self._conns, self.ranges, strict=True):
                self._send(conn, cmd, request.payload[a:b])
            for conn, (a, b) in zip(self._conns, self.ranges, strict=True):
                self._recv(conn, request.reply[a:b])
            self.traffic.last_exchange_seconds = time.perf_counter() - start
            self.traffic.exchanges += 1

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
            for conn, (a, b) in zip(self._conns, self.ranges, strict=True):
                self._send(conn, Cmd.PULL, None, dtype=code, numel=b - a, aux=int(evaluation))
            for conn, (a, b) in zip(self._conns, self.ranges, strict=True):
                self._recv(conn, out[a:b])

    def bye(self) -> None:
        """End the sessions cleanly (recorded as a goodbye, not a death) and close."""
        self.close(clean=True)

    def close(self, *, clean: bool = True) -> None:
        """Close the connections. Idempotent.

        ``clean``: say goodbye first, when joined and no server failed (the servers record
        ``left``); ``clean=False`` just drops the connections (the servers record a death).
        """
        if clean:
            self._goodbye()
        self._closed = True
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

    def _goodbye(self) -> None:
        with self._lock:
            if self._broken is not None or self._closed or self._dtype is None:
                return
            try:
                for conn in self._conns:
                    self._send(conn, Cmd.BYE, None)
                for conn in self._conns:
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

    def _send(self, conn: _Conn, cmd: Cmd, payload: Tensor | None, **fields: Any) -> None:
        try:
            if payload is None:
                self.traffic.bytes_sent += send_header(
                    conn.sock, cmd, worker_id=self.worker_id, session=conn.session, **fields
                )
            else:
                view = tensor_bytes(payload)
                self.traffic.bytes_sent += send_header(
                    conn.sock,
                    cmd,
                    dtype=dtype_code(payload.dtype),
                    worker_id=self.worker_id,
                    session=conn.session,
                    numel=payload.numel(),
                )
                send_all(conn.sock, view)
                self.traffic.bytes_sent += len(view)
        except (OSError, ConnectionError) as exc:
            # A refused payload is answered with an error before the server closes.
            with contextlib.suppress(OSError, ConnectionError):
                self._recv(conn, None, timeout=0.5)
            self._fail_connection(conn, exc)
        self._last_io = time.monotonic()

    def _recv(self, conn: _Conn, into: Tensor | None, timeout: float | None = None) -> Header:
        try:
            conn.sock.settimeout(self.timeout if timeout is None else timeout)
            h = recv_header(conn.sock)
            self.traffic.bytes_received += HEADER.size
            if h.cmd == Cmd.ERROR:
                text = recv_error_text(conn.sock, h)
                err = ERRORS.get(h.aux, RuntimeError)(f"{conn.where}: {text}")
                self._broken = err
                self._close_sockets()
                raise err
            expected = 0 if into is None else into.numel()
            if h.cmd != Cmd.OK or h.numel != expected:
                raise ConnectionError(f"unexpected reply (command {h.cmd}, {h.numel} elements)")
            if into is not None:
                view = tensor_bytes(into)
                recv_exact(conn.sock, view)
                self.traffic.bytes_received += len(view)
        except (AuthenticationError, ValueError, RuntimeError):
            raise
        except (OSError, ConnectionError) as exc:
            self._fail_connection(conn, exc)
        conn.t = h.aux
        self._last_io = time.monotonic()
        return h

    def _fail_connection(self, conn: _Conn, exc: BaseException) -> NoReturn:
        if self._broken is not None:
            raise self._broken from exc
        if isinstance(exc, TimeoutError):
            msg = (
                f"{conn.where} did not answer within {self.timeout:g} s (hung, overloaded or "
                "unreachable); raise timeout= if the center is very large"
            )
        elif isinstance(exc, PeerClosedError | ConnectionResetError | BrokenPipeError):
            msg = f"{conn.where} closed the connection: the server stopped or died"
        else:
            msg = f"lost {conn.where}: {type(exc).__name__}: {exc}"
        self._broken = PSConnectionError(msg, conn.address)
        self._close_sockets()
        raise self._broken from exc

    def _close_sockets(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.sock.close()

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
                    self._send(conn, Cmd.PING, None)
                    self._recv(conn, None)
            except Exception as exc:
                logger.warning("worker %d: heartbeat failed: %s", self.worker_id, exc)
                return
            finally:
                self._lock.release()
