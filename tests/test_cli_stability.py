"""``easgd stability``: the JSON contract, the table, errors, figures and the console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from easgd.cli import main


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, object]:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # exactly one JSON object on one line
    result = json.loads(out)
    assert isinstance(result, dict)
    return result


def test_json_admm_is_unstable(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["stability", "--map", "admm-roundrobin", "--p", "3", "--eta", "0.001"]
    result = _json(capsys, [*argv, "--rho", "2.5", "--json"])
    assert isinstance(result["spectral_radius"], float)
    assert round(result["spectral_radius"], 5) == 1.00097
    assert result["stable"] is False
    assert result["analytic_stable"] is None


@pytest.mark.parametrize(
    ("argv", "stable", "radius"),
    [
        (["--map", "easgd-roundrobin", "--p", "4", "--eta", "0.5", "--alpha", "0.3"], True, None),
        (["--map", "easgd-roundrobin", "--p", "1", "--eta", "2.1", "--alpha", "0.1"], False, None),
        # beta defaults to p * alpha = 0.9; the radius is the larger root of the 2x2 block's
        # l^2 - (2-u-alpha-beta) l + (1-u-alpha-beta+u beta) = l^2 - 0.775 l - 0.135
        (
            ["--map", "easgd-sync", "--p", "4", "--eta", "0.1", "--alpha", "0.225"],
            True,
            (0.775 + (0.775**2 + 4 * 0.135) ** 0.5) / 2,
        ),
        (
            ["--map", "easgd-sync", "--p", "4", "--eta", "0.1", "--alpha", "0.2", "--beta", "2"],
            False,
            None,
        ),
    ],
)
def test_json_easgd(
    capsys: pytest.CaptureFixture[str], argv: list[str], stable: bool, radius: float | None
) -> None:
    result = _json(capsys, ["stability", *argv, "--json"])
    assert result["stable"] is stable
    assert result["analytic_stable"] is stable
    if radius is not None:
        assert result["spectral_radius"] == pytest.approx(radius, abs=1e-12)


def test_table_output(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["stability", "--map", "easgd-sync", "--p", "4", "--eta", "0.1", "--alpha", "0.225"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "spectral_radius" in out and "0.9215" in out
    assert "stable           yes" in out
    assert "eigenvalues (all 5, by modulus)" in out


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (
            ["--map", "easgd-sync", "--p", "0", "--eta", "0.1", "--alpha", "0.1"],
            "--workers 0 is not a valid",
        ),
        (
            ["--map", "easgd-sync", "--p", "2", "--eta", "-1", "--alpha", "0.1"],
            "--eta -1.0 is outside",
        ),
        (
            ["--map", "easgd-roundrobin", "--p", "2", "--eta", "0.1", "--rho", "1"],
            "--rho 1 does not apply",
        ),
        (
            ["--map", "admm-roundrobin", "--p", "2", "--eta", "0.1", "--alpha", "1"],
            "--alpha 1 does not apply",
        ),
        (["--map", "admm-roundrobin", "--p", "2", "--eta", "0.1"], "needs rho"),
        (["--map", "admm-roundrobin", "--eta", "0.1", "--rho", "1"], "needs --p"),
        ([], "give --map"),
    ],
)
def test_bad_input_is_one_error_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    assert main(["stability", *argv, "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("easgd stability: error:")
    assert captured.err.count("\n") == 1 and fragment in captured.err


def test_figure_writes_png_and_svg(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["stability", "--figure", str(tmp_path), "--resolution", "12"]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 6
    for suffix in (".png", ".svg"):
        files = sorted(tmp_path.glob(f"*{suffix}"))
        assert len(files) == 3 and all(f.stat().st_size > 1000 for f in files)
    assert sorted(printed) == sorted(str(p) for p in tmp_path.iterdir())


def test_console_script() -> None:
    script = Path(sys.executable).with_name("easgd")
    exe = str(script) if script.exists() else shutil.which("easgd")
    if exe is None:
        pytest.skip("the easgd console script is not installed")
    argv = ["stability", "--map", "admm-roundrobin", "--p", "8", "--eta", "0.001"]
    proc = subprocess.run(
        [exe, *argv, "--rho", "2.5", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert round(result["spectral_radius"], 5) == 1.00226 and result["stable"] is False
