"""easgd.spawner: children from the fork server behave as ``subprocess.Popen`` children do.

Most tests run in both modes (one parametrized fixture, one fork server for the module):
exit codes, the environment, the log, the process group, signals, timeouts. The forkserver
mode's own promises follow: a child dies with its fork server, the fork server with its
launcher (a stand-in launcher the test kills outright), and a child forked from a process
that imported torch keeps torch's threads and gloo working. Every wait is on an event (a
pipe, a FIFO, a pidfd), bounded only by the test's timeout; every process is ended.

The targets live in ``tests/_spawn_targets.py``; children find it through ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from easgd.spawner import Child, Spawner

TESTS = Path(__file__).resolve().parent
PYTHONPATH = os.pathsep.join([str(TESTS), str(TESTS.parent / "src")])
ENV = {"PYTHONPATH": PYTHONPATH}
T = "_spawn_targets:"

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux process tools"),
]


@pytest.fixture(scope="module", params=["forkserver", "subprocess"])
def spawner(request: pytest.FixtureRequest) -> Iterator[Spawner]:
    # A variable of this process (and so of the fork server) that no child may see.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EASGD_TEST_PARENT", "parent only")
        with Spawner(request.param, preload=("_spawn_targets",)) as s:
            s.warm()
            yield s


def _pidfd(pid: int) -> int:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError) as exc:  # Linux < 5.3, or Python without it
        pytest.skip(f"no pidfd_open: {exc}")


def _gone(pidfd: int) -> bool:
    """Wait until the process behind ``pidfd`` has exited (a pidfd polls readable then)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll())


