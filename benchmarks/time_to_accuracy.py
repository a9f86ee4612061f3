"""Time to accuracy on digits with 4 workers: EAMSGD against DDP and post-local SGD.

Wall time from the first training step until the evaluated model first reaches a target test
error on scikit-learn's digits (360 test images), for

* ``eamsgd``: ``easgd`` itself, :func:`easgd.launch.launch_local` with EAMSGD, tau = 10,
  4 workers, one parameter server and the evaluator (the center is evaluated);
* ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` synchronous SGD (momentum 0.9) on
  4 gloo processes;
* ``postlocal``: PyTorch's ``PostLocalSGDOptimizer`` with ``PeriodicModelAverager`` (period
  10) on the same DDP model, whose ``post_localSGD_hook`` all-reduces gradients for
  ``--warmup`` steps and then stops (``post_local_gradient_allreduce=False``: the 4 processes
  stand for 4 machines, so there is no intra-node all-reduce).

Same network (``build_model("digits-cnn", seed=seed)``), same data and batches
(``BatchStream(seed + rank)``, batch 32 per worker), same weight decay (1e-4), one torch
thread per process. Every method gets its best learning rate of a small grid (the one with
the smallest median time over the seeds) and reports medians over 3 seeds.

Clocks. No side counts process start-up: easgd's time budget counts from each worker's
first training step, and its ``eval.jsonl`` walls, measured from the launch, are taken from
the first ``train_start`` in ``metrics.jsonl``; the baselines start their clock on rank 0
after a barrier, right before the first step.
Evaluation costs nobody CPU while training: each baseline's rank 0 keeps an in-memory copy of
its parameters every ``--interval`` seconds (DDP: any step; post-local SGD: right after an
averaging, when the model *is* the average) and evaluates them after training; easgd runs
with ``eval_deferred`` (``--eval-deferred``), so its evaluator only pulls a snapshot of the
center from the server every ``--interval`` seconds and the snapshots are evaluated after
training. easgd's parameter server is inside its figure: 4 workers, 1 server and the
evaluator share the machine's cores.

A run with no evaluation has no samples: it is reported as such and left out of the
medians, never counted as a time.

Usage, from the repository root::

    python -m benchmarks.time_to_accuracy [--quick] [--target 0.03] [--budget 5]
        [--seeds 0 1 2] [--interval 0.1] [--json PATH]

The figures and what limits them: ``benchmarks/RESULTS.md``, section 4.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._common import (
    CpuMeter,
    Missing,
    ProcessSampler,
    base_parser,
    by_role,
    free_port,
    init_gloo,
    machine_info,
    median,
    print_table,
    ratio,
    single_thread,
    write_json,
)
from easgd.algorithms import METHODS

WORKERS = 4
BATCH = 32
WEIGHT_DECAY = 1e-4
TAU = 10

#: Learning-rate grids (per worker). A method of easgd's table (``easgd.algorithms.METHODS``)
#: runs through easgd's launcher with its default momentum (EAMSGD: 0.99); the others are
#: PyTorch's baselines, with momentum 0.9.
GRIDS = {
    "eamsgd": (0.005, 0.01, 0.02),
    "ddp": (0.05, 0.1, 0.2),
    "postlocal": (0.025, 0.05, 0.1),
}
QUICK_LR = {"eamsgd": 0.01, "ddp": 0.1, "postlocal": 0.05}


@dataclass(frozen=True)
class Run:
    method: str
    lr: float
    seed: int


# ---------------------------------------------------------------------------------------
# The baselines: torch.distributed on 4 spawned CPU processes.
# ---------------------------------------------------------------------------------------


def _baseline_rank(rank: int, port: int, run: Run, args: dict[str, Any], out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
        PostLocalSGDState,
        post_localSGD_hook,
    )
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer
    from torch.nn.parallel import DistributedDataParallel

    from easgd.data import load_dataset
    from easgd.data.loader import BatchStream
    from easgd.models import build_model

    torch.set_num_threads(1)
    init_gloo(rank, port, WORKERS)
    data = load_dataset("digits")
    kw = {"num_classes": data.num_classes, "in_channels": data.in_channels}
    model = build_model("digits-cnn", image_size=data.image_size, seed=run.seed, **kw)
    ddp = DistributedDataParallel(model)
    opt: Any = torch.optim.SGD(ddp.parameters(), lr=run.lr, momentum=0.9, weight_decay=WEIGHT_DECAY)
    averager = None
    if run.method == "postlocal":
        warmup = int(args["warmup"])
        # Each process stands for a machine: a subgroup of one, and no gradient all-reduce
        # after the warm-up (the default subgroup would all-reduce within this one "node").
        state = PostLocalSGDState(
            process_group=None,
            subgroup=None,
            start_localSGD_iter=warmup,
            post_local_gradient_allreduce=False,
        )
        ddp.register_comm_hook(state, post_localSGD_hook)
        averager = PeriodicModelAverager(period=TAU, warmup_steps=warmup)
        opt = PostLocalSGDOptimizer(opt, averager)
    stream = BatchStream(
        data.train_x, data.train_y, BATCH, seed=run.seed + rank, transform=data.train_transform
    )
    params = [p for p in model.parameters()]
    snapshots: list[tuple[float, list[torch.Tensor]]] = []
    budget, interval = float(args["budget"]), float(args["interval"])
    flag = torch.zeros(1)
    step = 0
    dist.barrier()
    start = time.perf_counter()
    start_time = time.time()
    next_snapshot = 0.0
    while True:
        xb, yb = next(stream)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(xb), yb).backward()
        opt.step()
        step += 1
        averaged, periodic = _synchronized(averager, step)
        if rank == 0 and averaged:
            now = time.perf_counter() - start
            if now >= next_snapshot:
                snapshots.append((now, [p.detach().clone() for p in params]))
                next_snapshot = now + interval
        if periodic:
            # Agree on stopping where the ranks synchronize anyway (one float, MAX).
            flag.fill_(1.0 if time.perf_counter() - start >= budget else 0.0)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0:
                break
    wall = time.perf_counter() - start
    if rank == 0:
        curve = _evaluate_snapshots(model, params, snapshots, data.test_x, data.test_y)
        result = {"curve": curve, "steps": step * WORKERS, "wall": wall, "start_time": start_time}
        Path(out).write_text(json.dumps(result))
    # No collective is left, so skip the teardown: destroying a DDP reducer's gloo group
    # can deadlock in torch 2.13 (its run-loop thread waits for the GIL that the joining
    # main thread holds; seen under gdb in ~ProcessGroupGloo via ~Reducer).
    os._exit(0)


def _synchronized(averager: Any, step: int) -> tuple[bool, bool]:
    """``(averaged, periodic)`` after ``step`` steps.

    ``averaged``: every rank now holds the same model (DDP always; post-local SGD during the
    warm-up, when the hook all-reduces gradients, and right after each averaging).
    ``periodic``: one of every TAU such steps, where the ranks agree on stopping.
    """
    if averager is None:
        return True, step % TAU == 0
    last = averager.step - 1  # the averager's counter of its last call
    if last < averager.warmup_steps:
        return True, step % TAU == 0
    averaged = (last - averager.warmup_steps) % averager.period == 0
    return averaged, averaged


def _evaluate_snapshots(
    model: Any, params: list[Any], snapshots: list[Any], x: Any, y: Any
) -> list[dict[str, float]]:
    import torch

    from easgd.evaluation import evaluate_model

    curve = []
    with torch.no_grad():
        for wall, values in snapshots:
            for p, v in zip(params, values, strict=True):
                p.copy_(v)
            result = evaluate_model(model, x, y)
            curve.append({"wall": wall, "test_error": result["error"], "test_loss": result["loss"]})
    return curve


def run_baseline(run: Run, budget: float, interval: float, warmup: int) -> dict[str, Any]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        args = {"budget": budget, "interval": interval, "warmup": warmup}
        with ProcessSampler() as sampler:
            mp.spawn(
                _baseline_rank,
                args=(free_port(), run, args, out),
                nprocs=WORKERS,
                join=True,
            )
        result: dict[str, Any] = json.loads(Path(out).read_text())
    t0 = result["start_time"]
    used = sampler.cores_between(t0, t0 + budget)
    result["cores_by_role"] = {"worker": sum(used.values())}
    result["no_samples"] = None if result["curve"] else "rank 0 took no snapshot"
    return result


# ---------------------------------------------------------------------------------------
# easgd: the real launcher, its parameter server and its evaluator.
# ---------------------------------------------------------------------------------------


def is_easgd(method: str) -> bool:
    """Whether ``method`` is one of easgd's (its launcher runs it), not a PyTorch baseline."""
    return method in METHODS


