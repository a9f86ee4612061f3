"""``easgd.preflight.check_train``: every bad input refused in the launcher, as one line naming
its flag, before any process starts and without writing a file; and ``config.json``'s
resolved values (``easgd.config``), flags in messages, round trips and resumes.

No internet, no GPU: the data files are small fakes in the real IDX format (with a spec of
their MD5s), CUDA is faked by monkeypatching ``torch.cuda``, a full disk by ``disk_usage``.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import hashlib
import json
import logging
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from easgd import preflight
from easgd.algorithms import METHODS, Hyperparams
from easgd.cli import build_parser
from easgd.cli.train import resume_config
from easgd.config import FLAGS, RESOLVED_FIELDS, ConfigError, TrainConfig, flag_message
from easgd.data import SPECS, DatasetSpec
from easgd.preflight import Preflight, PreflightError, check_train, run_size
from easgd.runlog import RunPaths

MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


# --------------------------------------------------------------------------- helpers


def idx_gz(array: np.ndarray) -> bytes:
    """A gzipped unsigned-byte IDX file, as published for MNIST."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


def write_mnist(folder: Path, n_train: int = 20, n_test: int = 10, labels: int = 0) -> DatasetSpec:
    """Small MNIST files in ``folder``; the spec of their MD5s. ``labels``: fewer train labels."""
    rng = np.random.default_rng(0)
    arrays = {
        MNIST_FILES[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        MNIST_FILES[1]: rng.integers(0, 10, n_train - labels, dtype=np.uint8),
        MNIST_FILES[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        MNIST_FILES[3]: rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    md5s = {}
    for name, array in arrays.items():
        data = idx_gz(array)
        (folder / name).write_bytes(data)
        md5s[name] = hashlib.md5(data, usedforsecurity=False).hexdigest()
    return dataclasses.replace(SPECS["mnist"], files=md5s)


def listing(root: Path) -> list[tuple[str, int]]:
    """Every path under ``root`` with its size: what a check must leave as it was."""
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache of our own and no secret or proxy from the environment."""
    monkeypatch.setenv("EASGD_DATA_DIR", str(tmp_path / "cache"))
    for name in ("EASGD_SECRET", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)


# --------------------------------------------------------------------------- refused inputs

Setup = Callable[[Path, pytest.MonkeyPatch], dict[str, Any]]


def nothing(tmp: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
    return {}


def out_is_file(tmp: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
    (tmp / "run").write_text("x")
    return {}


def parent_is_file(tmp: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
    (tmp / "file").write_text("x")
    return {"out": str(tmp / "file" / "sub" / "run")}


def holds_run(tmp: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
    (tmp / "run").mkdir()
    (tmp / "run" / "config.json").write_text("{}")
    return {}


def foreign_metrics(tmp: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
    (tmp / "run").mkdir()
    (tmp / "run" / "metrics.jsonl").write_text("not json\n")
    (tmp / "run" / "notes").mkdir()
    return {}


def read_only_fs(tmp: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    mp.setattr(preflight.tempfile, "mkstemp", refuse)
    return {}


def disk_full(tmp: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
    mp.setattr(preflight.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 0, 10**5))
    return {}


def fake_gpus(count: int) -> Setup:
    def setup(tmp: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
        mp.setattr(torch.cuda, "is_available", lambda: True)
        mp.setattr(torch.cuda, "device_count", lambda: count)
        return {}

    return setup


def mnist_here(**kwargs: Any) -> Setup:
    def setup(tmp: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
        spec = write_mnist(tmp / "data", **kwargs)
        return {"spec": spec, "data_dir": str(tmp / "data")}

    return setup


def mnist_corrupt(tmp: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
    spec = write_mnist(tmp / "data")
    (tmp / "data" / MNIST_FILES[0]).write_bytes(b"\x1f\x8b truncated")
    return {"spec": spec, "data_dir": str(tmp / "data")}


def mnist_unreachable(tmp: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
    spec = dataclasses.replace(SPECS["mnist"], mirrors=(f"http://127.0.0.1:{closed_port()}/",))
    return {"spec": spec, "download": True}


#: (id, TrainConfig changes, setup, flag, fragment of the message)
REFUSED: list[tuple[str, dict[str, Any], Setup, str, str]] = [
    ("unknown-dataset", {"dataset": "svhn"}, nothing, "--dataset", "digits, digits-hard, mnist"),
    ("unknown-model", {"model": "resnet"}, nothing, "--model", "easgd models"),
    ("model-too-big-for-digits", {"model": "cifar-paper"}, nothing, "--model",
     "does not take the 1x8x8 images of --dataset digits"),
    ("imagenet-net-on-cifar", {"model": "imagenet-paper", "dataset": "cifar10"}, nothing,
     "--model", "use --model cifar-paper"),
    ("batch-larger-than-digits", {"batch_size": 100000}, nothing, "--batch-size",
     "training set of --dataset digits (1437 samples)"),
    ("batch-larger-than-mnist-files", {"dataset": "mnist"}, mnist_here(), "--batch-size",
     "(20 samples)"),
    ("servers-beyond-parameters", {"servers": 20000}, nothing, "--servers", "more shards"),
    ("cuda-on-cpu-build", {"device": "cuda"}, nothing, "--device", "use --device cpu"),
    ("cuda-index-past-last-gpu", {"device": "cuda:2"}, fake_gpus(2), "--device",
     "2 CUDA devices (cuda:0..cuda:1)"),
    ("cuda-index-not-a-number", {"device": "cuda:x"}, fake_gpus(1), "--device", "not a device"),
    ("host-without-secret", {"host": "0.0.0.0"}, nothing, "--host", "EASGD_SECRET"),
    ("out-is-a-file", {}, out_is_file, "--out", "is a file, not a folder"),
    ("out-parent-is-a-file", {}, parent_is_file, "--out", "cannot be created"),
    ("out-holds-a-run", {}, holds_run, "--out", "already holds a run"),
    ("out-holds-foreign-files", {}, foreign_metrics, "--out", "metrics.jsonl, notes/"),
    ("out-read-only-file-system", {}, read_only_fs, "--out", "read-only file system"),
    ("out-disk-full", {}, disk_full, "--out", "MB free"),
    ("mnist-missing", {"dataset": "mnist"}, nothing, "--dataset", "not found"),
    ("mnist-unreachable", {"dataset": "mnist"}, mnist_unreachable, "--dataset",
     "could not download"),
    ("mnist-corrupt-in-data-dir", {"dataset": "mnist"}, mnist_corrupt, "--data-dir",
     "has MD5"),
    ("mnist-labels-of-another-set", {"dataset": "mnist", "batch_size": 8},
     mnist_here(labels=1), "--data-dir", "belong to different sets"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "setup", "flag", "fragment"),
    [case[1:] for case in REFUSED],
    ids=[case[0] for case in REFUSED],
)
def test_refused_as_one_line_naming_the_flag_and_nothing_written(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    changes: dict[str, Any],
    setup: Setup,
    flag: str,
    fragment: str,
) -> None:
    extra = setup(tmp_path, monkeypatch)
    spec, download = extra.pop("spec", None), extra.pop("download", False)
    cfg = TrainConfig(**{"epochs": 1.0, "out": str(tmp_path / "run"), **changes, **extra})
    before = listing(tmp_path)
    with pytest.raises(PreflightError) as info:
        check_train(cfg, download=download, spec=spec)
    message = str(info.value)
    assert info.value.flag == flag and flag in message, message
    assert fragment in message, message
    assert "\n" not in message
    assert isinstance(info.value, ValueError)
    assert [p for p in listing(tmp_path) if not p[0].startswith("cache")] == [
        p for p in before if not p[0].startswith("cache")
    ]


def test_read_only_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        try:  # root writes anyway: only a real refusal makes the case
            with tempfile.NamedTemporaryFile(dir=folder):
                pytest.skip("this user can write in a read-only folder (root)")
        except PermissionError:
            pass
        cfg = TrainConfig(epochs=1.0, out=str(folder / "run"))
        with pytest.raises(PreflightError, match=r"--out .*cannot write in .*ro") as info:
            check_train(cfg)
        assert info.value.flag == "--out"
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_unbindable_host_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EASGD_SECRET", "s3cret")
    cfg = TrainConfig(epochs=1.0, host="192.0.2.1", out=str(tmp_path / "run"))  # TEST-NET-1
    with pytest.raises(PreflightError, match="cannot listen there") as info:
        check_train(cfg)
    assert info.value.flag == "--host" and info.value.value == "192.0.2.1"


# --------------------------------------------------------------------------- accepted inputs


def test_default_run_passes_and_says_what_it_learned(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=60.0, out=str(tmp_path / "run"))
    checked = check_train(cfg)
    assert isinstance(checked, Preflight)
    assert (checked.dataset, checked.model, checked.device) == ("digits", "digits-cnn", "cpu")
    assert checked.parameters == 18346 and checked.input_shape == (1, 8, 8)
    assert checked.train_size == 1437 and checked.num_classes == 10
    assert checked.steps_per_worker == cfg.steps_per_worker(1437) == 2695
    assert checked.data_files == () and checked.warnings == ()
    assert 0 < checked.expected_bytes <= checked.free_bytes
    assert checked.expected_bytes == checked.size.total
    assert list(tmp_path.iterdir()) == []  # the probe file is gone, --out is not created


def with_secret(tmp: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
    mp.setenv("EASGD_SECRET", "s3cret")
    return {}


def empty_out(tmp: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
    (tmp / "run").mkdir()
    return {}


def sweep_out(tmp: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
    (tmp / "run").mkdir()
    (tmp / "run" / "run.json").write_text("{}")  # easgd experiment writes it first
    return {}


def empty_run_folders(tmp: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
    (tmp / "run" / "logs").mkdir(parents=True)
    (tmp / "run" / ".hidden").write_text("")
    return {}


ACCEPTED: list[tuple[str, dict[str, Any], Setup, Callable[[Preflight], bool]]] = [
    ("mnist-files-verified", {"dataset": "mnist", "batch_size": 8, "model": "mlp"},
     mnist_here(), lambda p: p.train_size == 20 and len(p.data_files) == 4),
    ("host-with-secret", {"host": "0.0.0.0"}, with_secret, lambda p: True),
    ("sync-run-binds-no-server", {"host": "0.0.0.0", "method": "allreduce"}, nothing,
     lambda p: True),
    ("auto-device-on-cpu", {"device": "auto"}, nothing, lambda p: p.device == "cpu"),
    ("cuda-index-of-a-gpu", {"device": "cuda:1"}, fake_gpus(2), lambda p: p.device == "cuda:1"),
    ("empty-out", {}, empty_out, lambda p: True),
    ("out-of-a-sweep-run", {}, sweep_out, lambda p: True),
    ("out-with-empty-run-folders", {}, empty_run_folders, lambda p: True),
    ("alias-of-a-dataset", {"dataset": "DIGITS"}, nothing, lambda p: p.dataset == "digits"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "setup", "check"),
    [case[1:] for case in ACCEPTED],
    ids=[case[0] for case in ACCEPTED],
)
def test_accepted_and_nothing_written(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    changes: dict[str, Any],
    setup: Setup,
    check: Callable[[Preflight], bool],
) -> None:
    extra = setup(tmp_path, monkeypatch)
    spec = extra.pop("spec", None)
    cfg = TrainConfig(**{"epochs": 1.0, "out": str(tmp_path / "run"), **changes, **extra})
    before = listing(tmp_path)
    checked = check_train(cfg, download=False, spec=spec)
    assert check(checked), checked
    assert listing(tmp_path) == before


def test_a_run_is_replaced_with_overwrite_but_foreign_files_never(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=1.0, out=str(tmp_path / "run"))
    holds_run(tmp_path, pytest.MonkeyPatch())
    check_train(cfg, overwrite=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(PreflightError, match="holds no run"):
        check_train(cfg.replace(out=str(other)), overwrite=True)


def test_resume_skips_the_run_check_and_counts_its_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = TrainConfig(epochs=1.0, out=str(tmp_path / "run"))
    paths = RunPaths(cfg.out).make()
    paths.config.write_text(json.dumps(cfg.to_dict()))
    size = check_train(cfg, resume=True).size
    paths.worker_checkpoint(0).write_bytes(b"\0" * size.checkpoint_bytes)
    checked = check_train(cfg, resume=True)
    assert checked.expected_bytes == size.total - size.checkpoint_bytes
    # A torchrun rank other than 0 may look after rank 0 wrote config.json.
    check_train(cfg, owns_out=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("RANK", "1")
    check_train(cfg)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(PreflightError, match="already holds a run"):
        check_train(cfg)
    # Resuming still checks the device, the secret and the disk.
    with pytest.raises(PreflightError, match="--device cuda"):
        check_train(cfg.replace(device="cuda"), resume=True)
    with pytest.raises(PreflightError, match="EASGD_SECRET"):
        check_train(cfg.replace(host="0.0.0.0"), resume=True)
    disk_full(tmp_path, monkeypatch)
    with pytest.raises(PreflightError, match="MB free"):
        check_train(cfg, resume=True)


def test_a_step_budget_that_never_moves_the_center_is_a_warning(tmp_path: Path) -> None:
    out = str(tmp_path / "run")
    (warning,) = check_train(TrainConfig(steps=5, tau=10, out=out)).warnings
    assert "--steps 5" in warning and "--tau 10" in warning and "center stays" in warning
    assert check_train(TrainConfig(steps=11, tau=10, out=out)).warnings == ()
    assert check_train(TrainConfig(steps=5, tau=10, method="localsgd", out=out)).warnings == ()


def test_snapshots_that_would_fill_the_disk_are_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    free = 30 * 10**6
    monkeypatch.setattr(
        preflight.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(free, 0, free)
    )
    (warning,) = check_train(TrainConfig(epochs=1.0, out=str(tmp_path / "run"))).warnings
    assert "--eval-interval 1 s" in warning and "minutes" in warning
    with pytest.raises(PreflightError, match=r"(?=.*snapshots)(?=.*MB free)"):
        check_train(TrainConfig(time_budget=3600.0, out=str(tmp_path / "run")))


def test_run_size_counts_what_the_roles_save() -> None:
    n, vector = 1000, 4000
    overhead = preflight._FILE_OVERHEAD
    # EAMSGD, asynchronous: 4 workers (x each) and 1 server shard (the center), twice.
    size = run_size(TrainConfig(epochs=1.0), n, 10)
    assert size.checkpoint_bytes == 2 * (5 * vector + 5 * overhead)
    assert size.snapshot_bytes == vector + overhead and size.snapshots is None
    # Synchronous EAMSGD: x, momentum and the center copy per worker, and worker 0's center.
    size = run_size(TrainConfig(epochs=1.0, mode="sync"), n, 10)
    assert size.checkpoint_bytes == 2 * ((4 * 3 + 1) * vector + 5 * overhead)
    # ADOWNPOUR on 2 shards: the server keeps the average as well; DOWNPOUR workers keep x.
    size = run_size(TrainConfig(epochs=1.0, method="adownpour", servers=2), n, 10)
    assert size.checkpoint_bytes == 2 * ((4 + 2) * vector + 6 * overhead)
    size = run_size(TrainConfig(time_budget=10.0, eval_interval=0.5), n, None)
    assert size.snapshots == 22 and size.total > size.checkpoint_bytes + 22 * size.snapshot_bytes


# --------------------------------------------------------------------------- config.json


def test_config_errors_carry_the_field_and_read_as_flags() -> None:
    cases = [
        ({"batch_size": 0}, "batch_size", 0, "--batch-size 0 must be >= 1"),
        ({"servers": 0}, "servers", 0, "--servers 0 must be >= 1"),
        ({"mode": "both"}, "mode", "both", "--mode both; choose one of"),
        ({"lr": -0.1}, "lr", -0.1, "--lr -0.1 is outside"),
        ({"method": "msgd"}, "workers", 4, "--workers 4 with --method msgd"),
        ({"alpha": 0.6}, "alpha", 0.6, "--beta 2.4 is outside"),
        ({"checkpoint_steps": 0}, "checkpoint_steps", 0, "--checkpoint-every-steps 0"),
        ({"steps": 2.5, "epochs": None}, "steps", 2.5, "--steps 2.5 must be an integer"),
        ({"epochs": -1.0}, "epochs", -1.0, "--epochs -1.0: every budget"),
        ({"device": "tpu"}, "device", "tpu", "--device tpu; choose cpu"),
    ]
    for changes, field, value, cli in cases:
        with pytest.raises(ConfigError) as info:
            TrainConfig(**{"epochs": 1.0, **changes})
        err = info.value
        assert (err.field, err.value, err.flag) == (field, value, FLAGS[field]), changes
        assert cli in err.cli(), err.cli()
        assert f"{field}=" in str(err)  # the library's own spelling stays


def test_flag_message_leaves_prose_alone() -> None:
    text = "beta=2.4 is outside (0, 2); the paper's choice is alpha=beta/p=0.225 (p=4)"
    assert flag_message(text) == (
        "--beta 2.4 is outside (0, 2); the paper's choice is alpha=beta/p=0.225 (p=4)"
    )
    assert flag_message("e.g. lr=0.01 or time_budget=5") == "e.g. --lr 0.01 or --time-budget 5"


def test_config_json_records_the_resolved_values() -> None:
    saved = TrainConfig(epochs=1.0).to_dict()
    assert {k: saved[k] for k in RESOLVED_FIELDS} == {
        "momentum": 0.99, "beta": 0.9, "alpha": 0.225, "moving_rate": None, "model": "digits-cnn",
    }  # fmt: skip
    assert TrainConfig(epochs=1.0, dataset="cifar10").to_dict()["model"] == "cifar-paper"
    assert TrainConfig(epochs=1.0, model="mlp").to_dict()["model"] == "mlp"


@pytest.mark.parametrize("method", list(METHODS))
def test_resolved_config_round_trips_to_the_same_run(method: str) -> None:
    spec = METHODS[method]
    workers = 1 if spec.sequential else 3
    tau = spec.fixed_tau or 4
    cfg = TrainConfig(method=method, workers=workers, tau=tau, epochs=1.0)
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg.resolved() and again.resolved() == again
    assert again.hyperparams() == cfg.hyperparams()
    assert Hyperparams.from_dict(again.hyperparams().to_dict()) == cfg.hyperparams()
    for name in ("momentum", "beta", "alpha", "moving_rate"):  # only what the method uses
        assert (getattr(again, name) is not None) == spec.uses(name), name


def test_a_run_saved_resolved_resumes_with_its_flags(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = TrainConfig(epochs=1.0, out=str(out))
    paths = RunPaths(out).make()
    paths.config.write_text(json.dumps(cfg.to_dict()))
    paths.worker_checkpoint(0).write_bytes(b"x")
    parser = build_parser()
    for flags in ([], ["--momentum", "0.99", "--beta", "0.9", "--model", "digits-cnn"]):
        args = parser.parse_args(["train", "--resume", str(out), *flags])
        assert resume_config(args) == cfg.resolved()
    args = parser.parse_args(["train", "--resume", str(out), "--momentum", "0.9"])
    with pytest.raises(ValueError, match="would change the experiment"):
        resume_config(args)


def test_failed_mirrors_are_said_once_in_the_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    extra = mnist_unreachable(tmp_path, pytest.MonkeyPatch())
    cfg = TrainConfig(epochs=1.0, dataset="mnist", out=str(tmp_path / "run"))
    with caplog.at_level("WARNING"), pytest.raises(PreflightError, match="could not download"):
        check_train(cfg, spec=extra["spec"])
    assert not [r for r in caplog.records if "download of" in r.getMessage()]
    assert not logging.getLogger("easgd.data.download").filters


def test_eval_device_is_checked_and_named_like_device(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=1, out=str(tmp_path / "run"))
    if not torch.cuda.is_available():
        with pytest.raises(PreflightError, match=r"--eval-device cuda: .*use --eval-device cpu"):
            check_train(cfg.replace(eval_device="cuda"))
    with pytest.raises(ConfigError, match="eval_device='gpu'; choose cpu, cuda"):
        TrainConfig(steps=1, eval_device="gpu")
    check_train(cfg.replace(eval_device="auto"))  # auto: the CPU here, or a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_center_evaluated_on_the_gpu_scores_as_on_the_cpu() -> None:
    from easgd.finalize import CenterEvaluation

    cfg = TrainConfig(steps=1, model="digits-cnn")
    cpu, gpu = CenterEvaluation(cfg), CenterEvaluation(cfg.replace(eval_device="cuda"))
    assert gpu.device.type == "cuda"
    center = cpu.initial + 0.01
    a, b = cpu(center), gpu(center)
    assert a["error"] == b["error"]
    assert abs(a["loss"] - b["loss"]) < 1e-4