def _line(fd: int, watch: int) -> str:
    """The first line written to ``fd``; fails if the process behind pidfd ``watch`` exits
    first."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poller.register(watch, select.POLLIN)
    data = b""
    while b"\n" not in data:
        ready = dict(poller.poll())
        if ready.get(fd, 0) & select.POLLIN:
            data += os.read(fd, 4096)
        elif watch in ready:
            raise AssertionError(f"the process exited before it reported (got {data!r})")
    return data.decode().split("\n", 1)[0]


def _end(*children: Child) -> None:
    for c in children:
        c.killpg(signal.SIGKILL)
        c.wait()


def test_exit_codes_are_popens(spawner: Spawner, tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    assert spawner.start(ENV, log, target=T + "exit_0").wait() == 0
    assert spawner.start(ENV, log, target=T + "exit_3").wait() == 3
    child = spawner.start(ENV, log, target=T + "raises")
    assert child.wait() == 1 and child.returncode == 1 and child.poll() == 1
    assert log.read_text().rstrip().endswith("RuntimeError: raised on purpose")
    assert "Traceback (most recent call last)" in log.read_text()
    killed = spawner.start(ENV, log, target=T + "block")
    killed.kill()
    assert killed.wait() == -signal.SIGKILL
    terminated = spawner.start(ENV, log, target=T + "block")
    terminated.terminate()
    assert terminated.wait() == -signal.SIGTERM
    # Signals to a reaped child do nothing (its pid may be another process's by now).
    for reaped in (killed, terminated, child):
        reaped.send_signal(signal.SIGTERM)
        reaped.kill()
        reaped.killpg(signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL


def test_environment_is_replaced_and_the_rest_is_a_fresh_process(
    spawner: Spawner, tmp_path: Path
) -> None:
    assert os.environ["EASGD_TEST_PARENT"] == "parent only"
    log = tmp_path / "report.log"
    child = spawner.start(dict(ENV, EASGD_TEST_CHILD="child only"), log, target=T + "report")
    assert child.wait() == 0, log.read_text()
    seen = json.loads(log.read_text())
    assert seen["environ"].get("EASGD_TEST_CHILD") == "child only"
    assert "EASGD_TEST_PARENT" not in seen["environ"]
    assert seen["c_getenv"] == {"EASGD_TEST_CHILD": "child only", "EASGD_TEST_PARENT": ""}
    # The subprocess mode's interpreter adds its own LC_CTYPE on some systems: nothing else.
    assert set(seen["environ"]) - {"LC_CTYPE"} == {"PYTHONPATH", "EASGD_TEST_CHILD"}
    assert seen["pid"] == child.pid == seen["pgid"]
    assert seen["ppid"] == spawner.parent_pid
    assert seen["stdin"] == "" and seen["stdin_is_null"]
    assert seen["sigint_default"] and seen["sigterm_default"]
    assert seen["cwd"] == os.getcwd()


def test_stdout_and_stderr_go_to_the_log_truncated_or_appended(
    spawner: Spawner, tmp_path: Path
) -> None:
    log = tmp_path / "streams.log"
    log.write_text("the part before\n")
    assert spawner.start(ENV, log, append=True, target=T + "write_streams").wait() == 0
    lines = log.read_text().splitlines()
    assert lines[0] == "the part before"
    assert sorted(lines[1:]) == ["to fd 1", "to fd 2", "to sys.stderr", "to sys.stdout"]
    assert spawner.start(ENV, log, target=T + "exit_0").wait() == 0
    assert log.read_text() == "exit 0\n"
    new = tmp_path / "new.log"
    assert spawner.start(ENV, new, target=T + "exit_0").wait() == 0
    assert new.stat().st_mode & 0o077 == 0  # the owner's only, as every file of a run


def test_the_child_leads_its_process_group_and_killpg_reaches_it_all(
    spawner: Spawner, tmp_path: Path
) -> None:
    fifo = tmp_path / "report"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    child = spawner.start(dict(ENV, EASGD_TEST_REPORT=str(fifo)), tmp_path / "group.log",
                          target=T + "fork_grandchild")  # fmt: skip
    try:
        # Already when start() returns: a Ctrl-C to this process's group cannot reach it.
        assert os.getpgid(child.pid) == child.pid != os.getpgid(0)
        grandchild = int(_line(reader, _pidfd(child.pid)))
        assert os.getpgid(grandchild) == child.pid
        watch = _pidfd(grandchild)
        child.killpg(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
        assert _gone(watch)  # the whole group, not just its leader
    finally:
        os.close(reader)
        _end(child)


def test_wait_with_a_timeout_raises_timeout_expired(spawner: Spawner, tmp_path: Path) -> None:
    child = spawner.start(ENV, tmp_path / "block.log", target=T + "block")
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=0.05)  # it blocks until a signal: never done by then
        assert child.poll() is None and child.returncode is None
    finally:
        _end(child)
    assert child.returncode == -signal.SIGKILL


def test_bad_requests_raise_in_the_caller(spawner: Spawner, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="target='no_colon' is not 'module:function'"):
        spawner.start(ENV, tmp_path / "x.log", target="no_colon")
    with pytest.raises(TypeError, match="env must map str to str"):
        spawner.start({"N": 1}, tmp_path / "x.log")  # type: ignore[dict-item]
    # The log's folder is missing: the error of open(), as Popen's caller would get it.
    with pytest.raises(FileNotFoundError):
        spawner.start(ENV, tmp_path / "missing" / "x.log", target=T + "exit_0")
    assert spawner.start(ENV, tmp_path / "x.log", target=T + "exit_0").wait() == 0


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({"mode": "thread"}, "spawn mode 'thread'"), ({"mode": "subprocess"}, None)],
)
def test_modes(kwargs: dict[str, str], error: str | None) -> None:
    if error is None:
        assert Spawner(**kwargs).mode == kwargs["mode"]
    else:
        with pytest.raises(ValueError, match=error):
            Spawner(**kwargs)


def test_mode_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EASGD_SPAWN", "subprocess")
    assert Spawner().mode == "subprocess"
    monkeypatch.delenv("EASGD_SPAWN")
    assert Spawner().mode == "forkserver"


def test_children_die_with_their_fork_server_and_the_next_start_makes_a_new_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Spawner("forkserver", preload=("_spawn_targets", "no_such_module_here")) as spawner:
        with caplog.at_level(logging.WARNING, logger="easgd.spawner"):
            child = spawner.start(ENV, tmp_path / "a.log", target=T + "block")
        assert "could not preload no_such_module_here" in caplog.text
        server, watch = spawner.parent_pid, _pidfd(child.pid)
        os.kill(server, signal.SIGKILL)
        assert _gone(watch)  # its parent-death signal
        assert child.wait() == -signal.SIGKILL
        with caplog.at_level(logging.WARNING, logger="easgd.spawner"):
            again = spawner.start(ENV, tmp_path / "b.log", target=T + "exit_0")
        assert again.wait() == 0 and spawner.parent_pid != server
        assert "starting a new one" in caplog.text
        # close() with a child still running: the server kills its group, and exits.
        last = spawner.start(ENV, tmp_path / "c.log", target=T + "block")
        watch = _pidfd(last.pid)
        spawner.close()
        assert _gone(watch) and last.wait() == -signal.SIGKILL


def test_a_process_with_a_thread_does_not_fork_its_fork_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        with Spawner("forkserver", preload=("_spawn_targets",)) as spawner:
            with caplog.at_level(logging.INFO, logger="easgd.spawner"):
                spawner.warm(fork=True)
            assert "as an interpreter: 1 Python thread(s)" in caplog.text
            assert spawner.start(ENV, tmp_path / "a.log", target=T + "exit_0").wait() == 0
            # python -c "... _serve(...)" (exec'd by now: it served), not a copy of pytest
            assert b"_serve(" in Path(f"/proc/{spawner.parent_pid}/cmdline").read_bytes()
    finally:
        stop.set()
        thread.join()


def _stand_in(main: str, args: list[str], tmp_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A fresh interpreter running ``_spawn_targets.<main>``; the read end of its report."""
    r, w = os.pipe()
    env = dict(os.environ, PYTHONPATH=PYTHONPATH, EASGD_TEST_REPORT=str(w),
               EASGD_TEST_LOG=str(tmp_path / "child.log"))  # fmt: skip
    code = f"import sys, _spawn_targets as t; sys.exit(t.{main}())"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, pass_fds=[w])
    os.close(w)
    return proc, r


