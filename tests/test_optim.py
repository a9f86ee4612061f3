"""The torch.optim wrappers: parity with the simulator, the optimizer contract, the example."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from easgd.algorithms import Hyperparams
from easgd.optim import EAMSGD, ElasticAveraging
from easgd.sim import Quadratic, simulate

ROOT = Path(__file__).resolve().parents[1]


def torchrun(script: Path, nproc: int, *args: str, timeout: float = 120) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(script), *args]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("method", ["easgd", "localsgd"])
def test_wrapper_around_sgd_equals_the_simulator(method: str) -> None:
    out = torchrun(ROOT / "tests/scripts/optim_quadratic.py", 2, "--method", method,
                   "--steps", "20", "--tau", "3")  # fmt: skip
    hp = Hyperparams(method=method, lr=0.1, tau=3, workers=2)
    sim = simulate(Quadratic(sigma=0.5, x0=1.0, dim=5), hp, schedule="sync", steps=20, seed=0)
    for got, want in zip(out["workers"], sim.workers, strict=True):
        assert_close(torch.tensor(got, dtype=torch.float64), want)
    if method == "easgd":
        assert_close(torch.tensor(out["center"], dtype=torch.float64), sim.center)


@pytest.mark.timeout(180)
def test_users_own_loop_example_runs_under_torchrun() -> None:
    out = torchrun(ROOT / "examples/own_loop.py", 2, "--steps", "200")
    assert out["centers_agree"] is True
    assert out["workers"] == 2
    assert out["center_test_error"] < 0.25


def _single_rank_group(tmp_path: Path) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(
            "gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1
        )


def test_disabled_wrapper_is_the_bare_optimizer() -> None:
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 2)
    b = torch.nn.Linear(4, 2)
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    opt_b = ElasticAveraging(torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9),
                             tau=1, enabled=False)  # fmt: skip
    data = torch.randn(10, 4)
    for _ in range(5):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(data).square().mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert_close(pa, pb)


def test_state_dict_round_trip_and_old_checkpoints(tmp_path: Path) -> None:
    import torch.distributed as dist

    _single_rank_group(tmp_path)
    try:
        model = torch.nn.Linear(3, 1)
        opt = EAMSGD(model.parameters(), lr=0.1, tau=2)
        for _ in range(3):
            opt.zero_grad()
            model(torch.ones(2, 3)).sum().backward()
            opt.step()
        state = opt.state_dict()
        assert state["easgd"]["t"] == 3 and state["easgd"]["tau"] == 2
        other = torch.nn.Linear(3, 1)
        opt2 = EAMSGD(other.parameters(), lr=0.1, tau=2)
        opt2.load_state_dict(state)
        assert opt2.worker.t == 3
        assert_close(opt2.center, opt.center)
        with pytest.warns(UserWarning, match="without easgd state"):
            opt2.load_state_dict(opt.optimizer.state_dict())
        assert isinstance(opt, torch.optim.Optimizer)
        torch.optim.lr_scheduler.StepLR(opt, step_size=1)  # schedulers accept the wrapper
    finally:
        dist.destroy_process_group()


def test_synchronous_wrapper_needs_a_process_group() -> None:
    with pytest.raises(RuntimeError, match="init_process_group"):
        ElasticAveraging(torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1))
    # Local SGD too, at construction (it used to fail at its first average, in torch's words).
    with pytest.raises(RuntimeError, match="init_process_group"):
        ElasticAveraging(torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1),
                         method="localsgd")  # fmt: skip
    with pytest.raises(ValueError, match="method='downpour'"):
        ElasticAveraging(torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1),
                         method="downpour", enabled=False)  # fmt: skip


def test_asynchronous_wrapper_takes_p_and_alpha_from_the_server() -> None:
    # The wrapper used to read client.workers, which PSClient does not have: it believed
    # p = 1 and alpha = 0.9 while the server applied beta/p = 0.225.
    from easgd.comm.ps import ParameterServer, PSClient

    model = torch.nn.Linear(3, 2)
    n = sum(p.numel() for p in model.parameters())
    server_hp = Hyperparams(method="easgd", workers=4, tau=2)
    with ParameterServer(server_hp, torch.zeros(n)) as server:
        client = PSClient([server.address], n, worker_id=0, heartbeat=0)
        opt = ElasticAveraging(torch.optim.SGD(model.parameters(), lr=0.1), tau=2, client=client)
        assert (opt.hp.workers, opt.hp.alpha, opt.hp.beta) == (4, 0.225, 0.9)
        assert opt.state_dict()["easgd"]["alpha"] == 0.225
        for _ in range(4):
            opt.zero_grad()
            model(torch.ones(5, 3)).square().sum().backward()
            opt.step()
        assert server.stats()["exchanges"] == 2
        client.close()
        # A value that disagrees with the server's is an error naming both.
        other = PSClient([server.address], n, worker_id=1, heartbeat=0)
        with pytest.raises(ValueError, match=r"alpha=0\.5 but the parameter server applies"):
            ElasticAveraging(torch.optim.SGD(model.parameters(), lr=0.1), alpha=0.5,
                             client=other)  # fmt: skip
        other.close(clean=False)
