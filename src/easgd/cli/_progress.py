"""A one-line progress display on stderr (redrawn in place on a terminal)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """Redraws ``label done/total rate extra`` at most every ``interval`` seconds.

    On a terminal the line is redrawn in place; otherwise (CI, a pipe) a line is written at
    most every ``log_interval`` seconds so logs stay short. ``enabled=False`` silences it.
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float = 0.2,
        log_interval: float = 10.0,
    ) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if self.tty else log_interval
        self.started = time.perf_counter()
        self._last = -1e9
        self._width = 0

    def update(self, done: int, extra: str = "", *, force: bool = False) -> None:
        """Show ``done`` (of ``total``) with its rate, and ``extra``."""
        elapsed = time.perf_counter() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total is not None else ""
        self.show(f"{done}{of}  {rate:.1f}/s  {extra}", force=force)

    def show(self, status: str, *, force: bool = False) -> None:
        """Show a free-form status after the label and the elapsed time."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        text = f"{self.label} {now - self.started:5.0f}s  {status}".rstrip()
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
