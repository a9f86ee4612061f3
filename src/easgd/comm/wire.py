"""The parameter server's wire format: fixed headers, raw tensor bytes, HMAC handshake.

Every message is one fixed-size :data:`HEADER` (``struct``) followed by ``numel`` elements
of raw tensor bytes (or, for :attr:`Cmd.ERROR`, ``numel`` bytes of UTF-8 text). Tensors
travel without copies: :func:`tensor_bytes` is a ``memoryview`` of the tensor's own memory,
sent with :func:`send_all` and received with ``socket.recv_into``.

The reply to JOIN is the only message with a trailer: after the center shard comes the
server's configuration as length-prefixed JSON (:func:`pack_json`: a little-endian
``uint32`` byte count, then UTF-8 JSON ``{"hp": Hyperparams.to_dict()}``), so that a
worker learns p, alpha, beta and tau from the server it exchanges with::

    server -> client   OK header (session, numel, aux = t) + shard bytes + JSON trailer

Recovery (version 3). Every OK reply carries two checkpoint clocks of the shard: ``durable``,
the sequence number of its last checkpoint safely on disk (0: only the initial center, which
a restart rebuilds from the seed), and ``pending``, the sequence number of the checkpoint that
will hold the update just applied. A worker keeps, per shard, the sum of its own
contributions to the center (and their count) by ``pending`` and drops the sums at or below
``durable``. When a shard restarts from its checkpoint ``D``, the worker JOINs again with
``flags = JOIN_RECOVER`` and sends RECOVER: the sum of its contributions after ``D`` and,
in ``aux``, how many exchanges they are; the server adds them to the center, so no update
of a live worker is lost::

    client -> server   RECOVER header (numel, aux = exchanges) + the summed contributions
    server -> client   OK header (aux = t, durable, pending)

Handshake, on every new connection, before anything else::

    server -> client   MAGIC, version, auth_required, nonce_s (32 bytes)
    client -> server   MAGIC, version, has_mac, heartbeat_ms, nonce_c, mac_c
    server -> client   OK header + mac_s  |  ERROR header + message

with ``mac_c = HMAC-SHA256(secret, b"easgd-ps client" + nonce_s + nonce_c)`` and ``mac_s``
the same with ``b"easgd-ps server"``, compared with :func:`hmac.compare_digest`; both sides
prove they know the secret and the fresh nonces prevent replay. The client announces its
heartbeat period so the server can tell a silent peer from a slow one without tuning.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import os
import socket
import struct
from typing import Any, NamedTuple

import torch
from torch import Tensor

from easgd.algorithms import Op

__all__ = [
    "CMD_OP",
    "DEFAULT_HEARTBEAT",
    "DEFAULT_TIMEOUT",
    "ERRORS",
    "HEADER",
    "JOIN_RECOVER",
    "MAGIC",
    "OP_CMD",
    "SECRET_ENV",
    "AuthenticationError",
    "Cmd",
    "DeclaredDeadError",
    "ErrorKind",
    "Header",
    "PeerClosedError",
    "client_handshake",
    "configure_socket",
    "dtype_code",
    "dtype_from_code",
    "pack_json",
    "recv_error_text",
    "recv_exact",
    "recv_header",
    "recv_json",
    "resolve_secret",
    "send_all",
    "send_error",
    "send_header",
    "server_handshake",
    "shard_ranges",
    "tensor_bytes",
]

MAGIC = b"EAPS"
VERSION = 3  # 2: JOIN carries the server's hyperparameters; 3: checkpoint clocks, RECOVER

# magic, version, cmd, dtype, flags, worker_id, session, numel, aux, durable, pending
HEADER = struct.Struct("<4sBBBBiqqqqq")
JOIN_RECOVER = 1  # JOIN flag: a live worker reconnecting to a restarted shard
_SERVER_HELLO = struct.Struct("<4sBB32s")
_CLIENT_HELLO = struct.Struct("<4sBBI32s32s")
_MAC_LEN = 32
_JSON_LEN = struct.Struct("<I")
MAX_JSON = 1 << 20  # bytes; a longer trailer is not from an easgd server
DEFAULT_HEARTBEAT = 1.0  # seconds between the client's pings while it is idle
DEFAULT_TIMEOUT = 30.0  # seconds without progress before either side gives up on a message
SECRET_ENV = "EASGD_SECRET"


class Cmd(enum.IntEnum):
    JOIN = 1  # header only; reply: the center shard + JSON trailer (header.session = new id)
    ELASTIC = 2  # payload x -> reply d = alpha*(x - center)
    PUSH_PULL = 3  # payload acc -> reply center
    GRAD_PULL = 4  # payload g -> reply center
    PULL = 5  # header only (aux=1: evaluation vector) -> reply center
    BYE = 6  # clean exit
    PING = 7  # heartbeat; reply: header only (aux = center clock)
    RECOVER = 8  # payload: a worker's contributions the restarted shard's checkpoint lacks
    OK = 16
    ERROR = 17


class ErrorKind(enum.IntEnum):
    """What an ERROR message becomes on the client (sent in ``aux``)."""

    VALUE = 1  # bad input: ValueError
    AUTH = 2  # refused: AuthenticationError
    SERVER = 3  # the server failed: RuntimeError
    DECLARED_DEAD = 4  # the server gave up on this silent session: DeclaredDeadError


class AuthenticationError(PermissionError):
    """The peer did not prove that it knows the shared secret (do not retry)."""


class PeerClosedError(ConnectionError):
    """The peer closed the connection (EOF)."""


class DeclaredDeadError(ConnectionError):
    """The server declared this session dead (silent too long) while the server lives on."""


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
}
_CODES = {v: k for k, v in _DTYPES.items()}


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


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; EOF before the end raises :class:`PeerClosedError`."""
    got, size = 0, len(view)
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise PeerClosedError("connection closed by the peer")
        got += n


