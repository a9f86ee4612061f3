"""Records built from a run: ``eval.jsonl`` lines, the training span, and ``summary.json``."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from easgd.runlog.paths import RunPaths
from easgd.runlog.schema import Event, summary_errors
from easgd.runlog.writers import atomic_write_json

if TYPE_CHECKING:
    from easgd.config import TrainConfig

__all__ = [
    "eval_line",
    "steps_per_second",
    "training_span",
    "update_summary",
    "write_summary",
]


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
    center: Mapping[str, float] | None,
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

    Real runs (:func:`easgd.finalize.finalize`) and simulated ones (``easgd experiment
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
    errors = [float(e) for e in curve]
    # No final center (its checkpoints unreadable): null, never NaN.
    final = None if center is None else float(center["error"])
    known = [e for e in [*errors, *([] if final is None else [final])] if not math.isnan(e)]
    summary: dict[str, Any] = {
        "method": config.method,
        "mode": config.resolved_mode().value,
        "runtime": runtime,
        "workers": config.workers,
        "servers": config.servers_used if runtime == "real" else 0,
        "tau": config.tau,
        "lr": config.lr,
        "dataset": config.dataset,
        "center_test_error": final,
        "center_test_loss": None if center is None else float(center["loss"]),
        "best_center_test_error": min(known) if known else (final if center else None),
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


def steps_per_second(summary: Mapping[str, Any]) -> float | None:
    """Every worker's local steps per second of training (``local_steps / train_seconds``;
    virtual seconds for a simulated run); None where either is missing, not finite or not
    positive."""
    steps, seconds = summary.get("local_steps"), summary.get("train_seconds")
    if not isinstance(steps, int | float) or not isinstance(seconds, int | float):
        return None
    if not (math.isfinite(steps) and math.isfinite(seconds)) or steps <= 0 or seconds <= 0:
        return None
    return float(steps) / float(seconds)


def update_summary(paths: RunPaths, **fields: Any) -> dict[str, Any]:
    """Add optional ``fields`` (SUMMARY_FIELDS) to a written ``summary.json``; returns it."""
    summary: dict[str, Any] = {**json.loads(paths.summary.read_text()), **fields}
    _check_summary(summary)
    atomic_write_json(paths.summary, summary)
    return summary


def _check_summary(summary: Mapping[str, Any]) -> None:
    problems = summary_errors(summary)
    if problems:
        raise ValueError("; ".join(problems))
