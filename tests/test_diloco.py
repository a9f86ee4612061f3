"""DiLoCo (``--method diloco``): the rule against independent computations, every path
(simulator, ``easgd train``, ``easgd.optim.DiLoCo`` under torchrun) against the simulator."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from easgd.algorithms import (
    METHODS,
    Hyperparams,
    Mode,
    Worker,
    adamw_step_,
    diloco_outer_step_,
    run_step,
)
from easgd.config import ConfigError, TrainConfig
from easgd.sim import GradFn, Quadratic, simulate

ROOT = Path(__file__).resolve().parents[1]
EXACT = {"rtol": 0.0, "atol": 0.0}


# ---------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.0, 0.5], ids=["noise-free", "noisy"])
def test_outer_lr_one_without_momentum_is_local_sgd(sigma: float) -> None:
    # c - mean_i(c - x_i) = mean_i(x_i): local SGD's average, up to rounding.
    problem = Quadratic(h=1.0, sigma=sigma, x0=1.0, dim=4)
    hp = Hyperparams(method="localsgd", lr=0.1, tau=4, workers=3, momentum=0.5)
    local = simulate(problem, hp, steps=12, seed=3)
    dl = simulate(problem, hp.replace(method="diloco", outer_lr=1.0, outer_momentum=0.0),
                  steps=12, seed=3)  # fmt: skip
    assert_close(dl.center, local.center, rtol=1e-12, atol=1e-14)
    for got, want in zip(dl.workers, local.workers, strict=True):
        assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert dl.exchanges == local.exchanges == 3


class _Targets:
    """``F_r(x) = h/2 (x - a_r)^2`` for worker r: workers that disagree, noise-free."""

    def __init__(self, targets: tuple[float, ...], x0: float, h: float = 1.0) -> None:
        self.targets, self.x0, self.h = targets, x0, h

    def initial_point(self) -> Tensor:
        return torch.tensor([self.x0], dtype=torch.float64)

    def grad_fn(self, rank: int, seed: int) -> GradFn:
        a = self.targets[rank]

        def fn(x: Tensor, out: Tensor) -> float:
            torch.mul(x - a, self.h, out=out)
            return 0.5 * self.h * float((x - a).square().sum())

        return fn

    def grad_buffer(self, rank: int) -> Tensor | None:
        return None

    def evaluate(self, x: Tensor) -> dict[str, float]:
        return {"loss": float(x.square().sum())}


def test_two_rounds_with_outer_momentum_by_hand() -> None:
    targets, x0, lr, tau, olr, mu = (1.0, -3.0), 2.0, 0.1, 2, 0.7, 0.9
    c, v = x0, 0.0
    centers = []
    for _ in range(2):
        xs = []
        for a in targets:
            x = c
            for _ in range(tau):
                x -= lr * (x - a)
            xs.append(x)
        g = c - sum(xs) / len(xs)  # the pseudo-gradient
        v = mu * v + g
        c -= olr * (g + mu * v)  # Nesterov, PyTorch's form
        centers.append(c)
    hp = Hyperparams(method="diloco", lr=lr, tau=tau, workers=2, outer_lr=olr, outer_momentum=mu)
    res = simulate(_Targets(targets, x0), hp, steps=2 * tau, trajectory=True)
    assert res.center.item() == pytest.approx(centers[1], rel=1e-13)
    assert res.center_trajectory[tau - 1].item() == pytest.approx(centers[0], rel=1e-13)
    assert [w.item() for w in res.workers] == [res.center.item()] * 2  # every worker restarts
    assert res.center_trajectory[0].item() == x0  # the global parameters wait for the round


def test_outer_step_is_torch_sgd_with_nesterov() -> None:
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(7, dtype=torch.float64, generator=gen)
    ref = torch.nn.Parameter(c.clone())
    outer = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=True)
    v = torch.zeros_like(c)
    for _ in range(4):
        xs = [c + torch.randn(7, dtype=torch.float64, generator=gen) for _ in range(2)]
        ref.grad = ((ref.detach() - xs[0]) + (ref.detach() - xs[1])) / 2
        outer.step()
        diloco_outer_step_(c, (c - xs[0]) + (c - xs[1]), v, p=2, outer_lr=0.7, outer_momentum=0.9)
        assert_close(c, ref.detach(), **EXACT)


def test_adamw_step_is_torch_adamw_bitwise() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, dtype=torch.float64, generator=gen)
    ref = torch.nn.Parameter(x.clone())
    opt = torch.optim.AdamW([ref], lr=0.01, weight_decay=0.1)
    m, s = torch.zeros_like(x), torch.zeros_like(x)
    for step in range(1, 25):
        g = torch.randn(9, dtype=torch.float64, generator=gen)
        ref.grad = g.clone()
        opt.step()
        adamw_step_(x, g, m, s, step=step, lr=0.01, weight_decay=0.1)
        assert_close(x, ref.detach(), **EXACT)
    assert_close(m, opt.state[ref]["exp_avg"], **EXACT)
    assert_close(s, opt.state[ref]["exp_avg_sq"], **EXACT)


def _torch_diloco(steps: int, tau: int, lr: float) -> tuple[Tensor, list[Tensor]]:
    """DiLoCo as the paper writes it, from torch's optimizers, in one process: two AdamW
    inner optimizers (weight decay 0.1) and ``SGD(0.7, momentum=0.9, nesterov=True)`` as the
    outer one, on the simulator's noisy quadratic (its noise streams, seed 0)."""
    problem = Quadratic(sigma=0.5, x0=1.0, dim=5)
    fns = [problem.grad_fn(r, 0) for r in range(2)]
    xs = [torch.nn.Parameter(problem.initial_point()) for _ in range(2)]
    inner = [torch.optim.AdamW([x], lr=lr, weight_decay=0.1) for x in xs]
    c = torch.nn.Parameter(problem.initial_point())
    outer = torch.optim.SGD([c], lr=0.7, momentum=0.9, nesterov=True)
    for i in range(steps):
        for x, fn, opt in zip(xs, fns, inner, strict=True):
            g = torch.empty_like(x)
            fn(x.detach(), g)
            x.grad = g
            opt.step()
        if (i + 1) % tau == 0:
            c.grad = sum(c.detach() - x.detach() for x in xs) / 2
            outer.step()
            with torch.no_grad():
                for x in xs:
                    x.copy_(c)
    return c.detach(), [x.detach() for x in xs]


