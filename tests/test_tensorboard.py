"""`easgd train --tensorboard DIR`: TensorBoard events that say what the run's JSONL files say.

Real runs are short (``--steps``) and wait for their own end, never for a clock; the event
files are read back with TensorBoard's own ``EventAccumulator``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from easgd.runlog import Event, JsonlWriter, RunPaths, iter_jsonl
from easgd.runlog.tensorboard import STATE_FILE, TensorBoardFollower, write_tensorboard

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)
PROGRESS = (Event.STEP, Event.EXCHANGE)


def _train(*args: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "easgd", "train", "--quiet", "--json", "--eval-interval", "0.5",
         *args], capture_output=True, text=True, cwd=ROOT, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "TensorBoard" not in result.stderr, result.stderr
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def _scalars(log_dir: Path) -> dict[str, list[tuple[float, int, float]]]:
    """Every scalar of ``log_dir``: tag -> [(wall_time, step, value)] in file order."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every one
    acc.Reload()
    return {t: [(s.wall_time, s.step, s.value) for s in acc.Scalars(t)]
            for t in acc.Tags()["scalars"]}  # fmt: skip


def _f32(value: float | None) -> float:
    """What TensorBoard stores for ``value`` (a float32; NaN for null)."""
    return float(np.float32(np.nan if value is None else value))


def _expected(paths: RunPaths, start: float) -> dict[str, list[tuple[float, int, float]]]:
    """The scalars the run's records call for (see easgd.runlog.tensorboard)."""
    out: dict[str, list[tuple[float, int, float]]] = {}

    def add(tag: str, wall: float, step: int, value: float | None) -> None:
        out.setdefault(tag, []).append((start + wall, step, _f32(value)))

    for i, e in enumerate(iter_jsonl(paths.eval)):
        add("center/test_error", e["wall"], i, e["test_error"])
        add("center/test_loss", e["wall"], i, e["test_loss"])
    base: dict[int, dict[str, Any]] = {}
    for e in iter_jsonl(paths.metrics):
        if e["event"] not in PROGRESS:
            continue
        w, name = e["worker"], f"worker_{e['worker']}"
        add(f"train_loss/{name}", e["wall"], e["step"], e["loss"])
        if "bytes_sent" not in e:
            continue
        b = base.setdefault(w, {"pid": e["pid"], "sent": 0, "received": 0, "last": (0, 0)})
        if b["pid"] != e["pid"]:  # a restarted worker's totals start again
            b.update(pid=e["pid"], sent=b["sent"] + b["last"][0],
                     received=b["received"] + b["last"][1])  # fmt: skip
        b["last"] = (e["bytes_sent"], e["bytes_received"])
        add(f"bytes_sent/{name}", e["wall"], e["step"], b["sent"] + e["bytes_sent"])
        add(f"bytes_received/{name}", e["wall"], e["step"], b["received"] + e["bytes_received"])
        if e["event"] == Event.EXCHANGE:
            add(f"exchange_seconds/{name}", e["wall"], e["step"], e["exchange_seconds"])
    return out


def _order(point: tuple[float, int, float]) -> tuple[int, float]:
    return point[1], point[0]


def _assert_same(got: dict[str, list[Any]], want: dict[str, list[Any]]) -> None:
    assert sorted(got) == sorted(want)
    for tag, points in want.items():
        # TensorBoard orders a tag's points by the order they were written: sort both.
        g, w = sorted(got[tag], key=_order), sorted(points, key=_order)
        assert [p[1] for p in g] == [p[1] for p in w], tag
        np.testing.assert_array_equal([p[2] for p in g], [p[2] for p in w], err_msg=tag)
        np.testing.assert_allclose([p[0] for p in g], [p[0] for p in w], rtol=0, atol=1e-5)


def _state(log_dir: Path) -> dict[str, Any]:
    state: dict[str, Any] = json.loads((log_dir / STATE_FILE).read_text())
    return state


# ------------------------------------------------------------------------------------------
# A real run: the events equal the records; after the fact, the same events once
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def followed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunPaths, Path]:
    root = tmp_path_factory.mktemp("tb")
    paths, log_dir = RunPaths(root / "run"), root / "tb"
    summary = _train("--out", str(paths.root), "--steps", "40", "--workers", "2",
                     "--tensorboard", str(log_dir))  # fmt: skip
    assert summary["status"] == "completed" and summary["exchanges"] > 0
    return paths, log_dir


def test_a_run_writes_its_records_as_tensorboard_scalars(
    followed_run: tuple[RunPaths, Path],
) -> None:
    paths, log_dir = followed_run
    assert json.loads(paths.config.read_text())["tensorboard"] == str(log_dir)
    got = _scalars(log_dir)
    tags = {"center/test_error", "center/test_loss"} | {
        f"{m}/worker_{w}" for m in ("train_loss", "bytes_sent", "bytes_received",
                                    "exchange_seconds") for w in (0, 1)
    }  # fmt: skip
    assert set(got) == tags
    _assert_same(got, _expected(paths, _state(log_dir)["start"]))
    # The final totals are the summary's: nothing left out at the end of the run.
    summary = json.loads(paths.summary.read_text())
    sent = sum(got[f"bytes_sent/worker_{w}"][-1][2] for w in (0, 1))
    assert sent == _f32(summary["bytes_sent"])


