"""Optimizer overhead: training steps through ``easgd.optim`` with exchanges off vs bare torch.

The same network (``digits-cnn``, the smallest model of the package, so the per-step cost of
the wrapper weighs most) on the same data (``BatchStream`` of digits, batch 32, one seed),
trained by

* ``torch``: ``torch.optim.SGD(lr, momentum=0.99, nesterov=True, weight_decay=1e-4)``, bare;
* ``easgd_off``: the same optimizer wrapped in ``easgd.optim.ElasticAveraging(..., tau=10,
  enabled=False)``: the parameters become views of one flat buffer and every call goes
  through the wrapper, but no exchange is made (the target: at most 1.02 x torch);
* ``easgd_1rank`` (information only): exchanges on, EASGD every 10 steps in a one-process
  gloo group, i.e. the wrapper's bookkeeping and the elastic arithmetic with a no-op
  all-reduce.

Each variant owns its model and its stream; one repeat times ``--steps`` training steps
(zero_grad, forward, loss, backward, step) of each variant, in a rotating order, and the
ratio of a repeat compares the blocks that ran side by side. Reported: the median of the
per-repeat ratios (the target figure) and the ratio of the medians, both in wall time and
in this process's CPU time (less sensitive to other people's jobs).

Usage, from the repository root::

    python -m benchmarks.overhead [--quick] [--steps 300] [--repeats 30] [--json PATH]

The figures and what limits them: ``benchmarks/RESULTS.md``, section 1.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from benchmarks._common import (
    CpuMeter,
    base_parser,
    interleaved,
    machine_info,
    median,
    print_table,
    ratio,
    single_thread,
    summary,
    write_json,
)

TARGET = 1.02
LR, MOMENTUM, WEIGHT_DECAY, TAU, BATCH = 0.005, 0.99, 1e-4, 10, 32


def make_variant(name: str, seed: int = 0) -> Callable[[int], None]:
    """A function that trains ``n`` steps of variant ``name`` (its model and stream persist)."""
    import torch

    from easgd.data import load_dataset
    from easgd.data.loader import BatchStream
    from easgd.optim import ElasticAveraging

    data = load_dataset("digits")
    model = _model(data, seed)
    local = torch.optim.SGD(
        model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY
    )
    opt: Any = local
    if name == "easgd_off":
        opt = ElasticAveraging(local, tau=TAU, enabled=False)
    elif name == "easgd_1rank":
        opt = ElasticAveraging(local, tau=TAU)
    stream = BatchStream(
        data.train_x, data.train_y, BATCH, seed=seed, transform=data.train_transform
    )
    loss_fn = torch.nn.functional.cross_entropy

    def train(n: int) -> None:
        for _ in range(n):
            xb, yb = next(stream)
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()

    return train


def _model(data: Any, seed: int) -> Any:
    from easgd.models import build_model

    return build_model(
        "digits-cnn",
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        image_size=data.image_size,
        seed=seed,
    )


def measure(
    variants: list[str], steps: int, repeats: int, warmup: int
) -> dict[str, dict[str, list[float]]]:
    """Per variant: wall and CPU microseconds per step of each measured repeat."""
    trainers = {v: make_variant(v) for v in variants}
    for v in variants:
        trainers[v](warmup)
    out: dict[str, dict[str, list[float]]] = {
        v: {"wall": [], "cpu": [], "bg": []} for v in variants
    }
    for _, v in interleaved(variants, repeats):
        with CpuMeter() as meter:
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            trainers[v](steps)
            wall = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
        out[v]["wall"].append(wall / steps * 1e6)
        out[v]["cpu"].append(cpu / steps * 1e6)
        out[v]["bg"].append(meter.background_cores)
    return out


def _init_one_rank_group(tmp: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("overhead", __doc__)
    parser.add_argument("--steps", type=int, default=None, help="steps per block (300)")
    parser.add_argument("--repeats", type=int, default=None, help="measured blocks (30)")
    args = parser.parse_args(argv)
    single_thread()
    steps = args.steps or (40 if args.quick else 300)
    repeats = args.repeats or (4 if args.quick else 30)
    warmup = steps
    variants = ["torch", "easgd_off", "easgd_1rank"]
    info = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        _init_one_rank_group(tmp)
        samples = measure(variants, steps, repeats, warmup)
        import torch.distributed as dist

        dist.destroy_process_group()

    base = samples["torch"]
    rows = []
    for v in variants:
        s = samples[v]
        paired = [ratio(a, b) for a, b in zip(s["wall"], base["wall"], strict=True)]
        paired_cpu = [ratio(a, b) for a, b in zip(s["cpu"], base["cpu"], strict=True)]
        rows.append(
            {
                "variant": v,
                "wall_us_per_step": summary(s["wall"]),
                "cpu_us_per_step": summary(s["cpu"]),
                "ratio": median(paired),
                "ratio_of_medians": ratio(median(s["wall"]), median(base["wall"])),
                "cpu_ratio": median(paired_cpu),
                "paired_ratios": paired,
                "background_cores": median(s["bg"]),
            }
        )
    print_table(
        f"Training step of digits-cnn (batch {BATCH}), {repeats} interleaved blocks of "
        f"{steps} steps; ratios against torch (median of per-block ratios)",
        ["variant", "wall_us", "cpu_us", "ratio", "ratio_of_medians", "cpu_ratio", "bg_cores"],
        [
            [
                r["variant"],
                r["wall_us_per_step"]["median"],
                r["cpu_us_per_step"]["median"],
                r["ratio"],
                r["ratio_of_medians"],
                r["cpu_ratio"],
                r["background_cores"],
            ]
            for r in rows
        ],
    )
    off = next(r for r in rows if r["variant"] == "easgd_off")
    met = off["ratio"] <= TARGET
    print(
        f"target easgd_off / torch <= {TARGET}: {off['ratio']:.4f} -> {'met' if met else 'MISSED'}"
    )
    write_json(
        args.json,
        {
            "benchmark": "overhead",
            "quick": args.quick,
            "machine": info,
            "settings": {
                "steps": steps,
                "repeats": repeats,
                "warmup_steps": warmup,
                "batch": BATCH,
                "lr": LR,
                "momentum": MOMENTUM,
                "tau": TAU,
            },
            "target": TARGET,
            "target_met": met,
            "rows": rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
