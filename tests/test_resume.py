"""``easgd train --resume``: an interrupted run continues, synchronous runs bitwise.

Known answers: a synchronous run stopped at step k (by its budget, or by a SIGKILLed rank)
and resumed ends bitwise equal (``torch.equal``) to the uninterrupted run with the same seed:
its final center and every worker's x. An asynchronous run resumed keeps its step budget
and its server clock equals the exchanges of both parts. The refusals name their flags.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from easgd.algorithms import Hyperparams, Worker, run_settle, run_step
from easgd.cli import main
from easgd.config import TrainConfig
from easgd.runlog import (
    CheckpointError,
    CheckpointKind,
    RunPaths,
    atomic_write_json,
    iter_jsonl,
    load_checkpoint,
)
from test_train import listed_pid

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


def train(out: Path, *args: str, check: bool = True) -> Any:
    cmd = [sys.executable, "-m", "easgd", "train", "--quiet", "--json",
           "--eval-interval", "5", *args]  # fmt: skip
    if "--resume" not in args:
        cmd += ["--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])
    return proc


def state(out: Path, name: str) -> Any:
    return load_checkpoint(RunPaths(out).checkpoints / name, CheckpointKind.CENTER)


def assert_same_result(a: Path, b: Path, workers: int) -> None:
    """The final center and every worker's x (and its whole state) are bitwise equal."""
    assert torch.equal(state(a, "center.pt").center, state(b, "center.pt").center)
    for i in range(workers):
        sa, sb = state(a, f"worker-{i}.pt"), state(b, f"worker-{i}.pt")
        assert sa.t == sb.t
        assert sa.meta["stream"] == sb.meta["stream"]
        for name in ("x", "v", "center", "rng"):
            if name in sa.tensors:
                assert torch.equal(sa.tensors[name], sb.tensors[name]), (i, name)


SYNC = {
    "easgd": ["--method", "easgd", "--mode", "sync", "--workers", "2", "--tau", "3"],
    "localsgd": ["--method", "localsgd", "--workers", "2", "--tau", "3", "--momentum", "0.9"],
}


@pytest.mark.parametrize("method", list(SYNC))
def test_synchronous_run_resumed_from_its_end_equals_the_uninterrupted_run(
    tmp_path: Path, method: str
) -> None:
    args = [*SYNC[method], "--checkpoint-every-steps", "5"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(whole, *args, "--steps", "40")
    # 20 steps: local SGD's last average was at step 18, and the run ended on its own one.
    first = train(parts, *args, "--steps", "20")
    assert first["local_steps"] == 40
    train(parts, "--resume", str(parts), "--steps", "40")
    assert_same_result(whole, parts, 2)
    events = list(iter_jsonl(RunPaths(parts).metrics))
    assert [e["steps"] for e in events if e["event"] == "run_resume"] == [40]
    starts = [e for e in events if e["event"] == "train_start" and "resumed_step" in e]
    assert sorted(e["worker"] for e in starts) == [0, 1]
    assert {e["resumed_step"] for e in starts} == {20}
    walls = [e["wall"] for e in events if e["event"] == "worker_done"]
    assert walls[2:] > walls[:2], "the resumed part's clock does not go on"


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str]) -> None:
    while not condition():
        assert proc.poll() is None, "the run ended before the event the test waits for"
        time.sleep(0.01)


def _saved_step(paths: RunPaths, worker: int) -> int:
    try:
        return load_checkpoint(paths.worker_checkpoint(worker), CheckpointKind.CENTER).t
    except (CheckpointError, FileNotFoundError):
        return -1


