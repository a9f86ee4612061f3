"""Asynchronous parameter server: the center variable, served over plain TCP sockets.

A :class:`ParameterServer` owns one contiguous shard ``[offset, offset + n)`` of the flat
center (S servers split a vector of N floats as :func:`shard_ranges` says) and answers every
worker on that worker's own clock. A :class:`PSClient` talks to all S servers and fulfils
the requests of :class:`easgd.algorithms.Worker` (``run_step(worker, grad_fn, client.serve)``).
All arithmetic is :meth:`easgd.algorithms.Center.handle`, called under the server's lock:
one round trip per exchange, atomic on the server, so no update is lost and no read is torn.

Transport: plain TCP sockets rather than a two-rank gloo group per worker session, because
a dead peer is then detected deterministically on exactly one connection (EOF or reset at
once, a timeout for a silent one), a rejoin is just a new connection, and there is no
``torch.distributed`` state (world size, store, pairs) that one dead peer can poison.
Measurements: ``benchmarks/RESULTS.md``, "Transport choice".

Protocol (:mod:`easgd.comm.wire`): an HMAC handshake, then JOIN (reply: the current center
shard and the server's hyperparameters, ``PSClient.server_hp``; a new or restarted worker
starts from the center), then exchanges
(``Op.ELASTIC``: x -> d; ``Op.PUSH_PULL``: acc -> center; ``Op.GRAD_PULL``: g -> center),
PULL (the center or the evaluation vector, no update), PING (heartbeat), CONTROL (a JSON
message for the server: :func:`send_control`) and BYE (``BYE_DONE``: the worker finished
its budget). One TCP connection is one session; payloads are the raw bytes of the shard in
the center's dtype, received in place into buffers a session allocates at its first
exchange.

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
  Never a silent hang. With ``reconnect_timeout`` the client instead dials the shard again
  (at the address ``resolve`` gives: a restarted server's), with backoff, re-sends the sum
  of its updates the restarted shard's checkpoint lacks (``MethodSpec.recoverable``; see
  :mod:`easgd.comm.wire`, "Recovery") and finishes the interrupted exchange, so no update of
  a live worker is lost; ``server_lost``/``server_back`` events say so.
* A session the server declared dead (silent too long) is told so by an ERROR frame: the
  worker that wakes up reads "declared dead", not that the server died.
* Bad input (another model size, dtype or method) is answered with a clear error and the
  session is closed; the worker raises ``ValueError`` with the server's explanation.
* The center is saved atomically, with a SHA-256 digest and its metadata
  (:func:`easgd.runlog.save_checkpoint`, keeping the previous file as ``*.prev.pt``), every
  ``checkpoint_every`` seconds (5 s) when it changed, and on :meth:`ParameterServer.stop`;
  :meth:`ParameterServer.from_checkpoint` verifies it (falling back to the previous one)
  and restarts with the center's clock, momentum, average, counters and checkpoint number.
* The server binds to 127.0.0.1; on any other address it requires a shared secret
  (``secret=`` or ``EASGD_SECRET``) and authenticates every connection (HMAC-SHA256
  challenge-response, both directions). A wrong or missing secret is refused with
  :class:`AuthenticationError`. With a secret, every frame after the handshake is
  authenticated with per-session keys and per-direction sequence numbers (Poly1305 with
  ``cryptography``, else HMAC-SHA256): a frame altered, replayed, reordered or dropped in
  transit is an :class:`IntegrityError`, detected before anything in it is used; the server
  ends that session as ``rejected`` (an ``auth_failure`` event) with its center untouched.
* Optional TLS (``PSClient(tls=client_tls_context(ca))``, the server's
  ``server_tls_context(cert, key)``) encrypts the stream; a client that verifies the
  server's certificate relies on the TLS records instead of the frames' own tags.
* The server bounds what a peer can hold: the whole handshake within 10 s of the accept,
  every frame within 30 s of its first byte (plus its size at 1 MB/s), no shard-sized
  memory for a session that has not exchanged (:mod:`.ps_session`).

Example::

    server = ParameterServer(hp, torch.zeros(n)).start()
    with PSClient([server.address], n, worker_id=0) as client:  # a Transport
        client.start(x)  # join: x becomes the center; client.server_hp is the server's hp
        for _ in range(steps):
            run_step(worker, grad_fn, client.serve)
    server.stop()  # leaving the with block said goodbye: recorded as "left", not "died"

Modules: :mod:`.ps_server` (the server: lifecycle, accept loop, checkpoint loop, stats,
:func:`serve`), :mod:`.ps_session` (one connection's protocol loop), :mod:`.ps_checkpoint`
(the checkpoint file), :mod:`.ps_client` (the worker's side), :mod:`.wire` (the bytes).
"""

from easgd.comm.ps_checkpoint import CHECKPOINT_FORMAT, read_checkpoint
from easgd.comm.ps_client import (
    DEFAULT_HEARTBEAT,
    DEFAULT_TIMEOUT,
    PSClient,
    PSConnectionError,
    send_control,
)
from easgd.comm.ps_server import DEFAULT_CHECKPOINT_EVERY, DEFAULT_HOST, ParameterServer, serve
from easgd.comm.ps_session import SessionState, SessionStats
from easgd.comm.wire import (
    AuthenticationError,
    IntegrityError,
    client_tls_context,
    server_tls_context,
    shard_ranges,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "DEFAULT_CHECKPOINT_EVERY",
    "DEFAULT_HEARTBEAT",
    "DEFAULT_HOST",
    "DEFAULT_TIMEOUT",
    "AuthenticationError",
    "IntegrityError",
    "PSClient",
    "PSConnectionError",
    "ParameterServer",
    "SessionState",
    "SessionStats",
    "client_tls_context",
    "read_checkpoint",
    "send_control",
    "serve",
    "server_tls_context",
    "shard_ranges",
]
