"""Time to accuracy on digits with 4 workers: EAMSGD (plain and compressed) and DiLoCo
against DDP, post-local SGD and torchft's DiLoCo.

Wall time from the first training step until the evaluated model first reaches a target test
error on scikit-learn's digits (360 test images), for

* ``eamsgd``: ``easgd`` itself, :func:`easgd.launch.launch_local` with EAMSGD, tau = 10,
  4 workers, one parameter server and the evaluator (the center is evaluated);
* ``eamsgd_bf16``, ``eamsgd_int8``: the same with ``compress="bf16"`` / ``"int8"``
  (``easgd train --compress``): the asynchronous elastic exchanges sent compressed, with
  error feedback;
* ``diloco``: easgd's ``--method diloco`` through the same launcher: synchronous, tau = 10
  inner SGD steps (no momentum), one flat all-reduce of the pseudo-gradients, an outer
  Nesterov step (lr 0.7, momentum 0.9); no parameter server;
* ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` synchronous SGD (momentum 0.9) on
  4 gloo processes;
* ``postlocal``: PyTorch's ``PostLocalSGDOptimizer`` with ``PeriodicModelAverager`` (period
  10) on the same DDP model, whose ``post_localSGD_hook`` all-reduces gradients for
  ``--warmup`` steps and then stops (``post_local_gradient_allreduce=False``: the 4 processes
  stand for 4 machines, so there is no intra-node all-reduce);
* ``torchft_diloco``: ``torchft.local_sgd.DiLoCo`` (torchft 0.2.0) with easgd's DiLoCo
  settings (the same inner SGD, ``sync_every`` = 10, outer Nesterov SGD lr 0.7, momentum
  0.9), 4 processes, each a replica group of one with its own ``TCPStore``, its
  ``torchft.Manager`` (gloo) and a lighthouse in the benchmark's process (quorum tick 10 ms).
  torchft is not a dependency of easgd: without it the row says
  ``skipped: torchft not installed`` (table and JSON ``skipped``) and the rest runs.

Same network (``build_model("digits-cnn", seed=seed)``), same data and batches
(``BatchStream(seed + rank)``, batch 32 per worker), same weight decay (1e-4), one torch
thread per process. Every method gets its best learning rate of a small grid (the one with
the smallest median time over the seeds) and reports medians over 3 seeds; a best lr at an
end of its grid is marked ``edge`` (``--grid METHOD=LR,LR`` widens one). A run whose loss
diverged (easgd's launcher stops it) counts as never reaching the target.

Clocks. No side counts process start-up: easgd's time budget counts from each worker's
first training step, and its ``eval.jsonl`` walls, measured from the launch, are taken from
the first ``train_start`` in ``metrics.jsonl``; the baselines start their clock on rank 0
after a barrier, right before the first step (torchft's first quorum is inside its time).
Evaluation costs nobody CPU while training: each baseline's rank 0 keeps an in-memory copy of
its parameters every ``--interval`` seconds (DDP: any step; post-local SGD: right after an
averaging, when the model *is* the average; torchft's DiLoCo: right after a sync) and
evaluates them after training; easgd runs
with ``eval_deferred`` (``--eval-deferred``), so its evaluator only pulls a snapshot of the
center from the server every ``--interval`` seconds and the snapshots are evaluated after
training. easgd's parameter server is inside its figure: 4 workers, 1 server and the
evaluator share the machine's cores.

A run with no evaluation has no samples: it is reported as such and left out of the
medians, never counted as a time.

Usage, from the repository root::

    python -m benchmarks.time_to_accuracy [--quick] [--target 0.03] [--budget 5]
        [--seeds 0 1 2] [--interval 0.1] [--methods M ...] [--grid METHOD=LR,LR ...]
        [--json PATH]

``--quick``: one lr, one seed, 3 s, for eamsgd, eamsgd_int8, diloco, ddp, postlocal and
torchft_diloco (skipped without torchft).

The figures and what limits them: ``benchmarks/RESULTS.md``, section 4.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
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

WORKERS = 4
BATCH = 32
WEIGHT_DECAY = 1e-4
TAU = 10

#: easgd's rows: each runs through easgd's launcher with these ``TrainConfig`` fields and the
#: method's defaults otherwise (EAMSGD: momentum 0.99; DiLoCo: inner SGD without momentum,
#: outer Nesterov SGD with lr 0.7 and momentum 0.9). The other rows are baselines.
EASGD_RUNS: dict[str, dict[str, Any]] = {
    "eamsgd": {"method": "eamsgd"},
    "eamsgd_bf16": {"method": "eamsgd", "compress": "bf16"},
    "eamsgd_int8": {"method": "eamsgd", "compress": "int8"},
    "diloco": {"method": "diloco"},
}
#: Baselines that need a package easgd does not depend on: the row says it is skipped when
#: the package does not import.
OPTIONAL = {"torchft_diloco": "torchft"}
#: DiLoCo's outer optimizer, on both sides: Nesterov SGD (the DiLoCo paper's, easgd's default).
OUTER_LR, OUTER_MOMENTUM = 0.7, 0.9
#: torchft's lighthouse forms a quorum every this many ms (its default, 100, is meant for
#: rounds of minutes; a round here takes tens of ms).
TORCHFT_QUORUM_TICK_MS = 10

#: Learning-rate grids (per worker; DiLoCo: the inner lr). The PyTorch baselines ddp and
#: postlocal use momentum 0.9; torchft_diloco is torchft's DiLoCo with easgd's DiLoCo
#: settings (inner SGD without momentum, the same outer step).
GRIDS = {
    "eamsgd": (0.0025, 0.005, 0.01, 0.02, 0.04),
    "eamsgd_bf16": (0.0025, 0.005, 0.01, 0.02, 0.04),
    "eamsgd_int8": (0.0025, 0.005, 0.01, 0.02, 0.04),
    "diloco": (0.1, 0.15, 0.2, 0.3),
    "ddp": (0.05, 0.1, 0.2),
    "postlocal": (0.0125, 0.025, 0.05, 0.1, 0.2),
    "torchft_diloco": (0.1, 0.15, 0.2, 0.3),
}
#: ``--quick``: one lr per method, and only these methods (one compressed EAMSGD, DiLoCo).
QUICK_LR = {
    "eamsgd": 0.01,
    "eamsgd_int8": 0.01,
    "diloco": 0.2,
    "ddp": 0.1,
    "postlocal": 0.05,
    "torchft_diloco": 0.2,
}


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
    kw: dict[str, Any] = {"num_classes": data.num_classes, "in_channels": data.in_channels}
    model = build_model("digits-cnn", image_size=data.image_size, seed=run.seed, **kw)
    averager = None
    stack = contextlib.ExitStack()
    if run.method == "torchft_diloco":
        # No DDP: torchft's DiLoCo all-reduces pseudo-gradients itself, every TAU steps.
        ddp: Any = model
        opt: Any = torch.optim.SGD(model.parameters(), lr=run.lr, weight_decay=WEIGHT_DECAY)
        stack.enter_context(_torchft_diloco(model, opt, rank, str(args["lighthouse"])))
    else:
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=run.lr, momentum=0.9, weight_decay=WEIGHT_DECAY)
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
        averaged, periodic = _synchronized(run.method, averager, step)
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
    stack.close()
    if rank == 0:
        curve = _evaluate_snapshots(model, params, snapshots, data.test_x, data.test_y)
        result = {"curve": curve, "steps": step * WORKERS, "wall": wall, "start_time": start_time}
        Path(out).write_text(json.dumps(result))
    # No collective is left, so skip the teardown: destroying a DDP reducer's gloo group
    # can deadlock in torch 2.13 (its run-loop thread waits for the GIL that the joining
    # main thread holds; seen under gdb in ~ProcessGroupGloo via ~Reducer).
    os._exit(0)


@contextlib.contextmanager
def _torchft_diloco(model: Any, inner: Any, rank: int, lighthouse: str) -> Iterator[None]:
    """torchft's DiLoCo around ``inner``: a replica group of one process per worker, with its
    own store and a ``torchft.Manager`` that forms its quorums with the lighthouse at
    ``lighthouse``; DiLoCo syncs after every TAU ``inner.step()`` calls (its step hook)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torchft.local_sgd import DiLoCo  # type: ignore[import-not-found, unused-ignore]
    from torchft.manager import Manager  # type: ignore[import-not-found, unused-ignore]
    from torchft.process_group import (  # type: ignore[import-not-found, unused-ignore]
        ProcessGroupGloo,
    )

    # Its manager warns once per process that it cannot reset NCCL's flight recorder (gloo).
    logging.getLogger("torchft").setLevel(logging.ERROR)
    limit = timedelta(seconds=60)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=limit),
        load_state_dict=None,
        state_dict=None,
        min_replica_size=WORKERS,
        use_async_quorum=False,
        timeout=limit,
        quorum_timeout=limit,
        connect_timeout=limit,
        rank=0,
        world_size=1,
        store_addr="127.0.0.1",
        store_port=store.port,
        lighthouse_addr=lighthouse,
        replica_id=f"worker{rank}",
        hostname="127.0.0.1",
        init_sync=False,  # every replica starts from the same seeded network
    )
    outer = torch.optim.SGD(model.parameters(), lr=OUTER_LR, momentum=OUTER_MOMENTUM, nesterov=True)
    try:
        with DiLoCo(manager, [model], inner, outer, sync_every=TAU, pin_memory=False):
            yield
    finally:
        manager.shutdown(wait=False)


