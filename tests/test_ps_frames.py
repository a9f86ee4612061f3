"""The parameter server's frames under attack: integrity, deadlines, memory, TLS, CONTROL.

A real :class:`ParameterServer` on 127.0.0.1 with a shared secret, an honest worker that
exchanges before and after, and a :class:`Relay` (a man in the middle on loopback) that
alters, drops, replays or reorders one frame of one direction (:data:`ATTACKS`). Each row
asserts that the bad session is closed (the server counts it as rejected, with an
``auth_failure`` event, when the frame was the client's), that the center is bitwise what
the honest updates alone make it, and that the honest worker keeps exchanging. Then the
deadlines (a dripped header, a missing or partial hello), bytes that are not a hello, the
memory of idle JOINs, TLS, CONTROL and the goodbye of a worker that finished.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import queue
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from easgd.algorithms import Hyperparams, Op, Request
from easgd.comm import wire
from easgd.comm.ps import AuthenticationError, ParameterServer, PSClient, PSConnectionError
from easgd.comm.ps_client import send_control
from easgd.comm.wire import HEADER, MAGIC, VERSION, Cmd
from test_ps import sessions_of, wait_until

N = 256
HP = Hyperparams(method="downpour", lr=0.1, tau=1, workers=24)  # PUSH_PULL: center += payload
SECRET = b"frames-secret"
PATIENCE = 60.0  # bounds every wait; the waits end on events, not on this
TAG = wire.TAG_SIZE

torch.set_num_threads(1)


@pytest.fixture
def servers() -> Iterator[Callable[..., ParameterServer]]:
    made: list[ParameterServer] = []

    def make(*args: Any, **kwargs: Any) -> ParameterServer:
        made.append(ParameterServer(*args, **kwargs).start())
        return made[-1]

    yield make
    for server in made:
        server.stop()


# ---------------------------------------------------------------------------------------
# The man in the middle
# ---------------------------------------------------------------------------------------

_BODY = {Cmd.ELASTIC, Cmd.PUSH_PULL, Cmd.GRAD_PULL, Cmd.RECOVER}
Action = Callable[[bytes], list[bytes]]


def _read(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _fields(frame: bytes) -> tuple[int, int]:
    """A frame's command and numel."""
    _, _, cmd, _, _, _, _, numel, *_ = HEADER.unpack_from(frame)
    return cmd, numel


class Relay:
    """Forwards one client's connection to ``target`` frame by frame (float32 shards), and
    applies ``actions[(direction, index)]`` to frame ``index`` of ``"c2s"`` or ``"s2c"``
    (counted from the first frame after the handshake): the frames it returns are sent
    instead. ``frames`` keeps every frame as its sender sent it."""

    def __init__(self, target: tuple[str, int], actions: dict[tuple[str, int], Action]) -> None:
        self.actions = actions
        self.frames: dict[str, list[bytes]] = {"c2s": [], "s2c": []}
        self._target = target
        self._requests: queue.SimpleQueue[int] = queue.SimpleQueue()  # what the server answers
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(PATIENCE)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._socks: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def close(self) -> None:
        for sock in (self._listener, *self._socks):
            with contextlib.suppress(OSError):
                sock.close()
        self._thread.join(timeout=PATIENCE)

    def _run(self) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        server = socket.create_connection(self._target, timeout=PATIENCE)
        self._socks += [client, server]
        pumps = [
            threading.Thread(target=self._pump, args=("c2s", client, server), daemon=True),
            threading.Thread(target=self._pump, args=("s2c", server, client), daemon=True),
        ]
        for pump in pumps:
            pump.start()
        for pump in pumps:
            pump.join()

    def _pump(self, direction: str, src: socket.socket, dst: socket.socket) -> None:
        try:
            if direction == "c2s":
                dst.sendall(_read(src, wire._CLIENT_HELLO.size + 32))
            else:
                dst.sendall(_read(src, wire._SERVER_HELLO.size))
                reply = _read(src, wire._REPLY.size)
                dst.sendall(reply + _read(src, wire._REPLY.unpack(reply)[4]))
            index = 0
            while True:
                frame = self._frame(direction, src)
                self.frames[direction].append(frame)
                action = self.actions.get((direction, index))
                for out in action(frame) if action is not None else [frame]:
                    if direction == "c2s":
                        self._requests.put(_fields(out)[0])
                    dst.sendall(out)
                index += 1
        except (OSError, EOFError, queue.Empty):
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _frame(self, direction: str, src: socket.socket) -> bytes:
        frame = _read(src, HEADER.size + TAG)
        cmd, numel = _fields(frame)
        if direction == "c2s":
            size = 4 * numel if cmd in _BODY else numel if cmd == Cmd.CONTROL else 0
        else:
            request = self._requests.get(timeout=PATIENCE)
            size = 4 * numel if cmd == Cmd.OK and request != Cmd.CONTROL else numel
            if cmd == Cmd.OK and request == Cmd.JOIN:  # the shard, then the JSON trailer
                frame += _read(src, size)
                head = _read(src, 4)
                frame += head + _read(src, int.from_bytes(head, "little"))
                return frame + _read(src, TAG)
        return frame + (_read(src, size + TAG) if size else b"")


