"""Elastic averaging across groups (``--group-size``): a group of G workers with the mean
gradient is one worker with a G-times larger batch, held against the simulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from easgd.algorithms import Hyperparams
from easgd.config import ConfigError, TrainConfig
from easgd.finalize import final_center
from easgd.runlog import RunPaths, iter_jsonl
from easgd.sim import Grouped, ModelObjective, Quadratic, simulate
from easgd.task import build_task

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


def train(out: Path, *args: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "easgd", "train", "--out", str(out), "--quiet", "--json",
           "--eval-interval", "0.5", *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def grouped_center(cfg: TrainConfig, schedule: str = "sync") -> torch.Tensor:
    """The simulator's center: ``cfg.groups`` workers, each the mean of its ranks' batches."""
    torch.set_num_threads(1)
    parts = build_task(cfg.dataset, cfg.model, seed=cfg.seed)
    base = ModelObjective(parts.build, parts.train, parts.test, cfg.batch_size, parts.transform)
    assert cfg.steps is not None
    res = simulate(Grouped(base, cfg.group_size), cfg.hyperparams(), schedule=schedule,
                   steps=cfg.steps, seed=cfg.seed, compress=cfg.compress,
                   overlap=cfg.overlap)  # fmt: skip
    return res.center


def test_a_group_with_the_mean_gradient_is_one_worker_with_a_larger_batch() -> None:
    # On the quadratic without noise every batch gives the same gradient: a group of 2 is
    # exactly one worker; with noise, its gradient noise is that of the mean of 2 draws.
    hp = Hyperparams(method="easgd", workers=2, tau=2, lr=0.1)
    one = simulate(Quadratic(h=1.0, dim=3), hp, steps=20)
    two = simulate(Grouped(Quadratic(h=1.0, dim=3), 2), hp, steps=20)
    assert_close(two.center, one.center, rtol=0, atol=0)
    noisy = Quadratic(h=1.0, sigma=1.0, dim=20000)
    x = torch.zeros(20000, dtype=torch.float64)
    g = torch.empty_like(x)
    Grouped(noisy, 4).grad_fn(0, seed=1)(x, g)
    assert 0.9 < float(g.var()) * 4 < 1.1  # the mean of 4 unit-variance draws


@pytest.mark.parametrize("method", ["easgd", "eamsgd"])
def test_synchronous_groups_equal_the_simulator(tmp_path: Path, method: str) -> None:
    # 2 groups of 2 over gloo: bitwise the simulator's 2 workers whose gradient is the mean
    # of the two ranks' batches (a sum of two is the same in either order).
    summary = train(tmp_path / "run", "--method", method, "--mode", "sync", "--workers", "4",
                    "--group-size", "2", "--tau", "3", "--steps", "12", "--lr", "0.05")  # fmt: skip
    cfg = TrainConfig.from_dict(json.loads((tmp_path / "run/config.json").read_text()))
    assert summary["mode"] == "sync" and summary["local_steps"] == 48
    assert cfg.group_size == 2 and cfg.hyperparams().workers == 2
    assert_close(final_center(cfg, RunPaths(cfg.out)), grouped_center(cfg), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["easgd", "eamsgd"])
def test_one_asynchronous_group_equals_the_simulator(tmp_path: Path, method: str) -> None:
    # One group of 2 through the parameter server: the simulator's one asynchronous worker
    # whose gradient is the mean of the two ranks' batches.
    train(tmp_path / "run", "--method", method, "--workers", "2", "--group-size", "2",
          "--tau", "2", "--steps", "10", "--lr", "0.05")  # fmt: skip
    cfg = TrainConfig.from_dict(json.loads((tmp_path / "run/config.json").read_text()))
    assert cfg.resolved_mode().value == "async"
    assert_close(final_center(cfg, RunPaths(cfg.out)), grouped_center(cfg, "async"), rtol=0, atol=0)


@pytest.mark.parametrize(("mode", "compress"), [("sync", "int8"), ("sync", "bf16"),
                                               ("async", "bf16")])  # fmt: skip
def test_compressed_exchanges_between_groups_equal_the_simulator(
    tmp_path: Path, mode: str, compress: str
) -> None:
    # Only the leaders cross the slow link, so only they compress: synchronously the
    # leaders' two-phase compressed sum, asynchronously the leader's compressed session; the
    # group's other ranks receive the result in full precision (the same values).
    workers = ("--workers", "4") if mode == "sync" else ("--workers", "2")
    summary = train(tmp_path / "run", "--method", "eamsgd", "--mode", mode, *workers,
                    "--group-size", "2", "--tau", "3", "--steps", "12", "--lr", "0.05",
                    "--compress", compress)  # fmt: skip
    cfg = TrainConfig.from_dict(json.loads((tmp_path / "run/config.json").read_text()))
    assert summary["status"] == "completed" and cfg.compress == compress
    assert_close(final_center(cfg, RunPaths(cfg.out)), grouped_center(cfg, mode), rtol=0, atol=0)
    # ... and the compression did something (the uncompressed run ends elsewhere).
    assert not torch.equal(grouped_center(cfg.replace(compress="none"), mode),
                           grouped_center(cfg, mode))  # fmt: skip


def test_an_overlapped_asynchronous_group_equals_the_simulator(tmp_path: Path) -> None:
    # The leader's exchange goes out in the background; every rank of the group takes the
    # reply from the leader's broadcast at the WAIT, K = 2 steps later.
    summary = train(tmp_path / "run", "--method", "eamsgd", "--workers", "2",
                    "--group-size", "2", "--tau", "2", "--overlap", "2", "--steps", "10",
                    "--lr", "0.05")  # fmt: skip
    cfg = TrainConfig.from_dict(json.loads((tmp_path / "run/config.json").read_text()))
    assert summary["status"] == "completed" and cfg.overlap == 2
    center = final_center(cfg, RunPaths(cfg.out))
    assert_close(center, grouped_center(cfg, "async"), rtol=0, atol=0)
    assert not torch.equal(center, grouped_center(cfg.replace(overlap=0), "async"))


def test_asynchronous_groups_exchange_through_one_session_each(tmp_path: Path) -> None:
    summary = train(tmp_path / "run", "--method", "eamsgd", "--workers", "4", "--group-size",
                    "2", "--tau", "2", "--steps", "20", "--lr", "0.02")  # fmt: skip
    assert summary["status"] == "completed" and summary["mode"] == "async"
    events = list(iter_jsonl(RunPaths(tmp_path / "run").metrics))
    joined = {e["worker"] for e in events if e.get("event") == "join"}
    assert joined == {0, 2}  # the groups' leaders; their peers never meet the server
    exchanges = [e for e in events if e.get("event") == "exchange"]
    # Every rank of a group logs the group's exchanges: 10 per worker (tau 2, 20 steps).
    for w in range(4):
        assert {e["step"] for e in exchanges if e["worker"] == w} >= {1, 3, 19}
    cfg = TrainConfig.from_dict(json.loads((tmp_path / "run/config.json").read_text()))
    assert cfg.hyperparams().alpha == pytest.approx(0.9 / 2)  # p = groups on the server


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_groups_stop_on_the_time_budget_at_the_same_step(tmp_path: Path, mode: str) -> None:
    # The ranks of a group must stop together (their gradient means pair up step by step);
    # synchronously every group does (the leaders' exchanges pair up too).
    out = tmp_path / "run"
    train(out, "--method", "easgd", "--mode", mode, "--workers", "4", "--group-size", "2",
          "--tau", "5", "--time-budget", "2")  # fmt: skip
    done = {e["worker"]: e["step"] for e in iter_jsonl(RunPaths(out).metrics)
            if e.get("event") == "worker_done"}  # fmt: skip
    assert sorted(done) == [0, 1, 2, 3] and min(done.values()) >= 10
    assert done[0] == done[1] and done[2] == done[3]
    if mode == "sync":
        assert len(set(done.values())) == 1


def test_a_resumed_synchronous_group_run_equals_the_simulator(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--method", "eamsgd", "--mode", "sync", "--workers", "4", "--group-size", "2",
            "--tau", "2", "--lr", "0.05", "--checkpoint-every-steps", "2"]  # fmt: skip
    train(out, *args, "--steps", "6")
    summary = train(out, "--resume", str(out), "--steps", "12")
    assert summary["local_steps"] == 48
    cfg = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    assert cfg.group_size == 2 and cfg.steps == 12
    assert_close(final_center(cfg, RunPaths(out)), grouped_center(cfg), rtol=0, atol=0)


def _saved_step(paths: RunPaths, worker: int) -> int:
    from easgd.runlog import CheckpointError, CheckpointKind, load_checkpoint

    try:
        return load_checkpoint(paths.worker_checkpoint(worker), CheckpointKind.CENTER).t
    except (CheckpointError, FileNotFoundError):
        return -1


def _kill_worker_when(
    cmd: list[str], paths: RunPaths, worker: int, ready: Any, what: str
) -> tuple[int, str, str]:
    """Run ``cmd``, SIGKILL ``worker`` once ``ready()`` (an event in the run's files, never
    a clock), and return the run's ``(returncode, stdout, stderr)``."""
    import signal
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, start_new_session=True)  # fmt: skip
    try:
        while not ready():
            assert proc.poll() is None, f"the run ended before {what}"
            time.sleep(0.02)
        procs = json.loads(paths.processes.read_text())["processes"]
        victim = next(p["pid"] for p in procs if p["role"] == "worker" and p["index"] == worker)
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, stdout, stderr


