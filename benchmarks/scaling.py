"""Scaling: total training samples/s with 2 workers against 1 worker (tau = 10).

Real runs of ``easgd`` through :func:`easgd.launch.launch_local` (EAMSGD on digits, batch 32,
one torch thread per process), for each transport:

* ``async``: the parameter server (one server process; the paper's setting, the default);
* ``sync``: synchronous EAMSGD, one flat all-reduce every tau steps (no server);
* ``independent`` (the machine's ceiling): P processes each training its own copy with a
  bare ``torch.optim.SGD`` loop, no communication, no server, no evaluator.

The throughput is measured in the steady state from the workers' own ``metrics.jsonl``
events (a (wall, step) pair every 10 steps): over the window in which every worker is
running (after ``--skip`` seconds), the steps all workers made in it, times the batch size,
over its length. Start-up and shut-down are not counted. The evaluator runs as in any run
but evaluates only once (``--eval-interval``, default 1e6 s), since evaluation is not
training; pass ``--eval-interval 1`` to include its cost.

Each repeat runs every (transport, P) once in a rotating order; the ratio is taken between
the medians. The CPU each role (worker, server, evaluator) used and the load of other
people's processes are recorded per run: on 2 cores a second worker can only double the
throughput if nothing else wants a core.

Usage, from the repository root::

    python -m benchmarks.scaling [--quick] [--steps 6000] [--repeats 5]
        [--modes independent async sync] [--wait-quiet SECONDS] [--json PATH]
    python -m benchmarks.scaling --profile-allreduce   # the synchronous transport's cost

A run whose workers never all ran at once after ``--skip`` (on a loaded machine one may
finish before the other starts) has no steady window: it is reported as a run without
samples, not a figure. The figures and what limits them: ``benchmarks/RESULTS.md``,
section 3.
"""

from __future__ import annotations

import bisect
import math
import os
import sys
import tempfile
import time
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
    interleaved,
    machine_info,
    median,
    print_table,
    ratio,
    single_thread,
    summary,
    wait_until_quiet,
    write_json,
)
from easgd.algorithms import METHODS
from easgd.runlog import METRICS_FILE, PROGRESS_EVENTS, Event

TARGET = 1.8
TAU, BATCH = 10, 32
METHOD = "eamsgd"
#: The easgd transports measured: every mode the method runs in (async: the parameter
#: server; sync: the overlapped all-reduce), and the machine's ceiling.
MODES = ("independent", *(m.value for m in METHODS[METHOD].modes))


class NoSteadyWindow(RuntimeError):
    """A run's worker events give no window in which every worker was running."""


def steady_rate(events: list[dict[str, Any]], skip: float) -> tuple[float, float]:
    """``(steps/s of all workers together, window seconds)`` while every worker runs."""
    series: dict[int, list[tuple[float, int]]] = {}
    for e in events:
        if e.get("event") in PROGRESS_EVENTS:
            series.setdefault(int(e["worker"]), []).append((float(e["wall"]), int(e["step"])))
    if not series:
        raise NoSteadyWindow(f"no worker logged a step (no worker events in {METRICS_FILE})")
    for s in series.values():
        s.sort()
    t0 = max(s[0][0] for s in series.values()) + skip
    t1 = min(s[-1][0] for s in series.values())
    if t1 <= t0:
        raise NoSteadyWindow(
            f"no steady window: the workers ran together {t1 - t0 + skip:.2f} s, not more "
            f"than the {skip:g} s of warm-up skipped (--skip; more --steps or a quieter machine)"
        )
    steps = sum(_steps_at(s, t1) - _steps_at(s, t0) for s in series.values())
    return steps / (t1 - t0), t1 - t0


def throughput(events: list[dict[str, Any]], skip: float) -> dict[str, Any]:
    """A run's steady throughput; ``samples_per_s`` None and ``no_samples`` says why if none."""
    try:
        rate, window = steady_rate(events, skip)
    except NoSteadyWindow as e:
        return {"samples_per_s": None, "steps_per_s": None, "window_s": 0.0, "no_samples": str(e)}
    return {
        "samples_per_s": rate * BATCH,
        "steps_per_s": rate,
        "window_s": window,
        "no_samples": None,
    }


def _steps_at(series: list[tuple[float, int]], t: float) -> float:
    """The worker's step count at wall ``t``, interpolated between its events."""
    walls = [w for w, _ in series]
    i = bisect.bisect_left(walls, t)
    if i == 0:
        return float(series[0][1])
    if i >= len(series):
        return float(series[-1][1])
    (w0, s0), (w1, s1) = series[i - 1], series[i]
    return s0 + (s1 - s0) * (t - w0) / (w1 - w0)


def _independent_worker(index: int, steps: int, path: str) -> None:
    """A bare torch training loop, logging (wall, step) every 10 steps like an easgd worker."""
    import json

    import torch

    from easgd.task import build_task

    torch.set_num_threads(1)
    parts = build_task("digits")
    model = parts.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.99, nesterov=True)
    from easgd.data.loader import BatchStream

    stream = BatchStream(
        parts.train[0], parts.train[1], BATCH, seed=index, transform=parts.transform
    )
    lines = []
    for t in range(1, steps + 1):
        xb, yb = next(stream)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
        if t % 10 == 0 or t == 1:
            lines.append({"event": Event.STEP, "wall": time.time(), "worker": index, "step": t})
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(line) for line in lines))


