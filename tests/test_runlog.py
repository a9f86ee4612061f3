"""The run directory: its writers, its schema, the document, and real runs held to them.

The schema lives once in code (``easgd.runlog.EVENT_FIELDS``, ``EVAL_FIELDS``,
``SUMMARY_FIELDS``) and once for people (``docs/run-directory.md``); these tests hold the two
to each other, and two short real runs (one asynchronous, one synchronous, shared by the
tests through module-scoped fixtures) to both.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from easgd.config import TrainConfig
from easgd.runlog import (
    EVAL_FIELDS,
    EVENT_FIELDS,
    SUMMARY_FIELDS,
    Event,
    FieldSpec,
    JsonlWriter,
    ReportPaths,
    RunPaths,
    SweepPaths,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    eval_errors,
    eval_line,
    event_errors,
    iter_jsonl,
    read_jsonl,
    snapshot_wall,
    summary_errors,
    training_span,
    update_summary,
    write_summary,
)

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "run-directory.md"

# ------------------------------------------------------------------------------------------
# The document agrees with the code
# ------------------------------------------------------------------------------------------

Row = tuple[str, str, str, bool]  # field, type, unit, required


def _doc_tables() -> dict[tuple[str, str | None], dict[str, list[str]]]:
    """Every table of the document with backticked first cells, by (h2 title, h4 title)."""
    tables: dict[tuple[str, str | None], dict[str, list[str]]] = {}
    h2, h4 = "", None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            h2, h4 = line[3:].strip(), None
        elif line.startswith("#### "):
            h4 = line[5:].strip().strip("`")
        elif line.startswith("### "):
            h4 = None
        elif line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            name = cells[0].strip("`")
            table = tables.setdefault((h2, h4), {})
            assert name not in table, f"{DOC}: {name!r} listed twice under {h2} / {h4}"
            table[name] = cells[1:]
    return tables


def _rows(table: Mapping[str, list[str]]) -> dict[str, Row]:
    out = {}
    for name, cells in table.items():
        kind, unit, required = cells[0], cells[1], cells[2]
        assert required in ("yes", "no"), f"{name}: required is {required!r}, not yes or no"
        out[name] = (name, kind, "" if unit == "—" else unit, required == "yes")
    return out


def _code_rows(fields: Mapping[str, FieldSpec]) -> dict[str, Row]:
    return {n: (n, f.type, f.unit, f.required) for n, f in fields.items()}


def test_doc_lists_exactly_the_events_and_fields_of_the_code() -> None:
    tables = _doc_tables()
    events = {h4: t for (h2, h4), t in tables.items() if h2 == "`metrics.jsonl`" and h4}
    assert set(events) == {e.value for e in Event}, "docs/run-directory.md vs easgd.runlog.Event"
    for event, fields in EVENT_FIELDS.items():
        assert _rows(events[event.value]) == _code_rows(fields), f"event {event.value!r}"
    assert _rows(tables[("`eval.jsonl`", None)]) == _code_rows(EVAL_FIELDS)
    assert _rows(tables[("`summary.json`", None)]) == _code_rows(SUMMARY_FIELDS)


def test_doc_lists_exactly_the_fields_of_the_config() -> None:
    listed = set(_doc_tables()[("`config.json`", None)])
    assert listed == {f.name for f in dataclasses.fields(TrainConfig)}


def test_readme_links_the_schema() -> None:
    assert "docs/run-directory.md" in (ROOT / "README.md").read_text()


# ------------------------------------------------------------------------------------------
# Names
# ------------------------------------------------------------------------------------------


def test_run_paths_name_every_file(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path).make()
    names = {
        paths.config: "config.json", paths.metrics: "metrics.jsonl", paths.eval: "eval.jsonl",
        paths.summary: "summary.json", paths.run_info: "run.json", paths.failed: "failed.json",
        paths.server_checkpoint(2): "checkpoints/server-2.pt",
        paths.sync_checkpoint: "checkpoints/center.pt", paths.log("worker", 3): "logs/worker-3.log",
        paths.log("worker", 3, restart=2): "logs/worker-3.2.log",
        paths.log("evaluator", 0): "logs/evaluator-0.log",
    }  # fmt: skip
    for path, name in names.items():
        assert path == tmp_path / name
    assert all(d.is_dir() for d in (paths.snapshots, paths.checkpoints, paths.logs))
    with pytest.raises(ValueError, match="restart=-1"):
        paths.log("worker", 0, restart=-1)
    sweep = SweepPaths(tmp_path)
    assert sweep.experiment.name == "experiment.json" and sweep.sweep.name == "sweep.json"
    assert sweep.run("a").summary == tmp_path / "a" / "summary.json"
    report = ReportPaths(tmp_path)
    assert [report.figure(f).name for f in report.FIGURE_FORMATS] == ["figure.png", "figure.svg"]
    assert (report.table.name, report.report.name) == ("table.md", "report.json")
    with pytest.raises(ValueError, match="'pdf'"):
        report.figure("pdf")


def test_snapshot_names_round_trip_and_sort_by_time(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path).make()
    walls = [12.5, 0.0, 3.25, 100.125]
    for wall in walls:
        atomic_torch_save(paths.snapshot(wall), torch.zeros(1))
        assert snapshot_wall(paths.snapshot(wall)) == wall
    (paths.snapshots / "notes.txt").write_text("not a snapshot")
    assert [snapshot_wall(p) for p in paths.snapshot_files()] == sorted(walls)
    with pytest.raises(ValueError, match=r"notes\.txt is not a snapshot name"):
        snapshot_wall(paths.snapshots / "notes.txt")


def test_clear_removes_what_a_run_writes_and_nothing_else(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path).make()
    for path in (paths.config, paths.metrics, paths.eval, paths.summary, paths.log("worker", 0)):
        path.write_text("x")
    (tmp_path / "mine.txt").write_text("keep")
    assert paths.holds_run()
    paths.clear()
    assert not paths.holds_run()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


# ------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------


def test_atomic_writers_round_trip_and_leave_no_temporary_file(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "t.md", "π\n")
    atomic_write_json(tmp_path / "j.json", {"b": 1, "a": [1.5]})
    atomic_torch_save(tmp_path / "x.pt", {"x": torch.arange(3)})
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t.md").read_text() == "π\n"
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": [1.5], "b": 1}
    assert torch.equal(torch.load(tmp_path / "x.pt")["x"], torch.arange(3))
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_a_failed_atomic_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "j.json"
    atomic_write_json(path, {"old": True})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"new": object()})  # fails before anything is written
    with pytest.raises(RuntimeError):
        atomic_torch_save(path, _Unpicklable())
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["j.json"]


class _Unpicklable:
    def __reduce__(self) -> Any:
        raise RuntimeError("cannot pickle this")


def test_jsonl_lines_from_many_writers_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    writers = [JsonlWriter(path) for _ in range(4)]
    payload = "x" * 5000  # longer than a pipe's atomic write: the file's O_APPEND does it

    def write(k: int) -> None:
        for i in range(50):
            writers[k].write({"event": "step", "writer": k, "i": i, "pad": payload})

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w in writers:
        w.close()
    lines = list(iter_jsonl(path))
    assert len(lines) == 200 and all(e["pad"] == payload for e in lines)
    assert sorted((e["writer"], e["i"]) for e in lines) == [
        (k, i) for k in range(4) for i in range(50)
    ]
    with pytest.raises(ValueError, match="is closed"):
        writers[0].write({"event": "step"})


def test_jsonl_default_and_a_half_written_last_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    with JsonlWriter(path, default=str) as out:
        out.write({"path": Path("/a/b"), "event": Event.JOIN})
    with open(path, "a") as f:
        f.write('{"event": "st')  # a writer still in the middle of its line
    events, offset = read_jsonl(path)
    assert events == [{"path": "/a/b", "event": "join"}]
    with open(path, "a") as f:
        f.write('ep"}\n')
    more, _ = read_jsonl(path, offset)
    assert more == [{"event": "step"}]
    assert read_jsonl(tmp_path / "missing.jsonl") == ([], 0)


# ------------------------------------------------------------------------------------------
# Schema checks, the summary
# ------------------------------------------------------------------------------------------


def test_event_problems_name_what_is_wrong() -> None:
    good = {"event": "worker_done", "wall": 1.5, "worker": 0, "pid": 7, "step": 10}
    assert event_errors(good) == []
    assert event_errors({**good, "pid": None}) == [
        "event 'worker_done': field 'pid'=None is not of type int"
    ]
    assert (
        "required field 'step' is missing"
        in event_errors({k: v for k, v in good.items() if k != "step"})[0]
    )
    assert "unknown field 'color'" in event_errors({**good, "color": "red"})[0]
    assert "unknown event 'dance'" in event_errors({"event": "dance", "wall": 0.0})[0]
    assert event_errors({**good, "worker": True}) != []  # a bool is not an int
    assert eval_errors(eval_line(2, {"loss": 1.0, "error": 0.5})) == []
    assert Event.STEP == "step" and json.dumps(Event.STEP) == '"step"' and f"{Event.STEP}" == "step"


def _config(**changes: Any) -> TrainConfig:
    return TrainConfig(steps=10, **changes)


def test_write_summary_computes_checks_and_writes(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path)
    summary = write_summary(
        paths, _config(workers=2, servers=3), runtime="real",
        center={"loss": 0.4, "error": 0.1}, curve=[0.5, 0.08, 0.2], wall_seconds=12.0,
        startup_seconds=2.0, train_seconds=9.5, exchanges=4, bytes_sent=10, bytes_received=20,
        local_steps=20, restarts=1, lost_workers=[1],
    )  # fmt: skip
    assert json.loads(paths.summary.read_text()) == summary
    assert summary_errors(summary) == []
    assert summary["best_center_test_error"] == 0.08 and summary["evaluations"] == 3
    assert (summary["mode"], summary["servers"], summary["runtime"]) == ("async", 3, "real")
    sim = write_summary(
        paths, _config(method="allreduce"), runtime="sim", center={"loss": 1, "error": 0.3},
        curve=[], wall_seconds=1.0, startup_seconds=0.0, train_seconds=1.0, exchanges=0,
        bytes_sent=0, bytes_received=0, local_steps=40, step_time=0.01,
    )  # fmt: skip
    assert (sim["mode"], sim["servers"], sim["best_center_test_error"]) == ("sync", 0, 0.3)
    updated = update_summary(paths, experiment="x")
    assert json.loads(paths.summary.read_text()) == updated == {**sim, "experiment": "x"}


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"colour": "red"}, "unknown field 'colour'"),
        ({"restarts": "one"}, "'restarts'='one' is not of type int"),
        ({"method": "sgd"}, r"\['method'\] are computed here"),
    ],
)
def test_write_summary_refuses_what_the_schema_does_not_know(
    tmp_path: Path, extra: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        write_summary(
            RunPaths(tmp_path), _config(), runtime="real", center={"loss": 1.0, "error": 0.5},
            curve=[], wall_seconds=1.0, startup_seconds=None, train_seconds=None, exchanges=0,
            bytes_sent=0, bytes_received=0, local_steps=0, **extra,
        )  # fmt: skip
    assert not (tmp_path / "summary.json").exists()


def test_training_span_prefers_train_start() -> None:
    events = [
        {"event": "join", "wall": 1.0}, {"event": "train_start", "wall": 2.0},
        {"event": "train_start", "wall": 3.0}, {"event": "exchange", "wall": 2.5},
        {"event": "worker_done", "wall": 9.0}, {"event": "worker_done", "wall": 8.0},
    ]  # fmt: skip
    assert training_span(events) == (2.0, 9.0)
    legacy = [e for e in events if e["event"] != "train_start"]
    assert training_span(legacy) == (1.0, 9.0)
    assert training_span([]) == (None, None)


# ------------------------------------------------------------------------------------------
# Real runs conform
# ------------------------------------------------------------------------------------------

#: Events every run of a mode must write (besides conforming to the schema).
REQUIRED = {
    "async": {Event.TRAIN_START, Event.EXCHANGE, Event.WORKER_DONE, Event.SERVER_START,
              Event.JOIN, Event.BYE, Event.CHECKPOINT, Event.SERVER_STOP, Event.SERVER_DONE},
    "sync": {Event.TRAIN_START, Event.EXCHANGE, Event.WORKER_DONE},
}  # fmt: skip


def _train(out: Path, *args: str) -> Path:
    argv = [sys.executable, "-m", "easgd", "train", "--steps", "30", "--workers", "2",
            "--eval-interval", "0.5", "--out", str(out), "--quiet", *args]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def async_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("async") / "run")


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("sync") / "run", "--mode", "sync")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("mode", "fixture"), [("async", "async_run"), ("sync", "sync_run")])
def test_a_real_run_conforms_to_the_schema(
    mode: str, fixture: str, request: pytest.FixtureRequest
) -> None:
    paths = RunPaths(request.getfixturevalue(fixture))
    events = list(iter_jsonl(paths.metrics))
    problems = [p for e in events for p in event_errors(e)]
    problems += [p for e in iter_jsonl(paths.eval) for p in eval_errors(e)]
    summary = json.loads(paths.summary.read_text())
    problems += summary_errors(summary)
    assert problems == []
    missing = REQUIRED[mode] - {e["event"] for e in events}
    assert not missing, f"a {mode} run wrote no {sorted(m.value for m in missing)} event"
    starts = [e for e in events if e["event"] == Event.TRAIN_START]
    assert sorted(e["worker"] for e in starts) == [0, 1]  # once per worker
    assert summary["mode"] == mode and summary["runtime"] == "real"
    assert summary["local_steps"] == 2 * 30
    assert summary["evaluations"] == len(list(iter_jsonl(paths.eval))) >= 1
    assert summary["startup_seconds"] == min(e["wall"] for e in starts)
    assert 0 <= summary["train_seconds"] <= summary["wall_seconds"]
    snapshots = {p.name for p in paths.snapshot_files()}
    assert {e["snapshot"] for e in iter_jsonl(paths.eval)} <= snapshots
    assert json.loads(paths.config.read_text())["steps"] == 30
    logs = {p.name for p in paths.logs.iterdir()}
    assert {paths.log("worker", 0).name, paths.log("worker", 1).name} <= logs
    checkpoint = paths.server_checkpoint(0) if mode == "async" else paths.sync_checkpoint
    assert checkpoint.exists()
    assert re.fullmatch(r"center-\d{7}\.\d{3}\.pt", min(snapshots))