@pytest.mark.timeout(400)
def test_a_synchronous_group_run_restarts_every_rank_when_one_dies(tmp_path: Path) -> None:
    # SIGKILL a rank that is no leader: its group's next collective fails, the launcher
    # restarts every rank from their last common checkpoint, and the run ends bitwise as the
    # simulator's (as an uninterrupted run would).
    out = tmp_path / "run"
    paths = RunPaths(out)
    cmd = [sys.executable, "-m", "easgd", "train", "--quiet", "--json", "--eval-interval", "5",
           "--out", str(out), "--method", "easgd", "--mode", "sync", "--workers", "4",
           "--group-size", "2", "--tau", "3", "--lr", "0.05", "--steps", "300",
           "--checkpoint-every-steps", "6", "--max-restarts", "1"]  # fmt: skip
    rc, stdout, stderr = _kill_worker_when(cmd, paths, 3, lambda: _saved_step(paths, 3) >= 12,
                                           "worker 3 saved step 12")  # fmt: skip
    assert rc == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["restarts"] == 1
    events = list(iter_jsonl(paths.metrics))
    restarts = [(e["worker"], e["resumed"]) for e in events if e["event"] == "group_restart"]
    assert restarts == [(3, True)]  # from the ranks' checkpoints, not from step 0
    cfg = TrainConfig.from_dict(json.loads(paths.config.read_text()))
    assert_close(final_center(cfg, paths), grouped_center(cfg), rtol=0, atol=0)