def run_easgd(run: Run, budget: float, interval: float) -> dict[str, Any]:
    from easgd.config import TrainConfig
    from easgd.launch import launch_local
    from easgd.runlog import EVAL_FILE, Event, RunPaths, iter_jsonl, training_span

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            method=run.method,
            workers=WORKERS,
            tau=TAU,
            lr=run.lr,
            batch_size=BATCH,
            weight_decay=WEIGHT_DECAY,
            seed=run.seed,
            time_budget=budget,  # counted by each worker from its first step
            eval_interval=interval,
            eval_deferred=True,
            out=os.path.join(tmp, "run"),
        )
        with ProcessSampler() as sampler:
            summary = launch_local(cfg)
        paths = RunPaths(cfg.out)
        events = list(iter_jsonl(paths.metrics))
        first, _ = training_span(events)
        if first is None:
            return {
                "curve": [],
                "steps": summary.get("local_steps", 0),
                "wall": 0.0,
                "startup_s": math.nan,
                "cores_by_role": {},
                "no_samples": f"no worker started training ({paths.metrics.name} has no "
                f"{Event.TRAIN_START} event)",
            }
        # The server's start event holds both clocks: launch time = time - wall.
        server = (e for e in events if e.get("event") == Event.SERVER_START)
        start = next((e["time"] - e["wall"] for e in server), None)
        cores = (
            {}
            if start is None
            else by_role(cfg, sampler.cores_between(start + first, start + first + budget))
        )
        curve = [
            {"wall": e["wall"] - first, "test_error": e["test_error"], "test_loss": e["test_loss"]}
            for e in iter_jsonl(paths.eval)
        ]
    last = max((c["wall"] for c in curve), default=0.0)
    return {
        "curve": curve,
        "steps": summary["local_steps"],
        "wall": last,
        "startup_s": first,
        "cores_by_role": cores,
        "no_samples": None if curve else f"the evaluator wrote no evaluation to {EVAL_FILE}",
    }


