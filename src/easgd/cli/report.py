"""``easgd report DIR...``: the paper-style figures and table from run directories."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        help="figures and a table from run directories (never trains)",
        description=(
            "Walk DIR... for run directories (summary.json, config.json, eval.jsonl, "
            "metrics.jsonl), keep the best learning rate of each method per panel, and draw "
            "training loss, center test loss and center test error against time (one panel "
            "per tau or per p, the sequential reference in every panel) with a Markdown "
            "table: best and final error, time to a target error, speedup over the "
            "reference, exchanges and MB moved."
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
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from easgd.report import build_report, load_runs, write_report

    runs = load_runs(args.dirs)
    report = build_report(
        runs,
        panel=None if args.panel == "auto" else args.panel,
        target=args.target,
        reference=args.reference,
    )
    out = Path(args.out) if args.out else Path(args.dirs[0]) / "report"
    written = write_report(report, out, args.title)
    print(f"{len(runs)} runs, {len(report.lines)} lines, target error {report.target:.4f}")
    for path in written:
        print(path)
    return 0
