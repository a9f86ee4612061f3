"""Checkpoints and snapshots cannot lie: every damage is refused by name, and nothing is lost.

The table below holds every corruption of issue 10 (item 3): each row damages a good file of
each kind (a server shard, worker 0's center, a snapshot) and says what the refusal must
name. Then: the previous checkpoint survives a crash at any point of a save and loaders fall
back to it; a crafted pickle never runs; ``finalize`` still writes a summary that names what
it skipped, with null center fields when there is no center left.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from easgd.algorithms import Hyperparams
from easgd.comm.ps import ParameterServer, read_checkpoint
from easgd.comm.ps_checkpoint import write_checkpoint
from easgd.config import TrainConfig
from easgd.finalize import CenterEvaluation, NoFinalCenterError, finalize, read_final_center
from easgd.runlog import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    CheckpointKind,
    RunPaths,
    atomic_torch_save,
    atomic_write_bytes,
    checkpoint_digest,
    iter_jsonl,
    load_checkpoint,
    previous_checkpoint,
    save_checkpoint,
    summary_errors,
)
from easgd.runlog import checkpoint as checkpoint_module

torch.set_num_threads(1)

N = 1000
EASGD = Hyperparams(method="easgd", lr=0.05, tau=2, workers=2)
DOWNPOUR = Hyperparams(method="downpour", lr=0.05, tau=1, workers=2)
KINDS = [CheckpointKind.SERVER_SHARD, CheckpointKind.CENTER, CheckpointKind.SNAPSHOT]


def _center(n: int = N) -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, n)


def write_good(
    path: Path, kind: CheckpointKind, *, center: torch.Tensor | None = None, t: int = 7,
    hp: Hyperparams = EASGD,
) -> None:  # fmt: skip
    """A file of ``kind`` as easgd writes it (a server shard through the server's format)."""
    c = _center() if center is None else center
    if kind is CheckpointKind.SERVER_SHARD:
        state = {"center": c, "t": t, "v": None, "z": None, "seq": 3, "worker_exchanges": {0: 2}}
        write_checkpoint(path, state, hp=hp, offset=0, numel=c.numel(), exchanges=4)
    else:
        save_checkpoint(path, kind, {"center": c}, method=hp.method, t=t, meta={"wall": 1.5})


def load(path: Path, kind: CheckpointKind, **kw: Any) -> tuple[torch.Tensor, int]:
    """What a run loads: the center and its clock, for this run's method and model size."""
    if kind is CheckpointKind.SERVER_SHARD:
        state = read_checkpoint(path, method="easgd", numel=N, offset=0, **kw)
        return state["center"], state["t"]
    ckpt = load_checkpoint(path, kind, method="easgd", numel=N, **kw)
    return ckpt.center, ckpt.t


# ------------------------------------------------------------------------------------------
# The corruptions: each damages the good file at ``path`` (of ``kind``)
# ------------------------------------------------------------------------------------------


def _mutate(path: Path, change: Callable[[bytearray], None]) -> None:
    data = bytearray(path.read_bytes())
    change(data)
    path.write_bytes(bytes(data))


def _garble_middle(data: bytearray) -> None:
    mid = len(data) // 2
    data[mid - 50 : mid + 50] = bytes(b ^ 0xA5 for b in data[mid - 50 : mid + 50])


def _flip_one_bit(data: bytearray) -> None:
    data[len(data) // 2] ^= 0x10


def _nan_center(path: Path, kind: CheckpointKind) -> None:
    center = _center()
    center[3] = float("nan")
    write_good(path, kind, center=center)


def _negative_clock(path: Path, kind: CheckpointKind) -> None:
    """A file whose digest matches but whose clock is -5 (easgd's writer refuses t < 0)."""
    record = torch.load(path, weights_only=True)
    record["t"] = -5
    record["digest"] = checkpoint_digest(record, record["tensors"])
    atomic_torch_save(path, record)


CORRUPTIONS: dict[str, tuple[Callable[[Path, CheckpointKind], None], str]] = {
    "100 bytes changed in the middle": (
        lambda p, k: _mutate(p, _garble_middle),
        r"do not match its digest|not a readable",
    ),
    "one flipped bit": (lambda p, k: _mutate(p, _flip_one_bit), r"do not match its digest"),
    "a NaN center": (_nan_center, r"center has 1 NaN or infinite values \(the first at index 3\)"),
    "5 elements short": (
        lambda p, k: write_good(p, k, center=_center(N - 5)),
        r"holds 995 elements but 1000 are needed \(5 too few\)",
    ),
    "t = -5": (_negative_clock, r"negative clock t=-5"),
    "an empty file": (lambda p, k: p.write_bytes(b""), r"is empty \(0 bytes\)"),
    "a truncated file": (
        lambda p, k: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
        r"is not a readable torch file.*truncated or not a checkpoint",
    ),
    "not a checkpoint": (
        lambda p, k: p.write_bytes(b"step,loss\n1,2.3\n" * 40),
        r"is not a (readable )?torch file",
    ),
    "another method's checkpoint": (
        lambda p, k: write_good(p, k, hp=DOWNPOUR),
        r"holds a downpour center but this run's method is easgd",
    ),
}


@pytest.mark.parametrize("kind", KINDS, ids=[k.value for k in KINDS])
@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_every_corruption_is_refused_by_name(tmp_path: Path, case: str, kind: CheckpointKind):
    path = tmp_path / "file.pt"
    write_good(path, kind)
    assert_close(load(path, kind)[0], _center(), rtol=0, atol=0)  # the good file loads
    damage, problem = CORRUPTIONS[case]
    damage(path, kind)  # a rewrite keeps the good file as the previous one: not used here
    with pytest.raises(CheckpointError, match=problem) as err:
        load(path, kind, fallback=False)
    assert isinstance(err.value, ValueError)
    assert str(err.value).startswith(f"{path}: ")  # names the file
    assert err.value.path == path and err.value.advice  # ... and says what to do


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_the_server_never_resumes_from_a_damaged_checkpoint(tmp_path: Path, case: str):
    path = tmp_path / "server-0.pt"
    write_good(path, CheckpointKind.SERVER_SHARD)
    damage, problem = CORRUPTIONS[case]
    damage(path, CheckpointKind.SERVER_SHARD)
    previous_checkpoint(path).unlink(missing_ok=True)  # nothing to fall back to
    with pytest.raises(CheckpointError, match=problem):
        ParameterServer.from_checkpoint(path, hp=EASGD, numel=N, offset=0)


def test_the_server_resumes_what_it_saved_and_checks_the_shard(tmp_path: Path):
    path = tmp_path / "server-1.pt"
    center = _center(30)
    server = ParameterServer(DOWNPOUR, center.clone(), offset=20, checkpoint_path=path)
    try:
        server.center.t = 11
        server.save_checkpoint()
    finally:
        server.stop()  # saves again: the first save is kept as the previous checkpoint
    assert previous_checkpoint(path).exists()
    for kwargs in ({}, {"hp": DOWNPOUR, "numel": 30, "offset": 20}):  # old and new callers
        restored = ParameterServer.from_checkpoint(path, **kwargs)
        try:
            assert (restored.t, restored.offset, restored.numel) == (11, 20, 30)
            assert_close(restored.snapshot(), center, rtol=0, atol=0)
        finally:
            restored.stop()
    for kwargs, problem in [
        ({"numel": 35}, r"holds 30 elements but 35 are needed \(5 too few\)"),
        ({"offset": 0}, r"is the shard at offset 20, not at offset 0"),
        ({"hp": EASGD}, r"holds a downpour center but this run's method is easgd"),
    ]:
        with pytest.raises(CheckpointError, match=problem):
            ParameterServer.from_checkpoint(path, **kwargs)


# ------------------------------------------------------------------------------------------
# The previous checkpoint: kept, and used when the newest is refused
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS[:2], ids=[k.value for k in KINDS[:2]])
def test_a_refused_checkpoint_falls_back_to_the_previous_one_and_says_so(
    tmp_path: Path, kind: CheckpointKind, caplog: pytest.LogCaptureFixture
):
    path = tmp_path / "ckpt.pt"
    prev = previous_checkpoint(path)
    assert prev.name == "ckpt.prev.pt"
    write_good(path, kind, t=1)
    assert not prev.exists()  # nothing to keep on the first save
    write_good(path, kind, t=2)
    assert load(path, kind, fallback=False)[1] == 2 and load(prev, kind, fallback=False)[1] == 1

    _mutate(path, _flip_one_bit)
    with caplog.at_level(logging.WARNING, logger="easgd.runlog.checkpoint"):
        center, t = load(path, kind)
    assert t == 1
    assert_close(center, _center(), rtol=0, atol=0)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert str(path) in warning and str(prev) in warning and "digest" in warning

    _mutate(prev, _flip_one_bit)  # both damaged: the error names both
    with pytest.raises(
        CheckpointError, match=r"previous checkpoint .*ckpt\.prev\.pt is refused too"
    ):
        load(path, kind)

    path.unlink()  # the newest missing (e.g. deleted): the previous one still serves
    write_good(
        prev,
        kind,
        t=5,
    )
    assert load(path, kind)[1] == 5


def test_a_damaged_file_is_never_kept_as_the_previous_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    path, kind = tmp_path / "center.pt", CheckpointKind.CENTER
    write_good(path, kind, t=1)
    write_good(path, kind, t=2)  # prev: t=1
    atomic_write_bytes(path, b"garbage")  # replaced behind the writer's back
    with caplog.at_level(logging.WARNING, logger="easgd.runlog.checkpoint"):
        write_good(path, kind, t=3)
    assert "not keeping" in caplog.text
    assert load(path, kind, fallback=False)[1] == 3
    assert load(previous_checkpoint(path), kind, fallback=False)[1] == 1  # still the good one


def test_snapshots_are_not_rotated(tmp_path: Path):
    path = tmp_path / "center-0000001.000.pt"
    write_good(path, CheckpointKind.SNAPSHOT)
    write_good(path, CheckpointKind.SNAPSHOT)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


class Crash(BaseException):
    """A power cut: not an ``OSError``, so nothing on the way handles it."""


@pytest.mark.parametrize("at", ["serialize", "link", "keep-previous", "write", "none"])
def test_a_crash_at_any_point_of_a_save_leaves_a_verified_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: str
):
    path, kind = tmp_path / "server-0.pt", CheckpointKind.SERVER_SHARD
    write_good(path, kind, t=1)
    write_good(path, kind, t=2)
    calls = {"replace": 0}
    real_replace = os.replace

    def crash(*args: Any, **kwargs: Any) -> None:
        raise Crash(at)

    def replace(src: Any, dst: Any) -> None:
        calls["replace"] += 1  # first: the previous checkpoint; second: the new file
        if (at, calls["replace"]) in (("keep-previous", 1), ("write", 2)):
            raise Crash(at)
        real_replace(src, dst)

    if at == "serialize":
        monkeypatch.setattr(torch, "save", crash)
    elif at == "link":
        monkeypatch.setattr(os, "link", crash)
    monkeypatch.setattr(os, "replace", replace)
    if at == "none":
        write_good(path, kind, t=3)
    else:
        with pytest.raises(Crash):
            write_good(path, kind, t=3)
    monkeypatch.undo()
    newest = load(path, kind, fallback=False)[1]
    previous = load(previous_checkpoint(path), kind, fallback=False)[1]
    assert (newest, previous) == {"write": (2, 2), "none": (3, 2)}.get(at, (2, 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server-0.prev.pt", "server-0.pt"]


def test_the_server_keeps_its_previous_checkpoint(tmp_path: Path):
    path = tmp_path / "server-0.pt"
    server = ParameterServer(EASGD, _center(), checkpoint_path=path)
    try:
        server.save_checkpoint()
        server.center.t = 4
        server.save_checkpoint()
    finally:
        server.center.t = 9
        server.stop()
    assert read_checkpoint(path, fallback=False)["t"] == 9
    assert read_checkpoint(previous_checkpoint(path), fallback=False)["t"] == 4


# ------------------------------------------------------------------------------------------
# The format
# ------------------------------------------------------------------------------------------


def test_the_format_round_trips_and_its_digest_covers_names_dtypes_and_shapes(tmp_path: Path):
    path = tmp_path / "c.pt"
    x = torch.arange(6, dtype=torch.float64)
    written = save_checkpoint(path, "center", {"center": x, "v": None}, method="easgd", t=3,
                              meta={"wall": 2.5, "config": {"lr": 0.1, "steps": None}})  # fmt: skip
    ckpt = load_checkpoint(path, CheckpointKind.CENTER, method="easgd", numel=6,
                           dtype=torch.float64)  # fmt: skip
    assert (ckpt.kind, ckpt.method, ckpt.numel, ckpt.offset, ckpt.t) == ("center", "easgd", 6, 0, 3)
    assert ckpt.dtype == torch.float64 and set(ckpt.tensors) == {"center"}
    assert ckpt.meta == {"wall": 2.5, "config": {"lr": 0.1, "steps": None}}
    assert ckpt.digest == written.digest and ckpt.digest.startswith("sha256:")
    assert ckpt.refused == () and ckpt.path == path
    assert_close(ckpt.center, x, rtol=0, atol=0)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT and len(raw["digest"]) == len("sha256:") + 64
    assert abs(raw["saved_at"] - written.saved_at) < 1e-6

    header = {k: v for k, v in raw.items() if k != "tensors"}
    same = checkpoint_digest(header, {"center": x})
    assert same == raw["digest"]
    for other in ({"centre": x}, {"center": x.float()}, {"center": x.reshape(2, 3)}):
        assert checkpoint_digest(header, other) != same
    assert checkpoint_digest({**header, "t": 4}, {"center": x}) != same


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"t": -1}, r"t=-1 must be >= 0"),
        ({"offset": -2}, r"offset=-2 must be >= 0"),
        ({"meta": {"path": Path("x")}}, r"meta must be plain JSON data"),
        ({"tensors": {"v": torch.zeros(3)}}, r"tensors\['center'\] must be a flat tensor"),
        ({"tensors": {"center": torch.zeros(2, 2)}}, r"must be a flat tensor"),
    ],
)
def test_the_writer_refuses_what_no_reader_would_accept(
    tmp_path: Path, kwargs: dict[str, Any], problem: str
):
    args: dict[str, Any] = {"tensors": {"center": torch.zeros(3)}, "method": "easgd", "t": 0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=problem):
        save_checkpoint(tmp_path / "x.pt", CheckpointKind.CENTER, args.pop("tensors"), **args)
    assert not (tmp_path / "x.pt").exists()


