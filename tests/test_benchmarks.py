"""The benchmarks' ``--quick`` forms run and write the rows they promise (no timing asserts).

Each benchmark runs as a module from the repository root (``python -m benchmarks.<name>``),
as a user runs it. Nothing here depends on how fast or how loaded the machine is: a row may
have no samples (a run that did not start training within its budget on a loaded machine),
and then it must say so in the JSON's ``missing`` list instead of failing; the timeouts only
bound the total time.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ("overhead", "exchange", "scaling", "time_to_accuracy", "sim_scale", "checkpoints",
              "alpha_study", "overlap")  # fmt: skip


def quick(name: str, tmp_path: Path, timeout: float) -> dict[str, Any]:
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "wrote" in proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.read_text())
    assert result["quick"] is True
    assert result["machine"]["cpus"] >= 1
    for gap in result.get("missing", []):
        assert gap["row"] and gap["why"]
        assert f"no samples: {gap['row']}: " in proc.stdout
    return result


def module(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``benchmarks.<name>``, imported from the repository root (not an installed package)."""
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module(f"benchmarks.{name}")


@pytest.mark.timeout(180)
def test_every_benchmark_runs_as_a_module_and_has_help() -> None:
    for name in BENCHMARKS:
        proc = subprocess.run(
            [sys.executable, "-m", f"benchmarks.{name}", "--help"],
            capture_output=True,
            text=True,
            timeout=170,
            cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"python -m benchmarks.{name}" in proc.stdout
        assert "--quick" in proc.stdout and "RESULTS.md" in proc.stdout


def test_summaries_of_no_samples_are_nan_not_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    common = module("_common", monkeypatch)
    assert math.isnan(common.median([]))
    assert common.median([1.0, math.inf, math.inf]) == math.inf  # censored: never reached
    empty = common.summary([])
    assert empty["n"] == 0 and math.isnan(empty["median"]) and math.isnan(empty["min"])
    assert math.isnan(common.ratio(1.0, 0.0)) and math.isnan(common.ratio(1.0, math.nan))
    assert common.ratio(3.0, 2.0) == 1.5
    common.print_table("nothing", ["row", "value"], [])
    missing = common.Missing()
    assert missing.exit_code(quick=False) == 0
    missing.add("a row", "why it has none")
    assert missing.rows == [{"row": "a row", "why": "why it has none"}]
    assert missing.exit_code(quick=True) == 0 and missing.exit_code(quick=False) == 1
    assert "no samples: a row: why it has none" in capsys.readouterr().out


def test_time_to_accuracy_tables_keep_a_method_without_samples(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tta = module("time_to_accuracy", monkeypatch)
    common = module("_common", monkeypatch)
    records = [
        {"method": "eamsgd", "lr": 0.01, "seed": 0, "time_to_target_s": math.inf,
         "best_error_in_budget": 1.0, "local_steps": 0, "trained_s": 0.0,
         "no_samples": "no worker logged a training step"},
        {"method": "ddp", "lr": 0.1, "seed": 0, "time_to_target_s": 0.5,
         "best_error_in_budget": 0.02, "local_steps": 400, "trained_s": 2.0, "no_samples": None},
    ]  # fmt: skip
    records += [  # a diverged run: never reached, no throughput; a 2-point grid
        {"method": "diloco", "lr": 0.4, "seed": 0, "time_to_target_s": math.inf,
         "best_error_in_budget": 1.0, "local_steps": 0, "trained_s": 0.0, "no_samples": None},
        {"method": "diloco", "lr": 0.2, "seed": 0, "time_to_target_s": 1.0,
         "best_error_in_budget": 0.02, "local_steps": 300, "trained_s": 3.0, "no_samples": None},
    ]  # fmt: skip
    missing = common.Missing()
    grids = {"eamsgd": (0.01,), "ddp": (0.1,), "diloco": (0.2, 0.4)}
    skipped = {"torchft_diloco": "torchft not installed"}
    grid, best = tta._tables(records, grids, missing, skipped)
    assert [(g["method"], g["seeds"]) for g in grid] == [
        ("eamsgd", []), ("ddp", [0]), ("diloco", [0]), ("diloco", [0]), ("torchft_diloco", []),
    ]  # fmt: skip
    rows = {r["method"]: r for r in best}
    assert set(rows) == {"eamsgd", "ddp", "diloco", "torchft_diloco"}
    assert math.isnan(rows["eamsgd"]["median_s"]) and rows["eamsgd"]["per_seed_s"] == []
    assert rows["ddp"]["median_s"] == 0.5 and rows["ddp"]["vs_best_baseline"] == 1.0
    assert not rows["ddp"]["edge"]  # a grid of one has no edge to leave the best on
    assert rows["diloco"]["lr"] == 0.2 and rows["diloco"]["edge"]
    assert rows["diloco"]["vs_best_baseline"] == 2.0
    diverged = next(g for g in grid if g["method"] == "diloco" and g["lr"] == 0.4)
    assert diverged["median_s"] == math.inf and diverged["ksamples_to_target"] == math.inf
    assert math.isnan(diverged["steps_per_s"])
    # The skipped method keeps its row, says why, and is no baseline and no hole.
    ft = rows["torchft_diloco"]
    assert ft["note"] == "skipped: torchft not installed" and math.isnan(ft["median_s"])
    assert math.isnan(ft["vs_best_baseline"])
    assert [m["row"] for m in missing.rows] == ["eamsgd lr=0.01"]
    assert tta._fastest(best)["method"] == "ddp"


def test_scaling_rows_without_a_steady_window(monkeypatch: pytest.MonkeyPatch) -> None:
    scaling = module("scaling", monkeypatch)
    common = module("_common", monkeypatch)
    assert scaling.throughput([], skip=0.2)["samples_per_s"] is None
    # Two workers that never ran at the same time: no window, a reason instead of a figure.
    events = [
        {"event": "step", "worker": 0, "wall": 0.0, "step": 1},
        {"event": "step", "worker": 0, "wall": 1.0, "step": 800},
        {"event": "step", "worker": 1, "wall": 2.0, "step": 1},
        {"event": "step", "worker": 1, "wall": 3.0, "step": 800},
    ]
    lone = scaling.throughput(events, skip=0.2)
    assert lone["samples_per_s"] is None and "no steady window" in lone["no_samples"]
    load = {"wall_s": 4.0, "background_cores": 0.0}
    runs = {
        "async/1": [{**scaling.throughput(events[:2], 0.2), "cpu_s_by_role": {}, "load": load}],
        "async/2": [{**lone, "cpu_s_by_role": {"worker": 2.0}, "load": load}],
    }
    missing = common.Missing()
    rows = {r["workers"]: r for r in scaling._rows(runs, ["async"], missing)}
    assert rows[1]["samples_per_s"]["n"] == 1 and rows[1]["ratio_vs_1"] == 1.0
    assert rows[2]["samples_per_s"]["n"] == 0 and math.isnan(rows[2]["ratio_vs_1"])
    assert [m["row"] for m in missing.rows] == ["async P=2"]


def test_exchange_loop_ratio_without_a_positive_baseline(monkeypatch: pytest.MonkeyPatch) -> None:
    exchange = module("exchange", monkeypatch)
    common = module("_common", monkeypatch)
    samples = {
        "gloo_echo": [2.0], "allreduce_raw": [1.0], "sync_easgd": [1.5],
        "loop_local": [10.0], "loop_allreduce_raw": [9.0], "loop_sync_easgd": [11.0],
    }  # fmt: skip
    missing = common.Missing()
    rows = {r["name"]: r for r in exchange.summarize(samples, missing)}
    assert rows["sync_easgd"]["ratio"] == 1.5
    assert rows["loop_sync_easgd"]["exchange_ms"] == 1.0
    assert math.isnan(rows["loop_sync_easgd"]["ratio"])
    assert [m["row"] for m in missing.rows] == ["loop ratios"]


@pytest.mark.timeout(180)
def test_overhead_quick(tmp_path: Path) -> None:
    result = quick("overhead", tmp_path, timeout=170)
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"torch", "easgd_off", "easgd_1rank"}
    assert rows["torch"]["ratio"] == 1.0
    for r in rows.values():
        assert r["wall_us_per_step"]["median"] > 0
        assert len(r["paired_ratios"]) == result["settings"]["repeats"]
    assert isinstance(result["target_met"], bool)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scaling_quick(tmp_path: Path) -> None:
    result = quick("scaling", tmp_path, timeout=290)
    rows = {(r["mode"], r["workers"]): r for r in result["rows"]}
    assert set(rows) == {("async", 1), ("async", 2)}
    missing = {m["row"] for m in result["missing"]}
    for (mode, p), r in rows.items():
        if r["samples_per_s"]["n"]:
            assert r["samples_per_s"]["median"] > 0
        else:
            assert f"{mode} P={p}" in missing
        assert r["cores_by_role"]["worker"] >= 0
    if rows[("async", 1)]["samples_per_s"]["n"]:
        assert rows[("async", 1)]["ratio_vs_1"] == 1.0
    assert set(result["target_met"]) == {"async"}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_time_to_accuracy_quick(tmp_path: Path) -> None:
    result = quick("time_to_accuracy", tmp_path, timeout=410)
    methods = {"eamsgd", "eamsgd_int8", "diloco", "ddp", "postlocal", "torchft_diloco"}
    skipped = result["skipped"]
    if importlib.util.find_spec("torchft") is None:  # optional: its row says it is skipped
        assert set(skipped) == {"torchft_diloco"}
        assert skipped["torchft_diloco"].startswith("torchft not installed")
    assert {r["method"] for r in result["best"]} == methods
    for row in result["best"]:
        if row["method"] in skipped:
            assert row["note"] == f"skipped: {skipped[row['method']]}"
            assert math.isnan(row["median_s"]) and row["lr"] is None
    runs = {r["method"]: r for r in result["runs"]}
    assert set(runs) == methods - set(skipped) and len(result["runs"]) == len(runs)
    # What easgd's launcher ran, read back from each run's config.json and metrics.
    assert runs["eamsgd_int8"]["config"] == {
        "method": "eamsgd", "compress": "int8", "parameter_server": True,
    }  # fmt: skip
    assert runs["eamsgd"]["config"]["compress"] == "none"
    assert runs["diloco"]["config"] == {
        "method": "diloco", "compress": "none", "parameter_server": False,
    }  # fmt: skip
    missing = {m["row"] for m in result["missing"]}
    for run in result["runs"]:
        assert all(0.0 <= c["test_error"] <= 1.0 for c in run["curve"])
        assert [c["wall"] for c in run["curve"]] == sorted(c["wall"] for c in run["curve"])
        assert run["local_steps"] >= 0
        if not run["curve"]:
            assert run["no_samples"], f"{run['method']} has no curve and no reason"
            assert any(run["method"] in row for row in missing)


@pytest.mark.timeout(180)
def test_alpha_study_quick(tmp_path: Path) -> None:
    result = quick("alpha_study", tmp_path, timeout=170)
    rows = {(r["problem"], r["workers"]): r for r in result["rows"]}
    assert set(rows) == {("quadratic", 2), ("quadratic", 4), ("digits", 4)}
    for row in rows.values():
        scores = {float(m): v for m, v in row["scores"].items()}
        assert set(scores) == set(result["multiples"]) and row["default"] == scores[1.0]
        assert scores[row["best"]] == min(scores.values())


@pytest.mark.timeout(180)
def test_sim_scale_quick(tmp_path: Path) -> None:
    result = quick("sim_scale", tmp_path, timeout=170)
    assert {r["problem"] for r in result["speed"]} == {"quadratic", "digits"}
    assert all(r["real_s_per_sim_hour"] > 0 for r in result["speed"])
    big = [r for r in result["speed"] if r["workers"] == 1024]  # both engines, both schedules
    assert {(r["schedule"], r["engine"]) for r in big} == {
        (s, e) for s in ("sync", "async") for e in ("batched", "per-worker")
    }
    assert all(r["speedup_vs_per_worker"] > 0 for r in big if r["engine"] == "batched")
    variants = {v["name"]: v for v in result["settings"]["variants"]}
    assert {v["method"] for v in variants.values()} == {"allreduce", "eamsgd", "diloco"}
    assert variants["allreduce_nesterov"]["momentum"] == 0.9
    sync = {n for n, v in variants.items() if v["schedule"] == "sync" or v["method"] == "allreduce"}
    links = {True: ("1Gbit", "10Gbit", "100Gbit"), False: ("1Gbit", "10Gbit")}  # sync: all
    best = {(b["P"], b["bandwidth"], b["variant"]): b for b in result["best"]}
    assert set(best) == {
        (p, bw, v)
        for p in result["settings"]["time_to_accuracy_workers"]
        for v in variants
        for bw in links[v in sync]
    }
    for p, bw, _ in best:  # the speedups are against the best all-reduce at that P and link
        here = [b for (q, c, _), b in best.items() if (q, c) == (p, bw)]
        assert max(b["speedup_vs_best_allreduce"] for b in here if "allreduce" in b["variant"]) == 1
    for (p, _, v), b in best.items():  # a synchronous trajectory on a faster link: same steps,
        if v in sync and b["steps_to_target"] is not None:  # no more time, and at least compute
            compute = b["steps_to_target"] * result["settings"]["step_time"]
            assert b["time_to_target_s"] >= compute * (1 - 1e-9)
            faster = best[(p, "100Gbit", v)]
            assert faster["steps_to_target"] == b["steps_to_target"]
            assert faster["time_to_target_s"] <= b["time_to_target_s"]
    scan = result["settings"]["scan_bandwidths"]
    assert {c["variant"] for c in result["crossover"]} == sync - {"allreduce", "allreduce_nesterov"}
    assert all(len(c["speedups"]) == len(scan) and c["verdict"] for c in result["crossover"])
    for run in result["runs"]:
        clock = [t for t, _ in run["curve"]]  # global steps (sync) or virtual seconds (async)
        assert clock == sorted(clock) and clock[0] == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_exchange_quick(tmp_path: Path) -> None:
    result = quick("exchange", tmp_path, timeout=290)
    rows = {r["name"]: r for r in result["rows"]}
    no_tls = {m["row"] for m in result["missing"]} & {"ps_elastic_tls"}
    assert set(rows) | no_tls == {
        "gloo_echo", "gloo_echo_elastic", "gloo_10_tensors", "gloo_100_tensors", "ps_elastic",
        "ps_elastic_recovering", "ps_elastic_authenticated", "ps_elastic_authenticated_sha256",
        "ps_elastic_tls", "ps_elastic_finite_check", "ps_elastic_shm",
        "ps_elastic_authenticated_shm", "allreduce_raw", "sync_easgd", "loop_local",
        "loop_allreduce_raw",
        "loop_sync_easgd_blocking", "loop_sync_easgd", "sync_easgd_bf16", "sync_easgd_int8",
        "codec_copy", "codec_bf16", "codec_int8", "codec_int8_feedback", "ps_elastic_bf16",
        "ps_elastic_int8",
    }  # fmt: skip
    assert rows["gloo_echo"]["ratio"] == 1.0 and rows["allreduce_raw"]["ratio"] == 1.0
    # Compressed exchanges: fewer bytes per rank and exchange, side by side with float32.
    full = rows["sync_easgd"]["bytes_sent_per_exchange"]
    assert full / rows["sync_easgd_bf16"]["bytes_sent_per_exchange"] >= 2.0
    assert full / rows["sync_easgd_int8"]["bytes_sent_per_exchange"] >= 3.5
    assert rows["codec_int8"]["baseline"] == rows["codec_int8_feedback"]["baseline"] == "codec_copy"
    assert rows["sync_easgd_int8"]["baseline"] == "sync_easgd"
    full = rows["ps_elastic"]["bytes_per_exchange"]
    assert full / rows["ps_elastic_bf16"]["bytes_per_exchange"] >= 2.0
    assert full / rows["ps_elastic_int8"]["bytes_per_exchange"] >= 3.5
    assert rows["loop_sync_easgd"]["baseline"] == "loop_allreduce_raw"
    for r in rows.values():
        assert r["median_ms"] > 0 and len(r["samples_ms"]) == result["repeats"]
    assert rows["ps_elastic_recovering"]["baseline"] == "ps_elastic"
    assert rows["ps_elastic_authenticated"]["baseline"] == "ps_elastic"
    assert rows["ps_elastic_finite_check"]["baseline"] == "ps_elastic"
    # The *_shm rows move the bodies through shared memory, the others through the socket.
    assert rows["ps_elastic_shm"]["baseline"] == "ps_elastic"
    assert rows["ps_elastic_shm"]["bytes_per_exchange"] == full
    assert len(result["target_met"]) == 7  # with the int8 codec's memory-bandwidth target
    assert any(label.startswith("int8 codec at memory bandwidth") for label in result["target_met"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_checkpoints_quick(tmp_path: Path) -> None:
    result = quick("checkpoints", tmp_path, timeout=290)
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"off", "default", "frequent"}
    assert rows["off"]["ratio"] == 1.0 or rows["off"]["name"] in {
        m["row"] for m in result["missing"]
    }
    for r in rows.values():
        assert len(r["samples"]) + sum(m["row"] == r["name"] for m in result["missing"]) == 1
    assert list(result["target_met"]) == ["default <= 1.03"]


@pytest.mark.timeout(300)
def test_overlap_quick(tmp_path: Path) -> None:
    result = quick("overlap", tmp_path, timeout=280)
    rows = {r["row"]: r for r in result["rows"]}
    assert set(rows) == {"local", "local + copies", "blocking tau=1 tcp", "overlap tau=1 K=1 shm"}
    assert rows["local"]["ratio"] == 1.0
    for name in ("blocking tau=1 tcp", "overlap tau=1 K=1 shm"):
        assert rows[name]["steps_per_s"] > 0
        assert rows[name]["server_cpu_ms_per_exchange"] > 0  # the server really served
    # Blocked time is measured, not assumed: a blocking exchange blocks for its round trip.
    assert rows["blocking tau=1 tcp"]["blocked_ms_per_step"] > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_partial_benchmark_run_keeps_the_full_runs_results(tmp_path: Path) -> None:
    # `--only codec` without --json writes results/exchange-codec.json: the full run's
    # results/exchange.json (which RESULTS.md cites) is left as it was (it was overwritten).
    results = tmp_path / "results"
    results.mkdir()
    (results / "exchange.json").write_text('{"full": true}\n')
    code = ("import pathlib, sys; import benchmarks._common as c; "
            "c.RESULTS = pathlib.Path(sys.argv[1]); from benchmarks import exchange; "
            "sys.exit(exchange.main(['--only', 'codec', '--quick']))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, str(results)], capture_output=True,
                          text=True, timeout=240, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (results / "exchange.json").read_text() == '{"full": true}\n'
    partial = json.loads((results / "exchange-codec.json").read_text())
    assert {r["name"] for r in partial["rows"]} == {
        "codec_copy", "codec_bf16", "codec_int8", "codec_int8_feedback"
    }  # fmt: skip
    assert f"wrote {results / 'exchange-codec.json'}" in proc.stdout
