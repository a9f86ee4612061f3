"""Checkpoints and snapshots that cannot lie: one format, one writer, one verifying reader.

Every tensor file a run writes (a parameter server's shard ``checkpoints/server-<s>.pt``,
worker 0's ``checkpoints/center.pt``, a snapshot ``snapshots/center-<wall>.pt``) is one
``torch.save`` dict in the format below, written by :func:`save_checkpoint` through
:func:`easgd.runlog.atomic_write_bytes`, and read back only by :func:`load_checkpoint`, with
``torch.load(..., weights_only=True)``, so that a crafted file cannot run code.

Format ``easgd.checkpoint/1``::

    {"format": "easgd.checkpoint/1", "kind": "server_shard" | "center" | "snapshot",
     "method": "eamsgd", "numel": 1234, "dtype": "float32", "offset": 0, "t": 57,
     "saved_at": 1718000000.0,          # Unix time
     "meta": {...},                     # plain JSON data: the kind's own fields
     "tensors": {"center": Tensor, ...},
     "digest": "sha256:<64 hex digits>"}

``numel``, ``dtype`` and ``offset`` describe ``tensors["center"]`` (a flat tensor); ``t`` is
the clock (a server's center updates, a worker's local steps). The digest is SHA-256 over the
header (every field but ``tensors`` and ``digest``, as canonical JSON) and then, tensor by
tensor in name order, its name, dtype, shape and raw bytes, each piece length-prefixed.
SHA-256 was measured fastest of the hashes of :mod:`hashlib` here (about 1.6 GB/s with the
CPU's SHA extensions: 13 ms for a 20 MB center; BLAKE2b 0.9 GB/s).

Failure behaviour:

* Loading checks, in order: the file exists and is not empty; ``torch.load`` with
  ``weights_only=True`` reads it; it is a dict of this format; its digest matches; its fields
  are consistent (``numel``, ``dtype`` and the center's shape, ``t >= 0``); it is of the kind,
  method, size, offset and dtype the caller expects; every float is finite (unless
  ``allow_nonfinite``). Any failure raises :class:`CheckpointError` (a ``ValueError``)
  naming the file, what is wrong and what to do; never a silently altered center, never an
  unnamed ``EOFError``.
* Before a checkpoint (not a snapshot) is replaced, the current file, if it verifies, is
  kept as ``<stem>.prev<suffix>`` (``server-0.prev.pt``) by a hard link and a rename; then
  the new file is written atomically. A crash at any point leaves at least one verified file.
* :func:`load_checkpoint` falls back to the previous file when the newest is refused, with a
  logged warning naming both files and why the newest was refused; the returned
  :class:`Checkpoint` lists the refused files (``refused``), so that callers can report them.

Example::

    save_checkpoint(path, CheckpointKind.CENTER, {"center": x}, method="easgd", t=100,
                    meta={"wall": 12.5})
    ckpt = load_checkpoint(path, CheckpointKind.CENTER, method="easgd", numel=x.numel())
    ckpt.center, ckpt.t, ckpt.meta["wall"], ckpt.refused
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import io
import json
import logging
import math
import os
import pickle
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import torch
from torch import Tensor

from easgd.runlog.writers import atomic_write_bytes

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "CheckpointError",
    "CheckpointKind",
    "checkpoint_digest",
    "load_checkpoint",
    "previous_checkpoint",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT: Final = "easgd.checkpoint/1"
_LEGACY_FORMATS: Final = {"easgd.ps/1": "a parameter-server checkpoint"}
_DIGEST_PREFIX: Final = "sha256:"
_HEADER_TYPES: Final[dict[str, type | tuple[type, ...]]] = {
    "kind": str, "method": str, "numel": int, "dtype": str, "offset": int, "t": int,
    "saved_at": (int, float), "meta": dict, "tensors": dict, "digest": str,
}  # fmt: skip


class CheckpointKind(str, enum.Enum):
    """What a file holds (its ``kind``)."""

    SERVER_SHARD = "server_shard"  # checkpoints/server-<s>.pt: a parameter server's shard
    CENTER = "center"  # checkpoints/center.pt: worker 0's center (sync and sequential runs)
    SNAPSHOT = "snapshot"  # snapshots/center-<wall>.pt: the center at a wall time

    def __str__(self) -> str:
        return self.value


class CheckpointError(ValueError):
    """A checkpoint or snapshot that does not verify: ``path``, ``problem``, ``advice``."""

    def __init__(self, path: str | os.PathLike[str], problem: str, advice: str) -> None:
        self.path, self.problem, self.advice = Path(path), problem, advice
        super().__init__(f"{self.path}: {problem}; {advice}")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A verified file: its header, its tensors, and the newer files refused before it."""

    path: Path  # the file read: the previous checkpoint when the newest was refused
    kind: CheckpointKind
    method: str
    numel: int
    dtype: torch.dtype
    offset: int
    t: int
    saved_at: float
    meta: dict[str, Any]
    tensors: dict[str, Tensor]
    digest: str
    refused: tuple[CheckpointError, ...] = ()

    @property
    def center(self) -> Tensor:
        return self.tensors["center"]


