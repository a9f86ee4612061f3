"""The asynchronous parameter server: parity with an in-process Center, sharding, atomicity,
real SIGKILLs of workers and servers, checkpoints, authentication, bad input, the client as
a Transport and the hyperparameters it learns at JOIN, benchmark."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from easgd.algorithms import METHODS, Center, Hyperparams, Mode, Op, Request, Worker, run_step
from easgd.comm.base import Traffic, Transport
from easgd.comm.ps import (
    AuthenticationError,
    ParameterServer,
    PSClient,
    PSConnectionError,
    read_checkpoint,
    shard_ranges,
)
from easgd.comm.wire import Cmd
from easgd.runlog import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "ps_worker.py"
SERVED = [name for name, spec in METHODS.items() if spec.server_op is not None]
STEPS = 25
DOWNPOUR = Hyperparams(method="downpour", lr=0.1, tau=1, workers=3)

torch.set_num_threads(1)


def make_hp(method: str) -> Hyperparams:
    spec = METHODS[method]
    kw: dict[str, Any] = {"method": method, "lr": 0.05, "workers": 4}
    kw.update(tau=spec.fixed_tau or 3, lr_decay=0.01, lr_power=0.5)
    if spec.uses("momentum"):
        kw["momentum"] = 0.9
    if spec.uses("moving_rate"):
        kw["moving_rate"] = 0.1
    return Hyperparams(**kw)


class QuadraticGrad:
    """``g = h * x + noise_t`` with a fixed noise sequence: a deterministic stochastic gradient."""

    def __init__(self, n: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.h = torch.linspace(0.5, 2.0, n)
        self.noise = 0.1 * torch.randn(STEPS, n, generator=gen)
        self.calls = 0

    def __call__(self, x: Tensor, out: Tensor) -> float:
        torch.mul(self.h, x, out=out)
        out.add_(self.noise[self.calls])
        self.calls += 1
        return float(0.5 * (self.h * x * x).sum())


# How long a test waits for an event before it fails. Only a failing test waits that long,
# so it is generous: a loaded machine starts a process in tens of seconds.
PATIENCE = 60.0


def wait_until(pred: Callable[[], bool], timeout: float = PATIENCE, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


@pytest.fixture
def servers() -> Iterator[Callable[..., ParameterServer]]:
    made: list[ParameterServer] = []

    def make(*args: Any, **kwargs: Any) -> ParameterServer:
        made.append(ParameterServer(*args, **kwargs))
        return made[-1]

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def spawn(*args: object) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"proc{len(started)}.log").open("wb")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, str(SCRIPT), *map(str, args)]
        started.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=log, cwd=ROOT))
        return started[-1]

    yield spawn
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def sessions_of(server: ParameterServer, worker_id: int) -> list[dict[str, Any]]:
    return [s for s in server.stats()["sessions"] if s["worker_id"] == worker_id]


# ---------------------------------------------------------------------------------------
# Parity with the in-process Center, and sharding
# ---------------------------------------------------------------------------------------


def reference(hp: Hyperparams, c0: Tensor) -> tuple[Tensor, Center]:
    center = Center(hp, c0.clone())
    worker = Worker(hp, c0.clone(), Mode.ASYNC)
    grad = QuadraticGrad(c0.numel())
    for _ in range(STEPS):
        run_step(worker, grad, lambda r: center.handle(r.op, r.payload, r.reply))
    return worker.x, center


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("method", "shards"),
    [(m, 1) for m in SERVED] + [(m, s) for m in SERVED[1:3] + SERVED[4:] for s in (2, 3)],
)
def test_parity_with_in_process_center(method: str, shards: int, servers: Any, clients: Any):
    hp, n = make_hp(method), 65
    c0 = torch.randn(n, generator=torch.Generator().manual_seed(1))
    ref_x, ref_center = reference(hp, c0)

    parts = [servers(hp, c0[a:b].clone(), offset=a).start() for a, b in shard_ranges(n, shards)]
    client = clients([s.address for s in parts], n, worker_id=0)
    x = torch.empty(n)
    client.join(x)
    assert_close(x, c0, rtol=0, atol=0)
    worker = Worker(hp, x, Mode.ASYNC)
    grad = QuadraticGrad(n)
    for _ in range(STEPS):
        run_step(worker, grad, client.serve)

    assert_close(x, ref_x)
    assert_close(torch.cat([s.snapshot() for s in parts]), ref_center.center)
    assert_close(
        torch.cat([s.snapshot(evaluation=True) for s in parts]), ref_center.evaluation_vector()
    )
    pulled = torch.empty(n)
    client.pull(pulled, evaluation=True)
    assert_close(pulled, ref_center.evaluation_vector())
    assert all(s.t == ref_center.t for s in parts)
    assert client.exchanges == len(range(0, STEPS, hp.tau))  # one per t % tau == 0
    client.bye()
    assert all(s.stats()["left"] == 1 and s.stats()["died"] == 0 for s in parts)


def test_shard_ranges_are_contiguous_and_balanced():
    assert shard_ranges(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_ranges(5, 1) == [(0, 5)]
    with pytest.raises(ValueError, match="shards=0"):
        shard_ranges(5, 0)
    with pytest.raises(ValueError, match="numel=2"):
        shard_ranges(2, 3)


# ---------------------------------------------------------------------------------------
# Atomicity: a known answer under concurrency
# ---------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_concurrent_exchanges_from_threads_lose_nothing(servers: Any):
    n, k, m = 20_000, 4, 100
    server = servers(DOWNPOUR, torch.full((n,), 0.5)).start()
    errors: list[str] = []

    def work(i: int) -> None:
        try:
            with PSClient([server.address], n, worker_id=i) as client:
                x, ones = torch.empty(n), torch.ones(n)
                client.join(x)
                for _ in range(m):
                    client.serve(Request(Op.PUSH_PULL, ones, x))
                    # The reply is the center right after this update: no torn read.
                    if not bool((x == 0.5 + client.server_t[0]).all()):
                        errors.append(f"worker {i}: torn or stale reply at t={client.server_t}")
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=PATIENCE)
    assert not errors
    assert_close(server.snapshot(), torch.full((n,), 0.5 + k * m), rtol=0, atol=0)
    stats = server.stats()
    assert (stats["t"], stats["exchanges"], stats["left"], stats["died"]) == (k * m, k * m, k, 0)
    assert all(s["exchanges"] == m for s in stats["sessions"])


@pytest.mark.timeout(300)
def test_concurrent_exchanges_from_processes_lose_nothing(servers: Any, procs: Any):
    n, k, m = 20_000, 3, 100
    server = servers(DOWNPOUR, torch.zeros(n)).start()
    port = server.address[1]
    workers = [
        procs(
            "worker", "--port", port, "--numel", n, "--worker-id", i, "--exchanges", m, "--sleep", 0
        )
        for i in range(k)
    ]
    assert [p.wait(timeout=PATIENCE) for p in workers] == [0] * k
    assert_close(server.snapshot(), torch.full((n,), float(k * m)), rtol=0, atol=0)
    stats = server.stats()
    assert (stats["exchanges"], stats["left"], stats["died"]) == (k * m, k, 0)


# ---------------------------------------------------------------------------------------
# Faults, with real SIGKILLs
# ---------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_killed_worker_blocks_no_one_and_a_replacement_rejoins(
    servers: Any, procs: Any, tmp_path: Path
):
    n = 1000
    events: list[dict[str, Any]] = []
    server = servers(DOWNPOUR, torch.zeros(n), on_event=events.append).start()
    port = server.address[1]

    def exchanges(wid: int) -> int:
        return sum(s["exchanges"] for s in sessions_of(server, wid) if s["state"] == "active")

    workers = [
        procs("worker", "--port", port, "--numel", n, "--worker-id", i, "--sleep", 0.01)
        for i in range(3)
    ]
    assert wait_until(lambda: all(exchanges(i) >= 5 for i in range(3)))

    workers[1].send_signal(signal.SIGKILL)
    assert wait_until(lambda: sessions_of(server, 1)[0]["state"] == "died")
    (dead,) = sessions_of(server, 1)
    # Noticed at once, by EOF or a reset, not after a silence (that would say "silent").
    assert not dead["reason"].startswith(("silent", "no progress")), dead["reason"]
    assert any(e["event"] == "death" and e["session"] == dead["session_id"] for e in events)

    # The survivors go on.
    before = {i: exchanges(i) for i in (0, 2)}
    assert wait_until(lambda: all(exchanges(i) >= before[i] + 5 for i in (0, 2)))

    # A replacement joins with a new session, starts from the center and contributes.
    out = tmp_path / "join.pt"
    replacement = procs("worker", "--port", port, "--numel", n, "--worker-id", 1, "--out", out)
    assert wait_until(out.exists)
    joined = torch.load(out, weights_only=True)
    # Every exchange adds 1 everywhere, so the center at the join is t * ones.
    assert_close(joined["x"], torch.full((n,), float(joined["t"])), rtol=0, atol=0)
    assert wait_until(lambda: exchanges(1) >= 5)
    rejoin = [e for e in events if e["event"] == "join" and e["worker"] == 1][-1]
    assert rejoin["rejoin"] == [dead["session_id"]]

    # Clean exits are goodbyes, not deaths.
    for proc in (workers[0], workers[2], replacement):
        proc.send_signal(signal.SIGTERM)
    assert [p.wait(timeout=PATIENCE) for p in (workers[0], workers[2], replacement)] == [0, 0, 0]
    assert wait_until(lambda: server.stats()["left"] == 3)
    stats = server.stats()
    assert (stats["died"], stats["left"], stats["active"]) == (1, 3, 0)
    # The killed worker's cut-off request was never half applied.
    assert_close(server.snapshot(), torch.full((n,), float(stats["t"])), rtol=0, atol=0)
    assert stats["t"] == stats["exchanges"] == sum(s["exchanges"] for s in stats["sessions"])


@pytest.mark.timeout(300)
def test_killed_server_is_a_clear_error_and_restarts_from_its_checkpoint(
    procs: Any, servers: Any, clients: Any, tmp_path: Path
):
    n = 1000
    address, ckpt, events = tmp_path / "server.json", tmp_path / "ps.pt", tmp_path / "ev.jsonl"
    server_proc = procs(
        "server", "--numel", n, "--address-file", address, "--checkpoint", ckpt, "--events", events
    )
    assert wait_until(address.exists)
    info = json.loads(address.read_text())
    port = info["port"]
    assert info["pid"] == server_proc.pid
    client = clients([("127.0.0.1", port)], n, worker_id=0)
    x, ones = torch.empty(n), torch.ones(n)
    client.join(x)
    for _ in range(5):
        client.serve(Request(Op.PUSH_PULL, ones, x))
    assert wait_until(lambda: ckpt.exists() and read_checkpoint(ckpt)["t"] == 5)

    def logged() -> list[str]:
        return [e["event"] for e in read_jsonl(events)[0]]

    # The server writes the file, then its event: under load the test may read in between.
    assert wait_until(lambda: "checkpoint" in logged())
    assert logged()[:2] == ["start", "join"]

    server_proc.kill()
    server_proc.wait(timeout=PATIENCE)
    # At once, by EOF or a reset ("did not answer within" would be the 30 s timeout).
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port} closed the connection") as err:
        client.serve(Request(Op.PUSH_PULL, ones, x))
    assert isinstance(err.value, PSConnectionError) and err.value.address[1] == port

    # A restarted server loses nothing that was saved.
    server = ParameterServer.from_checkpoint(ckpt)
    try:
        server.start()
        assert (server.t, server.stats()["exchanges"]) == (5, 5)
        again = clients([server.address], n, worker_id=0)
        again.join(x)
        assert_close(x, torch.full((n,), 5.0), rtol=0, atol=0)
    finally:
        server.stop()


@pytest.mark.timeout(120)
def test_silent_worker_is_declared_dead_and_heartbeats_keep_the_others(servers: Any, clients: Any):
    n = 100
    server = servers(DOWNPOUR, torch.zeros(n), timeout=2.0).start()
    alive = clients([server.address], n, worker_id=0, heartbeat=0.1)
    x = torch.empty(n)
    alive.join(x)
    # Two quiet workers in turn, each joined after the previous one died: the pinging one,
    # joined before both, outlives two full timeouts without a single request.
    for worker_id in (1, 2):
        quiet = clients([server.address], n, worker_id=worker_id, heartbeat=0)
        quiet.join(x)
        assert wait_until(lambda w=worker_id: sessions_of(server, w)[0]["state"] == "died")
        assert "silent" in sessions_of(server, worker_id)[0]["reason"]
    assert sessions_of(server, 0)[0]["state"] == "active"
    alive.serve(Request(Op.PUSH_PULL, torch.ones(n), x))
    # The worker that wakes up is told why, not that the (living) server stopped or died.
    with pytest.raises(ConnectionError, match="declared dead: silent for 2 s") as info:
        quiet.serve(Request(Op.PUSH_PULL, torch.ones(n), x))
    assert "stopped or died" not in str(info.value) and "server is alive" in str(info.value)
    assert server.silence(0) == 2.0  # an explicit timeout wins over the heartbeat


def test_default_silence_follows_the_clients_heartbeat(servers: Any):
    # 5 missed heartbeats, at least 5 s; none (0) or an absurd one: the longest, 5 x 10 s.
    server = servers(DOWNPOUR, torch.zeros(4))
    assert [server.silence(ms) for ms in (200, 3000, 0, 2**32 - 1)] == [5.0, 15.0, 50.0, 50.0]


@pytest.mark.timeout(120)
def test_crash_and_bye_are_told_apart(servers: Any):
    n = 10
    server = servers(DOWNPOUR, torch.zeros(n)).start()
    with pytest.raises(RuntimeError, match="boom"), PSClient([server.address], n, worker_id=0) as c:
        c.join(torch.empty(n))
        raise RuntimeError("boom")
    with PSClient([server.address], n, worker_id=1) as c:
        c.join(torch.empty(n))
    crashed = PSClient([server.address], n, worker_id=2)
    crashed.start(torch.empty(n))
    crashed.close(clean=False)
    for worker_id, end in ((3, PSClient.close), (4, PSClient.bye)):
        client = PSClient([server.address], n, worker_id=worker_id)
        client.start(torch.empty(n))
        end(client)
        client.close()  # idempotent: no second goodbye, no error
    assert wait_until(lambda: server.stats()["active"] == 0)
    states = {s["worker_id"]: (s["state"], s["reason"]) for s in server.stats()["sessions"]}
    died, left = ("died", "connection closed without BYE"), ("left", "bye")
    assert states == {0: died, 1: left, 2: died, 3: left, 4: left}


@pytest.mark.timeout(120)
def test_client_is_a_transport_whose_traffic_is_counted(servers: Any):
    n = 10
    server = servers(DOWNPOUR, torch.zeros(n)).start()
    client = PSClient([server.address], n, worker_id=0, heartbeat=0)
    assert isinstance(client, Transport) and client.mode is Mode.ASYNC
    x = torch.empty(n)
    client.start(x)
    client.serve(Request(Op.PUSH_PULL, torch.ones(n), x))
    traffic = client.traffic
    assert isinstance(traffic, Traffic) and traffic.exchanges == client.exchanges == 1
    assert (client.bytes_sent, client.bytes_received) == (
        traffic.bytes_sent,
        traffic.bytes_received,
    )
    assert client.last_exchange_seconds == traffic.last_exchange_seconds > 0
    # Both ends count the same bytes (the handshake aside).
    stats = server.stats()
    assert (stats["bytes_in"], stats["bytes_out"]) == (traffic.bytes_sent, traffic.bytes_received)
    client.close()
    assert wait_until(lambda: server.stats()["left"] == 1)
    with pytest.raises(RuntimeError, match="closed"):
        client.serve(Request(Op.PUSH_PULL, torch.ones(n), x))


# ---------------------------------------------------------------------------------------
# The server's hyperparameters, learnt at JOIN
# ---------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_join_carries_the_servers_hyperparameters(servers: Any, clients: Any):
    # The asynchronous wrapper must use the server's p (and alpha = beta/p), not p = 1.
    hp, n = Hyperparams(method="easgd", workers=4), 10
    shards = [servers(hp, torch.zeros(b - a), offset=a).start() for a, b in shard_ranges(n, 2)]
    client = clients([s.address for s in shards], n, worker_id=0)
    with pytest.raises(RuntimeError, match="after join"):
        client.server_hp  # noqa: B018
    client.join(torch.empty(n))
    assert isinstance(client.server_hp, Hyperparams)
    assert client.server_hp.workers == 4 and client.server_hp.alpha == 0.225
    assert client.server_hp == hp


@pytest.mark.timeout(120)
def test_shards_that_disagree_on_the_hyperparameters_are_refused(servers: Any, clients: Any):
    n = 10
    (a, b), (c, d) = shard_ranges(n, 2)
    first = servers(DOWNPOUR, torch.zeros(b - a)).start()
    second = servers(DOWNPOUR.replace(workers=4), torch.zeros(d - c), offset=c).start()
    client = clients([first.address, second.address], n, worker_id=0)
    with pytest.raises(ValueError, match=r"disagree on the hyperparameters \(workers=3 vs 4 on"):
        client.join(torch.empty(n))
    with pytest.raises(ValueError, match="disagree"):  # the client stays broken
        client.serve(Request(Op.PUSH_PULL, torch.ones(n), torch.empty(n)))


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["mdownpour", "adownpour"])
def test_checkpoint_restores_center_clock_and_state(
    method: str, servers: Any, clients: Any, tmp_path: Path
):
    # Two shards; the second one (offset 20) saves and is restarted.
    hp, n, path = make_hp(method), 40, tmp_path / "ckpt" / "ps.pt"
    c0 = torch.randn(n)
    events: list[dict[str, Any]] = []
    first = servers(hp, c0[:20].clone()).start()
    server = servers(
        hp, c0[20:].clone(), offset=20, checkpoint_path=path, checkpoint_every=0.1,
        on_event=events.append,
    ).start()  # fmt: skip
    client = clients([first.address, ("127.0.0.1", server.address[1])], n, worker_id=0)
    x = torch.empty(n)
    client.join(x)
    worker, grad = Worker(hp, x, Mode.ASYNC), QuadraticGrad(n)
    for _ in range(STEPS):
        run_step(worker, grad, client.serve)
    t = server.t
    # The periodic save catches up by itself.
    assert wait_until(lambda: any(e["event"] == "checkpoint" and e["t"] == t for e in events))
    client.bye()
    server.stop()

    state = read_checkpoint(path)
    assert (state["t"], state["offset"], state["numel"]) == (t, 20, 20)
    restored = ParameterServer.from_checkpoint(path)
    try:
        assert restored.t == t and restored.offset == 20
        assert restored.stats()["exchanges"] == server.stats()["exchanges"]
        assert_close(restored.snapshot(), server.snapshot(), rtol=0, atol=0)
        assert_close(restored.snapshot(evaluation=True), state["evaluation"], rtol=0, atol=0)
        for name in ("v", "z"):
            mine, theirs = getattr(restored.center, name), getattr(server.center, name)
            assert (mine is None) == (theirs is None)
            if mine is not None:
                assert_close(mine, theirs, rtol=0, atol=0)
    finally:
        restored.stop()


@pytest.mark.parametrize("crash_at", ["write", "replace"])
def test_checkpoint_is_atomic(crash_at: str, servers: Any, tmp_path: Path, monkeypatch: Any):
    path = tmp_path / "ps.pt"
    server = servers(DOWNPOUR, torch.zeros(8), checkpoint_path=path)
    server.save_checkpoint()
    server.center.center.fill_(7.0)
    server.center.t = 9

    def crash_writing(obj: object, f: Any) -> None:
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    def crash_replacing(src: object, dst: object) -> None:
        raise OSError("power cut")

    if crash_at == "write":
        monkeypatch.setattr(torch, "save", crash_writing)
    else:
        monkeypatch.setattr(os, "replace", crash_replacing)
    with pytest.raises(OSError):
        server.save_checkpoint()
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ps.pt"]  # no partial file, no temp left
    state = read_checkpoint(path)
    assert state["t"] == 0
    assert_close(state["center"], torch.zeros(8), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# Authentication and bad input
# ---------------------------------------------------------------------------------------


def test_non_loopback_requires_a_secret(servers: Any, monkeypatch: Any):
    monkeypatch.delenv("EASGD_SECRET", raising=False)
    with pytest.raises(ValueError, match="requires a shared secret"):
        ParameterServer(DOWNPOUR, torch.zeros(4), host="0.0.0.0")
    servers(DOWNPOUR, torch.zeros(4), host="0.0.0.0", secret="s3cret")
    monkeypatch.setenv("EASGD_SECRET", "from-the-environment")
    servers(DOWNPOUR, torch.zeros(4), host="0.0.0.0")


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("server_secret", "client_secret", "match"),
    [
        (b"right", b"wrong", "wrong shared secret"),
        (b"right", None, "requires a shared secret"),
        (None, b"right", "does not ask for a secret"),
    ],
)
def test_wrong_secret_is_refused(
    server_secret: bytes | None,
    client_secret: bytes | None,
    match: str,
    servers: Any,
    monkeypatch: Any,
):
    monkeypatch.delenv("EASGD_SECRET", raising=False)
    events: list[dict[str, Any]] = []
    server = servers(DOWNPOUR, torch.zeros(4), secret=server_secret, on_event=events.append)
    server.start()
    with pytest.raises(AuthenticationError, match=match):
        PSClient([server.address], 4, worker_id=0, secret=client_secret)
    assert server.stats()["sessions"] == []
    if server_secret is not None:
        assert wait_until(lambda: any(e["event"] == "auth_failure" for e in events))


@pytest.mark.timeout(120)
def test_right_secret_exchanges(servers: Any, clients: Any, monkeypatch: Any):
    monkeypatch.setenv("EASGD_SECRET", "shared")
    server = servers(DOWNPOUR, torch.zeros(4)).start()
    client = clients([server.address], 4, worker_id=0)
    x = torch.empty(4)
    client.join(x)
    client.serve(Request(Op.PUSH_PULL, torch.ones(4), x))
    assert_close(x, torch.ones(4))


@pytest.mark.timeout(120)
def test_bad_input_is_a_clear_error(servers: Any, clients: Any):
    server = servers(DOWNPOUR, torch.zeros(100)).start()
    with pytest.raises(ValueError, match="do all workers build the same model"):
        clients([server.address], 90, worker_id=0).join(torch.empty(90))
    with pytest.raises(ValueError, match="float64"):
        clients([server.address], 100, worker_id=1).join(torch.empty(100, dtype=torch.float64))

    client = clients([server.address], 100, worker_id=2)
    x = torch.empty(100)
    client.join(x)
    with pytest.raises(ValueError, match="flat vector of 100"):
        client.serve(Request(Op.PUSH_PULL, torch.ones(99), x))
    with pytest.raises(ValueError, match="'push_pull' exchanges, not 'elastic'"):
        client.serve(Request(Op.ELASTIC, x, torch.empty(100)))

    # The server checks every payload too (a client of another version, say).
    rogue = clients([server.address], 100, worker_id=3)
    rogue.join(x)
    conn = rogue._conns[0]
    rogue._send(conn, Cmd.PUSH_PULL, torch.ones(50))
    with pytest.raises(ValueError, match="payload of 50 floats, the center shard has 100"):
        rogue._recv(conn, None)
    assert server.t == 0
    assert wait_until(lambda: server.stats()["rejected"] == 1)


@pytest.mark.timeout(120)
def test_evaluator_pulls_without_joining(servers: Any, clients: Any):
    hp, n = make_hp("adownpour"), 16
    server = servers(hp, torch.randn(n)).start()
    worker_client = clients([server.address], n, worker_id=0)
    x = torch.empty(n)
    worker_client.join(x)
    worker, grad = Worker(hp, x, Mode.ASYNC), QuadraticGrad(n)
    for _ in range(6):
        run_step(worker, grad, worker_client.serve)
    evaluator = clients([server.address], n, worker_id=-1)
    out = torch.empty(n)
    evaluator.pull(out)
    assert_close(out, server.snapshot(), rtol=0, atol=0)
    evaluator.pull(out, evaluation=True)
    assert_close(out, server.snapshot(evaluation=True), rtol=0, atol=0)
    assert [s["worker_id"] for s in server.stats()["sessions"]] == [0]


# ---------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_benchmark_quick_runs(tmp_path: Path):
    out = tmp_path / "exchange.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.exchange", "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=280, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    names = [row["name"] for row in result["rows"]]
    expected = ["gloo_echo", "gloo_echo_elastic", "gloo_10_tensors", "gloo_100_tensors"]
    assert names[:4] == expected and "ps_elastic" in names
    assert all(row["median_ms"] > 0 for row in result["rows"])
    assert "ps_elastic" in proc.stdout
