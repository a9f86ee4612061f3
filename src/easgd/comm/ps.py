"""Asynchronous parameter server: the center variable, served over plain TCP sockets.

A :class:`ParameterServer` owns one contiguous shard ``[offset, offset + n)`` of the flat
center (S servers split a vector of N floats as :func:`shard_ranges` says) and answers every
worker on that worker's own clock. A :class:`PSClient` talks to all S servers and fulfils
the requests of :class:`easgd.algorithms.Worker` (``run_step(worker, grad_fn, client.serve)``).
All arithmetic is :meth:`easgd.algorithms.Center.handle`, called under the server's lock:
one round trip per exchange, atomic on the server, so no update is lost and no read is torn.

Transport: plain TCP sockets. Measured on the 2-core development machine (loopback, a flat
5M-float32 = 20 MB vector sent worker -> server -> worker and back, one thread per process,
median of 30 round trips, 3 runs each)::

    plain sockets, sendall(memoryview) / recv_into a preallocated tensor   5.2 - 5.3 ms
    gloo send/recv between 2 ranks (TCP init on 127.0.0.1)                4.3 - 6.5 ms

Sockets are within the run-to-run noise of gloo (gloo moves the same bytes over TCP), so the
server is built on them rather than on a two-rank gloo group per worker session: a
SIGKILLed peer is an immediate EOF / ECONNRESET on exactly one connection, a silent one a
timeout; rejoin is a new connection; there is no world size, no store and no
``torch.distributed`` state that one dead peer can poison (gloo groups cannot be polled and a
``wait(timeout)`` that expires closes the pair for good). ``benchmarks/exchange.py`` keeps
measuring the exchange against a raw gloo echo; on the same machine (5M floats, median of 30,
two runs) one elastic exchange through this server took 9.9 / 10.6 ms, a gloo echo with the
same arithmetic on the echo side 10.5 / 13.1 ms, the bare gloo echo 7.5 / 8.7 ms.

Protocol (:mod:`easgd.comm.wire`): an HMAC handshake, then JOIN (reply: the current center
shard; a new or restarted worker starts from the center), then exchanges
(``Op.ELASTIC``: x -> d; ``Op.PUSH_PULL``: acc -> center; ``Op.GRAD_PULL``: g -> center),
PULL (the center or the evaluation vector, no update), PING (heartbeat) and BYE. One TCP
connection is one session; payloads are the raw bytes of the shard in the center's dtype,
received in place into buffers preallocated per session.

Failure behaviour:

* A worker that dies (SIGKILL, crash) breaks only its own connection: the server sees EOF or
  a reset at once, records the session as ``died``, logs it, emits a ``death`` event, and
  every other session goes on. A request cut off mid-payload is never applied.
* A silent worker (stopped, hung host) is declared dead after ``5 x`` the heartbeat period
  it announced (at least 5 s; default heartbeat 1 s). The client's heartbeat thread pings
  while the trainer computes, so a long local phase is not mistaken for silence.
* A worker that starts late or restarts joins with a new session, pulls the center and
  contributes; BYE is recorded as a goodbye (``left``), not a death.
* A dead server becomes a :class:`PSConnectionError` (a ``ConnectionError`` naming the
  server's address) on the worker's next call: at once after SIGKILL (EOF/reset), within
  about 10 s for a vanished host (TCP keepalive), within ``timeout`` (30 s) for a hung one.
  Never a silent hang. A reply cut off mid-way may leave the worker's ``x`` (or ``d``)
  partly overwritten: do not go on from it; a restarted worker rejoins from the center.
* Bad input (another model size, dtype or method) is answered with a clear error and the
  session is closed; the worker raises ``ValueError`` with the server's explanation.
* The center is saved atomically (temporary file in the same directory, fsync,
  ``os.replace``) every ``checkpoint_every`` seconds (5 s) when it changed, and on
  :meth:`ParameterServer.stop`; :meth:`ParameterServer.from_checkpoint` restarts from it with
  the center's clock, momentum and average and the counters.
* The server binds to 127.0.0.1; on any other address it requires a shared secret
  (``secret=`` or ``EASGD_SECRET``) and authenticates every connection (HMAC-SHA256
  challenge-response, both directions). A wrong or missing secret is refused with
  :class:`AuthenticationError`.

Example::

    server = ParameterServer(hp, torch.zeros(n)).start()
    with PSClient([server.address], n, worker_id=0) as client:
        client.join(x)
        for _ in range(steps):
            run_step(worker, grad_fn, client.serve)
    server.stop()
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from easgd.algorithms import Center, Hyperparams
from easgd.comm.ps_client import DEFAULT_HEARTBEAT, DEFAULT_TIMEOUT, PSClient, PSConnectionError
from easgd.comm.wire import (
    CMD_OP,
    HEADER,
    OP_CMD,
    SECRET_ENV,
    AuthenticationError,
    Cmd,
    ErrorKind,
    Header,
    PeerClosedError,
    configure_socket,
    dtype_code,
    dtype_from_code,
    recv_exact,
    recv_header,
    resolve_secret,
    send_all,
    send_error,
    send_header,
    server_handshake,
    shard_ranges,
    tensor_bytes,
)
from easgd.runlog import atomic_torch_save

__all__ = [
    "DEFAULT_CHECKPOINT_EVERY",
    "DEFAULT_HEARTBEAT",
    "DEFAULT_TIMEOUT",
    "AuthenticationError",
    "PSClient",
    "PSConnectionError",
    "ParameterServer",
    "SessionStats",
    "atomic_save",
    "read_checkpoint",
    "serve",
    "shard_ranges",
]

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_CHECKPOINT_EVERY = 5.0
SILENCE_FACTOR = 5  # missed heartbeats before the server declares a session dead
MIN_SILENCE = 5.0
HANDSHAKE_TIMEOUT = 10.0
CHECKPOINT_FORMAT = "easgd.ps/1"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` atomically: readers see the previous file or the new one, never a part.

    Temporary file, fsync, rename, fsync of the directory (:func:`easgd.runlog.atomic_torch_save`).
    """
    atomic_torch_save(path, obj)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A server's checkpoint as a dict.

    Keys: ``center`` (the shard), ``evaluation`` (what is evaluated: the average ``z`` of
    ADOWNPOUR/MVADOWNPOUR, else the center), ``offset``, ``numel``, ``t``, ``v``, ``z``,
    ``exchanges``, ``hp`` (the fields of :class:`Hyperparams`), ``saved_at``.
    """
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a parameter-server checkpoint ({CHECKPOINT_FORMAT})")
    state["evaluation"] = state["z"] if state.get("z") is not None else state["center"]
    return state


@dataclass
class SessionStats:
    """One worker session on one server (one TCP connection from JOIN to its end)."""

    worker_id: int
    session_id: int
    peer: str
    joined_at: float
    state: str = "active"  # active | left (BYE) | died | closed (server stopped) | rejected
    reason: str = ""
    ended_at: float | None = None
    exchanges: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


# ---------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------


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
        self.hp = hp
        self.center = Center(hp, center_shard)
        self.offset = offset
        self.numel = center_shard.numel()
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.checkpoint_every = float(checkpoint_every)
        self.on_event = on_event
        self.timeout = timeout
        server_op = hp.spec.server_op
        if server_op is None:
            raise ValueError(
                f"method={hp.method!r} has no asynchronous exchange; the parameter server "
                "serves easgd, eamsgd and the downpour family"
            )
        self._exchange_cmd: Cmd = OP_CMD[server_op]
        self._dtype = dtype_code(center_shard.dtype)
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
        cls, path: str | os.PathLike[str], *, hp: Hyperparams | None = None, **kwargs: Any
    ) -> ParameterServer:
        """A server restarted from a file written by :meth:`save_checkpoint`.

        ``hp`` defaults to the saved one; ``kwargs`` go to the constructor (``offset`` and
        ``checkpoint_path`` default to the saved offset and to ``path``).
        """
        state = read_checkpoint(path)
        saved_hp = Hyperparams.from_dict(state["hp"])
        if hp is not None and hp.method != saved_hp.method:
            raise ValueError(
                f"{path} holds a {saved_hp.method} center but hp.method={hp.method!r}; "
                "resume with the same method"
            )
        kwargs.setdefault("offset", state["offset"])
        kwargs.setdefault("checkpoint_path", path)
        server = cls(hp or saved_hp, state["center"].clone(), **kwargs)
        server.center.load_state_dict(state)
        server._exchanges = int(state["exchanges"])
        server._saved_t = server.center.t
        logger.info("parameter server %s resumed from %s at t=%d", server._where, path, server.t)
        return server

    def start(self) -> ParameterServer:
        """Start accepting workers (and saving checkpoints) in background threads."""
        if self._accept_thread is not None:
            return self
        self._accept_thread = self._spawn(self._accept_loop, "ps-accept")
        if self.checkpoint_path is not None:
            self._spawn(self._checkpoint_loop, "ps-checkpoint")
        self._emit("start", offset=self.offset, numel=self.numel, t=self.center.t)
        logger.info("parameter server listening on %s (shard %d+%d)", self._where, *self._shard)
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
        self._emit("stop", t=self.center.t, exchanges=self._exchanges)

    def __enter__(self) -> ParameterServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state ----------------------------------------------------------------------------

    @property
    def t(self) -> int:
        return self.center.t

    @property
    def _shard(self) -> tuple[int, int]:
        return self.offset, self.numel

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
            }
        for state in ("active", "left", "died", "closed", "rejected"):
            out[state] = sum(s["state"] == state for s in sessions)
        out["bytes_in"] = sum(s["bytes_in"] for s in sessions)
        out["bytes_out"] = sum(s["bytes_out"] for s in sessions)
        out["sessions"] = sessions
        return out

    def snapshot(self, evaluation: bool = False) -> Tensor:
        """A consistent copy of the center shard (or of its evaluation vector)."""
        with self._lock:
            vec = self.center.evaluation_vector() if evaluation else self.center.center
            return vec.clone()

    def save_checkpoint(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Save the center's state and counters atomically (see :func:`atomic_save`)."""
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
            t = int(state["t"])
            state.update(
                format=CHECKPOINT_FORMAT,
                hp=self.hp.to_dict(),
                offset=self.offset,
                numel=self.numel,
                exchanges=exchanges,
                saved_at=time.time(),
            )
            atomic_save(state, target)
            self._saved_t = t
            self._checkpoints += 1
        self._emit("checkpoint", path=str(target), t=t, exchanges=exchanges)
        return target

    # -- internals ------------------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], name: str, *args: Any) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()
        return thread

    def _emit(self, event: str, **fields: Any) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event({"event": event, "time": time.time(), "server": self._where, **fields})
        except Exception:
            logger.exception("on_event callback failed for %s", event)

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
        session = _Session(self, conn, f"{peer[0]}:{peer[1]}")
        try:
            session.run()
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _silence(self, heartbeat_ms: int) -> float | None:
        if self.timeout is not None:
            return self.timeout
        if heartbeat_ms <= 0:
            return None  # the client sends no heartbeat: only EOF and keepalive detect death
        return max(MIN_SILENCE, SILENCE_FACTOR * heartbeat_ms / 1000)

    def _check_request(self, h: Header, *, offset: int | None = None) -> str:
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
        if h.dtype != self._dtype:
            theirs = dtype_from_code(h.dtype)
            return (
                f"payload dtype {theirs}, the center is {self.center.center.dtype}; "
                "send the parameters in the center's dtype"
            )
        return ""