def previous_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Where the previous version of checkpoint ``path`` is kept: ``server-0.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------


def save_checkpoint(
    path: str | os.PathLike[str],
    kind: CheckpointKind | str,
    tensors: Mapping[str, Tensor | None],
    *,
    method: str,
    t: int,
    offset: int = 0,
    meta: Mapping[str, Any] | None = None,
    keep_previous: bool | None = None,
) -> Checkpoint:
    """Write ``tensors`` (``"center"`` required, flat; ``None`` entries dropped) atomically.

    ``meta``: plain JSON data (dicts, lists, str, numbers, bool, None) kept beside the
    tensors. ``keep_previous`` (default: True except for snapshots) keeps the file being
    replaced as :func:`previous_checkpoint` when it verifies. Returns what was written.
    """
    kind = CheckpointKind(kind)
    path = Path(path)
    plain = {name: _plain(name, x) for name, x in tensors.items() if x is not None}
    center = plain.get("center")
    if center is None or center.dim() != 1:
        raise ValueError(f"save_checkpoint({path}): tensors['center'] must be a flat tensor")
    if int(t) < 0:
        raise ValueError(f"save_checkpoint({path}): t={t} must be >= 0")
    if int(offset) < 0:
        raise ValueError(f"save_checkpoint({path}): offset={offset} must be >= 0")
    try:  # exactly what JSON holds, so the digest reads the same after a round trip
        data = json.loads(json.dumps(dict(meta or {}), allow_nan=True))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"save_checkpoint({path}): meta must be plain JSON data: {exc}") from exc
    header: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT, "kind": kind.value, "method": str(method),
        "numel": center.numel(), "dtype": _dtype_name(center.dtype), "offset": int(offset),
        "t": int(t), "saved_at": time.time(), "meta": data,
    }  # fmt: skip
    digest = checkpoint_digest(header, plain)
    buf = io.BytesIO()
    torch.save({**header, "tensors": plain, "digest": digest}, buf)
    if keep_previous is None:
        keep_previous = kind is not CheckpointKind.SNAPSHOT
    if keep_previous:
        _keep_previous(path)
    atomic_write_bytes(path, buf.getvalue())
    _remember(path)
    return Checkpoint(
        path, kind, header["method"], header["numel"], center.dtype, header["offset"],
        header["t"], header["saved_at"], data, plain, digest,
    )  # fmt: skip


