"""The run directory: its layout, its events, its schema, and the only writers of its files.

Everything a run, a sweep or a report writes is named here, so that a file name, an event
name or a field is spelled once. ``docs/run-directory.md`` documents the same schema for
people; ``tests/test_runlog.py`` holds the document, the code and real runs to each other.

Layout of a run directory (:class:`RunPaths`)::

    config.json          the resolved configuration (easgd.config.TrainConfig)
    metrics.jsonl        one JSON object per event (workers, servers, launcher): EVENT_FIELDS
    eval.jsonl           the center's test loss and error against wall time: EVAL_FIELDS
    snapshots/           timestamped center snapshots (center-<wall seconds>.pt)
    checkpoints/         server shards (server-<s>.pt) or the synchronous center (center.pt),
                         each with its previous one (*.prev.pt); every .pt carries a digest
    logs/                each process's stdout and stderr (<role>-<index>[.<restart>].log)
    processes.json       every process of the run: role, pid, host, port, restarts, state
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

from easgd.runlog.checkpoint import (
    CHECKPOINT_FORMAT,
    Checkpoint,
    CheckpointError,
    CheckpointKind,
    checkpoint_digest,
    load_checkpoint,
    previous_checkpoint,
    save_checkpoint,
)
from easgd.runlog.paths import (
    CONFIG_FILE,
    EVAL_FILE,
    EXPERIMENT_FILE,
    FAILED_FILE,
    METRICS_FILE,
    PROCESSES_FILE,
    REPORT_FILE,
    RUN_INFO_FILE,
    SUMMARY_FILE,
    SWEEP_FILE,
    TABLE_FILE,
    ReportPaths,
    RunPaths,
    SweepPaths,
    snapshot_wall,
)
from easgd.runlog.schema import (
    EVAL_FIELDS,
    EVENT_FIELDS,
    PROCESS_FIELDS,
    PROGRESS_EVENTS,
    SUMMARY_FIELDS,
    Event,
    FieldSpec,
    RunStatus,
    SweepStatus,
    eval_errors,
    event_errors,
    process_errors,
    summary_errors,
)
from easgd.runlog.summary import (
    eval_line,
    steps_per_second,
    training_span,
    update_summary,
    write_summary,
)
from easgd.runlog.writers import (
    JsonlWriter,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    iter_jsonl,
    json_dumps,
    read_jsonl,
    strict_json,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "CONFIG_FILE",
    "EVAL_FIELDS",
    "EVAL_FILE",
    "EVENT_FIELDS",
    "EXPERIMENT_FILE",
    "FAILED_FILE",
    "METRICS_FILE",
    "PROCESSES_FILE",
    "PROCESS_FIELDS",
    "PROGRESS_EVENTS",
    "REPORT_FILE",
    "RUN_INFO_FILE",
    "SUMMARY_FIELDS",
    "SUMMARY_FILE",
    "SWEEP_FILE",
    "TABLE_FILE",
    "Checkpoint",
    "CheckpointError",
    "CheckpointKind",
    "Event",
    "FieldSpec",
    "JsonlWriter",
    "ReportPaths",
    "RunPaths",
    "RunStatus",
    "SweepPaths",
    "SweepStatus",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "checkpoint_digest",
    "eval_errors",
    "eval_line",
    "event_errors",
    "iter_jsonl",
    "json_dumps",
    "load_checkpoint",
    "previous_checkpoint",
    "process_errors",
    "read_jsonl",
    "save_checkpoint",
    "snapshot_wall",
    "steps_per_second",
    "strict_json",
    "summary_errors",
    "training_span",
    "update_summary",
    "write_summary",
]
