"""The overlapped asynchronous exchange: a worker's throughput with exchanges off, blocking
and overlapped, side by side.

One worker trains the exchange benchmark's 4.6M-parameter MLP (batch 8, one torch thread;
``benchmarks.exchange.LoopVariant``) against one parameter server in another process (one
torch thread, frames authenticated with a shared secret, as ``easgd train`` runs them), on
loopback; each exchanging row names its transport: ``tcp`` (every body through the socket,
``PSClient(shm=False)``) or ``shm`` (the bodies through memory shared with the server,
:mod:`easgd.comm.shm`, the default on one host). Rows, each a run of ``--steps`` local
steps, interleaved over ``--repeats``:

* ``local``: no exchange: the gradient and the local step alone (the baseline);
* ``local + copies``: no exchange either, but the two passes over x that an overlapped
  exchange costs the computing thread at every exchange (``sent = x``, ``x -= d``), at each
  step as at tau = 1: the ceiling of any overlapped worker at tau = 1 on this machine,
  whatever the transport and however fast the server; ``local + pull`` and ``local +
  copy`` take one of the two passes each (full runs only);
* ``blocking tau=T``: asynchronous EASGD, ``Worker(overlap=0)``: the worker waits for every
  reply (``PSClient.serve``);
* ``overlap tau=T K=K``: ``Worker(overlap=K)``: the exchange goes out on the client's
  background thread and its reply is applied K steps later, where the worker waits only
  for what has not arrived yet.

Reported: steps per second (median), the ratio to ``local``, the seconds per step the worker
was blocked by exchanges (a blocking exchange's round trip; an overlapped one's wait for
its reply), the worker process's CPU per step (its computing thread and the client's
background thread together) and the server process's CPU per exchange. The issue's target: at tau =
1, the overlapped worker at >= 0.9x the throughput of ``local``.

Usage, from the repository root::

    python -m benchmarks.overlap [--quick] [--steps 40] [--repeats 5] [--json PATH]

The figures and what limits them: ``benchmarks/RESULTS.md``, section 14.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from typing import Any

import torch

from benchmarks._common import (
    base_parser,
    interleaved,
    machine_info,
    median,
    print_table,
    ratio,
    single_thread,
    write_json,
)

#: (name, tau, overlap K, compress, transport) of every exchanging row; ``local`` is the
#: baseline.
ROWS = (("blocking", 1, 0, "none", "tcp"), ("overlap", 1, 1, "none", "tcp"),
        ("blocking", 1, 0, "none", "shm"), ("overlap", 1, 1, "none", "shm"),
        ("blocking", 1, 0, "int8", "tcp"), ("overlap", 1, 1, "int8", "tcp"),
        ("overlap", 1, 1, "int8", "shm"),
        ("blocking", 10, 0, "none", "tcp"), ("overlap", 10, 10, "none", "tcp"),
        ("blocking", 10, 0, "none", "shm"), ("overlap", 10, 10, "none", "shm"))  # fmt: skip
QUICK_ROWS = (("blocking", 1, 0, "none", "tcp"), ("overlap", 1, 1, "none", "shm"))
#: Rows without a transport: the passes over x that Worker(overlap=) makes on the computing
#: thread at each exchange (the last exchange's pull ``x -= d``, the copy ``sent = x``).
CEILINGS = {"local + copies": (True, True), "local + pull": (True, False),
            "local + copy": (False, True)}  # fmt: skip
QUICK_CEILINGS = ("local + copies",)
LR = 1e-4  # small: the benchmark measures time, and the run must stay finite
SECRET = os.urandom(16).hex()


def _server(numel: int, secret: str, ready: Any, stop: Any, cpu: Any) -> None:
    """The parameter server's process: serve until ``stop``, report its CPU seconds."""
    single_thread()
    from easgd.algorithms import Hyperparams
    from easgd.comm.ps import ParameterServer

    hp = Hyperparams(method="easgd", lr=LR, tau=1, workers=4)  # a client per codec, transport
    with ParameterServer(hp, torch.zeros(numel), secret=secret, timeout=600) as server:
        ready.put(server.address)
        while not stop.wait(0.05):
            cpu.value = time.process_time()
        cpu.value = time.process_time()


class _Timed:
    """A transport's ``serve``, timed: the seconds the worker spent blocked in it."""

    def __init__(self, serve: Any) -> None:
        self.serve, self.seconds = serve, 0.0

    def __call__(self, req: Any) -> None:
        t0 = time.perf_counter()
        self.serve(req)
        self.seconds += time.perf_counter() - t0