def _kill_worker_mid_run(out: Path, args: list[str]) -> tuple[int, str, str]:
    """Start ``easgd train``, SIGKILL worker 1 once it saved step 24; its status and output."""
    paths = RunPaths(out)
    cmd = [sys.executable, "-m", "easgd", "train", "--quiet", "--json", "--eval-interval", "5",
           "--out", str(out), *args]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, start_new_session=True)  # fmt: skip
    try:
        _wait_for(lambda: _saved_step(paths, 1) >= 24, proc)
        _wait_for(lambda: listed_pid(paths, "worker", 1) is not None, proc)
        pid = listed_pid(paths, "worker", 1)
        assert pid is not None and pid > 0, pid
        os.kill(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, stdout, stderr


STEPS = 1500  # long enough that the kill lands mid-run on a slow machine


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    args = [*SYNC["easgd"], "--checkpoint-every-steps", "10", "--steps", str(STEPS)]
    whole = tmp_path_factory.mktemp("whole")
    train(whole, *args)
    return whole, args


@pytest.mark.timeout(400)
def test_synchronous_run_resumed_after_a_killed_rank_equals_the_uninterrupted_run(
    tmp_path: Path, uninterrupted: tuple[Path, list[str]]
) -> None:
    whole, args = uninterrupted
    parts = tmp_path / "parts"
    paths = RunPaths(parts)
    status, _, stderr = _kill_worker_mid_run(parts, args)
    assert status == 1, stderr[-2000:]
    killed_at = min(_saved_step(paths, 0), _saved_step(paths, 1))
    assert 0 < killed_at < STEPS
    train(parts, "--resume", str(parts))
    assert_same_result(whole, parts, 2)
    starts = [e for e in iter_jsonl(paths.metrics) if "resumed_step" in e]
    assert len({e["resumed_step"] for e in starts}) == 1  # every rank at the same step
    assert starts[0]["resumed_step"] >= 24


@pytest.mark.timeout(400)
def test_synchronous_group_restarts_from_its_checkpoint_and_equals_the_uninterrupted_run(
    tmp_path: Path, uninterrupted: tuple[Path, list[str]]
) -> None:
    whole, args = uninterrupted
    out = tmp_path / "restarted"
    status, stdout, stderr = _kill_worker_mid_run(out, [*args, "--max-restarts", "1"])
    assert status == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["restarts"] == 1
    assert_same_result(whole, out, 2)
    events = list(iter_jsonl(RunPaths(out).metrics))
    [restart] = [e for e in events if e["event"] == "group_restart"]
    assert restart["worker"] == 1 and restart["resumed"] is True
    resumed = {e["resumed_step"] for e in events if "resumed_step" in e}
    assert len(resumed) == 1 and min(resumed) >= 24


def test_asynchronous_run_resumed_keeps_its_budget_and_its_server_clock(tmp_path: Path) -> None:
    out = tmp_path / "async"
    args = ["--method", "easgd", "--workers", "2", "--tau", "3"]
    first = train(out, *args, "--steps", "30")
    assert first["local_steps"] == 60
    second = train(out, "--resume", str(out), "--steps", "60")
    paths = RunPaths(out)
    server = load_checkpoint(paths.server_checkpoint(0), CheckpointKind.SERVER_SHARD)
    events = list(iter_jsonl(paths.metrics))
    exchanges = {(e["worker"], e["pid"]): e["exchanges"] for e in events
                 if e["event"] == "exchange"}  # fmt: skip
    assert server.t == sum(exchanges.values()) == second["exchanges"] == 2 * 20
    done = [e for e in events if e["event"] == "worker_done"]
    assert sorted(e["step"] for e in done[2:]) == [60, 60]
    for i in range(2):
        assert state(out, f"worker-{i}.pt").t == 60
    restarts = [e for e in events if e["event"] == "server_restart"]
    assert [e["resumed_t"] for e in restarts] == [20]


def _run_dir(tmp_path: Path, *, checkpoint: bool) -> Path:
    """A directory that holds a finished-looking run (config.json), with or without checkpoints."""
    out = tmp_path / "run"
    paths = RunPaths(out).make()
    cfg = TrainConfig(method="easgd", mode="sync", workers=2, steps=10, lr=0.01, out=str(out))
    atomic_write_json(paths.config, cfg.to_dict())
    if checkpoint:
        paths.worker_checkpoint(0).write_bytes(b"")
    return out


@pytest.mark.parametrize(
    ("flags", "checkpoint", "message"),
    [
        (["--overwrite"], True, "--resume {out} with --overwrite"),
        (["--lr", "0.02"], True, "--lr 0.02 would change the experiment"),
        (["--workers", "3"], True, "--workers 3 would change the experiment"),
        (["--seed", "1"], True, "--seed 1 would change the experiment"),
        (["--method", "localsgd"], True, "--method localsgd would change the experiment"),
        (["--out", "elsewhere"], True, "--out elsewhere with --resume"),
        ([], False, "the run left no checkpoint"),
    ],
    ids=["overwrite", "lr", "workers", "seed", "method", "out", "no-checkpoint"],
)
def test_resume_refuses_what_would_change_or_lose_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], checkpoint: bool,
    message: str,
) -> None:  # fmt: skip
    out = _run_dir(tmp_path, checkpoint=checkpoint)
    assert main(["train", "--resume", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message.format(out=out) in err and len(err.splitlines()) == 1, err
    assert RunPaths(out).config.exists()
    assert checkpoint == RunPaths(out).worker_checkpoint(0).exists()  # nothing deleted


def test_resume_of_a_directory_without_a_run_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--resume", str(tmp_path / "none")]) == 2
    assert "no run there" in capsys.readouterr().err


def test_checkpoint_steps_must_be_positive() -> None:
    with pytest.raises(ValueError, match="checkpoint_steps=0"):
        TrainConfig(steps=1, checkpoint_steps=0)


def test_worker_state_round_trips_and_refuses_an_exchange_in_flight() -> None:
    hp = Hyperparams(method="eamsgd", workers=1, tau=2, lr=0.1, momentum=0.5)
    torch.manual_seed(0)
    x = torch.randn(5)

    def grad(x_: torch.Tensor, out: torch.Tensor) -> float:
        out.copy_(2 * x_)
        return float(x_.square().sum())

    def serve(req: Any) -> None:
        if req.op.value == "sum":
            req.deferred = True  # in flight until WAIT, as the overlapped all-reduce

    a = Worker(hp, x.clone(), "sync")
    for _ in range(3):
        run_step(a, grad, serve)
    with pytest.raises(RuntimeError, match="settle"):
        a.state_dict()
    run_settle(a, serve)
    b = Worker(hp, torch.zeros(5), "sync")
    b.load_state_dict(a.state_dict())
    for _ in range(4):
        run_step(a, grad, serve)
        run_step(b, grad, serve)
    run_settle(a, serve)
    run_settle(b, serve)
    assert a.t == b.t == 7
    for name in ("x", "v", "center"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