def run_independent(workers: int, steps: int, skip: float) -> dict[str, Any]:
    import json

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp, CpuMeter() as meter:
        paths = [os.path.join(tmp, f"w{i}.jsonl") for i in range(workers)]
        procs = [
            ctx.Process(target=_independent_worker, args=(i, steps, paths[i]))
            for i in range(workers)
        ]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
            if proc.exitcode != 0:
                raise RuntimeError(f"an independent worker exited with {proc.exitcode}")
        events = [json.loads(line) for path in paths for line in Path(path).read_text().split("\n")]
    return {
        **throughput(events, skip),
        "cpu_s_by_role": {"worker": meter.ours},
        "load": meter.as_dict(),
    }


# ---------------------------------------------------------------------------------------
# Profile of the synchronous transport: what one gloo all-reduce costs between compute.
# ---------------------------------------------------------------------------------------

ALLREDUCE_CASES = (
    ("back_to_back", 18346, "all-reduces with no compute in between"),
    ("blocking", 18346, "10 training steps, then a blocking all-reduce (old easgd sync)"),
    ("blocking_1float", 1, "the same with a 1-float tensor: the latency floor"),
    ("overlapped", 18346, "async_op=True, waited for after the next 10 steps (easgd sync)"),
)


def _allreduce_rank(rank: int, port: int, case: str, numel: int, rounds: int, out: str) -> None:
    import json

    import torch
    import torch.distributed as dist

    from easgd.data.loader import BatchStream
    from easgd.task import build_task

    torch.set_num_threads(1)
    init_gloo(rank, port, 2)
    parts = build_task("digits")
    model = parts.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.99, nesterov=True)
    stream = BatchStream(
        parts.train[0], parts.train[1], BATCH, seed=rank, transform=parts.transform
    )
    buf = torch.randn(numel)

    def compute() -> None:
        for _ in range(TAU):
            xb, yb = next(stream)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()

    comm: list[float] = []
    work = None
    began = time.perf_counter()
    for _ in range(rounds):
        if case == "overlapped":
            work = dist.all_reduce(buf, async_op=True)
            compute()
            t = time.perf_counter()
            work.wait()
        else:
            if case != "back_to_back":
                compute()
            t = time.perf_counter()
            dist.all_reduce(buf)
        comm.append(time.perf_counter() - t)
    per_round = (time.perf_counter() - began) / rounds
    if rank == 0:
        Path(out).write_text(json.dumps({"comm_s": comm, "round_s": per_round}))
    dist.barrier()
    dist.destroy_process_group()


