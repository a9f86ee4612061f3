"""TensorBoard events from a run directory: ``easgd train --tensorboard DIR``.

The writer follows a run's ``metrics.jsonl`` and ``eval.jsonl`` (the files the launcher's
progress line reads) and appends what they record to TensorBoard event files through
``torch.utils.tensorboard.SummaryWriter``. The workers never see it: they write their events
as always, and a TensorBoard failure (the package missing at run time, a full disk) stops
the TensorBoard logging with one warning, never the training.

Scalars, each at ``walltime = start + wall`` (the run's clock, ``wall`` seconds since its
start: choose TensorBoard's *Wall* or *Relative* axis for curves against time):

* ``center/test_error``, ``center/test_loss``: each line of ``eval.jsonl`` (fraction,
  nats; a null loss is NaN), step: the line's index;
* ``train_loss/worker_<i>``: worker i's ``loss`` (nats) of its ``step`` and ``exchange``
  events, step: the event's local step;
* ``bytes_sent/worker_<i>``, ``bytes_received/worker_<i>``: its traffic so far, its earlier
  processes' included (a restarted worker's counters start again);
* ``exchange_seconds/worker_<i>``: seconds each exchange blocked it.

What was written is kept in ``DIR/easgd-tensorboard.json`` (the run, the byte offsets of the
two files, the clock's start, running totals), so following again (``--resume``, or
``easgd report RUN --tensorboard DIR`` after the fact) appends only what is new: the events
of one run are written once, and a resumed run continues its curves in the same folder.

Example::

    follower = TensorBoardFollower("runs/r1", "tb/r1")
    follower.poll()   # as often as you like: appends the new records
    follower.close()  # the last records, then the files are closed
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from easgd.runlog.paths import RunPaths
from easgd.runlog.schema import PROGRESS_EVENTS, Event
from easgd.runlog.writers import atomic_write_json, iter_jsonl, read_jsonl

__all__ = [
    "INSTALL_HINT",
    "STATE_FILE",
    "TensorBoardFollower",
    "follow",
    "require_tensorboard",
    "write_tensorboard",
]

log = logging.getLogger(__name__)

#: What to install for ``--tensorboard``.
INSTALL_HINT = "pip install 'easgd[tensorboard]'"
#: What the follower has written, in the TensorBoard folder.
STATE_FILE = "easgd-tensorboard.json"
_STATE_FORMAT = "easgd.tensorboard/1"


def require_tensorboard() -> None:
    """Raise ``ImportError`` (naming the fix) when ``torch.utils.tensorboard`` cannot load."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"TensorBoard logging needs the tensorboard package ({exc}); {INSTALL_HINT}"
        ) from None


def _start_time(paths: RunPaths) -> float:
    """The Unix time of the run's ``wall`` 0, from what its directory holds.

    A server's events carry both clocks (``time - wall``); otherwise ``config.json`` is
    written when the launcher starts, ``wall`` seconds (its last ``run_resume``) into the run.
    """
    resumed = 0.0
    for e in iter_jsonl(paths.metrics):
        if isinstance(e.get("time"), int | float) and isinstance(e.get("wall"), int | float):
            return float(e["time"]) - float(e["wall"])
        if e.get("event") == Event.RUN_RESUME:
            resumed = float(e["wall"])
    try:
        return paths.config.stat().st_mtime - resumed
    except FileNotFoundError:
        return 0.0


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


