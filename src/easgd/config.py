"""The configuration of a training run: what ``easgd train`` runs, written as ``config.json``.

The hyperparameters map one for one onto :class:`easgd.algorithms.Hyperparams`; the rest
says where, on what and for how long. Every role of a run (worker, server, evaluator, the
launcher) reads the same :class:`TrainConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from easgd.algorithms import METHODS, Hyperparams, Mode

__all__ = ["BUDGET_FIELDS", "EXPERIMENT_FIELDS", "MODES", "TrainConfig"]

MODES = ("auto", "sync", "async")
#: The fields that make the experiment: a resumed run (``easgd train --resume``) keeps them.
EXPERIMENT_FIELDS = (
    "method", "mode", "workers", "servers", "tau", "lr", "momentum", "beta", "alpha",
    "weight_decay", "lr_decay", "lr_power", "moving_rate", "batch_size", "dataset", "model",
    "seed",
)  # fmt: skip
#: The budget: a resumed run may raise it (the steps already done count).
BUDGET_FIELDS = ("epochs", "time_budget", "steps")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs, validated; written as ``config.json`` in the run directory.

    The hyperparameters map one for one onto :class:`easgd.algorithms.Hyperparams`; the
    rest says where, on what and for how long. ``mode="auto"`` runs the elastic methods
    asynchronously through the parameter server (the paper's setting), the DOWNPOUR family
    asynchronously, all-reduce and local SGD synchronously, and the sequential methods alone.
    """

    method: str = "eamsgd"
    mode: str = "auto"
    workers: int = 4
    servers: int = 1
    tau: int = 10
    lr: float = 0.005
    momentum: float | None = None
    beta: float | None = None
    alpha: float | None = None
    weight_decay: float = 1e-4
    lr_decay: float = 0.0
    lr_power: float = 0.0
    moving_rate: float | None = None
    batch_size: int = 32
    epochs: float | None = None
    time_budget: float | None = None
    steps: int | None = None
    dataset: str = "digits"
    model: str | None = None
    data_dir: str | None = None
    device: str = "cpu"
    seed: int = 0
    out: str = "runs/latest"
    eval_interval: float = 1.0
    #: Only snapshot the center during training and evaluate the snapshots at the end, so
    #: evaluation takes no CPU from the workers (machines with fewer cores than processes).
    eval_deferred: bool = False
    checkpoint_interval: float = 5.0
    #: Every worker saves its own state (``checkpoints/worker-<i>.pt``) every this many local
    #: steps, at the same steps on every rank (synchronous runs: rounded up to a multiple of
    #: tau). None: the steps that take about ``checkpoint_interval`` seconds, measured over
    #: the first steps (worker 0's measure, shared by every rank).
    checkpoint_steps: int | None = None
    timeout: float = 60.0
    host: str = "127.0.0.1"
    max_restarts: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}; choose one of {', '.join(MODES)}")
        self.hyperparams()  # validates the hyperparameters
        self.resolved_mode()  # and the mode
        if self.servers < 1:
            raise ValueError(f"servers={self.servers!r} must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r} must be >= 1")
        budgets = [b for b in (self.epochs, self.time_budget, self.steps) if b is not None]
        if not budgets:
            raise ValueError("no budget: give epochs, time_budget (seconds) or steps")
        if any(not (isinstance(b, int | float) and b > 0 and math.isfinite(b)) for b in budgets):
            raise ValueError(
                f"epochs={self.epochs!r}, time_budget={self.time_budget!r}, steps={self.steps!r}:"
                " every budget given must be a positive number"
            )
        for name in ("eval_interval", "checkpoint_interval", "timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0 seconds")
        if self.checkpoint_steps is not None and not (
            isinstance(self.checkpoint_steps, int) and self.checkpoint_steps >= 1
        ):
            raise ValueError(
                f"checkpoint_steps={self.checkpoint_steps!r} must be an integer >= 1 (or None: "
                "derived from checkpoint_interval)"
            )
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts={self.max_restarts!r} must be >= 0")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise ValueError(f"device={self.device!r}; choose cpu, cuda, cuda:N or auto")

    def hyperparams(self) -> Hyperparams:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(Hyperparams)}
        return Hyperparams(**{k: v for k, v in fields.items() if v is not None})

    def resolved_mode(self) -> Mode:
        return METHODS[self.method].resolve_mode(self.mode)

    @property
    def servers_used(self) -> int:
        """Parameter-server processes the run starts (0 unless the mode is asynchronous)."""
        return self.servers if self.resolved_mode() is Mode.ASYNC else 0

    def world_size(self) -> int:
        """Ranks of the run: servers first (asynchronous mode), then workers."""
        return self.workers + self.servers_used

    def role_of(self, rank: int) -> tuple[str, int]:
        """``("server", shard)`` or ``("worker", index)`` for a global rank."""
        servers = self.servers_used
        if rank < servers:
            return "server", rank
        return "worker", rank - servers

    def steps_per_worker(self, train_size: int) -> int | None:
        """The local-step budget of each worker (None: only the time budget limits it)."""
        if self.steps is not None:
            return int(self.steps)
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * train_size / self.batch_size))
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)
