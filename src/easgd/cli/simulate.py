"""``easgd simulate``: P replicas in one process, on a quadratic or a real model."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from easgd.algorithms import METHODS, Hyperparams
from easgd.cli._help import HelpFormatter
from easgd.cli._progress import Progress
from easgd.cli._table import format_table
from easgd.sim import SCHEDULES, CostModel, Objective, Quadratic, SimResult, simulate

__all__ = ["add_hyperparam_args", "hyperparams_from_args", "register", "run"]


def add_hyperparam_args(
    parser: argparse.ArgumentParser, *, workers_aliases: tuple[str, ...] = ()
) -> None:
    """The flags of :class:`easgd.algorithms.Hyperparams`, shared with ``easgd train``.

    ``workers_aliases``: other spellings of ``--workers`` (``easgd simulate`` keeps ``--p``,
    the paper's name, as one).
    """
    g = parser.add_argument_group("method and hyperparameters")
    g.add_argument(
        "--method",
        default="eamsgd",
        choices=list(METHODS),
        help="update rule. " + "; ".join(f"{m.name}: {m.description}" for m in METHODS.values()),
    )
    g.add_argument(
        "--workers",
        *workers_aliases,
        dest="workers",
        type=int,
        default=4,
        metavar="P",
        help="number of workers p",
    )
    g.add_argument("--tau", type=int, default=1, help="communication period in local steps")
    g.add_argument("--lr", type=float, default=0.01, metavar="ETA", help="learning rate eta")
    g.add_argument(
        "--beta",
        type=float,
        default=None,
        metavar="B",
        help="center's moving rate beta (the paper's 0.9 when neither --beta nor --alpha "
        "is given); alpha = beta/p unless --alpha is given",
    )
    g.add_argument(
        "--alpha",
        type=float,
        default=None,
        metavar="A",
        help="worker's moving rate alpha (beta/p when not given)",
    )
    g.add_argument(
        "--momentum",
        type=float,
        default=None,
        metavar="D",
        help="Nesterov momentum delta (None: 0.99 for eamsgd, msgd and mdownpour, else 0)",
    )
    g.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        help="L2 coefficient added to the gradient",
    )
    g.add_argument(
        "--lr-decay",
        type=float,
        default=0.0,
        help="lr_t = lr / (1 + t*lr_decay)^lr_power on the local clock",
    )
    g.add_argument("--lr-power", type=float, default=0.0, help="see --lr-decay")
    g.add_argument(
        "--moving-rate",
        type=float,
        default=None,
        help="constant averaging rate of mvadownpour and mvasgd (default 0.001)",
    )


def hyperparams_from_args(args: argparse.Namespace) -> Hyperparams:
    """Map the flags to :class:`Hyperparams` one for one (None means "derived")."""
    fields: dict[str, Any] = {
        "method": args.method,
        "lr": args.lr,
        "tau": args.tau,
        "workers": args.workers,
        "beta": args.beta,
        "alpha": args.alpha,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "lr_decay": args.lr_decay,
        "lr_power": args.lr_power,
        "moving_rate": args.moving_rate,
    }
    return Hyperparams(**{k: v for k, v in fields.items() if v is not None})


def _straggler(text: str) -> tuple[int, float]:
    try:
        worker, factor = text.split(":")
        return int(worker), float(factor)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--straggler {text!r}: expected WORKER:FACTOR, e.g. 0:3.0"
        ) from None


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="run P workers in one process on a quadratic or a real model (the oracle)",
        description=(
            "Simulate P workers in one process. Schedules: sync (global clock), round-robin "
            "(one worker per global step, the paper's analysis) and async (event-driven on a "
            "virtual clock with a cost model). All replicas start at the center."
        ),
        formatter_class=HelpFormatter,
    )
    prob = parser.add_argument_group("problem")
    prob.add_argument(
        "--problem",
        default="quadratic",
        help="'quadratic' (F(x) = h/2 x^2 with gradient noise) or a dataset name "
        "(digits, mnist, fashion-mnist, cifar10) trained with --model",
    )
    prob.add_argument("--h", type=float, default=1.0, help="curvature of the quadratic")
    prob.add_argument(
        "--noise",
        type=float,
        default=0.0,
        metavar="SIGMA",
        help="standard deviation of the quadratic's gradient noise",
    )
    prob.add_argument(
        "--x0",
        type=float,
        default=1.0,
        help="starting point of the quadratic (every replica and the center)",
    )
    prob.add_argument(
        "--dim",
        type=int,
        default=1,
        help="independent coordinates of the quadratic (Monte-Carlo in one run)",
    )
    prob.add_argument("--model", default=None, help="network for a dataset problem")
    prob.add_argument("--batch-size", type=int, default=32, help="mini-batch size per worker")
    prob.add_argument("--data-dir", default=None, help="folder holding the dataset's files")
    add_hyperparam_args(parser, workers_aliases=("--p",))
    run_g = parser.add_argument_group("schedule and run")
    run_g.add_argument(
        "--schedule",
        default="sync",
        choices=SCHEDULES,
        help="sync, round-robin or async (virtual clock)",
    )
    run_g.add_argument(
        "--steps",
        type=int,
        default=100,
        help="global steps (sync, round-robin) or local steps per worker (async)",
    )
    run_g.add_argument("--seed", type=int, default=0, help="seed of noise, data and costs")
    run_g.add_argument(
        "--eval-interval",
        type=float,
        default=None,
        help="evaluate the center every this many virtual seconds",
    )
    run_g.add_argument("--json", action="store_true", help="print one JSON object")
    run_g.add_argument("--quiet", action="store_true", help="no progress display")
    cost = parser.add_argument_group("cost model (virtual seconds and bytes)")
    cost.add_argument("--step-time", type=float, default=1.0, help="mean compute time of a step")
    cost.add_argument(
        "--step-dist",
        default="constant",
        choices=["constant", "exponential", "lognormal"],
        help="distribution of step times",
    )
    cost.add_argument(
        "--straggler",
        type=_straggler,
        action="append",
        default=[],
        metavar="W:F",
        help="worker W is F times slower (repeatable)",
    )
    cost.add_argument("--latency", type=float, default=0.0, help="one-way message latency")
    cost.add_argument("--bandwidth", type=float, default=math.inf, help="link bytes per second")
    cost.add_argument(
        "--server-time", type=float, default=0.0, help="the center's service time per request"
    )
    cost.add_argument(
        "--numel",
        type=int,
        default=None,
        help="parameters counted in message sizes",
    )
    parser.set_defaults(func=run)


def _objective(args: argparse.Namespace) -> Objective:
    if args.problem == "quadratic":
        return Quadratic(h=args.h, sigma=args.noise, x0=args.x0, dim=args.dim)
    from easgd.sim import ModelObjective
    from easgd.task import build_task

    parts = build_task(args.problem, args.model, seed=args.seed, data_dir=args.data_dir)
    return ModelObjective(parts.build, parts.train, parts.test, args.batch_size, parts.transform)


def _scalarize(v: Any) -> Any:
    values = v.tolist()
    return values[0] if len(values) == 1 else values


def result_json(args: argparse.Namespace, hp: Hyperparams, res: SimResult) -> dict[str, Any]:
    small = res.center.numel() <= 1000
    out: dict[str, Any] = {
        "problem": args.problem,
        "method": hp.method,
        "schedule": args.schedule,
        "p": hp.workers,
        "tau": hp.tau,
        "lr": hp.lr,
        "alpha": hp.alpha,
        "beta": hp.beta,
        "momentum": hp.momentum,
        "steps": args.steps,
        "seed": args.seed,
        "final": res.metrics[-1],
        "virtual_seconds": res.virtual_seconds,
        "real_seconds": res.real_seconds,
        "exchanges": res.exchanges,
        "bytes_moved": res.bytes_moved,
        "local_steps": res.local_steps,
        "times": res.times,
        "metrics": res.metrics,
    }
    if small:
        out["center"] = _scalarize(res.center)
        out["center_trajectory"] = [_scalarize(c) for c in res.center_trajectory]
    return out


def run(args: argparse.Namespace) -> int:
    hp = hyperparams_from_args(args)
    if args.problem == "quadratic":
        hp.check_quadratic(args.h)
    cost = CostModel(
        step_time=args.step_time,
        step_dist=args.step_dist,
        stragglers=dict(args.straggler),
        latency=args.latency,
        bandwidth=args.bandwidth,
        server_time=args.server_time,
        numel=args.numel,
    )
    problem = _objective(args)
    progress = Progress("simulate", args.steps, enabled=not (args.quiet or args.json))
    res = simulate(
        problem,
        hp,
        schedule=args.schedule,
        steps=args.steps,
        seed=args.seed,
        cost=cost,
        eval_interval=args.eval_interval,
        trajectory=args.problem == "quadratic",
        progress=lambda done, total: progress.update(done),
    )
    progress.close()
    out = result_json(args, hp, res)
    if args.json:
        json.dump(out, sys.stdout, allow_nan=True)
        sys.stdout.write("\n")
        return 0
    rows = [
        {"quantity": k, "value": out[k]}
        for k in (
            "problem",
            "method",
            "schedule",
            "p",
            "tau",
            "lr",
            "alpha",
            "beta",
            "momentum",
            "steps",
            "seed",
            "virtual_seconds",
            "exchanges",
            "bytes_moved",
            "local_steps",
            "real_seconds",
        )
    ]
    if "center" in out and not isinstance(out["center"], list):
        rows.append({"quantity": "center", "value": out["center"]})
    rows.extend({"quantity": f"final {k}", "value": v} for k, v in res.metrics[-1].items())
    print(format_table(rows))
    if len(res.times) > 2:
        print()
        every = max(1, len(res.times) // 10)
        curve = [{"virtual_s": t, **m} for t, m in zip(res.times, res.metrics, strict=True)]
        print(format_table(curve[::every] + ([curve[-1]] if (len(curve) - 1) % every else [])))
    return 0
