"""``easgd train``: real distributed training on this machine, or one rank under torchrun."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from easgd.cli._help import HelpFormatter
from easgd.cli._progress import Progress
from easgd.cli._table import format_table
from easgd.cli.simulate import add_hyperparam_args, check_elasticity_args
from easgd.config import BUDGET_FIELDS, EXPERIMENT_FIELDS, MODES, TrainConfig
from easgd.runlog import CONFIG_FILE, RunPaths, steps_per_second

__all__ = ["DEFAULT_EPOCHS", "config_from_args", "register", "resume_config", "run"]

_DEFAULTS = TrainConfig(epochs=1)  # where the flags take their defaults from
#: The budget of a run given none of --epochs, --time-budget and --steps.
DEFAULT_EPOCHS = 60.0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train with real worker processes (the main job)",
        description=(
            "Train a model with P worker processes. Asynchronous methods (the default: EAMSGD) "
            "go through S parameter-server processes; synchronous ones (--mode sync, "
            "allreduce, localsgd, diloco) use one flat all_reduce per exchange. An evaluator "
            "process "
            "measures the center's test error against wall time. Under torchrun, each rank "
            "takes its role from RANK (servers first). With no arguments: digits, 4 workers, "
            "1 server, EAMSGD."
        ),
        formatter_class=HelpFormatter,
    )
    add_hyperparam_args(parser)
    g = parser.add_argument_group("run")
    g.add_argument("--mode", default="auto", choices=MODES,
                   help="auto: asynchronous for the elastic and DOWNPOUR methods (the paper's), "
                        "synchronous for allreduce, localsgd and diloco")  # fmt: skip
    g.add_argument(
        "--servers",
        type=int,
        default=_DEFAULTS.servers,
        help="parameter-server processes; the center is split in contiguous shards",
    )
    g.add_argument(
        "--batch-size", type=int, default=_DEFAULTS.batch_size, help="mini-batch size per worker"
    )
    g.add_argument(
        "--group-size",
        type=_group_size,
        default=_DEFAULTS.group_size,
        metavar="G",
        help="easgd/eamsgd: groups of G consecutive workers average their gradients every "
        "step and exchange elastically with the center as one worker, through the group's "
        "first rank; under torchrun 'node' makes each node a group (LOCAL_WORLD_SIZE)",
    )
    budget = g.add_mutually_exclusive_group()
    budget.add_argument(
        "--epochs",
        type=float,
        default=None,
        help=f"passes over the training set per worker (default: {DEFAULT_EPOCHS:g} when "
        "neither --time-budget nor --steps is given)",
    )
    budget.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="train for this many wall-clock seconds, counted from each worker's first "
        "step (start-up is not counted; the summary reports it as startup_seconds)",
    )
    budget.add_argument(
        "--steps",
        type=int,
        default=None,
        help="local steps per worker (exact, for reproducible comparisons)",
    )
    g.add_argument(
        "--dataset",
        default=_DEFAULTS.dataset,
        help="digits (embedded), mnist, fashion-mnist or cifar10; or your own: MODULE:FUNCTION "
        "(returns the train and test sets) or npz:PATH (x_train, y_train, x_test, y_test); "
        "see docs/own-model-and-data.md",
    )
    g.add_argument("--data-dir", default=None, help="folder holding the dataset's files")
    g.add_argument(
        "--no-verify",
        action="store_true",
        help="use the files of mnist, fashion-mnist or cifar10 found in --data-dir or the "
        "cache even when their MD5 differs from the published one (your own files under "
        "those names); a warning names each such file",
    )
    g.add_argument(
        "--model",
        default=None,
        help="network (see `easgd models`), or your own: MODULE:FUNCTION returning an "
        "nn.Module (MODULE a module name or a .py file); default: the dataset's own",
    )
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    g.add_argument(
        "--eval-device",
        default=_DEFAULTS.eval_device,
        help="where the evaluator runs the center: cpu (default), cuda, cuda:N or auto (a GPU "
        "is shared with a worker while training; with --eval-deferred it is free)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the init (worker i: seed + i)")
    g.add_argument(
        "--out", default=None, help="run directory (default: runs/<method>-<date>-<time>)"
    )
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    g.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="take the run's settings from FILE (TOML or JSON, the fields of config.json: a "
        "run's own config.json reproduces it, with another --out); flags given override it",
    )
    g.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue the run in DIR from its checkpoints, with its own config.json: flags "
        "that change the experiment are refused; --steps, --epochs, --time-budget (the "
        "steps and time done count) and the run settings (--eval-interval, --timeout, ...) "
        "may be given",
    )
    g.add_argument(
        "--eval-interval",
        type=float,
        default=_DEFAULTS.eval_interval,
        help="seconds between evaluations of the center",
    )
    g.add_argument(
        "--compress",
        choices=("none", "bf16", "int8"),
        default=_DEFAULTS.compress,
        help="synchronous easgd/eamsgd: send the elastic differences as bf16 (2x fewer "
        "bytes) or int8 with a scale per 256 values (3.9x fewer), with error feedback",
    )
    g.add_argument(
        "--overlap",
        type=int,
        default=_DEFAULTS.overlap,
        metavar="K",
        help="asynchronous easgd/eamsgd: send each exchange and keep computing; its reply "
        "is applied K local steps later (1..tau; 1 is the paper's update exactly, hiding "
        "the round trip behind one step; K > 1 hides more and pulls K steps late); 0: wait",
    )
    g.add_argument(
        "--eval-deferred",
        action="store_true",
        help="during training only snapshot the center (every --eval-interval s); evaluate "
        "the snapshots at the end, so evaluation takes no CPU from the workers",
    )
    g.add_argument(
        "--checkpoint-interval",
        type=float,
        default=_DEFAULTS.checkpoint_interval,
        help="seconds between checkpoints of the center (and, without "
        "--checkpoint-every-steps, about the seconds between the workers' own checkpoints)",
    )
    g.add_argument(
        "--checkpoint-every-steps",
        dest="checkpoint_steps",
        type=int,
        default=None,
        metavar="N",
        help="every worker saves its own state (checkpoints/worker-<i>.pt, what --resume "
        "continues from) every N local steps, the same steps on every rank (synchronous: "
        "rounded up to a multiple of tau); default: the steps that take --checkpoint-interval "
        "seconds, timed over the first 20",
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=_DEFAULTS.timeout,
        help="seconds before a silent peer counts as dead",
    )
    g.add_argument(
        "--host",
        default=_DEFAULTS.host,
        help="address the servers bind (not loopback: set EASGD_SECRET)",
    )
    g.add_argument("--tls-cert", default=None, metavar="PEM",
                   help="serve the parameter server over TLS with this certificate chain "
                        "(with --tls-key): vectors are encrypted on the network")  # fmt: skip
    g.add_argument("--tls-key", default=None, metavar="PEM", help="the TLS certificate's key")
    g.add_argument("--tls-ca", default=None, metavar="PEM",
                   help="the CA the workers verify the servers' certificate with (default: "
                        "the system's CAs)")  # fmt: skip
    g.add_argument(
        "--tensorboard",
        default=None,
        metavar="DIR",
        help="also write TensorBoard events to DIR: the center's test error and loss, each "
        "worker's training loss, bytes sent and received and exchange seconds, against wall "
        "time (needs pip install 'easgd[tensorboard]'); a resumed run appends to it",
    )
    g.add_argument(
        "--max-restarts",
        type=int,
        default=_DEFAULTS.max_restarts,
        help="restarts of each dead asynchronous worker (before the run goes on without "
        "it) and of each dead server shard (which resumes from its checkpoint; beyond "
        "that the run fails); synchronous runs: restarts of the whole group when a rank "
        "dies, from the ranks' last common checkpoint",
    )
    g.add_argument("--json", action="store_true", help="print the summary as JSON")
    g.add_argument("--quiet", action="store_true", help="no progress display")
    parser.set_defaults(
        func=run, tau=_DEFAULTS.tau, lr=_DEFAULTS.lr, workers=_DEFAULTS.workers,
        weight_decay=_DEFAULTS.weight_decay,
    )  # fmt: skip
    global _FLAG_DEFAULTS
    _FLAG_DEFAULTS = {a.dest: parser.get_default(a.dest) for a in parser._actions}


#: The parser's default of every flag (filled by register): a flag whose value differs from
#: its default was given on the command line.
_FLAG_DEFAULTS: dict[str, Any] = {}
#: What a resumed run may change without changing its experiment (besides its budget).
_RUN_SETTINGS = ("data_dir", "device", "eval_device", "eval_interval", "eval_deferred",
                 "checkpoint_interval", "checkpoint_steps", "timeout", "host",
                 "max_restarts", "tls_cert", "tls_key", "tls_ca", "tensorboard",
                 "no_verify")  # fmt: skip


def _given(args: argparse.Namespace, name: str) -> bool:
    return name in _FLAG_DEFAULTS and getattr(args, name) != _FLAG_DEFAULTS[name]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _spec(name: str, value: Any) -> Any:
    """A --dataset or --model as config.json records it (a relative path made absolute)."""
    from easgd.data.custom import SpecError, absolute_spec

    if name not in ("dataset", "model") or not isinstance(value, str):
        return value
    try:
        return absolute_spec(value, _flag(name))
    except SpecError:
        return value  # a malformed one differs from the saved one, and is named as such


def resume_config(args: argparse.Namespace) -> TrainConfig:
    """The configuration of ``--resume DIR``: its ``config.json``, with what may change.

    Raises ``ValueError`` (one line naming the flag) for a flag that would change the
    experiment, for ``--overwrite`` or another ``--out``, and for a directory without a run
    or without checkpoints.
    """
    paths = RunPaths(args.resume)
    if args.overwrite:
        raise ValueError(
            f"--resume {paths.root} with --overwrite: --overwrite would delete the "
            "checkpoints --resume continues from; drop one of the two"
        )
    if args.out is not None and Path(args.out).resolve() != paths.root.resolve():
        raise ValueError(
            f"--out {args.out} with --resume {paths.root}: a resumed run continues in its "
            "own directory; drop --out"
        )
    if not paths.holds_run():
        raise ValueError(f"--resume {paths.root}: no run there (no {CONFIG_FILE})")
    if not paths.has_checkpoints():
        raise ValueError(
            f"--resume {paths.root}: the run left no checkpoint in {paths.checkpoints}; "
            "there is nothing to resume from, start it again"
        )
    # Resolved: a run saved before config.json recorded resolved values compares the same.
    saved = TrainConfig.from_dict(json.loads(paths.config.read_text())).resolved()
    for name in EXPERIMENT_FIELDS:
        if _given(args, name) and _spec(name, getattr(args, name)) != getattr(saved, name):
            raise ValueError(
                f"{_flag(name)} {getattr(args, name)} would change the experiment of "
                f"--resume {paths.root} ({name}={getattr(saved, name)!r} in its "
                f"{CONFIG_FILE}); drop {_flag(name)}, or start a new run"
            )
    changes: dict[str, Any] = {"out": str(paths.root)}
    if any(getattr(args, name) is not None for name in BUDGET_FIELDS):
        changes.update({name: getattr(args, name) for name in BUDGET_FIELDS})
    changes.update({name: getattr(args, name) for name in _RUN_SETTINGS if _given(args, name)})
    return saved.replace(**changes)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    epochs = args.epochs
    if epochs is None and args.time_budget is None and args.steps is None:
        epochs = DEFAULT_EPOCHS
    out = args.out or os.path.join("runs", f"{args.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    fields: dict[str, Any] = {
        "method": args.method, "mode": args.mode, "workers": args.workers,
        "servers": args.servers, "tau": args.tau, "lr": args.lr, "momentum": args.momentum,
        "beta": args.beta, "alpha": args.alpha, "weight_decay": args.weight_decay,
        "lr_decay": args.lr_decay, "lr_power": args.lr_power, "moving_rate": args.moving_rate,
        "outer_lr": args.outer_lr, "outer_momentum": args.outer_momentum, "inner": args.inner,
        "batch_size": args.batch_size, "epochs": epochs, "time_budget": args.time_budget,
        "steps": args.steps, "dataset": args.dataset, "model": args.model,
        "data_dir": args.data_dir, "no_verify": args.no_verify, "device": args.device,
        "eval_device": args.eval_device,
        "seed": args.seed, "out": out,
        "eval_interval": args.eval_interval, "eval_deferred": args.eval_deferred,
        "checkpoint_interval": args.checkpoint_interval, "checkpoint_steps": args.checkpoint_steps,
        "timeout": args.timeout, "host": args.host, "max_restarts": args.max_restarts,
        "tls_cert": args.tls_cert, "tls_key": args.tls_key, "tls_ca": args.tls_ca,
        "tensorboard": args.tensorboard, "compress": args.compress,
        "group_size": args.group_size, "overlap": args.overlap,
    }  # fmt: skip
    return TrainConfig(**fields)


class _Replaced:
    """The run ``--overwrite`` replaces, moved aside to ``<out>.previous`` until the new run
    trains: :meth:`discard` deletes it then; :meth:`restore` puts it back when the new run
    failed to start (the failed attempt goes to ``<out>.failed``, its logs kept)."""

    def __init__(self, paths: RunPaths) -> None:
        self.paths = paths
        self.aside = RunPaths(paths.root.with_name(paths.root.name + ".previous"))
        self.failed = paths.root.with_name(paths.root.name + ".failed")
        self.done = False

    def move(self) -> _Replaced:
        if self.aside.root.exists():
            raise ValueError(
                f"--overwrite {self.paths.root}: {self.aside.root} exists (a run kept aside "
                "by an earlier --overwrite that did not finish); restore it or delete it first"
            )
        self.paths.move_run(self.aside.root)
        return self

    def discard(self) -> None:
        if not self.done:
            self.done = True
            shutil.rmtree(self.aside.root, ignore_errors=True)

    def restore(self) -> str:
        """Put the replaced run back; returns where the failed attempt's files went."""
        if self.done:
            return str(self.paths.root)
        self.done = True
        shutil.rmtree(self.failed, ignore_errors=True)
        self.paths.move_run(self.failed)
        self.aside.move_run(self.paths.root)
        shutil.rmtree(self.aside.root, ignore_errors=True)
        return str(self.failed)