def test_views_are_saved_as_their_own_bytes(tmp_path: Path):
    big = torch.arange(100_000, dtype=torch.float32)
    save_checkpoint(tmp_path / "s.pt", "snapshot", {"center": big[10:20]}, method="easgd", t=0)
    assert (tmp_path / "s.pt").stat().st_size < 10_000  # not the whole storage
    assert_close(load_checkpoint(tmp_path / "s.pt", "snapshot").center, big[10:20])


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (torch.zeros(N), r"is a bare tensor \(a snapshot of an older easgd\)"),
        ({"format": "easgd.ps/1", "center": torch.zeros(N), "t": 1},
         r"is a parameter-server checkpoint of an older easgd \(format easgd.ps/1\)"),
        ({"center": torch.zeros(N)}, r"is not an easgd checkpoint \(format None"),
        ([1, 2, 3], r"is not an easgd checkpoint \(it holds a list\)"),
    ],
)  # fmt: skip
def test_files_without_a_digest_are_refused(tmp_path: Path, content: Any, problem: str):
    path = tmp_path / "old.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=problem):
        load_checkpoint(path, CheckpointKind.SNAPSHOT)


def test_a_file_of_another_kind_is_refused(tmp_path: Path):
    path = tmp_path / "center.pt"
    write_good(path, CheckpointKind.SNAPSHOT)
    with pytest.raises(CheckpointError, match="is a snapshot file, not a center"):
        load_checkpoint(path, CheckpointKind.CENTER)


