"""The simulator's batched engine (easgd.sim_batched) against its per-worker engine."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from easgd.algorithms import Hyperparams
from easgd.analysis.stability import center_stationary_variance
from easgd.sim import CostModel, GradFn, Quadratic, SimResult, simulate
from easgd.sim_batched import BatchedSim, batched_unsupported


class Targets:
    """``F_r(x) = h/2 |x - a_r|^2``: a noise-free objective whose workers differ (each its
    own target ``a_r``), so their rows, and the order of a sum over them, matter."""

    def __init__(self, p: int, dim: int, h: float = 0.7) -> None:
        gen = torch.Generator().manual_seed(5)
        self.targets = torch.randn(p, dim, generator=gen, dtype=torch.float64)
        self.h, self.dim, self.batched_calls = h, dim, 0

    def initial_point(self) -> Tensor:
        return torch.full((self.dim,), 0.3, dtype=torch.float64)

    def _fn(self, a: Tensor) -> GradFn:
        def fn(x: Tensor, out: Tensor) -> float:
            torch.sub(x, a, out=out)
            out.mul_(self.h)
            return 0.0

        return fn

    def grad_fn(self, rank: int, seed: int) -> GradFn:
        return self._fn(self.targets[rank])

    def batched_grad_fn(self, p: int, seed: int) -> GradFn:
        fn = self._fn(self.targets.reshape(-1))

        def counted(x: Tensor, out: Tensor) -> float:
            self.batched_calls += 1
            return fn(x, out)

        return counted

    def grad_buffer(self, rank: int) -> Tensor | None:
        return None

    def evaluate(self, x: Tensor) -> dict[str, float]:
        return {"loss": float((x - self.targets.mean(0)).square().sum())}


#: Every synchronous method (and its variants: momentum, AdamW inside, decay, weight decay).
SYNC: dict[str, dict[str, Any]] = {
    "easgd": {"method": "easgd", "tau": 3, "alpha": 0.1},
    "easgd tau 1": {"method": "easgd", "tau": 1, "alpha": 0.15, "beta": 0.9},
    "eamsgd": {"method": "eamsgd", "tau": 4, "alpha": 0.05, "momentum": 0.9},
    "allreduce": {"method": "allreduce"},
    "allreduce nesterov": {"method": "allreduce", "momentum": 0.9, "weight_decay": 0.01},
    "localsgd": {"method": "localsgd", "tau": 3},
    "localsgd momentum": {"method": "localsgd", "tau": 2, "momentum": 0.5},
    "diloco": {"method": "diloco", "tau": 3},
    "diloco adamw": {"method": "diloco", "tau": 3, "inner": "adamw", "weight_decay": 0.1},
    "eamsgd lr decay": {"method": "eamsgd", "tau": 2, "lr_decay": 0.1, "lr_power": 0.5},
}
COST = CostModel(numel=5_000_000, step_time=0.1, latency=50e-6, bandwidth=1.25e8)


def both(objective: Any, hp: Hyperparams, **kw: Any) -> tuple[SimResult, SimResult]:
    a = simulate(objective, hp, engine="per-worker", **kw)
    b = simulate(objective, hp, engine="batched", **kw)
    assert (a.engine, b.engine) == ("per-worker", "batched")
    return a, b


def assert_identical(a: SimResult, b: SimResult) -> None:
    """Bitwise: every value, the clock, the traffic."""
    assert torch.equal(a.center, b.center)
    assert len(a.workers) == len(b.workers)
    for x, y in zip(a.workers, b.workers, strict=True):
        assert torch.equal(x, y)
    for u, v in zip(a.worker_momenta, b.worker_momenta, strict=True):
        assert (u is None) == (v is None)
        assert u is None or v is None or torch.equal(u, v)
    assert len(a.center_trajectory) == len(b.center_trajectory)
    for c, d in zip(a.center_trajectory, b.center_trajectory, strict=True):
        assert torch.equal(c, d)
    assert (a.times, a.metrics) == (b.times, b.metrics)
    assert a.virtual_seconds == b.virtual_seconds
    for counted in ("exchanges", "bytes_moved", "local_steps"):
        assert getattr(a, counted) == getattr(b, counted)


@pytest.mark.parametrize("name", sorted(SYNC))
def test_batched_equals_per_worker_bitwise_on_different_workers(name: str) -> None:
    """Workers with their own targets: the rows differ, and the reductions over them are
    the same sums in the same order, so every value is bitwise the per-worker engine's."""
    p = 5
    hp = Hyperparams(workers=p, lr=0.05, **SYNC[name])
    a, b = both(Targets(p, 13), hp, steps=23, cost=COST, trajectory=True, eval_interval=0.5)
    assert_identical(a, b)
    assert a.exchanges > 0
    if hp.spec.elastic:  # the workers differ (the others sum their differing gradients
        assert not torch.equal(a.workers[0], a.workers[1])  # or end on a mean)


