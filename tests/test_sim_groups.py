"""The cost model of groups: each local step of a grouped worker pays its group's all-reduce."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest
import torch

from easgd.algorithms import Hyperparams
from easgd.cli import main
from easgd.sim import CostModel, Grouped, Quadratic, simulate

GROUP_LATENCY, GROUP_BANDWIDTH = 2e-6, 5e10


def link(**kw: Any) -> CostModel:
    """A cost model of 5M-class messages on 1 Gbit/s, groups on a fast intra-node link."""
    given = {"latency": 50e-6, "bandwidth": 1.25e8, "numel": 2_000_000, **kw}
    if given.get("group_size", 1) > 1:
        given = {"group_latency": GROUP_LATENCY, "group_bandwidth": GROUP_BANDWIDTH, **given}
    return CostModel(**given)


def test_a_grouped_step_costs_the_step_and_a_ring_all_reduce_on_the_group_link() -> None:
    cost = link(step_time=0.1, numel=1_000_001, latency=1e-3, bandwidth=1e8, group_size=4)
    chunk = math.ceil(4_000_004 / 4)  # float32 gradients, a quarter per message
    group = 2 * 3 * (2e-6 + chunk / 5e10)
    assert cost.group_allreduce() == pytest.approx(group, rel=1e-15)
    assert cost.draw_step(0, random.Random(0)) == pytest.approx(0.1 + group, rel=1e-15)
    # The workers' link is not the group's: the exchange with the center is priced as before.
    assert cost.message(100) == pytest.approx(1e-3 + 100 / 1e8)
    assert cost.allreduce(400, 4, group=True) == pytest.approx(6 * (2e-6 + 100 / 5e10))


def test_the_group_link_defaults_to_the_workers_link() -> None:
    cost = CostModel(step_time=0.5, numel=1000, latency=1e-4, bandwidth=1e6, group_size=2)
    assert cost.group_allreduce() == pytest.approx(2 * (1e-4 + 2000 / 1e6))
    assert CostModel(step_time=0.5).group_allreduce() == 0.0  # no group, nothing to pay


@pytest.mark.parametrize(
    ("schedule", "method"), [("sync", "easgd"), ("round-robin", "eamsgd"), ("async", "eamsgd")]
)
def test_every_schedule_pays_the_group_all_reduce_in_each_local_step(
    schedule: str, method: str
) -> None:
    """A group of G on its link is a worker whose step takes step_time + all-reduce: the
    same clock and the same trajectory as that step time without groups."""
    g = 4
    grouped = link(step_time=0.1, group_size=g, group_bandwidth=1e9)
    plain = link(step_time=0.1 + grouped.group_allreduce())
    assert grouped.group_allreduce() > 0.01  # a real share of the step (bandwidth-bound)
    hp = Hyperparams(method=method, lr=0.05, tau=3, workers=3)
    problem = Grouped(Quadratic(sigma=0.5, dim=4), g)
    a = simulate(problem, hp, schedule=schedule, steps=12, cost=grouped, seed=1)
    b = simulate(problem, hp, schedule=schedule, steps=12, cost=plain, seed=1)
    assert a.virtual_seconds == b.virtual_seconds
    assert torch.equal(a.center, b.center)
    ungrouped = simulate(problem, hp, schedule=schedule, steps=12, seed=1, cost=link(step_time=0.1))
    assert a.virtual_seconds > ungrouped.virtual_seconds


def test_without_numel_the_group_all_reduces_the_objectives_gradient() -> None:
    hp = Hyperparams(method="easgd", lr=0.1, tau=1, workers=2)
    cost = CostModel(step_time=1.0, group_size=2, group_latency=0.0, group_bandwidth=8.0)
    res = simulate(Grouped(Quadratic(dim=6), 2), hp, steps=5, cost=cost)
    # 6 float32 values, 2 messages of 12 bytes at 8 bytes/s: 3 s of all-reduce per step.
    assert res.virtual_seconds == pytest.approx(5 * (1.0 + 3.0))
    with pytest.raises(ValueError, match="group_size=2 needs numel"):
        cost.draw_step(0, random.Random(0))  # outside the simulator, which fills numel in


def test_grouped_objective_and_cost_model_must_agree() -> None:
    hp = Hyperparams(method="easgd", lr=0.1, workers=2)
    with pytest.raises(ValueError, match=r"group_size=4\) prices groups of 4, but the "
                       r"objective is Grouped\(size=2\)"):  # fmt: skip
        simulate(Grouped(Quadratic(), 2), hp, steps=1, cost=CostModel(group_size=4, numel=8))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"group_size": 0}, "group_size=0 must be an integer >= 1"),
        ({"group_size": True}, "group_size=True must be an integer >= 1"),
        ({"group_size": 2.0}, "group_size=2.0 must be an integer >= 1"),
        ({"group_size": 2, "group_latency": -1.0}, "group_latency=-1.0 must be a finite"),
        ({"group_size": 2, "group_latency": math.inf}, "group_latency=inf must be a finite"),
        ({"group_size": 2, "group_bandwidth": 0.0}, "group_bandwidth=0.0 must be > 0"),
        ({"group_latency": 1e-6}, "group_latency=1e-06 with group_size=1: there is no group"),
        ({"group_bandwidth": 1e9}, "group_bandwidth=1000000000.0 with group_size=1"),
    ],
)
def test_cost_model_refuses_bad_groups(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CostModel(**kw)


def test_batched_engine_runs_groups() -> None:
    """Noise-free: bitwise the per-worker engine; with noise, a group's gradient noise is
    that of the mean of G draws (the base's batched streams are independent)."""
    hp = Hyperparams(method="eamsgd", lr=0.05, tau=2, workers=3)
    problem = Grouped(Quadratic(h=1.2, x0=0.7, dim=5), 2)
    cost = link(step_time=0.1, group_size=2, numel=10_000)
    a = simulate(problem, hp, steps=9, cost=cost, engine="per-worker")
    b = simulate(problem, hp, steps=9, cost=cost)
    assert b.engine == "batched"  # auto: noise-free, so exact
    assert torch.equal(a.center, b.center) and a.virtual_seconds == b.virtual_seconds
    # Asynchronously too: the group's all-reduce is part of a constant step (lockstep).
    a = simulate(problem, hp, schedule="async", steps=9, cost=cost, engine="per-worker")
    b = simulate(problem, hp, schedule="async", steps=9, cost=cost)
    assert b.engine == "batched" and a.exchanges == b.exchanges > 0
    assert torch.equal(a.center, b.center) and a.virtual_seconds == b.virtual_seconds
    noisy = Grouped(Quadratic(sigma=1.0, dim=5000), 4)
    x = torch.zeros(3 * 5000, dtype=torch.float64)
    g = torch.empty_like(x)
    noisy.batched_grad_fn(3, seed=1)(x, g)
    assert 0.9 < float(g.var()) * 4 < 1.1


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["simulate", "--json", "--method", "easgd", "--schedule", "sync", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_group_size_simulates_groups_and_prices_their_link(
    capsys: pytest.CaptureFixture[str],
) -> None:
    common = ("--steps", "6", "--tau", "2", "--lr", "0.1", "--step-time", "0.1", "--noise", "0.3",
              "--numel", "1000000", "--latency", "1e-4", "--bandwidth", "1e8")  # fmt: skip
    out = run_cli(capsys, "--workers", "8", "--group-size", "4", "--group-latency", "1e-6",
                  "--group-bandwidth", "1e10", *common)  # fmt: skip
    assert out["p"] == 2 and out["group_size"] == 4 and out["local_steps"] == 12
    hp = Hyperparams(method="easgd", lr=0.1, tau=2, workers=2)
    cost = CostModel(step_time=0.1, numel=1_000_000, latency=1e-4, bandwidth=1e8,
                     group_size=4, group_latency=1e-6, group_bandwidth=1e10)  # fmt: skip
    ref = simulate(Grouped(Quadratic(sigma=0.3), 4), hp, steps=6, cost=cost, trajectory=True)
    assert out["virtual_seconds"] == ref.virtual_seconds
    assert out["center"] == float(ref.center)
    plain = run_cli(capsys, "--workers", "2", *common)
    assert out["virtual_seconds"] > plain["virtual_seconds"]


def test_cli_engine_flag(capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--workers", "4", "--steps", "3", "--noise", "1")
    assert run_cli(capsys, *args)["engine"] == "per-worker"
    assert run_cli(capsys, *args, "--engine", "batched")["engine"] == "batched"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--workers", "6", "--group-size", "4"],
            "--workers 6 is not a multiple of --group-size 4",
        ),
        (["--group-size", "0"], "--group-size 0 must be >= 1"),
        (["--group-size", "2", "--method", "allreduce"], "allreduce has no elastic exchange"),
        (
            ["--group-latency", "1e-6"],
            "--group-latency 1e-06 with --group-size 1: there is no group link",
        ),
        (["--group-size", "2", "--group-bandwidth", "0"], "--group-bandwidth 0.0 must be > 0"),
        (["--group-size", "2", "--group-latency", "-1"], "--group-latency -1.0 must be a finite"),
        (["--group-size", "2", "--straggler", "3:2"], "2 groups (--workers 4 / --group-size 2)"),
        (
            ["--schedule", "async", "--server-time", "0.1", "--engine", "batched"],
            "--engine batched cannot run this",
        ),
    ],
)
def test_cli_refuses_bad_groups(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    argv = ["simulate", "--method", "easgd", "--workers", "4", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
