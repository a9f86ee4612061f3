"""Batch transforms: per-channel statistics and normalization, random and center crops.

The paper's CIFAR network takes 28x28 inputs of the 32x32 images; training on random
28x28 crops and testing on the center crop is our choice (the paper's preprocessing is in
its unretrieved supplement: paper-spec 3, 8). :class:`RandomCrop` draws one offset per
image from a :class:`torch.Generator`, so the crops a worker sees depend only on its seed
(see :class:`easgd.data.BatchStream`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["RandomCrop", "center_crop", "channel_stats", "normalize_"]


def channel_stats(x: Tensor, *, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of ``x`` of shape ``(N, C, H, W)``.

    Accumulates in float64 over chunks of images, so a 50000-image set never needs a float64
    copy of itself.
    """
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros(x.shape[1], dtype=torch.float64)
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk].to(torch.float64)
        total += part.sum(dim=(0, 2, 3))
        squares += part.square().sum(dim=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    # A constant channel would divide by zero; leave it unscaled instead.
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple(mean.tolist()), tuple(std.tolist())


def normalize_(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """In place: ``x[:, c] = (x[:, c] - mean[c]) / std[c]``; returns ``x``."""
    shape = (1, -1, 1, 1)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return x.sub_(m).div_(s)


def _check_size(x: Tensor, size: int) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected an (N, C, H, W) batch, got shape {tuple(x.shape)}")
    if not 0 < size <= min(x.shape[-2:]):
        raise ValueError(f"crop size={size} must be in 1..{min(x.shape[-2:])} for {tuple(x.shape)}")


def center_crop(x: Tensor, size: int) -> Tensor:
    """The central ``size x size`` window of each image (a view; offsets round down)."""
    _check_size(x, size)
    top = (x.shape[-2] - size) // 2
    left = (x.shape[-1] - size) // 2
    return x[..., top : top + size, left : left + size]


class RandomCrop:
    """A ``size x size`` window at an independent uniform offset for each image of a batch.

    Args:
        size: side of the crop (CIFAR: 28 of 32, the paper's network's input).

    Example:
        >>> crop = RandomCrop(28)
        >>> crop(torch.zeros(4, 3, 32, 32), torch.Generator().manual_seed(0)).shape
        torch.Size([4, 3, 28, 28])
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"Invalid crop size: {size} (must be >= 1)")
        self.size = size

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        _check_size(x, self.size)
        n, _, h, w = x.shape
        size = self.size
        # Offsets are drawn on the CPU generator whatever the batch's device. Stacking slices
        # (views) is one copy and, on a busy CPU, several times faster than a gather.
        tops = torch.randint(0, h - size + 1, (n,), generator=generator).tolist()
        lefts = torch.randint(0, w - size + 1, (n,), generator=generator).tolist()
        if n == 0:
            return x[..., :size, :size]
        windows = zip(x, tops, lefts, strict=True)
        return torch.stack([image[:, t : t + size, l : l + size] for image, t, l in windows])

    def __repr__(self) -> str:
        return f"RandomCrop({self.size})"
