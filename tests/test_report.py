"""``easgd report`` on run directories with known curves, and one end-to-end sweep."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from easgd.cli import main
from easgd.report import build_report, detect_panel, load_runs, table_markdown, write_report

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(60)


def make_run(
    root: Path,
    method: str,
    tau: int,
    workers: int,
    lr: float,
    curve: Sequence[tuple[float, float]],
    *,
    t0: float = 0.0,
    runtime: str = "sim",
    budget: float | None = None,
    exchanges: int = 0,
    mb: float = 0.0,
    losses: Sequence[tuple[float, float]] = ((0.5, 2.0), (1.5, 1.0), (2.5, 0.5)),
) -> Path:
    """A run directory whose center test error is ``curve`` [(seconds, error)] after ``t0``."""
    run = root / f"{method}_tau{tau}_p{workers}_lr{lr:g}_s0"
    run.mkdir(parents=True)
    config = {"method": method, "tau": tau, "workers": workers, "lr": lr, "seed": 0}
    (run / "config.json").write_text(json.dumps(config))
    with open(run / "eval.jsonl", "w") as f:
        for t, err in curve:
            f.write(json.dumps({"wall": t0 + t, "test_loss": 3 * err, "test_error": err}) + "\n")
    with open(run / "metrics.jsonl", "w") as f:
        if runtime == "real":
            f.write(json.dumps({"event": "start", "wall": t0 - 1.0, "shard": 0}) + "\n")
        for t, loss in losses:
            event = {"event": "step", "wall": t0 + t, "worker": 0, "step": 1, "loss": loss}
            f.write(json.dumps(event) + "\n")
    final = curve[-1][1]
    summary = {**config, "center_test_error": final, "center_test_loss": 3 * final,
               "best_center_test_error": min(e for _, e in curve), "exchanges": exchanges,
               "bytes_sent": int(mb * 1e6 / 2), "bytes_received": int(mb * 1e6 / 2),
               "wall_seconds": t0 + curve[-1][0], "runtime": runtime}  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    if budget is not None:
        (run / "run.json").write_text(json.dumps({"runtime": runtime, "train_budget": budget}))
    return run


def fig2_like(root: Path) -> None:
    # Two taus; two learning rates of EASGD at tau 1, the better one is lr 0.1.
    make_run(root, "msgd", 1, 1, 0.001, [(0, 0.9), (2, 0.3), (4, 0.1), (6, 0.08)])
    make_run(root, "easgd", 1, 4, 0.05, [(0, 0.9), (2, 0.2), (6, 0.09)], exchanges=40, mb=8.0)
    make_run(root, "easgd", 1, 4, 0.1, [(0, 0.9), (1, 0.1), (6, 0.05)], exchanges=40, mb=8.0)
    make_run(root, "easgd", 4, 4, 0.1, [(0, 0.9), (1, 0.5), (3, 0.1), (6, 0.04)], exchanges=10)
    make_run(root, "downpour", 4, 4, 0.1, [(0, 0.9), (2, 0.9), (6, 0.9)], exchanges=10)


def test_table_numbers_by_hand(tmp_path: Path) -> None:
    fig2_like(tmp_path / "runs")
    report = build_report(load_runs([tmp_path / "runs"]), target=0.1)
    assert report.panel == "tau" and report.panels == [1, 4] and report.reference == "msgd"
    rows = {(ln.panel, ln.label): ln for ln in report.lines}
    assert set(rows) == {(1, "EASGD"), (1, "MSGD"), (4, "EASGD"), (4, "DOWNPOUR"), (4, "MSGD")}
    easgd1 = rows[(1, "EASGD")]
    assert easgd1.run.lr == 0.1 and easgd1.tried == 2  # best of the two learning rates
    assert easgd1.time_to_target == 1.0 and rows[(1, "MSGD")].time_to_target == 4.0
    assert easgd1.speedup == pytest.approx(4.0)  # 4 s of MSGD / 1 s of EASGD
    assert rows[(4, "EASGD")].speedup == pytest.approx(4.0 / 3.0)
    assert rows[(4, "MSGD")].speedup == pytest.approx(1.0)
    assert rows[(4, "DOWNPOUR")].time_to_target is None and rows[(4, "DOWNPOUR")].speedup is None
    table = table_markdown(report)
    # A best rate on the edge of what was tried is marked: the optimum may lie past it.
    assert (easgd1.edge, rows[(4, "DOWNPOUR")].edge) == ("top", "only")
    assert (
        "| τ=1 | EASGD | 0.1 (top edge) | 1 | 2 | 0.0500 | 0.0500 | 1.00 | 1/1 | 4.00 | — | 40 "
        "| 8.0 | 40 | 8.0 |" in table
    )
    assert (
        "| τ=4 | DOWNPOUR | 0.1 (one rate) | 1 | 1 | 0.9000 | 0.9000 | not reached | 0/1 | — "
        "| — | 10 | 0.0 | 10 | 0.0 |" in table
    )
    assert "given with --target" in table


def test_default_target_is_reachable_by_most(tmp_path: Path) -> None:
    fig2_like(tmp_path / "runs")
    report = build_report(load_runs([tmp_path / "runs"]))
    # Best errors of the lines: EASGD 0.05, 0.04, DOWNPOUR 0.9, MSGD 0.08 (shown twice, counted
    # once): max(1.5 * 0.04, median(0.04, 0.05, 0.08, 0.9)) = 0.065.
    assert report.target == pytest.approx(0.065)
    assert "median" in report.target_rule


def test_files_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fig2_like(tmp_path / "runs")
    out = tmp_path / "rep"
    rc = main(["report", str(tmp_path / "runs"), "--out", str(out), "--target", "0.1"])
    assert rc == 0
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (out / "figure.svg").read_bytes()[:2000]
    assert "| τ=1 | EASGD | 0.1 (top edge) |" in (out / "table.md").read_text()
    data = json.loads((out / "report.json").read_text())
    assert data["target"] == 0.1 and len(data["lines"]) == 5
    assert all(p.stat().st_size > 0 for p in out.iterdir())
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files
    assert "target error 0.1000" in capsys.readouterr().out


def test_panels_per_p_when_p_varies_within_a_method(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    make_run(root, "msgd", 1, 1, 0.001, [(0, 0.9), (4, 0.1)])
    for p in (2, 4, 8):
        make_run(root, "eamsgd", 10, p, 0.001, [(0, 0.9), (8 / p, 0.1)])
        make_run(root, "downpour", 1, p, 0.05, [(0, 0.9), (4, 0.1)])
    runs = load_runs([root])
    assert detect_panel(runs) == "workers"  # tau differs between methods, p within one
    report = build_report(runs, target=0.1)
    assert report.panels == [2, 4, 8]
    speedups = {ln.panel: ln.speedup for ln in report.lines if ln.run.method == "eamsgd"}
    assert speedups == {2: pytest.approx(1.0), 4: pytest.approx(2.0), 8: pytest.approx(4.0)}
    with pytest.raises(ValueError, match="choose tau or workers"):
        build_report(runs, panel="lr")


def test_real_runs_start_at_the_first_training_event_and_stop_at_the_budget(
    tmp_path: Path,
) -> None:
    # A real run: 7 s of process start-up, an evaluation of the initial center at 6.5 s,
    # training from 7 s, 4 s of budget, and evaluations beyond it.
    run = make_run(tmp_path, "easgd", 4, 4, 0.1, [(-0.5, 0.9), (1, 0.5), (3, 0.2), (5, 0.01)],
                   t0=7.0, runtime="real", budget=4.0, losses=[(0.0, 2.0), (4.5, 0.1)])  # fmt: skip
    (r,) = load_runs([tmp_path])
    assert r.path == run
    assert r.times == [0.0, 1.0, 3.0]  # cut at the budget; the pre-training look is at 0
    assert r.errors == [0.9, 0.5, 0.2]
    assert r.best_error == 0.2 and r.final_error == 0.2
    assert r.loss_times == [0.0]
    assert r.time_to(0.5) == 1.0 and r.time_to(0.1) is None


def test_no_runs_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=r"no run directories \(summary.json\) under"):
        load_runs([tmp_path])
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "easgd experiment" in err and "easgd train --out" in err


def test_write_report_into_a_new_folder(tmp_path: Path) -> None:
    fig2_like(tmp_path / "runs")
    report = build_report(load_runs([tmp_path / "runs"]))
    written = write_report(report, tmp_path / "a" / "b", title="fake")
    assert {p.name for p in written} == {"figure.png", "figure.svg", "table.md", "report.json"}
    assert (tmp_path / "a" / "b" / "table.md").read_text().startswith("# fake")


def _easgd(*args: str, timeout: float) -> Any:
    proc = subprocess.run([sys.executable, "-m", "easgd", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.timeout(600)
def test_end_to_end_sim_sweep_then_report(tmp_path: Path) -> None:
    # The subprocess bounds are generous: only a hang should fail them, never a slow machine.
    out = tmp_path / "fig2"
    _easgd("experiment", "digits-fig2", "--runtime", "sim", "--scale", "0.05",
           "--only", "easgd,msgd", "--out", str(out), "--step-time", "0.01", "--quiet",
           "--lr-extensions", "0", timeout=400)  # fmt: skip
    sweep = json.loads((out / "sweep.json").read_text())
    assert len(sweep["done"]) == 10 and not sweep["failed"]
    proc = _easgd("report", str(out), timeout=150)
    assert "10 runs" in proc.stdout
    table = (out / "report" / "table.md").read_text()
    for tau in (1, 4, 16, 64):
        assert f"| τ={tau} | EASGD |" in table and f"| τ={tau} | MSGD |" in table
    assert (out / "report" / "figure.png").stat().st_size > 10_000
    # On the virtual clock of 0.01 s steps one sequential worker makes 100 steps a second;
    # EASGD's workers make more together (p of them), and fewer than p x 100 (exchanges).
    lines = json.loads((out / "report" / "report.json").read_text())["lines"]
    for line in lines:
        rate = line["local_steps_per_second"]
        if line["method"] == "msgd":
            assert rate == pytest.approx(100.0, rel=1e-6), line["label"]
        else:
            assert 100.0 < rate <= 100.0 * line["workers"] * (1 + 1e-9), line
