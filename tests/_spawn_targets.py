"""What the children of ``tests/test_spawner.py`` run (``target="_spawn_targets:<name>"``).

A module of its own (not easgd's) that every child imports by name: the fork server and the
subprocess children find it through ``PYTHONPATH`` (tests/). ``launcher`` and ``gloo_launcher``
are the main functions of stand-in launchers that the tests run as fresh interpreters, so
that they can kill a launcher outright or fork a fork server from a clean process.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

#: Where a child reports to the test: a FIFO (``fork_grandchild``) or a pipe's fd (launchers).
REPORT_ENV = "EASGD_TEST_REPORT"


def exit_0() -> int:
    print("exit 0")
    return 0


def exit_3() -> int:
    return 3


def raises() -> int:
    raise RuntimeError("raised on purpose")


def block() -> NoReturn:
    """Wait for a signal forever (SIGTERM and SIGKILL end it)."""
    while True:
        signal.pause()


def report() -> int:
    """Print what the child sees of itself: environment (Python's and C's), ids, stdin."""
    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_char_p
    print(json.dumps({
        "environ": dict(os.environ),
        "c_getenv": {k: (libc.getenv(k.encode()) or b"").decode()
                     for k in ("EASGD_TEST_CHILD", "EASGD_TEST_PARENT")},
        "pid": os.getpid(), "pgid": os.getpgid(0), "ppid": os.getppid(),
        "stdin": sys.stdin.read(), "stdin_is_null": os.path.samestat(
            os.fstat(0), os.stat(os.devnull)),
        "sigint_default": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
        "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
        "cwd": os.getcwd(),
    }))  # fmt: skip
    return 0


def write_streams() -> int:
    print("to sys.stdout")
    print("to sys.stderr", file=sys.stderr)
    os.write(1, b"to fd 1\n")
    os.write(2, b"to fd 2\n")
    return 0


def fork_grandchild() -> NoReturn:
    """Fork a grandchild that waits forever, report its pid on the FIFO, wait forever."""
    pid = os.fork()
    if pid == 0:
        block()
    with open(os.environ[REPORT_ENV], "w") as fifo:
        fifo.write(f"{pid}\n")
    block()


def threads_and_gloo() -> int:
    """torch's threads follow OMP_NUM_THREADS; a parallel op and a gloo all-reduce work."""
    import datetime

    import torch
    import torch.distributed as dist

    threads = torch.get_num_threads()
    a = torch.arange(256 * 256, dtype=torch.float64).reshape(256, 256) / 65536
    # A matrix product (MKL) and an element-wise op over 2**19 numbers (an OpenMP loop):
    # both big enough to run on every intra-op thread.
    corners = (a @ a)[[0, 0, 255, 255], [0, 255, 0, 255]].tolist()
    expected = [sum(a[i, k].item() * a[k, j].item() for k in range(256))
                for i, j in ((0, 0), (0, 255), (255, 0), (255, 255))]  # fmt: skip
    doubled = (a.repeat(8, 1) * 2).sum().item()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False, timeout=datetime.timedelta(seconds=60))  # fmt: skip
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    x = torch.tensor([float(rank)])
    dist.all_reduce(x)
    dist.destroy_process_group()
    print(json.dumps({"threads": threads, "corners": corners, "expected": expected,
                      "doubled": doubled, "doubled_expected": 16 * a.sum().item(),
                      "sum": x.item()}))  # fmt: skip
    return 0


def _report_fd() -> int:
    return int(os.environ[REPORT_ENV])


def launcher() -> NoReturn:
    """A stand-in launcher: start a ``block`` child, report ``server child`` pids, wait.

    argv: ``fork`` or ``exec`` (how its fork server starts).
    """
    from easgd.spawner import Spawner

    spawner = Spawner("forkserver", preload=("_spawn_targets",))
    spawner.warm(fork=sys.argv[1] == "fork")
    log = Path(os.environ["EASGD_TEST_LOG"])
    env = {"PYTHONPATH": os.environ["PYTHONPATH"]}
    child = spawner.start(env, log, target="_spawn_targets:block")
    os.write(_report_fd(), f"{spawner.parent_pid} {child.pid}\n".encode())
    block()


def gloo_launcher() -> int:
    """A stand-in launcher that has imported torch: fork its fork server (``warm(fork=True)``),
    host a TCPStore, start two ``threads_and_gloo`` children; report their status and logs."""
    import datetime

    import torch.distributed as dist

    from easgd.spawner import Spawner

    spawner = Spawner("forkserver", preload=("torch", "torch.distributed", "_spawn_targets"))
    spawner.warm(fork=True)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))  # fmt: skip
    logs = [Path(os.environ["EASGD_TEST_LOG"] + f".{rank}") for rank in range(2)]

    def env(rank: int) -> dict[str, str]:
        return {"PYTHONPATH": os.environ["PYTHONPATH"], "OMP_NUM_THREADS": "2",
                "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(store.port)}  # fmt: skip

    children = [spawner.start(env(r), logs[r], target="_spawn_targets:threads_and_gloo")
                for r in range(2)]  # fmt: skip
    # A copy of this process (an interpreter started for it would have its own command line).
    forked = Path(f"/proc/{spawner.parent_pid}/cmdline").read_bytes() == Path(
        "/proc/self/cmdline").read_bytes()  # fmt: skip
    codes = [c.wait(120) for c in children]
    spawner.close()
    report = {"codes": codes, "logs": [p.read_text() for p in logs], "forked": forked}
    os.write(_report_fd(), (json.dumps(report) + "\n").encode())
    return 0
