"""One connection to the parameter server: its protocol loop, from handshake to its end.

A :class:`Session` speaks :mod:`easgd.comm.wire` on one socket: (TLS,) the handshake, JOIN,
then exchanges, PULLs, PINGs, CONTROL messages and BYE, and it decides how the connection
ended (a goodbye, a death, a rejection, or the server stopping). Everything it reads or
changes on the server goes through the small interface of :class:`SessionHost`, which
:class:`easgd.comm.ps_server.ParameterServer` implements: the session owns the protocol,
the server owns the center, the counters and the events.

What a peer cannot do to the server:

* hold a thread without a handshake: the whole handshake (TLS included) must end within
  ``handshake_timeout`` (10 s) of the accept, and bytes that are not a client hello of this
  version are refused at once;
* hold a thread mid-message: once a frame's first byte arrives, the frame must arrive
  whole within ``frame_timeout`` (30 s) plus its size at :data:`MIN_RATE` (1 MB/s); a
  reply must leave within the same allowance;
* stay silent longer than ``SessionHost.silence`` of the heartbeat it announced;
* change the center with a frame that fails its integrity check (with a secret): the
  session ends as ``rejected`` with an ``auth_failure`` event before anything is applied;
* hold shard-sized memory without exchanging: a JOIN's (and a PULL's) reply comes from a
  buffer freed once it is sent; the payload and reply buffers are allocated at the first
  exchange (or RECOVER) and freed when the session ends;
* make it create more than one shared segment per session (``SHM``: one offer, and only
  after JOIN), or have it share memory with a peer that is not on loopback or is on TLS.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import mmap
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from easgd.algorithms import Hyperparams, Op
from easgd.comm.shm import Segment, ShmUnavailable, is_loopback
from easgd.comm.wire import (
    BYE_DONE,
    CMD_OP,
    COMPRESS_NAMES,
    COMPRESS_SHIFT,
    DEFAULT_TIMEOUT,
    MAX_JSON,
    OP_CMD,
    SHM_CONFIRM,
    SHM_DECLINE,
    AuthenticationError,
    Channel,
    Cmd,
    DeadlineExceeded,
    ErrorKind,
    Header,
    IntegrityError,
    PeerClosedError,
    configure_socket,
    dtype_code,
    dtype_from_code,
    pack_json,
    send_error,
    server_handshake,
    tensor_bytes,
)
from easgd.compress import Codec, codec, padded
from easgd.runlog import Event

__all__ = [
    "FRAME_TIMEOUT",
    "HANDSHAKE_TIMEOUT",
    "MIN_RATE",
    "Session",
    "SessionHost",
    "SessionState",
    "SessionStats",
]

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0  # seconds from the accept to the end of the handshake (TLS too)
FRAME_TIMEOUT = DEFAULT_TIMEOUT  # seconds for a frame to arrive whole, plus its size at...
MIN_RATE = 1e6  # ...bytes per second: the slowest link a frame is allowed to take


def _mapped_empty(numel: int, dtype: torch.dtype) -> Tensor:
    """An uninitialised tensor on its own anonymous memory map, whose pages go back to the
    system when the tensor dies: a freed shard from ``torch.empty`` stays in the malloc
    arena of the session's thread (measured: 20 idle JOINs kept 20 shards resident)."""
    size = numel * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(mmap.mmap(-1, max(size, 1)), dtype=dtype, count=numel)


class SessionState(str, enum.Enum):
    """How a session stands (the strings are those of the server's stats and events)."""

    ACTIVE = "active"
    LEFT = "left"  # said BYE
    DIED = "died"  # EOF, reset or silence without BYE
    CLOSED = "closed"  # the server stopped
    REJECTED = "rejected"  # bad input, a frame that failed its integrity check, a server error

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
    done: bool = False  # its BYE said the worker spent its budget (wire.BYE_DONE)


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

    @property
    def shm(self) -> bool: ...

    def silence(self, heartbeat_ms: int) -> float | None: ...

    def check_request(self, h: Header, *, offset: int | None = None) -> str: ...

    def open_session(
        self, worker_id: int, peer: str, into: Tensor, *, client: int | None = None
    ) -> tuple[SessionStats, int]: ...

    def apply(self, op: Op, payload: Tensor, reply: Tensor, stats: SessionStats) -> Clocks: ...

    def apply_compressed(
        self,
        reference: Tensor,
        packed_in: Tensor,
        packed_out: Tensor,
        scratch: Tensor,
        codec: Codec,
        stats: SessionStats,
    ) -> Clocks: ...

    def clocks(self) -> Clocks: ...

    def recovery_info(self, client: int) -> dict[str, int]: ...

    def recover(self, contributions: Tensor, count: int, stats: SessionStats) -> Clocks: ...

    def read_center(self, into: Tensor, *, evaluation: bool) -> int: ...

    def control(self, message: dict[str, Any]) -> dict[str, Any]: ...

    def end_session(self, stats: SessionStats, state: SessionState, reason: str) -> None: ...

    def emit(self, event: Event, **fields: Any) -> None: ...