def _synchronized(method: str, averager: Any, step: int) -> tuple[bool, bool]:
    """``(averaged, periodic)`` after ``step`` steps.

    ``averaged``: every rank now holds the same model (DDP always; post-local SGD during the
    warm-up, when the hook all-reduces gradients, and right after each averaging; torchft's
    DiLoCo right after each sync, when the model is the global one).
    ``periodic``: one of every TAU such steps, where the ranks agree on stopping.
    """
    if method == "torchft_diloco":
        synced = step % TAU == 0
        return synced, synced
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

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        out = os.path.join(tmp, "rank0.json")
        args: dict[str, Any] = {"budget": budget, "interval": interval, "warmup": warmup}
        if run.method == "torchft_diloco":
            from torchft._torchft import (  # type: ignore[import-not-found, unused-ignore]
                LighthouseServer,
            )

            lighthouse = LighthouseServer(
                bind="127.0.0.1:0", min_replicas=WORKERS, quorum_tick_ms=TORCHFT_QUORUM_TICK_MS
            )
            stack.callback(lighthouse.shutdown)
            args["lighthouse"] = lighthouse.address()
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
    """Whether ``method`` is one of easgd's rows (its launcher runs it), not a baseline."""
    return method in EASGD_RUNS


def is_eamsgd(method: str) -> bool:
    """Whether ``method`` is one of easgd's EAMSGD rows (compressed or not)."""
    return is_easgd(method) and EASGD_RUNS[method]["method"] == "eamsgd"


