"""The optimizer wrapper in a PyTorch user's world: the paper's EAMSGD, ranks in step,
GradScaler, batch-norm buffers, and parity with PyTorch's post-local SGD.

The multi-rank cases run real ``torchrun --nproc-per-node 2`` processes on gloo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from easgd.algorithms import Hyperparams, nesterov_lookahead_
from easgd.comm.allreduce import _out_of_step
from easgd.optim import (
    EAMSGD,
    EASGD,
    ElasticAveraging,
    exchanged_numel,
)
from easgd.sim import Quadratic, simulate

ROOT = Path(__file__).resolve().parents[1]
QUADRATIC = ROOT / "tests/scripts/optim_quadratic.py"


def torchrun_lines(script: Path, *args: str, timeout: float = 150) -> list[dict]:
    """Every JSON line the two ranks print (a hang is a TimeoutExpired: a failure)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node=2", str(script), *args]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The ranks print at the same time: two objects may share a line.
    decoder, out = json.JSONDecoder(), []
    for line in proc.stdout.splitlines():
        at = line.find("{")
        while at != -1:
            obj, end = decoder.raw_decode(line, at)
            out.append(obj)
            at = line.find("{", end)
    return out


def _sim(method: str, steps: int, tau: int, **kw: float) -> object:
    hp = Hyperparams(method=method, lr=0.1, tau=tau, workers=2, **kw)
    return simulate(Quadratic(sigma=0.5, x0=1.0, dim=5), hp, schedule="sync", steps=steps, seed=0)


# --- EAMSGD as the paper wrote it -------------------------------------------------------


@pytest.mark.timeout(200)
def test_eamsgd_is_the_papers_algorithm_2_bitwise() -> None:
    # 21 steps, tau 3: the run ends right after an exchange's first half (t = 21).
    (out,) = torchrun_lines(QUADRATIC, "--method", "eamsgd", "--steps", "21", "--tau", "3",
                            "--momentum", "0.9")  # fmt: skip
    sim = _sim("eamsgd", 21, 3, momentum=0.9)
    assert torch.equal(torch.tensor(out["center"], dtype=torch.float64), sim.center)
    for got, got_v, x, v in zip(out["workers"], out["momenta"], sim.workers,
                                sim.worker_momenta, strict=True):  # fmt: skip
        # Between steps the model holds the next step's look-ahead point x + delta*v.
        x, v = x.clone(), v.clone()
        nesterov_lookahead_(x, v, momentum=0.9)
        assert torch.equal(torch.tensor(got, dtype=torch.float64), x)
        assert torch.equal(torch.tensor(got_v, dtype=torch.float64), v)


def test_torch_nesterov_variant_is_not_the_papers_eamsgd() -> None:
    # The old easgd.optim.EAMSGD (now EAMSGDTorchNesterov) around the same gradients: a
    # different sequence of iterates (p = 1, no exchange effect: enabled=False).
    from easgd.optim import EAMSGDTorchNesterov

    problem = Quadratic(sigma=0.5, x0=1.0, dim=5)
    x = torch.nn.Parameter(problem.initial_point())
    opt = EAMSGDTorchNesterov([x], lr=0.1, momentum=0.9, enabled=False)
    grad = problem.grad_fn(0, 0)
    for _ in range(10):
        g = torch.empty_like(x)
        grad(x.detach(), g)
        x.grad = g
        opt.step()
    sim = simulate(problem, Hyperparams(method="msgd", lr=0.1, momentum=0.9, workers=1),
                   schedule="sync", steps=10, seed=0)  # fmt: skip
    assert (x.detach() - sim.workers[0]).abs().max() > 1e-3


# --- ranks stay in step -----------------------------------------------------------------


@pytest.mark.timeout(200)
@pytest.mark.parametrize(
    ("method", "tau", "skip"),
    [("easgd", 1, "1:4"), ("easgd", 3, "0:4"), ("localsgd", 2, "1:4"), ("eamsgd", 2, "1:7")],
)
def test_a_rank_that_skips_a_step_is_an_error_on_every_rank_not_a_hang(
    method: str, tau: int, skip: str
) -> None:
    lines = torchrun_lines(QUADRATIC, "--method", method, "--tau", str(tau), "--steps", "10",
                           "--skip", skip)  # fmt: skip
    assert sorted(line["rank"] for line in lines) == [0, 1]
    skipper = int(skip.split(":")[0])
    # The skipper finishes while its peer is in its last exchange (it raises there), or,
    # when that last step has no exchange, both finish with different counters.
    expected = (
        f"rank {skipper} finished after 9 step() calls while rank {1 - skipper} is still "
        "exchanging, in step() call number 10"
        if method != "eamsgd"
        else f"finished after different numbers of step() calls (rank {skipper} after 9; "
        f"rank {1 - skipper} after 10)"
    )
    for line in lines:
        assert "error" in line, line
        assert expected in line["error"]
        assert "GradScaler" in line["error"]


