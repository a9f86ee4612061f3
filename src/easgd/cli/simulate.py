"""``easgd simulate``: P replicas in one process, on a quadratic or a real model."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from easgd.algorithms import INNER_OPTIMIZERS, METHODS, Hyperparams, Mode
from easgd.cli._help import HelpFormatter
from easgd.cli._progress import Progress
from easgd.cli._table import format_table
from easgd.runlog import json_dumps
from easgd.sim import (
    ENGINES,
    SCHEDULES,
    CostModel,
    Grouped,
    Objective,
    Quadratic,
    SimResult,
    resolve_mode,
    simulate,
)

__all__ = [
    "add_hyperparam_args",
    "check_elasticity_args",
    "hyperparams_from_args",
    "register",
    "run",
]


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
    # The paper couples them (alpha = beta/p): give one, the other follows.
    elastic = g.add_mutually_exclusive_group()
    elastic.add_argument(
        "--beta",
        type=float,
        default=None,
        metavar="B",
        help="center's moving rate beta; alpha = beta/p. Not with --alpha (the paper's 0.9 "
        "when neither is given)",
    )
    elastic.add_argument(
        "--alpha",
        type=float,
        default=None,
        metavar="A",
        help="worker's moving rate alpha; beta = p*alpha. Not with --beta (default beta/p)",
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
    g.add_argument(
        "--outer-lr",
        type=float,
        default=None,
        help="diloco's outer learning rate on the averaged pseudo-gradient (default 0.7, "
        "the DiLoCo paper's; 1 with --outer-momentum 0 is local SGD)",
    )
    g.add_argument(
        "--outer-momentum",
        type=float,
        default=None,
        help="diloco's outer Nesterov momentum (default 0.9, the DiLoCo paper's)",
    )
    g.add_argument(
        "--inner",
        default=None,
        choices=list(INNER_OPTIMIZERS),
        help="diloco's inner optimizer: sgd (default; Nesterov with --momentum) or adamw "
        "(betas 0.9/0.999, the DiLoCo paper's choice; --weight-decay is then decoupled)",
    )


def check_elasticity_args(args: argparse.Namespace) -> None:
    """Refuse a derived moving rate out of range, naming the flag that was given.

    ``--alpha`` sets beta = p*alpha and ``--beta`` sets alpha = beta/p; when the derived one
    is out of range, :class:`Hyperparams` would name the rate the user never typed.
    """
    if not METHODS[args.method].elastic or (args.alpha is None) == (args.beta is None):
        return
    p = args.workers
    paper = f"the paper's choice is --beta 0.9, i.e. --alpha {0.9 / p:.4g} with p={p}"
    if args.alpha is not None and 0 < args.alpha <= 1 and not p * args.alpha < 2:
        raise ValueError(
            f"--alpha {args.alpha:g} with --workers {p} makes beta = p*alpha = "
            f"{p * args.alpha:g}, outside (0, 2); use --alpha below 2/p = {2 / p:.4g} ({paper})"
        )
    if args.beta is not None and 0 < args.beta < 2 and not args.beta / p <= 1:
        raise ValueError(
            f"--beta {args.beta:g} with --workers {p} makes alpha = beta/p = "
            f"{args.beta / p:g}, outside (0, 1]; use --beta <= p = {p}, or give --alpha "
            f"instead ({paper})"
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
        "outer_lr": args.outer_lr,
        "outer_momentum": args.outer_momentum,
        "inner": args.inner,
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
            "Simulate P workers in one process. Schedules: sync (every worker steps on a "
            "global clock), round-robin (one worker per global step, the paper's analysis) "
            "and async (event-driven, each worker on its own clock). Every schedule runs on a "
            "virtual clock priced by the cost model; a cost flag that the method and schedule "
            "never pay for is refused. All replicas start at the center."
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
    run_g.add_argument(
        "--engine",
        default="auto",
        choices=ENGINES,
        help="per-worker (one worker generator per replica), batched (every replica a row "
        "of one population, for large P: the sync schedule, and the async one with constant "
        "step times, no stragglers and no server time; its noise is one stream) or auto "
        "(batched where it gives the per-worker results)",
    )
    run_g.add_argument(
        "--compress",
        default="none",
        choices=("none", "bf16", "int8"),
        help="easgd/eamsgd: compressed exchanges with error feedback, as easgd train "
        "--compress (the cost model counts the compressed bytes)",
    )
    run_g.add_argument(
        "--overlap",
        type=int,
        default=0,
        metavar="K",
        help="asynchronous easgd/eamsgd (schedules async, round-robin): each reply applied K "
        "local steps after its exchange while the worker computes, as easgd train --overlap",
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
    group = parser.add_argument_group("groups (as easgd train --group-size)")
    group.add_argument(
        "--group-size",
        type=int,
        default=1,
        metavar="G",
        help="easgd/eamsgd: groups of G consecutive workers average their gradients every "
        "step and exchange elastically with the center as one worker (the center sees "
        "P/G workers); each local step also pays a ring all-reduce of the gradient over "
        "the group's link",
    )
    group.add_argument(
        "--group-latency",
        type=float,
        default=None,
        help="one-way latency of the group's link (intra-node; default: --latency)",
    )
    group.add_argument(
        "--group-bandwidth",
        type=float,
        default=None,
        help="bytes per second of the group's link (intra-node; default: --bandwidth)",
    )
    parser.set_defaults(func=run)
    _FLAG_DEFAULTS.update({a.dest: parser.get_default(a.dest) for a in parser._actions})


#: The parser's default of every flag (filled by register): a flag whose value differs from
#: its default was given on the command line.
_FLAG_DEFAULTS: dict[str, Any] = {}
_QUADRATIC_FLAGS = {"h": "--h", "noise": "--noise", "x0": "--x0", "dim": "--dim"}
_DATASET_FLAGS = {"model": "--model", "batch_size": "--batch-size", "data_dir": "--data-dir"}


def _given(args: argparse.Namespace, dest: str) -> bool:
    return dest in _FLAG_DEFAULTS and getattr(args, dest) != _FLAG_DEFAULTS[dest]


def _check_problem(args: argparse.Namespace) -> None:
    """The problem's flags: the problem is known, and no flag of the other kind is given."""
    from easgd.data.datasets import DATASETS

    if args.problem == "quadratic":
        for dest, flag in _DATASET_FLAGS.items():
            if _given(args, dest):
                raise ValueError(
                    f"{flag} {getattr(args, dest)} applies to a dataset problem, not to "
                    f"--problem quadratic; drop {flag}, or choose --problem {DATASETS[0]}"
                )
        if not (math.isfinite(args.noise) and args.noise >= 0):
            raise ValueError(
                f"--noise {args.noise} must be a standard deviation >= 0, e.g. --noise 0.1"
            )
        return
    if args.problem not in DATASETS:
        raise ValueError(
            f"--problem {args.problem} is not known; choose quadratic or a dataset: "
            f"{', '.join(DATASETS)}"
        )
    for dest, flag in _QUADRATIC_FLAGS.items():
        if _given(args, dest):
            raise ValueError(
                f"{flag} {getattr(args, dest)} applies to --problem quadratic only, not to "
                f"--problem {args.problem}; drop {flag}"
            )
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1, e.g. --batch-size 32")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise ValueError(
            f"--data-dir {args.data_dir} is not a folder; give the folder holding the "
            "dataset's files, or drop --data-dir to use the cache (downloading if needed)"
        )