@pytest.mark.parametrize("name", sorted(SYNC))
def test_batched_equals_per_worker_bitwise_on_the_noise_free_quadratic(name: str) -> None:
    hp = Hyperparams(workers=4, lr=0.1, **SYNC[name])
    a, b = both(Quadratic(h=1.3, x0=2.0, dim=7), hp, steps=17, cost=COST, trajectory=True)
    assert_identical(a, b)


@pytest.mark.parametrize("method", ["sgd", "asgd", "mvasgd", "msgd"])
def test_batched_runs_the_sequential_methods_bitwise(method: str) -> None:
    a, b = both(Targets(1, 6), Hyperparams(method=method, lr=0.1), steps=15, trajectory=True)
    assert_identical(a, b)


#: Every asynchronous method, and the overlapped exchange (its reply K steps later).
ASYNC: dict[str, dict[str, Any]] = {
    "easgd": {"method": "easgd", "tau": 3, "alpha": 0.1},
    "easgd overlap 1": {"method": "easgd", "tau": 3, "alpha": 0.1, "overlap": 1},
    "eamsgd": {"method": "eamsgd", "tau": 4, "alpha": 0.05, "momentum": 0.9},
    "eamsgd overlap 4": {"method": "eamsgd", "tau": 4, "momentum": 0.9, "overlap": 4},
    "eamsgd lr decay": {"method": "eamsgd", "tau": 2, "lr_decay": 0.1, "lr_power": 0.5},
    "downpour": {"method": "downpour", "tau": 2, "weight_decay": 0.01},
    "mdownpour": {"method": "mdownpour", "momentum": 0.5},
    "adownpour": {"method": "adownpour", "tau": 2},
    "mvadownpour": {"method": "mvadownpour", "tau": 3},
}


@pytest.mark.parametrize("name", sorted(ASYNC))
@pytest.mark.parametrize("cost", [COST, CostModel()], ids=["1 Gbit/s", "free links"])
def test_batched_asynchronous_schedule_equals_per_worker_bitwise(
    name: str, cost: CostModel
) -> None:
    """Constant step times and an unqueued server keep the workers in lockstep: every
    worker's events fall on the same instants, where the per-worker engine serves them in
    rank order and the batched one serves the rows in rank order, with the evaluations and
    the trajectory taken after the same center updates."""
    kw = dict(ASYNC[name])
    overlap = kw.pop("overlap", 0)
    p = 5
    hp = Hyperparams(workers=p, lr=0.05, **kw)
    a, b = both(Targets(p, 13), hp, schedule="async", steps=23, cost=cost, trajectory=True,
                eval_interval=0.45, overlap=overlap)  # fmt: skip
    assert_identical(a, b)
    assert a.exchanges >= p * 23 // hp.tau and len(a.center_trajectory) == a.exchanges
    assert len(a.times) > 3  # evaluated in between, not only at the ends


@pytest.mark.parametrize("method", ["downpour", "mdownpour", "adownpour", "mvadownpour"])
def test_batched_serves_the_downpour_family_on_the_synchronous_schedule_bitwise(
    method: str,
) -> None:
    kw = ASYNC[method]
    hp = Hyperparams(workers=4, lr=0.05, **kw)
    a, b = both(Targets(4, 7), hp, steps=19, cost=COST, trajectory=True, eval_interval=0.3)
    assert_identical(a, b)


