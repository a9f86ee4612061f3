"""What one exchange of the flat parameter vector costs, transport by transport.

Runs side by side, interleaved (each repeat runs every row once, in a rotating order), and
reports medians:

* ``gloo_echo``: raw gloo send/recv of the flat vector to a second process and back (the
  floor every other row is divided by);
* ``gloo_echo_elastic``: the same echo with the asynchronous elastic arithmetic
  (``elastic_exchange_``) done on the echo side, i.e. a parameter server without a server;
* ``gloo_10_tensors`` / ``gloo_100_tensors``: the same bytes as 10 or 100 per-layer
  tensors, one message each (the seed report's anti-pattern);
* ``ps_elastic``: one asynchronous elastic exchange through :class:`easgd.comm.ps`
  (``client.serve(Request(Op.ELASTIC, x, d))``), the server in its own process.

Usage::

    python benchmarks/exchange.py [--quick] [--numel 5000000] [--repeats N] [--json PATH]

Every process runs one torch thread. Add a row by appending to ``ROWS`` (and, when the
echo side must act, a mode to ``_PEER_MODES``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from easgd.algorithms import (
    Hyperparams,
    Op,
    Request,
    elastic_center_sync_,
    elastic_difference_,
    elastic_exchange_,
)
from easgd.comm.allreduce import AllReduceTransport
from easgd.comm.ps import PSClient, serve

HP = Hyperparams(method="easgd", lr=0.01, tau=1, workers=4)
SYNC_HP = Hyperparams(method="easgd", lr=0.01, tau=1, workers=2)  # the 2-rank gloo world


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _init_gloo(rank: int, port: int) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=60),
    )


# ---------------------------------------------------------------------------------------
# The echo side (rank 1): told by a control message what to do next.
# ---------------------------------------------------------------------------------------


def _peer_echo(buf: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
    dist.recv(buf, 0)
    dist.send(buf, 0)


def _peer_elastic(buf: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
    dist.recv(buf, 0)
    elastic_exchange_(state["center"], buf, HP.alpha, state["d"])
    dist.send(state["d"], 0)


def _peer_chunks(pieces: int) -> Callable[[torch.Tensor, dict[str, torch.Tensor]], None]:
    def run(buf: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        chunks = buf.tensor_split(pieces)
        for c in chunks:
            dist.recv(c, 0)
        for c in chunks:
            dist.send(c, 0)

    return run


def _peer_allreduce(buf: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
    dist.all_reduce(buf)


def _sync_exchange(x: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
    """One synchronous EASGD exchange, as ``Worker.step`` does it with ``AllReduceTransport``:
    elastic difference, ONE flat all-reduce of the sum, the center update, the worker's pull."""
    d, total, center = state["d"], state["sum"], state["center"]
    elastic_difference_(d, x, center, SYNC_HP.alpha)
    total.copy_(d)
    AllReduceTransport().serve(Request(Op.SUM, total))
    elastic_center_sync_(center, total, SYNC_HP.alpha, SYNC_HP.beta, SYNC_HP.workers)
    x.sub_(d)


