"""The evaluator role: the center's test error against wall time, never slowing training.

It lives in its own process. Where the result lives on the parameter servers (asynchronous
runs) it pulls it every ``eval_interval`` seconds and saves it as a timestamped snapshot;
otherwise worker 0 writes the snapshots and the evaluator reads them. Either way each
snapshot's test loss and error go to ``eval.jsonl`` against the wall time at which the
snapshot was taken, as in the paper's figures. With ``eval_deferred`` it only snapshots, and
:func:`easgd.finalize.finalize` evaluates the snapshots after training.

Snapshots are written and read through :mod:`easgd.runlog.checkpoint` (a digest, verified on
reading, ``weights_only=True``). A snapshot of worker 0's that does not verify is skipped
with a warning; :func:`easgd.finalize.finalize` tries it again and lists it in the summary's
``skipped_files``.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from easgd.config import TrainConfig
from easgd.finalize import CenterEvaluation
from easgd.roles.context import PARENT_ENV, RoleContext, server_addresses
from easgd.runlog import (
    CheckpointError,
    CheckpointKind,
    JsonlWriter,
    eval_line,
    load_checkpoint,
    save_checkpoint,
    snapshot_wall,
)

__all__ = ["run_evaluator"]

log = logging.getLogger(__name__)

#: A snapshot to evaluate: its wall time, its file, and how to read it.
Snapshot = tuple[float, Path, Callable[[], torch.Tensor]]


def run_evaluator(cfg: TrainConfig, ctx: RoleContext, stop: threading.Event) -> None:
    """Evaluate snapshots of the center until ``stop`` is set (or the parent is gone)."""
    torch.set_num_threads(1)
    _stop_with_parent(stop)
    if cfg.eval_deferred and not cfg.servers_used:
        stop.wait()  # worker 0 writes the snapshots; finalize evaluates them
        return
    evaluate = CenterEvaluation(cfg)
    numel = evaluate.flat.numel
    source = _ServerSnapshots(cfg, ctx, numel) if cfg.servers_used else None
    seen: set[str] = set()
    out = JsonlWriter(ctx.paths.eval)
    try:
        while not stop.is_set():
            began = time.monotonic()
            try:
                snapshots = (
                    source() if source is not None else _new_snapshots(cfg, ctx, seen, numel)
                )
            except ConnectionError as exc:
                # A shard is down (restarting under --max-restarts, or the run is ending):
                # no snapshot this time; the next look dials the servers' addresses again.
                log.info("no snapshot: %s", exc)
                assert source is not None
                source.reconnect()
                snapshots = []
            for wall, path, read in [] if cfg.eval_deferred else snapshots:
                try:
                    center = read()
                except CheckpointError as exc:  # finalize tries it again and reports it
                    log.warning("skipping snapshot: %s", exc)
                    continue
                out.write(eval_line(wall, evaluate(center), path))
                if stop.is_set():
                    break
            stop.wait(max(0.05, cfg.eval_interval - (time.monotonic() - began)))
    finally:
        out.close()
        if source is not None:
            source.close()


def _stop_with_parent(stop: threading.Event) -> None:
    """Set ``stop`` when the process that started this one dies.

    The evaluator is the launcher's (or torchrun rank 0's) child; a parent killed outright
    (SIGKILL, or torchrun tearing the rank down) cannot stop it, and an evaluator that keeps
    dialling the servers would outlive the run as an orphan.
    """
    # The spawner's pid, as it said (it may die before this process gets here).
    parent = int(os.environ.get(PARENT_ENV) or os.getppid())

    def watch() -> None:
        while not stop.wait(0.5):
            if os.getppid() != parent:
                log.warning("the evaluator's parent (pid %d) is gone: stopping", parent)
                stop.set()

    threading.Thread(target=watch, name="evaluator-parent", daemon=True).start()


class _ServerSnapshots:
    """Pulls the result from the parameter servers and saves it as a snapshot."""

    def __init__(self, cfg: TrainConfig, ctx: RoleContext, numel: int) -> None:
        from easgd.comm.ps_client import PSClient

        self.ctx, self.cfg, self.numel, self.method = ctx, cfg, numel, cfg.method
        self.buffer = torch.empty(numel)
        self.client: PSClient | None = None
        self.reconnect()

    def reconnect(self) -> None:
        """A new client at the addresses the servers published last (none if none answers)."""
        from easgd.comm.ps_client import PSClient

        if self.client is not None:
            self.client.close(clean=False)
            self.client = None
        try:
            addresses = server_addresses(self.ctx.store, self.cfg.servers, self.cfg.timeout)
            self.client = PSClient(addresses, self.numel, worker_id=-1, timeout=self.cfg.timeout,
                                   connect_timeout=1.0, tls=self.cfg.client_tls())  # fmt: skip
        except ConnectionError as exc:
            log.info("the servers do not answer yet: %s", exc)

    def __call__(self) -> list[Snapshot]:
        if self.client is None:
            raise ConnectionError("no connection to the servers")
        self.client.pull(self.buffer, evaluation=True)
        wall = self.ctx.wall()
        path = self.ctx.paths.snapshot(wall)
        shard_t = [int(t) for t in self.client.server_t]
        save_checkpoint(
            path, CheckpointKind.SNAPSHOT, {"center": self.buffer}, method=self.method,
            t=min(shard_t, default=0), meta={"wall": wall, "shard_t": shard_t},
        )  # fmt: skip
        return [(wall, path, lambda: self.buffer)]

    def close(self) -> None:
        if self.client is not None:  # an evaluator never joined: nothing to say goodbye to
            self.client.close(clean=False)


def _new_snapshots(
    cfg: TrainConfig, ctx: RoleContext, seen: set[str], numel: int
) -> list[Snapshot]:
    """The snapshots worker 0 wrote since the last look, in wall order."""
    new = [p for p in ctx.paths.snapshot_files() if p.name not in seen]
    seen.update(p.name for p in new)
    read = functools.partial(_read_snapshot, method=cfg.method, numel=numel)
    return [(snapshot_wall(p), p, functools.partial(read, p)) for p in new]


def _read_snapshot(path: Path, *, method: str, numel: int) -> torch.Tensor:
    """A verified snapshot's center (NaN allowed: a diverged run's curve is data)."""
    snapshot = load_checkpoint(
        path, CheckpointKind.SNAPSHOT, method=method, numel=numel, allow_nonfinite=True,
        fallback=False,
    )  # fmt: skip
    return snapshot.center
