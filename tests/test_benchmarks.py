"""The benchmarks' ``--quick`` forms run and write the rows they promise (no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def quick(script: str, tmp_path: Path, timeout: float) -> dict[str, Any]:
    out = tmp_path / f"{script}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(BENCH / f"{script}.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "wrote" in proc.stdout
    result: dict[str, Any] = json.loads(out.read_text())
    assert result["quick"] is True
    assert result["machine"]["cpus"] >= 1
    return result


@pytest.mark.timeout(60)
def test_overhead_quick(tmp_path: Path) -> None:
    result = quick("overhead", tmp_path, timeout=50)
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"torch", "easgd_off", "easgd_1rank"}
    assert rows["torch"]["ratio"] == 1.0
    for r in rows.values():
        assert r["wall_us_per_step"]["median"] > 0
        assert len(r["paired_ratios"]) == result["settings"]["repeats"]
    assert isinstance(result["target_met"], bool)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_scaling_quick(tmp_path: Path) -> None:
    result = quick("scaling", tmp_path, timeout=80)
    rows = {(r["mode"], r["workers"]): r for r in result["rows"]}
    assert set(rows) == {("async", 1), ("async", 2)}
    assert rows[("async", 1)]["ratio_vs_1"] == 1.0
    for r in rows.values():
        assert r["samples_per_s"]["median"] > 0
        assert r["cores_by_role"]["worker"] > 0
    assert set(result["target_met"]) == {"async"}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_time_to_accuracy_quick(tmp_path: Path) -> None:
    result = quick("time_to_accuracy", tmp_path, timeout=110)
    assert {r["method"] for r in result["best"]} == {"eamsgd", "ddp", "postlocal"}
    assert len(result["runs"]) == 3
    for run in result["runs"]:
        assert run["curve"], f"{run['method']} produced no evaluations"
        assert all(0.0 <= c["test_error"] <= 1.0 for c in run["curve"])
        assert run["curve"][0]["wall"] < result["settings"]["budget_s"]
        assert run["local_steps"] > 0


@pytest.mark.timeout(60)
def test_sim_scale_quick(tmp_path: Path) -> None:
    result = quick("sim_scale", tmp_path, timeout=50)
    assert {r["problem"] for r in result["speed"]} == {"quadratic", "digits"}
    assert all(r["real_s_per_sim_hour"] > 0 for r in result["speed"])
    variants = {v["name"] for v in result["settings"]["variants"]}
    assert {(b["bandwidth"], b["variant"]) for b in result["best"]} == {
        (bw, v) for bw in ("1Gbit", "100Gbit") for v in variants
    }
    for run in result["runs"]:
        times = [t for t, _ in run["curve"]]
        assert times == sorted(times) and times[0] == 0.0


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_exchange_quick(tmp_path: Path) -> None:
    result = quick("exchange", tmp_path, timeout=110)
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {
        "gloo_echo", "gloo_echo_elastic", "gloo_10_tensors", "gloo_100_tensors", "ps_elastic",
        "allreduce_raw", "sync_easgd", "loop_local", "loop_allreduce_raw",
        "loop_sync_easgd_blocking", "loop_sync_easgd",
    }  # fmt: skip
    assert rows["gloo_echo"]["ratio"] == 1.0 and rows["allreduce_raw"]["ratio"] == 1.0
    assert rows["loop_sync_easgd"]["baseline"] == "loop_allreduce_raw"
    for r in rows.values():
        assert r["median_ms"] > 0 and len(r["samples_ms"]) == result["repeats"]
    assert len(result["target_met"]) == 3