def test_out_of_step_messages_name_ranks_and_counters() -> None:
    assert _out_of_step([4, 4, 4], [False] * 3) is None
    assert _out_of_step([9, 9], [True, True]) is None
    assert "(rank 1 after 8; rank 0 after 9)" in str(_out_of_step([9, 8], [True, True]))
    message = _out_of_step([12, 10, 12], [False] * 3)
    assert message is not None
    assert "rank 1 in step() call 11; ranks 0, 2 in step() call 13" in message


@pytest.mark.timeout(200)
def test_gradscaler_without_overflow_equals_the_simulator() -> None:
    # The wrapper unscales what GradScaler.step hands it (scale 4: exact in binary).
    (out,) = torchrun_lines(QUADRATIC, "--method", "easgd", "--tau", "3", "--steps", "20",
                            "--scaler")  # fmt: skip
    sim = _sim("easgd", 20, 3)
    assert torch.equal(torch.tensor(out["center"], dtype=torch.float64), sim.center)
    for got, want in zip(out["workers"], sim.workers, strict=True):
        assert torch.equal(torch.tensor(got, dtype=torch.float64), want)


@pytest.mark.timeout(200)
@pytest.mark.parametrize(("method", "tau", "inf"), [("easgd", 1, "1:4"), ("eamsgd", 3, "0:5")])
def test_gradscaler_overflow_on_one_rank_keeps_the_ranks_in_step(
    method: str, tau: int, inf: str
) -> None:
    # Before: GradScaler skipped step() on the rank with inf gradients, its counter fell one
    # behind, and finish() hung until gloo's timeout. Now the wrapper takes every call: that
    # rank skips its update only, its scaler backs off, and both ranks finish together.
    lines = torchrun_lines(QUADRATIC, "--method", method, "--tau", str(tau), "--steps", "10",
                           "--scaler", "--inf", inf)  # fmt: skip
    by_rank = {line["rank"]: line for line in lines}
    assert set(by_rank) == {0, 1} and all("error" not in line for line in lines), lines
    assert by_rank[0]["t"] == by_rank[1]["t"] == 10
    overflowed = int(inf.split(":")[0])
    assert by_rank[overflowed]["scale"] == 2.0  # backed off once
    assert by_rank[1 - overflowed]["scale"] == 4.0


def test_gradscaler_overflow_skips_the_local_update(tmp_path: Path) -> None:
    _single_rank_group(tmp_path)
    try:
        model = torch.nn.Linear(3, 1)
        opt = EASGD(torch.optim.SGD(model.parameters(), lr=0.1), tau=1)
        scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
        before = [q.detach().clone() for q in model.parameters()]
        scaler.scale(model(torch.ones(2, 3)).sum() * float("inf")).backward()
        scaler.step(opt)
        scaler.update()
        assert opt.worker.t == 1  # the exchange schedule moved on
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        assert scaler.get_scale() == 4.0
        opt.zero_grad()
        scaler.scale(model(torch.ones(2, 3)).sum()).backward()
        scaler.step(opt)  # finite: unscaled (8 -> 1) and applied
        assert_close(model.bias.detach(), before[1] - 0.1 * 2.0)
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()


# --- post-local SGD parity --------------------------------------------------------------


@pytest.mark.timeout(200)
def test_local_sgd_equals_pytorchs_post_local_sgd_bitwise() -> None:
    script = ROOT / "tests/scripts/optim_postlocal.py"
    (out,) = torchrun_lines(script, "--tau", "4", "--steps", "23")
    assert out == {"bitwise_equal": True, "max_diff": 0.0}
    # The comparison bites: one step later warm-up (a different schedule) is not equal.
    (off,) = torchrun_lines(script, "--tau", "4", "--steps", "23", "--warmup", "4")
    assert off["bitwise_equal"] is False and off["max_diff"] > 1e-4


