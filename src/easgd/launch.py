"""Process topology: the local launcher, the per-rank entry point, and torchrun.

``easgd train`` on one machine behaves like a small ``torchrun``: it hosts a ``TCPStore``,
starts S server processes and P worker processes with torchrun's environment variables
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ...) plus one evaluator, watches
them, draws one progress line, and writes the summary. Every process runs the same entry
point, :func:`role_main`, which takes its role from its rank (servers first), so the command
that runs on a laptop runs unchanged under ``torchrun`` on a cluster.

Failure behaviour:

* a server, or any rank of a synchronous run, that exits with an error ends the run: the
  others are stopped and the failing process's error is shown; the exit status is non-zero.
* an asynchronous worker that dies is restarted up to ``max_restarts`` times (it rejoins the
  server with a new session and pulls the center); beyond that the run goes on without it.
* Ctrl-C stops every process.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn

from easgd.config import TrainConfig
from easgd.roles.context import RoleContext
from easgd.runlog import (
    PROGRESS_EVENTS,
    Event,
    JsonlWriter,
    RunPaths,
    atomic_write_json,
    read_jsonl,
)

__all__ = ["RunFailed", "launch_local", "role_main", "run_torchrun"]

log = logging.getLogger(__name__)


class RunFailed(RuntimeError):
    """A process of the run failed unrecoverably; the message carries its error."""


def _connect_store(host: str, port: int, *, is_master: bool, timeout: float) -> Any:
    import torch.distributed as dist

    return dist.TCPStore(
        host, port, is_master=is_master, timeout=datetime.timedelta(seconds=timeout),
        wait_for_workers=False,
    )  # fmt: skip


def _env_store(timeout: float) -> Any:
    """The store of ``env://``: the launcher's (or torchrun agent's), or rank 0 hosts one."""
    import torch.distributed as dist

    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    rank = int(os.environ.get("RANK", "0"))
    store = _connect_store(host, port, is_master=not agent and rank == 0, timeout=timeout)
    # torchrun restarts reuse the store: keep each attempt's keys apart.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"easgd/attempt_{attempt}/", store)


def _context(cfg: TrainConfig, store: Any, start: float) -> RoleContext:
    return RoleContext(
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        store=store,
        paths=RunPaths(cfg.out),
        start=start,
    )


def _run_role(cfg: TrainConfig, ctx: RoleContext, role: str, index: int) -> None:
    if role == "server":
        from easgd.roles.server import run_server

        run_server(cfg, ctx, index)
    elif role == "worker":
        from easgd.roles.worker import run_worker

        run_worker(cfg, ctx, index)
    elif role == "evaluator":
        from easgd.roles.evaluator import run_evaluator

        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        run_evaluator(cfg, ctx, stop)
    else:
        raise ValueError(f"unknown role {role!r}")


def role_main() -> int:
    """Entry point of every process the local launcher starts (``python -m easgd.launch``)."""
    run_dir = Path(os.environ["EASGD_RUN_DIR"])
    cfg = TrainConfig.from_dict(json.loads(RunPaths(run_dir).config.read_text()))
    start = float(os.environ["EASGD_START_TIME"])
    try:
        store = _env_store(cfg.timeout)
        ctx = _context(cfg, store, start)
        role = os.environ.get("EASGD_ROLE")
        if role == "evaluator":
            _run_role(cfg, ctx, "evaluator", 0)
        else:
            name, index = cfg.role_of(ctx.rank)
            _run_role(cfg, ctx, name, index)
    except Exception:
        traceback.print_exc()
        return 1
    return 0


# ------------------------------------------------------------------------------------------
# The local launcher
# ------------------------------------------------------------------------------------------


@dataclass
class _Proc:
    role: str
    index: int
    rank: int
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]
    restarts: int = 0
    finished: bool = False


