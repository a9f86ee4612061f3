"""The update rules against hand-computed answers, and the hyperparameter contract."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from easgd.algorithms import (
    METHODS,
    Center,
    Evaluated,
    Hyperparams,
    Mode,
    Op,
    Request,
    StabilityWarning,
    Worker,
    elastic_center_sync_,
    elastic_exchange_,
    learning_rate,
    mdownpour_center_,
    run_step,
)
from easgd.sim import Quadratic, simulate


@pytest.fixture(autouse=True)
def _float64() -> Any:
    """Hand-computed answers in double precision; restored for other test modules."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def const_grad(values: list[float]) -> Any:
    """A gradient oracle that returns h*x + the next value of a fixed noise sequence."""
    it = iter(values)

    def fn(x: torch.Tensor, out: torch.Tensor) -> float:
        out.copy_(x).add_(next(it))
        return 0.0

    return fn


def drive(worker: Worker, center: Center, grad: Any, steps: int) -> None:
    for _ in range(steps):
        run_step(worker, grad, lambda req: center.handle(req.op, req.payload, req.reply))


# ---------------------------------------------------------------------------------------
# Single rules
# ---------------------------------------------------------------------------------------


def test_learning_rate_decay_matches_the_authors_formula() -> None:
    assert learning_rate(0.1, 0) == 0.1
    assert learning_rate(0.1, 10, lr_decay=0.0, lr_power=0.5) == 0.1
    assert learning_rate(0.1, 10, lr_decay=0.1, lr_power=0.5) == pytest.approx(0.1 / math.sqrt(2.0))


def test_elastic_exchange_moves_center_by_the_difference() -> None:
    c, x, d = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0]), torch.empty(2)
    elastic_exchange_(c, x, d, alpha=0.25)
    assert_close(d, torch.tensor([0.5, -0.5]))
    assert_close(c, torch.tensor([1.5, 1.5]))


def test_sync_center_is_the_papers_moving_average() -> None:
    # center_{t+1} = (1 - beta) center_t + beta * mean_i x_i  (eq. 6)
    p, beta = 3, 0.9
    c = torch.tensor([1.0])
    xs = [torch.tensor([v]) for v in (2.0, 4.0, 6.0)]
    diff_sum = sum(x - c for x in xs)
    expected = (1 - beta) * c + beta * torch.stack(xs).mean(0)
    elastic_center_sync_(c, diff_sum, beta=beta, p=p)
    assert_close(c, expected)


def test_mdownpour_master_rule() -> None:
    c, v, g = torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([2.0])
    mdownpour_center_(c, v, g, lr=0.1, momentum=0.9)
    assert_close(v, torch.tensor([0.9 * 0.5 - 0.2]))
    assert_close(c, torch.tensor([1.0 + 0.9 * (0.45 - 0.2) - 0.2]))


# ---------------------------------------------------------------------------------------
# Whole steps, by hand
# ---------------------------------------------------------------------------------------


def test_async_easgd_gradient_at_pre_elastic_snapshot() -> None:
    # t=0 and t=2 communicate (tau=2); gradient g(x) = x + n.
    hp = Hyperparams(method="easgd", lr=0.1, tau=2, workers=1, alpha=0.5)
    x = torch.tensor([1.0])
    center = Center(hp, torch.tensor([0.0]))
    worker = Worker(hp, x, "async")
    noise = [0.0, 0.0, 0.0]
    xs, cs = [1.0], [0.0]
    for t in range(3):
        xv, cv = xs[-1], cs[-1]
        if t % 2 == 0:
            d = 0.5 * (xv - cv)
            cs.append(cv + d)
            xs.append(xv - 0.1 * xv - d)
        else:
            cs.append(cv)
            xs.append(xv - 0.1 * xv)
    drive(worker, center, const_grad(noise), 3)
    assert_close(x, torch.tensor([xs[-1]]))
    assert_close(center.center, torch.tensor([cs[-1]]))