# --- buffers ----------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_batchnorm_example_center_scores_as_recalibrated() -> None:
    # The case: the center as loaded scored 13.5% and 4.8% after recalibration.
    # Now the running statistics are averaged into the center with the parameters.
    (out,) = torchrun_lines(ROOT / "examples/torchrun_bn.py", "--epochs", "4", "--amp", "fp16",
                            timeout=280)  # fmt: skip
    assert out["centers_agree"] is True and out["workers"] == 2
    assert abs(out["center_test_error"] - out["recalibrated_test_error"]) <= 0.005
    assert out["center_test_error"] < 0.15
    # The initial statistics (what center_model_ used to leave) score far worse.
    assert out["initial_statistics_test_error"] > out["center_test_error"] + 0.05


def _single_rank_group(tmp_path: Path) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(
            "gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1
        )


def _bn_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 2)
    )


def test_buffers_join_the_flat_vector_and_the_center(tmp_path: Path) -> None:
    _single_rank_group(tmp_path)
    import torch.distributed as dist

    try:
        model = _bn_net()
        opt = EASGD(torch.optim.SGD(model.parameters(), lr=0.1), tau=2, model=model)
        n_params = sum(q.numel() for q in model.parameters())
        assert exchanged_numel(model) == n_params + 12 == opt.center.numel()
        assert exchanged_numel(model, average_buffers=False) == n_params
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 4)).square().mean().backward()
            opt.step()
        state = opt.center_state_dict()
        bn = model[1]
        assert not torch.equal(bn.running_mean, torch.zeros(6))  # the forward updated it
        center = opt.center
        lo = n_params
        assert torch.equal(state["1.running_mean"], center[lo : lo + 6])
        assert torch.equal(state["1.running_var"], center[lo + 6 : lo + 12])
        assert state["1.num_batches_tracked"] == 3  # counters: the local one
        replica = _bn_net()
        opt.center_model_(replica)
        assert torch.equal(replica[1].running_mean, state["1.running_mean"])
        assert torch.equal(replica[0].weight, state["0.weight"])
        # average_buffers=False: parameters only; the center's buffers are the local ones.
        other = _bn_net()
        off = EASGD(torch.optim.SGD(other.parameters(), lr=0.1), model=other,
                    average_buffers=False)  # fmt: skip
        assert off.center.numel() == n_params
        assert torch.equal(off.center_state_dict()["1.running_var"], other[1].running_var)
    finally:
        dist.destroy_process_group()


def test_asynchronous_wrapper_averages_buffers_through_the_server() -> None:
    from easgd.comm.ps import ParameterServer, PSClient

    model = _bn_net()
    n = exchanged_numel(model)
    bn = model[1]
    start = torch.cat([*(q.detach().flatten() for q in model.parameters()),
                       bn.running_mean, bn.running_var])  # fmt: skip
    with ParameterServer(Hyperparams(method="easgd", workers=1, tau=1), start) as server:
        # A client sized for the parameters only: refused with the size to use.
        short = PSClient([server.address], n - 12, worker_id=5, heartbeat=0)
        with pytest.raises(ValueError, match=f"start the server and client with numel={n}"):
            EASGD(torch.optim.SGD(model.parameters(), lr=0.1), client=short, model=model)
        short.close(clean=False)
        client = PSClient([server.address], n, worker_id=0, heartbeat=0)
        opt = EASGD(torch.optim.SGD(model.parameters(), lr=0.1), tau=1, client=client,
                    model=model)  # fmt: skip
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 4)).square().mean().backward()
            opt.step()
        state = opt.center_state_dict()
        served = torch.empty(n)
        client.pull(served)
        lo = n - 12
        assert torch.equal(state["1.running_mean"], served[lo : lo + 6])
        assert served[lo : lo + 6].abs().sum() > 0  # the buffers reached the server's center
        assert not torch.equal(served[lo + 6 :], torch.ones(6))
        client.close()