def test_nan_is_accepted_only_when_asked(tmp_path: Path):
    path = tmp_path / "snap.pt"
    _nan_center(path, CheckpointKind.SNAPSHOT)
    assert load_checkpoint(path, "snapshot", allow_nonfinite=True).center.isnan().sum() == 1


# ------------------------------------------------------------------------------------------
# weights_only: a crafted file never runs code
# ------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this creates ``marker``: proof that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("how", ["torch.save", "raw pickle"])
def test_a_crafted_pickle_is_refused_without_running_it(tmp_path: Path, how: str):
    marker, path = tmp_path / "ran", tmp_path / "checkpoints" / "center.pt"
    path.parent.mkdir()
    evil = {"format": CHECKPOINT_FORMAT, "kind": "center", "tensors": {"center": Payload(marker)}}
    if how == "torch.save":
        torch.save(evil, path)
    else:
        path.write_bytes(pickle.dumps(evil, protocol=2))
    for kind in KINDS:
        with pytest.raises(CheckpointError, match="weights_only=True refused them"):
            load_checkpoint(path, kind)
    with pytest.raises(CheckpointError, match="weights_only=True refused them"):
        read_checkpoint(path)
    assert not marker.exists()
    with contextlib.suppress(RuntimeError):  # a raw pickle is no torch file, once it has run
        torch.load(path, weights_only=False)  # the control: this payload is live
    assert marker.is_dir()


