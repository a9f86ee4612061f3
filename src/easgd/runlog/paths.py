"""The run directory's layout: every file name of a run, a sweep and a report, spelled once."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    pass

__all__ = [
    "CONFIG_FILE",
    "EVAL_FILE",
    "EXPERIMENT_FILE",
    "FAILED_FILE",
    "METRICS_FILE",
    "PROCESSES_FILE",
    "REPORT_FILE",
    "RUN_INFO_FILE",
    "SUMMARY_FILE",
    "SWEEP_FILE",
    "TABLE_FILE",
    "ReportPaths",
    "RunPaths",
    "SweepPaths",
    "snapshot_wall",
]


# ------------------------------------------------------------------------------------------
# File names
# ------------------------------------------------------------------------------------------

CONFIG_FILE: Final = "config.json"
METRICS_FILE: Final = "metrics.jsonl"
EVAL_FILE: Final = "eval.jsonl"
SUMMARY_FILE: Final = "summary.json"
PROCESSES_FILE: Final = "processes.json"  # easgd train: every process of the run, its pid, port
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
    def processes(self) -> Path:
        """Every process the local launcher started: role, pid, address, restarts, state."""
        return self.root / PROCESSES_FILE

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

    def worker_checkpoint(self, index: int) -> Path:
        """Worker ``index``'s own state, from which ``easgd train --resume`` continues it."""
        return self.checkpoints / f"worker-{index}.pt"

    def has_checkpoints(self) -> bool:
        """Whether a run here left a checkpoint to resume from (worker or server state)."""
        if not self.checkpoints.is_dir():
            return False
        return any(p.suffix == ".pt" for p in self.checkpoints.iterdir())

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
            d.mkdir(mode=0o700, parents=True, exist_ok=True)  # the run's files are private
        return self

    def holds_run(self) -> bool:
        """Whether a run was started here (its ``config.json`` exists)."""
        return self.config.exists()

    def run_files(self) -> tuple[Path, ...]:
        """Every file and folder a run writes here (other files are not the run's)."""
        return (self.metrics, self.eval, self.summary, self.config, self.processes,
                self.snapshots, self.checkpoints, self.logs)  # fmt: skip

    def clear(self) -> None:
        """Remove what a run writes here; other files are left alone."""
        for path in self.run_files():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def move_run(self, dest: str | os.PathLike[str]) -> RunPaths:
        """Move what a run wrote here into the run directory ``dest`` (renames: same file
        system); other files stay. Returns ``dest``'s paths. ``easgd train --overwrite``
        moves the run it replaces aside this way, and back if the new one fails to start."""
        target = RunPaths(dest)
        target.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for src, dst in zip(self.run_files(), target.run_files(), strict=True):
            if src.exists():
                if dst.is_dir():
                    shutil.rmtree(dst)
                os.replace(src, dst)
        return target


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