@dataclass
class _Display:
    """Aggregates metrics.jsonl and eval.jsonl into one progress line."""

    paths: RunPaths
    budget: int | None
    workers: int
    offsets: list[int] = field(default_factory=lambda: [0, 0])
    steps: dict[int, int] = field(default_factory=dict)
    exchanges: dict[tuple[int, int], int] = field(default_factory=dict)
    error: float | None = None
    loss: float | None = None

    def poll(self) -> None:
        events, self.offsets[0] = read_jsonl(self.paths.metrics, self.offsets[0])
        for e in events:
            if e.get("event") not in PROGRESS_EVENTS:
                continue
            self.steps[e["worker"]] = max(self.steps.get(e["worker"], 0), e["step"])
            if "exchanges" in e:
                self.exchanges[(e["worker"], e.get("pid", 0))] = e["exchanges"]
            self.loss = e["loss"]
        evals, self.offsets[1] = read_jsonl(self.paths.eval, self.offsets[1])
        if evals:
            self.error = evals[-1]["test_error"]

    def line(self) -> str:
        done = sum(self.steps.values())
        total = f"/{self.budget * self.workers}" if self.budget else ""
        parts = [f"steps {done}{total}", f"exchanges {sum(self.exchanges.values())}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        if self.error is not None:
            parts.append(f"center test error {self.error:.4f}")
        return "  ".join(parts)


class _Launcher:
    def __init__(self, cfg: TrainConfig, progress: Callable[[str], None] | None) -> None:
        self.cfg = cfg
        self.paths = RunPaths(cfg.out).make()
        self.progress = progress
        self.start = time.time()
        self.store = _connect_store("127.0.0.1", 0, is_master=True, timeout=cfg.timeout)
        self.procs: list[_Proc] = []
        self.events = JsonlWriter(self.paths.metrics)
        self.lost_workers: list[int] = []
        self.restarts = 0

    def env(self, rank: int, role: str | None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            RANK=str(rank), WORLD_SIZE=str(self.cfg.world_size()), LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(self.cfg.world_size()), MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(self.store.port), TORCHELASTIC_USE_AGENT_STORE="True",
            OMP_NUM_THREADS="1", EASGD_RUN_DIR=str(self.paths.root),
            EASGD_START_TIME=repr(self.start), PYTHONUNBUFFERED="1",
        )  # fmt: skip
        if role == "evaluator":
            env["EASGD_ROLE"] = "evaluator"
        return env

    def spawn(self, role: str, index: int, rank: int, restarts: int = 0) -> _Proc:
        log_path = self.paths.log(role, index, restarts)
        log_file = open(log_path, "wb")  # noqa: SIM115 - closed when the process ends
        popen = subprocess.Popen(
            [sys.executable, "-m", "easgd.launch"],
            env=self.env(rank, role if role == "evaluator" else None),
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        proc = _Proc(role, index, rank, popen, log_path, log_file, restarts)
        self.procs.append(proc)
        return proc

    def stop_all(self, grace: float = 5.0) -> None:
        live = [p for p in self.procs if p.popen.poll() is None]
        for p in live:
            p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in live:
            try:
                p.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()
        for p in self.procs:
            p.log_file.close()

    def fail(self, proc: _Proc, rc: int) -> RunFailed:
        self.stop_all()
        tail = proc.log_path.read_text(errors="replace").strip().splitlines()[-25:]
        return RunFailed(
            f"{proc.role} {proc.index} (rank {proc.rank}) exited with status {rc}; "
            f"its log is {proc.log_path}:\n" + "\n".join(tail)
        )

    def watch(self, display: _Display) -> None:
        """Wait for the workers, restarting or failing as the module docstring says."""
        # A worker whose result lives on the servers can die alone; a synchronous rank cannot.
        restartable = bool(self.cfg.servers_used)
        last_draw = 0.0
        while True:
            for proc in list(self.procs):
                rc = proc.popen.poll()
                if rc is None or proc.finished:
                    continue
                proc.finished = True
                if proc.role == "evaluator":
                    if rc != 0:
                        log.warning(
                            "the evaluator exited with status %s; see %s", rc, proc.log_path
                        )
                    continue
                if rc == 0:
                    continue  # a worker that finished, or a server whose workers all did
                if proc.role == "worker" and restartable:
                    self._worker_died(proc, rc)
                    continue
                raise self.fail(proc, rc)
            if not self._workers_running():
                return
            now = time.monotonic()
            if self.progress is not None and now - last_draw > 0.5:
                display.poll()
                self.progress(display.line())
                last_draw = now
            time.sleep(0.05)

    def _workers_running(self) -> bool:
        return any(p.role == "worker" and p.popen.poll() is None for p in self.procs)

    def _worker_died(self, proc: _Proc, rc: int) -> None:
        wall = time.time() - self.start
        if proc.restarts < self.cfg.max_restarts:
            self.restarts += 1
            self.events.write({"event": Event.WORKER_RESTART, "wall": wall, "worker": proc.index,
                               "status": rc, "restart": proc.restarts + 1})  # fmt: skip
            log.warning("worker %d died (status %s); restarting it", proc.index, rc)
            self.spawn("worker", proc.index, proc.rank, proc.restarts + 1)
        else:
            self.lost_workers.append(proc.index)
            self.events.write({"event": Event.WORKER_LOST, "wall": wall, "worker": proc.index,
                               "status": rc})  # fmt: skip
            log.warning("worker %d died (status %s); the run goes on without it", proc.index, rc)

    def run(self) -> dict[str, Any]:
        from easgd.finalize import finalize

        cfg = self.cfg
        atomic_write_json(self.paths.config, cfg.to_dict())
        for rank in range(cfg.world_size()):
            role, index = cfg.role_of(rank)
            self.spawn(role, index, rank)
        self.spawn("evaluator", 0, -1)
        display = _Display(self.paths, None, cfg.workers)
        try:
            self.watch(display)
            # Workers are done: servers save and stop, the evaluator takes its last look.
            for p in self.procs:
                if p.role == "server":
                    try:
                        p.popen.wait(cfg.timeout)
                    except subprocess.TimeoutExpired:
                        p.popen.send_signal(signal.SIGTERM)
                        p.popen.wait(cfg.timeout)
                    if p.popen.returncode != 0:
                        raise self.fail(p, p.popen.returncode)
            wall = time.time() - self.start
        finally:
            self.stop_all()
            self.events.close()
        return finalize(
            cfg, self.paths, wall, lost_workers=self.lost_workers, restarts=self.restarts
        )


def launch_local(cfg: TrainConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run ``cfg`` on this machine in separate processes; returns the summary."""
    return _Launcher(cfg, progress).run()


def run_torchrun(cfg: TrainConfig) -> dict[str, Any] | None:
    """Run this process's role under ``torchrun``; rank 0 returns the summary.

    Rank 0 also owns the run directory: it writes the configuration, starts the evaluator
    as a child process, and writes the summary once every rank is done.
    """
    world = int(os.environ["WORLD_SIZE"])
    if world != cfg.world_size():
        servers = f"{cfg.servers} servers + " if cfg.servers_used else ""
        raise ValueError(
            f"torchrun started WORLD_SIZE={world} processes but the run needs "
            f"{servers}{cfg.workers} workers = {cfg.world_size()}; set --nproc-per-node "
            "(times --nnodes) to that, or change --workers/--servers"
        )
    store = _env_store(cfg.timeout)
    rank = int(os.environ["RANK"])
    if rank == 0:
        RunPaths(cfg.out).make()
        atomic_write_json(RunPaths(cfg.out).config, cfg.to_dict())
        store.set("easgd/start", repr(time.time()))
    store.wait(["easgd/start"], datetime.timedelta(seconds=cfg.timeout))
    start = float(store.get("easgd/start").decode())
    ctx = _context(cfg, store, start)
    evaluator = None
    if rank == 0:
        env = dict(os.environ, EASGD_ROLE="evaluator", EASGD_RUN_DIR=str(ctx.paths.root),
                   EASGD_START_TIME=repr(start), OMP_NUM_THREADS="1")  # fmt: skip
        log_file = open(ctx.paths.log("evaluator", 0), "wb")  # noqa: SIM115
        evaluator = subprocess.Popen([sys.executable, "-m", "easgd.launch"], env=env,
                                     stdout=log_file, stderr=subprocess.STDOUT)  # fmt: skip
    role, index = cfg.role_of(rank)
    try:
        _run_role(cfg, ctx, role, index)
        if rank != 0:
            return None
        # Rank 0 waits for every worker (and server) before summarizing.
        while int(store.add("easgd/workers_done", 0)) < cfg.workers:
            time.sleep(0.1)
        if cfg.servers_used:
            keys = [f"easgd/server_saved/{s}" for s in range(cfg.servers)]
            store.wait(keys, datetime.timedelta(seconds=cfg.timeout))
        from easgd.finalize import finalize

        return finalize(cfg, ctx.paths, time.time() - start)
    finally:
        if evaluator is not None:
            evaluator.send_signal(signal.SIGTERM)
            try:
                evaluator.wait(30)
            except subprocess.TimeoutExpired:
                evaluator.kill()


def exit_now(code: int) -> NoReturn:
    """Exit without C++ static destructors: gloo's threads can abort the process at
    interpreter teardown ("terminate called without an active exception") after a clean run."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(role_main())
