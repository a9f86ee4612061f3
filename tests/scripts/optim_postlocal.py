"""Run under torchrun: easgd's LocalSGD against PyTorch's PostLocalSGDOptimizer.

Each rank trains two identical copies of a small network on the same batches, one under
``easgd.optim.LocalSGD(tau=k)`` and one under ``PostLocalSGDOptimizer`` with
``PeriodicModelAverager(period=k, warmup_steps=k - 1)``, and prints (rank 0) whether the
two end bitwise equal, with the largest difference.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.distributed.optim import PostLocalSGDOptimizer

from easgd.optim import LocalSGD


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=23)
    parser.add_argument("--tau", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=None, help="default: tau - 1")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    theirs = copy.deepcopy(ours)
    opt = LocalSGD(torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9), tau=args.tau)
    warmup = args.tau - 1 if args.warmup is None else args.warmup
    averager = PeriodicModelAverager(period=args.tau, warmup_steps=warmup)
    ref = PostLocalSGDOptimizer(torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9),
                                averager)  # fmt: skip
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
    for _ in range(args.steps):
        x, y = torch.randn(16, 6, generator=gen), torch.randint(3, (16,), generator=gen)
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            o.step()
    opt.settle()
    diffs = [
        (a - b).abs().max().item()
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True)
    ]
    equal = all(
        torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters(), strict=True)
    )
    flags = torch.tensor([1.0 if equal else 0.0])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    if rank == 0:
        print(json.dumps({"bitwise_equal": bool(flags.item() == 1.0), "max_diff": max(diffs)}))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
