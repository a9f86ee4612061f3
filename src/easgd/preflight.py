"""What ``easgd train`` checks before it starts a process or writes a file: :func:`check_train`.

A bad input found inside a worker costs a minute of start-up and a traceback in ``logs/``;
found here it costs a few milliseconds (after torch is imported) and one line naming the
flag, its value and the fix (:class:`PreflightError`). In order:

1. ``--out``: not a file, not a run without ``--overwrite``, not a folder of foreign files,
   its parent creatable, the place writable (probed with a real temporary file, removed);
2. ``--host``: a non-loopback address needs ``EASGD_SECRET`` (asynchronous runs) and must be
   one this machine can bind;
3. ``--device``: CUDA asked for and not there (a CPU build of torch, no visible GPU, or an
   index past the last GPU);
4. ``--dataset`` and ``--model``: known, and the network takes the data set's images (built
   once on the meta device: no memory, no init);
5. the data set's files: found in ``--data-dir`` or the cache and MD5-verified, or
   downloaded once, here, so that the workers find them in the cache (``download=False``:
   refused instead); digits needs scikit-learn only; ``imagenet`` (your folder) is scanned
   and decoded once, here, into the cache every worker memory-maps;
6. ``--batch-size`` against the training set, and a step budget with which the center never
   moves (a warning: :attr:`Preflight.warnings`);
7. free disk space under ``--out`` for the checkpoints, snapshots and logs the run writes
   (:func:`run_size`).

``resume=True`` (``easgd train --resume``) skips the checks of 1. that a run in ``--out``
would fail (it is the run continued), and counts its checkpoints as space already taken.
"""

from __future__ import annotations

import errno
import inspect
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from easgd.comm.ps_server import is_loopback
from easgd.config import TrainConfig
from easgd.runlog import CONFIG_FILE, RunPaths

if TYPE_CHECKING:
    from easgd.data import DatasetSpec

__all__ = ["Preflight", "PreflightError", "RunSize", "check_device", "check_train", "run_size"]

#: The shared secret of the parameter servers off loopback (easgd.comm.wire.SECRET_ENV).
SECRET_ENV = "EASGD_SECRET"
_MB = 1e6
#: Bytes of a checkpoint file besides its vectors: the torch.save archive, the header, the
#: JSON meta (a worker's holds the whole config), torch's RNG state (5 kB).
_FILE_OVERHEAD = 16 * 1024
#: A line of metrics.jsonl (an exchange or a step) or eval.jsonl, generously.
_LINE_BYTES = 320
#: The logs of the processes, summary.json, processes.json, config.json.
_LOG_ALLOWANCE = 1_000_000


class PreflightError(ValueError):
    """A run that cannot start: ``flag`` (``"--batch-size"``), its ``value``, and one line."""

    def __init__(self, flag: str, value: Any, message: str) -> None:
        super().__init__(_one_line(message))
        self.flag, self.value = flag, value


@dataclass(frozen=True)
class RunSize:
    """Bytes a run writes under ``--out`` (:func:`run_size`).

    ``checkpoint_bytes``: every checkpoint with its ``.prev`` copy (server shards, each
    worker's own state, worker 0's center); ``snapshot_bytes``: one snapshot of the center;
    ``snapshots``: the snapshots of the run (one every ``eval_interval`` seconds: known
    for a time budget, None otherwise); ``log_bytes``: metrics, evaluations, logs.
    """

    checkpoint_bytes: int
    snapshot_bytes: int
    snapshots: int | None
    log_bytes: int

    @property
    def total(self) -> int:
        """The expected size; with an unknown number of snapshots, the first one only."""
        return self.checkpoint_bytes + self.snapshot_bytes * (self.snapshots or 1) + self.log_bytes


