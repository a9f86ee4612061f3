"""A user's own training loop with elastic averaging, launched by torchrun.

    torchrun --standalone --nproc-per-node 2 examples/own_loop.py --steps 300

Each rank trains its own replica of a plain PyTorch model on its own shuffled stream of
scikit-learn's digits; every ``--tau`` steps the EASGD wrapper pulls the replicas toward the
center (one flat all_reduce). At the end rank 0 evaluates the center. Nothing here is specific
to easgd except the two marked lines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits

import easgd.optim  # (1) the only import easgd needs


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tau", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train_x, train_y, test_x, test_y = x[:1400], y[:1400], x[1400:], y[1400:]

    torch.manual_seed(0)  # same init everywhere (the wrapper also broadcasts rank 0's)
    model = Net()
    local = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True)
    opt = easgd.optim.EASGD(local, tau=args.tau)  # (2) wrap the optimizer

    gen = torch.Generator().manual_seed(1000 + rank)  # each worker its own data order
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(args.steps):
        idx = torch.randint(len(train_x), (args.batch_size,), generator=gen)
        opt.zero_grad()
        loss = loss_fn(model(train_x[idx]), train_y[idx])
        loss.backward()
        opt.step()
    opt.finish()  # (3) complete the exchange still in flight (overlapped with local steps)

    center = Net()
    opt.center_model_(center)
    with torch.no_grad():
        error = (center(test_x).argmax(1) != test_y).float().mean().item()
    # Every rank holds the same center: check it, as a user might.
    c = opt.center.clone()
    dist.all_reduce(c)
    same = torch.allclose(c / dist.get_world_size(), opt.center)
    if rank == 0:
        print(json.dumps({"center_test_error": error, "centers_agree": same,
                          "steps": args.steps, "workers": dist.get_world_size()}))  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    # Leave without running C++ static destructors: gloo's threads can abort the process
    # ("terminate called without an active exception") when torn down at interpreter exit.
    os._exit(0)


if __name__ == "__main__":
    main()