@pytest.mark.parametrize("how", ["exec", "fork"])
def test_the_fork_server_and_its_children_die_with_the_launcher(how: str, tmp_path: Path) -> None:
    launcher, report = _stand_in("launcher", [how], tmp_path)
    try:
        server, child = map(int, _line(report, _pidfd(launcher.pid)).split())
        watches = [_pidfd(server), _pidfd(child)]
        assert os.getpgid(child) == child
        launcher.kill()  # no chance to clean up
        assert launcher.wait() == -signal.SIGKILL
        assert all(_gone(w) for w in watches)
    finally:
        os.close(report)
        launcher.kill()
        launcher.wait()


@pytest.mark.slow
def test_torch_threads_and_gloo_work_in_children_of_a_forked_server(tmp_path: Path) -> None:
    launcher, report = _stand_in("gloo_launcher", [], tmp_path)
    try:
        result = json.loads(_line(report, _pidfd(launcher.pid)))
        assert launcher.wait() == 0
    finally:
        os.close(report)
        launcher.kill()
        launcher.wait()
    assert result["codes"] == [0, 0], result["logs"]
    import torch

    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        assert result["forked"]  # a CPU build: the server is a fork of the launcher
    for log in result["logs"]:
        seen = json.loads(log.strip().splitlines()[-1])
        assert seen["threads"] == 2  # OMP_NUM_THREADS of the child, not of the server
        assert seen["corners"] == pytest.approx(seen["expected"])
        assert seen["doubled"] == pytest.approx(seen["doubled_expected"])
        assert seen["sum"] == 0 + 1
