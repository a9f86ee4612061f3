"""``easgd models``: list the registered networks with their input shapes and sizes."""

from __future__ import annotations

import argparse
import json
from typing import Any

from easgd.cli._table import format_table
from easgd.models import describe_models

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    """Add the ``models`` subcommand to ``subparsers``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "models",
        help="list the networks (name, input shape, parameter count)",
        description="List the networks that --model accepts, with their default input shape "
        "(C, H, W), number of classes and number of parameters.",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows = describe_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [
        {
            "name": row["name"],
            "input": "x".join(str(s) for s in row["input_shape"]),
            "classes": row["num_classes"],
            "parameters": row["parameters"],
            "description": row["description"],
        }
        for row in rows
    ]
    print(format_table(table))
    return 0
