"""Bad input to report, simulate, stability and experiment: one line, exit 2, nothing written.

Each case runs ``easgd.cli.main`` in-process: exactly one non-empty line on stderr, starting
``easgd <command>: error:`` and naming the flag (or the file) with the fix; no traceback; and
the files it must not touch are as they were (or still absent).
"""

from __future__ import annotations

import json
import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from easgd.cli import main

pytestmark = pytest.mark.timeout(60)

_CONFIG = {"method": "easgd", "tau": 1, "workers": 4, "lr": 0.1, "seed": 0}


def _run_files(name: str, **overrides: str) -> dict[str, str]:
    """A small valid run directory ``runs/<name>``; ``overrides`` replace its files."""
    files = {
        "config.json": json.dumps(_CONFIG),
        "summary.json": json.dumps({**_CONFIG, "center_test_error": 0.2, "runtime": "sim"}),
        "eval.jsonl": json.dumps({"wall": 1.0, "test_error": 0.2, "test_loss": 0.6}) + "\n",
        "metrics.jsonl": json.dumps({"event": "step", "wall": 0.5, "loss": 1.0}) + "\n",
    }
    files.update(overrides)
    return {f"runs/{name}/{k}": v for k, v in files.items()}


@dataclass
class Case:
    """``argv`` (``{tmp}`` is the test's folder), the files to create first, the fragment
    the error line must hold, the exit status, and paths that must be left as they were
    (created files: same content; others: still absent)."""

    argv: list[str] | str  # a str is split like a shell command line
    fragment: str
    files: dict[str, str] = field(default_factory=dict)
    status: int = 2
    untouched: tuple[str, ...] = ()


_BAD_JSON = '{"method": "easgd", "x": "a\tb"}'  # a raw tab inside a string

