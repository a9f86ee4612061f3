"""Run under torchrun: the EASGD wrapper around plain SGD on the simulator's quadratic.

Prints (rank 0) the center and the workers' variables as JSON, to be compared with
``easgd.sim.simulate(Quadratic(...), ..., schedule="sync")``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

from easgd.optim import EASGD, LocalSGD
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
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    problem = Quadratic(h=1.0, sigma=args.sigma, x0=1.0, dim=args.dim)
    grad_fn = problem.grad_fn(rank, args.seed)  # the simulator's noise stream of this worker
    x = torch.nn.Parameter(problem.initial_point())
    local = torch.optim.SGD([x], lr=args.lr)
    wrap = EASGD if args.method == "easgd" else LocalSGD
    opt = wrap(local, tau=args.tau)
    for _ in range(args.steps):
        opt.zero_grad()
        g = torch.empty_like(x)
        grad_fn(x.detach(), g)
        x.grad = g
        opt.step()
    opt.finish()
    workers = [torch.empty_like(x.detach()) for _ in range(world)]
    dist.all_gather(workers, x.detach().clone())
    if rank == 0:
        print(json.dumps({"center": opt.center.tolist(), "workers": [w.tolist() for w in workers]}))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    # Leave without running C++ static destructors: gloo's threads can abort the process
    # ("terminate called without an active exception") when torn down at interpreter exit.
    os._exit(0)


if __name__ == "__main__":
    main()