def _check_groups(args: argparse.Namespace) -> int:
    """``--group-size``: in range and applicable; returns the groups (P/G). The group link's
    flags are CostModel's to check (in range, and given only with groups)."""
    g, p = args.group_size, args.workers
    if g < 1:
        raise ValueError(f"--group-size {g} must be >= 1 workers per group (1: no groups)")
    if g == 1:
        return p
    if p % g:
        raise ValueError(
            f"--workers {p} is not a multiple of --group-size {g}: the workers form groups "
            f"of {g} consecutive ranks; give a multiple of {g} workers"
        )
    if not METHODS[args.method].elastic:
        raise ValueError(
            f"--group-size {g} with --method {args.method}: {args.method} has no elastic "
            "exchange; groups average gradients inside and exchange elastically with the "
            "center: use --method easgd or eamsgd"
        )
    return p // g  # the group link's values: CostModel checks them


def _check_exchange(args: argparse.Namespace, hp: Hyperparams, mode: Mode) -> None:
    """``--compress`` and ``--overlap``: refused, in the flags' words, where they do not
    apply (before the problem is built: a dataset takes a while to load)."""
    from easgd.algorithms import check_compress, check_overlap
    from easgd.config import flag_message

    if args.overlap and mode is not Mode.ASYNC:
        raise ValueError(
            f"--overlap {args.overlap} on the {args.schedule} schedule: the overlapped "
            "exchange is the asynchronous one; use --schedule async or round-robin"
        )
    try:
        check_compress(hp, args.compress)
        check_overlap(hp, mode, args.overlap)
    except ValueError as exc:
        raise ValueError(flag_message(str(exc))) from None