class TensorBoardFollower:
    """Appends a run's new records to TensorBoard events at each :meth:`poll`.

    Args:
        run_dir: the run directory (its ``metrics.jsonl`` and ``eval.jsonl`` are read).
        log_dir: the TensorBoard folder (``SummaryWriter(log_dir)``); created if missing.
        start: the Unix time of the run's ``wall`` 0 (the launcher knows it), used unless
            an earlier follower of this run recorded one (a resumed run's curves go on
            from it); None: read from the run directory.

    Raises ``ImportError`` (with the fix) when TensorBoard is not installed. :meth:`poll`
    and :meth:`close` never raise: a failure is logged once and ends the logging.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        log_dir: str | os.PathLike[str],
        *,
        start: float | None = None,
    ) -> None:
        require_tensorboard()
        self.paths = RunPaths(run_dir)
        self.log_dir = Path(log_dir)
        self.state_path = self.log_dir / STATE_FILE
        self.failed = False
        state = self._load_state()
        start = state.get("start", start)
        self.state: dict[str, Any] = {
            "format": _STATE_FORMAT, "run": str(self.paths.root.resolve()),
            "start": start if start is not None else _start_time(self.paths),
            "offsets": state.get("offsets", {"metrics": 0, "eval": 0}),
            "evaluations": state.get("evaluations", 0), "workers": state.get("workers", {}),
        }  # fmt: skip
        self._writer: Any = None  # made at the first record: no empty event file

    @property
    def writer(self) -> Any:
        """The ``SummaryWriter`` (its event file is created with it)."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        return self._writer

    def _load_state(self) -> dict[str, Any]:
        """What an earlier follower wrote for this run ({}: none, or another run's)."""
        try:
            state = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            log.warning("%s is damaged; writing the run's events from its start", self.state_path)
            return {}
        root = str(self.paths.root.resolve())
        if state.get("format") != _STATE_FORMAT or state.get("run") != root:
            log.warning(
                "%s holds the TensorBoard events of another run (%s); use one folder per "
                "run, or TensorBoard shows both as one", self.log_dir, state.get("run"),
            )  # fmt: skip
            return {}
        sizes = {"metrics": self.paths.metrics, "eval": self.paths.eval}
        for name, path in sizes.items():
            size = path.stat().st_size if path.exists() else 0
            if state["offsets"].get(name, 0) > size:  # the run was replaced (--overwrite)
                log.warning(
                    "%s holds the TensorBoard events of an earlier run in %s (%s is shorter "
                    "now); this run's are added to them: use one folder per run",
                    self.log_dir, root, path,
                )  # fmt: skip
                return {}
        return dict(state)

    def poll(self) -> int:
        """Append the records written since the last call; returns the scalars written."""
        if self.failed:
            return 0
        try:
            return self.append()
        except Exception as exc:  # TensorBoard must never stop a run
            self.failed = True
            log.warning("TensorBoard logging to %s stopped: %s; training goes on",
                        self.log_dir, exc)  # fmt: skip
            return 0

    def append(self) -> int:
        """:meth:`poll`, raising what fails (``OSError``, ``ValueError``: a damaged line)."""
        offsets = self.state["offsets"]
        written = 0
        events, offsets["metrics"] = read_jsonl(self.paths.metrics, offsets["metrics"])
        for e in events:
            written += self._metric(e)
        evals, offsets["eval"] = read_jsonl(self.paths.eval, offsets["eval"])
        for e in evals:
            step = self.state["evaluations"]
            self._scalar("center/test_error", e["test_error"], step, e["wall"])
            self._scalar("center/test_loss", e.get("test_loss"), step, e["wall"])
            self.state["evaluations"] += 1
            written += 2
        if events or evals:
            self.writer.flush()  # the events first: a crash now repeats, never skips, some
            atomic_write_json(self.state_path, self.state, mode=0o644)
        return written

    def _scalar(self, tag: str, value: Any, step: int, wall: float) -> None:
        self.writer.add_scalar(tag, _float(value), global_step=int(step),
                               walltime=self.state["start"] + float(wall))  # fmt: skip

    def _metric(self, e: dict[str, Any]) -> int:
        if e.get("event") not in PROGRESS_EVENTS:
            return 0
        worker, step, wall = e["worker"], e["step"], e["wall"]
        name = f"worker_{worker}"
        self._scalar(f"train_loss/{name}", e.get("loss"), step, wall)
        written = 1
        if "bytes_sent" in e:
            # Running totals of a process: a restarted worker's start again from 0, so add
            # its predecessors' last totals (the summary's bytes add them up the same way).
            w = self.state["workers"].setdefault(str(worker), {
                "pid": e.get("pid"), "sent": 0, "received": 0, "base_sent": 0,
                "base_received": 0,
            })  # fmt: skip
            if w["pid"] != e.get("pid"):
                w["base_sent"] += w["sent"]
                w["base_received"] += w["received"]
                w["pid"] = e.get("pid")
            w["sent"], w["received"] = e["bytes_sent"], e.get("bytes_received", 0)
            self._scalar(f"bytes_sent/{name}", w["base_sent"] + w["sent"], step, wall)
            self._scalar(f"bytes_received/{name}", w["base_received"] + w["received"], step,
                         wall)  # fmt: skip
            written += 2
        if e.get("event") == Event.EXCHANGE and "exchange_seconds" in e:
            self._scalar(f"exchange_seconds/{name}", e["exchange_seconds"], step, wall)
            written += 1
        return written

    def close_files(self) -> None:
        """Close the event files (nothing is read)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        """Append the last records, then close the event files."""
        self.poll()
        try:
            self.close_files()
        except Exception as exc:
            log.warning("TensorBoard logging to %s: closing failed: %s", self.log_dir, exc)


def write_tensorboard(run_dir: str | os.PathLike[str], log_dir: str | os.PathLike[str]) -> int:
    """Write a run's records (those not written there yet) as TensorBoard events in
    ``log_dir``; returns the scalars written. Raises ``ImportError`` without TensorBoard."""
    follower = TensorBoardFollower(run_dir, log_dir)
    try:
        return follower.append()
    finally:
        follower.close_files()


def follow(
    run_dir: str | os.PathLike[str], log_dir: str | os.PathLike[str], start: float
) -> TensorBoardFollower | None:
    """A :class:`TensorBoardFollower` for a run starting now, or None (and a warning) when
    it cannot be made: the run trains either way."""
    try:
        return TensorBoardFollower(run_dir, log_dir, start=start)
    except Exception as exc:
        log.warning("no TensorBoard events in %s: %s; training goes on", log_dir, exc)
        return None