def checkpoint_digest(header: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> str:
    """``"sha256:<hex>"`` of a header (no ``tensors``/``digest``) and the tensors' bytes."""
    h = hashlib.sha256()

    def piece(data: bytes | memoryview) -> None:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    fields = {k: v for k, v in header.items() if k not in ("tensors", "digest")}
    piece(json.dumps(fields, sort_keys=True, allow_nan=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        x = tensors[name]
        piece(json.dumps([name, _dtype_name(x.dtype), list(x.shape)]).encode())
        raw = x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        piece(raw.data)
    return _DIGEST_PREFIX + h.hexdigest()


def _plain(name: str, x: Tensor) -> Tensor:
    """A CPU tensor that owns exactly its bytes (torch.save writes a view's whole storage)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"save_checkpoint: tensors[{name!r}] is a {type(x).__name__}")
    x = x.detach().cpu()
    if not x.is_contiguous() or x.untyped_storage().nbytes() != x.numel() * x.element_size():
        x = x.clone(memory_format=torch.contiguous_format)
    return x


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


#: Files this process wrote: path -> (device, inode, size, mtime). A file that still has the
#: same identity need not be read back before it is kept as the previous checkpoint.
_written: dict[str, tuple[int, int, int, int]] = {}


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _remember(path: Path) -> None:
    identity = _identity(path)
    if identity is not None:
        _written[os.path.abspath(path)] = identity


def _keep_previous(path: Path) -> None:
    """Keep ``path`` as its previous checkpoint if it verifies (else keep the older one)."""
    identity = _identity(path)
    if identity is None:
        return  # nothing to keep: the first checkpoint
    if _written.get(os.path.abspath(path)) != identity:
        try:
            _verify(path, _read(path))
        except CheckpointError as exc:
            log.warning("not keeping %s as the previous checkpoint: %s", path, exc.problem)
            return
    prev = previous_checkpoint(path)
    link = prev.with_name(f".{prev.name}.{os.getpid()}.link")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError:  # a file system without hard links: copy it
        atomic_write_bytes(prev, path.read_bytes())
        return
    try:
        os.replace(link, prev)  # made durable by the fsync of the folder that follows
    except BaseException:
        link.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------

_DAMAGED = (
    "the file was damaged after it was written (a crash, a full disk, a copy or an edit); "
    "resume from the previous checkpoint ({prev}) if it verifies, or start the run again"
)
_FOREIGN = (
    "it belongs to another run or model; point to this run's file, or start the run again "
    "with the settings it was made with"
)
_IMPOSSIBLE = (
    "its digest matches but its contents are impossible, so it was not written by easgd "
    "(or by a bug in it); resume from a file this run wrote, or start the run again"
)
_UNVERIFIABLE = (
    "it carries no digest ({fmt} files do), so it cannot be verified; start the run again "
    "with this easgd"
)


def load_checkpoint(
    path: str | os.PathLike[str],
    kind: CheckpointKind | str,
    *,
    method: str | None = None,
    numel: int | None = None,
    offset: int | None = None,
    dtype: torch.dtype | None = None,
    allow_nonfinite: bool = False,
    fallback: bool = True,
) -> Checkpoint:
    """Read and verify ``path``; with ``fallback``, its previous checkpoint if it is refused.

    ``method``, ``numel``, ``offset`` and ``dtype``: what the caller needs (None: anything).
    ``allow_nonfinite``: accept NaN or infinite values (a diverged run's true state).
    Raises :class:`CheckpointError` when neither file verifies (the message names both).
    """
    kind = CheckpointKind(kind)
    read = functools.partial(
        _load_one, kind=kind, method=method, numel=numel, offset=offset, dtype=dtype,
        allow_nonfinite=allow_nonfinite,
    )  # fmt: skip
    path = Path(path)
    try:
        return read(path)
    except CheckpointError as newest:
        prev = previous_checkpoint(path)
        if not fallback or not prev.exists():
            raise
        try:
            older = read(prev)
        except CheckpointError as also:
            raise CheckpointError(
                path,
                f"{newest.problem}; its previous checkpoint {prev} is refused too: {also.problem}",
                "nothing verified is left to resume from; start the run again",
            ) from newest
        log.warning(
            "%s is refused (%s); using the previous checkpoint %s instead (t=%d)",
            path, newest.problem, prev, older.t,
        )  # fmt: skip
        return dataclasses.replace(older, refused=(newest,))


def _load_one(
    path: Path,
    *,
    kind: CheckpointKind,
    method: str | None,
    numel: int | None,
    offset: int | None,
    dtype: torch.dtype | None,
    allow_nonfinite: bool,
) -> Checkpoint:
    ckpt = _verify(path, _read(path))
    if ckpt.kind is not kind:
        raise CheckpointError(path, f"is a {ckpt.kind.value} file, not a {kind.value}", _FOREIGN)
    if method is not None and ckpt.method != method:
        raise CheckpointError(
            path, f"holds a {ckpt.method} center but this run's method is {method}",
            "resume with the method it was made with, or point to a checkpoint of this method",
        )  # fmt: skip
    if numel is not None and ckpt.numel != numel:
        diff = ckpt.numel - numel
        raise CheckpointError(
            path, f"holds {ckpt.numel} elements but {numel} are needed "
            f"({abs(diff)} too {'many' if diff > 0 else 'few'})", _FOREIGN,
        )  # fmt: skip
    if offset is not None and ckpt.offset != offset:
        raise CheckpointError(
            path, f"is the shard at offset {ckpt.offset}, not at offset {offset}", _FOREIGN
        )
    if dtype is not None and ckpt.dtype != dtype:
        raise CheckpointError(path, f"holds {ckpt.dtype}, not {dtype}", _FOREIGN)
    if not allow_nonfinite:
        for name, x in ckpt.tensors.items():
            # A float64 sum is finite exactly when every value is (it cannot overflow for
            # float32 data), and costs a fifth of isfinite(): the exact check only on failure.
            if not x.is_floating_point() or math.isfinite(float(x.sum(dtype=torch.float64))):
                continue
            bad = ~torch.isfinite(x)
            if bool(bad.any()):
                first = int(bad.reshape(-1).nonzero()[0])
                raise CheckpointError(
                    path, f"{name} has {int(bad.sum())} NaN or infinite values (the first at "
                    f"index {first})", "the run diverged before this file was written; resume "
                    "from an earlier checkpoint with a smaller learning rate",
                )  # fmt: skip
    return ckpt


def _read(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of ``path``, every failure a CheckpointError."""
    damaged = _DAMAGED.format(prev=previous_checkpoint(path).name)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(path, "does not exist", "check the path") from None
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc})", "check the path") from exc
    if size == 0:
        raise CheckpointError(path, "is empty (0 bytes): its write never completed", damaged)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, a text file, a crafted pickle, ...
        detail = _torch_detail(exc)
        if isinstance(exc, pickle.UnpicklingError) and re.search(r"GLOBAL|global|reduce", detail):
            raise CheckpointError(
                path, "holds Python objects no checkpoint contains (torch.load with "
                f"weights_only=True refused them: {detail}; loading it otherwise could run code)",
                "do not load it with weights_only=False; delete it and resume from a file "
                "this run wrote",
            ) from None  # fmt: skip
        raise CheckpointError(
            path, f"is not a readable torch file, {size} bytes ({type(exc).__name__}: "
            f"{detail}): truncated or not a checkpoint", damaged,
        ) from None  # fmt: skip


def _torch_detail(exc: BaseException) -> str:
    """What torch.load's error says about the file, without its advice to the reader."""
    text = " ".join(str(exc).split())
    if "Weights only load failed" in text:  # the detail sits between two paragraphs of advice
        text = text.split("trusted source. ", 1)[-1].split(" Check the documentation", 1)[0]
        text = text.removeprefix("Please file an issue with the following so that we can make "
                                 "`weights_only=True` compatible with your use case: ")  # fmt: skip
    text = text.split(". This is an internal miniz error", 1)[0]
    return text[:200].rstrip(".") or "no message"


def _verify(path: Path, obj: Any) -> Checkpoint:
    """The checks every file passes, whoever reads it: format, digest, consistency."""
    damaged = _DAMAGED.format(prev=previous_checkpoint(path).name)
    fmt = CHECKPOINT_FORMAT
    if isinstance(obj, Tensor):
        raise CheckpointError(
            path, "is a bare tensor (a snapshot of an older easgd)", _UNVERIFIABLE.format(fmt=fmt)
        )
    if not isinstance(obj, dict):
        raise CheckpointError(
            path, f"is not an easgd checkpoint (it holds a {type(obj).__name__})", _FOREIGN
        )
    found = obj.get("format")
    if found in _LEGACY_FORMATS:
        legacy = f"is {_LEGACY_FORMATS[found]} of an older easgd (format {found})"
        raise CheckpointError(path, legacy, _UNVERIFIABLE.format(fmt=fmt))
    if found != fmt:
        raise CheckpointError(
            path, f"is not an easgd checkpoint (format {found!r}, expected {fmt!r})", _FOREIGN
        )
    for name, types in _HEADER_TYPES.items():
        value = obj.get(name)
        if not isinstance(value, types) or isinstance(value, bool):
            raise CheckpointError(path, f"field {name!r}={value!r} is missing or mistyped", damaged)
    tensors = obj["tensors"]
    if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in tensors.items()):
        raise CheckpointError(path, "its 'tensors' are not all named tensors", damaged)
    digest = checkpoint_digest(obj, tensors)
    if obj["digest"] != digest:
        raise CheckpointError(
            path, f"its contents do not match its digest (stored {obj['digest'][:23]}..., "
            f"computed {digest[:23]}...)", damaged,
        )  # fmt: skip
    center = tensors.get("center")
    problem: str | None = None
    if center is None or center.dim() != 1:
        problem = "holds no flat 'center' tensor"
    elif center.numel() != obj["numel"] or _dtype_name(center.dtype) != obj["dtype"]:
        problem = (
            f"says numel={obj['numel']} dtype={obj['dtype']} but its center has "
            f"{center.numel()} {_dtype_name(center.dtype)} elements"
        )
    elif obj["t"] < 0:
        problem = f"has a negative clock t={obj['t']}"
    elif obj["offset"] < 0:
        problem = f"has a negative offset {obj['offset']}"
    elif obj["kind"] not in {k.value for k in CheckpointKind}:
        problem = f"is of an unknown kind {obj['kind']!r}"
    elif not math.isfinite(float(obj["saved_at"])):
        problem = f"has saved_at={obj['saved_at']!r}"
    if problem is not None:
        raise CheckpointError(path, problem, _IMPOSSIBLE)
    return Checkpoint(
        path, CheckpointKind(obj["kind"]), obj["method"], obj["numel"], center.dtype,
        obj["offset"], obj["t"], float(obj["saved_at"]), obj["meta"], dict(tensors), digest,
    )  # fmt: skip
