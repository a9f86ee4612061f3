"""What no client can do to a parameter server: abuse, refused within a deadline.

A real :class:`ParameterServer` on 127.0.0.1, an honest worker that exchanges before, during
and after, and one attack per row of :data:`ATTACKS`: a heartbeat of 0 or of 2^32-1 ms, a
connection flood above the cap, a second JOIN with an active worker's id, a NaN or an
infinite payload, a stranger's counters in the run's store. Each row asserts that the bad
client is refused or dropped within its (short, configured) deadline, that the honest
worker keeps exchanging, and that the center is bitwise what the honest updates alone make
it. Then the end of the run (:meth:`ParameterServer.finished`, CONTROL), the exact finite
check, and the server role against a stranger writing to a real store.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
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
from easgd.comm.ps import ParameterServer, PSClient, SessionState
from easgd.comm.ps_server import NonFiniteError, default_max_connections
from easgd.comm.wire import client_handshake
from test_ps import sessions_of, wait_until

ROOT = Path(__file__).resolve().parents[1]
N = 128
HP = Hyperparams(method="downpour", lr=0.1, tau=1, workers=2)  # PUSH_PULL: center += payload
PATIENCE = 60.0  # bounds every wait; the waits end on events, not on this
MAX_HEARTBEAT = 0.4  # the server's longest heartbeat: a silent session ends after 2 s
SILENCE = 5 * MAX_HEARTBEAT
CAP = 6  # max_connections of the server under attack

torch.set_num_threads(1)


class Honest:
    """Worker 0: joins, and adds ones to the center, so that the center is ``t * ones``."""

    def __init__(self, server: ParameterServer) -> None:
        self.client = PSClient([server.address], N, worker_id=0, heartbeat=0.1)
        self.x = torch.empty(N)
        self.client.join(self.x)
        self.exchanges = 0
        self.seconds: list[float] = []

    def exchange(self, times: int = 1) -> None:
        for _ in range(times):
            began = time.perf_counter()
            self.client.serve(Request(Op.PUSH_PULL, torch.ones(N), self.x))
            self.seconds.append(time.perf_counter() - began)
            self.exchanges += 1


@dataclass
class Arena:
    server: ParameterServer
    honest: Honest
    events: list[dict[str, Any]]
    others: list[PSClient]
    sockets: list[socket.socket]

    def client(self, worker_id: int, **kwargs: Any) -> PSClient:
        kwargs.setdefault("heartbeat", 0.1)
        self.others.append(PSClient([self.server.address], N, worker_id=worker_id, **kwargs))
        return self.others[-1]


@pytest.fixture
def arena() -> Iterator[Arena]:
    events: list[dict[str, Any]] = []
    server = ParameterServer(
        HP, torch.zeros(N), on_event=events.append, max_connections=CAP,
        max_heartbeat=MAX_HEARTBEAT, handshake_timeout=PATIENCE,
    ).start()  # fmt: skip
    arena = Arena(server, Honest(server), events, [], [])
    try:
        yield arena
    finally:
        for sock in arena.sockets:
            sock.close()
        for client in (arena.honest.client, *arena.others):
            client.close(clean=False)
        server.stop()


def died_silent(arena: Arena, worker_id: int) -> None:
    """The session of ``worker_id`` is declared dead for its silence (within PATIENCE)."""
    began = time.monotonic()
    assert wait_until(lambda: sessions_of(arena.server, worker_id)[0]["state"] == "died")
    (session,) = sessions_of(arena.server, worker_id)
    assert session["reason"] == f"silent for {SILENCE:g} s (no request, no heartbeat)"
    assert time.monotonic() - began < PATIENCE


# ---------------------------------------------------------------------------------------
# The attacks: each leaves the honest worker exchanging and the center untouched
# ---------------------------------------------------------------------------------------


def heartbeat_zero(arena: Arena) -> None:
    """A client that announces no heartbeat used to keep its session forever."""
    arena.client(1, heartbeat=0).join(torch.empty(N))
    died_silent(arena, 1)


def heartbeat_huge(arena: Arena) -> None:
    """2^32-1 ms (the field's largest value): clamped to the server's longest heartbeat."""
    arena.client(1, heartbeat=1e9).join(torch.empty(N))
    died_silent(arena, 1)


def connection_flood(arena: Arena) -> None:
    """Connections far above the cap: refused at accept, with a reason, and no thread."""
    threads = threading.active_count()
    # Fill the cap with handshaken connections that never join: they hold their slots.
    holders = [arena.client(-1) for _ in range(CAP - 1)]
    flood_started = time.monotonic()
    for _ in range(4 * CAP):
        sock = socket.create_connection(arena.server.address, timeout=PATIENCE)
        arena.sockets.append(sock)
        with pytest.raises(ConnectionError, match=r"refused the connection: .*max_connections"):
            client_handshake(sock, None, 1.0, "the flood")
        arena.honest.exchange()  # between two refusals, as fast as ever (not asserted)
    assert time.monotonic() - flood_started < PATIENCE
    with pytest.raises(ConnectionError, match="max_connections"):
        PSClient([arena.server.address], N, worker_id=1)
    # The server's threads: the sessions under the cap, none for the refused.
    assert threading.active_count() <= threads + 2 * CAP
    assert wait_until(lambda: any(e["event"] == "reject" and e["worker"] == -1
                                  and "max_connections" in e["reason"]
                                  for e in arena.events))  # fmt: skip
    assert arena.server.run_status()["refused"] >= 4 * CAP + 1
    # Slots free again once the holders go: a worker joins.
    for holder in holders:
        holder.close()
    late = torch.empty(N)
    assert wait_until(lambda: _joins(arena, late))


def _joins(arena: Arena, x: Tensor) -> bool:
    try:
        arena.client(1).join(x)
    except ConnectionError:
        return False
    return True


def duplicate_worker_id(arena: Arena) -> None:
    """A second process claiming worker 0 while its session is active: refused, by name."""
    peer = sessions_of(arena.server, 0)[0]["peer"]
    with pytest.raises(ValueError, match=rf"worker 0 already has an active session .*{peer}"):
        arena.client(0).join(torch.empty(N))
    assert [s["state"] for s in sessions_of(arena.server, 0)] == ["active"]
    # Reported after the answer: the server's thread may still be on it.
    assert wait_until(lambda: any(e["event"] == "reject" and e["worker"] == 0
                                  for e in arena.events))  # fmt: skip


def _poisoned(arena: Arena, bad: dict[int, float], expect: str) -> None:
    rogue = arena.client(1)
    x = torch.empty(N)
    rogue.join(x)
    payload = torch.ones(N)
    for i, value in bad.items():
        payload[i] = value
    with pytest.raises((ValueError, RuntimeError), match=expect):
        rogue.serve(Request(Op.PUSH_PULL, payload, x))
    assert wait_until(lambda: sessions_of(arena.server, 1)[0]["state"] == "rejected")


def nan_payload(arena: Arena) -> None:
    _poisoned(arena, {17: float("nan"), 40: float("nan"), 99: float("nan")},
              "worker 1 .* holds 3 non-finite values .* at elements 17, 40, 99 ")  # fmt: skip


def inf_payload(arena: Arena) -> None:
    bad = {i: float("inf") if i % 2 else -float("inf") for i in range(3, 3 + 7)}
    _poisoned(arena, bad, "holds 7 non-finite values .* at elements 3, 4, 5, 6, 7, ...")


def store_write_from_stranger(arena: Arena) -> None:
    """A stranger's counters in a real store decide nothing (the old back door)."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=PATIENCE))  # fmt: skip
    run = dist.PrefixStore("easgd/attempt_0/", store)
    for key in ("easgd/workers_done", "easgd/workers_lost"):
        run.add(key, 3)
    assert not arena.server.finished()
    assert arena.server.run_status()["done"] == arena.server.run_status()["lost"] == []


ATTACKS: dict[str, Callable[[Arena], None]] = {
    "heartbeat 0": heartbeat_zero,
    "heartbeat 2^32-1 ms": heartbeat_huge,
    "connection flood": connection_flood,
    "duplicate worker id": duplicate_worker_id,
    "NaN payload": nan_payload,
    "inf payload": inf_payload,
    "store write from a stranger": store_write_from_stranger,
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("attack", list(ATTACKS.values()), ids=list(ATTACKS))
def test_abuse_is_refused_and_the_center_is_untouched(attack: Callable[[Arena], None], arena):
    honest, server = arena.honest, arena.server
    honest.exchange(3)
    attack(arena)
    honest.exchange(3)
    # Bitwise: the initial zeros plus one per honest exchange, nothing of the attacker's.
    assert torch.equal(server.snapshot(), torch.full((N,), float(honest.exchanges)))
    assert server.t == honest.exchanges
    assert [s["state"] for s in sessions_of(server, 0)] == ["active"]


# ---------------------------------------------------------------------------------------
# The limits one by one: clamps, defaults, a reconnecting process, the exact finite check
# ---------------------------------------------------------------------------------------


def test_the_announced_heartbeat_is_clamped():
    server = ParameterServer(HP, torch.zeros(4), min_heartbeat=0.5, max_heartbeat=4.0)
    try:
        # 5 heartbeats, at least 5 s; none (0) or absurd ones: the longest, 20 s.
        assert [server.silence(ms) for ms in (0, 1, 200, 3000, 10_000, 2**32 - 1)] == [
            20.0, 5.0, 5.0, 15.0, 20.0, 20.0,
        ]  # fmt: skip
    finally:
        server.stop()
    explicit = ParameterServer(HP, torch.zeros(4), timeout=2.0)
    explicit.stop()
    assert explicit.silence(0) == explicit.silence(2**32 - 1) == 2.0


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({}, None),
        ({"max_connections": 1}, None),
        ({"max_connections": 0}, "max_connections=0 must be an integer >= 1"),
        ({"workers": 0}, "workers=0 must be an integer >= 1"),
        ({"min_heartbeat": 0.0}, "min_heartbeat=0.0"),
        ({"min_heartbeat": 2.0, "max_heartbeat": 1.0}, "min_heartbeat <= max_heartbeat"),
        ({"max_heartbeat": float("inf")}, "finite"),
        ({"timeout": float("inf")}, "timeout=inf"),
        ({"frame_timeout": 0}, "frame_timeout=0"),
    ],
)
def test_limits_are_validated(kwargs: dict[str, Any], error: str | None):
    if error is None:
        ParameterServer(HP, torch.zeros(4), **kwargs).stop()
    else:
        with pytest.raises(ValueError, match=error):
            ParameterServer(HP, torch.zeros(4), **kwargs)