def flip(offset: int) -> Action:
    """Flip one bit of the frame at ``offset`` (negative: from its end, tag excluded)."""

    def act(frame: bytes) -> list[bytes]:
        at = offset if offset >= 0 else len(frame) - TAG + offset
        return [frame[:at] + bytes([frame[at] ^ 1]) + frame[at + 1 :]]

    return act


def drop(frame: bytes) -> list[bytes]:
    return []


class Swap:
    """Hold frame ``i`` and send it after frame ``i + 1``."""

    def __init__(self) -> None:
        self.held: list[bytes] = []

    def hold(self, frame: bytes) -> list[bytes]:
        self.held.append(frame)
        return []

    def release(self, frame: bytes) -> list[bytes]:
        return [frame, *self.held]


def replay(relay_frames: Callable[[], list[bytes]], index: int) -> Action:
    """Send the client's earlier frame ``index`` instead of this one."""
    return lambda frame: [relay_frames()[index]]


# ---------------------------------------------------------------------------------------
# Attacks on the frames of an authenticated session
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    """One man-in-the-middle attack: where, and what the client does meanwhile.

    ``plan``: ``"exchange"`` (one exchange, its frames are c2s 1 and s2c 1), ``"two"``
    (two exchanges: c2s 1 and 2), ``"pipelined"`` (a PING then an exchange without waiting:
    c2s 1 and 2), ``"join"`` (the JOIN reply is s2c 0). ``applied``: the attacked exchange
    reached the center intact (its reply was the frame altered). ``state``: how the server
    records the bad session.
    """

    name: str
    actions: Callable[[Relay], dict[tuple[str, int], Action]]
    plan: str
    state: str
    applied: bool = False


ATTACKS = [
    Attack("tampered payload", lambda r: {("c2s", 1): flip(HEADER.size + TAG + 100)},
           "exchange", "rejected"),
    Attack("tampered header", lambda r: {("c2s", 1): flip(40)}, "exchange", "rejected"),
    Attack("tampered body tag", lambda r: {("c2s", 1): flip(-1 + TAG)}, "exchange", "rejected"),
    Attack("tampered reply", lambda r: {("s2c", 1): flip(HEADER.size + TAG + 7)}, "exchange",
           "died", applied=True),
    Attack("tampered JSON trailer", lambda r: {("s2c", 0): flip(-2)}, "join", "died"),
    Attack("replayed frame", lambda r: {("c2s", 2): replay(lambda: r.frames["c2s"], 1)},
           "two", "rejected"),
    Attack("reordered frames", lambda r: (lambda s: {("c2s", 1): s.hold,
                                                     ("c2s", 2): s.release})(Swap()),
           "pipelined", "rejected"),
    Attack("dropped frame", lambda r: {("c2s", 1): drop}, "pipelined", "rejected"),
]  # fmt: skip


