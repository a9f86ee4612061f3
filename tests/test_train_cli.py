"""`easgd train` as a user meets it: interruptions, --overwrite, divergence, child errors.

Every test runs the real command in a subprocess (its own session, so a signal reaches the
launcher only, as a terminal's Ctrl-C does once the launcher puts its children in their own
groups), waits for events the run writes, never for a wall-clock allowance, and ends every
process it started (by the pids ``processes.json`` names).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from easgd.runlog import Event, RunPaths, event_errors, iter_jsonl

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)
T = TypeVar("T")


def _start(out: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "easgd", "train", "--out", str(out), "--quiet",
           "--eval-interval", "0.5", *args]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, start_new_session=True,
                            env={**os.environ, **(env or {})})  # fmt: skip


def _wait_for(predicate: Callable[[], T | None], proc: subprocess.Popen[str], what: str) -> T:
    while True:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"the run ended ({proc.returncode}) before {what}: {err[-2000:]}")
        time.sleep(0.05)


def _events(paths: RunPaths, kind: Event) -> list[dict[str, Any]]:
    try:
        return [e for e in iter_jsonl(paths.metrics) if e.get("event") == kind]
    except ValueError:  # a line being written
        return []


def _pids(paths: RunPaths) -> list[int]:
    if not paths.processes.exists():
        return []
    return [p["pid"] for p in json.loads(paths.processes.read_text())["processes"]]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _finish(proc: subprocess.Popen[str], paths: RunPaths, timeout: float = 240) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        pids = _pids(paths)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.strip()]


def _one_line(stderr: str) -> str:
    lines = _lines(stderr)
    assert len(lines) == 1, stderr
    return lines[0]


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


# ------------------------------------------------------------------------------------------
# Interruptions: every child stopped, by pid; a summary that says so; --resume continues
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("method", ["eamsgd", "localsgd"], ids=["async", "sync"])
def test_an_interrupted_run_stops_every_process_and_says_so(
    tmp_path: Path, method: str, sig: signal.Signals
) -> None:
    paths = RunPaths(tmp_path / "run")
    proc = _start(paths.root, "--method", method, "--workers", "2", "--time-budget", "600",
                  "--checkpoint-every-steps", "20")  # fmt: skip
    try:
        _wait_for(lambda: len({e["worker"] for e in _events(paths, Event.EXCHANGE)}) == 2,
                  proc, "both workers exchanged")  # fmt: skip
        _wait_for(lambda: len(_pids(paths)) == 2 + (method == "eamsgd") + 1, proc, "all started")
        pids = _pids(paths)
        assert all(_alive(pid) for pid in pids)
        proc.send_signal(sig)
        _, stderr = _finish(proc, paths)
    finally:
        _finish(proc, paths)
    assert proc.returncode == 128 + sig, stderr
    line = _one_line(stderr)
    assert f"interrupted by {sig.name}" in line and f"--resume {paths.root}" in line
    assert [pid for pid in pids if _alive(pid)] == [], "a process of the run outlived it"
    summary = json.loads(paths.summary.read_text())
    assert summary["status"] == "interrupted" and summary["local_steps"] > 0
    (stop,) = _events(paths, Event.RUN_INTERRUPTED)
    assert stop["signal"] == sig.name and stop["training"] is True and not event_errors(stop)
    processes = json.loads(paths.processes.read_text())["processes"]
    assert {p["state"] for p in processes} == {"exited"}


def test_an_interrupted_run_continues_with_resume(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path / "run")
    proc = _start(paths.root, "--method", "localsgd", "--workers", "2", "--tau", "4",
                  "--steps", "100000", "--checkpoint-every-steps", "8")  # fmt: skip
    try:
        _wait_for(
            lambda: paths.worker_checkpoint(0).exists() and paths.worker_checkpoint(1).exists(),
            proc, "both workers saved their state",
        )  # fmt: skip
        proc.send_signal(signal.SIGTERM)
        _finish(proc, paths)
    finally:
        _finish(proc, paths)
    assert json.loads(paths.summary.read_text())["status"] == "interrupted"
    resumed = subprocess.run(
        [sys.executable, "-m", "easgd", "train", "--resume", str(paths.root), "--steps", "40",
         "--quiet", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=240,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["status"] == "completed"
    assert [e["event"] for e in iter_jsonl(paths.metrics)].count("run_resume") == 1


# ------------------------------------------------------------------------------------------
# --overwrite never loses the run it replaces before the new one trains
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("done") / "run"
    result = subprocess.run(
        [sys.executable, "-m", "easgd", "train", "--out", str(out), "--steps", "30",
         "--workers", "2", "--quiet"], capture_output=True, text=True, cwd=ROOT, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (out / "notes.txt").write_text("the user's own file\n")
    return out


def _copy(src: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(src, dest)
    return dest


#: Downloads fail at once (a proxy on a closed port), whatever network the machine has.
_OFFLINE = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}


def test_overwrite_with_a_bad_dataset_leaves_the_old_run_intact(
    finished_run: Path, tmp_path: Path
) -> None:
    run = _copy(finished_run, tmp_path / "run")
    before = _digests(run)
    result = subprocess.run(
        [sys.executable, "-m", "easgd", "train", "--out", str(run), "--overwrite", "--dataset",
         "mnist", "--data-dir", str(tmp_path / "empty")], capture_output=True, text=True,
        cwd=ROOT, timeout=240, env={**os.environ, **_OFFLINE, "EASGD_DATA_DIR": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "--dataset" in _one_line(result.stderr) or "--data-dir" in result.stderr
    assert _digests(run) == before
    assert not (tmp_path / "run.previous").exists()


_INJECT = """
import os
if os.environ.get("EASGD_TEST_FAIL_WORKERS"):
    import easgd.roles.worker as _w

    def _fail(cfg, ctx, index):
        raise RuntimeError("injected start failure of worker %d" % index)

    _w.run_worker = _fail