def test_the_default_cap_follows_the_workers():
    server = ParameterServer(Hyperparams(method="downpour", lr=0.1, tau=1, workers=5),
                             torch.zeros(4))  # fmt: skip
    try:
        assert server.max_connections == default_max_connections(5) == 14
    finally:
        server.stop()


@pytest.mark.timeout(120)
def test_the_same_process_reconnecting_replaces_its_old_session(arena: Arena):
    first = arena.client(1)
    first.join(torch.empty(N))
    again = arena.client(1)
    again.nonce = first.nonce  # the same process (its client nonce), on a new connection
    again.join(torch.empty(N))
    old, new = sessions_of(arena.server, 1)
    assert old["state"] == "died" and "replaced by a new connection" in old["reason"]
    assert new["state"] == "active"
    again.serve(Request(Op.PUSH_PULL, torch.ones(N), torch.empty(N)))
    # The old connection was closed by the server: its next request fails at once.
    with pytest.raises(ConnectionError):
        first.serve(Request(Op.PUSH_PULL, torch.ones(N), torch.empty(N)))
    deaths = [e for e in arena.events if e["event"] == "death" and e["worker"] == 1]
    assert len(deaths) == 1  # reported once, not again when its thread noticed


def test_a_finite_payload_whose_sum_overflows_is_applied():
    # The fast check (a finite sum) fails here; the exact one accepts every element.
    server = ParameterServer(HP, torch.zeros(4))
    try:
        stats, _ = server.open_session(0, "test", torch.empty(4), client=1)
        payload = torch.full((4,), 3e38)
        assert not torch.isfinite(payload.sum())
        server.apply(Op.PUSH_PULL, payload, torch.empty(4), stats)
        assert torch.equal(server.snapshot(), payload)
    finally:
        server.stop()