def test_eamsgd_follows_the_authors_order() -> None:
    # sug from w before the local step; v = mom*v; w += v; g = grad(w); w -= lr g; v -= lr g;
    # then w -= sug.
    hp = Hyperparams(method="eamsgd", lr=0.1, tau=1, workers=1, alpha=0.5, momentum=0.9)
    x = torch.tensor([1.0])
    center = Center(hp, torch.tensor([0.0]))
    worker = Worker(hp, x, "async")
    w, v, c = 1.0, 0.0, 0.0
    for _ in range(4):
        sug = 0.5 * (w - c)
        c += sug
        v = 0.9 * v
        w = w + v
        g = w  # grad of x^2/2 at the look-ahead point
        w -= 0.1 * g
        v -= 0.1 * g
        w -= sug
    drive(worker, center, const_grad([0.0] * 4), 4)
    assert_close(x, torch.tensor([w]))
    assert_close(center.center, torch.tensor([c]))
    assert worker.v is not None
    assert_close(worker.v, torch.tensor([v]))


def test_downpour_pushes_accumulated_update_and_pull_overwrites() -> None:
    hp = Hyperparams(method="downpour", lr=0.1, tau=2, workers=1)
    x = torch.tensor([1.0])
    center = Center(hp, torch.tensor([1.0]))
    worker = Worker(hp, x, "async")
    # t=0: g=1, acc=-0.1, push -> center 0.9, x = 0.9.
    # t=1: g=0.9, acc=-0.09, x=0.81 (local).  t=2: g=0.81, acc=-0.171, push -> center 0.729.
    drive(worker, center, const_grad([0.0] * 3), 3)
    assert_close(center.center, torch.tensor([0.729]))
    assert_close(x, torch.tensor([0.729]))
    assert worker.acc is not None and float(worker.acc) == 0.0


def test_adownpour_average_is_the_mean_of_past_centers() -> None:
    hp = Hyperparams(method="adownpour", lr=0.1, tau=1, workers=1)
    x = torch.tensor([1.0])
    center = Center(hp, torch.tensor([1.0]))
    worker = Worker(hp, x, "async")
    history = [1.0]
    for _ in range(5):
        drive(worker, center, const_grad([0.0]), 1)
        history.append(float(center.center))
    # z after 5 updates is the uniform mean of the centers before each update.
    assert_close(center.evaluation_vector(), torch.tensor([sum(history[:5]) / 5]))


def test_mvasgd_moving_average_of_iterates() -> None:
    hp = Hyperparams(method="mvasgd", lr=0.1, workers=1, moving_rate=0.5)
    x = torch.tensor([1.0])
    worker = Worker(hp, x, "sequential")
    z, xv = 1.0, 1.0
    for _ in range(3):
        z = 0.5 * z + 0.5 * xv
        xv = 0.9 * xv
        run_step(worker, const_grad([0.0]), lambda r: None)
    assert_close(worker.evaluation_vector(), torch.tensor([z]))
    assert_close(x, torch.tensor([xv]))


def test_weight_decay_is_added_to_the_gradient() -> None:
    hp = Hyperparams(method="sgd", lr=0.1, workers=1, weight_decay=0.5)
    x = torch.tensor([2.0])
    run_step(Worker(hp, x, "sequential"), const_grad([0.0]), lambda r: None)
    assert_close(x, torch.tensor([2.0 - 0.1 * (2.0 + 1.0)]))


def test_communicates_on_local_steps_divisible_by_tau() -> None:
    hp = Hyperparams(method="easgd", lr=0.1, tau=3, workers=2)
    worker = Worker(hp, torch.zeros(1), "async")
    seen = []
    for _ in range(7):
        seen.append(worker.communicates())
        run_step(worker, const_grad([0.0]), lambda r: r.reply.zero_())
    assert seen == [True, False, False, True, False, False, True]


def test_center_refuses_collective_requests() -> None:
    hp = Hyperparams(method="easgd", workers=2)
    center = Center(hp, torch.zeros(2))
    with pytest.raises(ValueError, match="does not serve 'sum'"):
        center.handle(Op.SUM, torch.zeros(2), torch.zeros(2))


def test_center_state_dict_round_trip() -> None:
    hp = Hyperparams(method="mdownpour", lr=0.1, workers=2)
    a = Center(hp, torch.ones(3))
    a.handle(Op.GRAD_PULL, torch.ones(3), torch.empty(3))
    b = Center(hp, torch.zeros(3))
    b.load_state_dict(a.state_dict())
    assert b.t == 1
    assert_close(b.center, a.center)
    assert a.v is not None and b.v is not None
    assert_close(b.v, a.v)


