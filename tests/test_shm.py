"""Bodies through shared memory (``easgd.comm.shm``): the same answers as TCP, bitwise, for
every served method, sharded, compressed and overlapped; what each side declines and why;
and the faults: a segment that is not the server's, a wrong token, a segment still being
read, a worker that dies between its body and its descriptor, memory that outlives a
session."""

from __future__ import annotations

import gc
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

import pytest
import torch

from easgd.algorithms import Hyperparams, Mode, Op, Request, Worker, run_settle, run_step
from easgd.comm import shm, wire
from easgd.comm.ps import ParameterServer, PSClient, PSConnectionError, shard_ranges
from easgd.comm.shm import SHM_ENV, Segment, ShmUnavailable
from test_ps import SERVED, STEPS, QuadraticGrad, make_hp, reference, wait_until

N = 40_000  # floats: 2 shards of 80 KB, each above SHM_MIN
SECRET = "shm-secret"
EASGD = Hyperparams(method="easgd", lr=0.05, tau=1, workers=4)

torch.set_num_threads(1)


@pytest.fixture
def servers() -> Any:
    made: list[ParameterServer] = []

    def make(*args: Any, **kwargs: Any) -> ParameterServer:
        kwargs.setdefault("secret", SECRET)
        made.append(ParameterServer(*args, **kwargs).start())
        return made[-1]

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def socket_bytes(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Bytes that went through sockets (both ends of an in-process server count)."""
    counted = {"bytes": 0}
    send_all = wire.send_all

    def counting(sock: Any, view: memoryview, **kwargs: Any) -> None:
        counted["bytes"] += len(view)
        send_all(sock, view, **kwargs)

    monkeypatch.setattr(wire, "send_all", counting)
    return counted


def _client(clients: Any, servers_: list[ParameterServer], n: int = N, **kw: Any) -> PSClient:
    kw.setdefault("secret", SECRET)
    kw.setdefault("heartbeat", 0)
    return clients([s.address for s in servers_], n, worker_id=kw.pop("worker_id", 0), **kw)


def _run(client: PSClient, hp: Hyperparams, x: torch.Tensor, overlap: int = 0) -> None:
    worker = Worker(hp, x, Mode.ASYNC, overlap=overlap)
    grad = QuadraticGrad(x.numel())
    for _ in range(STEPS):
        run_step(worker, grad, client.serve)
    run_settle(worker, client.serve)


# ---------------------------------------------------------------------------------------
# The same answers as TCP
# ---------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("method", "shards"), [(m, 1) for m in SERVED] + [("eamsgd", 2)])
def test_shared_memory_gives_the_in_process_centers_answers_bitwise(
    method: str, shards: int, servers: Any, clients: Any, socket_bytes: dict[str, int]
):
    hp = make_hp(method)
    c0 = torch.randn(N, generator=torch.Generator().manual_seed(1))
    ref_x, ref_center = reference(hp, c0)
    parts = [servers(hp, c0[a:b].clone(), offset=a) for a, b in shard_ranges(N, shards)]
    client = _client(clients, parts)
    x = torch.empty(N)
    client.join(x)
    _run(client, hp, x)
    # Both ends count the same bytes, wherever the bodies travelled.
    assert sum(s.stats()["bytes_in"] for s in parts) == client.bytes_sent
    assert torch.equal(x, ref_x)
    assert torch.equal(torch.cat([s.snapshot() for s in parts]), ref_center.center)
    pulled = torch.empty(N)
    client.pull(pulled, evaluation=True)  # a PULL's reply through the segment too
    assert torch.equal(pulled, ref_center.evaluation_vector())
    exchanges = client.exchanges
    for conn in client._conns:
        assert conn.shm and conn.chan.shared
        assert conn.chan.shm_tx.published == exchanges  # every request's body went there
    # The sockets carried the frames and the JOIN's center, not the exchanges' bodies.
    assert socket_bytes["bytes"] < 4 * N * 2 + 100 * (exchanges + 10) * shards
    client.bye()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("compress", "overlap"), [("none", 1), ("int8", 0), ("bf16", 1)])
def test_compressed_and_overlapped_exchanges_are_those_of_tcp(
    compress: str, overlap: int, servers: Any, clients: Any
):
    n = 2 * N  # an int8 body above SHM_MIN
    c0 = torch.randn(n, generator=torch.Generator().manual_seed(2))
    results = {}
    for use_shm in (False, True):
        server = servers(EASGD, c0.clone())
        client = _client(clients, [server], n, shm=use_shm, compress=compress)
        x = torch.empty(n)
        client.join(x)
        _run(client, EASGD, x, overlap=overlap)
        assert client._conns[0].chan.shared is use_shm
        results[use_shm] = (x.clone(), server.snapshot(), client.bytes_sent)
        client.bye()
    (x0, c_0, b0), (x1, c_1, b1) = results[False], results[True]
    assert torch.equal(x0, x1) and torch.equal(c_0, c_1) and b0 == b1


# ---------------------------------------------------------------------------------------
# Who declines, and why
# ---------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("server_shm", "client_shm", "env", "reason"),
    [
        (False, True, None, "the server declined: this server does not share memory"),
        (True, False, None, "this client does not share memory"),
        (None, None, "0", "this client does not share memory"),
    ],
)
def test_a_declined_segment_leaves_the_session_on_tcp_and_says_why(
    server_shm: bool | None,
    client_shm: bool | None,
    env: str | None,
    reason: str,
    servers: Any,
    clients: Any,
    monkeypatch: pytest.MonkeyPatch,
):
    if env is not None:
        monkeypatch.setenv(SHM_ENV, env)
    server = servers(EASGD, torch.zeros(N), shm=server_shm)
    events: list[dict[str, Any]] = []
    client = _client(clients, [server], shm=client_shm, on_event=events.append)
    x = torch.empty(N)
    client.join(x)
    _run(client, EASGD, x)
    assert not client._conns[0].chan.shared
    (event,) = [e for e in events if e["event"] == "transport"]
    assert event["shm"] is False and event["reason"].startswith(reason)


def test_a_bad_easgd_shm_value_is_a_clear_error(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(SHM_ENV, "yes")
    with pytest.raises(ValueError, match=r"EASGD_SHM='yes': use 1 .* or 0"):
        shm.resolve_shm(None)
    assert shm.resolve_shm(True) is True  # an explicit choice does not read the variable


@pytest.mark.timeout(120)
def test_a_session_that_does_not_exchange_asks_for_no_segment(servers: Any, clients: Any):
    # Idle JOINs hold no shard-sized memory: the segment comes with the first large body.
    server = servers(EASGD, torch.zeros(N))
    client = _client(clients, [server])
    x = torch.empty(N)
    client.join(x)
    client.pull(x)
    assert client._conns[0].shm is None
    client.serve(Request(Op.ELASTIC, x, torch.empty(N)))
    assert client._conns[0].shm is True


# ---------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------


def _offer(**change: Any) -> dict[str, Any]:
    seg = Segment.create(1 << 16)
    offer = seg.offer()
    offer.update(change)
    return offer


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"digest": "00" * 32}, "not the segment the server offered"),
        ({"size": 1 << 20}, "the offer says"),
        ({"pid": 2**22 + 12345}, "cannot see the server's segment"),
        ({"pid": None}, "malformed shared-memory offer"),
    ],
    ids=["another token", "another size", "no such process", "malformed"],
)
def test_a_segment_that_is_not_the_offered_one_is_never_mapped(change: dict[str, Any], match: str):
    with pytest.raises(ShmUnavailable, match=match):
        Segment.open(_offer(**change))


def test_a_file_that_is_not_a_segment_is_refused_before_it_is_opened():
    with tempfile.TemporaryFile() as f:
        f.write(b"precious")
        f.flush()
        offer = {"pid": os.getpid(), "fd": f.fileno(), "size": 8, "digest": "00" * 32}
        with pytest.raises(ShmUnavailable, match="not the server's segment"):
            Segment.open(offer)
        f.seek(0)
        assert f.read() == b"precious"


@pytest.mark.timeout(120)
def test_a_wrong_token_keeps_the_session_on_tcp(
    servers: Any, clients: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    opened = Segment.open

    def other_token(offer: Any) -> Segment:
        seg = opened(offer)
        seg.token = bytes(32)
        return seg

    monkeypatch.setattr(Segment, "open", staticmethod(other_token))
    server = servers(EASGD, torch.zeros(N))
    events: list[dict[str, Any]] = []
    client = _client(clients, [server], on_event=events.append)
    x = torch.empty(N)
    client.join(x)
    with caplog.at_level(logging.WARNING, logger="easgd.comm.ps_session"):
        _run(client, EASGD, x)
    assert not client._conns[0].chan.shared
    assert "sent another token for its segment" in caplog.text
    (event,) = [e for e in events if e["event"] == "transport"]
    assert event["reason"] == "the server did not take this client's token"
    assert torch.isfinite(server.snapshot()).all() and server.stats()["exchanges"] == STEPS


@pytest.mark.timeout(120)
def test_a_segment_still_being_read_sends_the_body_over_the_socket(
    servers: Any, clients: Any, socket_bytes: dict[str, int]
):
    c0 = torch.randn(N, generator=torch.Generator().manual_seed(3))
    ref_x, ref_center = reference(EASGD, c0)
    server = servers(EASGD, c0.clone())
    client = _client(clients, [server])
    x = torch.empty(N)
    client.join(x)
    worker = Worker(EASGD, x, Mode.ASYNC)
    grad = QuadraticGrad(N)
    run_step(worker, grad, client.serve)  # the segment is set up and used once
    chan = client._conns[0].chan
    assert chan.shared and chan.shm_tx.published == 1
    chan.shm_tx.published += 1  # as if the server had not finished reading the last body
    before = socket_bytes["bytes"]
    run_step(worker, grad, client.serve)
    assert socket_bytes["bytes"] - before > 4 * N  # the request's body took the socket
    for _ in range(STEPS - 2):
        run_step(worker, grad, client.serve)
    assert torch.equal(x, ref_x) and torch.equal(server.snapshot(), ref_center.center)


@pytest.mark.timeout(120)
def test_a_worker_that_dies_before_its_descriptor_changes_nothing(servers: Any, clients: Any):
    # Its body is in the segment, but the frame never ends: the server must not apply it.
    server = servers(EASGD, torch.zeros(N))
    doomed = _client(clients, [server], worker_id=0)
    x = torch.empty(N)
    doomed.join(x)
    doomed.serve(Request(Op.ELASTIC, x + 1, torch.empty(N)))
    center = server.snapshot()
    conn = doomed._conns[0]

    def die(size: int, deadline: float | None) -> None:
        conn.sock.close()  # the process is gone: its socket closes with it
        raise OSError("killed")

    conn.chan._send_descriptor = die  # type: ignore[method-assign]
    with pytest.raises(PSConnectionError):
        doomed.serve(Request(Op.ELASTIC, x + 100, torch.empty(N)))
    assert wait_until(lambda: server.stats()["died"] == 1)
    assert torch.equal(server.snapshot(), center)
    # The server goes on serving the others through their own segments.
    other = _client(clients, [server], worker_id=1)
    y = torch.empty(N)
    other.join(y)
    other.serve(Request(Op.ELASTIC, y, torch.empty(N)))
    assert other._conns[0].chan.shared and server.stats()["exchanges"] == 2


def _segments_mapped() -> int:
    with open("/proc/self/maps") as f:
        return sum("memfd:easgd-ps" in line for line in f)


@pytest.mark.timeout(120)
def test_a_sessions_segment_is_unmapped_when_it_ends(servers: Any, clients: Callable[..., Any]):
    gc.collect()
    before = _segments_mapped()
    server = servers(EASGD, torch.zeros(N))
    client = PSClient([server.address], N, worker_id=0, secret=SECRET, heartbeat=0)
    x = torch.empty(N)
    client.join(x)
    client.serve(Request(Op.ELASTIC, x, torch.empty(N)))
    assert _segments_mapped() > before  # the server's mapping and the worker's
    client.close()
    assert wait_until(lambda: server.stats()["left"] == 1)
    del client
    assert wait_until(lambda: gc.collect() >= 0 and _segments_mapped() == before)


@pytest.mark.timeout(120)
def test_a_session_gets_one_offer_of_a_segment(servers: Any, clients: Any):
    # The server bounds its segments: a second SHM on a session is refused, and it closes.
    server = servers(EASGD, torch.zeros(N))
    client = _client(clients, [server])
    x = torch.empty(N)
    client.join(x)
    client.serve(Request(Op.ELASTIC, x, torch.empty(N)))
    conn = client._conns[0]
    conn.chan.send_header(wire.Cmd.SHM, worker_id=0, session=conn.session)
    h = conn.chan.recv_header()
    assert h.cmd == wire.Cmd.ERROR
    assert "SHM asked for twice on one session" in conn.chan.recv_error_text(h)
    assert wait_until(lambda: server.stats()["rejected"] == 1)


@pytest.mark.timeout(120)
def test_a_closed_client_holds_no_segment(servers: Any, clients: Any):
    gc.collect()
    before = _segments_mapped()
    server = servers(EASGD, torch.zeros(N))
    client = _client(clients, [server])
    x = torch.empty(N)
    client.join(x)
    client.serve(Request(Op.ELASTIC, x, torch.empty(N)))
    client.close()
    assert wait_until(lambda: server.stats()["left"] == 1)
    # The client object lives on (a caller may keep it); its mapping does not.
    assert wait_until(lambda: gc.collect() >= 0 and _segments_mapped() == before)
    assert not client._conns[0].chan.shared
