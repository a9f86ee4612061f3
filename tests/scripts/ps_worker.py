"""A worker or a server process for the parameter-server fault tests (tests/test_ps.py).

worker: joins, writes what it pulled (``--out``), then PUSH_PULLs a payload of ones until
``--exchanges`` are done or SIGTERM arrives, then says BYE. Every reply must be a consistent
center (all entries equal, since every update adds 1 everywhere); a torn read exits 3.

server: runs :func:`easgd.comm.ps.serve` for a DOWNPOUR center of zeros (``--events``: its
events as JSON lines).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch

from easgd.algorithms import Hyperparams, Op, Request
from easgd.comm.ps import PSClient, serve


def worker(args: argparse.Namespace) -> int:
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    x = torch.empty(args.numel)
    client = PSClient([("127.0.0.1", args.port)], args.numel, worker_id=args.worker_id)
    client.join(x)
    if args.out:
        tmp = f"{args.out}.tmp"
        torch.save({"x": x.clone(), "t": client.join_t[0]}, tmp)
        os.replace(tmp, args.out)
    ones = torch.ones(args.numel)
    done = 0
    while not stop and (args.exchanges is None or done < args.exchanges):
        client.serve(Request(Op.PUSH_PULL, ones, x))
        if not bool((x == x[0]).all()):
            return 3
        done += 1
        time.sleep(args.sleep)
    client.close()  # clean: a goodbye
    return 0


def server(args: argparse.Namespace) -> int:
    hp = Hyperparams(method="downpour", lr=0.1, tau=1, workers=3)
    serve(
        hp,
        torch.zeros(args.numel),
        address_file=args.address_file,
        checkpoint_path=args.checkpoint,
        checkpoint_every=0.2,
        events_path=args.events,
    )
    return 0


def main() -> int:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("worker", "server"))
    parser.add_argument("--numel", type=int, default=1000)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--worker-id", type=int, default=0)
    parser.add_argument("--exchanges", type=int, default=None)
    parser.add_argument("--sleep", type=float, default=0.005)
    parser.add_argument("--out", default=None)
    parser.add_argument("--address-file", default=None)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--events", default=None)
    args = parser.parse_args()
    return worker(args) if args.role == "worker" else server(args)


if __name__ == "__main__":
    sys.exit(main())