def _peer_sync(buf: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
    _sync_exchange(buf, state)


_PEER_MODES: dict[int, Callable[[torch.Tensor, dict[str, torch.Tensor]], None]] = {
    1: _peer_echo,
    2: _peer_elastic,
    3: _peer_chunks(10),
    4: _peer_chunks(100),
    5: _peer_allreduce,
    6: _peer_sync,
}


def _gloo_peer(port: int, numel: int) -> None:
    torch.set_num_threads(1)
    _init_gloo(1, port)
    buf = torch.empty(numel)
    state = {"center": torch.zeros(numel), "d": torch.empty(numel), "sum": torch.empty(numel)}
    ctrl = torch.zeros(1, dtype=torch.int64)
    try:
        while True:
            dist.recv(ctrl, 0)
            mode = int(ctrl.item())
            if mode < 0:
                return
            _PEER_MODES[mode](buf, state)
    finally:
        dist.destroy_process_group()


def _server_main(numel: int, address_file: str) -> None:
    serve(HP, torch.zeros(numel), address_file=address_file, num_threads=1)


# ---------------------------------------------------------------------------------------
# The measuring side (rank 0 and the parameter-server client).
# ---------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    description: str
    run: Callable[[], None]


def _gloo_row(mode: int, body: Callable[[], None]) -> Callable[[], None]:
    ctrl = torch.tensor([mode], dtype=torch.int64)

    def run() -> None:
        dist.send(ctrl, 1)
        body()

    return run


def build_rows(x: torch.Tensor, d: torch.Tensor, client: PSClient) -> list[Row]:
    sync_state = {"center": torch.zeros_like(x), "d": torch.empty_like(x),
                  "sum": torch.empty_like(x)}  # fmt: skip

    def echo() -> None:
        dist.send(x, 1)
        dist.recv(d, 1)

    def chunks(pieces: int) -> Callable[[], None]:
        xs, ds = x.tensor_split(pieces), d.tensor_split(pieces)

        def run() -> None:
            for c in xs:
                dist.send(c, 1)
            for c in ds:
                dist.recv(c, 1)

        return run

    return [
        Row("gloo_echo", "raw gloo send/recv echo of the flat vector", _gloo_row(1, echo)),
        Row(
            "gloo_echo_elastic",
            "gloo echo + elastic_exchange_ on the echo side",
            _gloo_row(2, echo),
        ),
        Row("gloo_10_tensors", "gloo echo as 10 per-layer tensors", _gloo_row(3, chunks(10))),
        Row("gloo_100_tensors", "gloo echo as 100 per-layer tensors", _gloo_row(4, chunks(100))),
        Row(
            "ps_elastic",
            "asynchronous elastic exchange through easgd.comm.ps",
            lambda: client.serve(Request(Op.ELASTIC, x, d)),
        ),
        Row("allreduce_raw", "one raw gloo all_reduce of the flat vector (2 ranks)",
            _gloo_row(5, lambda: dist.all_reduce(x))),
        Row("allreduce_sync_easgd", "one synchronous EASGD exchange (easgd.comm.allreduce)",
            _gloo_row(6, lambda: _sync_exchange(x, sync_state))),
    ]  # fmt: skip


def measure(rows: list[Row], repeats: int, warmup: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {r.name: [] for r in rows}
    for i in range(warmup + repeats):
        shift = i % len(rows)
        for row in rows[shift:] + rows[:shift]:
            start = time.perf_counter()
            row.run()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                samples[row.name].append(elapsed * 1e3)
    return samples


def _wait_for(path: Path, proc: Any, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if not proc.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the parameter server did not start (exit code {proc.exitcode})")
        time.sleep(0.02)
    info: dict[str, Any] = json.loads(path.read_text())
    return info


def run(numel: int, repeats: int, warmup: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        address_file = Path(tmp) / "server.json"
        server = ctx.Process(target=_server_main, args=(numel, str(address_file)), daemon=True)
        peer = ctx.Process(target=_gloo_peer, args=(port, numel), daemon=True)
        server.start()
        peer.start()
        client: PSClient | None = None
        gloo = False
        try:
            _init_gloo(0, port)
            gloo = True
            info = _wait_for(address_file, server)
            client = PSClient([(info["host"], info["port"])], numel, worker_id=0)
            x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
            d = torch.empty(numel)
            client.join(d)
            samples = measure(build_rows(x, d, client), repeats, warmup)
        finally:
            if client is not None:
                client.bye()
            if gloo:
                if peer.is_alive():
                    dist.send(torch.tensor([-1], dtype=torch.int64), 1)
                dist.destroy_process_group()
            if server.pid is not None and server.is_alive():
                os.kill(server.pid, signal.SIGTERM)
            for proc in (peer, server):
                proc.join(timeout=20)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
    base = statistics.median(samples["gloo_echo"])
    base_allreduce = statistics.median(samples["allreduce_raw"])
    rows = []
    for name, ms in samples.items():
        median = statistics.median(ms)
        # Asynchronous rows compare with the raw echo; synchronous ones with the raw all-reduce.
        sync_row = name.startswith("allreduce")
        rows.append(
            {
                "name": name,
                "median_ms": median,
                "ratio": median / (base_allreduce if sync_row else base),
                "baseline": "allreduce_raw" if sync_row else "gloo_echo",
                "min_ms": min(ms),
                "max_ms": max(ms),
                "samples_ms": ms,
            }
        )
    return {
        "numel": numel,
        "bytes": numel * 4,
        "repeats": repeats,
        "warmup": warmup,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small vector, few repeats (~15 s)")
    parser.add_argument("--numel", type=int, default=None, help="floats (default 5000000)")
    parser.add_argument("--repeats", type=int, default=None, help="measured repeats (20)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    numel = args.numel or (200_000 if args.quick else 5_000_000)
    repeats = args.repeats or (5 if args.quick else 20)
    result = run(numel, repeats, warmup=1 if args.quick else 3)
    result["quick"] = args.quick
    print(f"exchange of {numel} float32 ({numel * 4 / 1e6:.1f} MB), median of {repeats}")
    print(f"{'row':<22} {'ms':>9} {'ratio':>7}  baseline")
    for row in result["rows"]:
        print(f"{row['name']:<22} {row['median_ms']:>9.2f} {row['ratio']:>7.2f}  {row['baseline']}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
