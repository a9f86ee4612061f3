"""Process topology: the local launcher, the per-rank entry point, and torchrun.

``easgd train`` on one machine behaves like a small ``torchrun``: it hosts a ``TCPStore``,
starts S server processes and P worker processes with torchrun's environment variables
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ...) plus one evaluator, watches
them, draws one progress line, and writes the summary. Every process runs the same entry
point, :func:`role_main`, which takes its role from its rank (servers first), so the command
that runs on a laptop runs unchanged under ``torchrun`` on a cluster.

Failure behaviour (the local launcher):

* an asynchronous worker that dies is restarted up to ``max_restarts`` times (it rejoins the
  servers with a new session and pulls the center); beyond that the run goes on without it:
  the launcher tells every server shard so (an authenticated CONTROL message, never a
  store key a stranger could write), so the servers stop as soon as every live worker is
  done. A run that lost every worker raises :class:`RunFailed`.
* a server shard that dies is restarted the same way, with the same rank and
  ``EASGD_RESTART=k``: it resumes from its checkpoint and publishes its new address under
  the same store key. Worker restarts wait until every shard serves again. A shard dead
  beyond its restarts ends the run: the others are stopped and the failing process's error
  is raised (:class:`RunFailed`).
* a synchronous rank that dies (``--mode sync``, local SGD, all-reduce SGD) stops the whole
  group: under ``max_restarts`` every rank is started again (a ``group_restart`` event) on
  a fresh store, from the last step at which every rank saved its state
  (``checkpoints/worker-<i>.pt``; from step 0 when one has none), so the run ends bitwise
  equal to an uninterrupted one; beyond ``max_restarts`` group restarts the run fails.
* ``processes.json`` names every process (pid, address, restarts, state), rewritten
  whenever one starts, exits or publishes its address.
* Ctrl-C stops every process.

Resuming (``launch_local(cfg, resume=True)``, ``easgd train --resume``): every role starts
from the run directory's checkpoints: each worker from ``checkpoints/worker-<i>.pt``
(``RESUME_ENV``), each server shard from its ``server-<s>.pt`` (started as a restart,
``EASGD_RESTART=1``). The run's clock goes on from the last event of the part before (so
snapshots and events keep their order), metrics, evaluations and logs are appended to, and
a ``run_resume`` event marks where the resumed part begins.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from easgd.config import TrainConfig
from easgd.roles.context import PARENT_ENV, SECRET_ENV, RoleContext
from easgd.roles.server import RESTART_ENV, server_pid_key
from easgd.roles.worker import DIVERGED_EXIT, RESUME_ENV, DivergedError
from easgd.runlog import (
    PROGRESS_EVENTS,
    Event,
    JsonlWriter,
    RunPaths,
    RunStatus,
    atomic_write_json,
    previous_checkpoint,
    read_jsonl,
    update_summary,
)
from easgd.runlog.tensorboard import TensorBoardFollower, follow
from easgd.spawner import Child, shared

__all__ = ["RunFailed", "launch_local", "role_main", "run_torchrun"]

log = logging.getLogger(__name__)


#: ``easgd train``'s exit status for each way a run can end badly (0: completed).
EXIT_FAILED = 1  # a process failed for good, every worker was lost, the center was lost
EXIT_DIVERGED = 3  # the training loss (or the final center) was not finite
#: Interrupted: 128 + the signal's number, as a shell reports a process a signal ended.
EXIT_INTERRUPTED: dict[int, int] = {signal.SIGINT: 130, signal.SIGTERM: 143}


class RunFailed(RuntimeError):
    """The run did not do what was asked; the message is one line: the cause and a log.

    ``status``: what happened (:class:`easgd.runlog.RunStatus`; None for a failed
    synchronous rank); ``summary``: the summary written despite the failure, or None;
    ``exit_status``: the status the command ends with.
    """

    def __init__(
        self,
        message: str,
        *,
        status: RunStatus | None = None,
        summary: dict[str, Any] | None = None,
        exit_status: int = EXIT_FAILED,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.summary = summary
        self.exit_status = exit_status


class Interrupted(BaseException):
    """SIGINT or SIGTERM reached the launcher (raised by its signal handler)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def log_cause(path: Path) -> str:
    """The one-line cause a process's log ends with (a traceback's last line), or ''."""
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        line = line.strip()
        if line and not line.startswith(("File ", "^", "~")):
            return line if len(line) <= 400 else line[:397] + "..."
    return ""


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
    except DivergedError as exc:
        print(f"{type(exc).__name__}: {exc}", flush=True)  # the launcher's one line
        return DIVERGED_EXIT
    except Exception:
        traceback.print_exc()  # the log keeps the traceback; its last line is the cause
        return 1
    return 0