def _check_cost(args: argparse.Namespace, hp: Hyperparams, mode: Mode) -> None:
    """The cost flags: in range, and paid for by this method on this schedule.

    Every schedule prices local steps (``--step-time``, ``--step-dist``, ``--straggler``).
    Messages (``--latency``, ``--bandwidth``, ``--numel``) are sent to a parameter server
    (asynchronous mode) or by an all-reduce of p > 1 workers; ``--server-time`` is paid only
    where a parameter server answers (the simulator's synchronous schedule serves the
    DOWNPOUR family that way too).
    """
    p = hp.workers
    seen: set[int] = set()
    for worker, factor in args.straggler:
        text = f"--straggler {worker}:{factor:g}"
        if not 0 <= worker < p:
            given = f"--workers {p}"
            if getattr(args, "group_size", 1) > 1:  # the simulated workers are the groups
                given = f"{p} groups (--workers {args.workers} / --group-size {args.group_size})"
            raise ValueError(
                f"{text}: there is no worker {worker} with {given}; workers are 0..{p - 1}"
            )
        if worker in seen:
            raise ValueError(f"{text}: worker {worker} is given twice; give each worker once")
        seen.add(worker)
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"{text}: the slowdown factor must be a number > 0, e.g. 0:3")
    if args.numel is not None and args.numel < 1:
        raise ValueError(
            f"--numel {args.numel} must be >= 1 parameters, e.g. --numel 1000000; drop it to "
            "count the problem's own parameters"
        )
    if args.eval_interval is not None and not (
        math.isfinite(args.eval_interval) and args.eval_interval > 0
    ):
        raise ValueError(
            f"--eval-interval {args.eval_interval} must be a finite number > 0 of virtual "
            "seconds; drop it to evaluate only at the start and the end"
        )
    messages: tuple[str, ...] = ("latency", "bandwidth", "numel", "server_time")
    if mode is Mode.SEQUENTIAL:
        unpaid, why = messages, f"{hp.method} is sequential and sends no message"
        fix = "or choose a distributed method, e.g. --method easgd --workers 4"
    elif mode is Mode.SYNC and p == 1:
        unpaid, why = messages, f"with --workers 1, {hp.method} on the sync schedule sends nothing"
        fix = "or use --workers 2 or more"
    elif mode is Mode.SYNC:
        unpaid = ("server_time",)
        why = f"{hp.method} on the sync schedule all-reduces, with no parameter server"
        fix = (
            "or use --schedule async"
            if Mode.ASYNC in hp.spec.modes
            else "or a method with a parameter server (easgd, downpour) on --schedule async"
        )
    else:
        return  # a parameter server: every cost is paid
    for dest in unpaid:
        if _given(args, dest):
            flag = "--" + dest.replace("_", "-")
            raise ValueError(
                f"{flag} {getattr(args, dest):g} has no effect: {why}; drop {flag}, {fix}"
            )


def _objective(args: argparse.Namespace) -> Objective:
    """The dataset problem of ``--problem`` (the quadratic is built in :func:`run`)."""
    from easgd.sim import ModelObjective
    from easgd.task import build_task

    parts = build_task(args.problem, args.model, seed=args.seed, data_dir=args.data_dir)
    return ModelObjective(parts.build, parts.train, parts.test, args.batch_size, parts.transform)


def _scalarize(v: Any) -> Any:
    values = v.tolist()
    return values[0] if len(values) == 1 else values


def result_json(args: argparse.Namespace, hp: Hyperparams, res: SimResult) -> dict[str, Any]:
    small = res.center.numel() <= 1000
    used = hp.to_dict()  # a hyperparameter the method does not use is None
    out: dict[str, Any] = {
        "problem": args.problem,
        "method": hp.method,
        "schedule": args.schedule,
        "p": hp.workers,
        "group_size": args.group_size,
        "engine": res.engine,
        "compress": args.compress,
        "overlap": args.overlap,
        "tau": hp.tau,
        "lr": hp.lr,
        "alpha": used["alpha"],
        "beta": used["beta"],
        "momentum": used["momentum"],
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
    # Every flag is checked before the problem is built (a dataset takes a while to load).
    _check_problem(args)
    quadratic = (
        Quadratic(h=args.h, sigma=args.noise, x0=args.x0, dim=args.dim)
        if args.problem == "quadratic"
        else None
    )
    if args.steps < 0:
        raise ValueError(f"--steps {args.steps} must be >= 0")
    groups = _check_groups(args)
    given_workers = args.workers
    args.workers = groups  # the center sees the groups (as easgd train's methods do)
    check_elasticity_args(args)
    hp = hyperparams_from_args(args)
    args.workers = given_workers
    mode = resolve_mode(hp, args.schedule)
    _check_exchange(args, hp, mode)
    _check_cost(args, hp, mode)
    cost = CostModel(
        step_time=args.step_time,
        step_dist=args.step_dist,
        stragglers=dict(args.straggler),
        latency=args.latency,
        bandwidth=args.bandwidth,
        server_time=args.server_time,
        numel=args.numel,
        group_size=args.group_size,
        group_latency=args.group_latency,
        group_bandwidth=args.group_bandwidth,
    )
    if quadratic is not None:
        hp.check_quadratic(args.h)
    problem: Objective = quadratic if quadratic is not None else _objective(args)
    if args.group_size > 1:
        problem = Grouped(problem, args.group_size)
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
        engine=args.engine,
        compress=args.compress,
        overlap=args.overlap,
    )
    progress.close()
    out = result_json(args, hp, res)
    if args.json:
        print(json_dumps(out))  # strict JSON: a diverged run's inf/NaN losses are null
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
