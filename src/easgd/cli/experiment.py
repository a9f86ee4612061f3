"""``easgd experiment NAME``: run a named, versioned sweep (the paper's figures and twins)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from easgd.cli._table import format_table
from easgd.cli.report import check_writable_folder
from easgd.experiments import (
    EXPERIMENTS,
    MAX_EXTENSIONS,
    RUNTIMES,
    SweepEvent,
    get_experiment,
    run_sweep,
)
from easgd.runlog import SUMMARY_FILE, SweepPaths, SweepStatus

__all__ = ["register", "run"]


def _on_off(text: str) -> bool:
    value = text.strip().lower()
    if value in ("on", "yes", "true", "1"):
        return True
    if value in ("off", "no", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: expected on or off")


def register(subparsers: Any) -> None:
    listing = "; ".join(f"{e.name} (v{e.version}): {e.description}" for e in EXPERIMENTS.values())
    parser = subparsers.add_parser(
        "experiment",
        help="run a named sweep (paper-fig2, paper-fig3, report-mnist, digits-fig2, ...)",
        description=(
            "Run a named, versioned experiment: every (method, tau, p, lr, seed) of it, each "
            "into its own folder under --out. Resumable: a run whose summary.json exists is "
            "skipped; a failed run is recorded and the sweep goes on (the exit status is the "
            "number of failed runs). Then `easgd report DIR` draws the figures. "
            f"Experiments: {listing}."
        ),
    )
    parser.add_argument("name", nargs="?", choices=list(EXPERIMENTS), metavar="NAME",
                        help=f"one of {', '.join(EXPERIMENTS)} (see --list)")  # fmt: skip
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    parser.add_argument(
        "--runtime",
        default="real",
        choices=RUNTIMES,
        help="real (default): worker processes, as easgd train; sim: the simulator on a "
        "virtual clock",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        metavar="F",
        help="multiply every time budget (and evaluation interval) by F (default 1), e.g. 0.2 "
        "for a smoke run",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="N",
        help="independent runs per setting (default: the experiment's)",
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default: runs/experiments/<NAME>)"
    )
    parser.add_argument(
        "--lr-grid",
        type=_on_off,
        default=True,
        metavar="on|off",
        help="on (default): each method's learning-rate grid; off: its single default "
        "learning rate",
    )
    parser.add_argument(
        "--only", default=None, metavar="METHOD[,..]", help="run only these methods"
    )
    parser.add_argument(
        "--lr-extensions",
        type=int,
        default=MAX_EXTENSIONS,
        metavar="N",
        help="a setting whose best learning rate is the largest (smallest) of its grid gets "
        "one more rate past that edge, by the grid's step there, up to N times (default "
        f"{MAX_EXTENSIONS}; 0: never); a best still on an edge is marked in the tables",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="the workers' device: cpu (default), cuda (worker i on GPU i mod the GPUs "
        "visible), cuda:N or auto (cuda when there is one); the parameter servers keep the "
        "center on the CPU, as easgd train --device does",
    )
    parser.add_argument(
        "--same-init",
        type=_on_off,
        default=None,
        metavar="on|off",
        help="on: every seed starts from the same initial network (the seed changes the data "
        "order and dropout), as the paper's 3 runs per setting; off: the seed draws the init "
        "too (default: the experiment's, on for the paper-* ones)",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the runs, run nothing")
    parser.add_argument("--data-dir", default=None, help="folder holding the dataset's files")
    parser.add_argument(
        "--step-time",
        type=float,
        default=None,
        metavar="SECONDS",
        help="sim: virtual seconds of one local step (default: measured on this machine)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(func=run)


def _only(args: argparse.Namespace) -> list[str] | None:
    """``--only a,b`` as a list of names (None: every method)."""
    if args.only is None:
        return None
    names = [m.strip() for m in args.only.split(",")]
    if not all(names):
        raise ValueError(
            f"--only {args.only!r} has an empty name; give methods separated by commas, "
            "e.g. --only easgd,msgd"
        )
    return names


def _check_args(args: argparse.Namespace, out: str) -> str:
    """Refuse out-of-range and ignored flags before anything runs (or is listed).

    Returns ``--device`` resolved (``auto``: ``cuda`` or ``cpu``), checked as ``easgd train``
    checks it: CUDA asked for on a CPU build of torch, or with no GPU visible, is refused.
    """
    from easgd.preflight import check_device

    if not (math.isfinite(args.scale) and args.scale > 0):
        raise ValueError(
            f"--scale {args.scale:g} must be a finite number > 0 (e.g. 0.2 for a smoke run)"
        )
    if args.seeds is not None and args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds} must be >= 1 (independent runs per setting)")
    if args.lr_extensions < 0:
        raise ValueError(f"--lr-extensions {args.lr_extensions} must be >= 0 (0: never extend)")
    if args.device != "cpu" and args.runtime != "real":
        raise ValueError(
            f"--device {args.device} applies to --runtime real (the simulator computes on the "
            "CPU); drop --device or use --runtime real"
        )
    if args.step_time is not None:
        if args.runtime != "sim":
            raise ValueError(
                f"--step-time {args.step_time:g} applies to --runtime sim only (a real run "
                "takes the time its steps take); add --runtime sim or drop --step-time"
            )
        if not (math.isfinite(args.step_time) and args.step_time > 0):
            raise ValueError(
                f"--step-time {args.step_time:g} must be a finite number > 0 of virtual "
                "seconds; drop it to measure it on this machine"
            )
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise ValueError(
            f"--data-dir {args.data_dir} is not a folder; give the folder holding the "
            "dataset's files, or drop --data-dir to use the cache (downloading if needed)"
        )
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose a folder")
    device = check_device(args.device)
    if not args.dry_run:
        check_writable_folder(out, "--out")
    return device


def _print_runs(args: argparse.Namespace, out: str, device: str) -> int:
    exp = get_experiment(args.name)
    runs = exp.runs(lr_grid=args.lr_grid, seeds=args.seeds, only=_only(args))
    same_init = exp.same_init if args.same_init is None else args.same_init
    budget = exp.time_budget * args.scale
    sweep = SweepPaths(out)
    rows = [
        {"#": i, "run": r.name, "method": r.method, "tau": r.tau, "p": r.workers, "lr": r.lr,
         "seed": r.seed, "status": "done" if sweep.run(r.name).summary.exists() else "todo"}
        for i, r in enumerate(runs, 1)
    ]  # fmt: skip
    print(format_table(rows))
    unit = "virtual s" if args.runtime == "sim" else "s of training"
    print(
        f"{exp.name} v{exp.version}: {len(runs)} runs, {budget:g} {unit} each "
        f"({args.runtime} runtime, workers on {device}), into {out}"
    )
    grids: dict[tuple[str, int, int], set[float]] = {}
    for r in runs:
        grids.setdefault((r.method, r.tau, r.workers), set()).add(r.lr)
    seeds = args.seeds or exp.seeds
    init = "one initial network for every seed" if same_init else "the seed draws the init"
    print(f"{seeds} seed(s) per setting, {init} (--same-init {'on' if same_init else 'off'})")
    if args.lr_grid and args.lr_extensions:
        # A grid of one rate grows both ways at its first extension (easgd.experiments.sweep).
        rates = sum(args.lr_extensions + (len(g) == 1) for g in grids.values())
        print(
            f"plus at most {rates * seeds} more runs: a setting ({len(grids)} here) whose best "
            "learning rate falls on an edge of its grid gets one more rate past that edge, up "
            f"to {args.lr_extensions} times (--lr-extensions)"
        )
    return 0


def _prepare_data(dataset: str, data_dir: str | None) -> None:
    """Find (or download) and verify the data set's files once, before any run starts.

    The runs' workers then find them in place; an ImageNet folder is decoded into its cache
    here (:mod:`easgd.data.imagefolder`), once, rather than by the first run's workers.
    """
    from easgd.data import DatasetError, dataset_info, locate_dataset

    name = dataset_info(dataset).name
    flag = f"--data-dir {data_dir}" if data_dir else f"--dataset {name}"
    try:
        files = locate_dataset(name, data_dir=data_dir)
        if name == "imagenet":
            from easgd.data.imagefolder import prepare_image_folder

            prepare_image_folder(next(iter(files.values())).parent)
    except DatasetError as exc:
        raise ValueError(f"{flag}: {exc}") from None


def _progress(event: SweepEvent) -> None:
    head = f"[{event.index}/{event.total}] {event.run.name}"
    if event.status == SweepStatus.START:
        print(f"{head} ...", file=sys.stderr, flush=True)
    elif event.status == SweepStatus.SKIPPED:
        print(f"{head} skipped ({SUMMARY_FILE} exists)", file=sys.stderr, flush=True)
    elif event.status == SweepStatus.FAILED:
        print(f"{head} FAILED after {event.seconds:.1f} s: {event.error}", file=sys.stderr)
    else:
        s = event.summary or {}
        best, final = (_fmt(s.get(k)) for k in ("best_center_test_error", "center_test_error"))
        print(
            f"{head} done in {event.seconds:.1f} s: best center test error {best}, final {final}",
            file=sys.stderr,
            flush=True,
        )


def run(args: argparse.Namespace) -> int:
    if args.list:
        rows = [
            {"name": e.name, "version": e.version, "runs": len(e.runs()),
             "budget_s": e.time_budget, "description": e.description}
            for e in EXPERIMENTS.values()
        ]  # fmt: skip
        print(format_table(rows))
        return 0
    if not args.name:
        raise ValueError(
            f"give an experiment NAME, one of {', '.join(EXPERIMENTS)}; "
            "`easgd experiment --list` describes them"
        )
    out = args.out or os.path.join("runs", "experiments", args.name)
    device = _check_args(args, out)
    if args.dry_run:
        return _print_runs(args, out, device)
    _prepare_data(get_experiment(args.name).dataset, args.data_dir)
    from easgd.experiments.sweep import SweepInterrupted

    try:
        result = run_sweep(
            get_experiment(args.name),
            out,
            runtime=args.runtime,
            scale=args.scale,
            seeds=args.seeds,
            lr_grid=args.lr_grid,
            only=_only(args),
            data_dir=args.data_dir,
            step_time=args.step_time,
            device=device,
            same_init=args.same_init,
            max_extensions=args.lr_extensions,
            progress=None if args.quiet else _progress,
        )
    except SweepInterrupted as exc:
        print(f"easgd experiment: {exc}", file=sys.stderr)
        return exc.exit_status
    rows = [
        {"method": m, "tau": t, "p": p, "best lr": s["lr"],
         "grid edge": result.edge((m, t, p)) or "",
         "best error": s.get("best_center_test_error"), "final error": s.get("center_test_error")}
        for (m, t, p), s in sorted(result.best.items())
    ]  # fmt: skip
    if rows:
        print(format_table(rows))
        if any(row["grid edge"] for row in rows):
            print(
                "grid edge: the best learning rate is still the largest (top) or smallest "
                "(bottom) one tried: the optimum may lie beyond it; raise --lr-extensions"
            )
    print(
        f"{len(result.done)} run, {len(result.skipped)} skipped, {len(result.failed)} failed "
        f"of {len(result.runs)}; run directories in {out}; next: easgd report {out}"
    )
    for name, error in result.failed.items():
        print(f"failed: {name}: {error}", file=sys.stderr)
    return min(len(result.failed), 100)


def _fmt(value: float | None) -> str:
    """An error rate for a progress line: "none" when the run has no center to report."""
    return "none" if value is None else f"{value:.4f}"
