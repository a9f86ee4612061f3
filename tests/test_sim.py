"""The simulator against known answers: linear maps, closed forms, and equivalences."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from easgd.algorithms import Hyperparams
from easgd.analysis.stability import (
    center_stationary_variance,
    easgd_roundrobin_worker_map,
    easgd_sync_map,
)
from easgd.cli import main
from easgd.sim import CostModel, Quadratic, resolve_mode, simulate


def trajectory(res: Any) -> np.ndarray:
    return np.array([float(c) for c in res.center_trajectory])


@pytest.mark.parametrize(("p", "lr", "h", "alpha"), [(3, 0.1, 1.0, 0.2), (4, 0.05, 2.0, 0.225)])
def test_sync_easgd_equals_the_matrix_power_of_its_linear_map(
    p: int, lr: float, h: float, alpha: float
) -> None:
    hp = Hyperparams(method="easgd", lr=lr, tau=1, workers=p, alpha=alpha)
    res = simulate(Quadratic(h=h, x0=1.0), hp, schedule="sync", steps=25, trajectory=True)
    m = easgd_sync_map(p, lr * h, alpha)
    s = np.ones(p + 1)
    expected = []
    for _ in range(25):
        s = m @ s
        expected.append(s[p])
    np.testing.assert_allclose(trajectory(res), expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose([float(w) for w in res.workers], s[:p], rtol=1e-12)


def test_sync_easgd_with_period_tau_alternates_elastic_and_local_maps() -> None:
    p, lr, alpha, tau = 3, 0.1, 0.3, 3
    hp = Hyperparams(method="easgd", lr=lr, tau=tau, workers=p, alpha=alpha)
    res = simulate(Quadratic(), hp, schedule="sync", steps=10, trajectory=True)
    elastic = easgd_sync_map(p, lr, alpha)
    local = np.diag([1 - lr] * p + [1.0])  # no exchange: workers step, center stays
    s = np.ones(p + 1)
    expected = []
    for t in range(10):
        s = (elastic if t % tau == 0 else local) @ s
        expected.append(s[p])
    np.testing.assert_allclose(trajectory(res), expected, rtol=1e-12)


def test_round_robin_easgd_equals_the_product_of_worker_maps() -> None:
    p, lr, alpha = 3, 0.2, 0.3
    hp = Hyperparams(method="easgd", lr=lr, tau=1, workers=p, alpha=alpha)
    res = simulate(Quadratic(x0=2.0), hp, schedule="round-robin", steps=12, trajectory=True)
    s = np.full(p + 1, 2.0)
    expected = []
    for t in range(12):
        s = easgd_roundrobin_worker_map(t % p, p, lr, alpha) @ s
        expected.append(s[p])
    np.testing.assert_allclose(trajectory(res), expected, rtol=1e-12)


@pytest.mark.parametrize("schedule", ["sync", "async"])
def test_eamsgd_with_zero_momentum_is_easgd(schedule: str) -> None:
    problem = Quadratic(sigma=0.5, dim=8)
    kw: dict[str, Any] = {"lr": 0.1, "tau": 2, "workers": 3}
    cost = CostModel(step_dist="exponential", latency=0.1)
    a = simulate(problem, Hyperparams(method="easgd", **kw), schedule=schedule, steps=30,
                 seed=3, cost=cost)  # fmt: skip
    b = simulate(problem, Hyperparams(method="eamsgd", momentum=0.0, **kw),
                 schedule=schedule, steps=30, seed=3, cost=cost)  # fmt: skip
    assert_close(a.center, b.center, rtol=0, atol=0)
    for wa, wb in zip(a.workers, b.workers, strict=True):
        assert_close(wa, wb, rtol=0, atol=0)


def test_async_easgd_with_one_worker_and_tau_one_is_sync_with_p_one() -> None:
    problem = Quadratic(sigma=0.3, dim=4)
    hp = Hyperparams(method="easgd", lr=0.1, tau=1, workers=1)
    a = simulate(problem, hp, schedule="async", steps=40, seed=1)
    b = simulate(problem, hp, schedule="sync", steps=40, seed=1)
    assert_close(a.center, b.center)
    assert_close(a.workers[0], b.workers[0])


def test_local_sgd_with_one_worker_is_sgd() -> None:
    problem = Quadratic(sigma=0.3, dim=4)
    a = simulate(problem, Hyperparams(method="localsgd", lr=0.1, tau=3), steps=20, seed=2)
    b = simulate(problem, Hyperparams(method="sgd", lr=0.1), steps=20, seed=2)
    assert_close(a.center, b.center, rtol=0, atol=0)


def test_allreduce_sgd_on_a_noise_free_problem_is_sgd() -> None:
    problem = Quadratic(x0=3.0)
    a = simulate(problem, Hyperparams(method="allreduce", lr=0.1, workers=4), steps=15)
    b = simulate(problem, Hyperparams(method="sgd", lr=0.1), steps=15)
    assert_close(a.center, b.center)
    assert a.exchanges == 15


def test_stationary_center_variance_matches_the_closed_form() -> None:
    """Monte-Carlo over 20,000 independent coordinates against paper-spec 6.3."""
    p, lr, h, sigma, beta = 4, 0.1, 1.0, 1.0, 0.9
    hp = Hyperparams(method="easgd", lr=lr, tau=1, workers=p, beta=beta)
    problem = Quadratic(h=h, sigma=sigma, x0=0.0, dim=20_000)
    res = simulate(problem, hp, schedule="sync", steps=600, seed=0, trajectory=True)
    samples = torch.stack(res.center_trajectory[300::25])  # past burn-in, thinned
    measured = float(samples.var(dim=1).mean())
    expected = center_stationary_variance(p, lr, h, sigma, hp.alpha, hp.beta)
    assert measured == pytest.approx(expected, rel=0.04)


def test_async_virtual_clock_and_traffic() -> None:
    hp = Hyperparams(method="easgd", lr=0.1, tau=5, workers=3)
    cost = CostModel(step_time=0.5, stragglers={0: 4.0})
    res = simulate(Quadratic(), hp, schedule="async", steps=20, cost=cost)
    # The straggler (2 s per step) finishes last; exchanges at t = 0, 5, 10, 15 per worker.
    assert res.virtual_seconds == pytest.approx(20 * 2.0)
    assert res.exchanges == 3 * 4
    assert res.bytes_moved == res.exchanges * 2 * 4  # one float each way
    assert res.local_steps == 60


def test_async_is_deterministic_for_a_seed() -> None:
    hp = Hyperparams(method="eamsgd", lr=0.05, tau=2, workers=4)
    problem = Quadratic(sigma=1.0, dim=3)
    cost = CostModel(step_dist="lognormal", latency=0.05, bandwidth=1e3, server_time=0.01)
    a = simulate(problem, hp, schedule="async", steps=25, seed=7, cost=cost)
    b = simulate(problem, hp, schedule="async", steps=25, seed=7, cost=cost)
    c = simulate(problem, hp, schedule="async", steps=25, seed=8, cost=cost)
    assert_close(a.center, b.center, rtol=0, atol=0)
    assert a.virtual_seconds == b.virtual_seconds
    assert not torch.equal(a.center, c.center)


def test_latency_and_bandwidth_cost_virtual_time() -> None:
    hp = Hyperparams(method="easgd", lr=0.1, tau=1, workers=1)
    cost = CostModel(step_time=1.0, latency=0.25, bandwidth=8.0, numel=2)  # 8 bytes: 1 s
    res = simulate(Quadratic(), hp, schedule="async", steps=3, cost=cost)
    # Each step: exchange (2 x (0.25 + 1)) then compute (1).
    assert res.virtual_seconds == pytest.approx(3 * (2 * 1.25 + 1.0))


def test_downpour_family_on_the_sync_schedule_is_served_in_worker_order() -> None:
    hp = Hyperparams(method="downpour", lr=0.1, tau=1, workers=2)
    res = simulate(Quadratic(), hp, schedule="sync", steps=1)
    # Both workers push -0.1 (grad 1 at x=1); center 1 - 0.2 = 0.8.
    assert float(res.center) == pytest.approx(0.8)
    assert [float(w) for w in res.workers] == pytest.approx([0.9, 0.8])


def test_schedule_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match=r"synchronous only.*schedule='sync'"):
        resolve_mode(Hyperparams(method="allreduce", workers=2), "async")
    with pytest.raises(ValueError, match="schedule='hogwild'"):
        resolve_mode(Hyperparams(method="easgd", workers=2), "hogwild")
    with pytest.raises(ValueError, match="steps=-1"):
        simulate(Quadratic(), Hyperparams(), steps=-1)
    with pytest.raises(ValueError, match="h=0"):
        Quadratic(h=0.0)


def test_cli_contract_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["simulate", "--problem", "quadratic", "--h", "1", "--noise", "0", "--x0", "1",
            "--method", "easgd", "--schedule", "sync", "--p", "4", "--tau", "1", "--lr", "0.1",
            "--beta", "0.9", "--steps", "5", "--seed", "0", "--json"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["center_trajectory"]) == 5
    assert out["center_trajectory"][:2] == pytest.approx([1.0, 0.91])
    assert out["center"] == pytest.approx(out["center_trajectory"][-1])
    assert out["alpha"] == pytest.approx(0.225)


def test_cli_alpha_given_and_momentum(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["simulate", "--method", "eamsgd", "--schedule", "round-robin", "--p", "2", "--alpha",
            "0.3", "--momentum", "0", "--lr", "0.1", "--steps", "4", "--json"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["alpha"] == 0.3 and out["beta"] == pytest.approx(0.6)
    assert out["momentum"] == 0.0


def test_cli_readable_table_and_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--steps", "3", "--quiet"]) == 0
    assert "virtual_seconds" in capsys.readouterr().out
    assert main(["simulate", "--p", "4", "--alpha", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "--alpha 1.5 is outside (0, 1]" in err and "alpha=beta/p=0.225" in err


@pytest.mark.parametrize("method", ["easgd", "eamsgd"])
def test_deferred_sync_sum_is_exactly_the_blocking_one(method: str) -> None:
    """A driver that starts each SUM and completes it only at the worker's WAIT (as the
    all-reduce transport overlaps it with the next tau local steps) changes nothing."""
    from easgd.algorithms import Op, Request, Worker, run_settle, run_step

    p, steps = 3, 23
    hp = Hyperparams(method=method, lr=0.05, tau=4, workers=p)
    problem = Quadratic(h=1.5, sigma=0.3, dim=8)
    ref = simulate(problem, hp, schedule="sync", steps=steps, seed=5)

    workers = [Worker(hp, problem.initial_point(), "sync") for _ in range(p)]
    grads = [problem.grad_fn(r, 5) for r in range(p)]
    rounds: list[list[Request]] = []  # the SUMs started, per exchange round
    round_of: dict[int, int] = {}  # payload -> the round its SUM belongs to
    done: set[int] = set()
    deferred = 0

    def serve(req: Request) -> None:
        nonlocal deferred
        key = req.payload.data_ptr()
        if req.op is Op.SUM:
            req.deferred = True
            k = round_of[key] + 1 if key in round_of else 0
            round_of[key] = k
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(req)
            deferred += 1
        elif req.op is Op.WAIT:
            k = round_of[key]
            if k not in done:  # the round's first WAIT completes its all-reduce
                assert len(rounds[k]) == p
                total = torch.stack([r.payload for r in rounds[k]]).sum(0)
                for r in rounds[k]:
                    r.payload.copy_(total)
                done.add(k)
        else:
            raise AssertionError(req.op)

    for _ in range(steps):
        for w, g in zip(workers, grads, strict=True):
            run_step(w, g, serve)
    assert all(w.in_flight for w in workers)
    for w in workers:
        run_settle(w, serve)
    assert not any(w.in_flight for w in workers)
    assert deferred == p * len(range(0, steps, hp.tau))
    assert workers[0].center is not None
    assert torch.equal(workers[0].center, ref.center)
    for w, x in zip(workers, ref.workers, strict=True):
        assert torch.equal(w.x, x)


@pytest.mark.parametrize(("bandwidth", "expected"), [(1.6, 9 + 2.5), (0.8, 9 + 2 + 2 + 5)])
def test_sync_easgd_clock_overlaps_the_all_reduce_with_the_next_local_steps(
    bandwidth: float, expected: float
) -> None:
    # All-reduce cost 4N/bandwidth = 2.5 s or 5 s; steps of 1 s; exchanges at t = 0, 4, 8.
    # The sum started after step t runs during steps t+1..t+3; the next exchange pays what
    # is left (0 s or 2 s), and the end waits for the last one.
    hp = Hyperparams(method="easgd", lr=0.1, tau=4, workers=2)
    cost = CostModel(step_time=1.0, bandwidth=bandwidth, numel=1)
    res = simulate(Quadratic(), hp, schedule="sync", steps=9, cost=cost)
    assert res.virtual_seconds == pytest.approx(expected)
    blocking = Hyperparams(method="localsgd", lr=0.1, tau=4, workers=2)  # MEAN blocks
    res = simulate(Quadratic(), blocking, schedule="sync", steps=8, cost=cost)
    assert res.virtual_seconds == pytest.approx(8 + 2 * 4 / bandwidth)