def unavailable(method: str) -> str | None:
    """Why ``method`` cannot run here (its optional package does not import), or None."""
    package = OPTIONAL.get(method)
    if package is None:
        return None
    # torchft's Rust side logs every quorum at INFO; its level is read once, at import.
    os.environ.setdefault("RUST_LOG", "warn")
    try:
        importlib.import_module(package)
    except ImportError as exc:
        return f"{package} not installed ({exc}; pip install torchft==0.2.0 to run it)"
    return None


def run_easgd(run: Run, budget: float, interval: float) -> dict[str, Any]:
    from easgd.config import TrainConfig
    from easgd.launch import RunFailed, launch_local
    from easgd.runlog import EVAL_FILE, Event, RunPaths, RunStatus, iter_jsonl, training_span

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            **EASGD_RUNS[run.method],
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
        with ProcessSampler(run_dir=cfg.out) as sampler:  # roles from its processes.json
            launched = time.time()
            try:
                summary = launch_local(cfg)
            except RunFailed as exc:
                if exc.status is not RunStatus.DIVERGED:
                    raise
                # A diverged run never reaches the target: a time of inf, not a hole.
                return {"curve": [], "steps": 0, "wall": 0.0, "startup_s": math.nan,
                        "cores_by_role": {}, "no_samples": None, "diverged": str(exc)}  # fmt: skip
        # The sampler labels a process when it first sees it, which can be before
        # processes.json names it ("other"): label them again now that the file names all.
        sampler.labels = {pid: sampler._label(pid) for pid in sampler.labels}
        paths = RunPaths(cfg.out)
        events = list(iter_jsonl(paths.metrics))
        # What the launcher ran, from the run's own config.json (not what was asked).
        written = json.loads(paths.config.read_text())
        ran = {k: written.get(k) for k in ("method", "compress")}
        ran["parameter_server"] = any(e.get("event") == Event.SERVER_START for e in events)
        first, _ = training_span(events)
        if first is None:
            return {
                "curve": [],
                "steps": summary.get("local_steps", 0),
                "wall": 0.0,
                "startup_s": math.nan,
                "cores_by_role": {},
                "config": ran,
                "no_samples": f"no worker started training ({paths.metrics.name} has no "
                f"{Event.TRAIN_START} event)",
            }
        # The server's start event holds both clocks: launch time = time - wall; a run
        # without a server (synchronous: DiLoCo) takes the instant launch_local was called.
        server = (e for e in events if e.get("event") == Event.SERVER_START)
        start = next((e["time"] - e["wall"] for e in server), launched)
        cores = by_role(cfg, sampler.cores_between(start + first, start + first + budget))
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
        "config": ran,
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
    parser.add_argument("--methods", nargs="+", default=None, choices=list(GRIDS),
                        help=f"(all; --quick: {' '.join(QUICK_LR)})")  # fmt: skip
    parser.add_argument("--grid", nargs="+", default=[], metavar="METHOD=LR,LR",
                        help="replace a method's lr grid, e.g. diloco=0.1,0.2,0.4")  # fmt: skip
    args = parser.parse_args(argv)
    single_thread()
    budget = args.budget or (3.0 if args.quick else 5.0)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    methods = args.methods or list(QUICK_LR if args.quick else GRIDS)
    grids = {m: (QUICK_LR[m],) if args.quick else GRIDS[m] for m in methods}
    grids.update(_grid_overrides(args.grid, parser))
    skipped = {m: why for m in grids if (why := unavailable(m)) is not None}
    for method, why in skipped.items():
        print(f"skipped: {method}: {why}", flush=True)
    grids = {m: lrs for m, lrs in grids.items() if m not in skipped}
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
        label = f"[{i + 1}/{len(todo)}] {run.method:<14} lr={run.lr:<7g} seed={run.seed}"
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
            "config": result.get("config"),
            "no_samples": result["no_samples"],
            "diverged": result.get("diverged"),
            "curve": result["curve"],
        }
        records.append(record)
        if not result["no_samples"]:
            print(
                f"{label}: time to {args.target:g} = {_s(tta)}, best {best:.4f}, "
                f"background {meter.background_cores:.2f} cores"
                + (f" (diverged: {result['diverged']})" if result.get("diverged") else ""),
                flush=True,
            )

    grid_rows, best_rows = _tables(records, grids, missing, skipped)
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
            "worker_cores",
            "ksamples_to_target",
        ],
        [
            [
                r["method"],
                _lr(r["lr"]),
                r["median_s"],
                r["per_seed"],
                r["median_best_error"],
                r["steps_per_s"],
                r["worker_cores"],
                r["ksamples_to_target"],
            ]
            for r in grid_rows
        ],
    )
    print_table(
        "Best learning rate per method ('edge': the best lr is an end of its grid)",
        ["method", "lr", "median_s", "vs_best_baseline", "steps_per_s", "worker_cores",
         "ksamples_to_target", "note"],
        [[r["method"], _lr(r["lr"]), r["median_s"], r["vs_best_baseline"], r["steps_per_s"],
          r["worker_cores"], r["ksamples_to_target"], r["note"]] for r in best_rows],
    )  # fmt: skip
    ours = _fastest([r for r in best_rows if is_eamsgd(r["method"])])
    base = _fastest([r for r in best_rows if _is_baseline(r)])
    met = None
    label = "target (EAMSGD, any exchange, no slower than the best baseline)"
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
                "diloco_outer": {"lr": OUTER_LR, "momentum": OUTER_MOMENTUM, "nesterov": True},
            },
            "skipped": skipped,
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