def send_all(sock: socket.socket, view: memoryview) -> None:
    """Send all of ``view``; the socket's timeout bounds each wait for progress.

    ``socket.sendall`` applies its timeout to the whole buffer, which would make a large
    payload on a slow link look like a dead peer.
    """
    sent, size = 0, len(view)
    while sent < size:
        sent += sock.send(view[sent:])


def send_header(
    sock: socket.socket,
    cmd: Cmd,
    *,
    dtype: int = 0,
    flags: int = 0,
    worker_id: int = 0,
    session: int = 0,
    numel: int = 0,
    aux: int = 0,
    durable: int = 0,
    pending: int = 0,
) -> int:
    sock.sendall(
        HEADER.pack(
            MAGIC, VERSION, int(cmd), dtype, flags, worker_id, session, numel, aux, durable,
            pending,
        )
    )  # fmt: skip
    return HEADER.size


def recv_header(sock: socket.socket) -> Header:
    buf = bytearray(HEADER.size)
    recv_exact(sock, memoryview(buf))
    magic, version, *fields = HEADER.unpack(buf)
    if magic != MAGIC or version != VERSION:
        raise ConnectionError(
            f"not an easgd parameter-server message (magic {magic!r}, version {version}); "
            "is something else listening on this port?"
        )
    return Header(*fields)


def send_error(sock: socket.socket, kind: ErrorKind, message: str) -> None:
    text = message.encode()
    send_header(sock, Cmd.ERROR, numel=len(text), aux=int(kind))
    sock.sendall(text)


def recv_error_text(sock: socket.socket, header: Header) -> str:
    buf = bytearray(min(header.numel, 1 << 16))
    recv_exact(sock, memoryview(buf))
    return buf.decode(errors="replace")


def pack_json(obj: Any) -> bytes:
    """``obj`` as length-prefixed UTF-8 JSON, ready to send (see :func:`recv_json`)."""
    data = json.dumps(obj, sort_keys=True).encode()
    if len(data) > MAX_JSON:
        raise ValueError(f"a JSON message of {len(data)} bytes exceeds {MAX_JSON}")
    return _JSON_LEN.pack(len(data)) + data