def _name(kind: str, tau: int, k: int, compress: str, transport: str) -> str:
    return (
        f"{kind} tau={tau}"
        + (f" K={k}" if k else "")
        + (f" {compress}" if compress != "none" else "")
        + f" {transport}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("overlap", __doc__)
    parser.add_argument("--steps", type=int, default=None, help="local steps per run (40)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (5)")
    args = parser.parse_args(argv)
    single_thread()
    from benchmarks import exchange
    from easgd.algorithms import Hyperparams, Mode, Worker, local_step_, run_settle, run_step
    from easgd.comm.ps import PSClient

    steps = args.steps or (6 if args.quick else 40)
    repeats = args.repeats or (1 if args.quick else 5)
    rows = QUICK_ROWS if args.quick else ROWS
    loop = exchange.LoopVariant("loop_local")
    x, g = loop.flat.params, loop.flat.grads
    numel = loop.flat.numel
    info = machine_info()

    ctx = mp.get_context("spawn")
    ready, stop, cpu = ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    proc = ctx.Process(target=_server, args=(numel, SECRET, ready, stop, cpu), daemon=True)
    proc.start()
    samples: dict[str, list[dict[str, float]]] = {}
    try:
        address = ready.get(timeout=300)
        kinds = sorted({(r[3], r[4]) for r in rows})  # a client per codec and transport
        clients = {k: PSClient([address], numel, worker_id=i, secret=SECRET, timeout=600,
                               compress=k[0], shm=k[1] == "shm")
                   for i, k in enumerate(kinds)}  # fmt: skip
        try:
            for client in clients.values():
                client.start(x)
            ceilings = QUICK_CEILINGS if args.quick else tuple(CEILINGS)
            names = ["local", *ceilings] + [_name(*r) for r in rows]
            sent, pull = torch.zeros_like(x), torch.zeros_like(x)  # d = 0: x is unchanged
            spec = {_name(*r): r for r in rows}
            for _, name in interleaved(names, repeats):
                worker = None
                client = next(iter(clients.values()))
                if name != "local" and name not in CEILINGS:
                    _, tau, k, compress, transport = spec[name]
                    client = clients[compress, transport]
                    hp = Hyperparams(method="easgd", lr=LR, tau=tau, workers=4)
                    worker = Worker(hp, x, Mode.ASYNC, grad=g, overlap=k)
                serve = _Timed(client.serve)
                exchanges0, cpu0 = client.exchanges, cpu.value
                start, own0 = time.perf_counter(), time.process_time()
                for _ in range(steps):
                    if worker is None:
                        pulls, copies = CEILINGS.get(name, (False, False))
                        if pulls:  # Worker(overlap=) at each exchange: the last one's pull,
                            x.sub_(pull)
                        if copies:  # ... and the copy of x that is sent
                            sent.copy_(x)
                        loop.grad(x, g)
                        local_step_(x, g, lr=LR)
                    else:
                        run_step(worker, loop.grad, serve)
                if worker is not None:
                    run_settle(worker, serve)
                blocked = serve.seconds
                wall, own = time.perf_counter() - start, time.process_time() - own0
                time.sleep(0.1)  # the server's CPU counter is sampled every 50 ms
                done = client.exchanges - exchanges0 if worker is not None else 0
                samples.setdefault(name, []).append({
                    "steps_per_s": steps / wall,
                    "blocked_ms_per_step": 1e3 * blocked / steps,
                    "worker_cpu_ms_per_step": 1e3 * own / steps,
                    "server_cpu_ms_per_exchange": 1e3 * ratio(cpu.value - cpu0, done)
                    if done else 0.0,
                })  # fmt: skip
        finally:
            for client in clients.values():
                client.close()
    finally:
        stop.set()
        proc.join(timeout=60)
        if proc.is_alive():
            proc.terminate()
            proc.join()

    base = median([s["steps_per_s"] for s in samples["local"]])
    table = []
    for name, runs in samples.items():
        sps = median([r["steps_per_s"] for r in runs])
        table.append({
            "row": name,
            "steps_per_s": sps,
            "ratio": ratio(sps, base),
            "blocked_ms_per_step": median([r["blocked_ms_per_step"] for r in runs]),
            "worker_cpu_ms_per_step": median([r["worker_cpu_ms_per_step"] for r in runs]),
            "server_cpu_ms_per_exchange": median([r["server_cpu_ms_per_exchange"] for r in runs]),
            "runs": runs,
        })  # fmt: skip
    print_table(
        f"One worker, {numel:,}-parameter MLP (batch {exchange.LOOP_BATCH}), one server "
        f"process, loopback, {steps} steps x {repeats} repeats; ratio = steps/s / local's",
        ["row", "steps_per_s", "ratio", "blocked_ms_per_step", "worker_cpu_ms_per_step",
         "server_cpu_ms_per_exchange"],
        [[r["row"], r["steps_per_s"], r["ratio"], r["blocked_ms_per_step"],
          r["worker_cpu_ms_per_step"], r["server_cpu_ms_per_exchange"]] for r in table],
    )  # fmt: skip
    write_json(
        args.json,
        {
            "benchmark": "overlap",
            "quick": args.quick,
            "machine": info,
            "settings": {
                "numel": numel,
                "steps": steps,
                "repeats": repeats,
                "batch": exchange.LOOP_BATCH,
                "lr": LR,
            },
            "rows": table,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