def test_simulator_with_inner_adamw_equals_torch_optimizers() -> None:
    hp = Hyperparams(method="diloco", lr=0.05, tau=4, workers=2, inner="adamw", weight_decay=0.1)
    sim = simulate(Quadratic(sigma=0.5, x0=1.0, dim=5), hp, steps=14, seed=0)
    center, workers = _torch_diloco(14, 4, 0.05)
    assert_close(sim.center, center, **EXACT)
    for got, want in zip(sim.workers, workers, strict=True):
        assert_close(got, want, **EXACT)


def test_buffers_are_averaged_not_extrapolated() -> None:
    c = torch.tensor([1.0, 1.0, 4.0], dtype=torch.float64)  # two parameters, one buffer
    xs = [torch.tensor([0.0, 2.0, 2.0]), torch.tensor([1.0, 1.0, 8.0])]
    delta = sum(c - x.double() for x in xs)
    v = torch.zeros(2, dtype=torch.float64)
    diloco_outer_step_(c, delta, v, p=2, outer_lr=0.7, outer_momentum=0.9, trainable=2)
    assert c[2].item() == 5.0  # the workers' mean
    g = torch.tensor([0.5, -0.5], dtype=torch.float64)
    assert_close(c[:2], torch.ones(2, dtype=torch.float64) - 0.7 * (g + 0.9 * g))


def test_a_worker_resumes_bitwise_from_its_state() -> None:
    hp = Hyperparams(method="diloco", lr=0.1, tau=3, workers=1, momentum=0.5)
    problem = Quadratic(sigma=0.3, dim=3)

    def run(worker: Worker, fn: GradFn, steps: int) -> None:
        for _ in range(steps):
            run_step(worker, fn, lambda req: None)  # one rank: its sum is its own

    a, fn_a = Worker(hp, problem.initial_point(), Mode.SYNC), problem.grad_fn(0, 0)
    run(a, fn_a, 7)  # stops inside a round: x differs from the global parameters
    state = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in a.state_dict().items()}
    assert all(state[k] is not None for k in ("x", "v", "center", "outer_v"))
    # b: a fresh worker loaded with that state, on a noise stream advanced by 7 draws.
    fn_b = problem.grad_fn(0, 0)
    run(Worker(hp, problem.initial_point(), Mode.SYNC), fn_b, 7)
    b = Worker(hp, torch.zeros(3, dtype=torch.float64), Mode.SYNC)
    b.load_state_dict(state)
    run(a, fn_a, 5)
    run(b, fn_b, 5)
    for name in ("x", "v", "center", "outer_v"):
        assert_close(getattr(b, name), getattr(a, name), **EXACT)