def test_batched_asynchronous_noise_agrees_in_distribution() -> None:
    """With noise the two engines draw different numbers; the asynchronous center's
    stationary variance (no closed form here) agrees between them."""
    hp = Hyperparams(method="easgd", lr=0.1, tau=1, workers=4)
    problem = Quadratic(sigma=1.0, x0=0.0, dim=3_000)
    variances = []
    for engine in ("per-worker", "batched"):
        res = simulate(problem, hp, schedule="async", steps=500, seed=3, trajectory=True,
                       engine=engine)  # fmt: skip
        samples = torch.stack(res.center_trajectory[800::40])  # 4 updates per step
        variances.append(float(samples.var(dim=1).mean()))
    assert variances[1] == pytest.approx(variances[0], rel=0.06)


@pytest.mark.parametrize(
    "cost",
    [
        CostModel(step_time=0.2, stragglers={1: 3.0}, latency=1e-3, bandwidth=1e6, numel=1000),
        CostModel(step_time=0.2, step_dist="lognormal", step_cv=0.5, stragglers={2: 2.0}),
        CostModel(step_time=0.1, step_dist="exponential", latency=1e-4),
    ],
    ids=["stragglers", "lognormal", "exponential"],
)
def test_batched_clock_equals_per_worker_with_stragglers_and_random_steps(
    cost: CostModel,
) -> None:
    """The clock is the per-worker engine's code: the same draws, in the same order."""
    hp = Hyperparams(method="eamsgd", lr=0.05, tau=3, workers=4)
    a, b = both(Targets(4, 3), hp, steps=20, cost=cost, seed=3, eval_interval=0.7)
    assert_identical(a, b)
    if cost.step_dist != "constant":  # the clock did draw (it is not steps * step_time)
        assert a.virtual_seconds != pytest.approx(20 * cost.step_time)


def test_a_global_step_is_one_gradient_call_whatever_p() -> None:
    p = 300
    objective = Targets(p, 2)
    res = simulate(objective, Hyperparams(method="eamsgd", lr=0.05, tau=2, workers=p),
                   steps=8, engine="batched")  # fmt: skip
    assert objective.batched_calls == 8
    assert res.local_steps == 8 * p
    assert len(res.workers) == p


def test_auto_picks_batched_only_where_it_gives_the_per_worker_results() -> None:
    hp = Hyperparams(method="easgd", lr=0.1, tau=2, workers=3)
    assert simulate(Quadratic(), hp, steps=3).engine == "batched"  # noise-free
    noisy = Quadratic(sigma=1.0)
    assert simulate(noisy, hp, steps=3).engine == "per-worker"  # its noise streams
    assert simulate(noisy, hp, steps=3, engine="batched").engine == "batched"
    assert simulate(Quadratic(), hp, steps=3, schedule="async").engine == "batched"  # lockstep
    queued = CostModel(server_time=0.1)  # the server's queue: a clock per worker
    assert simulate(Quadratic(), hp, steps=3, schedule="async", cost=queued).engine == "per-worker"
    assert simulate(Quadratic(), hp, steps=3, compress="bf16").engine == "per-worker"


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"schedule": "round-robin"}, "schedule='round-robin' runs one worker's step"),
        ({"compress": "int8"}, "compress='int8'"),
        ({"schedule": "async", "compress": "bf16"}, "compress='bf16'"),
        (
            {"schedule": "async", "cost": CostModel(step_dist="exponential")},
            "step_dist='exponential': on the asynchronous schedule each worker",
        ),
        (
            {"schedule": "async", "cost": CostModel(stragglers={1: 2.0})},
            "stragglers={1: 2.0}",
        ),
        ({"schedule": "async", "cost": CostModel(server_time=0.01)}, "server_time=0.01"),
    ],
)
def test_batched_where_it_cannot_run_says_why(kw: dict[str, Any], message: str) -> None:
    hp = Hyperparams(method="easgd", lr=0.1, tau=2, workers=3)
    with pytest.raises(ValueError, match="engine='batched' cannot run this") as err:
        simulate(Quadratic(), hp, steps=2, engine="batched", **kw)
    assert message in str(err.value)
    assert "use engine='per-worker'" in str(err.value)


