"""What every role of a run shares: its place in the run, the store, devices and secrets."""

from __future__ import annotations

import datetime
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import torch

from easgd.comm.wire import SECRET_ENV, resolve_secret
from easgd.runlog import RunPaths

__all__ = [
    "PARENT_ENV",
    "RESUME_ENV",
    "SECRET_ENV",
    "RoleContext",
    "advertised_host",
    "publish_server",
    "resolve_device",
    "secret",
    "server_addresses",
]

#: Set (to 1) by ``easgd train --resume`` (and a torchrun restart attempt): every role
#: continues from its checkpoint.
RESUME_ENV = "EASGD_RESUME"
#: The pid of the process that started a child role (the evaluator stops when it is gone).
PARENT_ENV = "EASGD_PARENT_PID"


@dataclass
class RoleContext:
    """Where a process stands in the run: its rank, the shared store, the run directory."""

    rank: int
    world_size: int
    local_rank: int
    store: Any  # torch.distributed.Store
    paths: RunPaths
    start: float  # time.time() at the start of the run, shared by every process

    def wall(self) -> float:
        """Seconds since the start of the run (the ``wall`` of every event)."""
        return time.time() - self.start


def resolve_device(device: str, local_rank: int) -> torch.device:
    """``auto`` is CUDA when there is one; ``cuda`` is this process's GPU by local rank."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device(device)


def secret() -> bytes | None:
    """The run's shared secret (``EASGD_SECRET``), if any.

    Set, it is every role's: the servers authenticate every connection with it, on loopback
    too, and the workers and the evaluator prove it. The local launcher sets a fresh one per
    run when the user gives none. It is read from the environment only, and never logged or
    written to a file.
    """
    return resolve_secret(None)


def publish_server(store: Any, shard: int, host: str, port: int) -> None:
    """Tell the workers where shard ``shard`` listens."""
    store.set(f"easgd/server/{shard}", f"{advertised_host(host)}:{port}")


def server_addresses(store: Any, servers: int, timeout: float) -> list[tuple[str, int]]:
    """Wait (up to ``timeout`` seconds) for every server to publish its address."""
    keys = [f"easgd/server/{s}" for s in range(servers)]
    try:
        store.wait(keys, datetime.timedelta(seconds=timeout))
    except RuntimeError as exc:
        raise ConnectionError(
            f"no parameter server published its address within {timeout:g} s ({exc}); "
            "is the server process running?"
        ) from None
    out = []
    for key in keys:
        host, port = store.get(key).decode().rsplit(":", 1)
        out.append((host, int(port)))
    return out


def advertised_host(host: str) -> str:
    """The address workers should dial: a wildcard bind is reached through this host's name."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    return os.environ.get("EASGD_ADVERTISE_HOST") or socket.gethostbyname(socket.gethostname())