def test_request_reply_buffers_are_reused() -> None:
    hp = Hyperparams(method="easgd", lr=0.1, workers=2)
    worker = Worker(hp, torch.ones(4), "async")
    replies: list[torch.Tensor] = []

    def serve(req: Request) -> None:
        assert req.reply is not None
        replies.append(req.reply)
        req.reply.zero_()

    for _ in range(2):
        run_step(worker, const_grad([0.0] * 2), serve)
    assert replies[0] is replies[1]


# ---------------------------------------------------------------------------------------
# Hyperparameters: defaults, and a table of bad values with their messages
# ---------------------------------------------------------------------------------------


def test_paper_defaults() -> None:
    hp = Hyperparams(method="eamsgd", workers=4)
    assert (hp.beta, hp.alpha, hp.momentum) == (0.9, 0.225, 0.99)
    assert Hyperparams(method="easgd", workers=2, alpha=0.1).beta == pytest.approx(0.2)
    assert Hyperparams(method="mvadownpour", workers=2).moving_rate == 0.001
    assert set(METHODS) >= {
        "easgd", "eamsgd", "downpour", "mdownpour", "adownpour", "mvadownpour",
        "sgd", "msgd", "asgd", "mvasgd", "allreduce", "localsgd",
    }  # fmt: skip


