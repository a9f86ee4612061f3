"""The help formatter of the subcommands: each flag's default shown once, and only if real."""

from __future__ import annotations

import argparse

__all__ = ["HelpFormatter"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to a flag's help, except where X is None.

    A default of None means "derived" or "see the help", and the help then says what the
    real default is (``--epochs``: 60 unless another budget is given); printing
    ``(default: None)`` after it would show two defaults, one of them wrong.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)
