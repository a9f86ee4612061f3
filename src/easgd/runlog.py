"""The run directory: its layout, its events, its schema, and the only writers of its files.

Everything a run, a sweep or a report writes is named here, so that a file name, an event
name or a field is spelled once. ``docs/run-directory.md`` documents the same schema for
people; ``tests/test_runlog.py`` holds the document, the code and real runs to each other.

Layout of a run directory (:class:`RunPaths`)::

    config.json          the resolved configuration (easgd.config.TrainConfig)
    metrics.jsonl        one JSON object per event (workers, servers, launcher): EVENT_FIELDS
    eval.jsonl           the center's test loss and error against wall time: EVAL_FIELDS
    snapshots/           timestamped center snapshots (center-<wall seconds>.pt)
    checkpoints/         server shards (server-<s>.pt) or the synchronous center (center.pt)
    logs/                each process's stdout and stderr (<role>-<index>[.<restart>].log)
    summary.json         written last, by write_summary: SUMMARY_FIELDS
    run.json, failed.json   written by ``easgd experiment`` into each run of a sweep

A sweep folder (:class:`SweepPaths`) holds ``experiment.json``, ``sweep.json`` and one run
directory per run; a report folder (:class:`ReportPaths`) holds ``figure.png``,
``figure.svg``, ``table.md`` and ``report.json``.

Every file is written atomically (temporary file in the same folder, fsync, rename, fsync of
the folder), so a failed run leaves the last good state readable and never a half-written
file; JSON-lines files are appended one whole line per ``write`` (:class:`JsonlWriter`).
"""

from __future__ import annotations

import contextlib
import enum
import io
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import torch

if TYPE_CHECKING:
    from easgd.config import TrainConfig

__all__ = [
    "CONFIG_FILE",
    "EVAL_FIELDS",
    "EVAL_FILE",
    "EVENT_FIELDS",
    "EXPERIMENT_FILE",
    "FAILED_FILE",
    "METRICS_FILE",
    "PROGRESS_EVENTS",
    "REPORT_FILE",
    "RUN_INFO_FILE",
    "SUMMARY_FIELDS",
    "SUMMARY_FILE",
    "SWEEP_FILE",
    "TABLE_FILE",
    "Event",
    "FieldSpec",
    "JsonlWriter",
    "ReportPaths",
    "RunPaths",
    "SweepPaths",
    "SweepStatus",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "eval_line",
    "eval_problems",
    "event_problems",
    "iter_jsonl",
    "read_jsonl",
    "snapshot_wall",
    "summary_problems",
    "training_span",
    "update_summary",
    "write_summary",
]

# ------------------------------------------------------------------------------------------
# File names
# ------------------------------------------------------------------------------------------

CONFIG_FILE: Final = "config.json"
METRICS_FILE: Final = "metrics.jsonl"
EVAL_FILE: Final = "eval.jsonl"
SUMMARY_FILE: Final = "summary.json"
RUN_INFO_FILE: Final = "run.json"  # easgd experiment: the run's place in its sweep, its budget
FAILED_FILE: Final = "failed.json"  # easgd experiment: the error of a run that raised
EXPERIMENT_FILE: Final = "experiment.json"  # a sweep's resolved runs and settings
SWEEP_FILE: Final = "sweep.json"  # what a sweep did, and the best lr per (method, tau, p)
TABLE_FILE: Final = "table.md"
REPORT_FILE: Final = "report.json"
_FIGURE_STEM: Final = "figure"
_SNAPSHOT_PREFIX: Final = "center-"
_SNAPSHOT_NAME = re.compile(r"center-(\d+(?:\.\d*)?)\.pt")


def snapshot_wall(path: str | os.PathLike[str]) -> float:
    """The wall time (seconds since the run's start) in a snapshot's name, ``center-<s>.pt``.

    The inverse of :meth:`RunPaths.snapshot`, so that a snapshot's time survives without
    opening it.
    """
    match = _SNAPSHOT_NAME.fullmatch(Path(path).name)
    if match is None:
        raise ValueError(
            f"{path} is not a snapshot name; snapshots are named center-<wall seconds>.pt "
            "(RunPaths.snapshot)"
        )
    return float(match.group(1))


