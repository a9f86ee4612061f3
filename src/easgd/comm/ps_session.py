"""One connection to the parameter server: its protocol loop, from handshake to its end.

A :class:`Session` speaks :mod:`easgd.comm.wire` on one socket: the HMAC handshake, JOIN,
then exchanges, PULLs, PINGs and BYE, and it decides how the connection ended (a goodbye,
a death, a rejection, or the server stopping). Everything it reads or changes on the
server goes through the small interface of :class:`SessionHost`, which
:class:`easgd.comm.ps_server.ParameterServer` implements: the session owns the protocol,
the server owns the center, the counters and the events.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import socket
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from easgd.algorithms import Hyperparams, Op
from easgd.comm.wire import (
    CMD_OP,
    DEFAULT_TIMEOUT,
    HEADER,
    OP_CMD,
    AuthenticationError,
    Cmd,
    ErrorKind,
    Header,
    PeerClosedError,
    configure_socket,
    dtype_code,
    dtype_from_code,
    pack_json,
    recv_exact,
    recv_header,
    send_all,
    send_error,
    send_header,
    server_handshake,
    tensor_bytes,
)
from easgd.runlog import Event

__all__ = ["HANDSHAKE_TIMEOUT", "Session", "SessionHost", "SessionState", "SessionStats"]

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0


class SessionState(str, enum.Enum):
    """How a session stands (the strings are those of the server's stats and events)."""

    ACTIVE = "active"
    LEFT = "left"  # said BYE
    DIED = "died"  # EOF, reset or silence without BYE
    CLOSED = "closed"  # the server stopped
    REJECTED = "rejected"  # bad input, or the server failed on its request

    def __str__(self) -> str:
        return self.value


@dataclass
class SessionStats:
    """One worker session on one server (one TCP connection from JOIN to its end)."""

    worker_id: int
    session_id: int
    peer: str
    joined_at: float
    state: SessionState = SessionState.ACTIVE
    reason: str = ""
    ended_at: float | None = None
    exchanges: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    client: int = 0  # the client's nonce (sent in its JOIN): counts updates across restarts


class Clocks(NamedTuple):
    """A shard's clocks after a request: its center clock and its checkpoint numbers."""

    t: int  # center updates so far
    durable: int  # the last checkpoint on disk (0: the initial center)
    pending: int  # the checkpoint that will hold the update just applied


class SessionHost(Protocol):
    """What a session may ask of its server; every call is safe from any session's thread."""

    @property
    def hp(self) -> Hyperparams: ...

    @property
    def numel(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def exchange_op(self) -> Op: ...

    @property
    def where(self) -> str: ...

    @property
    def t(self) -> int: ...

    @property
    def stopping(self) -> bool: ...

    def silence(self, heartbeat_ms: int) -> float | None: ...

    def check_request(self, h: Header, *, offset: int | None = None) -> str: ...

    def open_session(self, worker_id: int, peer: str, into: Tensor) -> tuple[SessionStats, int]: ...

    def apply(self, op: Op, payload: Tensor, reply: Tensor, stats: SessionStats) -> Clocks: ...

    def clocks(self) -> Clocks: ...

    def recovery_info(self, client: int) -> dict[str, int]: ...

    def recover(self, contributions: Tensor, count: int, stats: SessionStats) -> Clocks: ...

    def read_center(self, into: Tensor, *, evaluation: bool) -> int: ...

    def end_session(self, stats: SessionStats, state: SessionState, reason: str) -> None: ...

    def emit(self, event: Event, **fields: Any) -> None: ...


class Session:
    """One connection's loop on the server: handshake, JOIN, requests, end.

    Args:
        server: the server it belongs to (see :class:`SessionHost`).
        sock: the accepted connection; the caller closes it after :meth:`run`.
        peer: ``host:port`` of the other end, for logs and events.
        secret: the shared secret every connection must prove (None: no authentication).
    """

    def __init__(
        self, server: SessionHost, sock: socket.socket, peer: str, *, secret: bytes | None
    ) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.secret = secret
        self.stats: SessionStats | None = None
        self.payload: Tensor | None = None
        self.reply: Tensor | None = None
        self._dtype = dtype_code(server.dtype)
        self._exchange_cmd = OP_CMD[server.exchange_op]
        self._nbytes = server.numel * torch.empty((), dtype=server.dtype).element_size()

    def run(self) -> None:
        srv = self.server
        try:
            configure_socket(self.sock)
            self.sock.settimeout(HANDSHAKE_TIMEOUT)
            silence = srv.silence(server_handshake(self.sock, self.secret))
        except AuthenticationError as exc:
            logger.warning("parameter server %s refused %s: %s", srv.where, self.peer, exc)
            srv.emit(Event.AUTH_FAILURE, peer=self.peer, reason=str(exc))
            return
        except (OSError, ConnectionError) as exc:
            logger.debug("handshake with %s failed: %s", self.peer, exc)
            return
        # A message in flight may wait on the worker sending the other shards first.
        in_flight = max(silence or 0.0, DEFAULT_TIMEOUT)
        while True:
            waiting = True
            self.sock.settimeout(silence)  # for the next request or heartbeat
            try:
                h = recv_header(self.sock)
                waiting = False
                self.sock.settimeout(in_flight)
                if not self._dispatch(h):
                    return
            except TimeoutError:
                if waiting:
                    reason = f"silent for {silence:g} s (no request, no heartbeat)"
                    self._end(SessionState.DIED, reason)
                    with contextlib.suppress(OSError):  # a worker that wakes up reads why
                        send_error(self.sock, ErrorKind.DECLARED_DEAD,
                                   f"this session was declared dead: {reason}")  # fmt: skip
                else:
                    self._end(SessionState.DIED, f"no progress for {in_flight:g} s in mid-message")
                return
            except (OSError, ConnectionError) as exc:
                if srv.stopping:
                    self._end(SessionState.CLOSED, "server stopped")
                elif isinstance(exc, PeerClosedError):
                    self._end(SessionState.DIED, "connection closed without BYE")
                else:
                    self._end(SessionState.DIED, f"{type(exc).__name__}: {exc}")
                return

    def _count(self, bytes_in: int, bytes_out: int) -> None:
        if self.stats is not None:
            self.stats.bytes_in += bytes_in
            self.stats.bytes_out += bytes_out

    def _send_reply(
        self, reply: Tensor, *, t: int, bytes_in: int, trailer: bytes = b"", **fields: int
    ) -> None:
        """OK header, the shard in ``reply``, then ``trailer``; counted before it is sent,
        so that a worker holding the reply finds it in the server's stats."""
        self._count(bytes_in, HEADER.size + self._nbytes + len(trailer))
        send_header(self.sock, Cmd.OK, dtype=self._dtype, numel=self.server.numel, aux=t, **fields)
        send_all(self.sock, tensor_bytes(reply))
        if trailer:
            self.sock.sendall(trailer)

    def _dispatch(self, h: Header) -> bool:
        """Serve one request; False ends the session."""
        if h.cmd == Cmd.PING:
            send_header(self.sock, Cmd.OK, aux=self.server.t)
            return True
        if h.cmd == Cmd.JOIN:
            return self._join(h)
        if h.cmd == Cmd.PULL:  # no session needed: evaluators pull without joining
            return self._reply_center(h, evaluation=bool(h.aux & 1))
        if self.stats is None:
            return self._reject(h, "the first request of a session must be JOIN")
        if h.cmd == Cmd.BYE:
            # Recorded before the answer, so that a worker's bye() returns after it counts.
            self._end(SessionState.LEFT, "bye")
            with contextlib.suppress(OSError):
                send_header(self.sock, Cmd.OK, session=self.stats.session_id)
            return False
        if h.cmd in CMD_OP:
            return self._exchange(h)
        if h.cmd == Cmd.RECOVER:
            return self._recover(h)
        return self._reject(h, f"unknown command {h.cmd}")

    def _buffers(self) -> tuple[Tensor, Tensor]:
        """The session's payload and reply buffers, allocated once."""
        if self.reply is None:
            self.reply = torch.empty(self.server.numel, dtype=self.server.dtype)
        if self.payload is None:
            self.payload = torch.empty_like(self.reply)
        return self.payload, self.reply

    def _join(self, h: Header) -> bool:
        srv = self.server
        if self.stats is not None:
            return self._reject(h, "JOIN twice on one connection")
        refusal = srv.check_request(h, offset=h.aux)
        if refusal:
            return self._reject(h, refusal)
        _, reply = self._buffers()
        trailer = pack_json({"hp": srv.hp.to_dict(), **srv.recovery_info(h.session)})
        self.stats, t = srv.open_session(h.worker_id, self.peer, reply)
        self.stats.client = h.session
        clocks = srv.clocks()
        self._send_reply(
            reply,
            t=t,
            bytes_in=HEADER.size,
            trailer=trailer,
            worker_id=h.worker_id,
            session=self.stats.session_id,
            durable=clocks.durable,
            pending=clocks.pending,
        )
        return True

    def _recover(self, h: Header) -> bool:
        """A live worker re-sends its updates that the restarted shard's checkpoint lacks."""
        srv = self.server
        refusal = srv.check_request(h)
        if not refusal and not srv.hp.spec.recoverable:
            refusal = f"{srv.hp.method} cannot rebuild its center from re-sent contributions"
        if not refusal and h.aux < 0:
            refusal = f"RECOVER of {h.aux} exchanges"
        if refusal:
            self._drain(h)
            return self._reject(h, refusal)
        assert self.stats is not None
        payload, _ = self._buffers()
        recv_exact(self.sock, tensor_bytes(payload))
        clocks = srv.recover(payload, h.aux, self.stats)
        self._count(HEADER.size + self._nbytes, HEADER.size)
        send_header(self.sock, Cmd.OK, aux=clocks.t, durable=clocks.durable,
                    pending=clocks.pending)  # fmt: skip
        return True

    def _exchange(self, h: Header) -> bool:
        srv = self.server
        refusal = srv.check_request(h)
        if not refusal and h.cmd != self._exchange_cmd:
            refusal = (
                f"this server runs {srv.hp.method}, which answers "
                f"{srv.exchange_op.value!r} exchanges, not {CMD_OP[h.cmd].value!r}; "
                "do all workers and servers use the same method?"
            )
        if refusal:
            self._drain(h)
            return self._reject(h, refusal)
        assert self.stats is not None
        payload, reply = self._buffers()
        recv_exact(self.sock, tensor_bytes(payload))
        try:
            clocks = srv.apply(CMD_OP[h.cmd], payload, reply, self.stats)
        except Exception as exc:
            logger.exception("parameter server %s: exchange failed", srv.where)
            send_error(self.sock, ErrorKind.SERVER, f"the server failed: {exc!r}")
            self._end(SessionState.REJECTED, f"server error: {exc!r}")
            return False
        self._send_reply(reply, t=clocks.t, bytes_in=HEADER.size + self._nbytes,
                         durable=clocks.durable, pending=clocks.pending)  # fmt: skip
        return True

    def _reply_center(self, h: Header, *, evaluation: bool) -> bool:
        srv = self.server
        refusal = srv.check_request(h)
        if refusal:
            return self._reject(h, refusal)
        if self.reply is None:
            self.reply = torch.empty(srv.numel, dtype=srv.dtype)
        t = srv.read_center(self.reply, evaluation=evaluation)
        self._send_reply(self.reply, t=t, bytes_in=HEADER.size)
        return True

    def _drain(self, h: Header) -> None:
        """Read and discard a payload we refuse, so the client reads our error, not a reset."""
        dtype = dtype_from_code(h.dtype)
        if dtype is None or h.numel < 0:
            return
        left = h.numel * torch.empty((), dtype=dtype).element_size()
        if left > 1 << 32:
            return
        buf = memoryview(bytearray(min(left, 1 << 20)))
        while left > 0:
            n = self.sock.recv_into(buf[: min(left, len(buf))])
            if n == 0:
                return
            left -= n

    def _reject(self, h: Header, reason: str) -> bool:
        srv = self.server
        logger.warning(
            "parameter server %s rejected worker %d (%s): %s",
            srv.where,
            h.worker_id,
            self.peer,
            reason,
        )
        with contextlib.suppress(OSError):
            send_error(self.sock, ErrorKind.VALUE, reason)
        if self.stats is not None:
            self._end(SessionState.REJECTED, reason)
        else:
            srv.emit(Event.REJECT, worker=h.worker_id, peer=self.peer, reason=reason)
        return False

    def _end(self, state: SessionState, reason: str) -> None:
        if self.stats is not None:  # a connection that never joined is not a session
            self.server.end_session(self.stats, state, reason)