def _prepare_out(cfg: TrainConfig, overwrite: bool) -> _Replaced | None:
    """Refuse an ``--out`` that holds a run unless ``--overwrite``; then move that run aside."""
    paths = RunPaths(cfg.out)
    if not paths.holds_run():
        return None
    if not overwrite:
        raise ValueError(
            f"--out {paths.root} already holds a run ({CONFIG_FILE}); choose another "
            "--out, continue it with --resume, or pass --overwrite to replace it"
        )
    return _Replaced(paths).move()


def _warn_lost(summary: dict[str, Any], max_restarts: int) -> None:
    """One line naming the workers a run lost but finished without (exit status 0)."""
    lost = sorted(set(summary.get("lost_workers", [])))
    if lost:
        names = ", ".join(str(w) for w in lost)
        print(f"easgd train: warning: worker{'s' if len(lost) > 1 else ''} {names} died "
              f"beyond --max-restarts {max_restarts}; the run finished without "
              f"{'them' if len(lost) > 1 else 'it'} (summary.json: lost_workers)",
              file=sys.stderr)  # fmt: skip


def _group_size(value: str) -> int | str:
    """``--group-size``: a number, or ``node`` (torchrun's LOCAL_WORLD_SIZE, resolved in run)."""
    if value == "node":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither a number of workers nor 'node'"
        ) from None