# ---------------------------------------------------------------------------------------
# Hyperparameters, modes, configuration
# ---------------------------------------------------------------------------------------


def test_the_method_table_entry() -> None:
    spec = METHODS["diloco"]
    assert spec.modes == (Mode.SYNC,) and spec.outer and spec.wraps_optimizer
    assert spec.hyperparams == {"momentum", "outer_lr", "outer_momentum", "inner"}
    assert [spec.communicates(t, 4) for t in range(8)] == [False, False, False, True] * 2
    hp = Hyperparams(method="diloco", workers=4, tau=8)
    assert (hp.outer_lr, hp.outer_momentum, hp.momentum, hp.inner) == (0.7, 0.9, 0.0, "sgd")
    assert hp.to_dict()["alpha"] is None and hp.to_dict()["outer_lr"] == 0.7
    assert Hyperparams.from_dict(hp.to_dict()) == hp
    assert Hyperparams(method="eamsgd").to_dict()["outer_lr"] is None


BAD: list[tuple[dict[str, Any], str]] = [
    ({"method": "eamsgd", "outer_lr": 0.7},
     "outer_lr=0.7 with method='eamsgd', which has no outer optimizer; use method diloco"),
    ({"method": "localsgd", "outer_momentum": 0.9},
     "outer_momentum=0.9 with method='localsgd', which has no outer optimizer"),
    ({"method": "diloco", "outer_lr": 0.0}, "outer_lr=0.0 is outside (0, inf); the DiLoCo"),
    ({"method": "diloco", "outer_lr": float("nan")}, "outer_lr=nan is outside"),
    ({"method": "diloco", "outer_momentum": 1.0}, "outer_momentum=1.0 is outside [0, 1)"),
    ({"method": "diloco", "outer_momentum": -0.1}, "outer_momentum=-0.1 is outside [0, 1)"),
    ({"method": "diloco", "beta": 0.9}, "beta=0.9 with method='diloco', which has no elastic"),
    ({"method": "eamsgd", "inner": "adamw"},
     "inner='adamw' with method='eamsgd', which takes only its own SGD steps; use method diloco"),
    ({"method": "diloco", "inner": "adam"}, "inner='adam'; choose one of sgd, adamw"),
    ({"method": "diloco", "inner": "adamw", "momentum": 0.9},
     "momentum=0.9 with inner='adamw': AdamW keeps its own moment estimates"),
]  # fmt: skip


