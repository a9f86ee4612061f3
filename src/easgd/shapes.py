"""The output shape of every layer of a sequential network, by arithmetic alone.

:func:`feature_shapes` follows a model's layers from their hyper-parameters (kernel, stride,
padding, dilation, ceil mode, features) without running it, so it is instant even for
the 61M-parameter ``imagenet-paper`` network and works on the meta device.
:func:`accepted_image_sizes` and :func:`size_ranges` turn it into the "it accepts image
sizes 28-31" of :func:`easgd.models.build_model`'s error messages.

This module changes when a new kind of layer must be followed; which networks exist is
:mod:`easgd.models`' business. Example::

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 5), nn.MaxPool2d(2), nn.Flatten())
    >>> feature_shapes(net, (3, 28, 28))
    [('0', (8, 24, 24)), ('1', (8, 12, 12)), ('2', (1152,))]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

__all__ = ["accepted_image_sizes", "feature_shapes", "size_ranges"]


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


def _window_out(size: int, kernel: int, stride: int, pad: int, dilation: int, ceil: bool) -> int:
    span = size + 2 * pad - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil else span // stride) + 1
    # PyTorch drops a last ceil-mode window that would start inside the right padding.
    if ceil and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _layer_output(layer: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(layer, nn.Conv2d | nn.MaxPool2d):
        if len(shape) != 3:
            raise ValueError(f"expects a (C, H, W) input, got {shape}")
        if isinstance(layer, nn.Conv2d):
            if shape[0] != layer.in_channels:
                raise ValueError(f"expects {layer.in_channels} channels, got {shape[0]}")
            channels, ceil = layer.out_channels, False
        else:
            channels, ceil = shape[0], layer.ceil_mode
        padding = layer.padding
        if isinstance(padding, str):
            raise TypeError(f"feature_shapes cannot follow padding={padding!r}")
        args = zip(
            shape[1:],
            _pair(layer.kernel_size),
            _pair(layer.stride),
            _pair(padding),
            _pair(layer.dilation),
            strict=True,
        )
        h, w = (_window_out(s, k, st, p, d, ceil) for s, k, st, p, d in args)
        if h < 1 or w < 1:
            raise ValueError(f"gets a {shape[1]}x{shape[2]} map, too small for its window")
        return (channels, h, w)
    if isinstance(layer, nn.Linear):
        if shape[-1] != layer.in_features:
            raise ValueError(f"expects {layer.in_features} features, got {shape[-1]}")
        return (*shape[:-1], layer.out_features)
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        if shape[0] != layer.num_features:
            raise ValueError(f"expects {layer.num_features} channels, got {shape[0]}")
        return shape
    if isinstance(layer, nn.Flatten) and layer.start_dim == 1 and layer.end_dim == -1:
        return (math.prod(shape),)
    if isinstance(layer, nn.ReLU | nn.Dropout | nn.Identity):
        return shape
    raise TypeError(f"feature_shapes cannot follow a {type(layer).__name__} layer")


def feature_shapes(
    model: nn.Module, input_shape: Sequence[int]
) -> list[tuple[str, tuple[int, ...]]]:
    """The output shape (without the batch dimension) of every layer of a sequential model.

    Computed by arithmetic from the layers' hyper-parameters, without running the model.
    Follows ``Conv2d``, ``MaxPool2d``, ``Linear``, ``BatchNorm``, ``Flatten``, ``ReLU``,
    ``Dropout`` and ``Identity`` (else ``TypeError``).

    Raises:
        ValueError: a layer cannot take what the previous one produces; the message names it.
    """
    shape = tuple(int(s) for s in input_shape)
    out: list[tuple[str, tuple[int, ...]]] = []
    for name, layer in model.named_children():
        try:
            shape = _layer_output(layer, shape)
        except ValueError as exc:
            raise ValueError(f"layer {name!r} ({type(layer).__name__}) {exc}") from None
        out.append((name, shape))
    return out


def accepted_image_sizes(model: nn.Module, channels: int, largest: int) -> list[int]:
    """The sides ``1..largest`` of the square ``channels``-channel inputs ``model`` takes."""
    accepted = []
    for size in range(1, largest + 1):
        try:
            feature_shapes(model, (channels, size, size))
        except ValueError:
            continue
        accepted.append(size)
    return accepted


def size_ranges(sizes: Sequence[int]) -> str:
    """``[28, 29, 30, 31, 40]`` -> ``"28-31, 40"`` (sorted, non-empty ``sizes``)."""
    parts: list[str] = []
    start = prev = sizes[0]
    for s in [*sizes[1:], None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if s is not None:
            start = prev = s
    return ", ".join(parts)