class _Session:
    """One connection's loop on the server: handshake, JOIN, requests, end."""

    def __init__(self, server: ParameterServer, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.stats: SessionStats | None = None
        self.payload: Tensor | None = None
        self.reply: Tensor | None = None

    def run(self) -> None:
        srv = self.server
        try:
            configure_socket(self.sock)
            self.sock.settimeout(HANDSHAKE_TIMEOUT)
            silence = srv._silence(server_handshake(self.sock, srv._secret))
        except AuthenticationError as exc:
            logger.warning("parameter server %s refused %s: %s", srv._where, self.peer, exc)
            srv._emit("auth_failure", peer=self.peer, reason=str(exc))
            return
        except (OSError, ConnectionError) as exc:
            logger.debug("handshake with %s failed: %s", self.peer, exc)
            return
        # A message in flight may wait on the worker sending the other shards first.
        in_flight = max(silence or 0.0, DEFAULT_TIMEOUT)
        while True:
            waiting = True
            self.sock.settimeout(silence)  # for the next request or heartbeat
            try:
                h = recv_header(self.sock)
                waiting = False
                self.sock.settimeout(in_flight)
                if not self._dispatch(h):
                    return
            except TimeoutError:
                if waiting:
                    self._end("died", f"silent for {silence:g} s (no request, no heartbeat)")
                else:
                    self._end("died", f"no progress for {in_flight:g} s in mid-message")
                return
            except (OSError, ConnectionError) as exc:
                if srv._stopping:
                    self._end("closed", "server stopped")
                elif isinstance(exc, PeerClosedError):
                    self._end("died", "connection closed without BYE")
                else:
                    self._end("died", f"{type(exc).__name__}: {exc}")
                return

    def _count(self, bytes_in: int, bytes_out: int) -> None:
        if self.stats is not None:
            self.stats.bytes_in += bytes_in
            self.stats.bytes_out += bytes_out

    def _dispatch(self, h: Header) -> bool:
        """Serve one request; False ends the session."""
        srv = self.server
        if h.cmd == Cmd.PING:
            send_header(self.sock, Cmd.OK, aux=srv.center.t)
            return True
        if h.cmd == Cmd.JOIN:
            return self._join(h)
        if h.cmd == Cmd.PULL:  # no session needed: evaluators pull without joining
            return self._reply_center(h, evaluation=bool(h.aux & 1))
        if self.stats is None:
            return self._reject(h, "the first request of a session must be JOIN")
        if h.cmd == Cmd.BYE:
            # Recorded before the answer, so that a worker's bye() returns after it counts.
            self._end("left", "bye")
            with contextlib.suppress(OSError):
                send_header(self.sock, Cmd.OK, session=self.stats.session_id)
            return False
        if h.cmd in CMD_OP:
            return self._exchange(h)
        return self._reject(h, f"unknown command {h.cmd}")

    def _join(self, h: Header) -> bool:
        srv = self.server
        if self.stats is not None:
            return self._reject(h, "JOIN twice on one connection")
        problem = srv._check_request(h, offset=h.aux)
        if problem:
            return self._reject(h, problem)
        center = srv.center.center
        self.payload, self.reply = torch.empty_like(center), torch.empty_like(center)
        with srv._lock:
            self.reply.copy_(center)
            t = srv.center.t
            sid = srv._next_session
            srv._next_session += 1
            others = [s.session_id for s in srv._sessions if s.worker_id == h.worker_id]
            self.stats = SessionStats(h.worker_id, sid, self.peer, time.time())
            srv._sessions.append(self.stats)
        n_out = send_header(
            self.sock,
            Cmd.OK,
            dtype=srv._dtype,
            flags=int(srv._exchange_cmd),
            worker_id=h.worker_id,
            session=sid,
            numel=srv.numel,
            aux=t,
        )
        send_all(self.sock, tensor_bytes(self.reply))
        self._count(0, n_out + self.reply.numel() * self.reply.element_size())
        logger.info(
            "parameter server %s: worker %d joined (session %d, t=%d%s)",
            srv._where,
            h.worker_id,
            sid,
            t,
            f", rejoin after sessions {others}" if others else "",
        )
        srv._emit("join", worker=h.worker_id, session=sid, peer=self.peer, t=t, rejoin=others)
        return True

    def _exchange(self, h: Header) -> bool:
        srv = self.server
        problem = srv._check_request(h)
        if not problem and h.cmd != srv._exchange_cmd:
            problem = (
                f"this server runs {srv.hp.method}, which answers "
                f"{CMD_OP[srv._exchange_cmd].value!r} exchanges, not {CMD_OP[h.cmd].value!r}; "
                "do all workers and servers use the same method?"
            )
        if problem:
            self._drain(h)
            return self._reject(h, problem)
        assert self.payload is not None and self.reply is not None and self.stats is not None
        recv_exact(self.sock, tensor_bytes(self.payload))
        try:
            with srv._lock:
                srv.center.handle(CMD_OP[h.cmd], self.payload, self.reply)
                srv._exchanges += 1
                self.stats.exchanges += 1
                t = srv.center.t
        except Exception as exc:
            logger.exception("parameter server %s: exchange failed", srv._where)
            send_error(self.sock, ErrorKind.SERVER, f"the server failed: {exc!r}")
            self._end("rejected", f"server error: {exc!r}")
            return False
        n_out = send_header(self.sock, Cmd.OK, dtype=srv._dtype, numel=srv.numel, aux=t)
        send_all(self.sock, tensor_bytes(self.reply))
        nbytes = self.reply.numel() * self.reply.element_size()
        self._count(HEADER.size + nbytes, n_out + nbytes)
        return True

    def _reply_center(self, h: Header, *, evaluation: bool) -> bool:
        srv = self.server
        problem = srv._check_request(h)
        if problem:
            return self._reject(h, problem)
        if self.reply is None:
            self.reply = torch.empty_like(srv.center.center)
        with srv._lock:
            self.reply.copy_(srv.center.evaluation_vector() if evaluation else srv.center.center)
            t = srv.center.t
        n_out = send_header(self.sock, Cmd.OK, dtype=srv._dtype, numel=srv.numel, aux=t)
        send_all(self.sock, tensor_bytes(self.reply))
        self._count(HEADER.size, n_out + self.reply.numel() * self.reply.element_size())
        return True

    def _drain(self, h: Header) -> None:
        """Read and discard a payload we refuse, so the client reads our error, not a reset."""
        dtype = dtype_from_code(h.dtype)
        if dtype is None or h.numel < 0:
            return
        left = h.numel * torch.empty((), dtype=dtype).element_size()
        if left > 1 << 32:
            return
        buf = memoryview(bytearray(min(left, 1 << 20)))
        while left > 0:
            n = self.sock.recv_into(buf[: min(left, len(buf))])
            if n == 0:
                return
            left -= n

    def _reject(self, h: Header, reason: str) -> bool:
        srv = self.server
        logger.warning(
            "parameter server %s rejected worker %d (%s): %s",
            srv._where,
            h.worker_id,
            self.peer,
            reason,
        )
        with contextlib.suppress(OSError):
            send_error(self.sock, ErrorKind.VALUE, reason)
        if self.stats is not None:
            self._end("rejected", reason)
        else:
            srv._emit("reject", worker=h.worker_id, peer=self.peer, reason=reason)
        return False

    def _end(self, state: str, reason: str) -> None:
        if self.stats is None:
            return  # a connection that never joined is not a session
        srv, s = self.server, self.stats
        with srv._lock:
            s.state, s.reason, s.ended_at = state, reason, time.time()
        level = logging.WARNING if state == "died" else logging.INFO
        logger.log(
            level,
            "parameter server %s: worker %d session %d %s (%s) after %d exchanges",
            srv._where,
            s.worker_id,
            s.session_id,
            state,
            reason,
            s.exchanges,
        )
        event = {"left": "bye", "died": "death"}.get(state, state)
        srv._emit(
            event,
            worker=s.worker_id,
            session=s.session_id,
            reason=reason,
            exchanges=s.exchanges,
        )


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
    on_event = _jsonl_writer(Path(events_path)) if events_path is not None else None
    common: dict[str, Any] = {
        "host": host,
        "port": port,
        "secret": secret,
        "checkpoint_every": checkpoint_every,
        "on_event": on_event,
        "timeout": timeout,
    }
    if resume is not None and Path(resume).exists():
        ckpt = checkpoint_path if checkpoint_path is not None else resume
        server = ParameterServer.from_checkpoint(resume, hp=hp, checkpoint_path=ckpt, **common)
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
        path = Path(address_file)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, path)
    server.serve_forever()


def _jsonl_writer(path: Path) -> Callable[[dict[str, Any]], None]:
    lock = threading.Lock()

    def write(event: dict[str, Any]) -> None:
        with lock, path.open("a") as f:
            f.write(json.dumps(event, default=str) + "\n")

    return write