@dataclass(frozen=True)
class Preflight:
    """What :func:`check_train` learned, for the launcher.

    ``dataset``: the canonical name; ``model``: the network trained (the data set's default
    when ``--model`` is not given); ``parameters``: its scalar parameters (the length of the
    center); ``input_shape``/``num_classes``: what the network takes and gives;
    ``train_size``: samples in the training set; ``steps_per_worker``: each worker's step
    budget (None: only the time budget limits it); ``device``: ``--device`` resolved (``auto``
    to ``cpu`` or ``cuda``); ``data_files``: the verified files (none for digits);
    ``size``: what the run writes; ``expected_bytes``: what it still needs on disk
    (``size.total``, less the checkpoints a resumed run replaces); ``free_bytes``: free
    space where ``--out`` is; ``warnings``: lines worth printing before the run starts.
    """

    dataset: str
    model: str
    parameters: int
    input_shape: tuple[int, int, int]
    num_classes: int
    train_size: int
    steps_per_worker: int | None
    device: str
    data_files: tuple[Path, ...]
    size: RunSize
    expected_bytes: int
    free_bytes: int
    warnings: tuple[str, ...] = ()


def check_train(
    cfg: TrainConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    owns_out: bool | None = None,
    download: bool = True,
    spec: DatasetSpec | None = None,
) -> Preflight:
    """Check that ``cfg`` can run here, before any process starts; see the module docstring.

    Args:
        cfg: the run's configuration (already valid as a :class:`TrainConfig`).
        overwrite: ``--overwrite`` (a run in ``--out`` may be replaced).
        resume: ``--resume`` (``--out`` holds the run being continued).
        owns_out: False for a process that does not create ``--out`` (torchrun ranks other
            than 0, which may look after rank 0 wrote its ``config.json``): the checks that
            ``--out`` holds no run and no foreign files are skipped. None (the default):
            False under torchrun (``TORCHELASTIC_RUN_ID`` set) for ``RANK`` other than 0.
        download: whether missing data files may be downloaded (here, once), as the workers
            would; False: a missing file is refused.
        spec: a :class:`easgd.data.DatasetSpec` replacing the data set's (tests).

    Raises:
        PreflightError: the first problem found, as one line naming its flag.
    """
    if owns_out is None:
        owns_out = "TORCHELASTIC_RUN_ID" not in os.environ or os.environ.get("RANK", "0") == "0"
    target = _check_out(cfg, overwrite=overwrite, resume=resume or not owns_out)
    _check_host(cfg)
    _check_tls(cfg)
    _check_tensorboard(cfg)
    device = check_device(cfg.device)
    check_device(cfg.eval_device, "--eval-device")
    notes: list[str] = []  # the files used although their MD5 differs (--no-verify)
    if _is_custom(cfg.dataset):  # your own data: loaded and checked here, once
        dataset, model, shape, classes, files, train_size = _check_custom_data(cfg)
        parameters = _check_model(cfg, dataset, model, shape, classes)
    else:
        dataset, model, shape, classes = _check_names(cfg)
        parameters = _check_model(cfg, dataset, model, shape, classes)
        files, train_size, actual, notes = _check_data(cfg, dataset, download=download, spec=spec)
        if actual != shape:  # files of another shape than the published ones (a custom spec)
            parameters = _check_model(cfg, dataset, model, actual, classes)
            shape = actual
    if cfg.batch_size > train_size:
        raise PreflightError(
            "--batch-size", cfg.batch_size,
            f"--batch-size {cfg.batch_size} is larger than the training set of --dataset "
            f"{cfg.dataset} ({train_size} samples): a worker cannot draw one batch; use "
            f"--batch-size {min(train_size, 32)} (at most {train_size})",
        )  # fmt: skip
    if cfg.servers_used > parameters:
        raise PreflightError(
            "--servers", cfg.servers,
            f"--servers {cfg.servers} is more shards than the {parameters} parameters of "
            f"--model {model}; use --servers 1",
        )  # fmt: skip
    steps = cfg.steps_per_worker(train_size)
    warnings = [*notes, *_budget_warnings(cfg, steps)]
    size = run_size(cfg, parameters, steps, device=device)
    needed, free = _check_disk(cfg, target, size, resume=resume)
    if size.snapshots is None and free - needed < 3600 / cfg.eval_interval * size.snapshot_bytes:
        hours = (free - needed) / (3600 / cfg.eval_interval * size.snapshot_bytes)
        warnings.append(
            f"--out {cfg.out}: a snapshot of the center ({_mb(size.snapshot_bytes)} MB) every "
            f"--eval-interval {cfg.eval_interval:g} s fills the {_mb(free)} MB free in about "
            f"{max(0.0, hours) * 60:.0f} minutes of training; raise --eval-interval or free "
            "some space"
        )
    return Preflight(
        dataset=dataset, model=model, parameters=parameters, input_shape=shape,
        num_classes=classes, train_size=train_size, steps_per_worker=steps, device=device,
        data_files=tuple(files), size=size, expected_bytes=needed, free_bytes=free,
        warnings=tuple(warnings),
    )  # fmt: skip