"""


def _inject_failing_workers(tmp_path: Path) -> dict[str, str]:
    """Every worker process of the run raises at its start (a sitecustomize on PYTHONPATH)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_INJECT)
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {"PYTHONPATH": path, "EASGD_TEST_FAIL_WORKERS": "1"}


def test_overwrite_whose_new_run_fails_to_start_restores_the_old_run(
    finished_run: Path, tmp_path: Path
) -> None:
    run = _copy(finished_run, tmp_path / "run")
    before = _digests(run)
    env = _inject_failing_workers(tmp_path)
    proc = _start(run, "--overwrite", "--steps", "30", "--workers", "2", env=env)
    _, stderr = _finish(proc, RunPaths(run))
    assert proc.returncode == 1, stderr
    # One line for each worker as it died (the run goes on without it), then the error.
    *warnings, line = _lines(stderr)
    assert all("the run goes on without it" in w for w in warnings)
    assert "every worker died" in line and "full log:" in line
    assert "RuntimeError: injected start failure of worker" in line, line
    assert "restored as it was" in line and "run.failed" in line
    assert _digests(run) == before, "the replaced run changed"
    failed = tmp_path / "run.failed"
    assert "injected start failure" in (failed / "logs" / "worker-0.log").read_text()
    assert not (tmp_path / "run.previous").exists()