def test_report_writes_a_finished_run_once(
    followed_run: tuple[RunPaths, Path], tmp_path: Path
) -> None:
    paths, live = followed_run
    cmd = [sys.executable, "-m", "easgd", "report", str(paths.root), "--tensorboard",
           str(tmp_path / "tb")]  # fmt: skip
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert first.returncode == 0, first.stderr
    log_dir = tmp_path / "tb" / paths.root.name
    assert f"-> {log_dir}" in first.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert again.returncode == 0 and ": 0 scalars" in again.stdout, again.stdout
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1  # no empty second file
    got = _scalars(log_dir)
    _assert_same(got, _expected(paths, _state(log_dir)["start"]))
    # The clock read back from the run's events agrees with the launcher's.
    assert abs(_state(log_dir)["start"] - _state(live)["start"]) < 1.0


def test_a_resumed_run_appends_to_the_same_folder(tmp_path: Path) -> None:
    paths, log_dir = RunPaths(tmp_path / "run"), tmp_path / "tb"
    _train(
        "--out",
        str(paths.root),
        "--method",
        "localsgd",
        "--workers",
        "2",
        "--tau",
        "4",
        "--steps",
        "16",
        "--checkpoint-every-steps",
        "4",
        "--tensorboard",
        str(log_dir),
    )
    first = _scalars(log_dir)
    start = _state(log_dir)["start"]
    # No --tensorboard: the run's own config.json names the folder.
    summary = _train("--resume", str(paths.root), "--steps", "32")
    assert summary["status"] == "completed"
    assert [e["event"] for e in iter_jsonl(paths.metrics)].count("run_resume") == 1
    got = _scalars(log_dir)
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 2
    assert _state(log_dir)["start"] == start  # one clock for both parts
    _assert_same(got, _expected(paths, start))  # every record once: none twice
    assert max(s for _, s, _ in got["train_loss/worker_0"]) > max(
        s for _, s, _ in first["train_loss/worker_0"]
    )
    assert len(got["center/test_error"]) > len(first["center/test_error"])


# ------------------------------------------------------------------------------------------
# Refused before anything starts
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["missing package", "a file"])
def test_tensorboard_that_cannot_work_is_refused_at_preflight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    case: str,
) -> None:  # fmt: skip
    from easgd.cli import main

    log_dir = tmp_path / "tb"
    if case == "missing package":
        # None in sys.modules makes `import tensorboard` raise ImportError, as uninstalled.
        for name in [m for m in sys.modules if m.split(".")[0] == "tensorboard"]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, "tensorboard", None)
        monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    else:
        log_dir.write_text("not a folder\n")
    rc = main(["train", "--out", str(tmp_path / "run"), "--steps", "2", "--tensorboard",
               str(log_dir), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("easgd train: error: --tensorboard ")
    if case == "missing package":
        assert "pip install 'easgd[tensorboard]'" in lines[0]
        assert not log_dir.exists()
    else:
        assert "not a folder" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing written, nothing spawned


# ------------------------------------------------------------------------------------------
# The follower on its own: restarted workers, damaged files
# ------------------------------------------------------------------------------------------


def _step(worker: int, pid: int, step: int, wall: float, sent: int) -> dict[str, Any]:
    return {"event": "exchange", "wall": wall, "worker": worker, "pid": pid, "step": step,
            "loss": 1.0 / step, "exchanges": step, "bytes_sent": sent,
            "bytes_received": 2 * sent, "exchange_seconds": 0.01}  # fmt: skip


def test_a_restarted_workers_bytes_go_on_from_its_predecessors(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path / "run").make()
    with JsonlWriter(paths.metrics) as w:
        w.write(_step(0, 100, 1, 1.0, 10))
        w.write(_step(0, 100, 2, 2.0, 20))
    with JsonlWriter(paths.eval) as w:
        w.write({"wall": 1.5, "test_loss": None, "test_error": 0.5})
    follower = TensorBoardFollower(paths.root, tmp_path / "tb", start=1000.0)
    assert follower.poll() == 2 * 4 + 2  # 4 per exchange, 2 per evaluation
    with JsonlWriter(paths.metrics) as w:  # the worker died; its replacement counts from 0
        w.write(_step(0, 200, 1, 3.0, 5))
    follower.close()
    got = _scalars(tmp_path / "tb")
    assert [v for _, _, v in got["bytes_sent/worker_0"]] == [10, 20, 25]
    assert [v for _, _, v in got["bytes_received/worker_0"]] == [20, 40, 50]
    assert [t for t, _, _ in got["train_loss/worker_0"]] == [1001.0, 1002.0, 1003.0]
    (loss,) = got["center/test_loss"]
    assert np.isnan(loss[2])  # a null loss (a diverged center) is NaN, not left out
    _assert_same(got, _expected(paths, 1000.0))


def test_a_failure_ends_the_logging_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = RunPaths(tmp_path / "run").make()
    paths.metrics.write_text("{not json\n")
    follower = TensorBoardFollower(paths.root, tmp_path / "tb", start=0.0)
    assert follower.poll() == 0 and follower.failed
    assert "TensorBoard logging to" in caplog.text and "training goes on" in caplog.text
    follower.close()  # quietly
    with pytest.raises(ValueError, match="not a JSON object"):
        write_tensorboard(paths.root, tmp_path / "tb2")  # after the fact, it is an error


def test_a_folder_of_another_run_is_written_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from easgd.config import TrainConfig

    monkeypatch.chdir(tmp_path)  # config.json holds the folder absolute: --resume from anywhere
    assert TrainConfig(steps=1, tensorboard="tb").tensorboard == str(tmp_path / "tb")
    for name in ("a", "b"):
        paths = RunPaths(tmp_path / name).make()
        with JsonlWriter(paths.metrics) as w:
            w.write(_step(0, 1, 1, 1.0, 10))
        assert write_tensorboard(paths.root, tmp_path / "tb") == 4
    assert "holds the TensorBoard events of another run" in caplog.text
    assert _state(tmp_path / "tb")["run"] == str((tmp_path / "b").resolve())