# ------------------------------------------------------------------------------------------
# finalize: a damaged file never stops the summary, and the summary says what it skipped
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def numel() -> int:
    cfg = TrainConfig(method="easgd", workers=2, steps=1, mode="sync")
    return CenterEvaluation(cfg).flat.numel


def _run(tmp_path: Path, mode: str) -> tuple[TrainConfig, RunPaths]:
    cfg = TrainConfig(method="easgd", workers=2, steps=1, mode=mode, out=str(tmp_path / "run"))
    paths = RunPaths(cfg.out).make()
    paths.config.write_text(json.dumps(cfg.to_dict()))
    return cfg, paths


def _center_file(cfg: TrainConfig, paths: RunPaths) -> tuple[Path, CheckpointKind]:
    if cfg.servers_used:
        return paths.server_checkpoint(0), CheckpointKind.SERVER_SHARD
    return paths.sync_checkpoint, CheckpointKind.CENTER


def _write_center(cfg: TrainConfig, paths: RunPaths, numel: int, t: int) -> None:
    path, kind = _center_file(cfg, paths)
    center = torch.zeros(numel)
    if kind is CheckpointKind.SERVER_SHARD:
        state = {"center": center, "t": t, "v": None, "z": None}
        write_checkpoint(path, state, hp=cfg.hyperparams(), offset=0, numel=numel, exchanges=t)
    else:
        save_checkpoint(path, kind, {"center": center}, method=cfg.method, t=t, meta={"wall": 1.0})


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_finalize_uses_the_previous_checkpoint_and_names_the_damaged_one(
    tmp_path: Path, mode: str, numel: int
):
    cfg, paths = _run(tmp_path, mode)
    _write_center(cfg, paths, numel, t=1)
    _write_center(cfg, paths, numel, t=2)
    path, _ = _center_file(cfg, paths)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    summary = finalize(cfg, paths, 3.0)
    assert summary_errors(summary) == []
    assert isinstance(summary["center_test_error"], float)
    (skipped,) = summary["skipped_files"]
    name = f"checkpoints/{path.name}"
    assert skipped["file"] == name and "truncated" in skipped["reason"]
    assert (
        f"used the previous checkpoint {name.replace('.pt', '.prev.pt')} (t=1)"
        in (skipped["reason"])
    )
    assert json.loads(paths.summary.read_text()) == summary


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("damage", ["truncated", "missing", "other model"])
def test_finalize_without_a_center_writes_a_summary_with_null_center_and_raises(
    tmp_path: Path, mode: str, damage: str, numel: int
):
    cfg, paths = _run(tmp_path, mode)
    path, _ = _center_file(cfg, paths)
    if damage == "truncated":
        _write_center(cfg, paths, numel, t=1)
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "other model":
        _write_center(cfg, paths, numel - 5, t=1)
    with pytest.raises(NoFinalCenterError) as err:
        finalize(cfg, paths, 3.0)
    summary = json.loads(paths.summary.read_text())
    assert err.value.summary == summary and summary_errors(summary) == []
    assert summary["center_test_error"] is None and summary["center_test_loss"] is None
    assert summary["best_center_test_error"] is None  # no curve either
    (skipped,) = summary["skipped_files"]
    assert skipped["file"] == f"checkpoints/{path.name}"
    expected = {"truncated": "not a readable torch file", "other model": "5 too few",
                "missing": "missing: the run ended before its first checkpoint"}  # fmt: skip
    assert expected[damage] in skipped["reason"]
    assert "NaN" not in paths.summary.read_text()