@pytest.mark.parametrize(("kwargs", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_hyperparameters_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        Hyperparams(workers=2, **kwargs)
    assert message in str(info.value)


def test_diloco_is_synchronous_only() -> None:
    with pytest.raises(ValueError, match="it runs in sync mode"):
        METHODS["diloco"].resolve_mode("async")
    with pytest.raises(ValueError, match="synchronous only"):
        simulate(Quadratic(), Hyperparams(method="diloco", workers=2), schedule="async")
    cfg = TrainConfig(method="diloco", workers=2, steps=5)
    assert cfg.resolved_mode() is Mode.SYNC and cfg.servers_used == 0


def test_config_records_and_refuses_the_outer_hyperparameters() -> None:
    saved = TrainConfig(method="diloco", workers=2, steps=5).to_dict()
    assert (saved["outer_lr"], saved["outer_momentum"]) == (0.7, 0.9)
    assert TrainConfig.from_dict(saved).hyperparams().outer_lr == 0.7
    assert TrainConfig(steps=5).to_dict()["outer_lr"] is None  # eamsgd: unused
    with pytest.raises(ConfigError) as info:
        TrainConfig(method="eamsgd", outer_lr=0.5, steps=5)
    assert info.value.cli().startswith("--outer-lr 0.5 with --method eamsgd, which has no outer")
    assert "use method diloco" in info.value.cli()


def test_command_line_flags() -> None:
    from easgd.cli import build_parser
    from easgd.cli.simulate import hyperparams_from_args
    from easgd.cli.train import config_from_args

    parser = build_parser()
    flags = ["--method", "diloco", "--tau", "5", "--outer-lr", "0.5", "--outer-momentum", "0.8",
             "--inner", "adamw"]  # fmt: skip
    hp = hyperparams_from_args(parser.parse_args(["simulate", *flags]))
    assert (hp.outer_lr, hp.outer_momentum, hp.tau, hp.inner) == (0.5, 0.8, 5, "adamw")
    cfg = config_from_args(parser.parse_args(["train", *flags, "--steps", "10"]))
    assert (cfg.outer_lr, cfg.outer_momentum, cfg.inner) == (0.5, 0.8, "adamw")


def test_the_experiment_grid_lists_diloco_beside_eamsgd() -> None:
    from easgd.experiments.registry import EXPERIMENTS

    found = [e for e in EXPERIMENTS.values() if "diloco" in e.methods]
    assert found and all("eamsgd" in e.methods for e in found)
    exp = found[0]
    run = next(r for r in exp.runs() if r.method == "diloco")
    cfg = exp.train_config(run, "/tmp/unused", steps=10)
    assert cfg.hyperparams().outer_lr == 0.7 and cfg.resolved_mode() is Mode.SYNC


# ---------------------------------------------------------------------------------------
# Real processes against the simulator
# ---------------------------------------------------------------------------------------


def _torchrun(*args: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "tests/scripts/optim_quadratic.py"), *args]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(180)
def test_wrapper_around_sgd_equals_the_simulator_bitwise() -> None:
    out = _torchrun("--method", "diloco", "--steps", "20", "--tau", "3")
    hp = Hyperparams(method="diloco", lr=0.1, tau=3, workers=2)
    sim = simulate(Quadratic(sigma=0.5, x0=1.0, dim=5), hp, schedule="sync", steps=20, seed=0)
    assert_close(torch.tensor(out["center"], dtype=torch.float64), sim.center, **EXACT)
    for got, want in zip(out["workers"], sim.workers, strict=True):
        assert_close(torch.tensor(got, dtype=torch.float64), want, **EXACT)
    assert out["outer_v"] is not None


@pytest.mark.timeout(180)
def test_wrapper_around_adamw_equals_torch_optimizers_by_hand() -> None:
    # The reference: torch's own AdamW and SGD(nesterov=True), as the paper writes DiLoCo.
    steps, tau, lr = 14, 4, 0.05
    out = _torchrun("--method", "diloco", "--inner", "adamw", "--steps", str(steps), "--tau",
                    str(tau), "--lr", str(lr))  # fmt: skip
    c, xs = _torch_diloco(steps, tau, lr)
    assert_close(torch.tensor(out["center"], dtype=torch.float64), c, **EXACT)
    for got, x in zip(out["workers"], xs, strict=True):
        assert_close(torch.tensor(got, dtype=torch.float64), x, **EXACT)


def _train(out: Path, *args: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "easgd", "train", "--out", str(out), "--quiet", "--json",
           "--eval-interval", "0.5", *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "args",
    [
        ["--steps", "12", "--tau", "3", "--lr", "0.05", "--outer-lr", "0.7",
         "--outer-momentum", "0.9"],
        # 13 steps, tau 4: the run ends inside a round (the result is the last round's c).
        ["--steps", "13", "--tau", "4", "--lr", "0.05", "--momentum", "0.9", "--outer-lr", "0.5"],
        ["--steps", "12", "--tau", "4", "--inner", "adamw", "--lr", "0.002"],
    ],
    ids=["paper-outer", "inner-momentum", "inner-adamw"],
)  # fmt: skip
def test_train_run_equals_the_simulator(tmp_path: Path, args: list[str]) -> None:
    from easgd.finalize import final_center
    from easgd.runlog import RunPaths
    from easgd.sim import ModelObjective
    from easgd.task import build_task

    summary = _train(tmp_path / "run", "--method", "diloco", "--workers", "2", *args)
    assert summary["mode"] == "sync" and summary["status"] == "completed"
    cfg = TrainConfig.from_dict(json.loads((tmp_path / "run/config.json").read_text()))
    assert cfg.outer_lr is not None and cfg.outer_momentum is not None
    torch.set_num_threads(1)
    parts = build_task(cfg.dataset, cfg.model, seed=cfg.seed)
    problem = ModelObjective(parts.build, parts.train, parts.test, cfg.batch_size, parts.transform)
    assert cfg.steps is not None
    sim = simulate(problem, cfg.hyperparams(), schedule="sync", steps=cfg.steps, seed=cfg.seed)
    assert_close(final_center(cfg, RunPaths(cfg.out)), sim.center)


def test_torchft_comparison_says_when_it_is_skipped(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("torchft") is not None:
        pytest.skip("torchft is installed: the comparison is a benchmark, not a test")
    out = tmp_path / "diloco_torchft.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.diloco_torchft", "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("skipped: torchft is not installed")
    assert "--install-torchft" in proc.stdout
    result = json.loads(out.read_text())
    assert result["quick"] is True and result["skipped"] and result["rows"] == []


@pytest.mark.timeout(300)
def test_train_resumed_mid_round_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    # 20 steps with tau 3: the first part ends inside a round; the outer momentum, AdamW's
    # moments, the global parameters and x must all come back for the result to be bitwise.
    from easgd.runlog import CheckpointKind, RunPaths, load_checkpoint

    args = ["--method", "diloco", "--workers", "2", "--tau", "3", "--inner", "adamw",
            "--lr", "0.002", "--checkpoint-every-steps", "6"]  # fmt: skip
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _train(whole, *args, "--steps", "40")
    _train(parts, *args, "--steps", "20")
    _train(parts, "--resume", str(parts), "--steps", "40")
    for name in ("center.pt", "worker-0.pt", "worker-1.pt"):
        a = load_checkpoint(RunPaths(whole).checkpoints / name, CheckpointKind.CENTER)
        b = load_checkpoint(RunPaths(parts).checkpoints / name, CheckpointKind.CENTER)
        assert a.t == b.t == 40
        for key in ("center", "x", "outer_v", "exp_avg", "exp_avg_sq"):
            if name != "center.pt" or key == "center":
                assert torch.equal(a.tensors[key], b.tensors[key]), (name, key)


def _single_rank_group(tmp_path: Path) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(
            "gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1
        )


def test_wrapper_state_dict_continues_bitwise(tmp_path: Path) -> None:
    from easgd.optim import DiLoCo

    _single_rank_group(tmp_path)
    torch.manual_seed(0)
    data = torch.randn(16, 4)

    def build() -> tuple[torch.nn.Module, Any]:
        torch.manual_seed(1)
        model = torch.nn.Linear(4, 2)
        inner = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
        return model, DiLoCo(inner, tau=3, model=model)

    def steps(model: torch.nn.Module, opt: Any, n: int) -> None:
        for _ in range(n):
            opt.zero_grad()
            model(data).square().mean().backward()
            opt.step()

    a_model, a = build()
    steps(a_model, a, 7)  # two outer steps, one inner step into the third round
    saved = {"model": a_model.state_dict(), "opt": a.state_dict()}
    assert saved["opt"]["easgd"]["outer_v"] is not None
    assert (saved["opt"]["easgd"]["outer_lr"], saved["opt"]["easgd"]["outer_momentum"]) == (
        0.7, 0.9,
    )  # fmt: skip
    buffer = io.BytesIO()  # through a file's bytes, as a checkpoint travels
    torch.save(saved, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    b_model, b = build()
    b_model.load_state_dict(saved["model"])
    b.load_state_dict(saved["opt"])
    assert b.worker.t == 7
    steps(a_model, a, 5)
    steps(b_model, b, 5)
    for pa, pb in zip(a_model.parameters(), b_model.parameters(), strict=True):
        assert_close(pa, pb, **EXACT)
    assert_close(a.center, b.center, **EXACT)
    a.finish()
    b.finish()


def test_wrapper_refuses_outer_hyperparameters_elsewhere(tmp_path: Path) -> None:
    from easgd.optim import ElasticAveraging

    _single_rank_group(tmp_path)
    local = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"outer_lr=0\.5 with method='localsgd'"):
        ElasticAveraging(local, method="localsgd", outer_lr=0.5)
