"""The parameter server's wire format: a handshake, then authenticated frames.

Handshake, on every new connection, before anything else (fixed-size structs, so that
nothing else can be mistaken for a hello)::

    server -> client   SERVER HELLO  "EAHS", version, auth_required, macs, 0, nonce_s (32 B)
    client -> server   CLIENT HELLO  "EAHC", version, has_mac, mac, 0, heartbeat_ms, nonce_c,
                                     mac_c (32 B)
    server -> client   REPLY         "EAHR", version, status, 0, text bytes, mac_s (32 B)
                                     + the text of a refusal (status: an :class:`ErrorKind`)

With a shared secret, ``T`` = server hello + client hello (without ``mac_c``) is the
transcript; ``mac_c = HMAC-SHA256(secret, "easgd-ps client" + T)`` and ``mac_s`` the same
with ``"easgd-ps server"``, compared with :func:`hmac.compare_digest`: both sides prove they
know the secret, the fresh nonces prevent replay, and every hello field (the heartbeat, the
MAC the client chose among those the server offers) is covered, so none can be altered.

Frames. Every message after the handshake is one frame::

    HEADER (52 B) [+ tag_h] [+ body + tag_b]      (tags only when a secret is set)

The body's length follows from the header (``numel`` elements of the shard's dtype, or
``numel`` bytes of UTF-8 text for :attr:`Cmd.ERROR` and of JSON for :attr:`Cmd.CONTROL`);
the reply to JOIN appends the server's configuration as length-prefixed JSON
(:func:`pack_json`) to the shard. A frame without a body has no ``tag_b``.

Authentication of frames (with a secret). The handshake derives one key per direction::

    K     = HMAC-SHA256(secret, "easgd-ps session" + T)
    k_c2s = HMAC-SHA256(K, "client->server"),   k_s2c = HMAC-SHA256(K, "server->client")

and each side counts the frames it sends and receives (``seq``: 0, 1, 2, ... per direction,
never sent). ``tag_h`` authenticates ``seq + header`` and ``tag_b`` ``seq + header + body``
(16 bytes each), so a frame altered, replayed, reordered or dropped in transit fails the
receiver's check: :class:`IntegrityError`, raised before anything in it is used (the
header's tag before its fields are read, the body's before the payload is applied). The
body's MAC is updated chunk by chunk (256 KiB) as each is received or right after it is
sent, while it is still in cache. Two MACs, chosen in the handshake (the best both have):

* Poly1305 (the optional ``cryptography`` package, 5 to 10 GB/s on one core here): per
  frame a one-time key pair ``HMAC-SHA512(k_dir, seq)``, one key for ``tag_h``, one for
  ``tag_b``;
* HMAC-SHA256 (standard library, 1.1 to 1.4 GB/s): ``tag_h`` from a copy of the running HMAC.

On loopback the copies in and out of the kernel already keep both ends' cores busy, so the
MAC's passes (two per direction) add to the exchange rather than overlap it: their cost is
what one core hashes per second (``benchmarks/exchange.py``, ``ps_elastic_authenticated``).

Without a secret (only on loopback) frames carry no tags. TLS (:func:`server_tls_context`,
:func:`client_tls_context`) encrypts and authenticates the stream beneath all of this. A
client that verified the server's certificate and host name chooses :data:`MAC_TLS`: no
frame tags, the TLS records (AEAD, sequenced) already detect what the tags would, and the
tags would cost a quarter more on top (measured, 5M floats: TLS 1.54x the plain exchange,
TLS plus Poly1305 tags 1.96x). A client that does not verify the certificate could be
talking to a relay that terminates TLS, so it keeps the tags (the secret's guarantee holds).

Recovery (version 3). Every OK reply carries two checkpoint clocks of the shard: ``durable``,
the sequence number of its last checkpoint safely on disk (0: only the initial center, which
a restart rebuilds from the seed), and ``pending``, the sequence number of the checkpoint that
will hold the update just applied. A worker keeps, per shard, the sum of its own
contributions to the center (and their count) by ``pending`` and drops the sums at or below
``durable``. When a shard restarts from its checkpoint ``D``, the worker JOINs again with
``flags = JOIN_RECOVER`` and sends RECOVER: the sum of its contributions after ``D`` and,
in ``aux``, how many exchanges they are; the server adds them to the center, so no update
of a live worker is lost.

Shared memory (version 5). A worker and a server on one host move the tensors of the
bodies through a segment they share (:mod:`easgd.comm.shm`), negotiated with ``SHM`` at the
worker's first tensor body; the frames keep their order, headers and tags, and the socket
carries an 8-byte descriptor where such a body begins (:class:`Channel`).

Version 4: the handshake above, authenticated frames, CONTROL, ``BYE_DONE``; 5: SHM.
"""

from __future__ import annotations

import enum
import hmac
import json
import os
import socket
import ssl
import struct
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from easgd.algorithms import Op
from easgd.comm.shm import SHM_MIN, Region

_poly1305: Any
try:  # optional (easgd[crypto]): a MAC five times faster than HMAC-SHA256
    from cryptography.hazmat.primitives.poly1305 import Poly1305 as _poly1305
except ImportError:  # pragma: no cover - depends on the environment
    _poly1305 = None