def test_finalize_skips_damaged_snapshots_and_says_why(tmp_path: Path, numel: int):
    cfg, paths = _run(tmp_path, "sync")
    _write_center(cfg, paths, numel, t=1)
    good, cut, old, evil = (paths.snapshot(w) for w in (1.0, 2.0, 3.0, 4.0))
    for p in (good, cut):
        save_checkpoint(p, "snapshot", {"center": torch.zeros(numel)}, method="easgd", t=1)
    cut.write_bytes(cut.read_bytes()[:-1])
    torch.save(torch.zeros(numel), old)  # an older easgd's bare tensor
    torch.save({"x": Payload(tmp_path / "ran")}, evil)
    summary = finalize(cfg, paths, 5.0)
    assert [e["snapshot"] for e in iter_jsonl(paths.eval)] == [good.name]
    assert summary["evaluations"] == 1
    reasons = {s["file"]: s["reason"] for s in summary["skipped_files"]}
    assert set(reasons) == {f"snapshots/{p.name}" for p in (cut, old, evil)}
    assert "truncated" in reasons[f"snapshots/{cut.name}"]
    assert "bare tensor" in reasons[f"snapshots/{old.name}"]
    assert "weights_only" in reasons[f"snapshots/{evil.name}"]
    assert not (tmp_path / "ran").exists()