def recv_json(sock: socket.socket) -> tuple[Any, int]:
    """Receive what :func:`pack_json` packed; returns the object and the bytes received."""
    head = bytearray(_JSON_LEN.size)
    recv_exact(sock, memoryview(head))
    (size,) = _JSON_LEN.unpack(head)
    if size > MAX_JSON:
        raise ConnectionError(f"a JSON message of {size} bytes; is this an easgd server?")
    data = bytearray(size)
    recv_exact(sock, memoryview(data))
    try:
        obj = json.loads(data)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError
        raise ConnectionError(f"malformed JSON message: {exc}") from exc
    return obj, _JSON_LEN.size + size


def _mac(secret: bytes, role: bytes, nonce_s: bytes, nonce_c: bytes) -> bytes:
    return hmac.new(secret, b"easgd-ps " + role + nonce_s + nonce_c, hashlib.sha256).digest()


def server_handshake(sock: socket.socket, secret: bytes | None) -> int:
    """Authenticate a new connection; returns the client's heartbeat period in ms.

    Raises :class:`AuthenticationError` (after telling the client why) when the client does
    not prove knowledge of ``secret``.
    """
    nonce_s = os.urandom(32)
    sock.sendall(_SERVER_HELLO.pack(MAGIC, VERSION, int(secret is not None), nonce_s))
    buf = bytearray(_CLIENT_HELLO.size)
    recv_exact(sock, memoryview(buf))
    magic, version, has_mac, heartbeat_ms, nonce_c, mac_c = _CLIENT_HELLO.unpack(buf)
    if magic != MAGIC or version != VERSION:
        raise ConnectionError(f"not an easgd parameter-server client (magic {magic!r})")
    mac_s = bytes(_MAC_LEN)
    if secret is not None:
        if not has_mac:
            reason = (
                "this parameter server requires a shared secret; pass secret= to the "
                "client or set EASGD_SECRET"
            )
        elif not hmac.compare_digest(mac_c, _mac(secret, b"client", nonce_s, nonce_c)):
            reason = "wrong shared secret; every worker and server must use the same secret"
        else:
            reason = ""
        if reason:
            send_error(sock, ErrorKind.AUTH, reason)
            raise AuthenticationError(reason)
        mac_s = _mac(secret, b"server", nonce_s, nonce_c)
    send_header(sock, Cmd.OK)
    sock.sendall(mac_s)
    return int(heartbeat_ms)


def client_handshake(
    sock: socket.socket, secret: bytes | None, heartbeat: float, where: str
) -> None:
    """The client's side of the handshake; ``where`` names the server in errors."""
    buf = bytearray(_SERVER_HELLO.size)
    recv_exact(sock, memoryview(buf))
    magic, version, auth_required, nonce_s = _SERVER_HELLO.unpack(buf)
    if magic != MAGIC or version != VERSION:
        raise ConnectionError(
            f"{where} is not an easgd parameter server of this version (magic {magic!r}, "
            f"version {version}, expected {VERSION})"
        )
    if secret is not None and not auth_required:
        raise AuthenticationError(
            f"{where} does not ask for a secret but this client has one; start the server "
            "with the same secret (or EASGD_SECRET) so that both sides are authenticated"
        )
    nonce_c = os.urandom(32)
    mac_c = _mac(secret, b"client", nonce_s, nonce_c) if secret is not None else bytes(_MAC_LEN)
    heartbeat_ms = min(int(heartbeat * 1000), 2**32 - 1)
    sock.sendall(
        _CLIENT_HELLO.pack(MAGIC, VERSION, int(secret is not None), heartbeat_ms, nonce_c, mac_c)
    )
    header = recv_header(sock)
    if header.cmd == Cmd.ERROR:
        reason = recv_error_text(sock, header)
        raise AuthenticationError(f"{where} refused the connection: {reason}")
    mac_s = bytearray(_MAC_LEN)
    recv_exact(sock, memoryview(mac_s))
    if secret is not None and not hmac.compare_digest(
        bytes(mac_s), _mac(secret, b"server", nonce_s, nonce_c)
    ):
        raise AuthenticationError(f"{where} did not prove that it knows the shared secret")