BAD: list[tuple[dict[str, Any], str]] = [
    ({"method": "adam"}, "method='adam' is not a known method; choose one of easgd"),
    ({"lr": 0.0}, "lr=0.0 is outside (0, inf)"),
    ({"lr": -1.0}, "lr=-1.0 is outside (0, inf)"),
    ({"lr": float("nan")}, "lr=nan"),
    ({"tau": 0}, "tau=0 must be an integer >= 1"),
    ({"tau": 2.5}, "tau=2.5 must be an integer >= 1"),
    ({"workers": 0}, "workers=0 must be an integer >= 1"),
    ({"workers": 4, "alpha": 1.5}, "alpha=1.5 is outside (0, 1]; with p=4 workers the paper's"),
    ({"workers": 4, "alpha": 0.0}, "alpha=0.0 is outside (0, 1]"),
    ({"workers": 4, "beta": 2.5}, "beta=2.5 is outside (0, 2)"),
    ({"momentum": 1.0}, "momentum=1.0 is outside [0, 1)"),
    ({"momentum": -0.1}, "momentum=-0.1 is outside [0, 1)"),
    ({"method": "easgd", "momentum": 0.9}, "use method eamsgd"),
    ({"method": "sgd", "momentum": 0.9}, "use method msgd"),
    ({"method": "sgd", "workers": 4}, "sgd is sequential and runs one worker"),
    ({"method": "mdownpour", "tau": 4}, "MDOWNPOUR exchanges every step"),
    ({"weight_decay": -1e-4}, "weight_decay=-0.0001 is outside [0, inf)"),
    ({"lr_decay": -1.0}, "lr_decay=-1.0 is outside [0, inf)"),
    ({"moving_rate": 0.0, "method": "mvadownpour"}, "moving_rate=0.0 is outside (0, 1]"),
    # A hyperparameter the method does not use is refused, never silently dropped.
    ({"method": "downpour", "momentum": 0.9}, "which has no momentum; use method"),
    ({"method": "adownpour", "beta": 0.5}, "beta=0.5 with method='adownpour', which has no"),
    ({"method": "allreduce", "alpha": 0.1}, "alpha=0.1 with method='allreduce'"),
    ({"method": "easgd", "moving_rate": 0.01}, "keeps no moving average; use method"),
    ({"method": "adownpour", "moving_rate": 0.01}, "use method mvadownpour"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD)
def test_bad_hyperparameters_raise_with_their_message(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        Hyperparams(**kwargs)
    assert message in str(info.value)


def test_elasticity_outside_the_stable_region_warns() -> None:
    with pytest.warns(StabilityWarning, match="alpha \\+ beta >= 2"):
        Hyperparams(method="easgd", workers=4, alpha=0.45)  # beta = 1.8, alpha + beta = 2.25
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Hyperparams(method="easgd", workers=4)  # the paper's choice is fine


def test_quadratic_learning_rate_outside_the_stable_region_warns() -> None:
    with pytest.warns(StabilityWarning, match="lr\\*h=2.5"):
        Hyperparams(method="sgd", lr=2.5).check_quadratic(1.0)


def test_worker_rejects_a_mode_the_method_lacks() -> None:
    with pytest.raises(ValueError, match="mode='sync' is not available for method='downpour'"):
        Worker(Hyperparams(method="downpour", workers=2), torch.zeros(2), "sync")
    with pytest.raises(ValueError, match="flat 1-D"):
        Worker(Hyperparams(method="easgd", workers=2), torch.zeros(2, 2), "async")


def test_every_method_uses_exactly_the_hyperparameters_its_spec_names() -> None:
    # Given with a non-trivial value, each optional hyperparameter is taken by the methods
    # whose spec uses it and refused by every other method.
    values = {"momentum": 0.5, "alpha": 0.2, "beta": 0.4, "moving_rate": 0.01}
    for name, spec in METHODS.items():
        for field, value in values.items():
            kwargs: dict[str, Any] = {"method": name, field: value}
            if spec.uses(field):
                assert getattr(Hyperparams(**kwargs), field) == value
            else:
                with pytest.raises(ValueError, match=f"{field}={value} with method='{name}'"):
                    Hyperparams(**kwargs)


def test_to_dict_round_trips_and_replace_keeps_the_method_valid() -> None:
    for name in METHODS:
        hp = Hyperparams(method=name, lr=0.1)
        assert Hyperparams.from_dict(hp.to_dict()) == hp
        assert hp.replace(lr=0.2).lr == 0.2
    # An older file that lists every field (beta for downpour) still loads.
    old = {**Hyperparams(method="easgd").to_dict(), "method": "downpour"}
    assert Hyperparams.from_dict(old).method == "downpour"
    assert Hyperparams(method="eamsgd").replace(method="easgd").momentum == 0.0


@pytest.mark.parametrize("method", ["allreduce", "localsgd"])
def test_all_reduce_and_local_sgd_take_nesterov_momentum_for_real(method: str) -> None:
    # Noise-free, every worker sees the same gradient: all-reduce SGD (and local SGD) with
    # momentum delta is sequential MSGD with delta, step for step; without the momentum it
    # would be SGD (the momentum used to be validated and then silently dropped).
    problem = Quadratic(h=1.0, sigma=0.0, x0=1.0)
    kw: dict[str, Any] = {"lr": 0.1, "momentum": 0.9}
    tau = {"tau": 3} if method == "localsgd" else {}
    dist = simulate(problem, Hyperparams(method=method, workers=3, **kw, **tau), steps=12,
                    trajectory=True)  # fmt: skip
    msgd = simulate(problem, Hyperparams(method="msgd", **kw), steps=12, trajectory=True)
    sgd = simulate(problem, Hyperparams(method="sgd", lr=0.1), steps=12)
    for a, b in zip(dist.center_trajectory, msgd.center_trajectory, strict=True):
        assert_close(a, b, rtol=0, atol=1e-15)
    assert not torch.allclose(dist.center, sgd.center)


def test_method_table_answers_what_other_modules_ask() -> None:
    spec = METHODS["localsgd"]
    assert spec.evaluated is Evaluated.MEAN_X and not spec.evaluated_on_server(Mode.SYNC)
    assert [spec.result_is_current(Mode.SYNC, t, 3) for t in range(4)] == [1, 0, 0, 1]
    assert METHODS["adownpour"].evaluated is Evaluated.AVERAGE
    assert METHODS["easgd"].evaluated_on_server(Mode.ASYNC)
    assert METHODS["easgd"].resolve_mode("auto") is Mode.ASYNC
    assert METHODS["msgd"].resolve_mode("sync") is Mode.SEQUENTIAL
    assert METHODS["downpour"].resolve_mode(Mode.SYNC, strict=False) is Mode.ASYNC
    assert METHODS["downpour"].server_op is Op.PUSH_PULL
    assert METHODS["allreduce"].server_op is None
    assert {m: s.to_dict()["evaluated"] for m, s in METHODS.items()}["asgd"] == "average"
