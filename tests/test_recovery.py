"""A parameter-server shard killed mid-run loses no update of a live worker.

Failure injection as torchft does it: real server processes, SIGKILLed at a random point of
the run (chosen by a seeded draw over the exchange count, never by a clock), restarted from
their checkpoint while the workers keep training. The workers reconnect with backoff and
re-send the contributions the checkpoint lacks; at the end the server's update count equals
the workers' exchange count and its center equals the initial center plus every
contribution the workers received an answer for (the reference that replays them).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from easgd.algorithms import (
    Hyperparams,
    Mode,
    Op,
    Request,
    Worker,
    contribution,
    run_settle,
    run_step,
)
from easgd.comm.ps import PSClient, read_checkpoint
from easgd.comm.shm import SHM_MIN

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "ps_server.py"
PATIENCE = 120.0  # bounds every wait; the waits end on events, not on this
N = 600
STEPS = 240  # local steps per worker (tau = 1: one exchange each)


class Shard:
    """One server process of the run, restartable from its checkpoint."""

    def __init__(self, tmp: Path, method: str, shard: int, shards: int, every: float) -> None:
        self.files = {k: tmp / f"{k}-{shard}" for k in ("address", "checkpoint", "events")}
        self.args = [sys.executable, str(SCRIPT), "--method", method, "--numel", str(N),
                     "--shard", str(shard), "--shards", str(shards), "--checkpoint-every",
                     str(every), "--checkpoint", str(self.files["checkpoint"]),
                     "--address-file", str(self.files["address"]),
                     "--events", str(self.files["events"])]  # fmt: skip
        self.log = tmp / f"server-{shard}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.files["address"].unlink(missing_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.args, env=env, stdout=log, stderr=log, cwd=ROOT)

    def address(self) -> tuple[str, int]:
        """The live server's address (an OSError while it is down: the client retries)."""
        info = json.loads(self.files["address"].read_text())
        if self.proc is None or info["pid"] != self.proc.pid:
            # The file of the killed server, read just before the restart replaced it: an
            # OSError, which the client's resolve retries (an AssertionError here ended a
            # loaded CI run's worker thread).
            raise OSError(f"a stale address (pid {info['pid']})")
        return str(info["host"]), int(info["port"])

    def wait_listening(self) -> tuple[str, int]:
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            try:
                return self.address()
            except (OSError, ValueError, AssertionError):
                time.sleep(0.02)
        raise AssertionError(f"the server never listened; see {self.log}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=PATIENCE)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=PATIENCE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def events(self) -> list[dict[str, Any]]:
        path = self.files["events"]
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class Trainer(threading.Thread):
    """One worker on a noisy quadratic, through a reconnecting client; records its
    contributions (the center deltas it was answered with) for the reference."""

    def __init__(
        self,
        wid: int,
        hp: Hyperparams,
        shards: list[Shard],
        done: list[int],
        overlap: int = 0,
        compress: str = "none",
    ) -> None:
        super().__init__(daemon=True)
        self.wid, self.hp, self.done, self.overlap = wid, hp, done, overlap
        self.flying: Request | None = None  # an overlapped exchange, answered at its WAIT
        self.events: list[dict[str, Any]] = []
        self.client = PSClient(
            [s.wait_listening() for s in shards], N, worker_id=wid, heartbeat=0.2,
            reconnect_timeout=PATIENCE, resolve=lambda i: shards[i].address(),
            on_event=self.events.append, compress=compress,
        )  # fmt: skip
        self.sum = torch.zeros(N)
        self.error: BaseException | None = None
        self.gen = torch.Generator().manual_seed(100 + wid)

    def grad(self, x: torch.Tensor, out: torch.Tensor) -> float:
        torch.mul(x - 1.0, 1.0, out=out).add_(torch.randn(N, generator=self.gen), alpha=0.1)
        return 0.0

    def serve(self, req: Request) -> None:
        self.client.serve(req)
        if req.op is Op.WAIT:  # the overlapped exchange's reply is in now
            req, self.flying = self.flying, None
            assert req is not None
        elif req.deferred:
            self.flying = req
            return
        added = contribution(req)
        if added is not None:  # MDOWNPOUR's center update is not a sum of contributions
            self.sum.add_(added)
        self.done[self.wid] += 1

    def run(self) -> None:
        try:
            x = torch.empty(N)
            self.client.start(x)
            worker = Worker(self.hp, x, Mode.ASYNC, overlap=self.overlap)
            for _ in range(STEPS):
                run_step(worker, self.grad, self.serve)
            run_settle(worker, self.serve)
            self.client.close()
        except BaseException as exc:
            self.error = exc
            self.client.close(clean=False)


@pytest.mark.timeout(400)
@pytest.mark.parametrize(
    ("method", "shards", "every", "overlap", "compress"),
    [("easgd", 1, 0.2, 0, "none"), ("eamsgd", 1, 0.2, 0, "none"),
     ("downpour", 1, 0.2, 0, "none"), ("easgd", 2, 0.2, 0, "none"),
     ("downpour", 1, 1000.0, 0, "none"), ("adownpour", 1, 0.2, 0, "none"),
     ("eamsgd", 2, 0.2, 1, "none"), ("easgd", 1, 0.2, 0, "int8"),
     ("eamsgd", 2, 0.2, 1, "bf16")],  # 1000: no checkpoint before the kill
    ids=["easgd", "eamsgd", "downpour", "easgd-2-shards-kill-one", "downpour-no-checkpoint",
         "adownpour", "eamsgd-overlapped-2-shards", "easgd-int8",
         "eamsgd-bf16-overlapped-2-shards"],
)  # fmt: skip
def test_a_killed_shard_restarts_and_loses_no_update(
    tmp_path: Path, method: str, shards: int, every: float, overlap: int, compress: str
) -> None:
    # overlap: the exchanges go out on the client's background thread, which meets the
    # dead shard and reconnects while the worker computes (Worker(overlap=1)).
    # compress: the contributions are the decoded replies (what the center gained), and
    # the restarted shard's session starts a new reference at its center.
    workers = 2
    hp = Hyperparams(method=method, lr=0.1, workers=workers)
    servers = [Shard(tmp_path, method, s, shards, every) for s in range(shards)]
    for s in servers:
        s.start()
    done = [0] * workers
    trainers: list[Trainer] = []
    try:
        trainers = [Trainer(w, hp, servers, done, overlap, compress) for w in range(workers)]
        for t in trainers:
            t.start()
        # Kill at a random point of the run: after a seeded number of exchanges.
        victim = servers[-1]
        kill_at = random.Random(f"{method}{shards}").randint(STEPS // 3, STEPS)
        deadline = time.monotonic() + PATIENCE
        while sum(done) < kill_at and time.monotonic() < deadline:
            time.sleep(0.005)
        assert sum(done) >= kill_at, "the workers did not get going"
        victim.kill()
        killed_at = sum(done)
        victim.start()
        for t in trainers:
            t.join(timeout=PATIENCE * 2)
        for t in trainers:
            assert t.error is None, f"worker {t.wid} failed: {t.error!r}"
            assert not t.is_alive()
    finally:
        for t in trainers:
            if t.is_alive():
                t.client.close(clean=False)
        for s in servers:
            s.stop()
    assert killed_at < workers * STEPS, "the kill came after the run: nothing was tested"
    total = sum(done)
    assert total == workers * STEPS
    # Every shard's clock counts every exchange once: no update lost, none applied twice.
    states = [read_checkpoint(s.files["checkpoint"]) for s in servers]
    backs = [e for t in trainers for e in t.events if e["event"] == "server_back"]
    assert [int(st["t"]) for st in states] == [total] * shards, backs
    center = torch.cat([st["center"] for st in sorted(states, key=lambda st: st["offset"])])
    reference = sum((t.sum for t in trainers), torch.zeros(N))
    assert_close(center, reference, rtol=1e-5, atol=1e-5)
    # The workers said what happened (once each, about the killed shard only); the
    # restarted shard recorded what it was sent.
    assert len(backs) == workers and {e["shard"] for e in backs} == {shards - 1}, backs
    assert all(e["lost"] == 0 and e["reply_lost"] == 0 for e in backs)
    resent = sum(e["resent"] for e in backs)
    recovered = [e for e in victim.events() if e["event"] == "recovery"]
    assert sum(e["exchanges"] for e in recovered) == resent
    if every > 100:  # nothing was durable: every update acknowledged before the kill
        assert resent >= killed_at - workers  # (but those in flight) came back re-sent
    for s in servers:
        assert s.proc is not None and s.proc.returncode == 0
    if 4 * N // shards >= SHM_MIN:  # every session shared memory: the restarted one's too
        transports = [e for t in trainers for e in t.events if e["event"] == "transport"]
        assert len(transports) == workers * (shards + 1) and all(e["shm"] for e in transports)


@pytest.mark.timeout(400)
def test_a_killed_shard_restarts_and_loses_no_update_on_shared_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Shards above SHM_MIN: the workers' bodies go through segments shared with the server
    # processes; the killed one's segments die with it and the restarted one offers new ones.
    monkeypatch.setattr(sys.modules[__name__], "N", 40_000)
    test_a_killed_shard_restarts_and_loses_no_update(tmp_path, "eamsgd", 2, 0.2, 1, "none")


@pytest.mark.timeout(400)
def test_mdownpour_reports_the_updates_a_restart_cannot_rebuild(tmp_path: Path) -> None:
    # MDOWNPOUR's center carries the server's momentum, which no worker holds: a restarted
    # shard is its checkpoint, and every acknowledged update since is lost -- and counted.
    # With no checkpoint before the kill, that is every update the workers had sent.
    workers, hp = 2, Hyperparams(method="mdownpour", lr=0.01, workers=2)
    server = Shard(tmp_path, "mdownpour", 0, 1, 1000.0)
    server.start()
    done = [0] * workers
    trainers: list[Trainer] = []
    try:
        trainers = [Trainer(w, hp, [server], done) for w in range(workers)]
        for t in trainers:
            t.start()
        deadline = time.monotonic() + PATIENCE
        while sum(done) < STEPS // 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        server.kill()
        server.start()
        for t in trainers:
            t.join(timeout=PATIENCE * 2)
        for t in trainers:
            assert t.error is None, f"worker {t.wid} failed: {t.error!r}"
    finally:
        for t in trainers:
            if t.is_alive():
                t.client.close(clean=False)
        server.stop()
    backs = [e for t in trainers for e in t.events if e["event"] == "server_back"]
    assert len(backs) == workers and all(e["resent"] == 0 for e in backs)
    lost = sum(e["lost"] for e in backs)
    final_t = int(read_checkpoint(server.files["checkpoint"])["t"])
    assert lost >= STEPS // 2 - workers  # (but those in flight at the kill)
    assert final_t + lost == sum(done) == workers * STEPS  # every update: applied or reported