def test_replaced_buffers_and_assigned_parameters_are_named(tmp_path: Path) -> None:
    _single_rank_group(tmp_path)
    import torch.distributed as dist

    try:
        model = _bn_net()
        opt = EASGD(torch.optim.SGD(model.parameters(), lr=0.1), tau=1, model=model)
        model[1].running_mean = torch.zeros(6)  # replaced storage, like model.to(...)
        model(torch.randn(4, 4)).sum().backward()
        with pytest.raises(RuntimeError, match=r"buffer '1\.running_mean' no longer lives"):
            opt.step()
        # load_state_dict(assign=True) swaps the model's Parameter objects: the optimizer
        # would step the old ones, the model would stop training; the pointer check alone
        # cannot see it (the old ones did not move), the model= check does.
        model2 = _bn_net()
        opt2 = EASGD(torch.optim.SGD(model2.parameters(), lr=0.1), tau=1, model=model2,
                     average_buffers=False)  # fmt: skip
        model2.load_state_dict(_bn_net().state_dict(), assign=True)
        with pytest.raises(RuntimeError, match=r"parameter 0 \('0\.weight'\).*assign=True"):
            opt2.step()
        with pytest.raises(ValueError, match="is not a parameter of model="):
            EASGD(torch.optim.SGD(_bn_net().parameters(), lr=0.1), model=model)
    finally:
        dist.destroy_process_group()


def test_center_model_without_model_warns_about_unaveraged_buffers(tmp_path: Path) -> None:
    _single_rank_group(tmp_path)
    import torch.distributed as dist

    try:
        model = _bn_net()
        opt = EASGD(torch.optim.SGD(model.parameters(), lr=0.1))
        with pytest.warns(UserWarning, match=r"1\.running_mean, 1\.running_var.*update_bn"):
            opt.center_model_(_bn_net())
        with pytest.raises(RuntimeError, match="center_state_dict\\(\\) needs the model"):
            opt.center_state_dict()
        plain = torch.nn.Linear(2, 2)
        opt_plain = EASGD(torch.optim.SGD(plain.parameters(), lr=0.1))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt_plain.center_model_(torch.nn.Linear(2, 2))  # no buffers: no warning
    finally:
        dist.destroy_process_group()


# --- EAMSGD's contract ------------------------------------------------------------------


def test_eamsgd_takes_the_schedulers_lr_and_resumes_bitwise(tmp_path: Path) -> None:
    _single_rank_group(tmp_path)
    import torch.distributed as dist

    def run(steps: int, resume_at: int | None = None) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        opt = EAMSGD(model.parameters(), lr=0.1, momentum=0.9, tau=2, model=model)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        gen = torch.Generator().manual_seed(1)
        for i in range(steps):
            if i == resume_at:
                saved = (model.state_dict(), opt.state_dict(), sched.state_dict())
                model = torch.nn.Linear(3, 2)
                model.load_state_dict(saved[0])
                opt = EAMSGD(model.parameters(), lr=0.1, momentum=0.9, tau=2, model=model)
                opt.load_state_dict(saved[1])
                sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
                sched.load_state_dict(saved[2])
            opt.zero_grad()
            model(torch.randn(4, 3, generator=gen)).square().sum().backward()
            opt.step()
            sched.step()
        assert opt.hp.lr == 0.1 * 0.5 ** (steps // 3)
        return torch.cat([opt.center, opt.worker.v])

    try:
        assert torch.equal(run(8), run(8, resume_at=5))
    finally:
        dist.destroy_process_group()


def test_eamsgd_refuses_what_it_cannot_be() -> None:
    params = torch.nn.Linear(2, 1).parameters
    with pytest.raises(ValueError, match=r"one plain torch\.optim\.SGD group without momentum"):
        ElasticAveraging(torch.optim.Adam(params()), method="eamsgd")
    with pytest.raises(ValueError, match=r"one plain torch\.optim\.SGD group without momentum"):
        ElasticAveraging(torch.optim.SGD(params(), lr=0.1, momentum=0.9), method="eamsgd")
    with pytest.raises(ValueError, match=r"momentum=0\.5 with method=.easgd."):
        ElasticAveraging(torch.optim.SGD(params(), lr=0.1), momentum=0.5, enabled=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_step_counters_survive_the_sum_in_every_dtype(dtype: torch.dtype) -> None:
    # Each rank writes its own block of the reserved tail; the all-reduce sums the blocks.
    from easgd.comm.allreduce import _Counters

    world, size = 3, _Counters.size(dtype, 3)
    assert size <= 3 * 7  # a few elements per rank, whatever the dtype
    total = torch.zeros(size, dtype=dtype)
    for rank, (step, done) in enumerate([(123_456_789, False), (2**39 + 5, True), (0, False)]):
        mine = torch.zeros(size, dtype=dtype)
        _Counters(mine, world).write(rank, step, finishing=done)
        total += mine
    assert _Counters(total, world).read() == ([123_456_789, 2**39 + 5, 0], [False, True, False])