# ------------------------------------------------------------------------------------------
# The local launcher
# ------------------------------------------------------------------------------------------


@dataclass
class _Proc:
    """One process of the run: its role, its current process, and what the launcher knows."""

    role: str
    index: int
    rank: int
    popen: Child  # easgd.spawner's: the part of subprocess.Popen used here, plus killpg
    log_path: Path
    restarts: int = 0
    finished: bool = False
    host: str | None = None  # a server's published address, once the launcher has read it
    port: int | None = None

    @property
    def serving(self) -> bool:
        """A server that runs and has published its address (the workers can reach it)."""
        return self.port is not None and self.popen.poll() is None

    def entry(self, root: Path, here: str) -> dict[str, Any]:
        """Its entry in ``processes.json`` (easgd.runlog.PROCESS_FIELDS)."""
        status = self.popen.poll()
        if status is not None:
            state = "exited"
        elif self.role == "server" and self.port is None:
            state = "starting"
        else:
            state = "running"
        return {
            "role": self.role, "index": self.index, "rank": self.rank, "pid": self.popen.pid,
            "host": self.host or here, "port": self.port, "restarts": self.restarts,
            "state": state, "status": status, "log": str(self.log_path.relative_to(root)),
        }  # fmt: skip


@dataclass
class _Display:
    """Aggregates metrics.jsonl and eval.jsonl into one progress line.

    Two phases: start-up (until a worker's first step: which workers train yet), then
    training (steps of the budget, exchanges, loss, the center's test error and an ETA from
    the step rate, or from the time budget).
    """

    paths: RunPaths
    budget: int | None  # local steps per worker (None: only a time budget)
    workers: int
    time_budget: float | None = None
    offsets: list[int] = field(default_factory=lambda: [0, 0])
    steps: dict[int, int] = field(default_factory=dict)
    exchanges: dict[tuple[int, int], int] = field(default_factory=dict)
    waiting: dict[int, set[int]] = field(default_factory=dict)  # shard -> workers that lost it
    started: set[int] = field(default_factory=set)  # workers that took their first step
    first_step: float | None = None  # monotonic time a first train_start was seen
    first_done = 0  # steps done then (a resumed run starts from its saved steps)
    error: float | None = None
    loss: float | None = None
    diverged = False

    @property
    def training(self) -> bool:
        return self.first_step is not None

    def poll(self) -> None:
        events, self.offsets[0] = read_jsonl(self.paths.metrics, self.offsets[0])
        for e in events:
            kind = e.get("event")
            if kind == Event.TRAIN_START:
                self.started.add(e["worker"])
                self.steps[e["worker"]] = max(self.steps.get(e["worker"], 0), e["step"])
                if self.first_step is None:
                    self.first_step = time.monotonic()
                    self.first_done = sum(self.steps.values())
            elif kind == Event.DIVERGED:
                self.diverged = True
            elif kind == Event.SERVER_LOST:
                self.waiting.setdefault(e["shard"], set()).add(e["worker"])
            elif kind in (Event.SERVER_BACK, Event.WORKER_DONE):
                for shard, workers in self.waiting.items():
                    if kind == Event.WORKER_DONE or shard == e["shard"]:
                        workers.discard(e["worker"])
            if kind not in PROGRESS_EVENTS:
                continue
            self.steps[e["worker"]] = max(self.steps.get(e["worker"], 0), e["step"])
            if "exchanges" in e:
                self.exchanges[(e["worker"], e.get("pid", 0))] = e["exchanges"]
            self.loss = e["loss"] if e["loss"] is not None else math.nan
        evals, self.offsets[1] = read_jsonl(self.paths.eval, self.offsets[1])
        if evals:
            self.error = evals[-1]["test_error"]

    def eta(self) -> float | None:
        """Seconds of training left: from the step rate, or what the time budget leaves."""
        if self.first_step is None:
            return None
        elapsed = time.monotonic() - self.first_step
        left: list[float] = []
        if self.time_budget is not None:
            left.append(max(0.0, self.time_budget - elapsed))
        done = sum(self.steps.values())
        if self.budget is not None and done > self.first_done and elapsed > 0:
            rate = (done - self.first_done) / elapsed
            left.append(max(0, self.budget * self.workers - done) / rate)
        return min(left, default=None)

    def line(self, notes: list[str] | None = None, starting: str = "") -> str:
        if not self.training:
            parts = ["starting", *([starting] if starting else []),
                     f"workers training {len(self.started)}/{self.workers}"]  # fmt: skip
        else:
            done = sum(self.steps.values())
            parts = [f"steps {done}"]
            if self.budget:
                total = self.budget * self.workers
                parts[0] += f"/{total} ({100 * min(done, total) / total:.0f}%)"
            parts.append(f"exchanges {sum(self.exchanges.values())}")
            if self.loss is not None:
                parts.append(f"loss {_number(self.loss)}")
            if self.diverged:
                parts.append("DIVERGED (non-finite loss)")
            if self.error is not None:
                parts.append(f"center test error {self.error:.4f}")
            eta = self.eta()
            if eta is not None:
                parts.append(f"ETA {_duration(eta)}")
        parts.extend(notes or [])
        for shard, workers in sorted(self.waiting.items()):
            if workers:
                who = ",".join(str(w) for w in sorted(workers))
                parts.append(f"worker{'s' if len(workers) > 1 else ''} {who} waiting for server "
                             f"{shard}")  # fmt: skip
        return "  ".join(parts)


