"""The events of ``metrics.jsonl``, and the schema of every record a run writes.

``docs/run-directory.md`` documents the same schema for people; the tests hold the document,
this code and real runs to each other.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    pass

__all__ = [
    "EVAL_FIELDS",
    "EVENT_FIELDS",
    "PROCESS_FIELDS",
    "PROGRESS_EVENTS",
    "SUMMARY_FIELDS",
    "Event",
    "FieldSpec",
    "RunStatus",
    "SweepStatus",
    "eval_errors",
    "event_errors",
    "process_errors",
    "summary_errors",
]


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
    SERVER_LOST = "server_lost"  # the worker lost its connection to a server shard
    SERVER_BACK = "server_back"  # ... and is exchanging with it again
    DIVERGED = "diverged"  # a non-finite training loss: the worker stops, the run ends
    # The launcher (easgd.launch).
    RUN_RESUME = "run_resume"  # easgd train --resume: the run continues from its checkpoints
    WORKER_RESTART = "worker_restart"
    GROUP_RESTART = "group_restart"  # a synchronous rank died: every rank started again
    WORKER_LOST = "worker_lost"
    SERVER_DIED = "server_died"
    RUN_INTERRUPTED = "run_interrupted"  # SIGINT or SIGTERM: every process was stopped
    # The server role (easgd.roles.server), started again by the launcher.
    SERVER_RESTART = "server_restart"
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
    RECOVERY = "recovery"  # a restarted shard added a worker's re-sent updates
    SERVER_DONE = "server_done"

    def __str__(self) -> str:
        return self.value


#: The events that carry a worker's progress: local step, training loss and traffic.
PROGRESS_EVENTS: Final = frozenset({Event.STEP, Event.EXCHANGE})


class RunStatus(str, enum.Enum):
    """``summary.json``'s ``status``: whether ``easgd train`` did everything it was asked."""

    COMPLETED = "completed"  # every worker spent its budget (restarts allowed), no server lost
    WORKERS_LOST = "workers_lost"  # some workers died beyond --max-restarts; others finished
    ALL_WORKERS_LOST = "all_workers_lost"  # every worker died beyond --max-restarts
    SERVER_LOST = "server_lost"  # a server shard died beyond --max-restarts
    CENTER_LOST = "center_lost"  # training ended but no checkpoint of the center verifies
    DIVERGED = "diverged"  # a worker's training loss (or the final center) was not finite
    INTERRUPTED = "interrupted"  # SIGINT or SIGTERM stopped the run; --resume continues it

    def __str__(self) -> str:
        return self.value


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
    "int or null": lambda v: v is None or _is_int(v),
    "list[{file, reason}]": lambda v: isinstance(v, list) and all(
        isinstance(x, dict) and set(x) == {"file", "reason"}
        and all(isinstance(y, str) for y in x.values()) for x in v
    ),
}  # fmt: skip


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
    "loss": _f("float or null", "nats", "mean mini-batch training loss (cross-entropy) "
               "since the worker's previous event; null when not finite (a diverged run)"),
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
        "resumed_step": _f("int", "steps", "the step of checkpoints/worker-<i>.pt this "
                           "worker continues from (easgd train --resume; absent: step 0)",
                           required=False),
    },
    Event.STEP: _PROGRESS,
    Event.EXCHANGE: _PROGRESS,
    Event.WORKER_DONE: {
        **_COMMON, **_WORKER, **_STEP,
        "exchanges": _f("int", "", "the worker's exchanges in all (this process), every "
                        "exchange in flight completed", False),
        "bytes_sent": _f("int", "bytes", "bytes the worker sent in all (this process)", False),
        "bytes_received": _f("int", "bytes", "bytes the worker received in all (this process)",
                             False),
    },
    Event.DIVERGED: {
        **_COMMON, **_WORKER,
        "step": _f("int", "steps", "the local step whose mini-batch loss was not finite"),
        "loss": _f("float or null", "nats", "that loss (null: NaN or an infinity)"),
        "lr": _f("float", "", "the learning rate in use at that step"),
    },
    Event.SERVER_LOST: {
        **_COMMON, **_WORKER,
        "shard": _f("int", "", "the server shard the worker can no longer reach"),
        "reason": _REASON,
    },
    Event.SERVER_BACK: {
        **_COMMON, **_WORKER,
        "shard": _f("int", "", "the server shard the worker exchanges with again"),
        "down_seconds": _f("float", "s", "from the lost connection to the shard answering"),
        "resent": _f("int", "exchanges", "the worker's updates re-sent to the restarted shard"),
        "lost": _f("int", "exchanges", "acknowledged updates the shard no longer holds "
                   "(0 for EASGD, EAMSGD and the DOWNPOUR family)"),
        "reply_lost": _f("int", "exchanges", "updates applied whose reply never arrived "
                         "(the worker skipped that pull)"),
    },
    Event.RUN_RESUME: {
        **_COMMON,
        "previous_wall": _f("float", _RUN_CLOCK, "where the run's clock stood when the part "
                            "before stopped (its last event); the resumed part's walls go on "
                            "from there"),
        "steps": _f("int or null", "steps", "the resumed run's --steps per worker, steps "
                    "done before included (config.json holds its whole budget)"),
        "epochs": _f("float or null", "epochs", "its --epochs, likewise"),
        "time_budget": _f("float or null", "s", "its --time-budget, training time before "
                          "included"),
    },
    Event.WORKER_RESTART: {
        **_COMMON,
        "worker": _f("int", "", "the dead worker's index"),
        "status": _f("int", "", "its exit status (negative: killed by that signal)"),
        "restart": _f("int", "", "the replacement's restart number, 1 to --max-restarts"),
    },
    Event.GROUP_RESTART: {
        **_COMMON,
        "worker": _f("int", "", "the synchronous rank's worker index that died"),
        "status": _f("int", "", "its exit status (negative: killed by that signal)"),
        "restart": _f("int", "", "the group's restart number, 1 to --max-restarts"),
        "resumed": _f("bool", "", "true: every rank continues from the last step at which "
                      "all saved their state (checkpoints/worker-<i>.pt); false: one had "
                      "none, and the group starts again from step 0"),
    },
    Event.WORKER_LOST: {
        **_COMMON,
        "worker": _f("int", "", "the dead worker's index; the run goes on without it"),
        "status": _f("int", "", "its exit status (negative: killed by that signal)"),
    },
    Event.RUN_INTERRUPTED: {
        **_COMMON,
        "signal": _f("str", "", "the signal that stopped the run: SIGINT or SIGTERM"),
        "training": _f("bool", "", "false: it came before any worker's first step"),
    },
    Event.SERVER_DIED: {
        **_COMMON,
        "shard": _f("int", "", "the dead server's shard index"),
        "pid": _f("int", "", "the dead server's process id"),
        "status": _f("int", "", "its exit status (negative: killed by that signal)"),
        "restarting": _f("bool", "", "true: a replacement is started (--max-restarts); "
                         "false: none is left and the run fails"),
    },
    Event.SERVER_RESTART: {
        **_COMMON,
        "shard": _f("int", "", "the shard index, 0 to S-1"),
        "pid": _f("int", "", "the replacement server's process id"),
        "restart": _f("int", "", "the replacement's restart number, 1 to --max-restarts"),
        "resumed_t": _f("int or null", "updates", "the shard's clock in the checkpoint it "
                        "resumed from; null: no checkpoint, it started from the initial center"),
        "address": _f("str", "", "the new address it serves on (easgd/server/<shard> in the "
                      "store), host:port"),
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
    Event.RECOVERY: {
        **_SERVER,
        "worker": _f("int", "", "the worker that re-sent its updates"),
        "session": _f("int", "", "its session on the restarted shard"),
        "exchanges": _f("int", "exchanges", "how many updates the re-sent sum holds"),
        "t": _CENTER_T,
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
        "recovered": _f("int", "exchanges", "updates workers re-sent after a restart (part of "
                        "exchanges)"),
        "restored_seq": _f("int", "", "the checkpoint this server was restarted from (0: none)"),
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
    "test_loss": _f("float or null", "nats", "the center's mean cross-entropy on the test "
                    "set; null when not finite (a diverged center)"),
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
    "center_test_error": _f("float or null", "fraction", "the final center's test error; "
                            "null when no final center could be read (see skipped_files)"),
    "center_test_loss": _f("float or null", "nats", "the final center's test loss; null when "
                           "no final center could be read"),
    "best_center_test_error": _f("float or null", "fraction", "the lowest test error of the "
                                 "curve (eval.jsonl) and the final center; null when neither "
                                 "has one"),
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
    "skipped_files": _f("list[{file, reason}]", "", "checkpoints and snapshots that did not "
                        "verify and were skipped (file: relative to the run directory; "
                        "reason: what is wrong, and the previous checkpoint used instead if "
                        "one verified); [] when none (real runs)", required=False),
    "status": _f("str", "", "what the run did (easgd train): completed, workers_lost (some "
                 "workers lost, the others finished), all_workers_lost, server_lost, "
                 "center_lost, diverged or interrupted", required=False),
    "center_moved": _f("bool", "", "false: the final center is the initial one (no "
                       "exchange reached it, e.g. --steps below --tau); easgd train warns",
                       required=False),
    "lost_workers": _f("list[int]", "", "workers that died beyond --max-restarts (easgd "
                       "train)", required=False),
    "lost_servers": _f("list[int]", "", "server shards that died beyond --max-restarts "
                       "(easgd train)", required=False),
    "restarts": _f("int", "", "workers restarted (easgd train)", required=False),
    "server_restarts": _f("int", "", "server shards restarted (easgd train)", required=False),
    "experiment": _f("str", "", "the experiment's name (easgd experiment)", required=False),
    "real_seconds": _f("float", "s", "real seconds the simulation took (sim)", required=False),
    "step_time": _f("float", "s", "the virtual seconds of one local step (sim)",
                    required=False),
}  # fmt: skip


#: The fields of one entry of ``processes.json``'s ``processes`` (the local launcher's).
PROCESS_FIELDS: Final[dict[str, FieldSpec]] = {
    "role": _f("str", "", "server, worker or evaluator"),
    "index": _f("int", "", "the shard (server), the worker's index, or 0 (evaluator)"),
    "rank": _f("int", "", "its global rank (servers first); -1 for the evaluator"),
    "pid": _f("int", "", "the process id of its current process (the latest restart)"),
    "host": _f("str", "", "a server: the host workers dial (from the store); else the "
               "machine it runs on"),
    "port": _f("int or null", "", "a server: the port it serves on; null until it publishes "
               "it, and for workers and the evaluator"),
    "restarts": _f("int", "", "times it was restarted, 0 to --max-restarts"),
    "state": _f("str", "", "starting (a server that has not published its address yet), "
                "running, or exited"),
    "status": _f("int or null", "", "its exit status once exited (negative: killed by that "
                 "signal); null while it runs"),
    "log": _f("str", "", "its log file, relative to the run directory"),
}  # fmt: skip


def _errors(record: Mapping[str, Any], fields: Mapping[str, FieldSpec], what: str) -> list[str]:
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


def event_errors(event: Mapping[str, Any]) -> list[str]:
    """What is wrong with one line of ``metrics.jsonl`` against EVENT_FIELDS ([] if nothing)."""
    name = event.get("event")
    try:
        kind = Event(name)
    except ValueError:
        known = ", ".join(e.value for e in Event)
        return [f"unknown event {name!r} in {dict(event)!r}; known events: {known}"]
    return _errors(event, EVENT_FIELDS[kind], f"event {kind.value!r}")


def eval_errors(line: Mapping[str, Any]) -> list[str]:
    """What is wrong with one line of ``eval.jsonl`` against EVAL_FIELDS ([] if nothing)."""
    return _errors(line, EVAL_FIELDS, "eval.jsonl line")


def process_errors(entry: Mapping[str, Any]) -> list[str]:
    """What is wrong with one entry of ``processes.json`` against PROCESS_FIELDS."""
    return _errors(entry, PROCESS_FIELDS, "processes.json entry")


def summary_errors(summary: Mapping[str, Any]) -> list[str]:
    """What is wrong with a summary against SUMMARY_FIELDS ([] if nothing)."""
    return _errors(summary, SUMMARY_FIELDS, "summary.json")