class RunPaths:
    """The files of one run directory (see the module docstring and docs/run-directory.md)."""

    __slots__ = ("root",)

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunPaths({str(self.root)!r})"

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def eval(self) -> Path:
        return self.root / EVAL_FILE

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def run_info(self) -> Path:
        return self.root / RUN_INFO_FILE

    @property
    def failed(self) -> Path:
        return self.root / FAILED_FILE

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
        """The snapshot of the center taken ``wall`` seconds into the run (sorts by time)."""
        return self.snapshots / f"{_SNAPSHOT_PREFIX}{wall:011.3f}.pt"

    def snapshot_files(self) -> list[Path]:
        """The snapshots present, in the order of their wall times."""
        if not self.snapshots.is_dir():
            return []
        found = (p for p in self.snapshots.iterdir() if _SNAPSHOT_NAME.fullmatch(p.name))
        return sorted(found, key=snapshot_wall)

    def server_checkpoint(self, shard: int) -> Path:
        """Parameter-server shard ``shard``'s checkpoint (asynchronous runs)."""
        return self.checkpoints / f"server-{shard}.pt"

    @property
    def sync_checkpoint(self) -> Path:
        """The center kept by worker 0 (synchronous and sequential runs)."""
        return self.checkpoints / "center.pt"

    def log(self, role: str, index: int, restart: int = 0) -> Path:
        """The stdout/stderr of ``role`` ``index``; restart ``k > 0`` of a worker gets ``.k``."""
        if restart < 0:
            raise ValueError(f"restart={restart!r} must be >= 0 (0: the first launch)")
        suffix = f".{restart}" if restart else ""
        return self.logs / f"{role}-{index}{suffix}.log"

    def make(self) -> RunPaths:
        """Create the run directory and its folders; returns ``self``."""
        for d in (self.root, self.snapshots, self.checkpoints, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def holds_run(self) -> bool:
        """Whether a run was started here (its ``config.json`` exists)."""
        return self.config.exists()

    def clear(self) -> None:
        """Remove what a run writes here (``--overwrite``); other files are left alone."""
        for path in (self.metrics, self.eval, self.summary, self.config):
            path.unlink(missing_ok=True)
        for folder in (self.snapshots, self.checkpoints, self.logs):
            shutil.rmtree(folder, ignore_errors=True)


class SweepPaths:
    """The files of a sweep folder (``easgd experiment``): its header, its result, its runs."""

    __slots__ = ("root",)

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @property
    def experiment(self) -> Path:
        return self.root / EXPERIMENT_FILE

    @property
    def sweep(self) -> Path:
        return self.root / SWEEP_FILE

    def run(self, name: str) -> RunPaths:
        """The run directory of run ``name``."""
        return RunPaths(self.root / name)


class ReportPaths:
    """The files ``easgd report`` writes into its output folder."""

    __slots__ = ("root",)
    FIGURE_FORMATS: Final = ("png", "svg")

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def figure(self, fmt: str) -> Path:
        if fmt not in self.FIGURE_FORMATS:
            raise ValueError(f"figure format {fmt!r}; choose one of {self.FIGURE_FORMATS}")
        return self.root / f"{_FIGURE_STEM}.{fmt}"

    @property
    def table(self) -> Path:
        return self.root / TABLE_FILE

    @property
    def report(self) -> Path:
        return self.root / REPORT_FILE


# ------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half.

    The only atomic writer: JSON, text and tensors go through it.
    """
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


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) atomically."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON with sorted keys, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(path: str | os.PathLike[str], obj: Any) -> None:
    """``torch.save`` atomically (serialized in memory, then :func:`atomic_write_bytes`)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


class JsonlWriter:
    """Appends one JSON object per line; safe for several processes and threads sharing a file.

    Each event is a single ``write`` on a file opened with ``O_APPEND``, so lines from
    different writers never interleave. ``default`` is :func:`json.dumps`'s (e.g. ``str`` for
    values JSON does not know). :meth:`write` can serve as an event callback as it is.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, default: Callable[[Any], Any] | None = None
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._default = default
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, event: Mapping[str, Any]) -> None:
        if self._fd < 0:
            raise ValueError(f"JsonlWriter({self.path}) is closed; open a new one to write")
        line = (json.dumps(event, allow_nan=True, default=self._default) + "\n").encode()
        written = os.write(self._fd, line)
        while written < len(line):  # only on a full disk or a signal: finish the line
            written += os.write(self._fd, line[written:])

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
    """Every complete line of ``path`` (none if it does not exist)."""
    yield from read_jsonl(path)[0]


# ------------------------------------------------------------------------------------------
# Events
# ------------------------------------------------------------------------------------------


class Event(str, enum.Enum):
    """The ``event`` of a line of ``metrics.jsonl`` (who writes it: see EVENT_FIELDS).

    A ``str`` enum: ``Event.STEP == "step"`` and ``json.dumps`` writes ``"step"``.
    """

    # A worker (easgd.roles.worker; the simulated runs of easgd experiment write STEP).
    TRAIN_START = "train_start"
    STEP = "step"
    EXCHANGE = "exchange"
    WORKER_DONE = "worker_done"
    # The launcher (easgd.launch).
    WORKER_RESTART = "worker_restart"
    WORKER_LOST = "worker_lost"
    # A parameter server (easgd.comm.ps through easgd.roles.server).
    SERVER_START = "start"
    CHECKPOINT = "checkpoint"
    JOIN = "join"
    BYE = "bye"
    DEATH = "death"
    CLOSED = "closed"
    REJECTED = "rejected"
    REJECT = "reject"
    AUTH_FAILURE = "auth_failure"
    SERVER_STOP = "stop"
    SERVER_DONE = "server_done"

    def __str__(self) -> str:
        return self.value


#: The events that carry a worker's progress: local step, training loss and traffic.
PROGRESS_EVENTS: Final = frozenset({Event.STEP, Event.EXCHANGE})


class SweepStatus(str, enum.Enum):
    """``SweepEvent.status``: what ``easgd experiment`` reports about one run of a sweep."""

    START = "start"
    DONE = "done"
    SKIPPED = "skipped"  # its summary.json exists: a resumed sweep does not run it again
    FAILED = "failed"  # it raised; failed.json holds the error

    def __str__(self) -> str:
        return self.value


# ------------------------------------------------------------------------------------------
# Schema
# ------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return _is_int(v) or isinstance(v, float)


_TYPES: dict[str, Callable[[Any], bool]] = {
    "int": _is_int,
    "float": _is_number,  # JSON does not tell 2 from 2.0
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "list[int]": lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
    "float or null": lambda v: v is None or _is_number(v),
}


@dataclass(frozen=True)
class FieldSpec:
    """One field of a record: its JSON type, its unit ("" when it has none), what it means.

    ``required=False``: the field may be absent (the meaning says when).
    """

    type: str
    unit: str
    doc: str
    required: bool = True

    def __post_init__(self) -> None:
        if self.type not in _TYPES:
            raise ValueError(f"FieldSpec type={self.type!r}; choose one of {sorted(_TYPES)}")

    def accepts(self, value: Any) -> bool:
        return _TYPES[self.type](value)


def _f(type_: str, unit: str, doc: str, required: bool = True) -> FieldSpec:
    return FieldSpec(type_, unit, doc, required)


_RUN_CLOCK = "s since start"  # seconds since the run's start, on the launcher's clock
_COMMON = {
    "event": _f("str", "", "the event type (this table's name)"),
    "wall": _f("float", _RUN_CLOCK, "seconds since the run's start (virtual seconds in a "
               "simulated run)"),
}  # fmt: skip
_WORKER = {
    "worker": _f("int", "", "the worker's index, 0 to P-1"),
    "pid": _f("int", "", "the worker's process id, which tells a restarted worker's events "
              "from its predecessor's; absent in simulated runs", required=False),
}  # fmt: skip
_STEP = {"step": _f("int", "steps", "the worker's local step count t")}
_TRAFFIC = {
    "exchanges": _f("int", "", "the worker's exchanges so far (this process)", False),
    "bytes_sent": _f("int", "bytes", "bytes the worker has sent so far (this process)", False),
    "bytes_received": _f("int", "bytes", "bytes the worker has received so far", False),
    "exchange_seconds": _f("float", "s", "seconds this exchange blocked the worker (0 on a "
                           "step event)", False),
}  # fmt: skip
_PROGRESS = {
    **_COMMON, **_WORKER, **_STEP,
    "loss": _f("float", "nats", "mean mini-batch training loss (cross-entropy) since the "
               "worker's previous event"),
    **_TRAFFIC,
}  # fmt: skip
_SERVER = {
    **_COMMON,
    "shard": _f("int", "", "the server's shard index, 0 to S-1"),
    "pid": _f("int", "", "the server's process id"),
    "time": _f("float", "s (Unix time)", "when the server emitted the event"),
    "server": _f("str", "", "the address the server listens on, host:port"),
}
_CENTER_T = _f("int", "updates", "the shard's clock: center updates applied so far")
_PEER = _f("str", "", "the connecting peer, host:port")
_REASON = _f("str", "", "why, in words")
_SESSION_END = {
    **_SERVER,
    "worker": _f("int", "", "the worker's index"),
    "session": _f("int", "", "the session's id on this server"),
    "reason": _REASON,
    "exchanges": _f("int", "", "exchanges of this session"),
}

#: Every event of ``metrics.jsonl`` and its fields (docs/run-directory.md says the same).
EVENT_FIELDS: Final[dict[Event, dict[str, FieldSpec]]] = {
    Event.TRAIN_START: {
        **_COMMON, **_WORKER, **_STEP,
        "startup_seconds": _f("float", "s", "seconds from the run's start to this worker's "
                              "first training step: process start-up, data, joining"),
    },
    Event.STEP: _PROGRESS,
    Event.EXCHANGE: _PROGRESS,
    Event.WORKER_DONE: {**_COMMON, **_WORKER, **_STEP},
    Event.WORKER_RESTART: {
        **_COMMON,
        "worker": _f("int", "", "the dead worker's index"),
        "status": _f("int", "", "its exit status (negative: killed by that signal)"),
        "restart": _f("int", "", "the replacement's restart number, 1 to --max-restarts"),
    },
    Event.WORKER_LOST: {
        **_COMMON,
        "worker": _f("int", "", "the dead worker's index; the run goes on without it"),
        "status": _f("int", "", "its exit status (negative: killed by that signal)"),
    },
    Event.SERVER_START: {
        **_SERVER,
        "offset": _f("int", "elements", "where the shard starts in the flat parameter vector"),
        "numel": _f("int", "elements", "the shard's length"),
        "t": _CENTER_T,
    },
    Event.CHECKPOINT: {
        **_SERVER,
        "path": _f("str", "", "the checkpoint file written"),
        "t": _CENTER_T,
        "exchanges": _f("int", "", "exchanges this server has answered so far"),
    },
    Event.JOIN: {
        **_SERVER,
        "worker": _f("int", "", "the worker's index"),
        "session": _f("int", "", "the new session's id on this server"),
        "peer": _PEER,
        "t": _CENTER_T,
        "rejoin": _f("list[int]", "", "the worker's earlier sessions (non-empty: a rejoin)"),
    },
    Event.BYE: _SESSION_END,
    Event.DEATH: _SESSION_END,
    Event.CLOSED: _SESSION_END,
    Event.REJECTED: _SESSION_END,
    Event.REJECT: {
        **_SERVER,
        "worker": _f("int", "", "the index the request claimed"),
        "peer": _PEER,
        "reason": _REASON,
    },
    Event.AUTH_FAILURE: {**_SERVER, "peer": _PEER, "reason": _REASON},
    Event.SERVER_STOP: {
        **_SERVER,
        "t": _CENTER_T,
        "exchanges": _f("int", "", "exchanges this server answered"),
    },
    Event.SERVER_DONE: {
        **_COMMON,
        "shard": _f("int", "", "the server's shard index, 0 to S-1"),
        "address": _f("str", "", "the address the server listened on, host:port"),
        "offset": _f("int", "elements", "where the shard starts in the flat parameter vector"),
        "numel": _f("int", "elements", "the shard's length"),
        "t": _CENTER_T,
        "exchanges": _f("int", "", "exchanges this server answered"),
        "checkpoints": _f("int", "", "checkpoints it wrote"),
        "active": _f("int", "sessions", "sessions still open at the end"),
        "left": _f("int", "sessions", "sessions that ended with a goodbye"),
        "died": _f("int", "sessions", "sessions whose worker died"),
        "closed": _f("int", "sessions", "sessions closed by the server's stop"),
        "rejected": _f("int", "sessions", "sessions ended by a refused request"),
        "bytes_in": _f("int", "bytes", "bytes received from every session"),
        "bytes_out": _f("int", "bytes", "bytes sent to every session"),
    },
}  # fmt: skip

#: The fields of a line of ``eval.jsonl``: one evaluation of the center.
EVAL_FIELDS: Final[dict[str, FieldSpec]] = {
    "wall": _f("float", _RUN_CLOCK, "when the evaluated center was taken: seconds since the "
               "run's start (virtual seconds in a simulated run)"),
    "test_loss": _f("float", "nats", "the center's mean cross-entropy on the test set"),
    "test_error": _f("float", "fraction", "the center's test error, wrong / total"),
    "snapshot": _f("str", "", "the snapshot's file name in snapshots/; absent in simulated "
                   "runs", required=False),
}  # fmt: skip

#: The fields of ``summary.json`` (see :func:`write_summary`).
SUMMARY_FIELDS: Final[dict[str, FieldSpec]] = {
    "method": _f("str", "", "the method (config.json's method)"),
    "mode": _f("str", "", "the resolved mode: sequential, sync or async"),
    "runtime": _f("str", "", "real (processes) or sim (the simulator's virtual clock)"),
    "workers": _f("int", "", "P, the number of workers"),
    "servers": _f("int", "", "parameter-server processes that ran (0 unless a real "
                  "asynchronous run)"),
    "tau": _f("int", "steps", "the communication period"),
    "lr": _f("float", "", "the learning rate"),
    "dataset": _f("str", "", "the data set"),
    "center_test_error": _f("float", "fraction", "the final center's test error"),
    "center_test_loss": _f("float", "nats", "the final center's test loss"),
    "best_center_test_error": _f("float", "fraction", "the lowest test error of the curve "
                                 "(eval.jsonl) and the final center"),
    "wall_seconds": _f("float", "s", "the run's length, start-up included (virtual seconds "
                       "in a simulated run)"),
    "startup_seconds": _f("float or null", "s", "from the run's start to the first training "
                          "step (first train_start); null when no worker started"),
    "train_seconds": _f("float or null", "s", "from the first training step to the last "
                        "worker's end; null when no worker started or ended"),
    "exchanges": _f("int", "", "exchanges of every worker, all processes"),
    "bytes_sent": _f("int", "bytes", "bytes the workers sent"),
    "bytes_received": _f("int", "bytes", "bytes the workers received"),
    "local_steps": _f("int", "steps", "local steps of every worker, restarts included"),
    "evaluations": _f("int", "", "evaluations in eval.jsonl"),
    "lost_workers": _f("list[int]", "", "workers that died beyond --max-restarts (easgd "
                       "train)", required=False),
    "restarts": _f("int", "", "workers restarted (easgd train)", required=False),
    "experiment": _f("str", "", "the experiment's name (easgd experiment)", required=False),
    "real_seconds": _f("float", "s", "real seconds the simulation took (sim)", required=False),
    "step_time": _f("float", "s", "the virtual seconds of one local step (sim)",
                    required=False),
}  # fmt: skip


def _problems(record: Mapping[str, Any], fields: Mapping[str, FieldSpec], what: str) -> list[str]:
    out = []
    for name, spec in fields.items():
        if name not in record:
            if spec.required:
                out.append(f"{what}: required field {name!r} is missing")
        elif not spec.accepts(record[name]):
            out.append(f"{what}: field {name!r}={record[name]!r} is not of type {spec.type}")
    out.extend(
        f"{what}: unknown field {name!r}={record[name]!r}; add it to the schema in "
        "easgd.runlog and docs/run-directory.md, or do not write it"
        for name in record
        if name not in fields
    )
    return out


def event_problems(event: Mapping[str, Any]) -> list[str]:
    """What is wrong with one line of ``metrics.jsonl`` against EVENT_FIELDS ([] if nothing)."""
    name = event.get("event")
    try:
        kind = Event(name)
    except ValueError:
        known = ", ".join(e.value for e in Event)
        return [f"unknown event {name!r} in {dict(event)!r}; known events: {known}"]
    return _problems(event, EVENT_FIELDS[kind], f"event {kind.value!r}")


def eval_problems(line: Mapping[str, Any]) -> list[str]:
    """What is wrong with one line of ``eval.jsonl`` against EVAL_FIELDS ([] if nothing)."""
    return _problems(line, EVAL_FIELDS, "eval.jsonl line")


def summary_problems(summary: Mapping[str, Any]) -> list[str]:
    """What is wrong with a summary against SUMMARY_FIELDS ([] if nothing)."""
    return _problems(summary, SUMMARY_FIELDS, "summary.json")


# ------------------------------------------------------------------------------------------
# Records: evaluations and the summary
# ------------------------------------------------------------------------------------------


def eval_line(
    wall: float, center: Mapping[str, float], snapshot: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """One line of ``eval.jsonl``: the center taken at ``wall`` and its ``loss``/``error``."""
    line: dict[str, Any] = {
        "wall": float(wall),
        "test_loss": float(center["loss"]),
        "test_error": float(center["error"]),
    }
    if snapshot is not None:
        line["snapshot"] = Path(snapshot).name
    return line


def training_span(events: Iterable[Mapping[str, Any]]) -> tuple[float | None, float | None]:
    """The wall times of a run's first training step and of its last worker's end.

    The first step is the earliest ``train_start``; a run that wrote none (written before
    that event existed) falls back to its first join, step or exchange. None when absent.
    """
    starts: list[float] = []
    legacy: list[float] = []
    ends: list[float] = []
    for e in events:
        kind = e.get("event")
        if kind == Event.TRAIN_START:
            starts.append(float(e["wall"]))
        elif kind in (Event.JOIN, Event.STEP, Event.EXCHANGE):
            legacy.append(float(e["wall"]))
        elif kind == Event.WORKER_DONE:
            ends.append(float(e["wall"]))
    return min(starts or legacy, default=None), max(ends, default=None)


def write_summary(
    paths: RunPaths,
    config: TrainConfig,
    *,
    runtime: str,
    center: Mapping[str, float],
    curve: Iterable[float],
    wall_seconds: float,
    startup_seconds: float | None,
    train_seconds: float | None,
    exchanges: int,
    bytes_sent: int,
    bytes_received: int,
    local_steps: int,
    **extra: Any,
) -> dict[str, Any]:
    """Build ``summary.json`` the one way, check it against SUMMARY_FIELDS, write it.

    Real runs (:func:`easgd.evaluator.finalize`) and simulated ones (``easgd experiment
    --runtime sim``) both call it, so their summaries have the same fields.

    Args:
        paths: the run directory.
        config: the run's :class:`easgd.config.TrainConfig` (method, mode, p, tau, lr, ...).
        runtime: ``"real"`` or ``"sim"``.
        center: the final center's ``{"loss": nats, "error": fraction}``.
        curve: the test errors of the run's evaluations (eval.jsonl's ``test_error``).
        wall_seconds: the run's length in seconds (virtual seconds for ``"sim"``).
        startup_seconds, train_seconds: see :func:`training_span` (None: unknown).
        exchanges, bytes_sent, bytes_received, local_steps: totals over every worker.
        **extra: optional fields of SUMMARY_FIELDS (lost_workers, restarts, experiment, ...).

    Returns the summary written. Raises ValueError, naming the field, for a field that is
    not in SUMMARY_FIELDS or has the wrong type, before anything is written.
    """
    if runtime not in ("real", "sim"):
        raise ValueError(f"runtime={runtime!r}; choose real or sim")
    mode = config.resolved_mode().value
    errors = [float(e) for e in curve]
    final = float(center["error"])
    summary: dict[str, Any] = {
        "method": config.method,
        "mode": mode,
        "runtime": runtime,
        "workers": config.workers,
        "servers": config.servers if runtime == "real" and mode == "async" else 0,
        "tau": config.tau,
        "lr": config.lr,
        "dataset": config.dataset,
        "center_test_error": final,
        "center_test_loss": float(center["loss"]),
        "best_center_test_error": min([*errors, final], key=_nan_last),
        "wall_seconds": float(wall_seconds),
        "startup_seconds": startup_seconds,
        "train_seconds": train_seconds,
        "exchanges": int(exchanges),
        "bytes_sent": int(bytes_sent),
        "bytes_received": int(bytes_received),
        "local_steps": int(local_steps),
        "evaluations": len(errors),
    }
    clash = sorted(set(extra) & set(summary))
    if clash:
        raise ValueError(f"write_summary: {clash} are computed here; do not pass them as extra")
    summary.update(extra)
    _check_summary(summary)
    atomic_write_json(paths.summary, summary)
    return summary


def update_summary(paths: RunPaths, **fields: Any) -> dict[str, Any]:
    """Add optional ``fields`` (SUMMARY_FIELDS) to a written ``summary.json``; returns it."""
    summary: dict[str, Any] = {**json.loads(paths.summary.read_text()), **fields}
    _check_summary(summary)
    atomic_write_json(paths.summary, summary)
    return summary


def _check_summary(summary: Mapping[str, Any]) -> None:
    problems = summary_problems(summary)
    if problems:
        raise ValueError("; ".join(problems))


def _nan_last(value: float) -> float:
    """Sort key of ``min`` that never picks NaN over a number."""
    return math.inf if math.isnan(value) else value