# ---------------------------------------------------------------------------------------
# The sweep.
# ---------------------------------------------------------------------------------------


def time_to_target(curve: list[dict[str, float]], target: float, budget: float) -> float:
    """The first wall time (within the budget) at which the test error is <= target; inf if none."""
    for point in sorted(curve, key=lambda c: c["wall"]):
        if point["wall"] > budget:
            break
        if point["test_error"] <= target:
            return float(point["wall"])
    return math.inf


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("time_to_accuracy", __doc__)
    parser.add_argument("--target", type=float, default=0.03, help="test error to reach")
    parser.add_argument("--budget", type=float, default=None, help="training seconds per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="(0 1 2)")
    parser.add_argument("--interval", type=float, default=0.1, help="evaluation interval (s)")
    parser.add_argument("--warmup", type=int, default=50, help="post-local SGD warm-up steps")
    parser.add_argument("--methods", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    args = parser.parse_args(argv)
    single_thread()
    budget = args.budget or (3.0 if args.quick else 5.0)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    grids = {m: (QUICK_LR[m],) if args.quick else GRIDS[m] for m in args.methods}
    info = machine_info()

    # Interleave: each seed runs every (method, lr) once, in a rotating order.
    todo = [Run(m, lr, s) for s in seeds for m in grids for lr in grids[m]]
    records = []
    missing = Missing()
    for i, run in enumerate(_rotate(todo, len(seeds))):
        with CpuMeter() as meter:
            if is_easgd(run.method):
                result = run_easgd(run, budget, args.interval)
            else:
                result = run_baseline(run, budget, args.interval, args.warmup)
        label = f"[{i + 1}/{len(todo)}] {run.method:<9} lr={run.lr:<7g} seed={run.seed}"
        if result["no_samples"]:
            missing.add(label, result["no_samples"])
        tta = time_to_target(result["curve"], args.target, budget)
        in_budget = [c["test_error"] for c in result["curve"] if c["wall"] <= budget]
        best = min(in_budget, default=1.0)
        record = {
            "method": run.method,
            "lr": run.lr,
            "seed": run.seed,
            "time_to_target_s": tta,
            "best_error_in_budget": best,
            "local_steps": result["steps"],
            "trained_s": result["wall"],
            "load": meter.as_dict(),
            "cores_by_role": result.get("cores_by_role"),
            "no_samples": result["no_samples"],
            "curve": result["curve"],
        }
        records.append(record)
        if not result["no_samples"]:
            print(
                f"{label}: time to {args.target:g} = {_s(tta)}, best {best:.4f}, "
                f"background {meter.background_cores:.2f} cores",
                flush=True,
            )

    grid_rows, best_rows = _tables(records, grids, missing)
    print()
    print_table(
        f"Grid: median time (s) to test error <= {args.target:g} over seeds {seeds} "
        f"(budget {budget:g} s; 'never' = not within it)",
        [
            "method",
            "lr",
            "median_s",
            "per_seed_s",
            "median_best_error",
            "steps_per_s",
            "ksamples_to_target",
        ],
        [
            [
                r["method"],
                r["lr"],
                r["median_s"],
                r["per_seed"],
                r["median_best_error"],
                r["steps_per_s"],
                r["ksamples_to_target"],
            ]
            for r in grid_rows
        ],
    )
    print_table(
        "Best learning rate per method",
        ["method", "lr", "median_s", "vs_best_baseline", "steps_per_s", "ksamples_to_target"],
        [
            [
                r["method"],
                r["lr"],
                r["median_s"],
                r["vs_best_baseline"],
                r["steps_per_s"],
                r["ksamples_to_target"],
            ]
            for r in best_rows
        ],
    )
    ours = _fastest([r for r in best_rows if is_easgd(r["method"])])
    base = _fastest([r for r in best_rows if not is_easgd(r["method"])])
    met = None
    label = "target (EAMSGD no slower than the best baseline)"
    if ours is not None and base is not None:
        if math.isnan(ours["median_s"]) or math.isnan(base["median_s"]):
            print(f"{label}: no figure (see 'no samples' above)")
        elif math.isinf(ours["median_s"]) and math.isinf(base["median_s"]):
            print(f"{label}: no figure (neither reached {args.target:g} within {budget:g} s)")
        else:
            met = bool(ours["median_s"] <= base["median_s"])
            print(f"{label}: {'met' if met else 'MISSED'}")
    winner = _fastest(best_rows)
    if winner is None or not math.isfinite(winner["median_s"]):
        print(f"fastest: none (no method reached {args.target:g} within {budget:g} s)")
    else:
        print(f"fastest: {winner['method']} (lr {winner['lr']:g})")
    write_json(
        args.json,
        {
            "benchmark": "time_to_accuracy",
            "quick": args.quick,
            "machine": info,
            "settings": {
                "target_error": args.target,
                "budget_s": budget,
                "seeds": seeds,
                "grids": grids,
                "workers": WORKERS,
                "batch_per_worker": BATCH,
                "tau": TAU,
                "weight_decay": WEIGHT_DECAY,
                "interval_s": args.interval,
                "postlocal_warmup_steps": args.warmup,
            },
            "grid": grid_rows,
            "best": best_rows,
            "target_met": met,
            "missing": missing.rows,
            "runs": records,
        },
    )
    return missing.exit_code(args.quick)


def _rotate(todo: list[Run], seeds: int) -> list[Run]:
    """Within each seed's block, rotate the order so no method always runs first."""
    per = len(todo) // max(seeds, 1)
    out: list[Run] = []
    for b in range(seeds):
        block = todo[b * per : (b + 1) * per]
        shift = b % max(len(block), 1)
        out.extend(block[shift:] + block[:shift])
    return out


def _s(value: float) -> str:
    return "never" if math.isinf(value) else f"{value:.2f} s"


def _fastest(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row with the smallest median time (then the smallest lr); rows without a figure
    (nan: no run had samples) come last."""
    if not rows:
        return None
    return min(rows, key=lambda r: (math.isnan(r["median_s"]), r["median_s"], r["lr"]))


def _tables(
    records: list[dict[str, Any]], grids: dict[str, tuple[float, ...]], missing: Missing
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The grid (one row per method and lr, medians over the seeds' runs with samples) and
    the best lr per method. A grid point whose runs all lack samples keeps its row, with nan
    figures, and is reported."""
    grid_rows = []
    for method, lrs in grids.items():
        for lr in lrs:
            ran = [r for r in records if r["method"] == method and r["lr"] == lr]
            if not ran:
                continue
            rs = sorted((r for r in ran if not r["no_samples"]), key=lambda r: r["seed"])
            if not rs:
                missing.add(f"{method} lr={lr:g}", f"none of its {len(ran)} run(s) has samples")
            rates = [ratio(r["local_steps"], r["trained_s"]) for r in rs]
            grid_rows.append(
                {
                    "method": method,
                    "lr": lr,
                    "median_s": median([r["time_to_target_s"] for r in rs]),
                    "per_seed": " ".join(_s(r["time_to_target_s"]).replace(" s", "") for r in rs),
                    "per_seed_s": [r["time_to_target_s"] for r in rs],
                    "seeds": [r["seed"] for r in rs],
                    "median_best_error": median([r["best_error_in_budget"] for r in rs]),
                    "steps_per_s": median(rates),
                    # Samples all workers drew before the target: throughput x time.
                    "ksamples_to_target": median(
                        [
                            r["time_to_target_s"] * rate * BATCH / 1e3
                            for r, rate in zip(rs, rates, strict=True)
                        ]
                    ),
                }
            )
    best_rows = []
    for method in grids:
        best = _fastest([g for g in grid_rows if g["method"] == method])
        if best is not None:
            best_rows.append(dict(best))
    base = _fastest([r for r in best_rows if not is_easgd(r["method"])])
    for r in best_rows:
        r["vs_best_baseline"] = math.nan if base is None else ratio(r["median_s"], base["median_s"])
    return grid_rows, best_rows


if __name__ == "__main__":
    sys.exit(main())