def _node_group_size(value: int | str) -> int | str:
    """``--group-size node`` under torchrun: the processes of this node (LOCAL_WORLD_SIZE)."""
    if value != "node":
        return value
    if not _under_torchrun():
        raise ValueError(
            "--group-size node is a node's processes under torchrun (LOCAL_WORLD_SIZE); "
            "without torchrun give the workers per group, e.g. --group-size 2"
        )
    return int(os.environ["LOCAL_WORLD_SIZE"])


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


def _torchrun_restart() -> bool:
    """Whether this is a restart attempt of a torchrun job (``--max-restarts``)."""
    return _under_torchrun() and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def _warn_center(summary: dict[str, Any], cfg: TrainConfig) -> None:
    if summary.get("center_moved") is False:
        print(f"easgd train: warning: the final center is the initial one: no exchange "
              f"reached it (--method {cfg.method} --tau {cfg.tau}, {summary['local_steps']} "
              f"local steps in all); train longer or lower --tau", file=sys.stderr)  # fmt: skip


def _apply_config_file(args: argparse.Namespace) -> None:
    """Fill the flags not given on the command line from ``--config FILE`` (TOML or JSON)."""
    import dataclasses

    import tomllib

    path = Path(args.config)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"--config {path}: cannot be read ({exc.strerror or exc})") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML (name it .json for JSON)"
        raise ValueError(f"--config {path}: not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: holds a {type(data).__name__}, not a table of fields")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(
            f"--config {path}: unknown field{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(unknown)}; the fields are those of config.json (docs/run-directory.md)"
        )
    # A budget on the command line replaces the file's budget (they are alternatives).
    budget_given = any(getattr(args, name) is not None for name in BUDGET_FIELDS)
    for name, value in data.items():
        if name in BUDGET_FIELDS and budget_given:
            continue
        if not _given(args, name):  # a flag on the command line wins over the file
            setattr(args, name, value)