__all__ = [
    "BYE_DONE",
    "CMD_OP",
    "COMPRESS_CODES",
    "COMPRESS_NAMES",
    "COMPRESS_SHIFT",
    "DEFAULT_HEARTBEAT",
    "DEFAULT_TIMEOUT",
    "ERRORS",
    "HEADER",
    "JOIN_RECOVER",
    "MAC_HMAC_SHA256",
    "MAC_POLY1305",
    "MAC_TLS",
    "MAGIC",
    "MAX_ERROR",
    "OP_CMD",
    "SECRET_ENV",
    "SHM_CONFIRM",
    "SHM_DECLINE",
    "TAG_SIZE",
    "VERSION",
    "AuthenticationError",
    "Channel",
    "Cmd",
    "DeadlineExceeded",
    "DeclaredDeadError",
    "ErrorKind",
    "Handshake",
    "Header",
    "IntegrityError",
    "PeerClosedError",
    "client_handshake",
    "client_tls_context",
    "configure_socket",
    "dtype_code",
    "dtype_from_code",
    "handshake_refusal",
    "pack_json",
    "recv_exact",
    "resolve_secret",
    "send_all",
    "send_error",
    "server_handshake",
    "server_tls_context",
    "shard_ranges",
    "supported_macs",
    "tensor_bytes",
]

MAGIC = b"EAPS"  # every frame's header
VERSION = 5  # 2: JOIN carries hp; 3: checkpoint clocks, RECOVER; 4: authenticated frames;
# 5: shared-memory bodies on one host (SHM)

# magic, version, cmd, dtype, flags, worker_id, session, numel, aux, durable, pending
HEADER = struct.Struct("<4sBBBBiqqqqq")
JOIN_RECOVER = 1  # JOIN flag: a live worker reconnecting to a restarted shard
BYE_DONE = 1  # BYE flag: the worker spent its budget (not one that gave up)
SHM_CONFIRM, SHM_DECLINE = 1, 2  # SHM flags: the worker mapped the offered segment, or not
TAG_SIZE = 16
MAC_HMAC_SHA256 = 1  # bits of the server hello's ``macs``; the client hello names one
MAC_POLY1305 = 2
MAC_TLS = 4  # no tags: the TLS records authenticate the frames (offered only over TLS)
#: The client's choice among the MACs the server offers, best first.
MAC_PREFERENCE = (MAC_TLS, MAC_POLY1305, MAC_HMAC_SHA256)

_SERVER_MAGIC, _CLIENT_MAGIC, _REPLY_MAGIC = b"EAHS", b"EAHC", b"EAHR"
# magic, version, auth_required, macs offered, reserved, nonce_s
_SERVER_HELLO = struct.Struct("<4sBBBB32s")
# magic, version, has_mac, mac chosen, reserved, heartbeat_ms, nonce_c (then mac_c)
_CLIENT_HELLO = struct.Struct("<4sBBBBI32s")
# magic, version, status (0 or an ErrorKind), reserved, text bytes, mac_s
_REPLY = struct.Struct("<4sBBHI32s")
_MAC_LEN = 32
_SEQ = struct.Struct("<Q")
_JSON_LEN = struct.Struct("<I")
_DESC = struct.Struct("<Q")  # a shared-memory body's descriptor: its bytes in the segment
MAX_JSON = 1 << 20  # bytes; a longer JSON body is not from an easgd peer
MAX_ERROR = 1 << 16  # bytes of an error's text
_CHUNK = 1 << 18  # bytes moved per call when they are hashed or encrypted: still in cache
DEFAULT_HEARTBEAT = 1.0  # seconds between the client's pings while it is idle
DEFAULT_TIMEOUT = 30.0  # seconds without progress before either side gives up on a message
SECRET_ENV = "EASGD_SECRET"


class Cmd(enum.IntEnum):
    JOIN = 1  # header only; reply: the center shard + JSON trailer (header.session = new id)
    ELASTIC = 2  # payload x -> reply d = alpha*(x - center)
    PUSH_PULL = 3  # payload acc -> reply center
    GRAD_PULL = 4  # payload g -> reply center
    PULL = 5  # header only (aux=1: evaluation vector) -> reply center
    BYE = 6  # clean exit (flags: BYE_DONE when the worker spent its budget)
    PING = 7  # heartbeat; reply: header only (aux = center clock)
    RECOVER = 8  # payload: a worker's contributions the restarted shard's checkpoint lacks
    CONTROL = 9  # body: pack_json(message) (numel = its bytes); reply: OK + pack_json(answer)
    # payload: encode(x - reference), uint8 (numel = its bytes) -> reply: encode(d), uint8
    # (a session that JOINed with a codec in ``flags``: COMPRESS_CODES; easgd.compress)
    ELASTIC_PACKED = 10
    # header only -> OK + pack_json(offer) (easgd.comm.shm; {"reason": ...} when declined);
    # then SHM_CONFIRM with the token as body (or SHM_DECLINE) -> OK, aux = 1 when in use
    SHM = 11
    OK = 16
    ERROR = 17


class ErrorKind(enum.IntEnum):
    """What an ERROR message becomes on the client (sent in ``aux``)."""

    VALUE = 1  # bad input: ValueError
    AUTH = 2  # refused: AuthenticationError
    SERVER = 3  # the server failed: RuntimeError
    DECLARED_DEAD = 4  # the server gave up on this silent session: DeclaredDeadError
    INTEGRITY = 5  # a frame of ours failed the server's integrity check: IntegrityError