def test_overwrite_deletes_the_old_run_once_the_new_one_trains(
    finished_run: Path, tmp_path: Path
) -> None:
    run = _copy(finished_run, tmp_path / "run")
    old = json.loads((run / "summary.json").read_text())
    result = subprocess.run(
        [sys.executable, "-m", "easgd", "train", "--out", str(run), "--overwrite", "--steps",
         "20", "--workers", "1", "--quiet", "--json"], capture_output=True, text=True,
        cwd=ROOT, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    new = json.loads(result.stdout)
    assert new["workers"] == 1 != old["workers"]
    assert (run / "notes.txt").read_text() == "the user's own file\n"  # not the run's: kept
    assert not (tmp_path / "run.previous").exists()
    assert not (tmp_path / "run.failed").exists()


# ------------------------------------------------------------------------------------------
# Exit statuses and JSON you can trust
# ------------------------------------------------------------------------------------------


def _strict(text: str) -> Any:
    def refuse(name: str) -> None:
        raise AssertionError(f"bare {name} in the JSON output")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("method", ["eamsgd", "localsgd"], ids=["async", "sync"])
def test_a_diverged_run_ends_with_its_own_status_and_strict_json(
    tmp_path: Path, method: str
) -> None:
    paths = RunPaths(tmp_path / "run")
    proc = _start(paths.root, "--method", method, "--workers", "2", "--lr", "1e30",
                  "--steps", "100000", "--json")  # fmt: skip
    stdout, stderr = _finish(proc, paths)
    assert proc.returncode == 3, stderr
    line = _one_line(stderr)
    assert "diverged" in line and "lower --lr" in line and "full log:" in line
    summary = _strict(stdout)
    assert summary["status"] == "diverged" == _strict(paths.summary.read_text())["status"]
    for file in (paths.metrics, paths.eval):  # eval.jsonl: if an evaluation came first
        for text in file.read_text().splitlines() if file.exists() else []:
            _strict(text)
    (first, *_) = _events(paths, Event.DIVERGED)
    assert not event_errors(first)
    assert first["loss"] is None or first["loss"] > 1e30
    assert summary["local_steps"] < 100000


def test_a_center_that_never_moved_is_reported(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "easgd", "train", "--out", str(tmp_path / "run"), "--method",
         "easgd", "--tau", "10", "--steps", "5", "--workers", "2", "--quiet", "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = _strict(result.stdout)
    assert summary["center_moved"] is False
    assert "the final center is the initial one" in result.stderr


def test_the_closing_table_says_how_fast_the_workers_stepped(tmp_path: Path) -> None:
    # Without --json the run ends on a table; besides the summary's numbers it gives every
    # worker's local steps per second of training (local_steps / train_seconds).
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "easgd", "train", "--out", str(out), "--method", "easgd",
         "--steps", "20", "--workers", "2", "--quiet"],
        capture_output=True, text=True, cwd=ROOT, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = dict(line.split(None, 1) for line in result.stdout.splitlines() if "  " in line)
    summary = json.loads((out / "summary.json").read_text())
    assert int(rows["local_steps"]) == summary["local_steps"] == 40
    rate = float(rows["local_steps_per_second"])
    assert rate == pytest.approx(summary["local_steps"] / summary["train_seconds"], rel=1e-5)
    lines = [line.split(None, 1)[0] for line in result.stdout.splitlines()]
    assert lines.index("local_steps_per_second") == lines.index("local_steps") + 1


# ------------------------------------------------------------------------------------------
# TLS end to end: --tls-cert/--tls-key on the servers, --tls-ca on the workers and evaluator
# ------------------------------------------------------------------------------------------


def test_a_run_over_tls(tmp_path: Path) -> None:
    from test_ps_frames import self_signed_certificate

    cert, key = self_signed_certificate(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "easgd", "train", "--out", str(tmp_path / "run"), "--steps", "40",
         "--workers", "2", "--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca",
         str(cert), "--quiet", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = _strict(result.stdout)
    assert summary["status"] == "completed" and summary["exchanges"] > 0
    assert summary["evaluations"] > 0  # the evaluator pulled over TLS too
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["tls_cert"] == str(cert)
    refused = subprocess.run(
        [sys.executable, "-m", "easgd", "train", "--out", str(tmp_path / "bad"), "--tls-cert",
         str(cert), "--tls-key", str(tmp_path / "missing.pem")], capture_output=True,
        text=True, cwd=ROOT, timeout=240,
    )  # fmt: skip
    assert refused.returncode == 2 and "--tls-cert" in _one_line(refused.stderr)
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------
# --config FILE: a run's own config.json reproduces it; flags override the file
# ------------------------------------------------------------------------------------------


def test_config_file_reproduces_a_run_and_flags_override_it(
    finished_run: Path, tmp_path: Path
) -> None:
    again = tmp_path / "again"
    result = subprocess.run(
        [sys.executable, "-m", "easgd", "train", "--config", str(finished_run / "config.json"),
         "--out", str(again), "--quiet", "--json"], capture_output=True, text=True, cwd=ROOT,
        timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    old = json.loads((finished_run / "config.json").read_text())
    new = json.loads((again / "config.json").read_text())
    assert {k for k in old if old[k] != new[k]} == {"out"}
    toml = tmp_path / "run.toml"
    toml.write_text('method = "localsgd"\ntau = 4\nworkers = 2\nsteps = 8\nlr = 0.05\n')
    result = subprocess.run(
        [sys.executable, "-m", "easgd", "train", "--config", str(toml), "--tau", "2", "--out",
         str(tmp_path / "toml"), "--quiet", "--json"], capture_output=True, text=True,
        cwd=ROOT, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    cfg = json.loads((tmp_path / "toml" / "config.json").read_text())
    assert (cfg["method"], cfg["tau"], cfg["steps"], cfg["lr"]) == ("localsgd", 2, 8, 0.05)
    (tmp_path / "bad.toml").write_text("tua = 3\n")
    bad = subprocess.run(
        [sys.executable, "-m", "easgd", "train", "--config", str(tmp_path / "bad.toml"),
         "--out", str(tmp_path / "bad")], capture_output=True, text=True, cwd=ROOT, timeout=240,
    )  # fmt: skip
    assert bad.returncode == 2 and "unknown field tua" in _one_line(bad.stderr)
    assert not (tmp_path / "bad").exists()
