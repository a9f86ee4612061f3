"""Deterministic mini-batches: an endless training stream and a sequential test pass.

The simulator and the distributed workers must draw the same batches from the same seed:
parity tests depend on it. :class:`BatchStream` is therefore a pure function of ``(seed,
step)``: the order of epoch ``e`` comes from a generator seeded with
``seed * 1_000_003 + e``, and the transform of step ``t`` (e.g. random crops) from one
seeded with a mix of ``(seed, t)``. Nothing depends on global RNG state or on how many
streams exist, and a stream restored from :meth:`BatchStream.state_dict` continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["BatchStream", "iter_batches"]

_MASK64 = (1 << 64) - 1


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) & _MASK64


def _step_seed(seed: int, step: int) -> int:
    """splitmix64 of ``(seed, step)``: decorrelated from the epoch seeds and from each other."""
    z = (_epoch_seed(seed, step) + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _check_batch_size(batch_size: int, upper: int | None = None) -> None:
    valid = isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1
    if not valid or (upper is not None and batch_size > upper):
        limit = f"1..{upper} (the number of samples)" if upper is not None else ">= 1"
        raise ValueError(f"Invalid batch_size: {batch_size!r}; it must be an integer in {limit}")


class BatchStream:
    """An endless, reproducible stream of ``(xb, yb)`` mini-batches for one worker.

    Each epoch visits a fresh permutation of the samples in chunks of ``batch_size``; the
    last ``N % batch_size`` samples of the permutation are dropped, so every step sees exactly
    ``batch_size`` samples (and different samples are dropped each epoch).

    Args:
        x: inputs, indexed along dimension 0.
        y: targets, same length as ``x``.
        batch_size: samples per batch, 1..N.
        seed: the stream's seed; give each worker its own (``seed + rank``), or the same one
            to make two streams identical.
        transform: ``(xb, generator) -> xb`` applied to each batch, e.g.
            ``Dataset.train_transform`` (default None).

    Attributes:
        epoch: current epoch, from 0.
        position: offset in the current epoch's permutation of the next batch's first sample.
        steps: batches returned so far.

    Example:
        >>> stream = BatchStream(torch.arange(10.0), torch.arange(10), 4, seed=0)
        >>> xb, yb = next(stream)
        >>> xb.shape
        torch.Size([4])
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        seed: int,
        transform: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    ) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        _check_batch_size(batch_size, upper=x.shape[0])
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.seed = int(seed)
        self.transform = transform
        self.epoch = 0
        self.position = 0
        self.steps = 0
        self._order = self._permutation(0)

    @property
    def num_samples(self) -> int:
        return int(self.x.shape[0])

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def _permutation(self, epoch: int) -> Tensor:
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=generator).to(self.x.device)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        if self.position + self.batch_size > self.num_samples:
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        index = self._order[self.position : self.position + self.batch_size]
        xb, yb = self.x[index], self.y[index]
        if self.transform is not None:
            generator = torch.Generator().manual_seed(_step_seed(self.seed, self.steps))
            xb = self.transform(xb, generator)
        self.position += self.batch_size
        self.steps += 1
        return xb, yb

    def state_dict(self) -> dict[str, Any]:
        """Enough to continue the same sequence: seed, sizes and the three counters."""
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_samples": self.num_samples,
            "epoch": self.epoch,
            "position": self.position,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the stream must be over the same data and batch size."""
        for key in ("batch_size", "num_samples"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"state_dict has {key}={state[key]} but this stream has "
                    f"{key}={getattr(self, key)}; build the stream with the same data and "
                    f"batch_size"
                )
        self.seed = int(state["seed"])
        self.epoch, self.position, self.steps = state["epoch"], state["position"], state["steps"]
        self._order = self._permutation(self.epoch)

    def __repr__(self) -> str:
        return (
            f"BatchStream(n={self.num_samples}, batch_size={self.batch_size}, seed={self.seed}, "
            f"epoch={self.epoch}, position={self.position}, steps={self.steps})"
        )


def iter_batches(x: Tensor, y: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Consecutive ``(xb, yb)`` slices in order, the last one possibly smaller (for evaluation)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    _check_batch_size(batch_size)
    # Not a generator function, so bad arguments raise here rather than at the first next().
    starts = range(0, x.shape[0], batch_size)
    return ((x[s : s + batch_size], y[s : s + batch_size]) for s in starts)