class AuthenticationError(PermissionError):
    """The peer did not prove that it knows the shared secret (do not retry)."""


class IntegrityError(ConnectionError):
    """A frame failed its integrity check: altered, replayed, reordered or dropped in transit.

    A ``ConnectionError``: this connection can no longer be trusted and is closed, nothing
    of the frame was used; both ends proved the secret in the handshake, so a new connection
    (a new handshake, new keys) may be tried.
    """


class PeerClosedError(ConnectionError):
    """The peer closed the connection (EOF)."""


class DeclaredDeadError(ConnectionError):
    """The server declared this session dead (silent too long) while the server lives on."""


class DeadlineExceeded(TimeoutError):
    """A message did not arrive (or leave) whole within its absolute deadline."""


class Header(NamedTuple):
    cmd: int
    dtype: int
    flags: int
    worker_id: int
    session: int
    numel: int
    aux: int
    durable: int = 0  # replies: the sequence number of the shard's last durable checkpoint
    pending: int = 0  # replies: the checkpoint that will hold the update just applied


# Which command carries which request (the method's MethodSpec.server_op says which one).
OP_CMD: dict[Op, Cmd] = {
    Op.ELASTIC: Cmd.ELASTIC,
    Op.PUSH_PULL: Cmd.PUSH_PULL,
    Op.GRAD_PULL: Cmd.GRAD_PULL,
}
CMD_OP: dict[int, Op] = {int(cmd): op for op, cmd in OP_CMD.items()}
ERRORS: dict[int, type[Exception]] = {
    ErrorKind.VALUE: ValueError,
    ErrorKind.AUTH: AuthenticationError,
    ErrorKind.SERVER: RuntimeError,
    ErrorKind.DECLARED_DEAD: DeclaredDeadError,
    ErrorKind.INTEGRITY: IntegrityError,
}


def shard_ranges(numel: int, shards: int) -> list[tuple[int, int]]:
    """Split ``[0, numel)`` into ``shards`` contiguous ranges whose sizes differ by at most 1."""
    if shards < 1:
        raise ValueError(f"shards={shards} must be >= 1")
    if numel < shards:
        raise ValueError(f"numel={numel} cannot be split into {shards} non-empty shards")
    size, extra = divmod(numel, shards)
    ranges, start = [], 0
    for i in range(shards):
        end = start + size + (i < extra)
        ranges.append((start, end))
        start = end
    return ranges


def resolve_secret(secret: bytes | str | None) -> bytes | None:
    """``secret`` as bytes, else ``EASGD_SECRET``, else None."""
    if secret is None:
        secret = os.environ.get(SECRET_ENV) or None
    if isinstance(secret, str):
        secret = secret.encode()
    if secret is not None and len(secret) == 0:
        raise ValueError("secret is empty; give a non-empty shared secret or none")
    return secret


_DTYPES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float64: 2,
    torch.float16: 3,
    torch.bfloat16: 4,
    torch.uint8: 5,  # packed (compressed) payloads only
}
#: The codec a JOIN asks for, in bits 4-7 of its ``flags`` (0: none, full precision).
COMPRESS_CODES = {"none": 0, "bf16": 1, "int8": 2}
COMPRESS_NAMES = {v: k for k, v in COMPRESS_CODES.items()}
COMPRESS_SHIFT = 4
_CODES = {v: k for k, v in _DTYPES.items()}
_ITEMSIZE = {code: torch.empty((), dtype=dt).element_size() for dt, code in _DTYPES.items()}


def dtype_code(dtype: torch.dtype) -> int:
    if dtype not in _DTYPES:
        raise ValueError(
            f"dtype={dtype} cannot travel to the parameter server; use one of "
            f"{', '.join(str(d) for d in _DTYPES)}"
        )
    return _DTYPES[dtype]


def dtype_from_code(code: int) -> torch.dtype | None:
    return _CODES.get(code)


def tensor_bytes(t: Tensor) -> memoryview:
    """The tensor's own memory as a writable byte view (no copy); ``t`` must be contiguous."""
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError("tensors sent to the parameter server must be contiguous and on the CPU")
    return t.detach().view(torch.uint8).numpy().data