def _attacked_exchanges(plan: str, client: PSClient, x: Tensor) -> None:
    """What the attacked client does; it must end in an integrity failure."""
    ones = torch.ones(N)
    if plan == "join":
        client.join(x)
        return
    client.join(x)
    if plan == "two":
        client.serve(Request(Op.PUSH_PULL, ones, x))
    if plan == "pipelined":
        conn = client._conns[0]
        client._send(conn, Cmd.PING, None)
        client._send(conn, Cmd.PUSH_PULL, ones)
        client._recv(conn, None)  # the server's answer: the ERROR of a broken sequence
        return
    client.serve(Request(Op.PUSH_PULL, ones, x))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_frames_altered_in_transit_are_refused_before_use(
    attack: Attack, servers: Any, clients: Any
):
    events: list[dict[str, Any]] = []
    server = servers(HP, torch.zeros(N), secret=SECRET, on_event=events.append)
    honest = clients([server.address], N, worker_id=0, secret=SECRET, heartbeat=0.1)
    x = torch.empty(N)
    honest.join(x)
    honest.serve(Request(Op.PUSH_PULL, torch.ones(N), x))
    relay = Relay(server.address, {})
    relay.actions = attack.actions(relay)
    try:
        victim = clients([relay.address], N, worker_id=1, secret=SECRET, heartbeat=0)
        before = server.snapshot()
        if attack.plan == "two":  # the first exchange is honest: it is in the snapshot
            before += 1
        with pytest.raises(PSConnectionError, match="integrity check") as info:
            _attacked_exchanges(attack.plan, victim, torch.empty(N))
        assert isinstance(info.value.__cause__, wire.IntegrityError)
        expected = before + 1 if attack.applied else before
        assert wait_until(lambda: sessions_of(server, 1)[-1]["state"] == attack.state)
        assert torch.equal(server.snapshot(), expected)
        if attack.state == "rejected":
            assert "integrity check failed" in sessions_of(server, 1)[-1]["reason"]
            assert wait_until(lambda: any(e["event"] == "auth_failure" for e in events))
            assert server.stats()["rejected"] == 1
    finally:
        relay.close()
    # The honest worker goes on, and its update is the only change.
    honest.serve(Request(Op.PUSH_PULL, torch.ones(N), x))
    assert torch.equal(server.snapshot(), expected + 1) and torch.equal(x, expected + 1)
    assert sessions_of(server, 0)[0]["state"] == "active"


@pytest.mark.timeout(120)
def test_the_relay_itself_forwards_faithfully(servers: Any, clients: Any):
    server = servers(HP, torch.zeros(N), secret=SECRET)
    relay = Relay(server.address, {})
    try:
        client = clients([relay.address], N, worker_id=1, secret=SECRET, heartbeat=0)
        x = torch.empty(N)
        client.join(x)
        for _ in range(3):
            client.serve(Request(Op.PUSH_PULL, torch.ones(N), x))
        assert torch.equal(x, torch.full((N,), 3.0))
        client.bye()
        assert len(relay.frames["c2s"]) == 5 and len(relay.frames["s2c"]) == 5
    finally:
        relay.close()


@pytest.mark.timeout(120)
def test_both_ends_count_the_same_bytes_tags_included(servers: Any, clients: Any):
    server = servers(HP, torch.zeros(N), secret=SECRET)
    client = clients([server.address], N, worker_id=0, secret=SECRET, heartbeat=0)
    x = torch.empty(N)
    client.join(x)
    client.serve(Request(Op.PUSH_PULL, torch.ones(N), x))
    stats = server.stats()
    assert (stats["bytes_in"], stats["bytes_out"]) == (client.bytes_sent, client.bytes_received)
    exchange = HEADER.size + TAG + 4 * N + TAG
    assert client.bytes_sent == HEADER.size + TAG + exchange  # the JOIN, then the payload