def test_batched_needs_batched_gradients() -> None:
    class PerWorkerOnly(Targets):
        batched_grad_fn = None  # type: ignore[assignment]

    hp = Hyperparams(method="easgd", lr=0.1, workers=2)
    why = batched_unsupported(PerWorkerOnly(2, 1), "sync")
    assert why is not None and "PerWorkerOnly has no batched gradients" in why
    assert simulate(PerWorkerOnly(2, 1), hp, steps=2).engine == "per-worker"
    with pytest.raises(ValueError, match="no batched gradients"):
        simulate(PerWorkerOnly(2, 1), hp, steps=2, engine="batched")


def test_unknown_engine_is_refused() -> None:
    with pytest.raises(ValueError, match="engine='gpu'; choose one of auto, per-worker, batched"):
        simulate(Quadratic(), Hyperparams(method="easgd", workers=2), engine="gpu")


def test_batched_sim_holds_one_worker_of_p_rows() -> None:
    from easgd.sim import _Sim

    hp = Hyperparams(method="eamsgd", lr=0.1, tau=2, workers=6)
    sim = BatchedSim(Quadratic(dim=4), hp, "sync", 0, COST)
    assert isinstance(sim, _Sim) and len(sim.workers) == 1
    assert sim.workers[0].x.shape == (24,)
    assert len(sim.worker_vectors()) == 6


@pytest.mark.parametrize("engine", ["per-worker", "batched"])
def test_stationary_center_variance_of_both_engines_matches_the_closed_form(
    engine: str,
) -> None:
    """With noise the engines draw different numbers (one stream against one per worker):
    they agree in distribution. 4,000 independent coordinates, 1,200 steps, 36 thinned
    samples past burn-in: about 1% standard error against a 4% tolerance."""
    p, lr, h, sigma, beta = 4, 0.1, 1.0, 1.0, 0.9
    hp = Hyperparams(method="easgd", lr=lr, tau=1, workers=p, beta=beta)
    problem = Quadratic(h=h, sigma=sigma, x0=0.0, dim=4_000)
    res = simulate(problem, hp, steps=1200, seed=1, trajectory=True, engine=engine)
    samples = torch.stack(res.center_trajectory[300::25])
    measured = float(samples.var(dim=1).mean())
    expected = center_stationary_variance(p, lr, h, sigma, hp.alpha, hp.beta)
    assert measured == pytest.approx(expected, rel=0.04)


def test_batched_stationary_variance_at_p_64_matches_the_closed_form() -> None:
    """At a P the per-worker engine is slow at: the workers' noise is independent across the
    block (the variance falls as 1/p; a shared or repeated draw would not)."""
    p, lr, sigma, alpha = 64, 0.1, 1.0, 0.9 / 64
    hp = Hyperparams(method="easgd", lr=lr, tau=1, workers=p, alpha=alpha)
    problem = Quadratic(sigma=sigma, x0=0.0, dim=500)
    res = simulate(problem, hp, steps=900, seed=2, trajectory=True, engine="batched")
    samples = torch.stack(res.center_trajectory[300::20])
    measured = float(samples.var(dim=1).mean())
    expected = center_stationary_variance(p, lr, 1.0, sigma, hp.alpha, hp.beta)
    assert measured == pytest.approx(expected, rel=0.05)


def test_batched_noise_is_one_stream_for_the_block() -> None:
    """Documented: with noise the batched oracle is not the per-worker streams (so auto does
    not pick it), but it is deterministic for a seed."""
    q = Quadratic(sigma=1.0, dim=3)
    hp = Hyperparams(method="easgd", lr=0.1, tau=1, workers=3)
    a, b = both(q, hp, steps=5, seed=4)
    assert not torch.equal(a.center, b.center)
    again = simulate(q, hp, steps=5, seed=4, engine="batched")
    assert torch.equal(again.center, b.center)