@pytest.mark.timeout(400)
def test_an_asynchronous_group_that_loses_a_rank_is_lost_and_the_run_goes_on(
    tmp_path: Path,
) -> None:
    # SIGKILL worker 3 (no leader): its leader's next gradient mean fails, so the group ends;
    # the other group trains to its budget, and the run finishes without the lost one.
    out = tmp_path / "run"
    paths = RunPaths(out)
    cmd = [sys.executable, "-m", "easgd", "train", "--quiet", "--json", "--eval-interval", "5",
           "--out", str(out), "--method", "eamsgd", "--workers", "4", "--group-size", "2",
           "--tau", "2", "--steps", "1500"]  # fmt: skip

    def exchanged(worker: int) -> bool:
        events = iter_jsonl(paths.metrics) if paths.metrics.exists() else []
        return any(e.get("event") == "exchange" and e.get("worker") == worker for e in events)

    rc, stdout, stderr = _kill_worker_when(
        cmd, paths, 3, lambda: exchanged(3) and paths.processes.exists(), "worker 3 exchanged"
    )
    assert rc == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["status"] == "workers_lost" and sorted(summary["lost_workers"]) == [2, 3]
    done = {e["worker"]: e["step"] for e in iter_jsonl(paths.metrics)
            if e.get("event") == "worker_done"}  # fmt: skip
    assert done[0] == done[1] == 1500