def _check_tls(cfg: TrainConfig) -> None:
    """Load the TLS files once: a missing or wrong PEM file is refused here, not in a child."""
    import ssl

    if cfg.tls_cert is None:
        if cfg.tls_ca is not None:
            raise PreflightError(
                "--tls-ca", cfg.tls_ca,
                f"--tls-ca {cfg.tls_ca} without --tls-cert: the servers do not speak TLS; "
                "give --tls-cert and --tls-key, or drop --tls-ca",
            )  # fmt: skip
        return
    for flag, path, build in (("--tls-cert", cfg.tls_cert, cfg.server_tls),
                              ("--tls-ca", cfg.tls_ca, cfg.client_tls)):  # fmt: skip
        try:
            build()
        except (OSError, ssl.SSLError) as exc:
            where = path if flag == "--tls-ca" or path is None else f"{path} (key {cfg.tls_key})"
            raise PreflightError(
                flag, path,
                f"{flag} {where}: cannot be loaded ({exc}); give PEM files this user can "
                "read: the certificate chain, its private key and the CA that signed it",
            ) from None  # fmt: skip


def _check_tensorboard(cfg: TrainConfig) -> None:
    """``--tensorboard DIR``: the package importable, DIR a folder this user can write."""
    if cfg.tensorboard is None:
        return
    from easgd.runlog.tensorboard import INSTALL_HINT, require_tensorboard

    flag, value = "--tensorboard", cfg.tensorboard
    try:
        require_tensorboard()
    except ImportError:
        raise PreflightError(
            flag, value,
            f"{flag} {value} needs the tensorboard package, which is not installed: "
            f"{INSTALL_HINT}, or drop {flag}",
        ) from None  # fmt: skip
    existing = Path(value)
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise PreflightError(flag, value, f"{flag} {value}: {existing} is a file, not a "
                             "folder; choose a folder for the TensorBoard events")  # fmt: skip
    try:
        fd, name = tempfile.mkstemp(prefix=".easgd-write-test-", dir=existing)
    except OSError as exc:
        raise PreflightError(
            flag, value,
            f"{flag} {value}: cannot write in {existing}: {exc.strerror or exc}; choose a "
            "writable folder",
        ) from None  # fmt: skip
    os.close(fd)
    os.unlink(name)


# ------------------------------------------------------------------------------------------
# --out
# ------------------------------------------------------------------------------------------


