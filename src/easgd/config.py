"""The configuration of a training run: what ``easgd train`` runs, written as ``config.json``.

The hyperparameters map one for one onto :class:`easgd.algorithms.Hyperparams`; the rest
says where, on what and for how long. Every role of a run (worker, server, evaluator, the
launcher) reads the same :class:`TrainConfig`.

An invalid value raises :class:`ConfigError` (a ``ValueError``) whose message starts with
``field=value`` (e.g. ``batch_size=0 must be >= 1``), the library's spelling; the command
line shows it with flags instead (``--batch-size 0 must be >= 1``): :meth:`ConfigError.cli`,
or :func:`flag_message` on any message in that form (Hyperparams' included).

``config.json`` (:meth:`TrainConfig.to_dict`) records the values the run actually uses
(:meth:`TrainConfig.resolved`): the derived momentum, beta, alpha and moving rate of the
method, and the data set's default network, rather than ``null``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from easgd.algorithms import METHODS, Hyperparams, Mode, StabilityWarning

__all__ = [
    "BUDGET_FIELDS",
    "EXPERIMENT_FIELDS",
    "FLAGS",
    "MODES",
    "RESOLVED_FIELDS",
    "ConfigError",
    "TrainConfig",
    "flag_message",
]

MODES = ("auto", "sync", "async")
#: The fields that make the experiment: a resumed run (``easgd train --resume``) keeps them.
EXPERIMENT_FIELDS = (
    "method", "mode", "workers", "group_size", "servers", "tau", "lr", "momentum", "beta", "alpha",
    "weight_decay", "lr_decay", "lr_power", "moving_rate", "outer_lr", "outer_momentum", "inner",
    "batch_size", "dataset", "model",
    "seed", "init_seed",
)  # fmt: skip
#: The budget: a resumed run may raise it (the steps already done count).
BUDGET_FIELDS = ("epochs", "time_budget", "steps")
#: The fields that None means "derived" for, filled by :meth:`TrainConfig.resolved`.
RESOLVED_FIELDS = ("momentum", "beta", "alpha", "moving_rate", "model")
#: The hyperparameters of those, and DiLoCo's outer ones (also derived when None).
_DERIVED_HYPERPARAMS = (*RESOLVED_FIELDS[:4], "outer_lr", "outer_momentum", "inner")
#: Fields whose ``easgd train`` flag is not ``--`` and the name with dashes (see FLAGS).
_OTHER_FLAGS = {"checkpoint_steps": "--checkpoint-every-steps"}
# ``name=value`` with a literal value: a number, None, True/False or a quoted string (so that
# prose such as ``alpha=beta/p`` is left alone).
_ASSIGNMENT = re.compile(
    r"(?<![\w.-])(?P<name>[a-z_]+)="
    r"(?P<value>'[^']*'|\"[^\"]*\"|None|True|False|-?(?:inf|nan|\d+(?:\.\d*)?(?:e[+-]?\d+)?))"
    r"(?![\w.])"
)


def flag_message(message: str) -> str:
    """``message`` with every ``field=value`` of a known field written as ``--flag value``.

    ``"batch_size=0 must be >= 1"`` -> ``"--batch-size 0 must be >= 1"``;
    ``"workers=3 with method='msgd'"`` -> ``"--workers 3 with --method msgd"``. Other
    text (``alpha=beta/p``, unknown names) is left as it is.
    """

    def flag(match: re.Match[str]) -> str:
        name, value = match["name"], match["value"]
        if name not in FLAGS:
            return match[0]
        if value[:1] in ("'", '"'):
            value = value[1:-1]
        return f"{FLAGS[name]} {value}"

    return _ASSIGNMENT.sub(flag, message)


class ConfigError(ValueError):
    """An invalid :class:`TrainConfig` field: ``field``, its ``value``, and why.

    ``str()`` is the library's message (``batch_size=0 must be >= 1``); :attr:`flag` and
    :meth:`cli` are the command line's (``--batch-size``, ``--batch-size 0 must be >= 1``).
    Errors of :class:`~easgd.algorithms.Hyperparams` reach callers of TrainConfig as this
    class too, with the field they name.
    """

    def __init__(self, field: str, value: Any, message: str) -> None:
        super().__init__(message)
        self.field, self.value = field, value

    @property
    def flag(self) -> str:
        return FLAGS.get(self.field, "--" + self.field.replace("_", "-"))

    def cli(self) -> str:
        """The message with flags for fields (see :func:`flag_message`)."""
        return flag_message(str(self))


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
    #: DiLoCo's outer Nesterov SGD (None: the DiLoCo paper's 0.7 and 0.9).
    outer_lr: float | None = None
    outer_momentum: float | None = None
    #: DiLoCo's inner optimizer: "sgd" (None: the method's SGD step, --momentum Nesterov) or
    #: "adamw" (--weight-decay is then AdamW's decoupled decay).
    inner: str | None = None
    batch_size: int = 32
    epochs: float | None = None
    time_budget: float | None = None
    steps: int | None = None
    dataset: str = "digits"
    #: ``dataset`` and ``model`` may also be your own: ``MODULE:FUNCTION`` (or, for the data,
    #: ``npz:PATH``), a relative path made absolute here (:mod:`easgd.data.custom`).
    model: str | None = None
    data_dir: str | None = None
    #: Use the built-in sets' files present whose MD5 differs from the published one, with a
    #: warning naming each (``--no-verify``); False: refused.
    no_verify: bool = False
    device: str = "cpu"
    #: Where the evaluator and the final evaluation run the center (``cpu``, ``cuda``,
    #: ``cuda:N``, ``auto``): a GPU makes an ImageNet evaluation minutes instead of an hour,
    #: at the cost of sharing that GPU with a worker while training.
    eval_device: str = "cpu"
    seed: int = 0
    #: The seed of the initial network (center and every worker); None: ``seed``, so that a
    #: run without one (an older ``config.json``, ``--resume``) starts as it always did.
    #: ``seed`` alone then changes the data order (worker i: ``seed + i``) and dropout, not
    #: the initial weights (``easgd experiment --same-init``: the paper's runs from one init).
    init_seed: int | None = None
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
    #: TLS for the parameter server (PEM files): the servers' certificate chain and key, and
    #: the CA the workers and the evaluator verify it with (None: the system's CAs). Both
    #: cert and key, or neither.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    #: A folder for TensorBoard events of the run (the launcher writes them from
    #: metrics.jsonl and eval.jsonl: easgd.runlog.tensorboard), or None: none.
    tensorboard: str | None = None
    #: Compressed exchanges (``none``, ``bf16``, ``int8``; synchronous EASGD/EAMSGD), with
    #: error feedback: easgd.compress, easgd.algorithms.CompressedSum.
    compress: str = "none"
    #: Workers per group (a node): a group averages its gradients every step (all-reduce, as
    #: DDP does) and exchanges elastically with the center as one worker, so the elastic
    #: methods see ``workers // group_size`` workers (easgd.roles.group).
    group_size: int = 1
    #: Overlapped asynchronous elastic exchanges (easgd, eamsgd in mode async): each reply
    #: is applied this many local steps after its exchange, while the worker computes
    #: (``easgd.algorithms.Worker(overlap=)``; 1 is the paper's update exactly); 0: blocking.
    overlap: int = 0

    def __post_init__(self) -> None:
        for name in ("dataset", "model"):
            value = getattr(self, name)
            if isinstance(value, str) and ":" in value:  # your own: MODULE:FUNCTION, npz:PATH
                from easgd.data.custom import SpecError, absolute_spec

                try:  # a relative path made absolute: the same file for every role
                    object.__setattr__(self, name, absolute_spec(value, FLAGS[name]))
                except SpecError as exc:
                    raise ConfigError(name, value, str(exc)) from None
        if self.tensorboard is not None:  # a resumed run finds it from any folder
            object.__setattr__(self, "tensorboard", os.path.abspath(self.tensorboard))
        if self.mode not in MODES:
            raise ConfigError(
                "mode", self.mode, f"mode={self.mode!r}; choose one of {', '.join(MODES)}"
            )
        self._check_group_size()
        try:
            self.hyperparams()  # validates the hyperparameters
            self.resolved_mode()  # and the mode
        except ConfigError:
            raise
        except ValueError as exc:  # Hyperparams' messages start with the field they refuse
            match = re.match(r"([a-z_]+)=", str(exc))
            name = match[1] if match and match[1] in FLAGS else "method"
            if name in ("alpha", "beta") and getattr(self, name) is None:
                name = "beta" if name == "alpha" else "alpha"  # derived from the one given
            raise ConfigError(name, getattr(self, name), str(exc)) from None
        if self.servers < 1:
            raise ConfigError("servers", self.servers, f"servers={self.servers!r} must be >= 1")
        self._check_compress()
        self._check_overlap()
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int):
            raise ConfigError(
                "batch_size", self.batch_size,
                f"batch_size={self.batch_size!r} must be an integer >= 1",
            )  # fmt: skip
        if self.batch_size < 1:
            raise ConfigError(
                "batch_size", self.batch_size, f"batch_size={self.batch_size!r} must be >= 1"
            )
        budgets = {n: getattr(self, n) for n in BUDGET_FIELDS if getattr(self, n) is not None}
        if not budgets:
            raise ConfigError(
                "epochs", None, "no budget: give epochs, time_budget (seconds) or steps"
            )
        for name, b in budgets.items():
            if isinstance(b, bool) or not (
                isinstance(b, int | float) and b > 0 and math.isfinite(b)
            ):
                raise ConfigError(
                    name, b, f"{name}={b!r}: every budget given must be a positive number"
                )
        if self.steps is not None and not isinstance(self.steps, int):
            raise ConfigError(
                "steps", self.steps, f"steps={self.steps!r} must be an integer (local steps)"
            )
        for name in ("eval_interval", "checkpoint_interval", "timeout"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0):
                raise ConfigError(name, value, f"{name}={value!r} must be > 0 seconds")
        if self.checkpoint_steps is not None and not (
            isinstance(self.checkpoint_steps, int)
            and not isinstance(self.checkpoint_steps, bool)
            and self.checkpoint_steps >= 1
        ):
            raise ConfigError(
                "checkpoint_steps", self.checkpoint_steps,
                f"checkpoint_steps={self.checkpoint_steps!r} must be an integer >= 1 (or None: "
                "derived from checkpoint_interval)",
            )  # fmt: skip
        if (self.tls_cert is None) != (self.tls_key is None):
            given = "tls_cert" if self.tls_cert is not None else "tls_key"
            raise ConfigError(
                given, getattr(self, given),
                f"{given}={getattr(self, given)!r} without "
                f"{'tls_key' if given == 'tls_cert' else 'tls_cert'}: a TLS server needs both "
                "its certificate and its key",
            )  # fmt: skip
        if self.max_restarts < 0:
            raise ConfigError(
                "max_restarts", self.max_restarts,
                f"max_restarts={self.max_restarts!r} must be >= 0",
            )  # fmt: skip
        for name in ("device", "eval_device"):
            value = getattr(self, name)
            if value not in ("cpu", "cuda", "auto") and not str(value).startswith("cuda:"):
                raise ConfigError(
                    name, value, f"{name}={value!r}; choose cpu, cuda, cuda:N or auto"
                )

    def client_tls(self) -> Any:
        """The workers' and evaluator's TLS context for the servers (None: no TLS)."""
        if self.tls_cert is None:
            return None
        from easgd.comm.wire import client_tls_context

        return client_tls_context(self.tls_ca)

    def server_tls(self) -> Any:
        """A server shard's TLS context (None: no TLS)."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        from easgd.comm.wire import server_tls_context

        return server_tls_context(self.tls_cert, self.tls_key)

    def _check_compress(self) -> None:
        from easgd.compress import CODECS

        if self.compress not in CODECS:
            raise ConfigError(
                "compress", self.compress,
                f"compress={self.compress!r}; choose one of {', '.join(CODECS)}",
            )  # fmt: skip
        if self.compress == "none":
            return
        from easgd.algorithms import check_compress

        try:
            check_compress(self.hyperparams(), self.compress)
        except ValueError as exc:
            raise ConfigError("compress", self.compress, flag_message(str(exc))) from None

    def _check_overlap(self) -> None:
        from easgd.algorithms import check_overlap

        try:
            check_overlap(self.hyperparams(), self.resolved_mode(), self.overlap)
        except ValueError as exc:
            raise ConfigError("overlap", self.overlap, str(exc)) from None

    def hyperparams(self) -> Hyperparams:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(Hyperparams)}
        fields["workers"] = self.groups  # a group exchanges as one worker: p = groups
        return Hyperparams(**{k: v for k, v in fields.items() if v is not None})

    @property
    def groups(self) -> int:
        """The workers the center sees: groups of ``group_size`` workers (``workers`` when 1)."""
        return self.workers // self.group_size

    def _check_group_size(self) -> None:
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ConfigError("group_size", g, f"group_size={g!r} must be an integer >= 1")
        if g == 1:
            return
        if isinstance(self.workers, int) and self.workers % g:
            raise ConfigError(
                "group_size", g,
                f"workers={self.workers} is not a multiple of group_size={g}: the workers form "
                f"groups of {g} consecutive ranks; give a multiple of {g} workers",
            )  # fmt: skip
        spec = METHODS.get(self.method)
        if spec is not None and not spec.elastic:
            raise ConfigError(
                "group_size", g,
                f"group_size={g} with method={self.method!r}: {self.method} has no elastic "
                "exchange; groups average gradients inside and exchange elastically with "
                "the center: use --method easgd or eamsgd",
            )  # fmt: skip
        if self.max_restarts and spec is not None and self.resolved_mode() is Mode.ASYNC:
            raise ConfigError(
                "group_size", g,
                f"group_size={g} with max_restarts={self.max_restarts} in mode async: a group "
                "cannot take back a restarted worker; use --max-restarts 0 or --mode sync",
            )  # fmt: skip

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

    def resolved(self) -> TrainConfig:
        """This configuration with the values the run derives written out.

        ``momentum``, ``beta``, ``alpha``, ``moving_rate`` (and DiLoCo's outer ones) as
        :class:`~easgd.algorithms.Hyperparams` resolves them (the method's default momentum,
        ``beta=0.9``, ``alpha=beta/p``, ...), for the hyperparameters the method uses (the
        others stay None, as Hyperparams refuses them); ``model``: the data set's default
        network (:data:`easgd.task.DEFAULT_MODELS`) when none is named and the data set is
        known; ``init_seed``: ``seed`` when none is given. The same run:
        ``resolved().hyperparams() == hyperparams()``; idempotent.
        """
        with warnings.catch_warnings():  # warned once already, when self was made
            warnings.simplefilter("ignore", StabilityWarning)
            hp = self.hyperparams().to_dict()
            changes: dict[str, Any] = {name: hp[name] for name in _DERIVED_HYPERPARAMS}
            if self.model is None:
                changes["model"] = _default_model(self.dataset)
            if self.init_seed is None:
                changes["init_seed"] = self.seed
            if all(getattr(self, k) == v for k, v in changes.items()):
                return self
            return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields of :meth:`resolved`, as ``config.json`` records them.

        ``TrainConfig.from_dict(cfg.to_dict())`` is ``cfg.resolved()``: the same
        hyperparameters, model and everything else.
        """
        return dataclasses.asdict(self.resolved())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


#: The ``easgd train`` flag of every field: ``--batch-size``, ``--checkpoint-every-steps``, ...
FLAGS: Mapping[str, str] = MappingProxyType(
    {
        f.name: _OTHER_FLAGS.get(f.name, "--" + f.name.replace("_", "-"))
        for f in dataclasses.fields(TrainConfig)
    }
)


def _default_model(dataset: str) -> str | None:
    """The network :func:`easgd.task.build_task` trains on ``dataset`` (None: unknown set)."""
    from easgd.data.custom import is_custom
    from easgd.data.datasets import dataset_info
    from easgd.task import DEFAULT_MODELS

    if is_custom(dataset):
        return "mlp"  # your own data: the network that takes any shape (easgd.task)
    try:
        name = dataset_info(dataset).name
    except ValueError:
        return None
    return DEFAULT_MODELS.get(name, "mlp")
