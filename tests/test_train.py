"""Real processes against the simulator, and the run directory a user gets."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from easgd.algorithms import Hyperparams
from easgd.config import TrainConfig
from easgd.finalize import final_center
from easgd.runlog import RunPaths, iter_jsonl
from easgd.sim import ModelObjective, simulate
from easgd.task import build_task

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(240)


def train(out: Path, *args: str, timeout: float = 180, check: bool = True) -> Any:
    cmd = [sys.executable, "-m", "easgd", "train", "--out", str(out), "--quiet", "--json",
           "--eval-interval", "0.5", *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])
    return proc


def simulated_center(cfg: TrainConfig, schedule: str) -> torch.Tensor:
    torch.set_num_threads(1)
    parts = build_task(cfg.dataset, cfg.model, seed=cfg.seed)
    problem = ModelObjective(parts.build, parts.train, parts.test, cfg.batch_size, parts.transform)
    assert cfg.steps is not None
    res = simulate(problem, cfg.hyperparams(), schedule=schedule, steps=cfg.steps, seed=cfg.seed)
    return res.center


@pytest.mark.parametrize(
    "args",
    [
        ["--method", "easgd", "--mode", "sync", "--workers", "2", "--tau", "3"],
        ["--method", "eamsgd", "--mode", "sync", "--workers", "2", "--tau", "2"],
        ["--method", "allreduce", "--workers", "2"],
        ["--method", "localsgd", "--workers", "2", "--tau", "4"],
        ["--method", "allreduce", "--workers", "2", "--momentum", "0.9"],
        # 12 steps, tau 5: the run ends between averages; every rank averages at the end.
        ["--method", "localsgd", "--workers", "2", "--tau", "5", "--momentum", "0.9"],
    ],
    ids=["easgd", "eamsgd", "allreduce", "localsgd", "allreduce-momentum", "localsgd-momentum"],
)
def test_synchronous_run_equals_the_simulator(tmp_path: Path, args: list[str]) -> None:
    summary = train(tmp_path / "run", *args, "--steps", "12", "--lr", "0.05")
    cfg = TrainConfig.from_dict(json.loads((tmp_path / "run/config.json").read_text()))
    assert summary["mode"] == "sync"
    assert_close(final_center(cfg, RunPaths(cfg.out)), simulated_center(cfg, "sync"))


@pytest.mark.parametrize("method", ["easgd", "eamsgd", "downpour", "adownpour"])
def test_asynchronous_run_with_one_worker_equals_the_simulator(tmp_path: Path, method: str) -> None:
    train(tmp_path / "run", "--method", method, "--workers", "1", "--tau", "2", "--steps", "10",
          "--lr", "0.05")  # fmt: skip
    cfg = TrainConfig.from_dict(json.loads((tmp_path / "run/config.json").read_text()))
    assert_close(final_center(cfg, RunPaths(cfg.out)), simulated_center(cfg, "async"))


def test_run_directory_and_summary(tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = train(out, "--method", "eamsgd", "--workers", "3", "--servers", "2", "--tau", "2",
                    "--epochs", "4")  # fmt: skip
    for key in ("center_test_error", "center_test_loss", "wall_seconds", "exchanges",
                "bytes_sent"):  # fmt: skip
        assert key in summary
    assert summary["center_test_error"] < 0.2
    assert summary["exchanges"] > 0 and summary["bytes_sent"] > 0
    paths = RunPaths(out)
    assert json.loads(paths.config.read_text())["servers"] == 2
    events = list(iter_jsonl(paths.metrics))
    steps = [e for e in events if e.get("event") == "exchange"]
    assert {e["worker"] for e in steps} == {0, 1, 2}
    for key in ("wall", "worker", "step", "loss", "bytes_sent", "bytes_received",
                "exchange_seconds"):  # fmt: skip
        assert key in steps[0]
    assert list(iter_jsonl(paths.eval)), "the evaluator wrote no result"
    # Each server shard's checkpoint (and its previous, if kept), and the workers' states.
    names = {p.name for p in paths.checkpoints.iterdir() if not p.name.startswith("worker-")}
    assert names - {"server-0.prev.pt", "server-1.prev.pt"} == {"server-0.pt", "server-1.pt"}
    assert list(paths.snapshots.glob("center-*.pt"))


def test_deferred_evaluation_evaluates_every_snapshot_once_at_the_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = train(out, "--method", "eamsgd", "--workers", "2", "--tau", "4", "--epochs", "15",
                    "--eval-deferred", "--eval-interval", "0.2")  # fmt: skip
    paths = RunPaths(out)
    snapshots = sorted(p.name for p in paths.snapshots.glob("center-*.pt"))
    curve = list(iter_jsonl(paths.eval))
    assert len(snapshots) >= 2
    assert [e["snapshot"] for e in curve] == snapshots  # each once, in wall order
    assert [e["wall"] for e in curve] == sorted(e["wall"] for e in curve)
    assert summary["evaluations"] == len(snapshots)
    assert summary["best_center_test_error"] <= min(e["test_error"] for e in curve)


def test_synchronous_ranks_stop_on_the_time_budget_at_the_same_step(tmp_path: Path) -> None:
    # The ranks vote on the budget asynchronously (never blocking the overlapped exchange)
    # and must still stop together, with nothing left in flight. The budget counts from
    # each rank's first training step (train_start), so a slow start-up does not eat it.
    out = tmp_path / "run"
    summary = train(out, "--method", "eamsgd", "--mode", "sync", "--workers", "2", "--tau",
                    "5", "--time-budget", "3")  # fmt: skip
    events = list(iter_jsonl(RunPaths(out).metrics))
    done = [e for e in events if e.get("event") == "worker_done"]
    started = [e for e in events if e.get("event") == "train_start"]
    assert len(started) == 2 and all(e["step"] == 0 for e in started)
    assert len(done) == 2 and done[0]["step"] == done[1]["step"] >= 10
    assert summary["local_steps"] == 2 * done[0]["step"]
    assert all(math.isfinite(e["loss"]) for e in events if e.get("event") == "exchange")


def _wait_for(predicate: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def _exchanged(paths: RunPaths, worker: int) -> bool:
    return any(e.get("event") == "exchange" and e["worker"] == worker
               for e in iter_jsonl(paths.metrics))  # fmt: skip


def listed_pid(paths: RunPaths, role: str, index: int) -> int | None:
    """The pid of ``role`` ``index``'s current process, from processes.json; None until the
    launcher has written it (on a loaded machine a worker can exchange before the launcher,
    starting the other processes, gets to write the file: seen with two CPU hogs)."""
    try:
        procs = json.loads(paths.processes.read_text())["processes"]
    except FileNotFoundError:
        return None
    return next((int(p["pid"]) for p in procs if (p["role"], p["index"]) == (role, index)), None)


@pytest.mark.timeout(480)
def test_killed_worker_is_replaced_and_the_run_completes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    paths = RunPaths(out)
    # A step budget: the run ends when every worker (the replacement too, from its own
    # step 0) has taken its steps, however slow the machine is.
    cmd = [sys.executable, "-m", "easgd", "train", "--out", str(out), "--quiet", "--json",
           "--workers", "3", "--tau", "2", "--steps", "4000",
           "--max-restarts", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)  # fmt: skip
    try:
        _wait_for(lambda: _exchanged(paths, 1), 200)
        pid = _wait_for(lambda: listed_pid(paths, "worker", 1), 200)
        os.kill(pid, signal.SIGKILL)
        killed_at = max(e["wall"] for e in iter_jsonl(paths.metrics))
        stdout, stderr = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["restarts"] == 1 and summary["status"] == "completed"
    assert summary["lost_workers"] == []
    events = list(iter_jsonl(paths.metrics))
    deaths = [e for e in events if e.get("event") == "death" and e.get("worker") == 1]
    assert deaths, "the server did not notice the dead worker"
    joins = [e for e in events if e.get("event") == "join" and e.get("worker") == 1]
    assert len(joins) == 2, "the replacement did not join with a new session"
    new = [e for e in events if e.get("event") == "exchange" and e["worker"] == 1
           and e["pid"] != pid]  # fmt: skip
    assert new, "the replacement's exchanges were not counted"
    survivors = [e for e in events if e.get("event") == "exchange" and e["worker"] in (0, 2)
                 and e["wall"] > killed_at]  # fmt: skip
    assert survivors, "the survivors stopped exchanging"


# A dead server: tests/test_launch.py (restarted under --max-restarts, else the run fails).


@pytest.mark.timeout(240)
def test_torchrun_takes_roles_from_ranks(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
           "-m", "easgd", "train", "--workers", "2", "--servers", "1", "--steps", "30",
           "--out", str(out), "--json", "--eval-interval", "0.5"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=200, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["local_steps"] == 60 and summary["servers"] == 1


def test_wrong_world_size_under_torchrun_is_explained(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "easgd", "train", "--workers", "2", "--servers", "1", "--steps", "5",
           "--out", str(tmp_path / "run")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0
    assert "WORLD_SIZE=2" in proc.stderr and "--nproc-per-node" in proc.stderr


BAD: list[tuple[dict[str, Any], str]] = [
    ({"mode": "both"}, "mode='both'"),
    ({"method": "downpour", "mode": "sync"}, "not available for method='downpour'"),
    ({"servers": 0}, "servers=0"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"epochs": None}, "no budget"),
    ({"epochs": -1.0}, "every budget given must be a positive number"),
    ({"device": "tpu"}, "device='tpu'"),
    ({"lr": -0.1}, "lr=-0.1"),
]


@pytest.mark.parametrize(("changes", "message"), BAD)
def test_bad_configuration(changes: dict[str, Any], message: str) -> None:
    fields = {"epochs": 1.0, **changes}
    with pytest.raises(ValueError, match=None) as info:
        TrainConfig(**fields)
    assert message in str(info.value)


def test_existing_run_directory_is_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    proc = train(out, "--steps", "1", check=False)
    assert proc.returncode == 2
    assert "already holds a run" in proc.stderr and "--overwrite" in proc.stderr


def test_hyperparams_map_one_for_one() -> None:
    cfg = TrainConfig(method="eamsgd", workers=4, tau=8, lr=0.1, weight_decay=0.0, epochs=1)
    assert cfg.hyperparams() == Hyperparams(method="eamsgd", workers=4, tau=8, lr=0.1)


@pytest.mark.timeout(400)
def test_a_torchrun_restart_resumes_the_run_from_its_checkpoints(tmp_path: Path) -> None:
    # torchrun --max-restarts starts the same command again after a rank died: the attempt
    # resumes the run in --out (the server shard from its checkpoint, each worker from its
    # saved step) instead of refusing the directory or starting from the initial center.
    out = tmp_path / "run"
    paths = RunPaths(out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--max-restarts", "1",
           "--nproc-per-node=3", "-m", "easgd", "train", "--workers", "2", "--servers", "1",
           "--steps", "3000", "--tau", "2", "--checkpoint-every-steps", "50",
           "--checkpoint-interval", "0.5", "--out", str(out), "--json"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)  # fmt: skip
    try:
        # Every worker has saved a step to resume from (on a loaded machine one can be 50
        # steps behind the other), and the shard a checkpoint.
        _wait_for(lambda: all((paths.checkpoints / f"worker-{i}.pt").exists() for i in (0, 1))
                  and any(e.get("event") == "checkpoint" for e in iter_jsonl(paths.metrics)),
                  300)  # fmt: skip
        server = next(e for e in iter_jsonl(paths.metrics) if e.get("event") == "start")
        os.kill(int(server["pid"]), signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    events = list(iter_jsonl(paths.metrics))
    starts = [e for e in events if e.get("event") == "start"]
    assert len(starts) == 2 and starts[1]["pid"] != starts[0]["pid"]
    assert starts[1]["t"] > 0, "the restarted shard began from the initial center"
    resumed = [e for e in events if e.get("event") == "train_start" and e.get("resumed_step")]
    assert {e["worker"] for e in resumed} == {0, 1}
    (done,) = [e for e in events if e.get("event") == "server_done"]
    # Every rank restarted, so nobody holds the updates between the shard's checkpoint and
    # the kill, and the workers redo their steps since their own (not simultaneous)
    # checkpoints: the run is exact only up to the checkpoint period (README, Failures).
    assert done["t"] > starts[1]["t"]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["center_test_error"] is not None
    # No orphan: the evaluator of the killed attempt's rank 0 stops once its parent is gone.
    assert _wait_for(lambda: not _processes_of(out), 120) is True


def _processes_of(run_dir: Path) -> list[int]:
    """Live processes of a run, from /proc: an EASGD_RUN_DIR of ``run_dir`` in their
    environment, or ``run_dir`` in their command line (the ranks torchrun started, and what
    they forked: the spawner's fork server and its children, whose /proc environ and
    cmdline are the forking rank's)."""
    found = []
    needle = f"EASGD_RUN_DIR={run_dir}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            ours = needle in (entry / "environ").read_bytes().split(b"\0") or (
                str(run_dir).encode() in (entry / "cmdline").read_bytes().split(b"\0")
            )
            if ours and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(entry.name))
        except OSError:
            continue
    return found