def _check_out(cfg: TrainConfig, *, overwrite: bool, resume: bool) -> Path:
    """Check ``--out``; returns the existing folder the run's files go to, or under."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise PreflightError(
            "--out", cfg.out, f"--out {out} is a file, not a folder; choose another --out"
        )
    if out.is_dir():
        target = out
        if resume:
            pass  # the run continued (resume_config checked that it is one)
        elif RunPaths(out).holds_run():
            if not overwrite:
                raise PreflightError(
                    "--out", cfg.out,
                    f"--out {out} already holds a run ({CONFIG_FILE}); choose another --out, "
                    "continue it with --resume, or pass --overwrite to replace it",
                )  # fmt: skip
        else:
            foreign = _foreign_entries(out)
            if foreign:
                shown = ", ".join(foreign[:4]) + (f", ... ({len(foreign)} in all)"
                                                  if len(foreign) > 4 else "")  # fmt: skip
                raise PreflightError(
                    "--out", cfg.out,
                    f"--out {out} is not empty and holds no run (no {CONFIG_FILE}): {shown}; "
                    "choose a new or empty folder for --out (--overwrite only replaces a run)",
                )  # fmt: skip
    else:
        target = out.parent
        while not target.exists() and target != target.parent:
            target = target.parent
        if not target.is_dir():
            raise PreflightError(
                "--out", cfg.out,
                f"--out {out} cannot be created: {target} is a file, not a folder; choose "
                "another --out",
            )  # fmt: skip
    _probe_write(cfg.out, target)
    return target


def _foreign_entries(folder: Path) -> list[str]:
    """What in ``folder`` is not a run's before the run starts (hidden files excepted)."""
    paths = RunPaths(folder)
    empty_dirs = {paths.snapshots.name, paths.checkpoints.name, paths.logs.name}
    foreign = []
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise PreflightError(
            "--out", str(folder), f"--out {folder}: cannot list it ({exc.strerror or exc}); "
            "choose another --out",
        ) from None  # fmt: skip
    for entry in entries:
        name = entry.name
        if name.startswith(".") or name == paths.run_info.name:  # easgd experiment's run.json
            continue
        if name in empty_dirs and entry.is_dir() and not any(entry.iterdir()):
            continue
        foreign.append(name + ("/" if entry.is_dir() else ""))
    return foreign


