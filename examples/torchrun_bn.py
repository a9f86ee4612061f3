"""A standard PyTorch training script with elastic averaging, launched by torchrun.

    torchrun --standalone --nproc-per-node 2 examples/torchrun_bn.py --epochs 6

What a PyTorch user's script usually has, unchanged: its own network with batch norm, a
``DataLoader`` over a ``DistributedSampler`` (each rank its own shard, reshuffled every
epoch), a learning-rate scheduler stepped every iteration, and mixed precision (bfloat16
autocast, or float16 with a ``GradScaler`` where the scaler is wanted). The lines marked
``(easgd)`` are all that elastic averaging needs. At the end every rank holds the same
center; rank 0 evaluates it twice, as averaged (its batch-norm statistics are the replicas'
running statistics averaged into the center with the parameters) and after re-estimating
them with ``torch.optim.swa_utils.update_bn``, and prints both as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import easgd.optim  # (easgd)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def digits() -> tuple[TensorDataset, TensorDataset]:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    return TensorDataset(x[:1400], y[:1400]), TensorDataset(x[1400:], y[1400:])


@torch.no_grad()
def test_error(model: nn.Module, test: TensorDataset) -> float:
    model.eval()
    x, y = test.tensors
    return (model(x).argmax(1) != y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--tau", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--amp", choices=("bf16", "fp16", "off"), default="bf16")
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    train, test = digits()
    sampler = DistributedSampler(train, shuffle=True, seed=0)  # each rank its own shard
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    torch.manual_seed(0)
    model = Net()
    local = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                            weight_decay=1e-4)  # fmt: skip
    opt = easgd.optim.EASGD(local, tau=args.tau, model=model)  # (easgd) buffers averaged too
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * len(loader)
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[args.amp]
    scaler = torch.amp.GradScaler("cpu", enabled=args.amp == "fp16")
    loss_fn = nn.CrossEntropyLoss()

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        for x, y in loader:
            opt.zero_grad()
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)  # a rank whose fp16 gradients overflow skips its update only
            scaler.update()
            scheduler.step()
    opt.finish()  # (easgd) complete the exchange in flight; checks that the ranks agree

    center = Net()
    center.load_state_dict(opt.center_state_dict())  # (easgd) the center, buffers included
    averaged = test_error(center, test)
    recalibrated_model = copy.deepcopy(center)
    torch.optim.swa_utils.update_bn(DataLoader(train, batch_size=256), recalibrated_model)
    recalibrated = test_error(recalibrated_model, test)
    for module in center.modules():  # what the center scores with the initial statistics
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
    unaveraged = test_error(center, test)
    # Every rank holds the same center: check it, as a user might.
    c = opt.center.clone()
    dist.all_reduce(c)
    same = torch.allclose(c / dist.get_world_size(), opt.center)
    if rank == 0:
        print(json.dumps({"center_test_error": averaged, "recalibrated_test_error": recalibrated,
                          "initial_statistics_test_error": unaveraged,
                          "centers_agree": same, "workers": dist.get_world_size(),
                          "amp": args.amp}))  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip gloo's thread teardown at interpreter exit (it can abort)


if __name__ == "__main__":
    main()