def _number(x: float) -> str:
    """A loss for the progress line: 3 significant digits, scientific when small or large."""
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3f}" if 1e-2 <= abs(x) < 1e4 else f"{x:.2e}"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _Launcher:
    """Starts the run's processes, supervises them, and writes what happened.

    Supervision: a dead asynchronous worker or server shard is started again with the same
    rank up to ``max_restarts`` times (each process its own budget); a worker's restart
    waits until every server shard is serving, so that it dials a live address.
    ``processes.json`` is rewritten whenever a process starts, exits or publishes its
    address.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        progress: Callable[[str], None] | None,
        resume: bool = False,
        budget: int | None = None,
    ) -> None:
        import torch.distributed as dist

        # Every process of the run is a fork of the spawner's fork server: easgd train has
        # forked it from this process already (warm(fork=True), before any thread); called
        # from a library, an interpreter of its own starts now, before the store's thread.
        self.spawner = shared()
        self.spawner.warm()
        self.cfg = cfg
        self.budget = budget if budget is not None else cfg.steps
        self.paths = RunPaths(cfg.out).make()
        self.progress = progress
        self.resume = resume
        # A resumed run's clock goes on from where the part before stopped.
        self.previous_wall = _last_wall(self.paths) if resume else 0.0
        self.start = time.time() - self.previous_wall
        self.master = _connect_store("127.0.0.1", 0, is_master=True, timeout=cfg.timeout)
        # The roles' view of the store (launch._env_store): the first and only attempt.
        self.store = dist.PrefixStore("easgd/attempt_0/", self.master)
        self.procs: list[_Proc] = []  # every process started, restarts included
        self.current: dict[tuple[str, int], _Proc] = {}  # the latest process of each role
        self.pending: list[_Proc] = []  # dead workers to restart once every server serves
        self.events = JsonlWriter(self.paths.metrics)
        self.here = socket.gethostname()
        self.lost_workers: list[int] = []
        self.finished_workers: set[int] = set()
        self.lost_servers: list[int] = []
        self.restarts = 0
        self.server_restarts = 0
        self.group_restarts = 0  # synchronous runs: the whole group started again
        # Every connection to the servers is authenticated, on loopback too: the user's
        # EASGD_SECRET, or a fresh random one for this run (only the run's processes get it,
        # in their environment; it is never written to a file or a log).
        self.secret = os.environ.get(SECRET_ENV) or secrets.token_hex(32)
        self.worker_port = self.master.port  # the store the workers' process group uses
        self.stores = [self.master]  # every store a group was started on (kept open)
        self.group_resume = resume  # the workers started next continue from checkpoints
        self.diverged = False
        self.first_loss = ""  # the exit line of the first worker lost for good
        self.interrupted: int | None = None  # the signal that stopped the run
        self.stopping = False  # past the point where a signal may cut the run short
        #: Called once, when the display first sees a worker training.
        self.on_training: Callable[[], None] | None = None
        #: Follows metrics.jsonl and eval.jsonl into TensorBoard (--tensorboard), or None.
        self.tensorboard: TensorBoardFollower | None = None

    def env(self, rank: int, role: str | None, restart: int) -> dict[str, str]:
        env = dict(os.environ)
        is_worker = role is None and self.cfg.role_of(rank)[0] == "worker"
        port = self.worker_port if is_worker else self.master.port
        env.update(
            RANK=str(rank), WORLD_SIZE=str(self.cfg.world_size()), LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(self.cfg.world_size()), MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True",
            OMP_NUM_THREADS="1", EASGD_RUN_DIR=str(self.paths.root),
            EASGD_START_TIME=repr(self.start), PYTHONUNBUFFERED="1",
        )  # fmt: skip
        env[SECRET_ENV] = self.secret
        # A resumed run's servers start from their checkpoints, as a restarted shard does.
        resumed_server = self.resume and restart == 0 and self.cfg.role_of(rank)[0] == "server"
        env[RESTART_ENV] = str(1 if resumed_server and role is None else restart)
        if self.resume or (is_worker and self.group_resume):
            env[RESUME_ENV] = "1"
        if role == "evaluator":
            env["EASGD_ROLE"] = "evaluator"
            # It stops when its parent is gone: the fork server, which dies with this process.
            env[PARENT_ENV] = str(self.spawner.parent_pid)
        return env

    def spawn(self, role: str, index: int, rank: int, restarts: int = 0) -> _Proc:
        log_path = self.paths.log(role, index, restarts)
        # Its own process group (every child of the spawner leads one): a terminal's Ctrl-C
        # reaches the launcher only, which stops every process itself (stop_all), the whole
        # group of each. A resumed run appends to the logs of the part before.
        env = self.env(rank, role if role == "evaluator" else None, restarts)
        popen = self.spawner.start(env, log_path, append=self.resume)
        proc = _Proc(role, index, rank, popen, log_path, restarts)
        self.procs.append(proc)
        self.current[(role, index)] = proc
        # Listed as soon as it runs: a process may act (exchange, fail) before the next one
        # has started, and whoever reads the file (a user, a test) then finds it there.
        self.write_processes()
        return proc

    def stop_all(self, grace: float = 5.0) -> None:
        """Stop every process: SIGTERM to its group, then SIGKILL after ``grace`` seconds.

        Servers save their checkpoint on SIGTERM (so an interrupted run can be resumed);
        whatever is still alive at the deadline is killed. Returns once every process of
        the run has been reaped.
        """
        self.pending.clear()
        live = [p for p in self.procs if p.popen.poll() is None]
        for p in live:
            p.popen.killpg(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in live:
            try:
                p.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s %d did not stop within %.0f s of SIGTERM; killing it",
                            p.role, p.index, grace)  # fmt: skip
                p.popen.killpg(signal.SIGKILL)
                p.popen.wait()

    def fail(self, proc: _Proc, rc: int, status: RunStatus | None = None) -> RunFailed:
        self.stop_all()
        return RunFailed(_exit_line(proc, rc), status=status)

    def write_processes(self) -> None:
        """Rewrite ``processes.json`` (atomically): every role's current process."""
        atomic_write_json(self.paths.processes, {
            "wall": time.time() - self.start,
            "launcher": {"pid": os.getpid(), "host": self.here},
            "store": f"127.0.0.1:{self.master.port}",
            "processes": [p.entry(self.paths.root, self.here) for p in self.current.values()],
        })  # fmt: skip

    def _starting(self) -> str:
        """The start-up phase in words: how many server shards serve yet."""
        servers = self._servers()
        if not servers:
            return ""
        return f"servers serving {sum(p.serving for p in servers)}/{len(servers)}"

    def notes(self) -> list[str]:
        """What the progress line says about the servers and the waiting workers."""
        out = [
            f"server {p.index} restarting"
            for p in self._servers()
            if p.restarts > 0 and not p.serving and not p.finished
        ]
        if self.pending:
            who = ",".join(str(p.index) for p in self.pending)
            out.append(f"worker {who} restarts when the servers are back")
        return out

    def watch(self, display: _Display) -> None:
        """Supervise until the workers are done and the servers stopped (module docstring)."""
        last_draw = 0.0
        ended: float | None = None  # when the last worker ended (monotonic)
        while True:
            changed = self._learn_addresses()
            exited = []
            for proc in list(self.current.values()):
                rc = proc.popen.poll()
                if rc is None or proc.finished:
                    continue
                proc.finished = changed = True
                exited.append((proc, rc))
            # A diverged worker ends the run, before anyone is restarted: its synchronous
            # peers fail at their next collective because of it, not on their own.
            for proc, rc in exited:
                if proc.role == "worker" and rc == DIVERGED_EXIT:
                    raise self._diverged(proc)
            for proc, rc in exited:
                if self.current.get((proc.role, proc.index)) is proc:  # not replaced since
                    self._exited(proc, rc)
            changed = self._restart_pending() or changed
            if changed:
                self.write_processes()
            if self._workers_left():
                ended = None
            else:
                # Servers stop by themselves once every live worker is done (roles.server).
                ended = time.monotonic() if ended is None else ended
                live = [p for p in self._servers() if p.popen.poll() is None]
                if not live and all(p.finished for p in self._servers()):
                    return
                waited = time.monotonic() - ended
                if live and waited > 2 * self.cfg.timeout:
                    raise self.fail(live[0], -1)
                if waited > self.cfg.timeout:
                    for p in live:
                        p.popen.send_signal(signal.SIGTERM)
            now = time.monotonic()
            if now - last_draw > 0.5:
                display.poll()
                if self.tensorboard is not None:
                    self.tensorboard.poll()  # never raises: a failure only ends the logging
                if display.training and self.on_training is not None:
                    self.on_training()  # e.g. the replaced run of --overwrite may go now
                    self.on_training = None
                if self.progress is not None:
                    self.progress(display.line(self.notes(), self._starting()))
                last_draw = now
            time.sleep(0.05)

    def _diverged(self, proc: _Proc) -> RunFailed:
        self.diverged = True
        self.stop_all()
        cause = log_cause(proc.log_path).removeprefix(f"{DivergedError.__name__}: ")
        return RunFailed(f"{cause or 'the run diverged'} (full log: {proc.log_path})",
                         status=RunStatus.DIVERGED, exit_status=EXIT_DIVERGED)  # fmt: skip

    def _exited(self, proc: _Proc, rc: int) -> None:
        if proc.role == "evaluator":
            if rc != 0:
                log.warning("the evaluator exited with status %s; see %s", rc, proc.log_path)
            return
        if rc == 0:  # a worker that finished, or a server whose workers all did
            if proc.role == "worker" and self.cfg.servers_used:
                self.finished_workers.add(proc.index)
                self._tell_servers({"finished": [proc.index]})
            return
        # A worker whose result lives on the servers can die alone; a synchronous rank cannot.
        if proc.role == "worker" and self.cfg.servers_used:
            self._worker_died(proc, rc)
        elif proc.role == "server":
            self._server_died(proc, rc)
        elif proc.role == "worker" and self.group_restarts < self.cfg.max_restarts:
            self._restart_group(proc, rc)
        else:
            raise self.fail(proc, rc)

    def _restart_group(self, dead: _Proc, rc: int) -> None:
        """A synchronous rank died: stop the others, start every rank again from its state.

        The group starts on a fresh store (gloo's keys of the dead group must not be seen),
        and from the workers' checkpoints when every worker has one (else from step 0: the
        same run, from its start).
        """
        self.group_restarts += 1
        self.restarts += 1
        workers = [p for p in self.current.values() if p.role == "worker"]
        # The others fail at their next collective: name the one a signal killed, if any.
        killed = [p for p in workers if (p.popen.poll() or 0) < 0]
        if killed and dead not in killed:
            dead, rc = killed[0], killed[0].popen.wait()  # it has ended: its status
        for p in workers:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGKILL)  # blocked in a collective: no grace
            p.popen.wait()
            p.finished = True
        resume = all(
            self.paths.worker_checkpoint(i).exists()
            or previous_checkpoint(self.paths.worker_checkpoint(i)).exists()
            for i in range(self.cfg.workers)
        )
        self.events.write({"event": Event.GROUP_RESTART, "wall": time.time() - self.start,
                           "worker": dead.index, "status": rc, "restart": self.group_restarts,
                           "resumed": resume})  # fmt: skip
        log.warning("worker %d died (status %s); restarting the group %s", dead.index, rc,
                    "from its checkpoints" if resume else "from step 0")  # fmt: skip
        store = _connect_store("127.0.0.1", 0, is_master=True, timeout=self.cfg.timeout)
        self.stores.append(store)
        self.worker_port, self.group_resume = store.port, resume
        for p in workers:
            self.spawn("worker", p.index, p.rank, self.group_restarts)

    def _servers(self) -> list[_Proc]:
        return [p for p in self.current.values() if p.role == "server"]

    def _workers_left(self) -> bool:
        running = any(p.role == "worker" and p.popen.poll() is None for p in self.current.values())
        return running or bool(self.pending)

    def _learn_addresses(self) -> bool:
        """Read the address of every server that published one since the last look."""
        learned = False
        for p in self._servers():
            if p.port is not None or p.popen.poll() is not None:
                continue
            key = server_pid_key(p.index)
            if not self.store.check([key]) or int(self.store.get(key)) != p.popen.pid:
                continue  # not yet published, or still the dead predecessor's
            host, port = self.store.get(f"easgd/server/{p.index}").decode().rsplit(":", 1)
            p.host, p.port, learned = host, int(port), True
            if p.restarts and (self.lost_workers or self.finished_workers):
                # A restarted shard knows nothing of the workers that ended before it.
                self._tell_servers({"lost": sorted(set(self.lost_workers)),
                                    "finished": sorted(self.finished_workers)}, [p])  # fmt: skip
        return learned

    def _tell_servers(self, message: dict[str, Any], servers: list[_Proc] | None = None) -> None:
        """Send an authenticated CONTROL message to every serving shard (the servers decide
        the end of the run from these and the workers' goodbyes, never from the store)."""
        from easgd.comm.ps_client import send_control

        for p in self._servers() if servers is None else servers:
            if not p.serving or p.host is None or p.port is None:
                continue  # a shard still restarting is told when it serves (_learn_addresses)
            try:
                send_control((p.host, p.port), message, secret=self.secret,
                             timeout=self.cfg.timeout)  # fmt: skip
            except (ConnectionError, ValueError, RuntimeError, PermissionError) as exc:
                if not message.get("lost"):
                    # Only "finished": the worker said goodbye itself before it exited, and a
                    # server whose workers are all done may already be closing (a race, not
                    # a fault): nothing the server lacks.
                    log.debug("could not tell server %d %s: %s", p.index, message, exc)
                    continue
                log.warning("could not tell server %d %s: %s", p.index, message, exc)

    def _worker_died(self, proc: _Proc, rc: int) -> None:
        wall = time.time() - self.start
        if proc.restarts < self.cfg.max_restarts:
            self.restarts += 1
            self.events.write({"event": Event.WORKER_RESTART, "wall": wall, "worker": proc.index,
                               "status": rc, "restart": proc.restarts + 1})  # fmt: skip
            log.warning("%s; restarting it", _exit_line(proc, rc))
            self.pending.append(proc)
        else:
            self.lost_workers.append(proc.index)
            # The servers count lost workers with finished ones: nobody waits for this one.
            self._tell_servers({"lost": [proc.index]})
            self.events.write({"event": Event.WORKER_LOST, "wall": wall, "worker": proc.index,
                               "status": rc})  # fmt: skip
            line = _exit_line(proc, rc)
            self.first_loss = self.first_loss or line
            log.warning("%s; the run goes on without it", line)

    def _restart_pending(self) -> bool:
        """Start the pending worker restarts once every server is serving."""
        if not self.pending or not all(p.serving for p in self._servers()):
            return False
        for proc in self.pending:
            self.spawn("worker", proc.index, proc.rank, proc.restarts + 1)
        self.pending.clear()
        return True

    def _server_died(self, proc: _Proc, rc: int) -> None:
        restarting = proc.restarts < self.cfg.max_restarts
        self.events.write({"event": Event.SERVER_DIED, "wall": time.time() - self.start,
                           "shard": proc.index, "pid": proc.popen.pid, "status": rc,
                           "restarting": restarting})  # fmt: skip
        if not restarting:
            self.lost_servers.append(proc.index)
            raise self.fail(proc, rc, RunStatus.SERVER_LOST)
        self.server_restarts += 1
        log.warning("%s; restarting it", _exit_line(proc, rc))
        self.spawn("server", proc.index, proc.rank, proc.restarts + 1)

    def status(self) -> RunStatus:
        if self.interrupted is not None:
            return RunStatus.INTERRUPTED
        if self.diverged:
            return RunStatus.DIVERGED
        if self.lost_servers:
            return RunStatus.SERVER_LOST
        if self.lost_workers and len(set(self.lost_workers)) >= self.cfg.workers:
            return RunStatus.ALL_WORKERS_LOST
        return RunStatus.WORKERS_LOST if self.lost_workers else RunStatus.COMPLETED

    def _on_signal(self, signum: int, _frame: Any) -> None:
        """SIGINT/SIGTERM: stop the run (once; later ones only hurry nothing, they wait)."""
        if self.interrupted is None and not self.stopping:
            self.interrupted = signum
            raise Interrupted(signum)
        log.warning("%s: already stopping the run", signal.Signals(signum).name)

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        handlers = _catch_signals(self._on_signal)
        failure: RunFailed | None = None
        display = _Display(self.paths, self.budget, cfg.workers, cfg.time_budget)
        if cfg.tensorboard is not None:
            self.tensorboard = follow(self.paths.root, cfg.tensorboard, self.start)
        try:
            atomic_write_json(self.paths.config, cfg.to_dict())
            if self.resume:
                self.events.write({"event": Event.RUN_RESUME, "wall": time.time() - self.start,
                                   "previous_wall": self.previous_wall, "steps": cfg.steps,
                                   "epochs": cfg.epochs,
                                   "time_budget": cfg.time_budget})  # fmt: skip
            for rank in range(cfg.world_size()):
                role, index = cfg.role_of(rank)
                self.spawn(role, index, rank)
            self.spawn("evaluator", 0, -1)
            self.watch(display)
        except RunFailed as exc:
            failure = exc
        except Interrupted as exc:
            failure = self._interruption(exc.signum, display)
        finally:
            self.stopping = True  # a signal from here on must not cut the cleanup short
            wall = time.time() - self.start
            self.stop_all()
            self.write_processes()
            self.events.close()
            _restore_signals(handlers)
            display.poll()  # a short run may end before the watch saw its first step
            if display.training and self.on_training is not None:
                self.on_training()
                self.on_training = None
        if failure is not None:
            if failure.status in (RunStatus.SERVER_LOST, RunStatus.DIVERGED,
                                  RunStatus.INTERRUPTED):  # fmt: skip
                failure.summary = self._finalize(wall, strict=False)
            self._close_tensorboard()
            raise failure
        try:
            summary = self._finalize(wall, strict=True)
        finally:
            self._close_tensorboard()  # the final evaluations are in eval.jsonl now
        assert summary is not None
        if summary["status"] == RunStatus.DIVERGED:  # the final center is not finite
            raise RunFailed(
                "the final center is not finite: the run diverged; lower --lr",
                status=RunStatus.DIVERGED, summary=summary, exit_status=EXIT_DIVERGED,
            )  # fmt: skip
        if summary["status"] == RunStatus.ALL_WORKERS_LOST:
            raise RunFailed(
                f"every worker died beyond --max-restarts {cfg.max_restarts} (workers "
                f"{_names(self.lost_workers)}); the first: {self.first_loss}",
                status=RunStatus.ALL_WORKERS_LOST, summary=summary,
            )  # fmt: skip
        return summary

    def _close_tensorboard(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def _interruption(self, signum: int, display: _Display) -> RunFailed:
        """The run was interrupted: record it; the caller stops every process."""
        self.stopping = True
        name = signal.Signals(signum).name
        display.poll()
        self.events.write({"event": Event.RUN_INTERRUPTED, "wall": time.time() - self.start,
                           "signal": name, "training": display.training})  # fmt: skip
        return RunFailed(
            f"interrupted by {name}; every process of the run was stopped. Continue it with "
            f"--resume {self.paths.root}, or replace it with --overwrite",
            status=RunStatus.INTERRUPTED, exit_status=EXIT_INTERRUPTED.get(signum, 128 + signum),
        )  # fmt: skip

    def _finalize(self, wall: float, *, strict: bool) -> dict[str, Any] | None:
        """The summary; ``strict=False``: None (and a warning) when it cannot be made."""
        from easgd.finalize import NoFinalCenterError, finalize

        extra = {"status": self.status().value, "lost_workers": self.lost_workers,
                 "lost_servers": self.lost_servers, "restarts": self.restarts,
                 "server_restarts": self.server_restarts}  # fmt: skip
        try:
            return finalize(self.cfg, self.paths, wall, **extra)
        except NoFinalCenterError as exc:
            # The summary is written (null center, the files skipped and why): say so.
            if not strict:  # the run failed already: keep that failure, and this summary
                return exc.summary
            summary = update_summary(self.paths, status=RunStatus.CENTER_LOST.value)
            raise RunFailed(
                f"{exc}; the summary {self.paths.summary} lists the files skipped",
                status=RunStatus.CENTER_LOST,
                summary=summary,
            ) from None
        except Exception as exc:
            if strict:
                raise
            log.warning("no summary for the failed run in %s: %s", self.paths.root, exc)
            return None


def _last_wall(paths: RunPaths) -> float:
    """The wall of the last event of ``metrics.jsonl`` and ``eval.jsonl`` (0 if none)."""
    walls = [float(e["wall"]) for f in (paths.metrics, paths.eval) for e in read_jsonl(f, 0)[0]
             if isinstance(e.get("wall"), int | float)]  # fmt: skip
    return max(walls, default=0.0)


def _names(indices: list[int]) -> str:
    return ", ".join(str(i) for i in sorted(set(indices)))


def _exit_line(proc: _Proc, rc: int) -> str:
    """One line: which process ended how, its log's last line (the cause), and its log."""
    cause = log_cause(proc.log_path)
    how = f"was killed by {signal.Signals(-rc).name}" if rc < 0 and -rc in _SIGNALS else (
        f"exited with status {rc}")  # fmt: skip
    return (f"{proc.role} {proc.index} {how}" + (f": {cause}" if cause else "")
            + f" (full log: {proc.log_path})")  # fmt: skip


_SIGNALS = {s.value for s in signal.Signals}


def _catch_signals(handler: Callable[[int, Any], None]) -> dict[int, Any] | None:
    """Route SIGINT and SIGTERM to ``handler``; returns the previous handlers (None: not the
    main thread, where Python cannot set them)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(handlers: dict[int, Any] | None) -> None:
    for sig, previous in (handlers or {}).items():
        signal.signal(sig, previous)


def launch_local(
    cfg: TrainConfig,
    progress: Callable[[str], None] | None = None,
    *,
    resume: bool = False,
    budget: int | None = None,
    on_training: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run ``cfg`` on this machine in separate processes; returns the summary.

    ``resume``: continue the run in ``cfg.out`` from its checkpoints (module docstring).
    ``budget``: local steps per worker, for the progress line's total and ETA (default:
    ``cfg.steps``). ``on_training``: called once, when the first worker has taken its
    first step (``easgd train --overwrite`` deletes the run it replaces then).

    Raises :class:`RunFailed` when the run did not do what was asked: a process failed for
    good (a server shard beyond its restarts, a synchronous rank), every worker was lost,
    the run diverged, or SIGINT/SIGTERM interrupted it (every process is stopped first).
    Its ``status`` says which, its ``summary`` is the summary written, if any, and its
    ``exit_status`` the command's exit status.
    """
    launcher = _Launcher(cfg, progress, resume, budget)
    launcher.on_training = on_training
    return launcher.run()


def _check_groups_on_nodes(cfg: TrainConfig) -> None:
    """Under torchrun a group (``--group-size``) lies on one node: its ranks share a node's
    fast link, and only its leader crosses the slow one (easgd.roles.group)."""
    g = cfg.group_size
    if g == 1:
        return
    if cfg.servers_used:
        raise ValueError(
            f"--group-size {g} with --mode async under torchrun: the servers count every "
            "worker's goodbye and only a group's leader has a session, which the local "
            "launcher makes up for; under torchrun use --mode sync with groups"
        )
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or cfg.workers
    if local % g:
        raise ValueError(
            f"--group-size {g} under torchrun with LOCAL_WORLD_SIZE={local}: a group's ranks "
            f"must lie on one node; give a divisor of {local} (--group-size node: {local})"
        )


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
    _check_groups_on_nodes(cfg)
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
        spawner = shared()  # easgd train forked its fork server before the store existed
        env = dict(os.environ, EASGD_ROLE="evaluator", EASGD_RUN_DIR=str(ctx.paths.root),
                   EASGD_START_TIME=repr(start), OMP_NUM_THREADS="1",
                   **{PARENT_ENV: str(spawner.parent_pid)})  # fmt: skip
        evaluator = spawner.start(env, ctx.paths.log("evaluator", 0))
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

        summary = finalize(cfg, ctx.paths, time.time() - start)
        if cfg.tensorboard is not None:  # under torchrun written at the end, by rank 0
            follower = follow(ctx.paths.root, cfg.tensorboard, start)
            if follower is not None:
                follower.close()
        return summary
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