@pytest.mark.parametrize("method", ["downpour", "easgd"])
def test_a_non_finite_recovery_sum_is_refused(method: str):
    hp = Hyperparams(method=method, lr=0.1, tau=1, workers=2)
    c0 = torch.arange(8, dtype=torch.float32)
    server = ParameterServer(hp, c0.clone(), offset=100)
    try:
        stats, _ = server.open_session(1, "test", torch.empty(8), client=7)
        sums = torch.ones(8)
        sums[6] = float("nan")
        with pytest.raises(NonFiniteError, match=r"worker 1 .* 1 non-finite .* elements 106 "):
            server.recover(sums, 3, stats)
        assert torch.equal(server.snapshot(), c0) and server.t == 0
        assert server.recovery_info(7)["applied"] == 0
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------
# The end of the run: finished goodbyes and the launcher's authenticated word
# ---------------------------------------------------------------------------------------


def _bye(server: ParameterServer, worker_id: int, *, done: bool) -> None:
    stats, _ = server.open_session(worker_id, f"peer-{worker_id}", torch.empty(4),
                                   client=worker_id + 1)  # fmt: skip
    stats.done = done
    server.end_session(stats, SessionState.LEFT, "bye")


def test_the_run_ends_when_every_worker_finished_or_was_lost():
    server = ParameterServer(Hyperparams(method="downpour", lr=0.1, tau=1, workers=3),
                             torch.zeros(4), secret="s3cret")  # fmt: skip
    try:
        _bye(server, 0, done=True)
        _bye(server, 1, done=False)  # left before its end: not finished
        assert not server.finished()
        assert server.control({"lost": [2]})["finished"] is False
        status = server.control({"finished": [1], "query": "status"})
        assert status["finished"] is True and server.finished()
        assert (status["done"], status["lost"], status["workers"]) == ([0, 1], [2], 3)
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"query": "status"}, None),
        ({"lost": []}, None),
        ({}, "non-empty JSON object"),
        ({"stop": True, "finished": [0]}, r"unknown control keys \['stop'\]"),
        ({"query": "config", "finished": [0]}, "the only query is 'status'"),
        ({"lost": 1}, "give a list of worker ids"),
        ({"finished": [0], "lost": [3]}, "from 0 to 2"),  # nothing of it is taken
        ({"lost": [True]}, "from 0 to 2"),
        ({"finished": ["0"]}, "from 0 to 2"),
    ],
)
def test_control_messages_are_validated(message: dict[str, Any], error: str | None):
    server = ParameterServer(Hyperparams(method="downpour", lr=0.1, tau=1, workers=3),
                             torch.zeros(4), secret="s3cret")  # fmt: skip
    try:
        if error is None:
            assert server.control(message)["finished"] is False
        else:
            with pytest.raises(ValueError, match=error):
                server.control(message)
        assert server.run_status()["done"] == server.run_status()["lost"] == []
    finally:
        server.stop()