def _preflight(cfg: TrainConfig, args: argparse.Namespace, resume: bool) -> int | None:
    """Check everything the launcher can before a process starts; the steps per worker."""
    from easgd.preflight import check_train

    checked = check_train(cfg, overwrite=args.overwrite, resume=resume)
    for line in checked.warnings:
        print(f"easgd train: warning: {line}", file=sys.stderr)
    return checked.steps_per_worker


def run(args: argparse.Namespace) -> int:
    from easgd.launch import RunFailed, exit_now, launch_local, run_torchrun
    from easgd.roles.worker import RESUME_ENV
    from easgd.runlog import RunStatus, json_dumps
    from easgd.spawner import shared

    if _torchrun_restart() and args.resume is None and args.out is not None:
        # torchrun --max-restarts started this job again after a rank died: the same
        # command, so continue the run in --out from its checkpoints rather than refuse it.
        args.resume = args.out
    resume = args.resume is not None
    if args.config is not None:
        if resume:
            raise ValueError(f"--config {args.config} with --resume: a resumed run keeps its "
                             "own config.json; drop one of the two")  # fmt: skip
        _apply_config_file(args)
    args.group_size = _node_group_size(args.group_size)
    if not resume:
        check_elasticity_args(args)  # name the flag given, not the rate derived from it
    cfg = resume_config(args) if resume else config_from_args(args)
    budget = _preflight(cfg, args, resume)
    if _under_torchrun():
        replaced = None
        if resume:
            os.environ[RESUME_ENV] = "1"  # this rank's roles run in this process
        elif int(os.environ["RANK"]) == 0:
            replaced = _prepare_out(cfg, args.overwrite)
        if int(os.environ["RANK"]) == 0:
            # Rank 0 starts the evaluator: a fork of a fork server forked from here, now,
            # before the store starts its thread.
            shared().warm(fork=True)
        summary = run_torchrun(cfg)
        if replaced is not None:
            replaced.discard()
        if summary is None:
            exit_now(0)
    else:
        replaced = None if resume else _prepare_out(cfg, args.overwrite)
        # Every process of the run is a fork of a fork server forked from here, now: torch
        # is imported and no thread runs yet (the launcher's store starts one).
        shared().warm(fork=True)
        progress = Progress("train", enabled=not (args.quiet or args.json))
        try:
            summary = launch_local(
                cfg, progress.show, resume=resume, budget=budget,
                on_training=replaced.discard if replaced is not None else None,
            )  # fmt: skip
        except RunFailed as exc:
            progress.close()
            message = str(exc)
            if replaced is not None and not replaced.done:
                failed = replaced.restore()  # it never trained: the replaced run comes back
                message = message.replace(str(replaced.paths.root), failed)
                message += f"; {cfg.out} is restored as it was (the failed start: {failed})"
            if args.json and exc.summary is not None:
                print(json_dumps(exc.summary))
            kind = "interrupted" if exc.status is RunStatus.INTERRUPTED else "error"
            prefix = "" if kind == "interrupted" else "error: "
            print(f"easgd train: {prefix}{message}", file=sys.stderr)
            return exc.exit_status
        except BaseException:
            progress.close()
            if replaced is not None and not replaced.done:
                replaced.restore()
            raise
        progress.close()
        if replaced is not None:
            replaced.discard()
        _warn_lost(summary, cfg.max_restarts)
        _warn_center(summary, cfg)
    if args.json:
        print(json_dumps(summary))
        if _under_torchrun():
            exit_now(0)
        return 0
    keys = ("method", "mode", "workers", "servers", "tau", "lr", "dataset",
            "center_test_error", "center_test_loss", "best_center_test_error", "wall_seconds",
            "startup_seconds", "train_seconds", "local_steps", "exchanges", "bytes_sent",
            "bytes_received", "evaluations", "status")  # fmt: skip
    rows = [{"quantity": k, "value": summary[k]} for k in keys if k in summary]
    rate = steps_per_second(summary)
    if rate is not None:
        at = next(i for i, r in enumerate(rows) if r["quantity"] == "local_steps") + 1
        rows.insert(at, {"quantity": "local_steps_per_second", "value": rate})
    print(format_table(rows))
    print(f"run directory: {cfg.out}")
    if _under_torchrun():
        exit_now(0)
    return 0