def profile_allreduce(rounds: int) -> list[dict[str, Any]]:
    """Two gloo processes, each a digits worker: the all-reduce's cost, blocking or hidden."""
    import json

    import torch.multiprocessing as mp

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case, numel, what in ALLREDUCE_CASES:
            port = free_port()
            out = os.path.join(tmp, f"{case}.json")
            mp.spawn(_allreduce_rank, args=(port, case, numel, rounds, out), nprocs=2)
            data = json.loads(Path(out).read_text())
            comm = [c * 1e3 for c in data["comm_s"][rounds // 10 :]]
            rows.append(
                {
                    "case": case,
                    "numel": numel,
                    "what": what,
                    "comm_ms": median(comm),
                    "round_ms": data["round_s"] * 1e3,
                }
            )
    return rows


def run_once(
    mode: str, workers: int, steps: int, eval_interval: float, skip: float
) -> dict[str, Any]:
    if mode == "independent":
        return run_independent(workers, steps, skip)
    from easgd.config import TrainConfig
    from easgd.launch import launch_local
    from easgd.runlog import RunPaths, iter_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            method=METHOD,
            mode=mode,
            workers=workers,
            tau=TAU,
            batch_size=BATCH,
            steps=steps,
            eval_interval=eval_interval,
            out=os.path.join(tmp, "run"),
        )
        with CpuMeter() as meter, ProcessSampler(run_dir=cfg.out) as sampler:
            launch_local(cfg)
        events = list(iter_jsonl(RunPaths(cfg.out).metrics))
    roles = by_role(cfg, sampler.by_label())
    return {**throughput(events, skip), "cpu_s_by_role": roles, "load": meter.as_dict()}


def _rows(
    runs: dict[str, list[dict[str, Any]]], modes: list[str], missing: Missing
) -> list[dict[str, Any]]:
    """One row per (mode, P): the median of the runs that have a steady window."""
    rows = []
    for mode in modes:
        one = [r["samples_per_s"] for r in runs[f"{mode}/1"] if r["samples_per_s"] is not None]
        for p in (1, 2):
            rs = runs[f"{mode}/{p}"]
            rates = [r["samples_per_s"] for r in rs if r["samples_per_s"] is not None]
            if not rates:
                why = "; ".join(sorted({r["no_samples"] for r in rs}))
                missing.add(f"{mode} P={p}", f"none of its {len(rs)} run(s) has a figure: {why}")
            wall = sum(r["load"]["wall_s"] for r in rs)
            cpu = {
                role: ratio(sum(r["cpu_s_by_role"].get(role, 0.0) for r in rs), wall)
                for role in ("worker", "server", "evaluator")
            }
            rows.append(
                {
                    "mode": mode,
                    "workers": p,
                    "samples_per_s": summary(rates),
                    "ratio_vs_1": ratio(median(rates), median(one)),
                    "background_cores": median([r["load"]["background_cores"] for r in rs]),
                    "cores_by_role": cpu,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("scaling", __doc__)
    parser.add_argument("--steps", type=int, default=None, help="local steps per worker (6000)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per variant (5)")
    parser.add_argument(
        "--modes", nargs="+", default=None, choices=MODES, help=f"(default: {' '.join(MODES)})"
    )
    parser.add_argument("--eval-interval", type=float, default=1e6, help="evaluator period (s)")
    parser.add_argument(
        "--skip", type=float, default=None, help="seconds of warm-up not counted (0.5; quick 0.2)"
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="before each run wait up to this many seconds for other jobs to leave the CPUs",
    )
    parser.add_argument(
        "--profile-allreduce",
        action="store_true",
        help="only profile one gloo all-reduce between two digits workers (the sync transport)",
    )
    args = parser.parse_args(argv)
    single_thread()
    if args.profile_allreduce:
        rows = profile_allreduce(rounds=40 if args.quick else 300)
        print_table(
            f"gloo all-reduce between 2 processes, each training digits-cnn ({TAU} steps per "
            "round); comm = time in all_reduce (or wait), median",
            ["case", "numel", "comm_ms", "round_ms", "what"],
            [[r["case"], r["numel"], r["comm_ms"], r["round_ms"], r["what"]] for r in rows],
        )
        path = args.json.with_name(args.json.stem + "_allreduce.json")
        write_json(
            path, {"benchmark": "scaling/allreduce", "machine": machine_info(), "rows": rows}
        )
        return 0
    steps = args.steps or (800 if args.quick else 6000)
    repeats = args.repeats or (1 if args.quick else 5)
    modes = args.modes or (["async"] if args.quick else list(MODES))
    skip = args.skip if args.skip is not None else (0.2 if args.quick else 0.5)
    info = machine_info()
    variants = [f"{m}/{p}" for m in modes for p in (1, 2)]
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    missing = Missing()
    for i, v in interleaved(variants, repeats):
        mode, p = v.split("/")
        quiet = wait_until_quiet(args.wait_quiet)
        r = run_once(mode, int(p), steps, args.eval_interval, skip)
        r["background_before"] = quiet
        runs[v].append(r)
        rate = r["samples_per_s"]
        figure = "no samples" if rate is None else f"{rate:8.0f} samples/s"
        print(
            f"[{i + 1}/{repeats}] {mode:<5} P={p}: {figure} "
            f"(background {r['load']['background_cores']:.2f} cores)",
            flush=True,
        )
    rows = _rows(runs, modes, missing)
    print()
    print_table(
        f"Samples/s (batch {BATCH}, tau {TAU}, EAMSGD on digits), median of {repeats}; "
        "cores_* = average cores a role used over the whole run (start-up included)",
        [
            "mode",
            "P",
            "samples_s",
            "min",
            "max",
            "vs_P1",
            "bg_cores",
            "cores_worker",
            "cores_server",
            "cores_eval",
        ],
        [
            [
                r["mode"],
                r["workers"],
                r["samples_per_s"]["median"],
                r["samples_per_s"]["min"],
                r["samples_per_s"]["max"],
                r["ratio_vs_1"],
                r["background_cores"],
                r["cores_by_role"]["worker"],
                r["cores_by_role"]["server"],
                r["cores_by_role"]["evaluator"],
            ]
            for r in rows
        ],
    )
    met: dict[str, bool | None] = {}
    for r in rows:
        if r["workers"] == 2:
            label = f"target {r['mode']}: P=2 / P=1 >= {TARGET}"
            if math.isnan(r["ratio_vs_1"]):
                met[r["mode"]] = None
                print(f"{label}: no figure (see 'no samples' above)")
                continue
            met[r["mode"]] = r["ratio_vs_1"] >= TARGET
            verdict = "met" if met[r["mode"]] else "MISSED"
            print(f"{label}: {r['ratio_vs_1']:.3f} -> {verdict}")
    write_json(
        args.json,
        {
            "benchmark": "scaling",
            "quick": args.quick,
            "machine": info,
            "settings": {
                "steps": steps,
                "repeats": repeats,
                "tau": TAU,
                "batch": BATCH,
                "eval_interval": args.eval_interval,
                "skip_s": skip,
                "modes": modes,
            },
            "target": TARGET,
            "target_met": met,
            "missing": missing.rows,
            "rows": rows,
            "runs": runs,
        },
    )
    return missing.exit_code(args.quick)


if __name__ == "__main__":
    sys.exit(main())