def test_without_a_secret_nobody_can_declare_workers_lost(monkeypatch: Any):
    monkeypatch.delenv("EASGD_SECRET", raising=False)
    server = ParameterServer(HP, torch.zeros(4))
    try:
        with pytest.raises(PermissionError, match="no shared secret"):
            server.control({"lost": [0, 1]})
        assert not server.finished() and server.control({"query": "status"})["lost"] == []
    finally:
        server.stop()


@pytest.mark.timeout(120)
def test_the_launchers_word_ends_the_run_and_a_strangers_does_not(monkeypatch: Any):
    from easgd.comm.ps_client import send_control
    from easgd.comm.wire import AuthenticationError

    monkeypatch.delenv("EASGD_SECRET", raising=False)
    server = ParameterServer(HP, torch.zeros(N), secret="the-runs").start()
    try:
        worker = PSClient([server.address], N, worker_id=0, secret="the-runs")
        worker.join(torch.empty(N))
        worker.bye(done=True)  # worker 0 spent its budget
        assert wait_until(lambda: server.run_status()["done"] == [0])
        for secret in (None, "a-guess"):
            with pytest.raises(AuthenticationError):
                send_control(server.address, {"lost": [1]}, secret=secret, timeout=PATIENCE)
        assert not server.finished()
        with pytest.raises(ValueError, match="from 0 to 1"):
            send_control(server.address, {"lost": [7]}, secret="the-runs", timeout=PATIENCE)
        answer = send_control(server.address, {"lost": [1]}, secret="the-runs",
                              timeout=PATIENCE)  # fmt: skip
        assert answer["finished"] is True and server.finished()
        assert (answer["done"], answer["lost"]) == ([0], [1])
        assert server.stats()["sessions"][0]["state"] == "left"  # control opened no session
        assert len(server.stats()["sessions"]) == 1
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------
# The server role against a stranger's store counters (a real process and a real store)
# ---------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_the_server_role_ignores_a_strangers_store_counters(tmp_path: Path):
    import torch.distributed as dist

    from easgd.comm.ps_client import send_control
    from easgd.config import TrainConfig
    from easgd.flat import parameters_to_flat_views
    from easgd.runlog import RunPaths, atomic_write_json
    from easgd.task import build_task

    cfg = TrainConfig(method="downpour", workers=2, tau=1, lr=0.01, steps=10,
                      out=str(tmp_path / "run"), checkpoint_interval=0.5)  # fmt: skip
    paths = RunPaths(cfg.out).make()
    atomic_write_json(paths.config, cfg.to_dict())
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=PATIENCE))  # fmt: skip
    run = dist.PrefixStore("easgd/attempt_0/", store)
    secret = "a-secret-for-this-test"
    env = dict(os.environ, RANK="0", WORLD_SIZE=str(cfg.world_size()), LOCAL_RANK="0",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port),
               TORCHELASTIC_USE_AGENT_STORE="True", OMP_NUM_THREADS="1",
               EASGD_RUN_DIR=str(paths.root), EASGD_START_TIME=repr(time.time()),
               EASGD_SECRET=secret)  # fmt: skip
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "easgd.launch"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT)  # fmt: skip
    client = None
    try:
        run.wait(["easgd/server/0"], datetime.timedelta(seconds=PATIENCE))
        host, port = run.get("easgd/server/0").decode().rsplit(":", 1)
        task = build_task(cfg.dataset, cfg.model, seed=cfg.seed, data_dir=cfg.data_dir)
        numel = parameters_to_flat_views(task.build()).numel
        client = PSClient([(host, int(port))], numel, worker_id=0, secret=secret)
        x = torch.empty(numel)
        client.join(x)
        # The stranger: every counter the server role used to stop on, far above P.
        for key in ("easgd/workers_done", "easgd/workers_lost"):
            run.add(key, 10)
        # The old role stopped within 0.2 s of such a write; this one serves on. (Waiting
        # cannot make this pass wrongly: a server that stopped fails the exchanges.)
        began = time.monotonic()
        for _ in range(10_000):
            client.serve(Request(Op.PUSH_PULL, torch.zeros(numel), x))
            if time.monotonic() - began > 2.0:
                break
        assert proc.poll() is None
        client.close()  # a finished worker's goodbye: worker 1 is still to come
        # The launcher's authenticated word that worker 1 is lost ends the run.
        answer = send_control((host, int(port)), {"lost": [1]}, secret=secret,
                              timeout=PATIENCE)  # fmt: skip
        assert answer["finished"] is True and answer["done"] == [0]
        rc = proc.wait(timeout=PATIENCE)
    finally:
        if client is not None:
            client.close(clean=False)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=PATIENCE)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert rc == 0, (tmp_path / "server.log").read_text()[-3000:]
    done = [json.loads(line) for line in paths.metrics.read_text().splitlines()
            if '"server_done"' in line]  # fmt: skip
    assert len(done) == 1 and done[0]["left"] == 1
    # Nothing the run wrote holds its secret, and all of it is private to its owner.
    written = [f for f in paths.root.rglob("*") if f.is_file()]
    assert paths.server_checkpoint(0) in written and paths.metrics in written
    for f in written:
        assert secret.encode() not in f.read_bytes(), f
        assert f.stat().st_mode & 0o077 == 0, (f, oct(f.stat().st_mode))