class Session:
    """One connection's loop on the server: (TLS,) handshake, JOIN, requests, end.

    Args:
        server: the server it belongs to (see :class:`SessionHost`).
        sock: the accepted connection; the caller closes it after :meth:`run` (and may shut
            it down to end the session: with TLS the session speaks on a duplicate of it).
        peer: ``host:port`` of the other end, for logs and events.
        secret: the shared secret every connection must prove (None: no authentication).
        tls: a server TLS context (:func:`easgd.comm.wire.server_tls_context`), or None.
        accepted: when the connection was accepted (``time.monotonic()``; default now).
        handshake_timeout, frame_timeout: the deadlines of the module docstring (default
            :data:`HANDSHAKE_TIMEOUT`, :data:`FRAME_TIMEOUT`).
    """

    def __init__(
        self,
        server: SessionHost,
        sock: socket.socket,
        peer: str,
        *,
        secret: bytes | None,
        tls: ssl.SSLContext | None = None,
        accepted: float | None = None,
        handshake_timeout: float | None = None,
        frame_timeout: float | None = None,
    ) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.secret = secret
        self.tls = tls
        self.accepted = time.monotonic() if accepted is None else accepted
        self.handshake_timeout = (
            HANDSHAKE_TIMEOUT if handshake_timeout is None else handshake_timeout
        )
        self.frame_timeout = FRAME_TIMEOUT if frame_timeout is None else frame_timeout
        self.stats: SessionStats | None = None
        self.chan: Channel | None = None
        self.payload: Tensor | None = None
        self.reply: Tensor | None = None
        # A compressed session (JOIN flags): its codec, the reference of the worker's x that
        # it and the worker keep alike, and its packed buffers (allocated at JOIN).
        self.codec: Codec | None = None
        self.reference: Tensor | None = None
        self.packed: tuple[Tensor, Tensor, Tensor] | None = None
        self._tls_sock: ssl.SSLSocket | None = None
        self._segment: Segment | None = None  # shared with a worker on this host (SHM)
        self._shm_offered = False  # one offer per session: the server bounds its segments
        self._dtype = dtype_code(server.dtype)
        self._exchange_cmd = OP_CMD[server.exchange_op]
        self._nbytes = server.numel * torch.empty((), dtype=server.dtype).element_size()

    def run(self) -> None:
        srv = self.server
        try:
            try:
                chan, heartbeat_ms = self._handshake()
            except AuthenticationError as exc:
                self._auth_failure(str(exc))
                return
            except ssl.SSLError as exc:
                self._auth_failure(f"TLS handshake failed: {exc}")
                return
            except (OSError, ConnectionError) as exc:  # timeouts and deadlines too
                logger.info("parameter server %s: no handshake with %s: %s: %s",
                            srv.where, self.peer, type(exc).__name__, exc)  # fmt: skip
                return
            self.chan = chan
            self._serve(chan, srv.silence(heartbeat_ms))
        finally:
            self.payload = self.reply = None  # a session's memory ends with it
            self.reference = self.packed = None
            if self._segment is not None:
                self._segment.close_fd()
                self._segment = None
            if self.chan is not None:
                self.chan.release_shm()
            if self._tls_sock is not None:
                with contextlib.suppress(OSError):
                    self._tls_sock.close()

    def _handshake(self) -> tuple[Channel, int]:
        """TLS (when configured) and the handshake, all by ``accepted + handshake_timeout``."""
        deadline = self.accepted + self.handshake_timeout
        configure_socket(self.sock)
        sock = self.sock
        if self.tls is not None:
            # On a duplicate: the server keeps the accepted socket, to shut it down on stop.
            dup = self.sock.dup()
            try:
                sock = self._tls_sock = self.tls.wrap_socket(
                    dup, server_side=True, do_handshake_on_connect=False
                )
            except BaseException:
                dup.close()
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded("no TLS handshake within the handshake deadline")
            sock.settimeout(left)  # do_handshake's timeout bounds the whole TLS handshake
            self._tls_sock.do_handshake()
        hs = server_handshake(sock, self.secret, deadline=deadline)
        return hs.channel, hs.heartbeat_ms

    def _serve(self, chan: Channel, silence: float | None) -> None:
        srv = self.server
        while True:
            waiting = True
            try:
                h = chan.recv_header(wait=silence, frame_timeout=self.frame_timeout)
                waiting = False
                if not self._dispatch(h):
                    return
            except IntegrityError as exc:
                self._integrity_failure(str(exc))
                return
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError, PeerClosedError):
                self._closed_by_peer()
                return
            except ssl.SSLError as exc:  # a TLS record that failed its own check
                self._integrity_failure(f"TLS: {exc}")
                return
            except DeadlineExceeded:
                self._end(SessionState.DIED, f"a message did not arrive (or leave) whole "
                          f"within {self.frame_timeout:g} s + its size at "
                          f"{MIN_RATE / 1e6:g} MB/s")  # fmt: skip
                return
            except TimeoutError:
                if not waiting:  # not reached: every wait in mid-message has a deadline
                    self._end(SessionState.DIED, "no progress in mid-message")
                    return
                reason = f"silent for {silence:g} s (no request, no heartbeat)"
                self._end(SessionState.DIED, reason)
                with contextlib.suppress(OSError, ConnectionError):  # a worker that wakes up
                    send_error(chan, ErrorKind.DECLARED_DEAD,  # reads why
                               f"this session was declared dead: {reason}",
                               deadline=self._send_deadline(0))  # fmt: skip
                return
            except (OSError, ConnectionError) as exc:
                if srv.stopping:
                    self._end(SessionState.CLOSED, "server stopped")
                else:
                    self._end(SessionState.DIED, f"{type(exc).__name__}: {exc}")
                return

    def _closed_by_peer(self) -> None:
        if self.server.stopping:
            self._end(SessionState.CLOSED, "server stopped")
        else:
            self._end(SessionState.DIED, "connection closed without BYE")

    # -- deadlines and replies ------------------------------------------------------------

    def _recv_deadline(self, nbytes: int) -> float:
        """The frame whose header started at ``chan.frame_started`` must be whole by then."""
        assert self.chan is not None
        return self.chan.frame_started + self.frame_timeout + nbytes / MIN_RATE

    def _send_deadline(self, nbytes: int) -> float:
        return time.monotonic() + self.frame_timeout + nbytes / MIN_RATE

    def _count(self, bytes_in: int, bytes_out: int) -> None:
        if self.stats is not None:
            self.stats.bytes_in += bytes_in
            self.stats.bytes_out += bytes_out

    def _send_ok(self, body: memoryview | bytes = b"", **fields: int) -> None:
        assert self.chan is not None
        self.chan.send_frame(Cmd.OK, body, deadline=self._send_deadline(len(body)), **fields)

    def _send_reply(
        self, reply: Tensor, *, t: int, body_in: int, trailer: bytes = b"", **fields: int
    ) -> None:
        """OK header, ``reply`` (the shard, or a packed reply), then ``trailer``, as one
        frame; counted before it is sent, so that a worker holding the reply finds it in the
        server's stats."""
        chan = self.chan
        assert chan is not None
        size = reply.numel() * reply.element_size() + len(trailer)
        self._count(chan.frame_size(body_in), chan.frame_size(size))
        deadline = self._send_deadline(size)
        chan.send_header(Cmd.OK, deadline=deadline, dtype=dtype_code(reply.dtype),
                         numel=reply.numel(), aux=t, **fields)  # fmt: skip
        chan.send_body(tensor_bytes(reply), deadline=deadline)
        if trailer:
            chan.send_body(trailer, deadline=deadline)
        chan.end_send(deadline=deadline)

    def _recv_payload(self, into: Tensor) -> None:
        """A request's body into ``into``, verified: nothing of it is used before this returns."""
        assert self.chan is not None
        deadline = self._recv_deadline(into.numel() * into.element_size())
        self.chan.recv_body(tensor_bytes(into), deadline=deadline)
        self.chan.end_recv(deadline=deadline)

    # -- requests -------------------------------------------------------------------------

    def _dispatch(self, h: Header) -> bool:
        """Serve one request; False ends the session."""
        if h.cmd == Cmd.PING:
            self._send_ok(aux=self.server.t)
            return True
        if h.cmd == Cmd.JOIN:
            return self._join(h)
        if h.cmd == Cmd.PULL:  # no session needed: evaluators pull without joining
            return self._reply_center(h, evaluation=bool(h.aux & 1))
        if h.cmd == Cmd.CONTROL:  # nor for control messages (the server decides who may)
            return self._control(h)
        if h.cmd == Cmd.BYE:
            if self.stats is not None:
                # Recorded before the answer, so that a worker's bye() returns after it counts.
                self.stats.done = bool(h.flags & BYE_DONE)
                self._end(SessionState.LEFT, "bye")
            with contextlib.suppress(OSError, ConnectionError):
                self._send_ok(session=self.stats.session_id if self.stats is not None else 0)
            return False
        if self.stats is None:
            return self._reject(h, "the first request of a session must be JOIN")
        if h.cmd in CMD_OP:
            return self._exchange(h)
        if h.cmd == Cmd.ELASTIC_PACKED:
            return self._exchange_packed(h)
        if h.cmd == Cmd.RECOVER:
            return self._recover(h)
        if h.cmd == Cmd.SHM:
            return self._shm(h)
        return self._reject(h, f"unknown command {h.cmd}")

    def _shm_refusal(self) -> str:
        """Why this session's bodies cannot go through shared memory ("" when they can)."""
        if not self.server.shm:
            return "this server does not share memory (shm=False or EASGD_SHM=0)"
        if self.tls is not None:
            return "the session is on TLS"
        try:
            host = str(self.sock.getpeername()[0])
        except OSError as exc:
            return f"no peer address: {exc}"
        if not is_loopback(host):
            return f"the worker connects from {host}, not from loopback"
        return ""

    def _shm(self, h: Header) -> bool:
        """Offer a segment (flags 0), then switch to it when the worker proves it mapped it
        (``SHM_CONFIRM`` with the token) or stay on TCP (``SHM_DECLINE``)."""
        chan = self.chan
        assert chan is not None
        if self.stats is None:
            return self._reject(h, "SHM before JOIN")
        if h.flags == 0:
            if self._shm_offered:
                return self._reject(h, "SHM asked for twice on one session")
            self._shm_offered = True
            reason = self._shm_refusal()
            if not reason:
                try:
                    self._segment = Segment.create(self._nbytes)
                except ShmUnavailable as exc:
                    reason = str(exc)
            offer = self._segment.offer() if self._segment is not None else {"reason": reason}
            body = pack_json(offer)
            self._send_ok(body, numel=len(body))
            return True
        segment, self._segment = self._segment, None
        if segment is None or h.flags not in (SHM_CONFIRM, SHM_DECLINE):
            self._drain(h)
            return self._reject(h, f"SHM (flags {h.flags}) without an offer in flight")
        segment.close_fd()  # the worker has it mapped, or will not
        accepted = False
        if h.flags == SHM_CONFIRM:
            if h.numel != len(segment.token):
                self._drain(h)
                return self._reject(h, f"an SHM token of {h.numel} bytes")
            token = bytearray(len(segment.token))
            chan.recv_body(memoryview(token), deadline=self._recv_deadline(len(token)))
            chan.end_recv(deadline=self._recv_deadline(len(token)))
            accepted = bytes(token) == segment.token
            if not accepted:
                logger.warning("parameter server %s: worker %d (%s) sent another token for "
                               "its segment; the session stays on TCP", self.server.where,
                               h.worker_id, self.peer)  # fmt: skip
        self._send_ok(aux=int(accepted))
        if accepted:
            chan.use_shm(tx=segment.s2c, rx=segment.c2s)
            self._segment = segment
            # The session's buffers become the segment's bodies: no copy on this side.
            self.payload = self.reply = None
            if self.packed is not None:
                size = self.packed[0].numel()
                self.packed = (segment.c2s.tensor(size, torch.uint8),
                               segment.s2c.tensor(size, torch.uint8), self.packed[2])  # fmt: skip
        return True

    def _exchange_buffers(self) -> tuple[Tensor, Tensor]:
        """The session's payload and reply buffers, allocated at its first exchange."""
        srv, segment = self.server, self._segment
        if self.payload is None:
            self.payload = (segment.c2s.tensor(srv.numel, srv.dtype) if segment is not None
                            else _mapped_empty(srv.numel, srv.dtype))  # fmt: skip
        if self.reply is None:
            self.reply = (segment.s2c.tensor(srv.numel, srv.dtype) if segment is not None
                          else _mapped_empty(srv.numel, srv.dtype))  # fmt: skip
        return self.payload, self.reply

    def _join(self, h: Header) -> bool:
        srv = self.server
        if self.stats is not None:
            return self._reject(h, "JOIN twice on one connection")
        refusal = srv.check_request(h, offset=h.aux)
        code = h.flags >> COMPRESS_SHIFT
        if not refusal and code:
            if code not in COMPRESS_NAMES:
                refusal = f"unknown compression code {code} in JOIN"
            elif srv.exchange_op is not Op.ELASTIC:
                refusal = (
                    f"compressed exchanges are elastic (easgd, eamsgd); this server runs "
                    f"{srv.hp.method}"
                )
        if refusal:
            return self._reject(h, refusal)
        trailer = pack_json({"hp": srv.hp.to_dict(), **srv.recovery_info(h.session)})
        # The center for this reply only: an idle session holds no shard-sized memory.
        center = _mapped_empty(srv.numel, srv.dtype)
        try:
            self.stats, t = srv.open_session(h.worker_id, self.peer, center, client=h.session)
        except ValueError as exc:  # another process holds this worker's session
            return self._reject(h, str(exc))
        self.stats.client = h.session
        if code:
            self.codec = codec(COMPRESS_NAMES[code])
            n = padded(srv.numel, self.codec.align)
            size = self.codec.packed_size(n, srv.dtype)
            # The reference starts as the center of this reply, on both sides: a new worker
            # takes it as its x; a recovering one (JOIN_RECOVER) keeps its x and resets its
            # reference to it, so the restart needs no checkpointed reference.
            self.reference = center.clone()
            self.packed = (torch.zeros(size, dtype=torch.uint8),
                           torch.zeros(size, dtype=torch.uint8),
                           torch.zeros(n, dtype=srv.dtype))  # fmt: skip
        clocks = srv.clocks()
        self._send_reply(center, t=t, body_in=0, trailer=trailer, worker_id=h.worker_id,
                         session=self.stats.session_id, durable=clocks.durable,
                         pending=clocks.pending)  # fmt: skip
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
        assert self.stats is not None and self.chan is not None
        payload, _ = self._exchange_buffers()
        self._recv_payload(payload)
        try:
            clocks = srv.recover(payload, h.aux, self.stats)
        except ValueError as exc:  # a sum that is not finite, say: nothing was added
            return self._reject(h, str(exc))
        self._count(self.chan.frame_size(self._nbytes), self.chan.frame_size(0))
        self._send_ok(aux=clocks.t, durable=clocks.durable, pending=clocks.pending)
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
        payload, reply = self._exchange_buffers()
        self._recv_payload(payload)
        stats = self.stats
        clocks = self._applied(h, lambda: srv.apply(CMD_OP[h.cmd], payload, reply, stats))
        if isinstance(clocks, bool):
            return clocks
        self._send_reply(reply, t=clocks.t, body_in=self._nbytes, durable=clocks.durable,
                         pending=clocks.pending)  # fmt: skip
        return True

    def _applied(self, h: Header, apply: Callable[[], Clocks]) -> Clocks | bool:
        """``apply()``'s clocks, or what the session answers when it fails: a refused input
        (a NaN, say: nothing was applied) is rejected, a failure of the server ends it."""
        try:
            return apply()
        except ValueError as exc:
            return self._reject(h, str(exc))
        except Exception as exc:
            logger.exception("parameter server %s: exchange failed", self.server.where)
            self._send_error(ErrorKind.SERVER, f"the server failed: {exc!r}")
            self._end(SessionState.REJECTED, f"server error: {exc!r}")
            return False

    def _exchange_packed(self, h: Header) -> bool:
        """A compressed elastic exchange: ``encode(x - reference)`` in, ``encode(d)`` out."""
        srv = self.server
        refusal = ""
        if self.codec is None or self.packed is None or self.reference is None:
            refusal = "a compressed exchange on a session that did not JOIN with a codec"
        elif h.dtype != dtype_code(torch.uint8) or h.numel != self.packed[0].numel():
            refusal = (
                f"compressed payload of {h.numel} bytes, this {self.codec.name} session "
                f"takes {self.packed[0].numel()}; do all workers build the same model?"
            )
        if refusal:
            self._drain(h)
            return self._reject(h, refusal)
        assert self.stats is not None and self.chan is not None
        assert self.codec is not None and self.packed is not None and self.reference is not None
        packed_in, packed_out, scratch = self.packed
        self._recv_payload(packed_in)
        codec, reference, stats = self.codec, self.reference, self.stats
        clocks = self._applied(h, lambda: srv.apply_compressed(
            reference, packed_in, packed_out, scratch, codec, stats))  # fmt: skip
        if isinstance(clocks, bool):
            return clocks
        self._send_reply(packed_out, t=clocks.t, body_in=packed_in.numel(),
                         durable=clocks.durable, pending=clocks.pending)  # fmt: skip
        return True

    def _reply_center(self, h: Header, *, evaluation: bool) -> bool:
        srv = self.server
        refusal = srv.check_request(h)
        if refusal:
            return self._reject(h, refusal)
        center = _mapped_empty(srv.numel, srv.dtype)  # for this reply only
        t = srv.read_center(center, evaluation=evaluation)
        self._send_reply(center, t=t, body_in=0)
        return True

    def _control(self, h: Header) -> bool:
        """An authenticated JSON request for the server (the launcher's, at the run's end)."""
        srv, chan = self.server, self.chan
        assert chan is not None
        if not 0 < h.numel <= MAX_JSON + 4:
            return self._reject(h, f"a CONTROL message of {h.numel} bytes")
        message, _ = chan.recv_json(deadline=self._recv_deadline(h.numel))
        if not isinstance(message, dict):
            return self._reject(h, f"a control message is a JSON object, not {message!r}")
        try:
            answer = srv.control(message)
        except PermissionError as exc:
            self._send_error(ErrorKind.AUTH, str(exc))
            self._auth_failure(f"control message refused: {exc}")
            return False
        except ValueError as exc:
            return self._reject(h, str(exc))
        except Exception as exc:
            logger.exception("parameter server %s: control message failed", srv.where)
            self._send_error(ErrorKind.SERVER, f"the server failed: {exc!r}")
            return False
        body = pack_json(answer)
        self._send_ok(body, numel=len(body))
        return True

    # -- ends -----------------------------------------------------------------------------

    def _drain(self, h: Header) -> None:
        """Read and discard a payload we refuse, so the client reads our error, not a reset."""
        dtype = dtype_from_code(h.dtype)
        if dtype is None or h.numel < 0 or self.chan is None:
            return
        left = h.numel * torch.empty((), dtype=dtype).element_size()
        if left > 1 << 32:
            return
        deadline = self._recv_deadline(left)
        buf = memoryview(bytearray(min(left, 1 << 20)))
        with contextlib.suppress(OSError, ConnectionError):
            while left > 0:
                n = min(left, len(buf))
                self.chan.recv_body(buf[:n], deadline=deadline)
                left -= n

    def _send_error(self, kind: ErrorKind, message: str) -> None:
        if self.chan is None:
            return
        with contextlib.suppress(OSError, ConnectionError):
            send_error(self.chan, kind, message, deadline=self._send_deadline(len(message)))

    def _reject(self, h: Header, reason: str) -> bool:
        srv = self.server
        logger.warning(
            "parameter server %s rejected worker %d (%s): %s",
            srv.where,
            h.worker_id,
            self.peer,
            reason,
        )
        self._send_error(ErrorKind.VALUE, reason)
        if self.stats is not None:
            self._end(SessionState.REJECTED, reason)
        else:
            srv.emit(Event.REJECT, worker=h.worker_id, peer=self.peer, reason=reason)
        return False

    def _auth_failure(self, reason: str) -> None:
        srv = self.server
        logger.warning("parameter server %s refused %s: %s", srv.where, self.peer, reason)
        srv.emit(Event.AUTH_FAILURE, peer=self.peer, reason=reason)

    def _integrity_failure(self, reason: str) -> None:
        """A frame failed its check: nothing of it was used; the session ends as rejected."""
        reason = f"integrity check failed: {reason}"
        self._auth_failure(reason)
        self._send_error(ErrorKind.INTEGRITY, f"this server closed the session: {reason}")
        self._end(SessionState.REJECTED, reason)

    def _end(self, state: SessionState, reason: str) -> None:
        if self.stats is not None:  # a connection that never joined is not a session
            self.server.end_session(self.stats, state, reason)
