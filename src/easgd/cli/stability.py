"""``easgd stability``: spectral radius of the paper's linear maps, and the stability figures.

Examples::

    easgd stability --map admm-roundrobin --p 3 --eta 0.001 --rho 2.5 --json
    easgd stability --map easgd-sync --p 4 --eta 0.1 --alpha 0.225
    easgd stability --figure figures/
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from easgd.analysis import figures, stability
from easgd.cli._table import format_table
from easgd.cli.report import check_writable_folder
from easgd.runlog import json_dumps

__all__ = ["register", "run"]

_SHOWN_EIGENVALUES = 10
_RESOLUTION = (10, 1000)  # figures.write_figures' range
_MAP_FLAGS = {"p": "--p", "eta": "--eta", "alpha": "--alpha", "rho": "--rho", "beta": "--beta"}


def register(subparsers: Any) -> None:
    """Add the ``stability`` subcommand to ``subparsers``."""
    parser = subparsers.add_parser(
        "stability",
        help="stability analysis of EASGD vs ADMM on a 1-D quadratic (paper section 6)",
        description=(
            "Spectral radius of one cycle of round-robin EASGD, synchronous EASGD or "
            "round-robin ADMM on F(x) = h x^2 / 2, and the paper's stability figures. "
            "A map is reported stable when its spectral radius is <= 1 + "
            f"{stability.STABILITY_TOL:g}."
        ),
    )
    parser.add_argument(
        "--map",
        dest="map_name",
        choices=stability.MAPS,
        help="which linear map to analyse (required unless --figure is given)",
    )
    parser.add_argument(
        "--workers", "--p", dest="p", type=int, metavar="P", help="number of workers p (>= 1)"
    )
    parser.add_argument(
        "--eta", type=float, help="learning rate times curvature, eta*h (h = 1), > 0"
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--alpha", type=float, help="moving rate alpha = eta*rho, > 0 (easgd-* maps only)"
    )
    group.add_argument("--rho", type=float, help="ADMM penalty rho, > 0 (admm-roundrobin only)")
    parser.add_argument(
        "--beta",
        type=float,
        help="center moving rate, > 0 (easgd-sync only; default p*alpha)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of a table"
    )
    parser.add_argument(
        "--figure",
        metavar="DIR",
        help="write the stability figures (PNG and SVG) into DIR and print their paths",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=80,
        help=f"grid points per axis of the figures, {_RESOLUTION[0]} to {_RESOLUTION[1]} "
        "(default: 80; with --figure only)",
    )
    parser.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    """Every flag is used: the map's parameters with --map, --resolution with --figure."""
    if args.map_name is None and args.figure is None:
        raise ValueError("give --map (with --p, --eta and --alpha or --rho) or --figure DIR")
    if args.map_name is None:
        for dest, flag in _MAP_FLAGS.items():
            if getattr(args, dest) is not None:
                raise ValueError(
                    f"{flag} {getattr(args, dest):g} applies to --map only (the figures fix "
                    f"their own parameters); add --map NAME or drop {flag}"
                )
    else:
        missing = [flag for flag in ("p", "eta") if getattr(args, flag) is None]
        if missing:
            raise ValueError(f"--map {args.map_name} needs --{' and --'.join(missing)}")
        admm = args.map_name == "admm-roundrobin"
        takes, other = ("rho", "alpha") if admm else ("alpha", "rho")
        what = "the ADMM penalty" if admm else "the moving rate eta*rho"
        if getattr(args, other) is not None:
            raise ValueError(
                f"--{other} {getattr(args, other):g} does not apply to --map {args.map_name}, "
                f"which takes --{takes} ({what}); pass --{takes} instead"
            )
        if getattr(args, takes) is None:
            raise ValueError(f"--map {args.map_name} needs {takes} ({what}): give --{takes}")
        if args.beta is not None and args.map_name != "easgd-sync":
            raise ValueError(
                f"--beta {args.beta:g} applies to --map easgd-sync only, not to "
                f"--map {args.map_name}; drop --beta"
            )
    lo, hi = _RESOLUTION
    if args.figure is None and args.resolution != 80:
        raise ValueError(
            f"--resolution {args.resolution} applies to --figure only; add --figure DIR or "
            "drop --resolution"
        )
    if not lo <= args.resolution <= hi:
        raise ValueError(
            f"--resolution {args.resolution} is outside [{lo}, {hi}] grid points per axis; "
            "e.g. --resolution 80"
        )
    if args.figure is not None:
        check_writable_folder(args.figure, "--figure")


def _analyze(args: argparse.Namespace) -> dict[str, Any]:
    given = " ".join(
        f"{flag} {getattr(args, dest):g}"
        for dest, flag in _MAP_FLAGS.items()
        if getattr(args, dest) is not None
    )
    try:
        with np.errstate(all="ignore"):  # an overflow is reported below, once
            return stability.analyze(
                args.map_name, args.p, args.eta, alpha=args.alpha, rho=args.rho, beta=args.beta
            )
    except np.linalg.LinAlgError:
        raise ValueError(
            f"--map {args.map_name} with {given} overflows (the map has infinite or NaN "
            "entries); use values of order 1, e.g. --eta 0.1"
        ) from None


def run(args: argparse.Namespace) -> int:
    """Analyse ``--map`` and/or write ``--figure``; return the exit status."""
    _check_args(args)
    result = _analyze(args) if args.map_name is not None else None
    paths = (
        [str(p) for p in figures.write_figures(args.figure, resolution=args.resolution)]
        if args.figure is not None
        else []
    )
    if args.json:
        out: dict[str, Any] = dict(result or {})
        if args.figure is not None:
            out["figures"] = paths
        print(json_dumps(out))  # strict JSON: an infinite radius is null
        return 0
    if result is not None:
        _print_result(result)
    for path in paths:
        print(path)
    return 0


def _print_result(result: dict[str, Any]) -> None:
    summary = [
        {"quantity": key, "value": "n/a" if value is None else value}
        for key, value in result.items()
        if key != "eigenvalues"
    ]
    print(format_table(summary))
    eig = result["eigenvalues"]
    rows = [
        {"re": re, "im": im, "|lambda|": abs(complex(re, im))}
        for re, im in eig[:_SHOWN_EIGENVALUES]
    ]
    shown = f"largest {len(rows)} of {len(eig)}" if len(eig) > len(rows) else f"all {len(eig)}"
    print(f"\neigenvalues ({shown}, by modulus):")
    print(format_table(rows))