@pytest.mark.timeout(120)
def test_without_a_secret_frames_carry_no_tags(servers: Any, clients: Any):
    # Only on loopback (the server refuses to listen elsewhere without a secret).
    server = servers(HP, torch.zeros(N))
    client = clients([server.address], N, worker_id=0, heartbeat=0)
    client.join(torch.empty(N))
    chan = client._conns[0].chan
    assert not chan.authenticated and chan.frame_size(4 * N) == HEADER.size + 4 * N


# ---------------------------------------------------------------------------------------
# Deadlines and bytes that are not a hello
# ---------------------------------------------------------------------------------------


def _connect(server: ParameterServer) -> socket.socket:
    sock = socket.create_connection(server.address, timeout=PATIENCE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _closed_within(sock: socket.socket, bound: float, drip: bytes = b"") -> float:
    """Seconds until the server closes ``sock`` (sending ``drip`` one byte per 0.2 s
    meanwhile); fails after ``bound``."""
    began = time.monotonic()
    sock.settimeout(0.2)
    for i in range(len(drip) + int(bound / 0.2) + 1):
        try:
            if i < len(drip):
                sock.sendall(drip[i : i + 1])
            if sock.recv(1 << 16) == b"":
                return time.monotonic() - began
        except TimeoutError:
            pass
        except OSError:  # a reset: closed too
            return time.monotonic() - began
        if time.monotonic() - began > bound:
            break
    pytest.fail(f"the server kept the connection open for more than {bound} s")


DEADLINE = 0.5  # the server's handshake and frame deadlines in these tests
BOUND = 10 * DEADLINE  # generous: the drop may wait for a loaded CPU, never for the drip


@pytest.mark.timeout(120)
def test_a_header_dripped_byte_by_byte_is_dropped_at_its_deadline(servers: Any):
    server = servers(HP, torch.zeros(N), secret=SECRET, frame_timeout=DEADLINE)
    sock = _connect(server)
    chan = wire.client_handshake(sock, SECRET, 1.0, "the test's server")
    chan.send_header(Cmd.JOIN, dtype=1, worker_id=3, numel=N, session=7)
    chan.recv_header()
    chan.recv_body(memoryview(bytearray(4 * N)))
    chan.recv_json()
    # A PING's header and tag, one byte every 0.2 s: 14 s whole, no recv ever waits 0.5 s.
    header = HEADER.pack(MAGIC, VERSION, int(Cmd.PING), 0, 0, 3, 0, 0, 0, 0, 0) + bytes(TAG)
    assert _closed_within(sock, BOUND, drip=header) < BOUND
    sock.close()
    assert wait_until(lambda: sessions_of(server, 3)[0]["state"] == "died")
    assert "within 0.5 s" in sessions_of(server, 3)[0]["reason"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sent", [0, 20], ids=["nothing", "half a hello"])
def test_a_handshake_that_does_not_end_in_time_is_dropped(sent: int, servers: Any):
    server = servers(HP, torch.zeros(N), secret=SECRET, handshake_timeout=DEADLINE)
    sock = _connect(server)
    assert _read(sock, wire._SERVER_HELLO.size)[:4] == b"EAHS"  # the server speaks first
    hello = wire._CLIENT_HELLO.pack(b"EAHC", VERSION, 1, wire.MAC_HMAC_SHA256, 0, 1000,
                                    bytes(32))  # fmt: skip
    sock.sendall(hello[:sent])
    assert _closed_within(sock, BOUND) < BOUND
    sock.close()
    assert server.stats()["sessions"] == []


_HELLO = wire._CLIENT_HELLO.size + 32  # what the server reads before it checks anything
GARBAGE = {
    "a header-shaped blob": HEADER.pack(MAGIC, VERSION, int(Cmd.JOIN), 1, 0, 0, 9, N, 0, 0, 0),
    "a version 3 hello": b"EAPS" + bytes([3, 0]) + (1000).to_bytes(4, "little") + bytes(64),
    "another version": b"EAHC" + bytes([VERSION + 1]),
    "a reserved byte set": b"EAHC" + bytes([VERSION, 0, 0, 1]),
    "random bytes": bytes(range(7, 7 + _HELLO)),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("blob", GARBAGE.values(), ids=GARBAGE.keys())
def test_bytes_that_are_not_a_hello_are_refused(
    blob: bytes, servers: Any, clients: Any, caplog: pytest.LogCaptureFixture
):
    # No secret: nothing but the hello's own checks stands between these bytes and a session.
    server = servers(HP, torch.zeros(N))
    sock = _connect(server)
    with caplog.at_level("INFO", logger="easgd.comm.ps_session"):
        # Sent before the server's hello, as a frame sent too early would be.
        sock.sendall(blob.ljust(_HELLO, b"\0"))
        assert _read(sock, wire._SERVER_HELLO.size)[:4] == b"EAHS"
        _closed_within(sock, PATIENCE)  # no reply: closed, and not by the 10 s deadline
        assert wait_until(lambda: f"client hello of version {VERSION}" in caplog.text)
    sock.close()
    assert server.stats()["sessions"] == [] and server.t == 0
    honest = clients([server.address], N, worker_id=0, heartbeat=0)
    honest.join(torch.empty(N))  # the server still serves


# ---------------------------------------------------------------------------------------
# Memory of idle sessions
# ---------------------------------------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.timeout(180)
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_idle_joins_hold_no_shard_sized_memory(servers: Any, clients: Any):
    n = 1_900_000  # a 7.6 MB shard
    shard_mb = 4 * n / 2**20
    server = servers(HP, torch.zeros(n), secret=SECRET, max_connections=64)
    x = torch.zeros(n)  # every client joins into this one tensor: only the server allocates
    clients([server.address], n, worker_id=23, secret=SECRET, heartbeat=0).join(x)  # warm-up
    before = _rss_mb()
    for worker_id in range(20):
        clients([server.address], n, worker_id=worker_id, secret=SECRET, heartbeat=0).join(x)
    grown = _rss_mb() - before
    assert grown < 3 * shard_mb, f"20 idle JOINs grew the RSS by {grown:.0f} MB"
    assert server.stats()["active"] == 21


# ---------------------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------------------


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (``cryptography``, else ``openssl``)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.skip("no cryptography package and no openssl command to make a certificate")
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
             "-days", "1", "-subj", "/CN=easgd test", "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "easgd test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("secret", [SECRET, None], ids=["secret", "no secret"])
def test_tls_round_trip(secret: bytes | None, certificate: Any, servers: Any, clients: Any):
    cert, key = certificate
    tls = wire.server_tls_context(cert, key)
    server = servers(HP, torch.zeros(N), secret=secret, tls=tls)
    verifying = wire.client_tls_context(ca=cert)
    client = clients([server.address], N, worker_id=0, secret=secret, tls=verifying)
    x = torch.empty(N)
    client.join(x)
    client.serve(Request(Op.PUSH_PULL, torch.ones(N), x))
    assert torch.equal(x, torch.ones(N)) and torch.equal(server.snapshot(), torch.ones(N))
    # A client that verified the certificate relies on the TLS records; one that did not
    # (it might be talking to a relay that terminates TLS) keeps the frames' own tags.
    assert not client._conns[0].chan.authenticated
    blind = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    blind.check_hostname, blind.verify_mode = False, ssl.CERT_NONE
    other = clients([server.address], N, worker_id=1, secret=secret, tls=blind)
    other.join(x)
    other.serve(Request(Op.PUSH_PULL, torch.ones(N), x))
    assert other._conns[0].chan.authenticated == (secret is not None)
    assert torch.equal(server.snapshot(), torch.full((N,), 2.0))
    client.close()
    assert wait_until(lambda: sessions_of(server, 0)[0]["state"] == "left")
    # Stopping the server ends a live TLS session at once (not after its silence).
    server.stop()
    assert sessions_of(server, 1)[0]["state"] == "closed"


@pytest.mark.timeout(120)
def test_tls_refusals_are_clear(certificate: Any, servers: Any, clients: Any, tmp_path: Path):
    cert, key = certificate
    tls = wire.server_tls_context(cert, key)
    server = servers(HP, torch.zeros(N), secret=SECRET, tls=tls, handshake_timeout=DEADLINE)
    (tmp_path / "other").mkdir()
    other_ca, _ = self_signed_certificate(tmp_path / "other")
    with pytest.raises(AuthenticationError, match="certificate"):  # trusts another CA
        clients([server.address], N, worker_id=0, secret=SECRET,
                tls=wire.client_tls_context(ca=other_ca))  # fmt: skip
    with pytest.raises(PSConnectionError, match="speaks TLS"):  # no TLS at all
        clients([server.address], N, worker_id=0, secret=SECRET, connect_timeout=0)
    honest = clients([server.address], N, worker_id=0, secret=SECRET,
                     tls=wire.client_tls_context(ca=cert))  # fmt: skip
    honest.join(torch.empty(N))


# ---------------------------------------------------------------------------------------
# CONTROL and the goodbye of a worker that finished
# ---------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_control_round_trip_and_refusal(servers: Any):
    server = servers(HP, torch.zeros(N), secret=SECRET)
    answer = send_control(server.address, {"query": "status"}, secret=SECRET, timeout=PATIENCE)
    assert isinstance(answer, dict) and answer == server.control({"query": "status"})
    with pytest.raises(ValueError, match="refused the control message"):
        send_control(server.address, {"no such key": 1}, secret=SECRET, timeout=PATIENCE)
    with pytest.raises(AuthenticationError, match="wrong shared secret"):
        send_control(server.address, {"query": "status"}, secret=b"wrong", timeout=PATIENCE)
    assert server.stats()["sessions"] == []  # a control connection is not a session


@pytest.mark.timeout(120)
def test_a_tampered_control_message_is_refused(servers: Any):
    events: list[dict[str, Any]] = []
    server = servers(HP, torch.zeros(N), secret=SECRET, on_event=events.append)
    relay = Relay(server.address, {("c2s", 0): flip(-3)})
    try:
        with pytest.raises(PSConnectionError, match="integrity check"):
            send_control(relay.address, {"lost": [1]}, secret=SECRET, timeout=PATIENCE)
    finally:
        relay.close()
    assert wait_until(lambda: any(e["event"] == "auth_failure" for e in events))
    assert server.control({"query": "status"})["lost"] == []


@pytest.mark.timeout(120)
def test_the_goodbye_says_whether_the_worker_finished(servers: Any):
    server = servers(HP, torch.zeros(N), secret=SECRET)
    ends: dict[int, Callable[[PSClient], None]] = {
        0: lambda c: c.close(),  # the end of a worker's loop: its budget is spent
        1: lambda c: c.bye(done=False),  # leaves before its end
        2: lambda c: c.close(clean=False),  # crashed: no goodbye at all
    }
    for worker_id, end in ends.items():
        client = PSClient([server.address], N, worker_id=worker_id, secret=SECRET, heartbeat=0)
        client.join(torch.empty(N))
        end(client)
        client.close(clean=False)
    assert wait_until(lambda: server.stats()["active"] == 0)
    got = {s["worker_id"]: (s["state"], s["done"]) for s in server.stats()["sessions"]}
    assert got == {0: ("left", True), 1: ("left", False), 2: ("died", False)}