CASES = {
    # -- report: damaged run directories name the file, what is wrong and the fix ----------
    "report corrupt summary.json": Case(
        ["report", "{tmp}/runs"],
        "runs/r1/summary.json: not valid JSON (Invalid control character at line 1",
        _run_files("r1", **{"summary.json": _BAD_JSON}),
        untouched=("runs/report",),
    ),
    "report corrupt config.json": Case(
        ["report", "{tmp}/runs"],
        "runs/r1/config.json: not valid JSON",
        _run_files("r1", **{"config.json": "{oops"}),
        untouched=("runs/report",),
    ),
    "report summary.json is a list": Case(
        ["report", "{tmp}/runs"],
        "runs/r1/summary.json: holds a JSON list, not an object; remove that run directory",
        _run_files("r1", **{"summary.json": "[1, 2]"}),
        untouched=("runs/report",),
    ),
    "report config without fields": Case(
        ["report", "{tmp}/runs"],
        "runs/r1/config.json: has no tau, workers, lr; remove that run directory or rerun it",
        _run_files("r1", **{"config.json": '{"method": "easgd"}'}),
    ),
    "report config with an unknown method": Case(
        ["report", "{tmp}/runs"],
        "config.json: method 'nope' is not one of easgd",
        _run_files("r1", **{"config.json": json.dumps({**_CONFIG, "method": "nope"})}),
    ),
    "report config with a text tau": Case(
        ["report", "{tmp}/runs"],
        "config.json: tau='x' is not an integer",
        _run_files("r1", **{"config.json": json.dumps({**_CONFIG, "tau": "x"})}),
    ),
    "report eval.jsonl with a text error": Case(
        ["report", "{tmp}/runs"],
        "runs/r1/eval.jsonl: test_error='x' is not a number",
        _run_files("r1", **{"eval.jsonl": '{"wall": 1, "test_error": "x"}\n'}),
    ),
    "report eval.jsonl without wall": Case(
        ["report", "{tmp}/runs"],
        "runs/r1/eval.jsonl: a record has no 'wall'",
        _run_files("r1", **{"eval.jsonl": '{"test_error": 0.1}\n'}),
    ),
    "report damaged metrics.jsonl": Case(
        ["report", "{tmp}/runs"],
        "runs/r1/metrics.jsonl: line 1 is not a JSON object",
        _run_files("r1", **{"metrics.jsonl": "garbage\n"}),
    ),
    "report missing folder": Case(["report", "{tmp}/nope"], "nope: no such folder"),
    "report empty folder": Case(
        ["report", "{tmp}/empty"], "no run directories (summary.json) under", {"empty/x": ""}
    ),
    "report a file as DIR": Case(
        ["report", "{tmp}/runs/r1/summary.json"],
        "is a file, not a folder; give the folder holding the run directories (here",
        _run_files("r1"),
    ),
    "report --out is a file": Case(
        ["report", "{tmp}/runs", "--out", "{tmp}/taken"],
        "--out {tmp}/taken is a file, not a folder",
        {**_run_files("r1"), "taken": "keep me"},
        untouched=("taken",),
    ),
    "report --out under a file": Case(
        ["report", "{tmp}/runs", "--out", "{tmp}/taken/sub"],
        "which is a file, not a folder",
        {**_run_files("r1"), "taken": "keep me"},
        untouched=("taken",),
    ),
    "report --target 2": Case(
        ["report", "{tmp}/runs", "--target", "2"],
        "--target 2 must be a center test error in (0, 1]",
        _run_files("r1"),
        untouched=("runs/report",),
    ),
    "report --target nan": Case(
        ["report", "{tmp}/runs", "--target", "nan"], "--target nan must be", _run_files("r1")
    ),
    "report unknown --reference": Case(
        ["report", "{tmp}/runs", "--reference", "sgd"],
        "--reference sgd: no run of that method was found; the runs are of easgd",
        _run_files("r1"),
        untouched=("runs/report",),
    ),
    # -- simulate: flags out of range, and flags the run would ignore ----------------------
    "simulate straggler beyond p": Case(
        ["simulate", "--straggler", "9:3", "--p", "4"],
        "--straggler 9:3: there is no worker 9 with --workers 4; workers are 0..3",
    ),
    "simulate straggler twice": Case(
        ["simulate", "--straggler", "0:3", "--straggler", "0:2"], "worker 0 is given twice"
    ),
    "simulate straggler factor 0": Case(
        ["simulate", "--straggler", "1:0"], "--straggler 1:0: the slowdown factor must be"
    ),
    "simulate negative numel": Case(["simulate", "--numel", "-5"], "--numel -5 must be >= 1"),
    "simulate server time without a server": Case(
        ["simulate", "--method", "easgd", "--server-time", "0.5"],
        "--server-time 0.5 has no effect: easgd on the sync schedule all-reduces",
    ),
    "simulate latency of a sequential method": Case(
        ["simulate", "--method", "sgd", "--workers", "1", "--latency", "0.1"],
        "--latency 0.1 has no effect: sgd is sequential and sends no message",
    ),
    "simulate bandwidth with one worker": Case(
        ["simulate", "--method", "easgd", "--p", "1", "--bandwidth", "1000"],
        "--bandwidth 1000 has no effect: with --workers 1",
    ),
    "simulate sequential method with p workers": Case(
        ["simulate", "--method", "sgd", "--p", "4"], "use --workers 1"
    ),
    "simulate --lr nan": Case(["simulate", "--lr", "nan"], "--lr nan is outside (0, inf)"),
    "simulate --lr inf": Case(["simulate", "--lr", "inf"], "--lr inf is outside (0, inf)"),
    "simulate negative steps": Case(["simulate", "--steps", "-1"], "--steps -1 must be >= 0"),
    "simulate tau 0": Case(["simulate", "--tau", "0"], "--tau 0 must be an integer >= 1"),
    "simulate negative noise": Case(["simulate", "--noise", "-1"], "--noise -1.0 must be"),
    "simulate nan eval interval": Case(
        ["simulate", "--eval-interval", "nan"], "--eval-interval nan must be a finite number"
    ),
    "simulate derived beta out of range": Case(
        ["simulate", "--alpha", "0.6", "--p", "4"],
        "--alpha 0.6 with --workers 4 makes beta = p*alpha = 2.4, outside (0, 2)",
    ),
    "simulate batch size on the quadratic": Case(
        ["simulate", "--batch-size", "0"],
        "--batch-size 0 applies to a dataset problem, not to --problem quadratic",
    ),
    "simulate curvature on a dataset": Case(
        ["simulate", "--problem", "digits", "--h", "2"],
        "--h 2.0 applies to --problem quadratic only",
    ),
    "simulate unknown problem": Case(
        ["simulate", "--problem", "nope"], "--problem nope is not known; choose quadratic"
    ),
    "simulate missing data dir": Case(
        ["simulate", "--problem", "digits", "--data-dir", "{tmp}/nope"],
        "--data-dir {tmp}/nope is not a folder",
    ),
    "simulate synchronous method on async": Case(
        ["simulate", "--method", "allreduce", "--schedule", "async"], "use --schedule sync"
    ),
    # -- stability -------------------------------------------------------------------------
    "stability --figure is a file": Case(
        ["stability", "--figure", "{tmp}/taken"],
        "--figure {tmp}/taken is a file, not a folder",
        {"taken": "keep me"},
        untouched=("taken",),
    ),
    "stability map flag without --map": Case(
        ["stability", "--figure", "{tmp}/fig", "--p", "4"],
        "--p 4 applies to --map only",
        untouched=("fig",),
    ),
    "stability --resolution without --figure": Case(
        "stability --map easgd-sync --p 4 --eta 0.1 --alpha 0.2 --resolution 40",
        "--resolution 40 applies to --figure only",
    ),
    "stability --resolution out of range": Case(
        ["stability", "--figure", "{tmp}/fig", "--resolution", "5"],
        "--resolution 5 is outside [10, 1000]",
        untouched=("fig",),
    ),
    "stability missing --alpha": Case(
        ["stability", "--map", "easgd-sync", "--p", "2", "--eta", "0.1"],
        "--map easgd-sync needs alpha (the moving rate eta*rho): give --alpha",
    ),
    "stability --alpha on the ADMM map": Case(
        ["stability", "--map", "admm-roundrobin", "--p", "2", "--eta", "0.1", "--alpha", "1"],
        "--alpha 1 does not apply to --map admm-roundrobin, which takes --rho",
    ),
    "stability overflow": Case(
        "stability --map admm-roundrobin --p 4 --eta 1e200 --rho 1e200",
        "overflows (the map has infinite or NaN entries)",
    ),
    # -- experiment ------------------------------------------------------------------------
    "experiment without a name": Case(["experiment"], "give an experiment NAME, one of"),
    "experiment --scale 0": Case(
        ["experiment", "digits-fig2", "--dry-run", "--scale", "0"], "--scale 0 must be"
    ),
    "experiment --scale nan": Case(
        ["experiment", "digits-fig2", "--dry-run", "--scale", "nan"], "--scale nan must be"
    ),
    "experiment --seeds 0": Case(
        ["experiment", "digits-fig2", "--dry-run", "--seeds", "0"], "--seeds 0 must be >= 1"
    ),
    "experiment --step-time on the real runtime": Case(
        ["experiment", "digits-fig2", "--dry-run", "--step-time", "1"],
        "--step-time 1 applies to --runtime sim only",
    ),
    "experiment negative --step-time": Case(
        "experiment digits-fig2 --runtime sim --step-time -1 --out {tmp}/sweep",
        "--step-time -1 must be a finite number > 0",
        untouched=("sweep",),
    ),
    "experiment empty --only name": Case(
        ["experiment", "digits-fig2", "--dry-run", "--only", "easgd,"],
        "--only 'easgd,' has an empty name",
    ),
    "experiment --out is a file": Case(
        ["experiment", "digits-fig2", "--runtime", "sim", "--out", "{tmp}/taken"],
        "--out {tmp}/taken is a file, not a folder",
        {"taken": "keep me"},
        untouched=("taken",),
    ),
    "experiment missing --data-dir": Case(
        ["experiment", "digits-fig2", "--dry-run", "--data-dir", "{tmp}/nope"],
        "--data-dir {tmp}/nope is not a folder",
    ),
}