def _probe_write(out: str, folder: Path) -> None:
    """Create and remove a temporary file in ``folder`` (permissions, read-only mounts)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".easgd-write-test-", dir=folder)
    except OSError as exc:
        why = "a read-only file system" if exc.errno == errno.EROFS else exc.strerror or exc
        where = "" if Path(out) == folder else " (where it would be created)"
        raise PreflightError(
            "--out", out,
            f"--out {out}: cannot write in {folder}{where}: {why}; choose a writable --out",
        ) from None  # fmt: skip
    os.close(fd)
    os.unlink(name)


def _check_disk(cfg: TrainConfig, target: Path, size: RunSize, *, resume: bool) -> tuple[int, int]:
    """``(needed, free)`` bytes; refuses when the run does not fit."""
    free = shutil.disk_usage(target).free
    checkpoints = size.checkpoint_bytes
    if resume:  # the checkpoints there are replaced, not added to
        checkpoints = max(0, checkpoints - _tree_bytes(RunPaths(cfg.out).checkpoints))
    needed = size.total - size.checkpoint_bytes + checkpoints
    if needed > free:
        snapshots = size.snapshot_bytes * (size.snapshots or 1)
        count = (
            f"{size.snapshots} snapshots" if size.snapshots is not None else "the first snapshot"
        )
        raise PreflightError(
            "--out", cfg.out,
            f"--out {cfg.out}: the run needs about {_mb(needed)} MB (checkpoints "
            f"{_mb(checkpoints)} MB, {count} {_mb(snapshots)} MB, logs "
            f"{_mb(size.log_bytes)} MB) but {target} has {_mb(free)} MB free; free some space "
            "or choose an --out on another disk",
        )  # fmt: skip
    return needed, free


def _tree_bytes(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_size(
    cfg: TrainConfig, parameters: int, steps_per_worker: int | None, *, device: str = "cpu"
) -> RunSize:
    """What a run of ``cfg`` with a network of ``parameters`` float32 parameters writes.

    Counted from what the roles save (:mod:`easgd.runlog.checkpoint`): every parameter-server
    shard (its center, plus the momentum or the average its method keeps on the server) and
    every worker's own state (``checkpoints/worker-<i>.pt``: x alone for an asynchronous
    worker, else x with its momentum, accumulator, center copy and average where the method
    has them), worker 0's center where no server keeps it, each twice (``.prev``); one
    snapshot of the result every ``eval_interval`` seconds (kept); and the logs.
    """
    import torch

    from easgd.algorithms import Center, Mode, Worker

    hp, mode = cfg.hyperparams(), cfg.resolved_mode()
    vector = 4 * parameters
    one = torch.zeros(1)
    worker = Worker(hp, one, mode)
    if mode is Mode.ASYNC:
        worker_vectors = 1
    else:
        held = [worker.x, worker.v, worker.acc, worker.center, worker.z, worker.outer_v,
                worker.exp_avg, worker.exp_avg_sq]  # fmt: skip
        worker_vectors = sum(t is not None for t in held)
        if worker.center is None and device != "cpu":
            worker_vectors += 1  # its "center" entry: a second CPU copy of x
    files = cfg.workers
    vectors = cfg.workers * worker_vectors
    if cfg.servers_used:
        center = Center(hp, one.clone())
        vectors += 1 + (center.v is not None) + (center.z is not None)  # over every shard
        files += cfg.servers_used
    if not hp.spec.evaluated_on_server(mode):
        vectors += 1  # worker 0's checkpoints/center.pt
        files += 1
    checkpoint_bytes = 2 * (vectors * vector + files * _FILE_OVERHEAD)  # and their .prev
    snapshots = None
    if cfg.time_budget is not None:
        snapshots = math.ceil(cfg.time_budget / cfg.eval_interval) + 2  # the first, the last
    log_bytes = _LOG_ALLOWANCE + _LINE_BYTES * (snapshots or 0)
    if steps_per_worker is not None:
        lines = 2 * math.ceil(steps_per_worker / max(1, min(hp.tau, 50))) + 2
        log_bytes += cfg.workers * lines * _LINE_BYTES
    return RunSize(checkpoint_bytes, vector + _FILE_OVERHEAD, snapshots, log_bytes)


def _mb(n: float) -> str:
    return f"{n / _MB:.1f}"


# ------------------------------------------------------------------------------------------
# --host, --device
# ------------------------------------------------------------------------------------------


def _check_host(cfg: TrainConfig) -> None:
    if not cfg.servers_used:
        return  # only the parameter servers bind --host
    host = cfg.host
    if not is_loopback(host) and not os.environ.get(SECRET_ENV):
        raise PreflightError(
            "--host", host,
            f"--host {host} is not a loopback address: parameter servers reachable from other "
            f"machines need a shared secret; set {SECRET_ENV} (the same on every machine), "
            "or use --host 127.0.0.1",
        )  # fmt: skip
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
    except OSError as exc:
        raise PreflightError(
            "--host", host,
            f"--host {host}: a parameter server cannot listen there ({exc.strerror or exc}); "
            "use an address of this machine, e.g. 127.0.0.1 or 0.0.0.0",
        ) from None  # fmt: skip


def check_device(device: str, flag: str = "--device") -> str:
    """``device`` resolved as a worker resolves it (easgd.roles.context.resolve_device).

    Raises :class:`PreflightError` naming ``flag`` (``--device``, ``--eval-device``): CUDA
    asked for and not there (a CPU build of torch, no visible GPU) or an index past the last
    GPU. ``easgd train`` and ``easgd experiment`` both check ``--device`` with it.
    """
    import torch

    if device == "cpu":
        return device
    available = torch.cuda.is_available()
    if device == "auto":
        return "cuda" if available else "cpu"
    if not available:
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            why = f"this torch ({torch.__version__}) is a CPU build, without CUDA"
        else:
            why = (
                "no CUDA device is visible (torch.cuda.is_available() is False: no GPU, no "
                "driver, or CUDA_VISIBLE_DEVICES hides them)"
            )
        raise PreflightError(flag, device, f"{flag} {device}: {why}; use {flag} cpu (or auto)")
    if device.startswith("cuda:"):
        count = torch.cuda.device_count()
        index = device.removeprefix("cuda:")
        if not index.isdigit():
            raise PreflightError(
                flag, device,
                f"{flag} {device}: not a device; use cuda, cuda:N (N a GPU index) or cpu",
            )  # fmt: skip
        if int(index) >= count:
            raise PreflightError(
                flag, device,
                f"{flag} {device}: this machine has {count} CUDA device"
                f"{'s' if count != 1 else ''} (cuda:0..cuda:{count - 1}); use one of them, or "
                f"{flag} cuda (each process on a GPU by its local rank)",
            )  # fmt: skip
    return device


# ------------------------------------------------------------------------------------------
# --dataset, --model, the data files
# ------------------------------------------------------------------------------------------


def _check_names(cfg: TrainConfig) -> tuple[str, str, tuple[int, int, int], int]:
    """``(dataset, model, (C, H, W), num_classes)``: the names known, the model resolved."""
    from easgd.data import DATASETS, dataset_info
    from easgd.models import MODELS
    from easgd.task import DEFAULT_MODELS

    try:
        info = dataset_info(cfg.dataset)
    except ValueError:
        raise PreflightError(
            "--dataset", cfg.dataset,
            f"--dataset {cfg.dataset} is not a data set easgd knows; choose one of "
            f"{', '.join(DATASETS)}, or give your own: "
            + (f"npz:{cfg.dataset}" if cfg.dataset.endswith(".npz") else "npz:PATH")
            + " or MODULE:FUNCTION (docs/own-model-and-data.md)",
        ) from None  # fmt: skip
    model = cfg.model or DEFAULT_MODELS.get(info.name, "mlp")
    if model not in MODELS and not _is_custom(model):
        raise PreflightError(
            "--model", cfg.model,
            f"--model {model} is not a network easgd knows; choose one of {', '.join(MODELS)} "
            "(`easgd models` lists them), give your own as MODULE:FUNCTION, or leave --model "
            "out for the data set's own "
            f"({DEFAULT_MODELS.get(info.name, 'mlp')})",
        )  # fmt: skip
    return info.name, model, (info.in_channels, info.image_size, info.image_size), info.num_classes


def _check_model(
    cfg: TrainConfig, dataset: str, model: str, shape: tuple[int, int, int], classes: int
) -> int:
    """Build ``model`` for ``shape`` on the meta device; its number of parameters."""
    from easgd.data.custom import SpecError, check_custom_model
    from easgd.models import build_model, count_parameters
    from easgd.task import DEFAULT_MODELS

    c, h, w = shape
    if _is_custom(model):  # your own network: built, and a batch of two run through it
        try:
            return check_custom_model(model, shape, classes, dataset=cfg.dataset)
        except SpecError as exc:
            raise PreflightError(exc.flag or "--model", model, str(exc)) from None
    try:
        net = build_model(model, num_classes=classes, in_channels=c, image_size=w, height=h,
                          device="meta")  # fmt: skip
    except ValueError as exc:
        detail = str(exc)
        prefix = f"model {model!r} cannot take input {shape}: "
        detail = detail.removeprefix(prefix)
        default = DEFAULT_MODELS.get(dataset, "mlp")
        flag, value = ("--model", model) if cfg.model is not None else ("--dataset", cfg.dataset)
        raise PreflightError(
            flag, value,
            f"--model {model} does not take the {c}x{h}x{w} images of --dataset "
            f"{cfg.dataset}: {detail}; use --model {default} (the data set's own) or another "
            "network that takes them (`easgd models`)",
        ) from None  # fmt: skip
    return count_parameters(net)


def _is_custom(spec: str | None) -> bool:
    from easgd.data.custom import is_custom

    return is_custom(spec)


def _check_custom_data(
    cfg: TrainConfig,
) -> tuple[str, str, tuple[int, int, int], int, list[Path], int]:
    """Your own data set, loaded and checked (:mod:`easgd.data.custom`): ``(dataset, model,
    (C, H, W), num_classes, files, train size)``; the model named, or ``mlp``."""
    from easgd.data import custom
    from easgd.data.custom import NPZ_PREFIX, SpecError, load_callable, load_custom_dataset
    from easgd.models import MODELS

    try:
        start = time.perf_counter()
        data = load_custom_dataset(cfg.dataset, data_dir=cfg.data_dir)
        quick = time.perf_counter() - start < custom.REPEAT_CHECK_SECONDS
        if quick and not cfg.dataset.startswith(NPZ_PREFIX):  # the same in every process?
            custom.check_same_data(cfg.dataset, data, data_dir=cfg.data_dir)
    except SpecError as exc:
        flag = exc.flag or "--dataset"
        raise PreflightError(flag, cfg.data_dir if flag == "--data-dir" else cfg.dataset,
                             str(exc)) from None  # fmt: skip
    shape = (data.in_channels, int(data.test_x.shape[2]), int(data.test_x.shape[3]))
    model = cfg.model or "mlp"
    if model not in MODELS and not _is_custom(model):
        raise PreflightError(
            "--model", cfg.model,
            f"--model {model} is not a network easgd knows; choose one of {', '.join(MODELS)} "
            "(`easgd models` lists them) or give your own as MODULE:FUNCTION",
        )  # fmt: skip
    if cfg.dataset.startswith(NPZ_PREFIX):
        files = [Path(cfg.dataset.removeprefix(NPZ_PREFIX))]
    else:
        found = getattr(inspect.getmodule(load_callable(cfg.dataset, "--dataset")), "__file__",
                        None)  # fmt: skip
        files = [Path(found)] if found else []
    return cfg.dataset, model, shape, data.num_classes, files, len(data.train_y)


def _check_data(
    cfg: TrainConfig, dataset: str, *, download: bool, spec: DatasetSpec | None
) -> tuple[list[Path], int, tuple[int, int, int], list[str]]:
    """Find (or download) and verify the files; ``(files, train size, (C, H, W), warnings)``.

    With ``--no-verify``, a warning names each file used although its MD5 differs.
    """
    from easgd.data import DATASET_INFO, SPECS, DatasetError, locate_dataset

    info = DATASET_INFO[dataset]
    shape = (info.in_channels, info.image_size, info.image_size)
    flag, value = ("--data-dir", cfg.data_dir) if cfg.data_dir else ("--dataset", cfg.dataset)
    if dataset == "digits":
        from easgd.data.digits import digits_arrays

        try:
            return [], len(digits_arrays()[0]), shape, []
        except (ImportError, OSError, ValueError) as exc:
            raise PreflightError(
                "--dataset", cfg.dataset, f"--dataset {cfg.dataset}: {exc}"
            ) from None
    if dataset == "digits-hard":  # generated here once, into the cache the workers read
        from easgd.data.digits_hard import digits_hard_arrays

        try:
            return [], len(digits_hard_arrays()[0]), shape, []
        except (ImportError, OSError, ValueError) as exc:
            raise PreflightError(
                "--dataset", cfg.dataset, f"--dataset {cfg.dataset}: {exc}"
            ) from None
    if dataset == "imagenet":  # your folder, decoded once, here, into the cache workers read
        return _check_image_folder(cfg, shape, flag, value)
    # Each failed mirror is logged, and listed again in the DownloadError: say it once.
    quiet = _DropFailedMirrors()
    download_log = logging.getLogger("easgd.data.download")
    download_log.addFilter(quiet)
    try:
        paths = locate_dataset(
            dataset, data_dir=cfg.data_dir, download=download, spec=spec,
            verify=not cfg.no_verify,
        )  # fmt: skip
        # --no-verify: each file used although its MD5 differs becomes one warning line.
        mismatches = _mismatches(paths, spec or SPECS[dataset]) if cfg.no_verify else []
        if dataset in ("mnist", "fashion-mnist"):
            train_size, shape = _idx_sizes(list(paths.values()))
        elif mismatches:  # your own CIFAR archive: count its images
            from easgd.data.cifar import read_cifar10

            train_size = len(read_cifar10(next(iter(paths.values())))[1])
        else:
            train_size = info.train_size  # the archive its MD5 names holds 50000 images
    except DatasetError as exc:
        raise PreflightError(flag, value, f"{flag} {value}: {exc}") from None
    finally:
        download_log.removeFilter(quiet)
    return list(paths.values()), train_size, shape, mismatches


def _check_image_folder(
    cfg: TrainConfig, shape: tuple[int, int, int], flag: str, value: Any
) -> tuple[list[Path], int, tuple[int, int, int], list[str]]:
    """``--dataset imagenet``: the folder scanned and decoded into its cache (once)."""
    import json

    from easgd.data import DatasetError, locate_dataset
    from easgd.data.imagefolder import prepare_image_folder

    try:
        folders = locate_dataset("imagenet", data_dir=cfg.data_dir)
        cache = prepare_image_folder(next(iter(folders.values())).parent, crop=shape[-1])
    except DatasetError as exc:
        raise PreflightError(flag, value, f"{flag} {value}: {exc}") from None
    train_size = int(json.loads((cache / "meta.json").read_text())["train_size"])
    return list(folders.values()), train_size, shape, []


def _mismatches(paths: dict[str, Path], spec: DatasetSpec) -> list[str]:
    """The files whose MD5 is not the spec's, as warnings (``--no-verify`` used them)."""
    from easgd.data.download import MISMATCH_WARNING, md5sum

    found = ((path, md5sum(path), spec.files[name]) for name, path in paths.items())
    return [MISMATCH_WARNING % (path, actual, md5) for path, actual, md5 in found if actual != md5]


