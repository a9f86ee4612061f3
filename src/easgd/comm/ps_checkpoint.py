"""The parameter server's checkpoint: its format, how it is written and how it is read back.

A shard's checkpoint is a :mod:`easgd.runlog.checkpoint` file of kind ``server_shard``:
the center's tensors (``center``, and ``v``/``z`` when the method keeps them) with a digest,
the method, the shard's ``offset``/``numel``/dtype and its clock ``t``, and as ``meta`` the
full hyperparameters (``hp``), the server's ``exchanges`` and any other plain values of the
state the server passes (its recovery counters), so that a server restarts from it alone
(:meth:`easgd.comm.ps_server.ParameterServer.from_checkpoint`). Writing keeps the previous
checkpoint (``server-<s>.prev.pt``); reading verifies the file and falls back to the previous
one when the newest is refused, with a warning. Every failure is a
:class:`easgd.runlog.CheckpointError` naming the file, what is wrong and what to do.
"""

from __future__ import annotations

import os
from typing import Any

from torch import Tensor

from easgd.algorithms import Center, Hyperparams
from easgd.runlog.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    CheckpointKind,
    load_checkpoint,
    save_checkpoint,
)

__all__ = ["CHECKPOINT_FORMAT", "read_checkpoint", "write_checkpoint"]

_KIND = CheckpointKind.SERVER_SHARD
_META_KEYS = ("hp", "exchanges")  # written here, not taken from the server's state


def write_checkpoint(
    path: str | os.PathLike[str],
    center_state: dict[str, Any],
    *,
    hp: Hyperparams,
    offset: int,
    numel: int,
    exchanges: int,
) -> None:
    """Save a shard atomically, keeping the previous checkpoint.

    ``center_state``: a consistent copy of ``Center.state_dict()`` (``center``, ``t``, ``v``,
    ``z``) and any other plain JSON values the server wants back (e.g. recovery counters).
    """
    tensors = {k: v for k, v in center_state.items() if isinstance(v, Tensor) or v is None}
    extra = {k: v for k, v in center_state.items() if k not in tensors and k != "t"}
    if "center" not in tensors or tensors["center"] is None:
        raise ValueError(f"write_checkpoint({path}): center_state has no 'center' tensor")
    if tensors["center"].numel() != numel:
        raise ValueError(
            f"write_checkpoint({path}): numel={numel} but the center has "
            f"{tensors['center'].numel()} elements"
        )
    clash = sorted(set(extra) & set(_META_KEYS))
    if clash:
        raise ValueError(f"write_checkpoint({path}): {clash} are written here; do not pass them")
    meta = {**extra, "hp": hp.to_dict(), "exchanges": int(exchanges)}
    save_checkpoint(
        path, _KIND, tensors, method=hp.method, t=int(center_state["t"]), offset=offset, meta=meta
    )


def read_checkpoint(
    path: str | os.PathLike[str],
    *,
    method: str | None = None,
    numel: int | None = None,
    offset: int | None = None,
    allow_nonfinite: bool = False,
    fallback: bool = True,
) -> dict[str, Any]:
    """A server's checkpoint, verified, as a dict.

    Keys: ``center`` (the shard), ``evaluation`` (the method's result, as
    :meth:`easgd.algorithms.Center.evaluation_vector` says: the average ``z`` of
    ADOWNPOUR/MVADOWNPOUR, else the center), ``offset``, ``numel``, ``t``, ``v``, ``z``,
    ``exchanges``, ``hp`` (:meth:`Hyperparams.to_dict`), ``saved_at``, the other values the
    server saved, and ``file`` (the file read: the previous checkpoint after a fallback) and
    ``refused`` (the :class:`easgd.runlog.CheckpointError` of each file refused before it).

    ``method``, ``numel``, ``offset``: what the caller needs (None: anything); see
    :func:`easgd.runlog.load_checkpoint` for ``allow_nonfinite`` and ``fallback``. Raises
    :class:`easgd.runlog.CheckpointError` (a ``ValueError``) when no file verifies.
    """
    ckpt = load_checkpoint(
        path, _KIND, method=method, numel=numel, offset=offset,
        allow_nonfinite=allow_nonfinite, fallback=fallback,
    )  # fmt: skip
    meta = ckpt.meta
    try:
        hp = Hyperparams.from_dict(meta["hp"])
        if hp.method != ckpt.method:
            raise ValueError(f"its hp.method={hp.method!r} is not its method {ckpt.method!r}")
        exchanges = int(meta["exchanges"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            ckpt.path, f"its hyperparameters or counters do not validate ({exc})",
            "it was not written by easgd's parameter server; start the run again",
        ) from exc  # fmt: skip
    state: dict[str, Any] = {k: v for k, v in meta.items() if k not in _META_KEYS}
    state.update(
        center=ckpt.center, v=ckpt.tensors.get("v"), z=ckpt.tensors.get("z"), t=ckpt.t,
        offset=ckpt.offset, numel=ckpt.numel, exchanges=exchanges, hp=hp.to_dict(),
        saved_at=ckpt.saved_at, file=ckpt.path, refused=ckpt.refused,
    )  # fmt: skip
    try:
        state["evaluation"] = _evaluation_vector(hp, state)
    except (RuntimeError, AssertionError, ValueError) as exc:  # v or z of the wrong shape
        raise CheckpointError(
            ckpt.path, f"its state does not fit a {hp.method} center ({exc})",
            "it was not written by easgd's parameter server; start the run again",
        ) from exc  # fmt: skip
    return state


def _evaluation_vector(hp: Hyperparams, state: dict[str, Any]) -> Tensor:
    """The evaluated vector of a saved shard, as the method's spec decides."""
    center = Center(hp, state["center"].clone())
    for name in ("v", "z"):
        mine, theirs = getattr(center, name), state.get(name)
        if mine is not None and (theirs is None or theirs.shape != mine.shape):
            raise ValueError(f"{name} is {None if theirs is None else tuple(theirs.shape)}, "
                             f"the center needs {tuple(mine.shape)}")  # fmt: skip
    center.load_state_dict(state)
    return center.evaluation_vector()
