"""The parameter server process: one shard of the center, its sessions, checkpoints and stats.

:class:`ParameterServer` owns the center shard and everything shared between sessions (the
lock, the clock, the counters, the event sink); it accepts connections and hands each one
to a :class:`easgd.comm.ps_session.Session` thread, which speaks the protocol and reaches
the server only through the methods of :class:`easgd.comm.ps_session.SessionHost`.
:func:`serve` runs one server as a process. The design and the failure behaviour are
described in :mod:`easgd.comm.ps`.

Limits, so that no client (a stranger on the machine, a buggy or diverged worker) can hold
the server or damage the center:

* The silence after which a session is declared dead follows the heartbeat the client
  announces, clamped into ``[min_heartbeat, max_heartbeat]`` (0.1 to 10 s): a client that
  announces none (0) or an absurd period gets the longest, so every session ends within
  ``5 x max_heartbeat`` of its last message (``timeout=``, when given, is the silence).
* At most ``max_connections`` connections at once (default ``2 P + 4``: every worker, a
  reconnecting one's old and new connection, the evaluator and the launcher's control
  messages). One more is refused at accept, with an error message the client reads, and no
  thread; a ``reject`` event (at most one a second) counts them.
* One active session per worker id. A JOIN for a worker whose session is active is refused,
  naming the worker and the peer of that session, unless it carries the same client nonce
  (``Header.session`` of the JOIN): that is the same process reconnecting (its old
  connection broke on its side first), so the old session is declared dead and the new one
  opens. A restarted worker is a new process with a new nonce: it joins once its
  predecessor's session ended, which a killed process's closed socket does at once (a
  vanished host's within the silence above).
* A payload or re-sent sum holding a NaN or an infinity is refused before anything is
  applied (:class:`NonFiniteError`, a ``ValueError``); the center stays bitwise unchanged.
* The run ends when every worker ``0..P-1`` has finished (a BYE with the ``done`` flag: its
  budget is spent) or was declared lost by the launcher (an authenticated CONTROL message
  ``{"lost": [ids]}``): :meth:`ParameterServer.finished`. No store counter decides it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import ssl
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
from easgd.comm.shm import is_loopback, resolve_shm
from easgd.comm.wire import (
    SECRET_ENV,
    Cmd,
    ErrorKind,
    Header,
    dtype_code,
    dtype_from_code,
    handshake_refusal,
    resolve_secret,
)
from easgd.compress import Codec
from easgd.runlog import Event, JsonlWriter, atomic_write_json, previous_checkpoint

__all__ = [
    "DEFAULT_CHECKPOINT_EVERY",
    "DEFAULT_HOST",
    "MAX_HEARTBEAT",
    "MIN_HEARTBEAT",
    "MIN_SILENCE",
    "SILENCE_FACTOR",
    "JoinRefusedError",
    "NonFiniteError",
    "ParameterServer",
    "default_max_connections",
    "is_loopback",
    "nonfinite_count",
    "serve",
]

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_CHECKPOINT_EVERY = 5.0
SILENCE_FACTOR = 5  # missed heartbeats before the server declares a session dead
MIN_SILENCE = 5.0
#: The range the heartbeat a client announces is clamped into (seconds).
MIN_HEARTBEAT = 0.1
MAX_HEARTBEAT = 10.0
_REFUSED_LINGER = 2.0  # seconds a refused connection may take to read why before it is closed
_REFUSED_KEPT = 64  # refused connections draining at once; more are closed at once
_REPORT_EVERY = 1.0  # seconds between two reports of refused connections


def default_max_connections(workers: int) -> int:
    """Connections a server of a ``workers``-worker run allows by default: each worker's,
    a reconnecting worker's old and new one, the evaluator's and a few control messages."""
    return 2 * workers + 4


def nonfinite_count(tensor: Tensor) -> int:
    """How many elements of ``tensor`` are NaN or infinite; exact, and one cheap pass when
    there are none: one NaN or infinity makes the sum NaN or infinite, so a finite sum
    proves every element finite (only a sum that is not finite, from a non-finite element
    or finite ones whose sum overflows, is checked element by element)."""
    if bool(torch.isfinite(tensor.sum())):
        return 0
    return int((~torch.isfinite(tensor)).sum())


class NonFiniteError(ValueError):
    """A worker sent a NaN or an infinity; nothing of it was applied."""


class JoinRefusedError(ValueError):
    """A JOIN for a worker id whose session is active, from another process."""


#: The event each way a session can end is reported as.
_END_EVENT = {
    SessionState.LEFT: Event.BYE,
    SessionState.DIED: Event.DEATH,
    SessionState.CLOSED: Event.CLOSED,
    SessionState.REJECTED: Event.REJECTED,
}


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


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
            heartbeat the client announces, clamped as below, at least 5 s).
        workers: the run's workers P: ids ``0..P-1`` must each finish or be lost before
            :meth:`finished` (default ``hp.workers``).
        max_connections: connections at once; more are refused at accept (default
            :func:`default_max_connections` of ``workers``: ``2 P + 4``).
        min_heartbeat, max_heartbeat: the range (seconds) the heartbeat period a client
            announces is clamped into (default 0.1 and 10); a client that announces none
            gets ``max_heartbeat``, so a silent session always ends, within
            ``5 x max_heartbeat`` seconds.
        tls: a server TLS context (:func:`easgd.comm.wire.server_tls_context`): every
            connection speaks TLS beneath the handshake (default: none).
        handshake_timeout, frame_timeout: the sessions' deadlines, seconds (default
            :data:`easgd.comm.ps_session.HANDSHAKE_TIMEOUT` from the accept to the end of
            the handshake, and ``FRAME_TIMEOUT`` for a frame to arrive whole).
        shm: offer workers on this host (connected over loopback, without TLS) to move
            the bodies through shared memory (:mod:`easgd.comm.shm`; default
            ``EASGD_SHM``, else True); a worker may still decline.

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
        workers: int | None = None,
        max_connections: int | None = None,
        min_heartbeat: float = MIN_HEARTBEAT,
        max_heartbeat: float = MAX_HEARTBEAT,
        tls: ssl.SSLContext | None = None,
        handshake_timeout: float | None = None,
        frame_timeout: float | None = None,
        shm: bool | None = None,
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
        if timeout is not None and not 0 < timeout < float("inf"):
            raise ValueError(f"timeout={timeout} must be > 0 seconds (and finite) or None")
        for name, value in (("handshake_timeout", handshake_timeout),
                            ("frame_timeout", frame_timeout)):  # fmt: skip
            if value is not None and not 0 < value < float("inf"):
                raise ValueError(f"{name}={value} must be > 0 seconds (and finite) or None")
        if not 0 < min_heartbeat <= max_heartbeat < float("inf"):
            raise ValueError(
                f"min_heartbeat={min_heartbeat}, max_heartbeat={max_heartbeat}: need "
                "0 < min_heartbeat <= max_heartbeat (seconds, finite), e.g. 0.1 and 10"
            )
        workers = hp.workers if workers is None else workers
        if not _is_count(workers):
            raise ValueError(f"workers={workers!r} must be an integer >= 1 (the run's P)")
        if max_connections is None:
            max_connections = default_max_connections(workers)
        if not _is_count(max_connections):
            raise ValueError(
                f"max_connections={max_connections!r} must be an integer >= 1; the default "
                f"for {workers} workers is {default_max_connections(workers)}"
            )
        self._secret = resolve_secret(secret)
        if not is_loopback(host) and self._secret is None:
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
        self.workers = workers
        self.max_connections = max_connections
        self.min_heartbeat = float(min_heartbeat)
        self.max_heartbeat = float(max_heartbeat)
        self._tls = tls
        self._shm = resolve_shm(shm)
        self._deadlines = {"handshake_timeout": handshake_timeout, "frame_timeout": frame_timeout}
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
        # The end of the run (module docstring): workers that finished, and those lost.
        self._done: set[int] = set()
        self._lost: set[int] = set()
        self._conns: dict[str, socket.socket] = {}  # by peer, "host:port"
        self._refused: list[tuple[socket.socket, float]] = []  # draining, until a deadline
        self._refusals = 0  # connections refused over max_connections
        self._refusals_reported = 0
        self._reported_at = -float("inf")
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
        for conn, _ in self._refused:  # the accept thread, their only other user, is gone
            conn.close()
        self._refused.clear()
        with self._lock:
            conns, threads = list(self._conns.values()), list(self._threads)
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

    @property
    def shm(self) -> bool:
        return self._shm

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

    def silence(self, heartbeat_ms: int) -> float:
        """Seconds without a message before a client announcing ``heartbeat_ms`` is dead.

        ``timeout=`` when given; else 5 heartbeats (at least 5 s), the announced period
        clamped into ``[min_heartbeat, max_heartbeat]``. A client that announces no
        heartbeat (0) gets the longest: it may be computing, but not forever.
        """
        if self.timeout is not None:
            return self.timeout
        period = heartbeat_ms / 1000 if heartbeat_ms > 0 else self.max_heartbeat
        period = min(max(period, self.min_heartbeat), self.max_heartbeat)
        longest = SILENCE_FACTOR * self.max_heartbeat
        return max(min(MIN_SILENCE, longest), SILENCE_FACTOR * period)

    def check_request(self, h: Header, *, offset: int | None = None) -> str:
        """Why a request does not fit this shard ("" when it does); for a JOIN, also why
        its worker may not join (another process holds its session)."""
        if h.cmd == Cmd.JOIN:
            with self._lock:
                clash = self._clash(h.worker_id, h.session)
            if clash:
                return clash
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

    def open_session(
        self, worker_id: int, peer: str, into: Tensor, *, client: int | None = None
    ) -> tuple[SessionStats, int]:
        """Record a new session and copy the center into ``into``; returns it and the clock.

        ``client``: the JOIN's client nonce. An active session of ``worker_id`` with another
        nonce refuses the JOIN (:class:`JoinRefusedError`, a ``ValueError``); one with the
        same nonce is that process's broken connection: it is declared dead first.
        ``client=None`` (a caller that does not pass it): the check is
        :meth:`check_request`'s, and any active session of the worker is replaced.
        """
        with self._lock:
            if client is not None:
                clash = self._clash(worker_id, client)
                if clash:
                    raise JoinRefusedError(clash)
            stale = [s for s in self._sessions
                     if s.worker_id == worker_id and s.state is SessionState.ACTIVE]  # fmt: skip
            reason = f"replaced by a new connection of the same worker process from {peer}"
            for old in stale:
                old.state, old.reason, old.ended_at = SessionState.DIED, reason, time.time()
            broken = [c for c in (self._conns.get(old.peer) for old in stale) if c is not None]
            into.copy_(self.center.center)
            t = self.center.t
            stats = SessionStats(worker_id, self._next_session, peer, time.time())
            if client is not None:
                stats.client = client
            self._next_session += 1
            others = [s.session_id for s in self._sessions if s.worker_id == worker_id]
            self._sessions.append(stats)
        for old in stale:
            self._report_end(old)
        for conn in broken:  # its thread wakes up, finds its session ended, and goes
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
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

    def _clash(self, worker_id: int, client: int) -> str:
        """Under the lock: why ``client`` may not open a session for ``worker_id`` ("": it may)."""
        for s in self._sessions:
            if s.worker_id == worker_id and s.state is SessionState.ACTIVE and s.client != client:
                return (
                    f"worker {worker_id} already has an active session on this server "
                    f"(session {s.session_id}, from {s.peer}, joined "
                    f"{time.time() - s.joined_at:.0f} s ago): two processes may not share a "
                    "worker id. A dead process's session ends when its connection does (at "
                    "once when it was killed, after its silence when its host vanished); "
                    "otherwise start each worker with its own index"
                )
        return ""

    def apply(self, op: Op, payload: Tensor, reply: Tensor, stats: SessionStats) -> Clocks:
        """One exchange of ``stats``'s session, atomically; returns the clocks after it.

        Raises :class:`NonFiniteError` (nothing applied) when ``payload`` is not finite.
        """
        self._check_finite(payload, stats, "payload")
        with self._lock:
            self.center.handle(op, payload, reply)
            self._exchanges += 1
            stats.exchanges += 1
            c = stats.client
            self._worker_exchanges[c] = self._worker_exchanges.get(c, 0) + 1
            return Clocks(self.center.t, self._durable_seq, self._seq)

    def apply_compressed(
        self,
        reference: Tensor,
        packed_in: Tensor,
        packed_out: Tensor,
        scratch: Tensor,
        codec: Codec,
        stats: SessionStats,
    ) -> Clocks:
        """One compressed elastic exchange of ``stats``'s session, atomically
        (:meth:`easgd.algorithms.Center.handle_compressed`); the payload is decoded and
        checked finite first (:class:`NonFiniteError`: nothing applied)."""
        codec.decode(packed_in, scratch)
        self._check_finite(scratch, stats, "compressed payload")
        with self._lock:
            self.center.handle_compressed(reference, packed_in, packed_out, scratch, codec)
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
        self._check_finite(contributions, stats, "re-sent sum of updates")
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

    def _check_finite(self, tensor: Tensor, stats: SessionStats, what: str) -> None:
        """Refuse a non-finite ``tensor`` (:class:`NonFiniteError`) before it reaches the center.

        Exact and cheap: one NaN or infinity makes the sum NaN or infinite, so a finite sum
        proves every element finite (one pass, no allocation); only a sum that is not
        finite (a non-finite element, or finite elements whose sum overflows) is checked
        element by element.
        """
        if not nonfinite_count(tensor):
            return
        bad = ~torch.isfinite(tensor)
        count = int(bad.sum())
        first = (bad.nonzero().flatten()[:5] + self.offset).tolist()
        more = ", ..." if count > len(first) else ""
        raise NonFiniteError(
            f"the {what} of worker {stats.worker_id} (session {stats.session_id}) holds "
            f"{count} non-finite values (NaN or inf) at elements "
            f"{', '.join(map(str, first))}{more} of the flat vector: refused, the center is "
            "unchanged; the worker's state diverged (lower the learning rate)"
        )

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
        """Record how a session ended, log it and report it as an event.

        A BYE of a worker that spent its budget (``stats.done``) counts it as finished.
        A session already ended (replaced by its process's new connection) stays as it is.
        """
        with self._lock:
            if stats.state is not SessionState.ACTIVE:
                return
            stats.state, stats.reason, stats.ended_at = state, reason, time.time()
            if state is SessionState.LEFT and stats.done:
                self._done.add(stats.worker_id)
        self._report_end(stats)

    def _report_end(self, stats: SessionStats) -> None:
        state = stats.state
        level = logging.WARNING if state is SessionState.DIED else logging.INFO
        logger.log(
            level,
            "parameter server %s: worker %d session %d %s (%s) after %d exchanges",
            self._where,
            stats.worker_id,
            stats.session_id,
            state.value,
            stats.reason,
            stats.exchanges,
        )
        self.emit(
            _END_EVENT[state],
            worker=stats.worker_id,
            session=stats.session_id,
            reason=stats.reason,
            exchanges=stats.exchanges,
        )

    # -- the end of the run ---------------------------------------------------------------

    def finished(self) -> bool:
        """Whether every worker ``0..P-1`` finished its budget or was declared lost."""
        with self._lock:
            return self._finished()

    def _finished(self) -> bool:
        return all(i in self._done or i in self._lost for i in range(self.workers))

    def control(self, message: dict[str, Any]) -> dict[str, Any]:
        """Answer one CONTROL message (authenticated JSON, from the launcher); returns the
        run's status as this shard sees it.

        Messages: ``{"lost": [ids]}``: workers dead beyond their restarts (nobody waits for
        them); ``{"finished": [ids]}``: workers whose process exited after its budget (for a
        shard restarted after their goodbye); ``{"query": "status"}``: only the status.
        Several keys may come in one message. The reply: ``finished`` (bool), ``workers``
        (P), ``done``, ``lost`` and ``active`` (worker ids), ``t``, ``exchanges`` and
        ``refused`` (connections refused over ``max_connections``). Raises ``ValueError``
        naming what is wrong, and ``PermissionError`` for ``lost``/``finished`` on a server
        without a secret (nothing is changed then).
        """
        if not isinstance(message, dict) or not message:
            raise ValueError(
                f"a control message is a non-empty JSON object, got {message!r}; e.g. "
                '{"lost": [1]} or {"query": "status"}'
            )
        unknown = sorted(set(message) - {"lost", "finished", "query"})
        if unknown:
            raise ValueError(
                f"unknown control keys {unknown}; a control message holds 'lost', "
                "'finished' or 'query'"
            )
        if "query" in message and message["query"] != "status":
            raise ValueError(f"query={message['query']!r}: the only query is 'status'")
        lost = self._worker_ids("lost", message.get("lost", []))
        done = self._worker_ids("finished", message.get("finished", []))
        if (lost or done) and self._secret is None:
            # Unauthenticated, anyone on the machine could end the run (as a store counter
            # could): only a server with a secret takes them.
            raise PermissionError(
                f"this server has no shared secret, so it cannot tell the launcher's "
                f"messages from anyone's; it ignores {sorted(set(message) - {'query'})}. "
                f"Start it with a secret ({SECRET_ENV})"
            )
        with self._lock:
            new_lost, new_done = lost - self._lost, done - self._done
            self._lost |= lost
            self._done |= done
        if new_lost or new_done:
            logger.info(
                "parameter server %s: the launcher says workers %s are lost, %s finished",
                self._where, sorted(new_lost), sorted(new_done),
            )  # fmt: skip
        return self.run_status()

    def run_status(self) -> dict[str, Any]:
        """The reply to ``{"query": "status"}`` (see :meth:`control`)."""
        with self._lock:
            active = {s.worker_id for s in self._sessions if s.state is SessionState.ACTIVE}
            return {
                "finished": self._finished(),
                "workers": self.workers,
                "done": sorted(self._done),
                "lost": sorted(self._lost),
                "active": sorted(active),
                "t": self.center.t,
                "exchanges": self._exchanges,
                "refused": self._refusals,
            }

    def _worker_ids(self, key: str, value: Any) -> set[int]:
        ids = value if isinstance(value, list) else [value]
        bad = [
            i for i in ids if isinstance(i, bool) or not isinstance(i, int)
            or not 0 <= i < self.workers
        ]  # fmt: skip
        if bad or not isinstance(value, list):
            raise ValueError(
                f"{key}={value!r}: give a list of worker ids, each an integer from 0 to "
                f"{self.workers - 1} (this run has {self.workers} workers)"
            )
        return set(ids)

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
            self._drain_refused()
            try:
                conn, peer = self._listener.accept()
                accepted = time.monotonic()
            except TimeoutError:
                continue
            except OSError:
                break  # closed by stop()
            where = f"{peer[0]}:{peer[1]}"
            with self._lock:
                if self._stopping:
                    conn.close()
                    break
                full = len(self._conns) >= self.max_connections
                if not full:
                    self._conns[where] = conn
            if full:
                self._refuse(conn, where)
            else:
                self._spawn(self._serve_connection, f"ps-session-{peer[1]}", conn, where,
                            accepted)  # fmt: skip

    def _refuse(self, conn: socket.socket, peer: str) -> None:
        """Refuse a connection over ``max_connections`` without a thread: a server hello and
        a refusal the client's handshake raises as the reason (a ``ConnectionError``), sent
        without blocking; the connection then drains briefly, so that the client's hello
        does not turn our close into a reset that would drop the message."""
        reason = (
            f"parameter server {self._where} already has {self.max_connections} connections, "
            "its limit (max_connections); the run's own processes stay below it: is "
            "another program connecting to this port?"
        )
        refusal = handshake_refusal(
            reason, auth_required=self._secret is not None, kind=ErrorKind.SERVER
        )
        with self._lock:  # counted before the client can read it
            self._refusals += 1
        try:
            if self._tls is not None:  # the client expects TLS first: it sees a closed socket
                raise OSError("no plaintext refusal under TLS")
            conn.setblocking(False)
            conn.sendall(refusal)  # a few hundred bytes: the new socket's buffer takes them
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            conn.close()
        else:
            if len(self._refused) < _REFUSED_KEPT:
                self._refused.append((conn, time.monotonic() + _REFUSED_LINGER))
            else:
                conn.close()
        now = time.monotonic()
        if now - self._reported_at >= _REPORT_EVERY:
            count = self._refusals - self._refusals_reported
            self._refusals_reported, self._reported_at = self._refusals, now
            logger.warning("parameter server %s refused %d connection(s), the last from %s: "
                           "%s", self._where, count, peer, reason)  # fmt: skip
            self.emit(Event.REJECT, worker=-1, peer=peer,
                      reason=f"{reason} ({count} refused since the last report)")  # fmt: skip

    def _drain_refused(self) -> None:
        """Read and drop what refused clients still send; close them at EOF or deadline."""
        if not self._refused:
            return
        now, keep = time.monotonic(), []
        for conn, deadline in self._refused:
            try:
                eof = any(not conn.recv(4096) for _ in range(4))  # bounded: a peer may stream
            except BlockingIOError:
                eof = False
            except OSError:
                eof = True
            if eof or now >= deadline:
                conn.close()
            else:
                keep.append((conn, deadline))
        self._refused = keep

    def _checkpoint_loop(self) -> None:
        while not self._stop_event.wait(self.checkpoint_every):
            if self.center.t != self._saved_t:
                try:
                    self.save_checkpoint()
                except Exception:
                    logger.exception("parameter server %s: checkpoint failed", self._where)

    def _serve_connection(self, conn: socket.socket, peer: str, accepted: float) -> None:
        try:
            Session(self, conn, peer, secret=self._secret, tls=self._tls, accepted=accepted,
                    **self._deadlines).run()  # fmt: skip
        finally:
            with self._lock:
                self._conns.pop(peer, None)
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
    max_connections: int | None = None,
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
            "max_connections": max_connections,
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