class _DropFailedMirrors(logging.Filter):
    """Drops easgd.data.download's warning of one failed mirror (the error lists them all),
    and those of a file used although its MD5 differs (``--no-verify``): the preflight's
    own warnings name those files (:func:`_mismatches`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from easgd.data.download import MISMATCH_WARNING

        msg = str(record.msg)
        return msg != MISMATCH_WARNING and not msg.startswith("download of %s failed")


def _idx_sizes(files: Sequence[Path]) -> tuple[int, tuple[int, int, int]]:
    """The training samples and image shape an MNIST-style set's headers declare."""
    from easgd.data import CorruptFileError
    from easgd.data.idx import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, read_idx_shape

    train_images, train_labels, test_images, test_labels = files
    sizes = {}
    for split, images, labels in (
        ("train", train_images, train_labels),
        ("test", test_images, test_labels),
    ):
        dims = read_idx_shape(images, magic=IDX_IMAGES_MAGIC)
        (count,) = read_idx_shape(labels, magic=IDX_LABELS_MAGIC)
        if dims[0] != count:
            raise CorruptFileError(
                f"{images.name} holds {dims[0]} images but {labels.name} holds {count} labels; "
                "the files belong to different sets. Replace them."
            )
        sizes[split] = dims
    n, h, w = sizes["train"]
    return n, (1, h, w)


# ------------------------------------------------------------------------------------------
# Budgets
# ------------------------------------------------------------------------------------------


def _budget_warnings(cfg: TrainConfig, steps: int | None) -> list[str]:
    from easgd.algorithms import METHODS, Exchange

    spec = METHODS[cfg.method]
    if steps is None or spec.sequential:
        return []
    if spec.exchange in (Exchange.ELASTIC, Exchange.DOWNPOUR) and steps <= cfg.tau:
        budget = f"--steps {cfg.steps}" if cfg.steps is not None else f"--epochs {cfg.epochs:g}"
        return [
            f"{budget} gives each worker {steps} local step{'s' if steps != 1 else ''}, not more "
            f"than --tau {cfg.tau}: {cfg.method} exchanges at steps 0, {cfg.tau}, "
            f"{2 * cfg.tau}, ... and the first exchange changes nothing, so the center stays "
            f"the initial one; give more than {cfg.tau} steps or a smaller --tau"
        ]
    return []


def _one_line(message: str) -> str:
    """``message`` on one line (the data set errors list mirrors on lines of their own)."""
    out = ""
    for line in (part.strip() for part in message.splitlines()):
        if line:
            out += line if not out else (" " if out.endswith(":") else "; ") + line
    return out
