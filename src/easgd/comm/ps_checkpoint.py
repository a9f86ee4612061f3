"""The parameter server's checkpoint: its format, how it is written and how it is read back.

A checkpoint is one ``torch.save`` dict per server shard, written atomically by
:func:`easgd.runlog.atomic_torch_save` (temporary file in the same directory, fsync,
``os.replace``, fsync of the directory): readers see the previous checkpoint or the new
one, never a part. It holds the center's state (:meth:`easgd.algorithms.Center.state_dict`),
where the shard lies, the server's counters and the full hyperparameters, so that a server
restarts from it alone (:meth:`easgd.comm.ps_server.ParameterServer.from_checkpoint`).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import Tensor

from easgd.algorithms import Center, Hyperparams
from easgd.runlog import atomic_torch_save

__all__ = ["CHECKPOINT_FORMAT", "read_checkpoint", "write_checkpoint"]

CHECKPOINT_FORMAT = "easgd.ps/1"


def write_checkpoint(
    path: str | os.PathLike[str],
    center_state: dict[str, Any],
    *,
    hp: Hyperparams,
    offset: int,
    numel: int,
    exchanges: int,
) -> None:
    """Save a shard atomically; ``center_state`` is a consistent copy of ``Center.state_dict()``."""
    state = dict(center_state)
    state.update(
        format=CHECKPOINT_FORMAT,
        hp=hp.to_dict(),
        offset=offset,
        numel=numel,
        exchanges=exchanges,
        saved_at=time.time(),
    )
    atomic_torch_save(path, state)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A server's checkpoint as a dict.

    Keys: ``center`` (the shard), ``evaluation`` (the method's result, as
    :meth:`easgd.algorithms.Center.evaluation_vector` says: the average ``z`` of
    ADOWNPOUR/MVADOWNPOUR, else the center), ``offset``, ``numel``, ``t``, ``v``, ``z``,
    ``exchanges``, ``hp`` (:meth:`Hyperparams.to_dict`), ``saved_at``.

    Raises ``ValueError`` when ``path`` is not a parameter-server checkpoint.
    """
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a parameter-server checkpoint ({CHECKPOINT_FORMAT})")
    state["evaluation"] = _evaluation_vector(state)
    return state


def _evaluation_vector(state: dict[str, Any]) -> Tensor:
    """The evaluated vector of a saved shard, as the method's spec decides."""
    center = Center(Hyperparams.from_dict(state["hp"]), state["center"].clone())
    center.load_state_dict(state)
    return center.evaluation_vector()
