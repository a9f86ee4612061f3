"""benchmarks.startup: its ``--quick`` form runs and writes the rows it promises (no timing
asserts), as the other benchmarks' in ``tests/test_benchmarks.py``."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from test_benchmarks import ROOT, module, quick


@pytest.mark.timeout(120)
def test_startup_runs_as_a_module_and_has_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.startup", "--help"],
        capture_output=True, text=True, timeout=110, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "python -m benchmarks.startup" in proc.stdout
    assert "--quick" in proc.stdout and "RESULTS.md" in proc.stdout


def test_startup_rows_keep_a_variant_without_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    startup = module("startup", monkeypatch)
    common = module("_common", monkeypatch)
    base = {"first_step_s": 2.0, "exit_s": 2.0, "bg": 0.0}
    samples = {
        "import_torch": [base, base],
        "subprocess": [{"first_step_s": 8.0, "exit_s": 9.0, "bg": 0.0, "no_samples": None},
                       {"first_step_s": math.nan, "exit_s": 1.0, "bg": 0.0,
                        "no_samples": "easgd train exited with status 1: boom"}],
        "forkserver": [{"first_step_s": 2.5, "exit_s": 4.0, "bg": 0.1, "no_samples": None}] * 2,
    }  # fmt: skip
    missing = common.Missing()
    rows = {r["variant"]: r for r in startup.rows_of(samples, missing)}
    assert rows["import_torch"]["ratio"] == 1.0
    assert rows["forkserver"]["ratio"] == 1.25 and rows["forkserver"]["exit_ratio"] == 2.0
    assert rows["subprocess"]["first_step_s"]["n"] == 1 and rows["subprocess"]["ratio"] == 4.0
    assert [m["row"] for m in missing.rows] == ["subprocess"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_startup_quick(tmp_path: Path) -> None:
    result = quick("startup", tmp_path, timeout=290)
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"import_torch", "subprocess", "forkserver"}
    assert rows["import_torch"]["ratio"] == 1.0
    missing = {m["row"] for m in result["missing"]}
    for name, r in rows.items():
        assert r["exit_s"]["median"] > 0
        if r["first_step_s"]["n"]:
            assert r["first_step_s"]["median"] <= r["exit_s"]["median"]
        else:
            assert name in missing
    assert result["target_met"] in (True, False, None)