def configure_socket(sock: socket.socket) -> None:
    """No Nagle delay, and kernel keepalive probes so a vanished host is noticed in ~10 s."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


# ---------------------------------------------------------------------------------------
# Moving bytes: whole views, with an optional absolute deadline and a running MAC
# ---------------------------------------------------------------------------------------


class _Updatable(Protocol):
    def update(self, data: memoryview, /) -> None: ...


def _wait_until(sock: socket.socket, deadline: float | None) -> None:
    """Give the next call on ``sock`` what is left of ``deadline`` (None: keep its timeout)."""
    if deadline is None:
        return
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("the message did not get through whole within its deadline")
    sock.settimeout(left)


def _moved(call: Callable[[memoryview], int], view: memoryview, deadline: float | None) -> int:
    """``call(view)``; the socket's timeout, set from ``deadline``, is the deadline's."""
    try:
        return call(view)
    except TimeoutError as exc:
        if deadline is None or isinstance(exc, DeadlineExceeded):
            raise
        raise DeadlineExceeded("the message did not get through whole within its deadline") from exc


def _step(sock: socket.socket, size: int, mac: _Updatable | None) -> int:
    # Chunked when each piece is hashed or encrypted (hot in cache; an SSL write of a whole
    # shard would also run under one timeout); plain TCP moves the view in as few calls.
    return _CHUNK if mac is not None or isinstance(sock, ssl.SSLSocket) else max(size, 1)


def recv_exact(
    sock: socket.socket,
    view: memoryview,
    *,
    deadline: float | None = None,
    mac: _Updatable | None = None,
) -> None:
    """Fill ``view`` from ``sock``; EOF before the end raises :class:`PeerClosedError`.

    ``deadline`` (``time.monotonic()``): the whole view must arrive by then
    (:class:`DeadlineExceeded`); None: the socket's timeout bounds each wait for progress.
    ``mac``: updated with each chunk as it arrives.
    """
    got, size = 0, len(view)
    step = _step(sock, size, mac)
    while got < size:
        _wait_until(sock, deadline)
        n = _moved(sock.recv_into, view[got : got + step], deadline)
        if n == 0:
            raise PeerClosedError("connection closed by the peer")
        if mac is not None:
            mac.update(view[got : got + n])
        got += n


def send_all(
    sock: socket.socket,
    view: memoryview,
    *,
    deadline: float | None = None,
    mac: _Updatable | None = None,
) -> None:
    """Send all of ``view``; ``mac`` is updated with each chunk just after it is sent
    (the kernel's copy has just brought it into cache; the tag follows the body anyway).

    ``deadline``: as :func:`recv_exact`. Not ``socket.sendall``: its timeout covers the whole
    buffer, which would make a large payload on a slow link look like a dead peer.
    """
    size = len(view)
    step = _step(sock, size, mac)
    for start in range(0, size, step):
        chunk = view[start : start + step]
        sent = 0
        while sent < len(chunk):
            _wait_until(sock, deadline)
            sent += _moved(sock.send, chunk[sent:], deadline)
        if mac is not None:
            mac.update(chunk)


# ---------------------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------------------


class _FrameMac(Protocol):
    def header_tag(self, header: bytes) -> bytes: ...

    def update(self, data: memoryview, /) -> None: ...

    def body_tag(self) -> bytes: ...


class _HmacFrame:
    """HMAC-SHA256 over ``seq + header (+ body)``; ``tag_h`` from a copy of the state."""

    def __init__(self, key: bytes, seq: int) -> None:
        self._h = hmac.new(key, _SEQ.pack(seq), "sha256")

    def header_tag(self, header: bytes) -> bytes:
        self._h.update(header)
        return self._h.copy().digest()[:TAG_SIZE]

    def update(self, data: memoryview, /) -> None:
        self._h.update(data)

    def body_tag(self) -> bytes:
        return self._h.digest()[:TAG_SIZE]


class _PolyFrame:
    """Poly1305 with the frame's own one-time keys, ``HMAC-SHA512(k, seq)`` split in two."""

    def __init__(self, key: bytes, seq: int) -> None:
        okm = hmac.digest(key, _SEQ.pack(seq), "sha512")
        self._header_key = okm[:32]
        self._body = _poly1305(okm[32:])

    def header_tag(self, header: bytes) -> bytes:
        self._body.update(header)
        tag: bytes = _poly1305.generate_tag(self._header_key, header)
        return tag

    def update(self, data: memoryview, /) -> None:
        self._body.update(data)

    def body_tag(self) -> bytes:
        tag: bytes = self._body.finalize()
        return tag


_FRAME_MACS: dict[int, Callable[[bytes, int], _FrameMac]] = {MAC_HMAC_SHA256: _HmacFrame}
if _poly1305 is not None:
    _FRAME_MACS[MAC_POLY1305] = _PolyFrame


def supported_macs() -> int:
    """The MACs this process can run, as the bits of the server hello's ``macs``."""
    bits = 0
    for mac in _FRAME_MACS:
        bits |= mac
    return bits


class _Direction:
    """One direction's key and frame counter (the implicit sequence number)."""

    def __init__(self, mac: int, key: bytes) -> None:
        self._make = _FRAME_MACS[mac]
        self._key = key
        self.seq = 0

    def next_frame(self) -> _FrameMac:
        frame = self._make(self._key, self.seq)
        self.seq += 1
        return frame


#: The frames whose body starts with a tensor (``numel`` elements of ``dtype``): on a shared
#: segment that tensor travels through it (requests, and OK replies that carry a dtype).
_SHM_CMDS = frozenset({Cmd.ELASTIC, Cmd.PUSH_PULL, Cmd.GRAD_PULL, Cmd.RECOVER,
                       Cmd.ELASTIC_PACKED, Cmd.OK})  # fmt: skip


class Channel:
    """The frames of one connection, in both directions (see the module docstring).

    A frame is sent as :meth:`send_header`, then any :meth:`send_body` calls and
    :meth:`end_send` (which sends ``tag_b``; a frame without a body needs none), and received
    the same way: :meth:`recv_header`, :meth:`recv_body`, then :meth:`end_recv`, which
    verifies ``tag_b``: nothing of a body may be used before it returns. Without keys
    (no secret) frames carry no tags and the checks are no-ops.

    ``deadline`` arguments are absolute (``time.monotonic()``); None leaves each wait to the
    socket's timeout. Counters: ``bytes_sent``, ``bytes_received`` (frames, tags included,
    wherever their bodies travel; a shared-memory descriptor is not counted).

    Shared memory (:meth:`use_shm`, both ends of one host; :mod:`easgd.comm.shm`): a frame
    whose body starts with a tensor of at least :data:`easgd.comm.shm.SHM_MIN` bytes that
    fits the segment (both ends decide from the header alone) puts that tensor in the
    segment, and the socket carries, where the body would begin, a descriptor: the bytes it
    wrote there (8 bytes, covered by ``tag_b``; 0 when the segment is still being read, and
    the tensor then follows on the socket). The descriptor is sent once the tensor is in the
    segment, so a receiver that reads it may read the tensor; the rest of the body (a JOIN
    reply's JSON) follows on the socket, and ``tag_b`` authenticates what the socket carried.
    """

    def __init__(
        self, sock: socket.socket, *, tx: _Direction | None = None, rx: _Direction | None = None
    ) -> None:
        self.sock = sock
        self._tx, self._rx = tx, rx
        self._tx_frame: _FrameMac | None = None
        self._rx_frame: _FrameMac | None = None
        self._tx_body = self._rx_body = 0
        self.tag_size = TAG_SIZE if tx is not None else 0
        self.bytes_sent = self.bytes_received = 0
        self.frame_started = 0.0  # when the first byte of the last header arrived
        self.shm_tx: Region | None = None
        self.shm_rx: Region | None = None
        # The frame being sent / received on a segment: its tensor's bytes by the header
        # (0: no descriptor), the bytes the descriptor says are in the segment (-1: not sent
        # or read yet).
        self._tx_plan = self._rx_plan = 0
        self._tx_shm = self._rx_shm = -1

    def use_shm(self, tx: Region, rx: Region) -> None:
        """From the next frame on, bodies' tensors travel through ``tx`` and ``rx``."""
        assert not self._tx_body and not self._rx_body, "switched in mid-frame"
        self.shm_tx, self.shm_rx = tx, rx

    def release_shm(self) -> None:
        """Drop this end's mapping of the segment (the connection is over)."""
        self.shm_tx = self.shm_rx = None

    @property
    def shared(self) -> bool:
        """Whether bodies travel through a shared segment."""
        return self.shm_tx is not None

    @staticmethod
    def _planned(region: Region | None, cmd: int, dtype: int, numel: int) -> int:
        """The bytes of a frame's tensor that go through ``region`` (0: none, no descriptor)."""
        if region is None or cmd not in _SHM_CMDS or dtype not in _ITEMSIZE or numel <= 0:
            return 0
        size = numel * _ITEMSIZE[dtype]
        return size if SHM_MIN <= size <= region.size else 0

    @property
    def authenticated(self) -> bool:
        return self._tx is not None

    def frame_size(self, body: int) -> int:
        """Bytes on the wire of a frame with a ``body``-byte body (tags included)."""
        return HEADER.size + self.tag_size + (body + self.tag_size if body else 0)

    # -- sending ---------------------------------------------------------------------------

    def send_header(
        self,
        cmd: Cmd,
        *,
        deadline: float | None = None,
        dtype: int = 0,
        flags: int = 0,
        worker_id: int = 0,
        session: int = 0,
        numel: int = 0,
        aux: int = 0,
        durable: int = 0,
        pending: int = 0,
    ) -> None:
        assert not self._tx_body, "the previous frame's body was not ended (end_send)"
        data = HEADER.pack(
            MAGIC, VERSION, int(cmd), dtype, flags, worker_id, session, numel, aux, durable,
            pending,
        )  # fmt: skip
        if self._tx is not None:
            self._tx_frame = self._tx.next_frame()
            data += self._tx_frame.header_tag(data)
        send_all(self.sock, memoryview(data), deadline=deadline)
        self.bytes_sent += len(data)
        self._tx_plan, self._tx_shm = self._planned(self.shm_tx, cmd, dtype, numel), -1

    def send_body(self, data: memoryview | bytes, *, deadline: float | None = None) -> None:
        view = memoryview(data).cast("B")
        size = len(view)
        if self._tx_plan:
            view = self._send_shared(view, deadline)
        if len(view):
            send_all(self.sock, view, deadline=deadline, mac=self._tx_frame)
        self._tx_body += size
        self.bytes_sent += size

    def _send_shared(self, view: memoryview, deadline: float | None) -> memoryview:
        """The part of ``view`` that lies within the frame's tensor goes to the segment (when
        it is free), the descriptor once the tensor is whole; returns what the socket takes."""
        region, off = self.shm_tx, self._tx_body
        assert region is not None
        if self._tx_shm < 0:
            if off == 0 and not region.free:  # never by the protocol: the socket serves
                self._tx_plan = 0
                self._send_descriptor(0, deadline)
                return view
            k = max(0, min(len(view), self._tx_plan - off))
            region.write(off, view[:k])
            if off + k >= self._tx_plan:
                self._send_descriptor(self._tx_plan, deadline)
            return view[k:]
        return view

    def _send_descriptor(self, size: int, deadline: float | None) -> None:
        region = self.shm_tx
        assert region is not None
        if size:
            region.published += 1  # before the descriptor: the receiver may read it at once
        self._tx_shm = size
        send_all(self.sock, memoryview(_DESC.pack(size)), deadline=deadline, mac=self._tx_frame)

    def end_send(self, *, deadline: float | None = None) -> None:
        if self._tx_plan and self._tx_shm < 0 and self._tx_body:  # shorter than its tensor
            self._send_descriptor(self._tx_body, deadline)
        self._tx_plan = 0
        if self._tx_frame is not None and self._tx_body:
            tag = self._tx_frame.body_tag()
            send_all(self.sock, memoryview(tag), deadline=deadline)
            self.bytes_sent += len(tag)
        self._tx_frame, self._tx_body = None, 0

    def send_frame(
        self, cmd: Cmd, body: memoryview | bytes = b"", *, deadline: float | None = None,
        **fields: int,
    ) -> None:  # fmt: skip
        """One whole frame: header, ``body`` (may be empty), tag."""
        self.send_header(cmd, deadline=deadline, **fields)
        if len(body):
            self.send_body(body, deadline=deadline)
            self.end_send(deadline=deadline)

    # -- receiving -------------------------------------------------------------------------

    def recv_header(
        self, *, wait: float | None = None, frame_timeout: float | None = None
    ) -> Header:
        """The next frame's header, authenticated before any field is read.

        ``frame_timeout`` None: every wait is the socket's timeout (the client). Otherwise
        (the server): the first byte may take ``wait`` seconds (None: forever; a plain
        ``TimeoutError`` when it does not come), the rest of the header must follow within
        ``frame_timeout`` of it (:class:`DeadlineExceeded`); ``frame_started`` records when.
        """
        assert not self._rx_body, "the previous frame's body was not verified (end_recv)"
        buf = bytearray(HEADER.size + self.tag_size)
        view = memoryview(buf)
        if frame_timeout is None:
            recv_exact(self.sock, view)
            self.frame_started = time.monotonic()
        else:
            self.sock.settimeout(wait)
            n = self.sock.recv_into(view)
            if n == 0:
                raise PeerClosedError("connection closed by the peer")
            self.frame_started = time.monotonic()
            recv_exact(self.sock, view[n:], deadline=self.frame_started + frame_timeout)
        self.bytes_received += len(buf)
        header = bytes(view[: HEADER.size])
        if self._rx is not None:
            seq = self._rx.seq
            self._rx_frame = self._rx.next_frame()
            if not hmac.compare_digest(self._rx_frame.header_tag(header), view[HEADER.size :]):
                raise IntegrityError(
                    f"frame {seq}: its header failed the integrity check (altered, replayed, "
                    "reordered or dropped in transit)"
                )
        magic, version, *fields = HEADER.unpack(header)
        if magic != MAGIC or version != VERSION:
            raise ConnectionError(
                f"not an easgd parameter-server message (magic {magic!r}, version {version})"
            )
        h = Header(*fields)
        self._rx_plan, self._rx_shm = self._planned(self.shm_rx, h.cmd, h.dtype, h.numel), -1
        return h

    def recv_body(self, view: memoryview, *, deadline: float | None = None) -> None:
        """Receive part of the body into ``view`` (not to be used before :meth:`end_recv`)."""
        view = memoryview(view).cast("B")
        size = len(view)
        if self._rx_plan:
            region, off = self.shm_rx, self._rx_body
            assert region is not None
            if self._rx_shm < 0:  # the descriptor: the sender's tensor is in the segment
                desc = bytearray(_DESC.size)
                recv_exact(self.sock, memoryview(desc), deadline=deadline, mac=self._rx_frame)
                (self._rx_shm,) = _DESC.unpack(desc)
                if self._rx_shm > self._rx_plan:
                    raise ConnectionError(
                        f"a shared-memory descriptor of {self._rx_shm} bytes for a tensor of "
                        f"{self._rx_plan}; is this an easgd peer?"
                    )
            k = max(0, min(size, self._rx_shm - off))
            region.read(off, view[:k])
            view = view[k:]
        if len(view):
            recv_exact(self.sock, view, deadline=deadline, mac=self._rx_frame)
        self._rx_body += size
        self.bytes_received += size

    def end_recv(self, *, deadline: float | None = None) -> None:
        """Verify the body received since the header (:class:`IntegrityError`)."""
        frame, body = self._rx_frame, self._rx_body
        self._rx_frame, self._rx_body = None, 0
        shared, self._rx_plan, self._rx_shm = self._rx_shm > 0, 0, -1
        if frame is None or not body:
            if shared:
                self._consumed()
            return
        tag = bytearray(TAG_SIZE)
        recv_exact(self.sock, memoryview(tag), deadline=deadline)
        self.bytes_received += TAG_SIZE
        if not hmac.compare_digest(frame.body_tag(), tag):
            assert self._rx is not None
            raise IntegrityError(
                f"frame {self._rx.seq - 1}: its body of {body} bytes failed the integrity "
                "check (altered in transit)"
            )
        if shared:
            self._consumed()

    def _consumed(self) -> None:
        """The segment's body was read and verified: the sender may write the next one."""
        region = self.shm_rx
        assert region is not None
        region.consumed = region.published

    def recv_json(self, *, deadline: float | None = None) -> tuple[Any, int]:
        """Receive what :func:`pack_json` packed, verify the frame, then parse it.

        Ends the frame (:meth:`end_recv`); returns the object and the bytes received.
        """
        head = bytearray(_JSON_LEN.size)
        self.recv_body(memoryview(head), deadline=deadline)
        (size,) = _JSON_LEN.unpack(head)
        if size > MAX_JSON:
            raise ConnectionError(f"a JSON message of {size} bytes; is this an easgd peer?")
        data = bytearray(size)
        if size:
            self.recv_body(memoryview(data), deadline=deadline)
        self.end_recv(deadline=deadline)
        try:
            obj = json.loads(data)
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError
            raise ConnectionError(f"malformed JSON message: {exc}") from exc
        return obj, _JSON_LEN.size + size

    def recv_error_text(self, header: Header, *, deadline: float | None = None) -> str:
        """The text of an ERROR frame whose header is ``header`` (verified)."""
        if not 0 <= header.numel <= MAX_ERROR:
            raise ConnectionError(f"an error message of {header.numel} bytes")
        buf = bytearray(header.numel)
        if header.numel:
            self.recv_body(memoryview(buf), deadline=deadline)
            self.end_recv(deadline=deadline)
        return buf.decode(errors="replace")


def send_error(
    chan: Channel, kind: ErrorKind, message: str, *, deadline: float | None = None
) -> None:
    """An ERROR frame: ``kind`` in ``aux``, the message as its body."""
    text = message.encode()[:MAX_ERROR]
    chan.send_frame(Cmd.ERROR, text, deadline=deadline, numel=len(text), aux=int(kind))


def pack_json(obj: Any) -> bytes:
    """``obj`` as length-prefixed UTF-8 JSON, ready to send (see :meth:`Channel.recv_json`)."""
    data = json.dumps(obj, sort_keys=True).encode()
    if len(data) > MAX_JSON:
        raise ValueError(f"a JSON message of {len(data)} bytes exceeds {MAX_JSON}")
    return _JSON_LEN.pack(len(data)) + data


# ---------------------------------------------------------------------------------------
# Handshake
# ---------------------------------------------------------------------------------------


class Handshake(NamedTuple):
    """What the server learns from a client's hello."""

    heartbeat_ms: int  # the period the client announces (the server clamps it)
    channel: Channel


def _mac(secret: bytes, role: bytes, transcript: bytes) -> bytes:
    return hmac.digest(secret, b"easgd-ps " + role + transcript, "sha256")


def _channel(
    sock: socket.socket, secret: bytes | None, mac: int, transcript: bytes, *, server: bool
) -> Channel:
    if secret is None or mac == MAC_TLS:
        return Channel(sock)
    session = _mac(secret, b"session", transcript)
    c2s = _Direction(mac, hmac.digest(session, b"client->server", "sha256"))
    s2c = _Direction(mac, hmac.digest(session, b"server->client", "sha256"))
    return Channel(sock, tx=s2c, rx=c2s) if server else Channel(sock, tx=c2s, rx=s2c)


def _server_hello(auth_required: bool, tls: bool = False) -> bytes:
    macs = (supported_macs() | (MAC_TLS if tls else 0)) if auth_required else 0
    return _SERVER_HELLO.pack(_SERVER_MAGIC, VERSION, int(auth_required), macs, 0, os.urandom(32))


def _reply(status: int, text: str = "", mac_s: bytes = bytes(_MAC_LEN)) -> bytes:
    data = text.encode()[:MAX_ERROR]
    return _REPLY.pack(_REPLY_MAGIC, VERSION, status, 0, len(data), mac_s) + data


def handshake_refusal(reason: str, *, auth_required: bool, kind: ErrorKind) -> bytes:
    """The bytes that refuse a connection before its handshake (a full server, say): a
    server hello and a refusal the client raises as ``reason`` (``kind``: AUTH is an
    :class:`AuthenticationError`, any other a ``ConnectionError``). Send them at once, e.g.
    on a non-blocking socket; ``auth_required`` as the server's, so the client gets as far
    as reading the refusal."""
    return _server_hello(auth_required) + _reply(int(kind), reason)


def server_handshake(
    sock: socket.socket, secret: bytes | None, *, deadline: float | None = None
) -> Handshake:
    """Authenticate a new connection; the whole exchange must end by ``deadline``.

    Over TLS (``sock`` an ``ssl.SSLSocket``) the server also offers :data:`MAC_TLS`, which
    a client that verified the server's certificate chooses (:func:`client_handshake`).

    Raises :class:`AuthenticationError` (after telling the client why) when the client does
    not prove knowledge of ``secret``, ``ConnectionError`` for bytes that are not an easgd
    client hello of this version (nothing is answered), and :class:`DeadlineExceeded`.
    """
    tls = isinstance(sock, ssl.SSLSocket)
    hello_s = _server_hello(secret is not None, tls)
    send_all(sock, memoryview(hello_s), deadline=deadline)
    buf = bytearray(_CLIENT_HELLO.size + _MAC_LEN)
    recv_exact(sock, memoryview(buf), deadline=deadline)
    magic, version, has_mac, mac, reserved, heartbeat_ms, _ = _CLIENT_HELLO.unpack_from(buf)
    if magic != _CLIENT_MAGIC or version != VERSION or has_mac not in (0, 1) or reserved:
        raise ConnectionError(
            f"not an easgd parameter-server client hello of version {VERSION} (magic "
            f"{magic!r}, version {version})"
        )
    transcript = hello_s + bytes(buf[: _CLIENT_HELLO.size])
    mac_s = bytes(_MAC_LEN)
    if secret is not None:
        mac_c = bytes(buf[_CLIENT_HELLO.size :])
        if not has_mac:
            reason = (
                "this parameter server requires a shared secret; pass secret= to the "
                "client or set EASGD_SECRET"
            )
        elif not hmac.compare_digest(mac_c, _mac(secret, b"client", transcript)):
            reason = "wrong shared secret; every worker and server must use the same secret"
        elif mac not in _FRAME_MACS and not (mac == MAC_TLS and tls):
            offered = _SERVER_HELLO.unpack(hello_s)[3]
            reason = f"the client chose MAC {mac}, this server offers {offered} (bits)"
        else:
            reason = ""
        if reason:
            send_all(sock, memoryview(_reply(ErrorKind.AUTH, reason)), deadline=deadline)
            raise AuthenticationError(reason)
        mac_s = _mac(secret, b"server", transcript)
    elif has_mac:
        raise ConnectionError("the client has a secret but did not stop at our hello")
    send_all(sock, memoryview(_reply(0, mac_s=mac_s)), deadline=deadline)
    return Handshake(int(heartbeat_ms), _channel(sock, secret, mac, transcript, server=True))


def _choose_mac(offered: int, sock: socket.socket) -> int:
    """The best MAC of ``offered``: TLS's own records only when this client verified the
    server's certificate and name (then nobody can sit between us and alter them)."""
    verified = (
        isinstance(sock, ssl.SSLSocket)
        and sock.context.verify_mode == ssl.CERT_REQUIRED
        and sock.context.check_hostname
    )
    usable = set(_FRAME_MACS) | ({MAC_TLS} if verified else set())
    return next((m for m in MAC_PREFERENCE if m & offered and m in usable), 0)


def client_handshake(
    sock: socket.socket, secret: bytes | None, heartbeat: float, where: str
) -> Channel:
    """The client's side of the handshake; ``where`` names the server in errors."""
    buf = bytearray(_SERVER_HELLO.size)
    recv_exact(sock, memoryview(buf))
    magic, version, auth_required, offered, _, _ = _SERVER_HELLO.unpack(buf)
    if magic != _SERVER_MAGIC or version != VERSION:
        raise ConnectionError(
            f"{where} is not an easgd parameter server of this version (magic {magic!r}, "
            f"version {version}, expected {VERSION})"
        )
    if secret is not None and not auth_required:
        raise AuthenticationError(
            f"{where} does not ask for a secret but this client has one; start the server "
            "with the same secret (or EASGD_SECRET) so that both sides are authenticated"
        )
    mac = _choose_mac(offered, sock) if secret is not None else 0
    if secret is not None and not mac:
        raise AuthenticationError(
            f"{where} offers no message authentication this client can run (macs={offered})"
        )
    heartbeat_ms = min(int(heartbeat * 1000), 2**32 - 1)
    hello_c = _CLIENT_HELLO.pack(
        _CLIENT_MAGIC, VERSION, int(secret is not None), mac, 0, heartbeat_ms, os.urandom(32)
    )
    transcript = bytes(buf) + hello_c
    mac_c = _mac(secret, b"client", transcript) if secret is not None else bytes(_MAC_LEN)
    send_all(sock, memoryview(hello_c + mac_c))
    reply = bytearray(_REPLY.size)
    recv_exact(sock, memoryview(reply))
    magic, version, status, _, size, mac_s = _REPLY.unpack(reply)
    if magic != _REPLY_MAGIC or version != VERSION or size > MAX_ERROR:
        raise ConnectionError(f"{where} answered the hello with something else ({magic!r})")
    if status:
        text = bytearray(size)
        recv_exact(sock, memoryview(text))
        reason = text.decode(errors="replace")
        if status == ErrorKind.AUTH:
            raise AuthenticationError(f"{where} refused the connection: {reason}")
        raise ConnectionError(f"{where} refused the connection: {reason}")
    if secret is not None and not hmac.compare_digest(mac_s, _mac(secret, b"server", transcript)):
        raise AuthenticationError(f"{where} did not prove that it knows the shared secret")
    return _channel(sock, secret, mac, transcript, server=False)


# ---------------------------------------------------------------------------------------
# TLS (optional): the standard library's, beneath the handshake and the frames
# ---------------------------------------------------------------------------------------


def server_tls_context(
    cert: str | os.PathLike[str],
    key: str | os.PathLike[str],
    ca: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """A server's TLS context (TLS 1.2 or later): its certificate chain and key (PEM files).

    ``ca``: when given, clients must present a certificate this CA signed (mutual TLS).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if ca is not None:
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_tls_context(
    ca: str | os.PathLike[str] | None = None,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """A client's TLS context: verifies the server's certificate and host name against
    ``ca`` (a PEM file; None: the system's CAs); ``cert``/``key``: the client's own, for a
    server that asks for one."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx
