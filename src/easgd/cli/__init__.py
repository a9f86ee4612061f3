"""The ``easgd`` command line: one module per subcommand.

Each subcommand module exposes ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed namespace and returning the exit status.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from easgd import __version__

__all__ = ["build_parser", "main"]

# Subcommand modules, in the order `easgd --help` lists them.
_SUBCOMMANDS = ("train", "simulate", "stability", "experiment", "report", "models")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="easgd",
        description=(
            "Elastic Averaging SGD for PyTorch: distributed training, a cluster simulator "
            "and the paper's stability analysis."
        ),
    )
    parser.add_argument("--version", action="version", version=f"easgd {__version__}")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level of the library (default: WARNING)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMANDS:
        importlib.import_module(f"easgd.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    # Warnings (a dubious but legal hyperparameter) reach the user as one line each.
    warnings.formatwarning = lambda msg, cat, *_a, **_k: f"easgd: {cat.__name__}: {msg}\n"
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as exc:
        # Bad input: one clear line, no traceback.
        print(f"easgd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`easgd ... | head`): no traceback, and none at exit either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"easgd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
