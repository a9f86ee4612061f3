"""The ``easgd`` command line: one module per subcommand.

Each subcommand module exposes ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed namespace and returning the exit status.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Sequence
from typing import NoReturn

from easgd import __version__

__all__ = ["build_parser", "main"]

# Subcommand modules, in the order `easgd --help` lists them.
_SUBCOMMANDS = ("train", "simulate", "stability", "experiment", "report", "models", "export")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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


def _flag_names(parser: argparse.ArgumentParser, command: str | None) -> dict[str, str]:
    """``dest -> --flag`` for the flags of ``command`` (its first long spelling)."""
    sub = next((a for a in parser._actions if a.dest == "command"), None)
    choices = getattr(sub, "choices", None) or {}
    if command not in choices:
        return {}
    names: dict[str, str] = {}
    for action in choices[command]._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs and action.dest not in names:
            names[action.dest] = longs[0]
    return names


def flagify(message: str, flags: dict[str, str]) -> str:
    """Name flags, not fields: ``batch_size=0`` in a library error becomes ``--batch-size 0``.

    The library's errors name its fields (``name=value``), which is right for Python users;
    on the command line the same message names the flag the user typed.
    """
    if not flags:
        return message
    names = "|".join(sorted(map(re.escape, flags), key=len, reverse=True))
    # Only a literal value: a number, inf/nan/None/True/False, or a quoted string (never an
    # expression such as alpha=beta/p, which stays as it is).
    literal = r"'[^']*'|\"[^\"]*\"|[-+]?(?:\d[\d.]*(?:e[-+]?\d+)?|inf|nan)|None|True|False"
    pattern = re.compile(rf"(?<![\w.\-])({names})=({literal})(?![\w/*.=])")

    def render(match: re.Match[str]) -> str:
        value = match.group(2)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        return f"{flags[match.group(1)]} {value}"

    return pattern.sub(render, message)


def _os_error(exc: OSError) -> str:
    """An OSError as one line: what failed, on which file, and what to do."""
    where = f": {exc.filename}" if exc.filename else ""
    advice = {
        errno.EACCES: "choose a folder you can write to",
        errno.EROFS: "the file system is read-only; choose another folder",
        errno.ENOSPC: "the disk is full; free space or choose another folder",
        errno.EDQUOT: "the disk quota is exceeded; free space or choose another folder",
        errno.ENOTDIR: "a file is in the way of a folder; choose another path",
        errno.EISDIR: "a folder is in the way of a file; choose another path",
    }.get(exc.errno or 0, "")
    text = f"{exc.strerror or exc}{where}"
    return f"{text}; {advice}" if advice else text


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    # Warnings (a dubious but legal hyperparameter) reach the user as one line each.
    flags = _flag_names(parser, args.command)
    warnings.formatwarning = lambda msg, cat, *_a, **_k: (
        f"easgd: {cat.__name__}: {flagify(str(msg), flags)}\n"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as exc:
        # Bad input: one clear line, no traceback.
        print(f"easgd {args.command}: error: {flagify(str(exc), flags)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`easgd ... | head`): no traceback, and none at exit either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as exc:
        # A folder that cannot be written, a full disk: one line naming the file.
        print(f"easgd {args.command}: error: {_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"easgd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
