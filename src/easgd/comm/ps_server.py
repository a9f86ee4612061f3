"""The parameter server process: one shard of the center, its sessions, checkpoints and stats.

:class:`ParameterServer` owns the center shard and everything shared between sessions (the
lock, the clock, the counters, the event sink); it accepts connections and hands each one
to a :class:`easgd.comm.ps_session.Session` thread, which speaks the protocol and reaches
the server only through the methods of :class:`easgd.comm.ps_session.SessionHost`.
:func:`serve` runs one server as a process. The design and the failure behaviour are
described in :mod:`easgd.comm.ps`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from easgd.algorithms import Center, Hyperparams, Op
from easgd.comm.ps_checkpoint import read_checkpoint, write_checkpoint
from easgd.comm.ps_session import Clocks, Session, SessionState, SessionStats
from easgd.comm.wire import SECRET_ENV, Header, dtype_code, dtype_from_code, resolve_secret
from easgd.runlog import Event, JsonlWriter, atomic_write_json, previous_checkpoint

__all__ = [
    "DEFAULT_CHECKPOINT_EVERY",
    "DEFAULT_HOST",
    "MIN_SILENCE",
    "SILENCE_FACTOR",
    "ParameterServer",
    "serve",
]

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_CHECKPOINT_EVERY = 5.0
SILENCE_FACTOR = 5  # missed heartbeats before the server declares a session dead
MIN_SILENCE = 5.0

#: The event each way a session can end is reported as.
_END_EVENT = {
    SessionState.LEFT: Event.BYE,
    SessionState.DIED: Event.DEATH,
    SessionState.CLOSED: Event.CLOSED,
    SessionState.REJECTED: Event.REJECTED,
}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ParameterServer:
    """Serves one shard of the center to any number of asynchronous workers.

    Args:
        hp: the run's hyperparameters (the method decides which exchange is served).
        center_shard: flat contiguous CPU tensor, the initial center shard; used in place.
        offset: where this shard starts in the full flat vector (default 0).
        host, port: where to listen (default 127.0.0.1 and a free port; see ``address``).
        secret: shared secret (bytes or str; default ``EASGD_SECRET``). Required off
            loopback; when set, every connection is authenticated.
        checkpoint_path: where to save the center (default: no checkpoints).
        checkpoint_every: seconds between saves while the center changes (default 5).
        on_event: called with a dict for every join, bye, death, rejection, checkpoint.
        timeout: seconds of silence before a session is declared dead (default: 5 x the
            heartbeat the client announces, at least 5 s).

    Example::

        with ParameterServer(hp, torch.zeros(n)) as server:
            ...  # workers connect to server.address
    """

    def __init__(
        self,
        hp: Hyperparams,
        center_shard: Tensor,
        *,
        offset: int = 0,
        host: str = DEFAULT_HOST,
        port: int = 0,
        secret: bytes | str | None = None,
        checkpoint_path: str | os.PathLike[str] | None = None,
        checkpoint_every: float = DEFAULT_CHECKPOINT_EVERY,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        timeout: float | None = None,
    ) -> None:
        if center_shard.dim() != 1 or not center_shard.is_contiguous():
            raise ValueError("center_shard must be a flat, contiguous 1-D tensor")
        if center_shard.device.type != "cpu":
            raise ValueError(f"center_shard must live on the CPU, got {center_shard.device}")
        dtype_code(center_shard.dtype)
        if offset < 0:
            raise ValueError(f"offset={offset} must be >= 0")
        if not checkpoint_every > 0:
            raise ValueError(f"checkpoint_every={checkpoint_every} must be > 0 seconds")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout={timeout} must be > 0 seconds or None")
        self._secret = resolve_secret(secret)
        if not _is_loopback(host) and self._secret is None:
            raise ValueError(
                f"host={host!r} is not a loopback address: a parameter server reachable from "
                f"other machines requires a shared secret; pass secret= or set {SECRET_ENV}"
            )
        server_op = hp.spec.server_op
        if server_op is None:
            raise ValueError(
                f"method={hp.method!r} has no asynchronous exchange; the parameter server "
                "serves easgd, eamsgd and the downpour family"
            )
        self.hp = hp
        self.center = Center(hp, center_shard)
        self.offset = offset
        self.numel = center_shard.numel()
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.checkpoint_every = float(checkpoint_every)
        self.on_event = on_event
        self.timeout = timeout
        self._exchange_op: Op = server_op
        self._lock = threading.Lock()  # the center and every counter
        self._save_lock = threading.Lock()
        self._stop_event = threading.Event()
        self._stopped = False
        self._stopping = False
        self._sessions: list[SessionStats] = []
        self._next_session = 1
        self._exchanges = 0
        self._checkpoints = 0
        self._saved_t: int | None = None
        # Recovery bookkeeping (wire.py, "Recovery"): checkpoints are numbered; an update
        # lands in checkpoint ``_seq``; ``_durable_seq`` is the last one on disk (0: only the
        # initial center, rebuilt from the seed on a restart).
        self._seq = 1
        self._durable_seq = 0
        self._restored_seq = 0  # the checkpoint this server was restarted from
        self._worker_exchanges: dict[int, int] = {}  # updates applied per client nonce
        self._recovered = 0  # updates re-sent by workers after a restart
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._accept_thread: threading.Thread | None = None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family)
        self.address: tuple[str, int] = (host, self._listener.getsockname()[1])
        self._where = f"{host}:{self.address[1]}"

    # -- lifecycle ------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        *,
        hp: Hyperparams | None = None,
        numel: int | None = None,
        offset: int | None = None,
        **kwargs: Any,
    ) -> ParameterServer:
        """A server restarted from a file written by :meth:`save_checkpoint`, verified.

        ``hp`` defaults to the saved one (given, its method must be the saved one);
        ``numel`` and ``offset``: the shard the caller needs, so that a server never serves
        another size (None: whatever was saved); ``kwargs`` go to the constructor
        (``checkpoint_path`` defaults to ``path``). A damaged ``path`` falls back to its
        previous checkpoint with a warning; raises :class:`easgd.runlog.CheckpointError`
        (a ``ValueError``) naming the file when neither verifies or they do not match.
        """
        method = None if hp is None else hp.method
        state = read_checkpoint(path, method=method, numel=numel, offset=offset)
        kwargs.setdefault("checkpoint_path", path)
        saved_hp = hp or Hyperparams.from_dict(state["hp"])
        server = cls(saved_hp, state["center"].clone(), offset=state["offset"], **kwargs)
        server.center.load_state_dict(state)
        server._exchanges = int(state["exchanges"])
        server._saved_t = server.center.t
        server._restore_recovery(state)
        logger.info(
            "parameter server %s resumed from %s at t=%d", server._where, state["file"], server.t
        )
        return server

    def start(self) -> ParameterServer:
        """Start accepting workers (and saving checkpoints) in background threads."""
        if self._accept_thread is not None:
            return self
        self._accept_thread = self._spawn(self._accept_loop, "ps-accept")
        if self.checkpoint_path is not None:
            self._spawn(self._checkpoint_loop, "ps-checkpoint")
        self.emit(Event.SERVER_START, offset=self.offset, numel=self.numel, t=self.center.t)
        logger.info(
            "parameter server listening on %s (shard %d+%d)", self._where, self.offset, self.numel
        )
        return self

    def serve_forever(self) -> None:
        """Serve until :meth:`stop` is called (or SIGINT/SIGTERM via :func:`serve`)."""
        self.start()
        try:
            while not self._stop_event.wait(0.5):
                pass
        finally:
            self.stop()

    def stop(self) -> None:
        """Close every session, stop the threads, save a last checkpoint. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = self._stopping = True
        self._stop_event.set()
        if self._accept_thread is not None:
            self._accept_thread.join()  # polls the stop event every 0.2 s
        self._listener.close()
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout=10.0)
        if self.checkpoint_path is not None:
            self.save_checkpoint()
        self.emit(Event.SERVER_STOP, t=self.center.t, exchanges=self._exchanges)

    def __enter__(self) -> ParameterServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state ----------------------------------------------------------------------------

    @property
    def t(self) -> int:
        """The center's clock: the number of updates so far."""
        return self.center.t

    @property
    def dtype(self) -> torch.dtype:
        return self.center.center.dtype

    @property
    def exchange_op(self) -> Op:
        """The exchange this server answers (its method's ``spec.server_op``)."""
        return self._exchange_op

    @property
    def where(self) -> str:
        """``host:port``, for logs and events."""
        return self._where

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stats(self) -> dict[str, Any]:
        """Counters for the run's metrics: totals and one entry per session."""
        with self._lock:
            sessions = [dataclasses.asdict(s) for s in self._sessions]
            out: dict[str, Any] = {
                "address": self._where,
                "offset": self.offset,
                "numel": self.numel,
                "t": self.center.t,
                "exchanges": self._exchanges,
                "checkpoints": self._checkpoints,
                "recovered": self._recovered,
                "restored_seq": self._restored_seq,
            }
        for state in SessionState:
            out[state.value] = sum(s["state"] == state for s in sessions)
        out["bytes_in"] = sum(s["bytes_in"] for s in sessions)
        out["bytes_out"] = sum(s["bytes_out"] for s in sessions)
        out["sessions"] = sessions
        return out

    def snapshot(self, evaluation: bool = False) -> Tensor:
        """A consistent copy of the center shard (or of its evaluation vector)."""
        out = torch.empty(self.numel, dtype=self.dtype)
        self.read_center(out, evaluation=evaluation)
        return out

    def save_checkpoint(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Save the center's state and counters atomically, with a digest; the file replaced
        is kept as the previous checkpoint (``<stem>.prev.pt``; see :mod:`.ps_checkpoint`)."""
        target = Path(path) if path is not None else self.checkpoint_path
        if target is None:
            raise ValueError("no checkpoint path: pass path= or construct with checkpoint_path=")
        with self._save_lock:
            with self._lock:
                state = {
                    k: v.clone() if isinstance(v, Tensor) else v
                    for k, v in self.center.state_dict().items()
                }
                exchanges = self._exchanges
                state.update(self._recovery_state())  # this checkpoint's number, per worker
            t = int(state["t"])
            write_checkpoint(
                target,
                state,
                hp=self.hp,
                offset=self.offset,
                numel=self.numel,
                exchanges=exchanges,
            )
            self._saved_t = t
            self._checkpoints += 1
            with self._lock:  # now on disk: workers may forget what it holds
                self._durable_seq = max(self._durable_seq, int(state["seq"]))
        self.emit(Event.CHECKPOINT, path=str(target), t=t, exchanges=exchanges)
        return target

    # -- what sessions use (easgd.comm.ps_session.SessionHost) ----------------------------

    def silence(self, heartbeat_ms: int) -> float | None:
        """Seconds without a message before a client announcing ``heartbeat_ms`` is dead."""
        if self.timeout is not None:
            return self.timeout
        if heartbeat_ms <= 0:
            return None  # the client sends no heartbeat: only EOF and keepalive detect death
        return max(MIN_SILENCE, SILENCE_FACTOR * heartbeat_ms / 1000)

    def check_request(self, h: Header, *, offset: int | None = None) -> str:
        """Why a request does not fit this shard ("" when it does)."""
        if offset is not None and (h.numel, offset) != (self.numel, self.offset):
            return (
                f"worker {h.worker_id} expects a shard of {h.numel} floats at offset {offset}, "
                f"this server holds {self.numel} floats at offset {self.offset}; do all "
                "workers build the same model and list the servers in the same order?"
            )
        if h.numel != self.numel:
            return (
                f"payload of {h.numel} floats, the center shard has {self.numel}; do all "
                "workers build the same model?"
            )
        if h.dtype != dtype_code(self.dtype):
            theirs = dtype_from_code(h.dtype)
            return (
                f"payload dtype {theirs}, the center is {self.dtype}; "
                "send the parameters in the center's dtype"
            )
        return ""

    def open_session(self, worker_id: int, peer: str, into: Tensor) -> tuple[SessionStats, int]:
        """Record a new session and copy the center into ``into``; returns it and the clock."""
        with self._lock:
            into.copy_(self.center.center)
            t = self.center.t
            stats = SessionStats(worker_id, self._next_session, peer, time.time())
            self._next_session += 1
            others = [s.session_id for s in self._sessions if s.worker_id == worker_id]
            self._sessions.append(stats)
        logger.info(
            "parameter server %s: worker %d joined (session %d, t=%d%s)",
            self._where,
            worker_id,
            stats.session_id,
            t,
            f", rejoin after sessions {others}" if others else "",
        )
        self.emit(
            Event.JOIN, worker=worker_id, session=stats.session_id, peer=peer, t=t, rejoin=others
        )
        return stats, t

    def apply(self, op: Op, payload: Tensor, reply: Tensor, stats: SessionStats) -> Clocks:
        """One exchange of ``stats``'s session, atomically; returns the clocks after it."""
        with self._lock:
            self.center.handle(op, payload, reply)
            self._exchanges += 1
            stats.exchanges += 1
            c = stats.client
            self._worker_exchanges[c] = self._worker_exchanges.get(c, 0) + 1
            return Clocks(self.center.t, self._durable_seq, self._seq)

    def clocks(self) -> Clocks:
        with self._lock:
            return Clocks(self.center.t, self._durable_seq, self._seq)

    def recovery_info(self, client: int) -> dict[str, int]:
        """What a reconnecting client needs: the restored checkpoint, its applied updates."""
        with self._lock:
            return {
                "restored_seq": self._restored_seq,
                "applied": self._worker_exchanges.get(client, 0),
            }

    def recover(self, contributions: Tensor, count: int, stats: SessionStats) -> Clocks:
        """Add a live worker's ``count`` updates that the restored checkpoint lacks.

        Only for methods whose center is the initial one plus the workers' contributions
        (``MethodSpec.recoverable``); the clock and the counters move by ``count``.
        """
        if not self.hp.spec.recoverable:
            raise ValueError(
                f"{self.hp.method}'s center is not a sum of the workers' contributions; "
                "a restarted server cannot rebuild it (see the README's Failures section)"
            )
        with self._lock:
            self.center.center.add_(contributions)
            self.center.t += count
            self._exchanges += count
            self._recovered += count
            c = stats.client
            self._worker_exchanges[c] = self._worker_exchanges.get(c, 0) + count
            clocks = Clocks(self.center.t, self._durable_seq, self._seq)
        logger.info(
            "parameter server %s: worker %d re-sent %d updates after the restart",
            self._where, stats.worker_id, count,
        )  # fmt: skip
        self.emit(Event.RECOVERY, worker=stats.worker_id, session=stats.session_id,
                  exchanges=count, t=clocks.t)  # fmt: skip
        return clocks

    def _recovery_state(self) -> dict[str, Any]:
        """Under the lock: number this checkpoint; what it records for recovery."""
        seq = self._seq
        self._seq += 1
        return {"seq": seq, "worker_exchanges": dict(self._worker_exchanges),
                "recovered": self._recovered}  # fmt: skip

    def _restore_recovery(self, state: dict[str, Any]) -> None:
        seq = int(state.get("seq", 0))
        self._restored_seq = self._durable_seq = seq
        self._seq = seq + 1
        self._worker_exchanges = {
            int(k): int(v) for k, v in dict(state.get("worker_exchanges", {})).items()
        }
        self._recovered = int(state.get("recovered", 0))

    def read_center(self, into: Tensor, *, evaluation: bool) -> int:
        """Copy the center (or the evaluated vector) into ``into``; returns the clock."""
        with self._lock:
            into.copy_(self.center.evaluation_vector() if evaluation else self.center.center)
            return self.center.t

    def end_session(self, stats: SessionStats, state: SessionState, reason: str) -> None:
        """Record how a session ended, log it and report it as an event."""
        with self._lock:
            stats.state, stats.reason, stats.ended_at = state, reason, time.time()
        level = logging.WARNING if state is SessionState.DIED else logging.INFO
        logger.log(
            level,
            "parameter server %s: worker %d session %d %s (%s) after %d exchanges",
            self._where,
            stats.worker_id,
            stats.session_id,
            state.value,
            reason,
            stats.exchanges,
        )
        self.emit(
            _END_EVENT[state],
            worker=stats.worker_id,
            session=stats.session_id,
            reason=reason,
            exchanges=stats.exchanges,
        )

    def emit(self, event: Event, **fields: Any) -> None:
        """Report an event to ``on_event`` (a failing callback is logged, never raised)."""
        if self.on_event is None:
            return
        try:
            self.on_event({"event": event, "time": time.time(), "server": self._where, **fields})
        except Exception:
            logger.exception("on_event callback failed for %s", event)

    # -- internals ------------------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], name: str, *args: Any) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()
        return thread

    def _accept_loop(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop_event.is_set():
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break  # closed by stop()
            with self._lock:
                if self._stopping:
                    conn.close()
                    break
                self._conns.add(conn)
            self._spawn(self._serve_connection, f"ps-session-{peer[1]}", conn, peer)

    def _checkpoint_loop(self) -> None:
        while not self._stop_event.wait(self.checkpoint_every):
            if self.center.t != self._saved_t:
                try:
                    self.save_checkpoint()
                except Exception:
                    logger.exception("parameter server %s: checkpoint failed", self._where)

    def _serve_connection(self, conn: socket.socket, peer: tuple[Any, ...]) -> None:
        try:
            Session(self, conn, f"{peer[0]}:{peer[1]}", secret=self._secret).run()
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()


# ---------------------------------------------------------------------------------------
# Process entry point
# ---------------------------------------------------------------------------------------


def serve(
    hp: Hyperparams,
    center_shard: Tensor,
    *,
    offset: int = 0,
    host: str = DEFAULT_HOST,
    port: int = 0,
    secret: bytes | str | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    checkpoint_every: float = DEFAULT_CHECKPOINT_EVERY,
    resume: str | os.PathLike[str] | None = None,
    address_file: str | os.PathLike[str] | None = None,
    events_path: str | os.PathLike[str] | None = None,
    num_threads: int | None = 1,
    timeout: float | None = None,
) -> None:
    """Run a parameter server in this process until SIGTERM/SIGINT or a stop.

    A process entry point (picklable arguments only). ``resume``: a checkpoint to restart
    from when it exists. ``address_file``: written atomically (JSON: host, port, pid) once
    the server listens, so launchers learn a port chosen by the OS. ``events_path``: the
    events, one JSON object per line. ``num_threads``: ``torch.set_num_threads`` (default 1).
    """
    if num_threads:
        torch.set_num_threads(num_threads)
    with contextlib.ExitStack() as stack:
        on_event = None
        if events_path is not None:
            on_event = stack.enter_context(JsonlWriter(events_path, default=str)).write
        common: dict[str, Any] = {
            "host": host,
            "port": port,
            "secret": secret,
            "checkpoint_every": checkpoint_every,
            "on_event": on_event,
            "timeout": timeout,
        }
        if resume is not None and (Path(resume).exists() or previous_checkpoint(resume).exists()):
            ckpt = checkpoint_path if checkpoint_path is not None else resume
            server = ParameterServer.from_checkpoint(
                resume, hp=hp, checkpoint_path=ckpt, numel=center_shard.numel(), offset=offset,
                **common,
            )  # fmt: skip
        else:
            server = ParameterServer(
                hp, center_shard, offset=offset, checkpoint_path=checkpoint_path, **common
            )
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: server._stop_event.set())
        server.start()
        if address_file is not None:
            info = {"host": server.address[0], "port": server.address[1], "pid": os.getpid()}
            atomic_write_json(address_file, info)
        server.serve_forever()
