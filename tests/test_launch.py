"""The local launcher's supervision: processes.json, lost workers, restarted servers.

Fault tests kill a process for real (SIGKILL, pid from ``processes.json``) and assert on what
the run wrote (events, their order, the summary, the exit status), never on a wall-clock
allowance: every wait is for an event, bounded, and the pytest timeout is the only clock.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from easgd.launch import _Display
from easgd.runlog import (
    PROCESS_FIELDS,
    Event,
    JsonlWriter,
    RunPaths,
    event_errors,
    iter_jsonl,
    process_errors,
)

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "run-directory.md"
pytestmark = pytest.mark.timeout(300)
T = TypeVar("T")


# ------------------------------------------------------------------------------------------
# Helpers: start a run, wait for what it writes, find its processes
# ------------------------------------------------------------------------------------------


def _start(out: Path, *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "easgd", "train", "--out", str(out), "--quiet", "--json",
           "--eval-interval", "0.5", *args]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)  # fmt: skip


def _wait_for(predicate: Callable[[], T | None], proc: subprocess.Popen[str], what: str) -> T:
    """Poll ``predicate`` until it returns a value; fail if the run ends first (bounded by
    the run: a run that ends without it is the failure, and pytest's timeout bounds it)."""
    while True:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before {what}")
        time.sleep(0.05)


def _processes(paths: RunPaths) -> dict[tuple[str, int], dict[str, Any]]:
    if not paths.processes.exists():
        return {}
    doc = json.loads(paths.processes.read_text())
    return {(p["role"], p["index"]): p for p in doc["processes"]}


def _process(paths: RunPaths, role: str, index: int, proc: subprocess.Popen[str]) -> dict[str, Any]:
    """``processes.json``'s entry of a running process, waited for: the launcher rewrites
    the file on its own loop, so under load an event of the process may come first."""
    return _wait_for(
        lambda: (p := _processes(paths).get((role, index))) and p.get("state") == "running" and p,
        proc, f"processes.json named {role} {index} running",
    )  # fmt: skip


def _events(paths: RunPaths, kind: Event, **match: Any) -> list[dict[str, Any]]:
    return [
        e
        for e in iter_jsonl(paths.metrics)
        if e.get("event") == kind and all(e.get(k) == v for k, v in match.items())
    ]


#: The events the launcher and a restarted server role write (checked against the schema here;
#: tests/test_runlog.py checks every event of a run).
SUPERVISION = {Event.WORKER_RESTART, Event.WORKER_LOST, Event.SERVER_DIED, Event.SERVER_RESTART}


def _schema_problems(paths: RunPaths) -> list[str]:
    return [p for e in iter_jsonl(paths.metrics) if e.get("event") in SUPERVISION
            for p in event_errors(e)]  # fmt: skip


def _finish(proc: subprocess.Popen[str], timeout: float = 240) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _end_run(proc: subprocess.Popen[str], paths: RunPaths) -> None:
    """End the launcher and every process it started (by pid), whatever state they are in."""
    pids = [p["pid"] for p in _processes(paths).values() if p["state"] != "exited"]
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------
# processes.json: the document, the schema, a run
# ------------------------------------------------------------------------------------------


def _doc_table(title: str) -> dict[str, tuple[str, str, bool]]:
    rows: dict[str, tuple[str, str, bool]] = {}
    inside = False
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            inside = line[3:].strip() == title
        elif inside and line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            unit = "" if cells[2] == "—" else cells[2]
            rows[cells[0].strip("`")] = (cells[1], unit, cells[3] == "yes")
    return rows


def test_doc_lists_exactly_the_fields_of_processes_json() -> None:
    code = {n: (f.type, f.unit, f.required) for n, f in PROCESS_FIELDS.items()}
    assert _doc_table("`processes.json`") == code


def test_processes_json_lists_each_process_as_soon_as_it_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker can exchange (or die) before the launcher has started the next process: the
    file must already name it then, not only once every process is started."""
    from easgd import launch
    from easgd.config import TrainConfig

    paths = RunPaths(tmp_path / "run")
    listed: list[list[tuple[str, int]]] = []  # what the file said as each process started

    class Child:
        pid = os.getpid()

        def poll(self) -> int | None:
            return None

    class Spawner:
        parent_pid = os.getpid()

        def warm(self) -> None:
            pass

        def start(self, env: dict[str, str], log_path: Path, append: bool = False) -> Child:
            file = paths.processes
            now = json.loads(file.read_text())["processes"] if file.exists() else []
            listed.append([(p["role"], p["index"]) for p in now])
            return Child()

    monkeypatch.setattr(launch, "shared", Spawner)
    cfg = TrainConfig(method="easgd", workers=2, steps=1, out=str(paths.root))
    launcher = launch._Launcher(cfg, None)
    started = [cfg.role_of(rank) for rank in range(cfg.world_size())]
    try:
        for rank, (role, index) in enumerate(started):
            launcher.spawn(role, index, rank)
        launcher.spawn("evaluator", 0, -1)
    finally:
        launcher.events.close()
    assert listed == [started[:k] for k in range(len(started) + 1)]
    final = json.loads(paths.processes.read_text())["processes"]
    assert [(p["role"], p["index"]) for p in final] == [*started, ("evaluator", 0)]
    assert [e for p in final for e in process_errors(p)] == []


def test_display_says_which_workers_wait_for_which_server(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path).make()
    with JsonlWriter(paths.metrics) as out:
        for worker in (0, 1):
            out.write({"event": Event.SERVER_LOST, "wall": 1.0, "worker": worker, "shard": 0})
        out.write({"event": Event.SERVER_BACK, "wall": 2.0, "worker": 1, "shard": 0})
    display = _Display(paths, None, 2)
    display.poll()
    line = display.line(["server 0 restarting"])
    assert "server 0 restarting" in line and "worker 0 waiting for server 0" in line
    with JsonlWriter(paths.metrics) as out:
        out.write({"event": Event.SERVER_BACK, "wall": 3.0, "worker": 0, "shard": 0})
    display.poll()
    assert "waiting" not in display.line()


# ------------------------------------------------------------------------------------------
# Lost workers: no stall, and an exit status that tells the truth
# ------------------------------------------------------------------------------------------


def test_a_lost_worker_does_not_stall_the_end_of_the_run(tmp_path: Path) -> None:
    # --timeout 3600: were the server still waiting for the lost worker (the old 60 s stall,
    # which was this timeout), the run would outlast the test's timeout.
    paths = RunPaths(tmp_path / "run")
    proc = _start(paths.root, "--workers", "2", "--tau", "2", "--steps", "1500",
                  "--timeout", "3600")  # fmt: skip
    try:
        _wait_for(lambda: _events(paths, Event.EXCHANGE, worker=1), proc, "worker 1 exchanged")
        victim = _process(paths, "worker", 1, proc)
        os.kill(victim["pid"], signal.SIGKILL)
        stdout, stderr = _finish(proc)
    finally:
        _end_run(proc, paths)
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["status"] == "workers_lost" and summary["lost_workers"] == [1]
    warning = [line for line in stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and "worker 1 died beyond --max-restarts 0" in warning[0]
    events = list(iter_jsonl(paths.metrics))
    kinds = [(e["event"], e.get("worker", e.get("shard"))) for e in events]
    lost, done = kinds.index(("worker_lost", 1)), kinds.index(("worker_done", 0))
    stop = kinds.index(("stop", 0))
    assert stop > max(lost, done), "the server stopped before the live worker was done"
    assert not _schema_problems(paths)
    procs = _processes(paths)
    assert procs[("worker", 1)]["state"] == "exited"
    assert procs[("worker", 1)]["status"] == -signal.SIGKILL
    assert procs[("worker", 0)]["status"] == 0 and procs[("server", 0)]["status"] == 0


def test_a_run_that_lost_every_worker_fails(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path / "run")
    proc = _start(paths.root, "--workers", "1", "--tau", "2", "--steps", "100000")
    try:
        _wait_for(lambda: _events(paths, Event.EXCHANGE, worker=0), proc, "worker 0 exchanged")
        os.kill(_process(paths, "worker", 0, proc)["pid"], signal.SIGKILL)
        stdout, stderr = _finish(proc)
    finally:
        _end_run(proc, paths)
    assert proc.returncode == 1, stderr[-3000:]
    assert "every worker died beyond --max-restarts 0" in stderr
    summary = json.loads(paths.summary.read_text())
    assert json.loads(stdout.strip().splitlines()[-1]) == summary
    assert summary["status"] == "all_workers_lost" and summary["lost_workers"] == [0]


# ------------------------------------------------------------------------------------------
# Servers: restarted under --max-restarts, and the run fails without it
# ------------------------------------------------------------------------------------------


@pytest.mark.timeout(420)
@pytest.mark.parametrize("compress", ["none", "int8"])
def test_a_killed_server_is_restarted_from_its_checkpoint(tmp_path: Path, compress: str) -> None:
    # int8: the compressed sessions recover too (the reference restarts at the new center).
    paths = RunPaths(tmp_path / "run")
    proc = _start(paths.root, "--workers", "2", "--tau", "2", "--steps", "2500",
                  "--max-restarts", "1", "--checkpoint-interval", "0.5",
                  "--compress", compress)  # fmt: skip
    try:
        _wait_for(lambda: _events(paths, Event.CHECKPOINT, shard=0), proc, "a checkpoint")
        _wait_for(lambda: _events(paths, Event.EXCHANGE), proc, "an exchange")
        first = _wait_for(
            lambda: (p := _process(paths, "server", 0, proc))["port"] is not None and p,
            proc, "processes.json named the server's port",
        )  # fmt: skip
        os.kill(first["pid"], signal.SIGKILL)
        restart = _wait_for(lambda: _events(paths, Event.SERVER_RESTART, shard=0), proc,
                            "the server restarted")[0]  # fmt: skip
        second = _wait_for(
            lambda: (p := _processes(paths).get(("server", 0), first))["pid"] != first["pid"]
            and p["port"] is not None and p,
            proc, "processes.json named the new server",
        )  # fmt: skip
        stdout, stderr = _finish(proc, timeout=360)
    finally:
        _end_run(proc, paths)

    # Supervision: the launcher saw the death, restarted the shard, and says where it is.
    died = _events(paths, Event.SERVER_DIED, shard=0)
    assert [(e["pid"], e["status"], e["restarting"]) for e in died] == [
        (first["pid"], -signal.SIGKILL, True)
    ]
    assert restart["restart"] == 1 and restart["pid"] == second["pid"]
    assert restart["resumed_t"] is not None and restart["resumed_t"] >= 0  # from a checkpoint
    assert restart["address"] == f"{second['host']}:{second['port']}"
    assert second["restarts"] == 1 and second["log"] == "logs/server-0.1.log"
    starts = _events(paths, Event.SERVER_START, shard=0)
    assert [e["pid"] for e in starts] == [first["pid"], second["pid"]]
    assert starts[1]["t"] == restart["resumed_t"]
    assert not _schema_problems(paths)

    # The run completes (workers either reconnect, or die and are restarted once the shard
    # serves again: a worker restart waits for every shard, so it never dials the dead one).
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["server_restarts"] == 1
    assert summary["lost_servers"] == [] and summary["lost_workers"] == []
    final = _processes(paths)
    assert all(p["state"] == "exited" and p["status"] == 0 for p in final.values()), final
    assert all(not process_errors(p) for p in final.values())

    # Nothing lost: the workers reconnected to the restarted shard (none was restarted),
    # re-sent what its checkpoint lacked, and its clock counts every exchange exactly once.
    events = list(iter_jsonl(paths.metrics))
    assert not [e for e in events if e.get("event") == Event.WORKER_RESTART]
    backs = [e for e in events if e.get("event") == Event.SERVER_BACK]
    assert {e["worker"] for e in backs} == {0, 1}
    assert all(e["lost"] == 0 and e["reply_lost"] == 0 for e in backs)
    (done,) = [e for e in events if e.get("event") == Event.SERVER_DONE]
    assert done["t"] == summary["exchanges"] == done["exchanges"]
    assert done["recovered"] == sum(e["resent"] for e in backs)


def test_a_server_dead_beyond_its_restarts_fails_the_run(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path / "run")
    proc = _start(paths.root, "--workers", "2", "--steps", "1000000")
    try:
        _wait_for(lambda: _events(paths, Event.EXCHANGE), proc, "an exchange")
        server = _process(paths, "server", 0, proc)
        os.kill(server["pid"], signal.SIGKILL)
        _, stderr = _finish(proc)
    finally:
        _end_run(proc, paths)
    assert proc.returncode == 1
    assert "server 0 was killed by SIGKILL" in stderr and "full log:" in stderr
    died = _events(paths, Event.SERVER_DIED, shard=0)
    assert [(e["pid"], e["restarting"]) for e in died] == [(server["pid"], False)]
    assert not _events(paths, Event.SERVER_RESTART)
    if paths.summary.exists():  # only when the dead shard had left a checkpoint
        summary = json.loads(paths.summary.read_text())
        assert summary["status"] == "server_lost" and summary["lost_servers"] == [0]
    assert all(p["state"] == "exited" for p in _processes(paths).values())
