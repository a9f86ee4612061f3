"""The simulator at scale: P = 64 workers, a 5M-parameter cost model, 1 and 100 Gbit/s.

Two questions, answered with :func:`easgd.sim.simulate`:

1. **Speed of the simulator**: real seconds per simulated hour for P = 64 workers whose
   messages are 5M float32 (20 MB; ``CostModel(numel=5_000_000)``), local steps of 0.1 s
   (virtual), 50 us latency, at 1 Gbit/s. Measured on two compute problems: a
   ``Quadratic`` (1000 coordinates: the simulator's own overhead, events and update rules)
   and the ``digits`` ``ModelObjective`` (64 real CNN replicas: the gradients dominate).
2. **Simulated time to accuracy**: virtual seconds until the center (all-reduce: the model)
   first reaches a test error on digits, for EAMSGD (tau = 10, asynchronous) against
   synchronous all-reduce SGD, each with its best learning rate of a small grid:

   * ``allreduce``: the library's all-reduce SGD (gradients averaged every step, as DDP;
     plain SGD, no momentum), ring all-reduce cost ``2(p-1)(latency + bytes/(p*bw))``;
   * ``allreduce_nesterov``: the same method with Nesterov momentum 0.9, as DDP users run
     it (``Hyperparams(method="allreduce", momentum=0.9)``, the authors' form:
     ``v = d*v; x += v; g = mean of the gradients at x; x -= lr*g; v -= lr*g``);
   * ``eamsgd S=inf``: the simulator's default: every worker has its own link and the
     center answers at once (a center sharded over as many servers as needed);
   * ``eamsgd S=16`` / ``S=1``: the center on 16 or 1 servers whose links are shared: each
     exchange occupies the server for ``2 * bytes / (S * bw)`` (``CostModel.server_time``;
     requests queue);
   * ``eamsgd sync`` and ``eamsgd sync bf16`` / ``int8``: synchronous EAMSGD, one sum of the
     elastic differences per exchange (overlapped with the next tau local steps, as the
     runtime does), full float32 or compressed with error feedback (the two-phase
     ``CompressedSum``: 2x and 3.9x fewer bytes in the cost model).

   The step time is constant, so the all-reduce trajectory is the same at every bandwidth;
   only its clock changes. One seed (the simulator is deterministic); no weight decay. Every
   variant is a method of the library, run by the simulator on the schedule of its mode.

Usage, from the repository root::

    python -m benchmarks.sim_scale [--quick] [--target 0.05] [--json PATH]

The figures and what limits them: ``benchmarks/RESULTS.md``, section 5.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

from benchmarks._common import (
    base_parser,
    machine_info,
    print_table,
    ratio,
    single_thread,
    write_json,
)
from easgd.algorithms import METHODS, Exchange, Hyperparams, Mode

NUMEL = 5_000_000
STEP_TIME = 0.1
LATENCY = 50e-6
BANDWIDTHS = {"1Gbit": 1.25e8, "100Gbit": 1.25e10}
TAU = 10
BATCH = 32


@dataclass(frozen=True)
class Variant:
    """One method of the time-to-accuracy table and its learning-rate grid."""

    name: str
    method: str  # a method of easgd.algorithms.METHODS
    grid: tuple[float, ...]
    tau: int = 1
    momentum: float | None = None  # None: the method's default
    servers: float = math.inf  # asynchronous: shards of the center (inf: no contention)
    steps: int = 200  # local steps per worker (async) or global steps (sync)
    schedule: str | None = None  # None: the method's default mode
    compress: str = "none"  # synchronous EASGD/EAMSGD: compressed exchanges

    def hyperparams(self, lr: float, workers: int) -> Hyperparams:
        given = {} if self.momentum is None else {"momentum": self.momentum}
        return Hyperparams(method=self.method, lr=lr, tau=self.tau, workers=workers, **given)

    @property
    def mode(self) -> Mode:
        return METHODS[self.method].resolve_mode()

    @property
    def allreduce(self) -> bool:
        """Whether it averages gradients at every step (the data-parallel baselines)."""
        return METHODS[self.method].exchange is Exchange.GRAD_MEAN


FULL = (
    Variant("allreduce", "allreduce", (0.1, 0.3), steps=150),
    Variant("allreduce_nesterov", "allreduce", (0.01, 0.03, 0.1), momentum=0.9, steps=150),
    Variant("eamsgd S=inf", "eamsgd", (0.005, 0.01), tau=TAU, steps=200),
    Variant("eamsgd S=16", "eamsgd", (0.005, 0.01), tau=TAU, servers=16, steps=200),
    Variant("eamsgd S=1", "eamsgd", (0.005, 0.01), tau=TAU, servers=1, steps=150),
    Variant("eamsgd sync", "eamsgd", (0.005, 0.01), tau=TAU, schedule="sync", steps=200),
    Variant("eamsgd sync bf16", "eamsgd", (0.005, 0.01), tau=TAU, schedule="sync", steps=200,
            compress="bf16"),
    Variant("eamsgd sync int8", "eamsgd", (0.005, 0.01), tau=TAU, schedule="sync", steps=200,
            compress="int8"),
)  # fmt: skip
QUICK = (
    Variant("allreduce", "allreduce", (0.3,), steps=6),
    Variant("allreduce_nesterov", "allreduce", (0.03,), momentum=0.9, steps=6),
    Variant("eamsgd S=inf", "eamsgd", (0.01,), tau=TAU, steps=6),
    Variant("eamsgd S=1", "eamsgd", (0.01,), tau=TAU, servers=1, steps=4),
    Variant("eamsgd sync int8", "eamsgd", (0.01,), tau=TAU, schedule="sync", steps=6,
            compress="int8"),
)  # fmt: skip
#: The simulator's speed: one run of each method, at these hyperparameters.
SPEED = {
    "eamsgd": Variant("eamsgd", "eamsgd", (0.005,), tau=TAU),
    "allreduce": Variant("allreduce", "allreduce", (0.1,)),
}


def schedule_of(v: Variant) -> str:
    """The simulator's schedule for a variant: its own, or its method's default mode."""
    return v.schedule or v.mode.value


def cost_model(bandwidth: float, servers: float = math.inf) -> Any:
    from easgd.sim import CostModel

    server_time = 0.0 if math.isinf(servers) else 2 * NUMEL * 4 / (servers * bandwidth)
    return CostModel(
        step_time=STEP_TIME,
        latency=LATENCY,
        bandwidth=bandwidth,
        numel=NUMEL,
        server_time=server_time,
    )


def digits_problem() -> Any:
    from easgd.sim import ModelObjective
    from easgd.task import build_task

    parts = build_task("digits")
    return ModelObjective(parts.build, parts.train, parts.test, BATCH, parts.transform)


# ---------------------------------------------------------------------------------------
# 1. Real seconds per simulated hour.
# ---------------------------------------------------------------------------------------


def speed(problem_name: str, method: str, workers: int, steps: int) -> dict[str, Any]:
    from easgd.sim import Quadratic, simulate

    problem = Quadratic(sigma=1.0, dim=1000) if problem_name == "quadratic" else digits_problem()
    v = SPEED[method]
    schedule = schedule_of(v)
    res = simulate(
        problem,
        v.hyperparams(v.grid[0], workers),
        schedule=schedule,
        steps=steps,
        cost=cost_model(BANDWIDTHS["1Gbit"]),
    )
    return {
        "problem": problem_name,
        "method": method,
        "schedule": schedule,
        "workers": workers,
        "virtual_s": res.virtual_seconds,
        "real_s": res.real_seconds,
        "local_steps": res.local_steps,
        "real_s_per_sim_hour": ratio(res.real_seconds, res.virtual_seconds) * 3600,
        "local_steps_per_real_s": ratio(res.local_steps, res.real_seconds),
    }


# ---------------------------------------------------------------------------------------
# 2. Simulated time to accuracy.
# ---------------------------------------------------------------------------------------


def run_variant(
    v: Variant, lr: float, bandwidth: float, workers: int, eval_interval: float
) -> tuple[list[float], list[float], float]:
    """``(virtual times, test errors, real seconds)`` of one run."""
    from easgd.sim import simulate

    res = simulate(
        digits_problem(),
        v.hyperparams(lr, workers),
        schedule=schedule_of(v),
        steps=v.steps,
        seed=0,
        cost=cost_model(bandwidth, v.servers),
        eval_interval=eval_interval,
        compress=v.compress,
    )
    return list(res.times), [m["error"] for m in res.metrics], res.real_seconds


def first_below(times: list[float], errors: list[float], target: float) -> float:
    for t, e in zip(times, errors, strict=True):
        if e <= target:
            return t
    return math.inf


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("sim_scale", __doc__)
    parser.add_argument("--target", type=float, default=None, help="test error (0.05)")
    parser.add_argument("--workers", type=int, default=64, help="P (64)")
    args = parser.parse_args(argv)
    single_thread()
    workers = 16 if args.quick else args.workers
    target = args.target or (0.5 if args.quick else 0.05)
    info = machine_info()

    # 1. The simulator's speed.
    speed_plan = (
        [("quadratic", "eamsgd", 20), ("digits", "eamsgd", 3)]
        if args.quick
        else [
            ("quadratic", "eamsgd", 400),
            ("quadratic", "allreduce", 400),
            ("digits", "eamsgd", 60),
            ("digits", "allreduce", 40),
        ]
    )
    speed_rows = [speed(p, m, workers, n) for p, m, n in speed_plan]
    print_table(
        f"Simulator speed: P={workers}, {NUMEL / 1e6:g}M-parameter messages, step "
        f"{STEP_TIME} s, 1 Gbit/s, latency {LATENCY * 1e6:g} us (one core)",
        [
            "problem",
            "method",
            "schedule",
            "virtual_s",
            "real_s",
            "real_s_per_sim_hour",
            "steps_per_real_s",
        ],
        [
            [
                r["problem"],
                r["method"],
                r["schedule"],
                r["virtual_s"],
                r["real_s"],
                r["real_s_per_sim_hour"],
                r["local_steps_per_real_s"],
            ]
            for r in speed_rows
        ],
    )

    # 2. Time to accuracy, every variant and learning rate at both bandwidths.
    variants = QUICK if args.quick else FULL
    by_name = {v.name: v for v in variants}
    runs = []
    for bw_name, bw in BANDWIDTHS.items():
        for v in variants:
            for lr in v.grid:
                horizon = _horizon(v, bw, workers)
                times, errors, real = run_variant(v, lr, bw, workers, horizon / 40)
                tta = first_below(times, errors, target)
                runs.append(
                    {
                        "bandwidth": bw_name,
                        "variant": v.name,
                        "method": v.method,
                        "lr": lr,
                        "time_to_target_s": tta,
                        "best_error": min(errors),
                        "virtual_horizon_s": times[-1],
                        "real_s": real,
                        "curve": list(zip(times, errors, strict=True)),
                    }
                )
                when = "   never" if math.isinf(tta) else f"{tta:8.1f} s"
                print(
                    f"  {bw_name:<7} {v.name:<18} lr={lr:<6g} time to {target:g}: "
                    f"{when} (best {min(errors):.3f}, real {real:.1f} s)",
                    flush=True,
                )
    best = []
    for bw_name in BANDWIDTHS:
        for v in variants:
            rs = [r for r in runs if r["bandwidth"] == bw_name and r["variant"] == v.name]
            best.append(dict(min(rs, key=lambda r: (r["time_to_target_s"], r["best_error"]))))
    for bw_name in BANDWIDTHS:
        rows = [b for b in best if b["bandwidth"] == bw_name]
        ref = min(
            (b["time_to_target_s"] for b in rows if by_name[b["variant"]].allreduce),
            default=math.nan,
        )
        if not math.isfinite(ref):
            print(f"  {bw_name}: no all-reduce variant reached {target:g}, so no speedups")
        for b in rows:
            b["speedup_vs_best_allreduce"] = ratio(ref, b["time_to_target_s"])
    print()
    print_table(
        f"Simulated time (virtual s) to center test error <= {target:g} on digits, "
        f"P={workers}, best lr of each grid; speedup = best all-reduce time / this time",
        ["bandwidth", "variant", "lr", "time_to_target_s", "best_error", "speedup"],
        [
            [
                b["bandwidth"],
                b["variant"],
                b["lr"],
                b["time_to_target_s"],
                b["best_error"],
                b["speedup_vs_best_allreduce"],
            ]
            for b in best
        ],
    )
    write_json(
        args.json,
        {
            "benchmark": "sim_scale",
            "quick": args.quick,
            "machine": info,
            "settings": {
                "workers": workers,
                "numel": NUMEL,
                "step_time": STEP_TIME,
                "latency": LATENCY,
                "bandwidths": BANDWIDTHS,
                "tau": TAU,
                "batch": BATCH,
                "target_error": target,
                "variants": [v.__dict__ for v in variants],
            },
            "speed": speed_rows,
            "best": best,
            "runs": runs,
        },
    )
    return 0


def _horizon(v: Variant, bandwidth: float, workers: int) -> float:
    """Roughly the virtual seconds a run lasts (to space its evaluations)."""
    cost = cost_model(bandwidth, v.servers)
    if schedule_of(v) == "sync":  # at most one all-reduce per step
        return v.steps * (cost.step_time + cost.allreduce(NUMEL * 4, workers))
    exchange = 2 * cost.message(NUMEL * 4) + cost.server_time
    per_round = max(TAU * cost.step_time + exchange, workers * cost.server_time)
    return v.steps / TAU * per_round


if __name__ == "__main__":
    sys.exit(main())