def _make(tmp: Path, files: dict[str, str]) -> None:
    for rel, content in files.items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)


def _check_one_error(
    capsys: pytest.CaptureFixture[str], status: int, command: str, fragment: str
) -> None:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert status == 2, captured.err
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert lines[0].startswith(f"easgd {command}: error: "), lines[0]
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_bad_input_is_one_line(
    case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _make(tmp_path, case.files)
    before = {rel: (tmp_path / rel).read_text() for rel in case.untouched if rel in case.files}
    parts = shlex.split(case.argv) if isinstance(case.argv, str) else case.argv
    argv = [a.replace("{tmp}", str(tmp_path)) for a in parts]
    status = main(argv)
    assert status == case.status
    _check_one_error(capsys, status, argv[0], case.fragment.replace("{tmp}", str(tmp_path)))
    for rel in case.untouched:
        path = tmp_path / rel
        if rel in before:
            assert path.read_text() == before[rel], f"{rel} was changed"
        else:
            assert not path.exists(), f"{rel} was created"


@pytest.mark.parametrize(
    "argv",
    [
        ["simulate", "--beta", "0.9", "--alpha", "0.5"],
        ["train", "--alpha", "0.5", "--beta", "0.9", "--steps", "1"],
    ],
)
def test_alpha_and_beta_are_mutually_exclusive(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # An argparse error: usage, then the error line (argparse's own format), exit 2.
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"easgd {argv[0]}: error: argument --")
    assert "not allowed with argument" in last


def _read_only_folder(path: Path) -> Path:
    """``path`` made read-only, or a skip where permissions do not stop writes (root)."""
    path.mkdir()
    path.chmod(0o555)
    probe = path / "probe"
    try:
        probe.write_text("x")
    except PermissionError:
        return path
    probe.unlink()
    path.chmod(0o755)
    pytest.skip("permissions do not stop this user from writing (root?)")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["report", "{tmp}/runs", "--out", "{ro}"], "--out {ro}: cannot write there"),
        (["report", "{tmp}/runs", "--out", "{ro}/sub"], "(in {ro}, where it would be created)"),
        (["stability", "--figure", "{ro}"], "--figure {ro}: cannot write there"),
        (
            ["experiment", "digits-fig2", "--runtime", "sim", "--out", "{ro}/x"],
            "--out {ro}/x: cannot write there",
        ),
    ],
)
def test_read_only_folder_is_one_line(
    argv: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _make(tmp_path, _run_files("r1"))
    ro = _read_only_folder(tmp_path / "ro")
    try:
        sub = {"{tmp}": str(tmp_path), "{ro}": str(ro)}
        argv = [_subst(a, sub) for a in argv]
        status = main(argv)
        _check_one_error(capsys, status, argv[0], _subst(fragment, sub))
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


def _subst(text: str, sub: dict[str, str]) -> str:
    for key, value in sub.items():
        text = text.replace(key, value)
    return text


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")
def test_folder_that_cannot_be_created_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    # Nobody, root included, creates files in /proc: the write probe says so in one line.
    status = main(["stability", "--figure", "/proc/easgd-no-such-folder"])
    _check_one_error(capsys, status, "stability", "--figure /proc/easgd-no-such-folder: cannot")


def _no_non_finite(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_no_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_no_non_finite(v) for v in value)
    return True


def _reject(token: str) -> None:
    raise ValueError(f"non-strict JSON token {token}")


def test_simulate_json_of_a_diverged_run_is_strict(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["simulate", "--method", "sgd", "--p", "1", "--lr", "100", "--steps", "200",
            "--json"]  # fmt: skip
    with pytest.warns(UserWarning, match="diverges"):
        assert main(argv) == 0
    out = json.loads(capsys.readouterr().out, parse_constant=_reject)
    assert out["final"]["loss"] is None and _no_non_finite(out)
    assert out["alpha"] is None and out["beta"] is None  # sgd has no elastic force


def test_stability_json_is_strict(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["stability", "--map", "easgd-sync", "--p", "4", "--eta", "1e300", "--alpha", "0.2"]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out, parse_constant=_reject)
    assert out["stable"] is False and _no_non_finite(out)
