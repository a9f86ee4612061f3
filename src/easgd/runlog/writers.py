"""The only writers of a run's files: atomic files (bytes, text, JSON, tensors) and JSON lines.

A run's files are private: created ``0600`` (folders they need, ``0700``), and a stricter
umask is honoured (``mode & ~umask``), because checkpoints, logs and events say what the run
computed and where its servers listen. Results meant to be shared (``easgd report``'s
figures and tables) pass ``mode=0o644`` (folders ``0755``).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    pass

__all__ = [
    "JsonlWriter",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "iter_jsonl",
    "json_dumps",
    "read_jsonl",
    "strict_json",
]


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by None, JSON's ``null``.

    Python's ``json`` writes them as bare ``NaN``/``Infinity``, which no strict parser reads;
    a diverged run's losses must still give valid JSON.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    return obj


def json_dumps(obj: Any, **kwargs: Any) -> str:
    """:func:`json.dumps` that writes strict JSON: non-finite floats become ``null``."""
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError:  # a NaN or an infinity somewhere (the rare case: convert, then dump)
        return json.dumps(strict_json(obj), allow_nan=False, **kwargs)


# ------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------


#: The mode of every file a run writes (before the umask): private to its owner.
PRIVATE = 0o600


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _folder_mode(mode: int) -> int:
    """The mode of a folder made for a file of ``mode``: searchable where readable."""
    return mode | ((mode & 0o444) >> 2)


def _make_parent(path: Path, mode: int) -> None:
    """Create ``path``'s missing folders with the folder mode of ``mode`` (umask applied)."""
    missing = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by another process
            folder.mkdir(mode=_folder_mode(mode))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int = PRIVATE) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half.

    ``mode``: the new file's permissions before the umask (default ``0600``; ``0o644`` for
    results meant to be shared). The only atomic writer: JSON, text and tensors go through it.
    """
    path = Path(path)
    _make_parent(path, mode)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, mode & ~_umask())  # mkstemp makes 0600, whatever the umask
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


def atomic_write_text(path: str | os.PathLike[str], text: str, *, mode: int = PRIVATE) -> None:
    """Write ``text`` (UTF-8) atomically (``mode``: as :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode(), mode=mode)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, mode: int = PRIVATE) -> None:
    """Write ``obj`` as indented strict JSON (non-finite floats: null), sorted keys, atomically."""
    atomic_write_text(path, json_dumps(obj, indent=2, sort_keys=True) + "\n", mode=mode)


def atomic_torch_save(path: str | os.PathLike[str], obj: Any, *, mode: int = PRIVATE) -> None:
    """``torch.save`` atomically (serialized in memory, then :func:`atomic_write_bytes`)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue(), mode=mode)


class JsonlWriter:
    """Appends one JSON object per line; safe for several processes and threads sharing a file.

    Each event is a single ``write`` on a file opened with ``O_APPEND``, so lines from
    different writers never interleave. ``default`` is :func:`json.dumps`'s (e.g. ``str`` for
    values JSON does not know). Lines are strict JSON (a non-finite float is written as
    ``null``). :meth:`write` can serve as an event callback as it is.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, default: Callable[[Any], Any] | None = None
    ) -> None:
        self.path = Path(path)
        _make_parent(self.path, PRIVATE)
        self._default = default
        # Created 0600 (the umask applies); an existing file keeps its mode.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE)
        self._lock = threading.Lock()  # threads of one process (a server's sessions)

    def write(self, event: Mapping[str, Any]) -> None:
        line = (json_dumps(event, default=self._default) + "\n").encode()
        with self._lock:
            if self._fd < 0:
                raise ValueError(f"JsonlWriter({self.path}) is closed; open a new one to write")
            written = os.write(self._fd, line)
            while written < len(line):  # only on a full disk or a signal: finish the line
                written += os.write(self._fd, line[written:])

    def close(self) -> None:
        with self._lock:
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
    events = []
    for number, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            where = f"line {number}" + (f" after byte {offset}" if offset else "")
            raise ValueError(
                f"{path}: {where} is not a JSON object ({exc}); the file is damaged or was "
                "not written by easgd"
            ) from None
        if not isinstance(event, dict):
            raise ValueError(
                f"{path}: line {number} is {type(event).__name__}, not a JSON object; the file "
                "is damaged or was not written by easgd"
            )
        events.append(event)
    return events, offset + end


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Every complete line of ``path`` (none if it does not exist)."""
    yield from read_jsonl(path)[0]