def _lr(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _s(value: float) -> str:
    return "never" if math.isinf(value) else f"{value:.2f} s"


def _grid_overrides(specs: list[str], parser: Any) -> dict[str, tuple[float, ...]]:
    """``--grid METHOD=LR,LR ...`` as grids; a bad one is a usage error naming it."""
    out = {}
    for spec in specs:
        method, _, lrs = spec.partition("=")
        try:
            values = tuple(float(v) for v in lrs.split(","))
        except ValueError:
            values = ()
        if method not in GRIDS or not values or any(v <= 0 for v in values):
            parser.error(
                f"--grid {spec!r}: write METHOD=LR,LR with METHOD one of {', '.join(GRIDS)} "
                "and positive lrs, e.g. diloco=0.1,0.2,0.4"
            )
        out[method] = values
    return out


def _is_baseline(row: dict[str, Any]) -> bool:
    return not is_easgd(row["method"]) and not row.get("skipped")


def _fastest(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row with the smallest median time (then the smallest lr); rows without a figure
    (nan: no run had samples, or skipped) come last."""
    if not rows:
        return None
    return min(rows, key=lambda r: (math.isnan(r["median_s"]), r["median_s"], r["lr"] or 0.0))


def _skipped_row(method: str, why: str) -> dict[str, Any]:
    nan = math.nan
    return {"method": method, "lr": None, "median_s": nan, "per_seed": f"skipped: {why}",
            "per_seed_s": [], "seeds": [], "median_best_error": nan, "steps_per_s": nan,
            "worker_cores": nan, "ksamples_to_target": nan, "skipped": why,
            "note": f"skipped: {why}"}  # fmt: skip


def _tables(
    records: list[dict[str, Any]],
    grids: dict[str, tuple[float, ...]],
    missing: Missing,
    skipped: dict[str, str] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The grid (one row per method and lr, medians over the seeds' runs with samples) and
    the best lr per method. A grid point whose runs all lack samples keeps its row, with nan
    figures, and is reported; a skipped method (``skipped``: method -> why) has one row in
    each table that says so."""
    skipped = skipped or {}
    grid_rows = []
    for method, lrs in grids.items():
        for lr in lrs:
            ran = [r for r in records if r["method"] == method and r["lr"] == lr]
            if not ran:
                continue
            rs = sorted((r for r in ran if not r["no_samples"]), key=lambda r: r["seed"])
            if not rs:
                missing.add(f"{method} lr={lr:g}", f"none of its {len(ran)} run(s) has samples")
            # A diverged run has no throughput (nan, left out) and never reaches the target.
            rates = [ratio(r["local_steps"], r["trained_s"]) for r in rs]
            rate = median([x for x in rates if not math.isnan(x)])
            grid_rows.append(
                {
                    "method": method,
                    "lr": lr,
                    "median_s": median([r["time_to_target_s"] for r in rs]),
                    "per_seed": " ".join(_s(r["time_to_target_s"]).replace(" s", "") for r in rs),
                    "per_seed_s": [r["time_to_target_s"] for r in rs],
                    "seeds": [r["seed"] for r in rs],
                    "median_best_error": median([r["best_error_in_budget"] for r in rs]),
                    "steps_per_s": rate,
                    "worker_cores": median(
                        [(r.get("cores_by_role") or {}).get("worker", math.nan) for r in rs]
                    ),
                    # Samples all workers drew before the target: throughput x time.
                    "ksamples_to_target": median(
                        [
                            math.inf if math.isinf(t) else t * x * BATCH / 1e3
                            for t, x in zip([r["time_to_target_s"] for r in rs], rates, strict=True)
                        ]
                    ),
                }
            )
    best_rows = []
    for method in grids:
        best = _fastest([g for g in grid_rows if g["method"] == method])
        if best is not None:
            ends = (min(grids[method]), max(grids[method]))
            edge = len(grids[method]) > 1 and best["lr"] in ends and math.isfinite(best["median_s"])
            best_rows.append({**best, "edge": edge, "note": "edge" if edge else ""})
    for method, why in skipped.items():
        grid_rows.append(_skipped_row(method, why))
        best_rows.append({**_skipped_row(method, why), "edge": False})
    base = _fastest([r for r in best_rows if _is_baseline(r)])
    for r in best_rows:
        r["vs_best_baseline"] = math.nan if base is None else ratio(r["median_s"], base["median_s"])
    return grid_rows, best_rows


if __name__ == "__main__":
    sys.exit(main())
