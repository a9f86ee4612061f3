"""Run under torchrun: the EASGD wrapper around plain SGD on the simulator's quadratic.

Prints (rank 0) the center and the workers' variables as JSON, to be compared with
``easgd.sim.simulate(Quadratic(...), ..., schedule="sync")``. ``--method eamsgd`` is the
paper's EAMSGD (``easgd.optim.EAMSGD``; it also prints the workers' momenta); ``--method
diloco`` is ``easgd.optim.DiLoCo`` around SGD (``--inner adamw``: around AdamW; it also
prints the outer momentum).

Faults to inject: ``--skip RANK:STEP`` (that rank does not call ``step()`` at that
iteration); ``--scaler`` runs the steps through ``torch.amp.GradScaler`` and ``--inf
RANK:STEP`` puts an inf in that rank's gradient at that iteration. Every rank then prints
one JSON line: its step counter, or the ``OutOfStepError`` it raised.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

from easgd.comm.allreduce import OutOfStepError
from easgd.optim import EAMSGD, EASGD, DiLoCo, LocalSGD
from easgd.sim import Quadratic


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="easgd")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tau", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--dim", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--skip", default=None)
    parser.add_argument("--inf", default=None)
    parser.add_argument("--scaler", action="store_true")
    parser.add_argument("--compress", default="none")
    parser.add_argument(
        "--peek",
        type=int,
        default=None,
        help="this rank reads the center after every step (a settle on one rank alone)",
    )
    parser.add_argument("--outer-lr", type=float, default=0.7)
    parser.add_argument("--outer-momentum", type=float, default=0.9)
    parser.add_argument("--inner", choices=["sgd", "adamw"], default="sgd")
    args = parser.parse_args()
    skip = tuple(map(int, args.skip.split(":"))) if args.skip else None
    inf = tuple(map(int, args.inf.split(":"))) if args.inf else None
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    problem = Quadratic(h=1.0, sigma=args.sigma, x0=1.0, dim=args.dim)
    grad_fn = problem.grad_fn(rank, args.seed)  # the simulator's noise stream of this worker
    x = torch.nn.Parameter(problem.initial_point())
    if args.method == "eamsgd":
        opt = EAMSGD([x], lr=args.lr, momentum=args.momentum, tau=args.tau,
                     compress=args.compress)  # fmt: skip
    elif args.method == "diloco":
        inner = (
            torch.optim.AdamW([x], lr=args.lr, weight_decay=0.1)
            if args.inner == "adamw"
            else torch.optim.SGD([x], lr=args.lr)
        )
        opt = DiLoCo(inner, tau=args.tau, outer_lr=args.outer_lr,
                     outer_momentum=args.outer_momentum)  # fmt: skip
    elif args.method == "easgd":
        opt = EASGD(torch.optim.SGD([x], lr=args.lr), tau=args.tau, compress=args.compress)
    else:
        opt = LocalSGD(torch.optim.SGD([x], lr=args.lr), tau=args.tau)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0) if args.scaler else None
    try:
        for i in range(args.steps):
            opt.zero_grad()
            g = torch.empty_like(x)
            grad_fn(x.detach(), g)
            if inf == (rank, i):
                g[0] = float("inf")
            if scaler is not None:
                g.mul_(scaler.scale(torch.ones(())).item())  # backward of a scaled loss
            x.grad = g
            if skip == (rank, i):
                continue
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            if args.peek is not None:
                if args.peek == rank:
                    _ = opt.center  # settles the exchange in flight on this rank only
                # and every rank logs its loss, as training loops do: a collective of its own
                dist.all_reduce(torch.ones(1))
        opt.finish()
    except OutOfStepError as error:
        print(json.dumps({"rank": rank, "error": str(error)}), flush=True)
        os._exit(0)
    if skip is not None or inf is not None:
        scale = None if scaler is None else scaler.get_scale()
        print(json.dumps({"rank": rank, "t": opt.worker.t, "scale": scale}), flush=True)
        dist.barrier()
        os._exit(0)
    workers = [torch.empty_like(x.detach()) for _ in range(world)]
    dist.all_gather(workers, x.detach().clone())
    momenta = None
    if opt.worker.v is not None:  # EAMSGD: the momenta, after the pending look-ahead
        momenta = [torch.empty_like(x.detach()) for _ in range(world)]
        dist.all_gather(momenta, opt.worker.v.clone())
    if rank == 0:
        out = {"center": opt.center.tolist(), "workers": [w.tolist() for w in workers]}
        out["momenta"] = None if momenta is None else [m.tolist() for m in momenta]
        outer_v = opt.worker.outer_v
        out["outer_v"] = None if outer_v is None else outer_v.tolist()
        print(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    # Leave without running C++ static destructors: gloo's threads can abort the process
    # ("terminate called without an active exception") when torn down at interpreter exit.
    os._exit(0)


if __name__ == "__main__":
    main()
