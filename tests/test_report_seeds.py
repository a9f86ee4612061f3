"""easgd report over several seeds: grouping, medians and spreads, bands, plotted traffic."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from easgd.report import (
    build_report,
    load_runs,
    report_json,
    seed_curves,
    table_markdown,
    write_report,
)


def make_seed_run(
    root: Path,
    method: str,
    tau: int,
    lr: float,
    seed: int,
    curve: Sequence[tuple[float, float]],
    *,
    workers: int = 4,
    budget: float | None = None,
    traffic: Sequence[tuple[float, int, int]] = (),
    steps: tuple[int, float] | None = None,
) -> Path:
    """A real-runtime run: training starts at wall 1.0; ``traffic`` = [(t, exchanges, bytes)]
    after that, worker 0's cumulative counters; the summary counts the whole run."""
    run = root / f"{method}_tau{tau}_p{workers}_lr{lr:g}_s{seed}"
    run.mkdir(parents=True)
    config = {"method": method, "tau": tau, "workers": workers, "lr": lr, "seed": seed}
    (run / "config.json").write_text(json.dumps(config))
    t0 = 1.0
    with open(run / "eval.jsonl", "w") as f:
        for t, err in curve:
            f.write(json.dumps({"wall": t0 + t, "test_loss": 3 * err, "test_error": err}) + "\n")
    with open(run / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"event": "train_start", "wall": t0, "worker": 0, "step": 0}) + "\n")
        for k, (t, ex, nbytes) in enumerate(traffic):
            event = {"event": "exchange", "wall": t0 + t, "worker": 0, "pid": 7, "step": k + 1,
                     "loss": 1.0 / (k + 1), "exchanges": ex, "bytes_sent": nbytes // 2,
                     "bytes_received": nbytes - nbytes // 2}  # fmt: skip
            f.write(json.dumps(event) + "\n")
    last = traffic[-1] if traffic else (0.0, 0, 0)
    final = curve[-1][1]
    summary = {**config, "center_test_error": final, "center_test_loss": 3 * final,
               "best_center_test_error": min(e for _, e in curve), "exchanges": last[1],
               "bytes_sent": last[2] // 2, "bytes_received": last[2] - last[2] // 2,
               "wall_seconds": t0 + curve[-1][0], "runtime": "real"}  # fmt: skip
    if steps is not None:  # (every worker's local steps, seconds of training)
        summary["local_steps"], summary["train_seconds"] = steps
    (run / "summary.json").write_text(json.dumps(summary))
    if budget is not None:
        (run / "run.json").write_text(json.dumps({"runtime": "real", "train_budget": budget}))
    return run


def three_seeds(root: Path) -> None:
    # EASGD lr 0.1: seeds reach 0.1 error at 1, 2 and 4 s (best 0.08, 0.06, 0.09).
    for seed, (t, best) in enumerate([(1.0, 0.08), (2.0, 0.06), (4.0, 0.09)]):
        make_seed_run(root, "easgd", 1, 0.1, seed, [(0, 0.9), (t, 0.1), (5, best)])
    # EASGD lr 0.05: one lucky seed (best 0.01), two bad ones: its median (0.5) loses.
    for seed, best in enumerate([0.01, 0.5, 0.6]):
        make_seed_run(root, "easgd", 1, 0.05, seed, [(0, 0.9), (5, best)])
    # MSGD: 0.1 at 4, 4 and 8 s; DOWNPOUR: only one seed of three reaches the target.
    for seed, t in enumerate([4.0, 8.0, 4.0]):
        make_seed_run(root, "msgd", 1, 0.001, seed, [(0, 0.9), (t, 0.1), (9, 0.1)], workers=1)
    for seed, best in enumerate([0.1, 0.5, 0.7]):
        make_seed_run(root, "downpour", 1, 0.1, seed, [(0, 0.9), (3, best), (5, best)])


def test_seeds_are_grouped_with_median_and_spread(tmp_path: Path) -> None:
    three_seeds(tmp_path)
    report = build_report(load_runs([tmp_path]), panel="tau", target=0.1)
    rows = {ln.label: ln for ln in report.lines}
    easgd = rows["EASGD"]
    # The median seed picks the rate: lr 0.05's lucky 0.01 does not win over 0.1's 0.08.
    assert easgd.run.lr == 0.1 and easgd.seeds == 3 and easgd.tried == 6
    assert easgd.best_error == (0.08, 0.06, 0.09)
    assert easgd.run.seed == 0  # the seed with the median best error
    assert (easgd.time_to_target, easgd.time_spread, easgd.reached) == (2.0, (1.0, 4.0), 3)
    msgd = rows["MSGD"]
    assert (msgd.time_to_target, msgd.time_spread) == (4.0, (4.0, 8.0))
    assert easgd.speedup == pytest.approx(2.0)  # median 4 s of MSGD / median 2 s of EASGD
    # One seed of three reaches the target: the median does not; the spread says so.
    downpour = rows["DOWNPOUR"]
    assert (downpour.time_to_target, downpour.reached, downpour.speedup) == (None, 1, None)
    assert downpour.time_spread == (3.0, None)
    table = table_markdown(report)
    assert "| τ=1 | EASGD | 0.1 (top edge) | 3 | 6 | 0.0800 [0.0600–0.0900] " in table
    assert "| 2.00 [1.00–4.00] | 3/3 | 2.00 |" in table
    assert "| not reached [3.00–not reached] | 1/3 | — |" in table


def test_band_is_min_to_max_over_seeds(tmp_path: Path) -> None:
    three_seeds(tmp_path)
    report = build_report(load_runs([tmp_path]), panel="tau", target=0.1)
    easgd = next(ln for ln in report.lines if ln.label == "EASGD")
    c = seed_curves(easgd)
    # Evaluation times of the three seeds (0, 1, 2, 4, 5), each seed holding its last value.
    assert c["time"] == [0.0, 1.0, 2.0, 4.0, 5.0]
    med, lo, hi = c["test_error"]
    assert med == [0.9, 0.9, 0.1, 0.1, 0.08]
    assert lo == [0.9, 0.1, 0.1, 0.1, 0.06] and hi == [0.9, 0.9, 0.9, 0.1, 0.09]
    data = report_json(report)
    line = next(x for x in data["lines"] if x["label"] == "EASGD")
    assert line["seeds"] == 3 and [s["seed"] for s in line["per_seed"]] == [0, 1, 2]
    assert line["best_error_spread"] == {"median": 0.08, "min": 0.06, "max": 0.09}
    assert line["curve"]["test_error_max"] == [0.9, 0.9, 0.9, 0.1, 0.09]
    written = write_report(report, tmp_path / "out")
    assert all(p.exists() for p in written)


def test_traffic_up_to_the_plotted_time_and_for_the_whole_run(tmp_path: Path) -> None:
    # Budget 4 s; the run goes on to 6 s. Counters are cumulative per worker process.
    traffic = [(1.0, 10, 1_000_000), (3.5, 30, 3_000_000), (6.0, 60, 6_000_000)]
    make_seed_run(tmp_path, "easgd", 1, 0.1, 0, [(0, 0.9), (2, 0.1), (6, 0.05)], budget=4.0,
                  traffic=traffic)  # fmt: skip
    (run,) = load_runs([tmp_path])
    assert (run.exchanges, run.megabytes) == (60, 6.0)
    assert (run.plotted_exchanges, run.plotted_megabytes) == (30, 3.0)
    report = build_report([run], target=0.2)
    assert "| 30 | 3.0 | 60 | 6.0 |" in table_markdown(report)
    line = report_json(report)["lines"][0]
    assert (line["plotted_exchanges"], line["exchanges"]) == (30, 60)


def test_a_restarted_worker_adds_its_processes(tmp_path: Path) -> None:
    run = make_seed_run(tmp_path, "easgd", 1, 0.1, 0, [(0, 0.9), (5, 0.1)], budget=10.0)
    with open(run / "metrics.jsonl", "a") as f:
        for pid, ex in ((1, 5), (2, 3)):  # two processes of worker 1
            event = {
                "event": "exchange",
                "wall": 2.0 + pid,
                "worker": 1,
                "pid": pid,
                "step": 1,
                "loss": 1.0,
                "exchanges": ex,
                "bytes_sent": ex * 100,
                "bytes_received": 0,
            }
            f.write(json.dumps(event) + "\n")
    (loaded,) = load_runs([tmp_path])
    assert loaded.plotted_traffic == (8, 800.0)


def test_local_steps_per_second_is_the_median_over_the_seeds(tmp_path: Path) -> None:
    # Seeds of EASGD lr 0.1 at 40, 50 and 100 local steps per second (all workers); MSGD's
    # summaries say nothing of steps (an older run): its cell is empty, never a zero.
    for seed, (n, secs) in enumerate([(400, 10.0), (1000, 20.0), (500, 5.0)]):
        make_seed_run(tmp_path, "easgd", 1, 0.1, seed, [(0, 0.9), (2, 0.1)], steps=(n, secs))
    make_seed_run(tmp_path, "msgd", 1, 0.001, 0, [(0, 0.9), (4, 0.1)], workers=1)
    report = build_report(load_runs([tmp_path]), panel="tau", target=0.1)
    rows = {ln.label: ln for ln in report.lines}
    assert rows["EASGD"].steps_per_second == pytest.approx(50.0)
    assert rows["MSGD"].steps_per_second is None
    table = table_markdown(report)
    assert "| 2.00 | 50.0 |" in table and "| 1.00 | — |" in table  # after the speedup
    assert "Local steps/s" in table
    line = next(x for x in report_json(report)["lines"] if x["label"] == "EASGD")
    assert line["local_steps_per_second"] == pytest.approx(50.0)
    assert sorted(s["local_steps_per_second"] for s in line["per_seed"]) == [40.0, 50.0, 100.0]