def test_read_final_center_checks_every_shard(tmp_path: Path, numel: int):
    cfg = TrainConfig(method="easgd", workers=2, steps=1, mode="async", servers=2,
                      out=str(tmp_path / "run"))  # fmt: skip
    paths = RunPaths(cfg.out).make()
    half = numel // 2
    for shard, (lo, hi) in enumerate([(0, half), (half, numel)]):
        state = {"center": torch.full((hi - lo,), float(shard)), "t": 1, "v": None, "z": None}
        write_checkpoint(paths.server_checkpoint(shard), state, hp=cfg.hyperparams(), offset=lo,
                         numel=hi - lo, exchanges=1)  # fmt: skip
    final = read_final_center(cfg, paths, numel=numel)
    assert final.skipped == [] and final.center is not None
    assert_close(final.center[half - 1 : half + 1], torch.tensor([0.0, 1.0]))
    paths.server_checkpoint(1).write_bytes(b"")
    final = read_final_center(cfg, paths, numel=numel)
    assert final.center is None
    assert [s["file"] for s in final.skipped] == ["checkpoints/server-1.pt"]


def test_the_writer_trusts_only_files_it_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The file being rotated is read back only when this process did not write it."""
    path, kind = tmp_path / "center.pt", CheckpointKind.CENTER
    write_good(path, kind, t=1)
    reads: list[Path] = []
    real = checkpoint_module._read
    monkeypatch.setattr(checkpoint_module, "_read", lambda p: reads.append(p) or real(p))
    write_good(path, kind, t=2)
    assert reads == []
    checkpoint_module._written.clear()  # another process (a restarted server) writes next
    write_good(path, kind, t=3)
    assert reads == [path]


def test_garbage_is_not_mistaken_for_a_crafted_pickle(tmp_path: Path):
    path = tmp_path / "x.pt"
    path.write_bytes(b"x")  # the weights_only unpickler refuses it too, for another reason
    with pytest.raises(CheckpointError, match=r"is not a readable torch file, 1 bytes") as err:
        load_checkpoint(path, CheckpointKind.CENTER)
    assert "could run code" not in str(err.value)
