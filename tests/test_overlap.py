"""The overlapped asynchronous exchange: ``Worker(overlap=K)``, ``PSClient``'s background
exchange, the simulator's schedule of the same lag, and ``easgd train --overlap``."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from easgd.algorithms import Hyperparams, Mode, Op, Request, Worker, run_settle, run_step
from easgd.comm.ps import ParameterServer, PSClient, PSConnectionError
from easgd.config import ConfigError, TrainConfig
from easgd.sim import CostModel, Quadratic, simulate

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("method", ["easgd", "eamsgd"])
@pytest.mark.parametrize("tau", [1, 3])
def test_a_lag_of_one_step_is_the_papers_update_bitwise(method: str, tau: int) -> None:
    # d is applied before the next gradient, where the blocking exchange applies it: the
    # same operations in the same order, so the trajectories are bitwise equal.
    hp = Hyperparams(method=method, lr=0.05, tau=tau, workers=3)
    problem = Quadratic(sigma=0.5, x0=1.0, dim=40)
    for schedule, steps in (("round-robin", 90), ("async", 30)):
        cost = CostModel(step_time=1.0, latency=0.2)
        blocking = simulate(problem, hp, schedule=schedule, steps=steps, cost=cost)
        overlapped = simulate(problem, hp, schedule=schedule, steps=steps, cost=cost, overlap=1)
        assert torch.equal(blocking.center, overlapped.center)
        for a, b in zip(blocking.workers, overlapped.workers, strict=True):
            assert torch.equal(a, b)


def test_a_longer_lag_pulls_later_by_the_rule() -> None:
    # tau = 3, K = 3: the pull of the exchange at step 0 reaches x only at step 3. One worker
    # on the noise-free quadratic, written out by hand.
    hp = Hyperparams(method="easgd", lr=0.1, tau=3, workers=1, alpha=0.5)
    problem = Quadratic(sigma=0.0, x0=1.0, dim=1)
    sim = simulate(problem, hp, schedule="round-robin", steps=6, overlap=3, trajectory=True)
    x = c = 1.0
    lr, a = 0.1, 0.5
    owed = 0.0
    centers = []
    for t in range(6):
        if t % 3 == 0:
            x -= owed  # the last exchange's pull, due now
            d = a * (x - c)
            c += d
            owed = d
        x -= lr * problem.h * x  # the gradient of h/2 x^2 at x
        centers.append(c)
    x -= owed  # the end: the worker settles
    assert [float(t[0]) for t in sim.center_trajectory] == pytest.approx(centers, abs=1e-15)
    assert float(sim.workers[0][0]) == pytest.approx(x, abs=1e-15)
    blocking = simulate(problem, hp, schedule="round-robin", steps=6)
    assert not torch.equal(blocking.workers[0], sim.workers[0])


def test_the_simulated_clock_hides_a_round_trip_shorter_than_the_lag() -> None:
    hp = Hyperparams(method="easgd", lr=0.05, tau=1, workers=2)
    problem = Quadratic(sigma=0.5, x0=1.0, dim=10)

    def seconds(latency: float, overlap: int) -> float:
        cost = CostModel(step_time=1.0, latency=latency)
        res = simulate(problem, hp, schedule="async", steps=50, cost=cost, overlap=overlap)
        return res.virtual_seconds

    # Blocking: every step pays its round trip (2 latencies). Overlapped by one step (the
    # exchange goes out at the start of a step): a round trip of 0.6 s hides behind the
    # 1 s step; one of 1.4 s makes every step wait 0.4 s for the last exchange's reply (and
    # the run ends when the last reply is in).
    assert seconds(0.3, 0) == pytest.approx(50 * 1.6)
    assert seconds(0.3, 1) == pytest.approx(50 * 1.0)
    assert seconds(0.7, 1) == pytest.approx(50 * 1.4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "easgd", "mode": "async", "tau": 2, "overlap": 3}, "more than tau=2"),
        ({"method": "easgd", "mode": "sync", "overlap": 1}, "asynchronous elastic"),
        ({"method": "downpour", "mode": "async", "overlap": 1}, "asynchronous elastic"),
        ({"method": "easgd", "mode": "async", "overlap": -1}, "integer >= 0"),
        ({"method": "easgd", "mode": "async", "overlap": True}, "integer >= 0"),
    ],
)  # fmt: skip
def test_bad_overlaps_are_refused_by_name(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        TrainConfig(steps=10, **kwargs)
    assert info.value.field == "overlap"


def test_the_simulator_refuses_an_overlap_on_the_synchronous_schedule() -> None:
    hp = Hyperparams(method="easgd", lr=0.05, tau=1, workers=2)
    with pytest.raises(ValueError, match="schedule='async' or 'round-robin'"):
        simulate(Quadratic(dim=4), hp, schedule="sync", steps=2, overlap=1)


def _servers(hp: Hyperparams, x0: torch.Tensor, shards: int) -> list[ParameterServer]:
    n = x0.numel()
    bounds = [(0, n)] if shards == 1 else [(0, n // 2), (n // 2, n)]
    servers = [ParameterServer(hp, x0[a:b].clone(), offset=a) for a, b in bounds]
    for s in servers:
        s.__enter__()
    return servers


@pytest.mark.parametrize(
    ("method", "overlap", "compress", "shards"),
    [("easgd", 3, "none", 1), ("eamsgd", 2, "none", 2), ("easgd", 1, "none", 2),
     ("easgd", 3, "bf16", 1)],
)  # fmt: skip
def test_real_clients_and_servers_equal_the_simulator_bitwise(
    method: str, overlap: int, compress: str, shards: int
) -> None:
    # Two workers taking turns against real servers (in this process), each exchange sent
    # in the background; flush() before the other worker's turn fixes the order in which
    # the center sees them, as the round-robin schedule does.
    hp = Hyperparams(method=method, lr=0.05, tau=3, workers=2)
    problem = Quadratic(sigma=0.5, x0=1.0, dim=300)
    x0 = problem.initial_point()
    servers = _servers(hp, x0, shards)
    try:
        clients = [PSClient([s.address for s in servers], 300, worker_id=r, heartbeat=0,
                            compress=compress) for r in range(2)]  # fmt: skip
        workers, grads = [], []
        deferred = []
        for r, client in enumerate(clients):
            x = x0.clone()
            client.start(x)
            workers.append(Worker(hp, x, Mode.ASYNC, overlap=overlap))
            grads.append(problem.grad_fn(r, 0))

        def serve(r: int):
            def fn(req: Request) -> None:
                clients[r].serve(req)
                if req.op is Op.ELASTIC:
                    deferred.append(req.deferred)

            return fn

        for t in range(60):
            r = t % 2
            run_step(workers[r], grads[r], serve(r))
            clients[r].flush()
        for r in range(2):
            run_settle(workers[r], clients[r].serve)
        center = torch.empty(300, dtype=torch.float64)
        clients[0].pull(center)
        for client in clients:
            client.close()
    finally:
        for s in servers:
            s.__exit__(None, None, None)
    assert deferred and all(deferred)  # every exchange went out in the background
    sim = simulate(problem, hp, schedule="round-robin", steps=60, overlap=overlap,
                   compress=compress)  # fmt: skip
    assert torch.equal(center, sim.center)
    for w, x in zip(workers, sim.workers, strict=True):
        assert torch.equal(w.x, x)


def test_one_worker_computing_while_its_exchange_is_in_flight_equals_the_simulator() -> None:
    # No flush: the worker really computes while the exchange crosses the socket (one
    # worker, so the center sees the same sequence whatever the timing).
    hp = Hyperparams(method="eamsgd", lr=0.05, tau=2, workers=1)
    problem = Quadratic(sigma=0.5, x0=1.0, dim=2000)
    x0 = problem.initial_point()
    (server,) = _servers(hp, x0, 1)
    try:
        with PSClient([server.address], 2000, worker_id=0) as client:
            x = x0.clone()
            client.start(x)
            worker = Worker(hp, x, Mode.ASYNC, overlap=2)
            grad = problem.grad_fn(0, 0)
            for _ in range(40):
                run_step(worker, grad, client.serve)
            run_settle(worker, client.serve)
            center = torch.empty(2000, dtype=torch.float64)
            client.pull(center)
            assert client.exchanges == 20
    finally:
        server.__exit__(None, None, None)
    sim = simulate(problem, hp, schedule="round-robin", steps=40, overlap=2)
    assert torch.equal(center, sim.center)
    assert torch.equal(x, sim.workers[0])


def test_a_server_lost_during_an_overlapped_exchange_is_raised_at_the_wait() -> None:
    # The exchange fails on the background thread; the worker hears of it where it waits
    # for the reply, as a PSConnectionError naming the server, never a quiet stale x.
    hp = Hyperparams(method="easgd", lr=0.05, tau=1, workers=1)
    x0 = torch.zeros(1000)
    (server,) = _servers(hp, x0, 1)
    client = PSClient([server.address], 1000, worker_id=0, heartbeat=0, timeout=30)
    x = x0.clone()
    client.start(x)
    worker = Worker(hp, x, Mode.ASYNC, overlap=1)
    # The server dies before it answers: its sessions are closed under the request.
    entered = threading.Event()
    real = client._exchange

    def exchange(*args, **kwargs):  # type: ignore[no-untyped-def]
        entered.set()
        server.__exit__(None, None, None)
        return real(*args, **kwargs)

    client._exchange = exchange  # type: ignore[method-assign]
    gen = worker.step()
    req = next(gen)
    assert req.op is Op.ELASTIC
    client.serve(req)
    assert req.deferred
    assert entered.wait(30)
    req = gen.send(None)  # the gradient request: the worker computes meanwhile
    assert req.op is Op.GRAD
    with pytest.raises(StopIteration):
        gen.send(0.0)
    gen = worker.step()  # the next step: the pull is due, so the worker waits for it
    req = next(gen)
    assert req.op is Op.WAIT
    with pytest.raises(PSConnectionError, match=r"parameter server 127\.0\.0\.1:\d+"):
        client.serve(req)
    client.close(clean=False)


def test_a_request_while_an_exchange_is_in_flight_is_refused() -> None:
    hp = Hyperparams(method="easgd", lr=0.05, tau=1, workers=1)
    x0 = torch.zeros(100)
    (server,) = _servers(hp, x0, 1)
    try:
        with PSClient([server.address], 100, worker_id=0, heartbeat=0) as client:
            x = x0.clone()
            client.start(x)
            d = torch.zeros(100)
            first = Request(Op.ELASTIC, x.clone(), d, deferrable=True)
            client.serve(first)
            with pytest.raises(RuntimeError, match="must WAIT for its reply first"):
                client.serve(Request(Op.ELASTIC, x, torch.zeros(100)))
            client.serve(Request(Op.WAIT, d))
            client.serve(Request(Op.ELASTIC, x, torch.zeros(100)))  # now it may
    finally:
        server.__exit__(None, None, None)


def test_a_worker_with_an_owed_pull_refuses_its_state_until_settled() -> None:
    hp = Hyperparams(method="easgd", lr=0.05, tau=2, workers=1)
    worker = Worker(hp, torch.zeros(4), Mode.ASYNC, overlap=2)
    run_step(worker, lambda x, g: 0.0, lambda req: req.reply.fill_(0.5))  # type: ignore[union-attr]
    assert worker.in_flight
    with pytest.raises(RuntimeError, match="settle the worker first"):
        worker.state_dict()
    run_settle(worker, lambda req: None)
    assert torch.equal(worker.x, torch.full((4,), -0.5))
    assert worker.state_dict()["t"] == 1


@pytest.mark.timeout(300)
def test_easgd_train_overlapped_runs_and_counts_every_exchange(tmp_path: Path) -> None:
    def run(overlap: int) -> dict:
        out = tmp_path / f"k{overlap}"
        proc = subprocess.run(
            [sys.executable, "-m", "easgd", "train", "--method", "eamsgd", "--mode", "async",
             "--workers", "2", "--steps", "300", "--tau", "2", "--overlap", str(overlap),
             "--out", str(out), "--quiet"],
            capture_output=True, text=True, cwd=ROOT, timeout=280,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads((out / "config.json").read_text())["overlap"] == overlap
        return json.loads((out / "summary.json").read_text())

    blocking, overlapped = run(0), run(2)
    assert overlapped["status"] == "completed"
    assert overlapped["exchanges"] == blocking["exchanges"] == 300
    # Asynchronous runs interleave differently each time; both centers are nearly trained
    # after 300 steps (about 10% error on digits), and a lag of tau steps changes little.
    assert abs(overlapped["center_test_error"] - blocking["center_test_error"]) <= 0.05


@pytest.mark.parametrize("method", ["easgd", "eamsgd"])
def test_the_asynchronous_wrapper_overlaps_its_exchanges(method: str) -> None:
    # easgd.optim with overlap=1 is the blocking wrapper's trajectory bitwise (the paper's
    # update); overlap=tau pulls later, and finish() applies the last reply.
    from easgd.optim import ElasticAveraging

    def run(overlap: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Linear(30, 4)
        n = sum(p.numel() for p in model.parameters())
        x0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        hp = Hyperparams(method=method, workers=2, tau=3)
        data = torch.randn(8, 30, generator=torch.Generator().manual_seed(1))
        with ParameterServer(hp, x0.clone()) as server:
            client = PSClient([server.address], n, worker_id=0, heartbeat=0)
            kw = {"momentum": 0.9} if method == "eamsgd" else {}
            sgd = torch.optim.SGD(model.parameters(), lr=0.05)
            opt = ElasticAveraging(sgd, tau=3, client=client, method=method, overlap=overlap,
                                   **kw)  # fmt: skip
            for _ in range(13):  # not ending on an exchange's first half
                opt.zero_grad()
                model(data).square().mean().backward()
                opt.step()
            opt.finish()
            assert not opt.worker.in_flight
            center = opt.center.clone()
            client.close()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), center

    blocking, lag1, lag3 = run(0), run(1), run(3)
    assert torch.equal(blocking[0], lag1[0]) and torch.equal(blocking[1], lag1[1])
    assert not torch.equal(blocking[0], lag3[0])
    with pytest.raises(ValueError, match="more than tau=3"):
        run(4)


def test_easgd_simulate_takes_overlap_and_compress() -> None:
    def sim(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "easgd", "simulate", "--method", "easgd", "--workers", "3",
             "--steps", "30", "--noise", "0.5", "--dim", "20", "--json", "--quiet", *args],
            capture_output=True, text=True, cwd=ROOT, timeout=120,
        )  # fmt: skip

    out = sim("--schedule", "round-robin", "--tau", "3", "--overlap", "3", "--compress", "bf16")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert (got["overlap"], got["compress"]) == (3, "bf16")
    hp = Hyperparams(method="easgd", workers=3, tau=3, lr=0.01)
    ref = simulate(Quadratic(sigma=0.5, dim=20), hp, schedule="round-robin", steps=30,
                   overlap=3, compress="bf16")  # fmt: skip
    assert got["center"] == ref.center.tolist()
    for args, message in (
        (("--overlap", "1"), "--overlap 1 on the sync schedule"),
        (("--schedule", "async", "--overlap", "2"), "more than --tau 1"),
        (("--method", "downpour", "--compress", "int8"), "--compress int8 with --method downpour"),
    ):
        bad = sim(*args)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr


def test_a_clean_close_raises_the_failure_of_an_exchange_nobody_waited_for() -> None:
    # The worker never reached its WAIT (say, the loop ended early): closing the client must
    # not say goodbye over a lost update as if nothing happened.
    hp = Hyperparams(method="easgd", lr=0.05, tau=1, workers=1)
    x0 = torch.zeros(1000)
    (server,) = _servers(hp, x0, 1)
    client = PSClient([server.address], 1000, worker_id=0, heartbeat=0, timeout=30)
    x = x0.clone()
    client.start(x)
    real = client._exchange

    def exchange(*args, **kwargs):  # type: ignore[no-untyped-def]
        server.__exit__(None, None, None)  # the server dies before it answers
        return real(*args, **kwargs)

    client._exchange = exchange  # type: ignore[method-assign]
    req = Request(Op.ELASTIC, x.clone(), torch.zeros(1000), deferrable=True)
    client.serve(req)
    assert req.deferred
    with pytest.raises(PSConnectionError, match=r"parameter server 127\.0\.0\.1:\d+"):
        client.close()
    client.close(clean=False)  # idempotent after the error


@pytest.mark.timeout(300)
def test_the_summary_counts_the_overlapped_exchange_still_in_flight_at_the_last_event(
    tmp_path: Path,
) -> None:
    # The last exchange event is written while the last overlapped exchange may still be on
    # its way (a busy machine made the summary say 299 of 300). Each worker's worker_done,
    # written after it settled, carries its totals, and the summary adds those.
    from easgd.runlog import RunPaths, iter_jsonl

    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "easgd", "train", "--method", "easgd", "--mode", "async",
         "--workers", "2", "--steps", "60", "--tau", "1", "--overlap", "1",
         "--out", str(out), "--quiet"],
        capture_output=True, text=True, cwd=ROOT, timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    done = [e for e in iter_jsonl(RunPaths(out).metrics) if e["event"] == "worker_done"]
    assert sorted((e["worker"], e["exchanges"]) for e in done) == [(0, 60), (1, 60)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exchanges"] == 120
    assert summary["bytes_sent"] == sum(e["bytes_sent"] for e in done)
