"""The run directory: atomic files, JSON-lines event logs, and where everything lives.

Layout of a run directory::

    config.json          the resolved configuration
    metrics.jsonl        one JSON object per event (workers, servers, launcher)
    eval.jsonl           the evaluator's results: the center's test loss/error vs wall time
    snapshots/           timestamped center snapshots (center-<wall seconds>.pt)
    checkpoints/         server shards (server-<s>.pt) or the synchronous center (center.pt)
    logs/                each process's stderr
    summary.json         written last: final center test error, wall seconds, traffic

Everything is written atomically (temporary file in the same folder, fsync, rename), so a
failed run leaves the last good state readable and never a half-written file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "JsonlWriter",
    "RunPaths",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "read_jsonl",
]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Make the rename itself durable (a crash right after must not bring the old file back).
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(path: str | os.PathLike[str], obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


class JsonlWriter:
    """Appends one JSON object per line; safe for several processes sharing one file.

    Each event is a single ``write`` on a file opened with ``O_APPEND``, so lines from
    different processes never interleave.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, event: dict[str, Any]) -> None:
        os.write(self._fd, (json.dumps(event, allow_nan=True) + "\n").encode())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike[str], offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Complete lines of ``path`` from byte ``offset``; returns the events and the new offset.

    A last line still being written (no newline yet) is left for the next call.
    """
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    events = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return events, offset + end


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    yield from read_jsonl(path)[0]


class RunPaths:
    """Names of the files of one run directory (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def eval(self) -> Path:
        return self.root / "eval.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def snapshot(self, wall: float) -> Path:
        return self.snapshots / f"center-{wall:011.3f}.pt"

    def server_checkpoint(self, shard: int) -> Path:
        return self.checkpoints / f"server-{shard}.pt"

    @property
    def sync_checkpoint(self) -> Path:
        return self.checkpoints / "center.pt"

    def make(self) -> RunPaths:
        for d in (self.root, self.snapshots, self.checkpoints, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        return self


def wall_clock(start: float) -> float:
    """Seconds since ``start`` (a ``time.time()`` shared through the config)."""
    return time.time() - start