# ---------------------------------------------------------------------------------------
# What a run leaves on disk: private files (a stricter umask wins), shared results on demand
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("umask", "private", "shared", "shared_folder"),
    [(0o022, 0o600, 0o644, 0o755), (0o077, 0o600, 0o600, 0o700)],
)
def test_files_are_created_private(
    tmp_path: Path, umask: int, private: int, shared: int, shared_folder: int
):
    from easgd.runlog import JsonlWriter, atomic_torch_save, atomic_write_bytes, atomic_write_json

    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "new" / "deeper" / "config.json", {"a": 1})
        atomic_torch_save(tmp_path / "ckpt.pt", {"t": torch.zeros(2)})
        with JsonlWriter(tmp_path / "logs" / "metrics.jsonl") as out:
            out.write({"event": "x"})
        atomic_write_bytes(tmp_path / "report" / "figure.png", b"png", mode=0o644)
    finally:
        os.umask(old)

    def mode(path: str) -> int:
        return (tmp_path / path).stat().st_mode & 0o777

    assert [mode(p) for p in ("new/deeper/config.json", "ckpt.pt", "logs/metrics.jsonl")] == [
        private
    ] * 3
    assert [mode(p) for p in ("new", "new/deeper", "logs")] == [0o700] * 3
    assert (mode("report/figure.png"), mode("report")) == (shared, shared_folder)
