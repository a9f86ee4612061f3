"""Start a run's processes from a warm fork server: each costs a fork, not an import of torch.

``easgd train`` starts about six processes (servers, workers, an evaluator). One that imports
torch itself spends over a second of CPU on it, so on a small machine training began many
seconds after the command. A :class:`Spawner` keeps a fork server: a process that has
imported torch, ``torch.distributed`` and every module a role needs (:data:`PRELOAD`), and
forks one child per request; :meth:`Spawner.start` asks it for a child and returns a
:class:`Child`, the part of ``subprocess.Popen`` the launcher uses. :meth:`Spawner.warm`
makes the server, in one of two ways:

* ``warm()``: a fresh interpreter that imports the preload beside the caller (so call it
  first thing: the two imports overlap where a core is free);
* ``warm(fork=True)``: a fork of the caller itself, once the caller has imported torch and
  before it starts a thread (``easgd train`` does it just before the launcher hosts its
  store): no second import at all, the better start where cores are few or busy
  (``benchmarks/startup.py``). A process with a Python thread, a process group or a torch
  built for a GPU gets the interpreter instead.

A child starts as a fresh ``python -m easgd.spawner TARGET`` would, from what it is given:

* ``os.environ`` is ``env``, exactly; torch's intra-op threads follow its ``OMP_NUM_THREADS``
  (OpenMP read the variable once, when the fork server imported torch); the entries of its
  ``PYTHONPATH`` come first on ``sys.path``; the working directory is the caller's;
* stdin is /dev/null; stdout and stderr go to ``log_path`` (opened by the child, appended to
  with ``append=True``, created 0600), and ``sys.stdout``/``sys.stderr`` are line-buffered;
* it leads its own process group (``os.setpgid(0, 0)``, done before :meth:`Spawner.start`
  returns), so a terminal's Ctrl-C reaches the launcher only, which stops every child itself;
  SIGINT, SIGTERM and SIGCHLD have a fresh interpreter's handlers;
* the target, ``"module:function"``, is called; an int it returns is the exit status (None:
  0), an exception prints its traceback to the log and exits 1. The process ends with
  ``os._exit`` after flushing: no interpreter teardown, where gloo's threads can abort it
  (:func:`easgd.launch.exit_now`).

Return codes are ``Popen``'s: the exit status, or ``-signum`` for a child a signal killed.

Failure behaviour:

* the launcher dies, even by SIGKILL: the fork server dies with it (``PR_SET_PDEATHSIG``),
  and every child with the fork server (its own ``PR_SET_PDEATHSIG=SIGKILL``);
* :meth:`Spawner.close`, or the launcher's exit, closes the request socket: the fork server
  kills the process group of every child still running, and exits;
* the fork server dies on its own: its children die too and report ``-SIGKILL``, and the
  next :meth:`Spawner.start` starts a new server;
* a module of :data:`PRELOAD` that fails to import is logged (a warning): the children import
  it themselves, and fail in their own logs as a fresh process would; a fork server that
  cannot start at all leaves the spawner in ``"subprocess"`` mode (another warning);
* a child that cannot set itself up (its log's directory is missing, say) is reaped and its
  exception raised by :meth:`Spawner.start`, as ``Popen`` raises.

Where the fork server cannot be used (not Linux) or is not wanted (``EASGD_SPAWN=subprocess``),
:attr:`Spawner.mode` is ``"subprocess"``: each child is ``subprocess.Popen`` of
``python -m easgd.spawner TARGET`` in its own process group, the old way (an import of torch
each, no parent-death signal), behind the same :class:`Child` API.

A child of a forked server also keeps what the caller had set up in Python before
``warm(fork=True)``: its logging configuration and warning filters (``easgd train``'s
``--log-level`` then reaches every process), and the file descriptors it had open.

Example::

    import torch  # ... the launcher's own imports ...

    spawner = Spawner()
    spawner.warm(fork=True)  # before any thread: the server is this process, forked
    child = spawner.start(dict(os.environ, RANK="0"), Path("logs/worker-0.log"))
    child.wait()
    spawner.close()
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import io
import logging
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

__all__ = [
    "DEFAULT_TARGET",
    "PRELOAD",
    "SPAWN_ENV",
    "Child",
    "Spawner",
    "shared",
]

log = logging.getLogger(__name__)

#: Chooses how children start: ``forkserver`` (the default on Linux) or ``subprocess``.
SPAWN_ENV = "EASGD_SPAWN"
MODES = ("forkserver", "subprocess")
#: What a child runs unless told otherwise: the entry point of every role.
DEFAULT_TARGET = "easgd.launch:role_main"
#: What the fork server imports before its first fork: everything a role imports.
PRELOAD: tuple[str, ...] = (
    "numpy",
    "torch",
    "torch.distributed",
    "easgd.launch",
    "easgd.roles.server",
    "easgd.roles.worker",
    "easgd.roles.evaluator",
    "easgd.task",
    "easgd.data",
    "easgd.data.digits",
    "easgd.data.loader",
    "easgd.models",
    "easgd.flat",
    "easgd.comm.ps",
    "easgd.comm.ps_client",
    "easgd.comm.staging",
    "easgd.comm.allreduce",
    "easgd.evaluation",
    "easgd.finalize",
    "encodings.idna",  # resolving a host name
)
#: The variables that set torch's intra-op threads; the fork server starts without them, so
#: that its defaults are a fresh process's and each child applies its own.
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_CODE = struct.Struct("q")  # a pid or an exit status on a status pipe
_READY = b"\0"  # a child's setup is done (anything else: its pickled exception)
_MAX_REQUEST = 1 << 20
_LOG_MODE = 0o600  # a new log: the owner's only, as every file of a run (the umask may take more)
_PR_SET_PDEATHSIG = 1


class Child:
    """A process started by :class:`Spawner`: the part of ``subprocess.Popen`` the launcher
    uses, plus :meth:`killpg`.

    ``returncode`` (and what :meth:`poll` and :meth:`wait` return) is the exit status, or
    ``-signum`` when a signal killed the process; None while it runs. Signalling a child
    that has been reaped does nothing.
    """

    #: The process's id (also its process group's).
    pid: int
    #: What started it, for messages and :class:`subprocess.TimeoutExpired`.
    args: list[str]

    @property
    def returncode(self) -> int | None:
        raise NotImplementedError

    def poll(self) -> int | None:
        """The return code if the process has ended, else None (never blocks)."""
        raise NotImplementedError

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to end; its return code. Raises
        :class:`subprocess.TimeoutExpired` when ``timeout`` seconds pass first."""
        raise NotImplementedError

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the process, unless it has ended."""
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        """SIGTERM."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL."""
        self.send_signal(signal.SIGKILL)

    def killpg(self, sig: int) -> None:
        """Send ``sig`` to the process group the child leads (its processes, and any they
        started); to the child alone if the group cannot be signalled."""
        if self.poll() is not None:
            return
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            self.send_signal(sig)


