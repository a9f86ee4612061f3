"""``easgd report DIR...``: the paper-style figures and table from run directories."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["check_writable_folder", "register", "run"]


def check_writable_folder(path: str | os.PathLike[str], flag: str) -> None:
    """Refuse, in one line naming ``flag``, a folder that cannot be written (or created).

    Checked with a real write (a probe file, removed at once) into ``path`` or, when it does
    not exist yet, into its nearest existing parent: permission bits do not tell the whole
    story (root, read-only mounts, ACLs). Nothing is left behind.
    """
    target = Path(path)
    existing = target
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == target else f"lies under {existing}, which is a file"
        raise ValueError(f"{flag} {target} {where}, not a folder; choose a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".easgd-probe.", dir=existing)
    except OSError as exc:
        where = "" if existing == target else f" (in {existing}, where it would be created)"
        raise ValueError(
            f"{flag} {target}: cannot write there{where}: {exc.strerror}; choose a folder "
            "you can write to"
        ) from None
    os.close(fd)
    os.unlink(probe)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        help="figures and a table from run directories (never trains)",
        description=(
            "Walk DIR... for run directories (summary.json, config.json, eval.jsonl, "
            "metrics.jsonl), group the seeds of each setting (method, tau, p, learning "
            "rate), keep the learning rate of each method per panel whose median seed is "
            "best, and draw training loss, center test loss and center test error against "
            "time (the median over the seeds, with a min-max band; one panel per tau or per "
            "p, the sequential reference in every panel) with a Markdown table: best and "
            "final error and time to a target error (median [min-max] over the seeds), "
            "speedup over the reference, exchanges and MB moved up to the plotted time and "
            "over the whole run."
        ),
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="folders holding run directories")
    parser.add_argument(
        "--out", default=None, help="where figure.png/.svg, table.md go (default: DIR/report)"
    )
    parser.add_argument(
        "--target",
        type=float,
        default=None,
        metavar="ERR",
        help="target center test error (a fraction) for time-to-target and speedup "
        "(default: max(1.5 x lowest best error, median best error))",
    )
    parser.add_argument(
        "--panel",
        default="auto",
        choices=["auto", "tau", "workers"],
        help="one panel per tau or per p (default auto: the field that varies within a method)",
    )
    parser.add_argument(
        "--reference", default=None, help="sequential reference method (default: msgd if present)"
    )
    parser.add_argument("--title", default=None, help="figure and table title")
    parser.add_argument(
        "--tensorboard",
        default=None,
        metavar="TBDIR",
        help="instead of the figures, write each run's TensorBoard events (what easgd train "
        "--tensorboard writes) to TBDIR/<the run's path under DIR>; what a folder holds "
        "already is not written twice (needs pip install 'easgd[tensorboard]')",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from easgd.report import build_report, load_runs, write_report

    if args.target is not None and not (math.isfinite(args.target) and 0 < args.target <= 1):
        raise ValueError(
            f"--target {args.target:g} must be a center test error in (0, 1], a fraction "
            "(5% is --target 0.05)"
        )
    runs = load_runs(args.dirs)
    if args.tensorboard is not None:
        return _write_tensorboard(args.dirs, [r.path for r in runs], Path(args.tensorboard))
    if args.out is not None:
        out, flag = Path(args.out), "--out"
    else:
        out, flag = Path(args.dirs[0]) / "report", "--out (default DIR/report)"
    check_writable_folder(out, flag)  # before drawing anything
    report = build_report(
        runs,
        panel=None if args.panel == "auto" else args.panel,
        target=args.target,
        reference=args.reference,
    )
    written = write_report(report, out, args.title)
    seeds = max((ln.seeds for ln in report.lines), default=1)
    print(
        f"{len(runs)} runs, {len(report.lines)} lines (up to {seeds} seeds each), "
        f"target error {report.target:.4f}"
    )
    for path in written:
        print(path)
    return 0


def _write_tensorboard(dirs: list[str], runs: list[Path], target: Path) -> int:
    """``--tensorboard TBDIR``: each run's events in TBDIR/<its path under its DIR>."""
    from easgd.runlog.tensorboard import INSTALL_HINT, require_tensorboard, write_tensorboard

    try:
        require_tensorboard()
    except ImportError:
        raise ValueError(
            f"--tensorboard {target} needs the tensorboard package, which is not installed: "
            f"{INSTALL_HINT}"
        ) from None
    check_writable_folder(target, "--tensorboard")
    roots = [Path(d).resolve() for d in dirs]
    for run in runs:
        where = run.resolve()
        root = next(r for r in roots if where == r or r in where.parents)
        folder = target / (where.relative_to(root) if where != root else where.name)
        written = write_tensorboard(run, folder)
        print(f"{run}: {written} scalars -> {folder}")
    return 0