BAD: list[tuple[dict[str, Any], str]] = [
    ({"workers": 3, "group_size": 2}, "workers=3 is not a multiple of group_size=2"),
    ({"method": "allreduce", "group_size": 2}, "allreduce has no elastic exchange"),
    ({"method": "downpour", "group_size": 2}, "downpour has no elastic exchange"),
    ({"group_size": 0}, "group_size=0 must be an integer >= 1"),
    ({"group_size": 2, "max_restarts": 1}, "cannot take back a restarted worker"),
]


@pytest.mark.parametrize(("changes", "message"), BAD)
def test_bad_group_configuration(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig(**{"epochs": 1.0, **changes})
    assert message in str(info.value)
    assert info.value.flag == "--group-size"


def test_the_cli_names_the_flag(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "easgd", "train", "--workers", "3", "--group-size", "2",
           "--steps", "1", "--out", str(tmp_path / "run")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 2
    assert "--workers 3 is not a multiple of --group-size 2" in proc.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(400)
def test_under_torchrun_a_node_is_a_group(tmp_path: Path) -> None:
    # Two torchrun agents (--nnodes 2, 2 processes each) on loopback: each node is a group
    # (--group-size node), and the run equals the simulator's 2 grouped workers.
    out = tmp_path / "run"
    port = _free_port()

    def agent(node: int) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
                str(node), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(port), "-m", "easgd", "train", "--method", "easgd",
                "--mode", "sync", "--workers", "4", "--group-size", "node", "--tau", "3",
                "--steps", "12", "--lr", "0.05", "--out", str(out), "--json",
                "--eval-interval", "0.5"]  # fmt: skip

    pipe = subprocess.PIPE
    agents = [subprocess.Popen(agent(node), stdout=pipe, stderr=pipe, text=True, cwd=ROOT)
              for node in range(2)]  # fmt: skip
    try:
        results = [a.communicate(timeout=300) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
                a.wait()
    for a, (_, err) in zip(agents, results, strict=True):
        assert a.returncode == 0, err[-4000:]
    cfg = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    assert cfg.group_size == 2
    assert_close(final_center(cfg, RunPaths(cfg.out)), grouped_center(cfg), rtol=0, atol=0)


def test_group_size_node_is_torchruns_local_world_size(tmp_path: Path) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node=3", "-m", "easgd", "train", "--steps", "2"]  # fmt: skip
    out = tmp_path / "run"
    proc = subprocess.run([*torchrun, "--method", "easgd", "--mode", "sync", "--workers", "3",
                           "--group-size", "node", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((out / "config.json").read_text())["group_size"] == 3  # one group
    # Asynchronous groups need the local launcher (it tells the servers of the non-leaders).
    proc = subprocess.run([*torchrun, "--workers", "2", "--group-size", "2", "--out",
                           str(tmp_path / "async")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert proc.returncode != 0 and "--mode async under torchrun" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "easgd", "train", "--group-size", "node",
                           "--steps", "1", "--out", str(tmp_path / "local")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 2 and "--group-size node is a node's processes" in proc.stderr