class _ForkedChild(Child):
    """A child of the fork server: its exit status comes on a pipe from the server."""

    def __init__(self, pid: int, status_fd: int, args: list[str]) -> None:
        self.pid = pid
        self.args = args
        self._status_fd = status_fd
        self._returncode: int | None = None
        self._lock = threading.Lock()

    @property
    def returncode(self) -> int | None:
        return self._returncode

    def poll(self) -> int | None:
        return self._wait(0.0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._wait(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return code

    def _wait(self, timeout: float | None) -> int | None:
        with self._lock:
            if self._returncode is None and _readable(self._status_fd, timeout):
                # The server writes the status once it has reaped the child; end of file
                # without one: the server died, and the child with it (parent-death SIGKILL).
                code = _read_code(self._status_fd)
                self._returncode = -signal.SIGKILL if code is None else code
                os.close(self._status_fd)
            return self._returncode


class _PopenChild(Child):
    """A ``subprocess.Popen`` child (the ``subprocess`` mode)."""

    def __init__(self, popen: subprocess.Popen[bytes], args: list[str]) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.args = args

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)


class _ForkedServer:
    """A fork server forked from this process: the part of ``Popen`` :class:`Spawner` uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        # Only ever waited for once its socket is closed, when it exits at once: a short poll.
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(["fork server"], timeout or 0.0)
            time.sleep(0.01)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


class Spawner:
    """Starts child processes from a fork server that has imported what they need.

    Args:
        mode: ``"forkserver"`` or ``"subprocess"`` (default: ``EASGD_SPAWN`` if set, else
            ``"forkserver"`` on Linux and ``"subprocess"`` elsewhere).
        preload: the modules the fork server imports before its first fork (default
            :data:`PRELOAD`).

    The fork server is started by :meth:`warm` (or the first :meth:`start`) from the thread
    that calls it, which must outlive the children: Linux's parent-death signal follows the
    thread that forked.

    Example::

        with Spawner() as spawner:
            child = spawner.start({"PATH": os.environ["PATH"]}, Path("run.log"))
            assert child.wait() == 0
    """

    def __init__(self, mode: str | None = None, *, preload: Sequence[str] = PRELOAD) -> None:
        if mode is None:
            mode = os.environ.get(SPAWN_ENV) or (
                "forkserver" if sys.platform.startswith("linux") else "subprocess"
            )
        if mode not in MODES:
            raise ValueError(
                f"spawn mode {mode!r} (mode=, or {SPAWN_ENV}) is not one of {', '.join(MODES)}; "
                f"unset {SPAWN_ENV} for the default"
            )
        if mode == "forkserver" and not sys.platform.startswith("linux"):
            raise ValueError(
                f"spawn mode 'forkserver' needs Linux (this is {sys.platform}); use 'subprocess'"
            )
        #: ``"forkserver"`` or ``"subprocess"``: how :meth:`start` starts a child.
        self.mode = mode
        self.preload = tuple(preload)
        self._server: subprocess.Popen[bytes] | _ForkedServer | None = None
        self._sock: socket.socket | None = None
        self._hello = False  # the server's first message (preload done) has been read
        self._lock = threading.RLock()

    # -- the fork server ----------------------------------------------------------------

    def warm(self, *, fork: bool = False) -> None:
        """Start the fork server if it is not running; returns without waiting for it.

        ``fork=False``: a fresh interpreter imports :data:`PRELOAD` beside this process (so
        call it first thing, before importing torch here). ``fork=True``: the server is a
        fork of this process, once it has imported what it lacks of the preload: no second
        import of torch, the cheaper start where cores are few or busy. Only for a process
        that has started no thread (a store's, a process group's: the fork would inherit
        the locks they hold) and no CUDA context. What it can see it checks: with a Python
        thread running, a default process group, or a torch built for a GPU (whose driver
        ``torch.cuda.is_available()`` may have initialized, which a fork cannot use), it
        starts an interpreter instead, as it does to replace a server that died.
        """
        with self._lock:
            if self.mode != "forkserver":
                return
            restart = self._server is not None
            if restart:
                assert self._server is not None
                code = self._server.poll()
                if code is None:
                    return
                log.warning("the fork server (pid %d) ended with status %d; starting a new one",
                            self._server.pid, code)  # fmt: skip
                self._drop()
            if fork and not restart:
                for line in _preload(self.preload):
                    log.warning("could not preload %s; the children import it", line)
                reason = _fork_unsafe()
                if reason is None:
                    self._fork_server()
                    return
                log.info("starting the fork server as an interpreter: %s", reason)
            self._exec_server()

    @property
    def parent_pid(self) -> int:
        """What a child's ``os.getppid()`` returns: the fork server's pid (started here if
        needed), or this process's in ``subprocess`` mode."""
        with self._lock:
            self.warm()
            return self._server.pid if self._server is not None else os.getpid()

    def _exec_server(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        code = (f"import sys; sys.path[:] = {sys.path!r}; from easgd.spawner import _serve; "
                f"_serve({os.getpid()}, {theirs.fileno()}, {list(self.preload)!r})")  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in _THREAD_VARS}
        try:
            self._server = subprocess.Popen(
                [sys.executable, "-c", code], pass_fds=[theirs.fileno()], env=env,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock, self._hello = ours, False

    def _fork_server(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        launcher = os.getpid()
        _flush()  # what this process has buffered must not come out of the server's children
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # see _fork
            pid = os.fork()
        if pid == 0:
            try:
                global _shared
                _shared = None  # a child that wants a spawner starts its own
                ours.close()
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.close(null)
                _serve(launcher, theirs.fileno(), [])
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(1)
        theirs.close()
        self._server = _ForkedServer(pid)
        self._sock, self._hello = ours, False

    def _drop(self) -> None:
        """Forget the fork server: close its socket (it exits) and reap it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._server is not None:
            if not self._hello:  # still importing, so no child yet: no need to wait for it
                self._server.kill()
            try:
                self._server.wait(10)
            except subprocess.TimeoutExpired:
                self._server.kill()
                self._server.wait()
            self._server = None

    def _read_hello(self) -> None:
        """Wait for the server's first message: the preload is done (and what failed)."""
        assert self._sock is not None
        data = self._sock.recv(_MAX_REQUEST)
        if not data:
            raise ConnectionError("the fork server exited before it was ready")
        failed: list[str] = pickle.loads(data)
        for line in failed:
            log.warning("the fork server could not preload %s; the children import it", line)
        self._hello = True

    def close(self) -> None:
        """Stop the fork server; it kills the process group of every child still running."""
        with self._lock:
            self._drop()

    def __enter__(self) -> Spawner:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- children -----------------------------------------------------------------------

    def start(
        self,
        env: Mapping[str, str],
        log_path: Path,
        *,
        append: bool = False,
        target: str = DEFAULT_TARGET,
    ) -> Child:
        """Start a child that runs ``target`` (``"module:function"``) with environment ``env``
        and its output in ``log_path`` (truncated, or appended to with ``append=True``).

        Returns once the child leads its own process group and writes to its log.
        """
        module, sep, function = target.partition(":")
        if not (module and sep and function):
            raise ValueError(f"target={target!r} is not 'module:function', e.g. {DEFAULT_TARGET!r}")
        env = dict(env)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise TypeError("env must map str to str, as os.environ does")
        request = {"env": env, "log": os.fspath(log_path), "append": append, "target": target,
                   "cwd": os.getcwd()}  # fmt: skip
        with self._lock:
            if self.mode == "forkserver":
                for attempt in range(2):
                    try:
                        return self._fork(request)
                    except ConnectionError as exc:
                        if not self._hello:  # it never got ready: it will not next time either
                            log.warning("the fork server failed (%s); starting processes "
                                        "without it", exc)  # fmt: skip
                            self._drop()
                            self.mode = "subprocess"
                            break
                        if attempt:
                            raise
                        log.warning("the fork server is gone (%s); starting a new one", exc)
                        self._drop()
                        self.warm()
            return self._popen(request)

    def _fork(self, request: dict[str, Any]) -> Child:
        self.warm()
        assert self._sock is not None
        status_r, status_w = os.pipe()
        ready_r, ready_w = os.pipe()
        try:
            try:
                socket.send_fds(self._sock, [pickle.dumps(request)], [status_w, ready_w])
            except OSError as exc:
                raise ConnectionError(f"the fork server takes no requests: {exc}") from None
            finally:
                os.close(status_w)
                os.close(ready_w)
            if not self._hello:
                self._read_hello()
            pid = _read_code(status_r)
            if pid is None:
                raise ConnectionError("the fork server exited before it forked")
            child = _ForkedChild(pid, status_r, [sys.executable, "-m", __name__, request["target"]])
            status_r = -1  # the child's now
            ready = _read_all(ready_r)
        finally:
            os.close(ready_r)
            if status_r >= 0:
                os.close(status_r)
        if ready != _READY:  # it has exited (status 1): reap it, raise what it sent
            raise _setup_error(ready, pid, child.wait())
        return child

    def _popen(self, request: dict[str, Any]) -> Child:
        args = [sys.executable, "-m", __name__, request["target"]]
        group: dict[str, Any] = (
            {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
        )
        mode = "ab" if request["append"] else "wb"
        with open(request["log"], mode, opener=lambda p, f: os.open(p, f, _LOG_MODE)) as out:
            popen = subprocess.Popen(
                args, env=request["env"], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, **group,
            )  # fmt: skip
        return _PopenChild(popen, args)


def _setup_error(ready: bytes, pid: int, status: int) -> BaseException:
    """What a child that could not set itself up sent (its exception), as an exception."""
    with contextlib.suppress(Exception):
        exc = pickle.loads(ready)
        if isinstance(exc, BaseException):
            return exc
    return ChildProcessError(f"the child {pid} died while it set itself up (status {status})")


_shared: Spawner | None = None


def shared() -> Spawner:
    """This process's spawner, created on the first call and closed at exit: ``easgd
    train`` warms it, and the launcher starts every process of the run from it."""
    global _shared
    if _shared is None:
        _shared = Spawner()
        atexit.register(_shared.close)
    return _shared


# ------------------------------------------------------------------------------------------
# Pipes
# ------------------------------------------------------------------------------------------


def _readable(fd: int, timeout: float | None) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    ms = -1 if timeout is None else max(0, int(timeout * 1000 + 0.999))
    return bool(poller.poll(ms))


def _read_code(fd: int) -> int | None:
    """One signed number from ``fd``, or None at end of file."""
    data = b""
    while len(data) < _CODE.size:
        chunk = os.read(fd, _CODE.size - len(data))
        if not chunk:
            return None
        data += chunk
    return int(_CODE.unpack(data)[0])


def _write_code(fd: int, n: int) -> None:
    with contextlib.suppress(BrokenPipeError):  # the launcher forgot the child
        os.write(fd, _CODE.pack(n))


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


# ------------------------------------------------------------------------------------------
# The fork server (a process of its own: ``python -c "... _serve(...)"``)
# ------------------------------------------------------------------------------------------


def _serve(launcher: int, fd: int, preload: list[str]) -> NoReturn:
    """The fork server's loop: preload, then fork a child per request and report its pid and
    (once reaped) its exit status on the pipe that came with the request."""
    _die_with_parent(launcher)
    # The launcher's group gets a terminal's Ctrl-C, or a kill -TERM of the group: the
    # launcher stops the children (servers checkpoint on SIGTERM); this server must not die.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    failed = _preload(preload)
    threads = _torch_threads()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()  # its first call costs 10 ms: pay it here, not in every child
    # What is here now lives as long as the server: out of the collector's way, so that
    # neither it nor its children copy the pages of these objects to scan them.
    gc.freeze()
    sock.send(pickle.dumps(failed))
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wake-up pipe hears it
    children: dict[int, int] = {}  # pid -> its status pipe
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        ready = {fd for fd, _ in poller.poll()}
        if wake_r in ready:
            while _drain(wake_r):
                pass
            _reap(children)
        if sock.fileno() in ready:
            try:
                data, fds, _, _ = socket.recv_fds(sock, _MAX_REQUEST, 2)
            except ConnectionError:  # closed with our first message unread: reset
                data, fds = b"", []
            if not data:
                break  # the launcher closed the socket, or died
            status_w, ready_w = fds
            inherited = [sock.fileno(), wake_r, wake_w, status_w, *children.values()]
            pid = _fork(pickle.loads(data), ready_w, inherited, threads)
            os.close(ready_w)
            with contextlib.suppress(OSError):  # the child does it too; whoever is first
                os.setpgid(pid, pid)
            _write_code(status_w, pid)
            children[pid] = status_w
    for pid in children:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
    os._exit(0)


def _drain(fd: int) -> bool:
    try:
        return bool(os.read(fd, 4096))
    except BlockingIOError:
        return False


def _reap(children: dict[int, int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = children.pop(pid, None)
        if fd is not None:
            _write_code(fd, os.waitstatus_to_exitcode(status))
            os.close(fd)


def _preload(modules: Sequence[str]) -> list[str]:
    """Import ``modules``; ``"module: error"`` for each that failed."""
    failed = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        failed.append("torch.cuda: initialized by the preload; a forked child cannot use it")
    return failed


def _fork_unsafe() -> str | None:
    """Why this process must not fork the fork server (None: it may)."""
    if threading.active_count() > 1:
        return f"{threading.active_count() - 1} Python thread(s) besides this one"
    torch = sys.modules.get("torch")
    if torch is not None and (torch.version.cuda or getattr(torch.version, "hip", None)):
        return "torch is built for a GPU"
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return "a process group exists"
    return None


def _torch_threads() -> int:
    """torch's default intra-op threads here (0: torch not imported)."""
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else 0


def _fork(request: dict[str, Any], ready_w: int, inherited: list[int], threads: int) -> int:
    """Fork a child for ``request``; its pid (the child never returns from here)."""
    server = os.getpid()
    _flush()
    with warnings.catch_warnings():
        # Python 3.12 warns about forking a process with threads (here OpenBLAS's idle pool,
        # which shuts itself down around fork): nothing in the child relies on them.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid:
        return pid
    try:
        os.setpgid(0, 0)  # first: from here a Ctrl-C to the launcher's group cannot reach it
        _die_with_parent(server)
        for fd in inherited:
            os.close(fd)
        signal.set_wakeup_fd(-1)
        _setup(request, threads)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            os.write(ready_w, pickle.dumps(exc))
        os._exit(1)
    os.write(ready_w, _READY)
    os.close(ready_w)
    _run(request["target"])


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies (Linux), or now if ``parent`` is gone."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # it died before the prctl: nobody would send the signal
        os.kill(os.getpid(), signal.SIGKILL)


def _setup(request: dict[str, Any], threads: int) -> None:
    """Make this forked process look like a fresh interpreter started with ``request``."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    env: dict[str, str] = request["env"]
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if request["append"] else os.O_TRUNC)
    out = os.open(request["log"], flags, _LOG_MODE)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    _line_buffered_stdio()
    os.environ.clear()
    os.environ.update(env)
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    sys.path[1:1] = extra
    sys.argv = [request["target"]]
    os.chdir(request["cwd"])
    torch = sys.modules.get("torch")
    if torch is not None:
        # OpenMP read OMP_NUM_THREADS when the server imported torch: apply the child's own.
        wanted = env.get("OMP_NUM_THREADS", "").split(",")[0].strip()
        torch.set_num_threads(int(wanted) if wanted.isdigit() and int(wanted) > 0 else threads)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()  # a fresh process seeds its legacy global RNG from the OS


def _line_buffered_stdio() -> None:
    for name, fd, errors in (("stdout", 1, "strict"), ("stderr", 2, "backslashreplace")):
        stream = io.TextIOWrapper(
            io.FileIO(fd, "w", closefd=False), encoding="utf-8", errors=errors,
            line_buffering=True,
        )  # fmt: skip
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _resolve(target: str) -> Callable[[], Any]:
    module, _, function = target.partition(":")
    fn: Callable[[], Any] = getattr(importlib.import_module(module), function)
    return fn


def _exit_status(value: Any) -> int:
    """The exit status ``sys.exit(value)`` gives: None 0, an int itself, else 1 (printed)."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1


def _run(target: str) -> NoReturn:
    """Call ``target`` and end the process with its exit status (without teardown)."""
    code = 1
    try:
        code = _exit_status(_resolve(target)())
    except SystemExit as exc:
        code = _exit_status(exc.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        _flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)  # as an interpreter ends on an uncaught Ctrl-C
    except BaseException:
        traceback.print_exc()
    _flush()
    os._exit(code)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


if __name__ == "__main__":
    # The subprocess mode's child: ``python -m easgd.spawner module:function``.
    _line_buffered_stdio()
    _run(sys.argv[1])
