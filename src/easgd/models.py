"""The networks of the experiments, registered by name and built by :func:`build_model`.

Registered networks (``MODELS``; ``easgd models`` lists them with their sizes):

- ``digits-cnn``: a small CNN for scikit-learn's 8x8 digits; trains in seconds on one core.
- ``mlp``: a two-layer perceptron for any input shape (the cheapest baseline).
- ``cifar-paper``: the paper's 7-layer CIFAR network (Zhang et al. 2015, Sec. 5.1).
- ``imagenet-paper``: the paper's 11-layer ImageNet network (defined and shape-checked only).
- ``lenet5-report``: the LeNet-5 variant of the KTH student report (MNIST, C++ libtorch).

Every network is an ``nn.Sequential`` with named layers and returns logits (the softmax of
the paper's ``S`` layer lives in the cross-entropy loss), so
:func:`easgd.shapes.feature_shapes` can walk it and report the map size after every layer.
A model's parameters as one flat vector are :mod:`easgd.flat`'s. Example::

    >>> from easgd.shapes import feature_shapes
    >>> model = build_model("cifar-paper", seed=0)
    >>> [s for n, s in feature_shapes(model, (3, 28, 28)) if n.startswith("pool")]
    [(64, 12, 12), (128, 4, 4)]
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from easgd.shapes import accepted_image_sizes, feature_shapes, size_ranges

__all__ = [
    "MODELS",
    "ModelSpec",
    "build_model",
    "count_parameters",
    "describe_models",
]

Shape3 = tuple[int, int, int]
Builder = Callable[[Shape3, int], nn.Sequential]

# The largest square image size tried when an error message lists the sizes a network takes.
_SCAN_FACTOR = 4


@dataclass(frozen=True)
class ModelSpec:
    """A registered network.

    Args:
        builder: ``builder((C, H, W), num_classes)`` returns the network for that input.
        input_shape: the default input ``(C, H, W)`` (the paper's or the dataset's).
        description: one line for ``easgd models``.
        num_classes: the default width of the last layer.
    """

    builder: Builder
    input_shape: Shape3
    description: str
    num_classes: int = 10


def _seq(*layers: tuple[str, nn.Module]) -> nn.Sequential:
    return nn.Sequential(OrderedDict(layers))


def _fill_biases_(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear) and m.bias is not None:
                m.bias.fill_(value)


def _digits_cnn(shape: Shape3, num_classes: int) -> nn.Sequential:
    """conv3x3(8, pad 1) - ReLU - conv3x3(16, pad 1) - ReLU - maxpool 2 - FC 64 - ReLU - FC.

    He (Kaiming-normal) weights and zero biases: with PyTorch's default init this small net
    needs several times more SGD steps to leave the initial plateau (measured: see
    ``benchmarks/RESULTS.md``).
    """
    c, h, w = shape
    if h < 2 or w < 2:
        raise ValueError(f"needs an image of at least 2x2 (it max-pools by 2), got {h}x{w}")
    model = _seq(
        ("conv1", nn.Conv2d(c, 8, 3, padding=1)),
        ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(8, 16, 3, padding=1)),
        ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc3", nn.Linear(16 * (h // 2) * (w // 2), 64)),
        ("relu3", nn.ReLU()),
        ("fc4", nn.Linear(64, num_classes)),
    )
    for m in model.modules():
        # Initializing meta tensors would import torch._dynamo (a second at every start).
        if isinstance(m, nn.Conv2d | nn.Linear) and not m.weight.is_meta:
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    _fill_biases_(model, 0.0)
    return model


_MLP_HIDDEN = 128


def _mlp(shape: Shape3, num_classes: int) -> nn.Sequential:
    """flatten - FC 128 - ReLU - FC num_classes."""
    return _seq(
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(math.prod(shape), _MLP_HIDDEN)),
        ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(_MLP_HIDDEN, num_classes)),
    )


def _cifar_paper(shape: Shape3, num_classes: int) -> nn.Sequential:
    """The paper's CIFAR network ``(3,28) C(64,24) P(64,12) C(128,8) P(128,4) C(64,2)
    D(256,1) S(10,1)``.

    The paper gives only map sizes; the kernels are inferred from them (our choice,
    paper-spec 4): conv 5x5 s1, max-pool 2x2 s2, conv 5x5 s1, max-pool 2x2 s2, conv 3x3 s1,
    FC 256 (ReLU, dropout 0.5), FC 10. Biases start at 0 as in the paper (paper-spec 3);
    weights keep PyTorch's default init (Kaiming-uniform with ``a=sqrt(5)``): our choice,
    since the paper's weight init is in its unretrieved supplement (paper-spec 3, 8).
    """
    model = _seq(
        ("conv1", nn.Conv2d(shape[0], 64, 5)),
        ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2, 2)),
        ("conv2", nn.Conv2d(64, 128, 5)),
        ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2, 2)),
        ("conv3", nn.Conv2d(128, 64, 3)),
        ("relu3", nn.ReLU()),
        ("flatten", nn.Flatten()),
        ("fc4", nn.Linear(64 * 2 * 2, 256)),
        ("relu4", nn.ReLU()),
        ("drop4", nn.Dropout(0.5)),
        ("fc5", nn.Linear(256, num_classes)),
    )
    _fill_biases_(model, 0.0)
    return model


def _imagenet_paper(shape: Shape3, num_classes: int) -> nn.Sequential:
    """The paper's ImageNet network ``(3,221) C(96,108) P(96,36) C(256,32) P(256,16)
    C(384,14) C(384,13) C(256,12) P(256,6) D(4096,1) D(4096,1) S(1000,1)``.

    Kernels inferred from the map sizes (our choice, paper-spec 4): conv 7x7 s2 (221->108),
    max-pool 3x3 s3 (->36), conv 5x5 (->32), max-pool 2x2 s2 (->16), conv 3x3 (->14), conv
    2x2 (->13), conv 2x2 (->12), max-pool 2x2 s2 (->6), FC 9216->4096 -> FC 4096 -> FC 1000
    (ReLU and dropout 0.5 after each hidden FC). The two 14->13->12 convolutions are
    ambiguous in the paper: 2x2 valid kernels are our choice, 4x4 with padding 1 fits the
    sizes equally well. Biases
    start at 0.1 as in the paper (paper-spec 3); weights keep PyTorch's default init (our
    choice, paper-spec 3, 8). About 61M parameters: trained by ``easgd experiment
    paper-fig4`` on GPUs (docs/reproducing-the-paper.md), never on a CPU.
    """
    model = _seq(
        ("conv1", nn.Conv2d(shape[0], 96, 7, stride=2)),
        ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(3, 3)),
        ("conv2", nn.Conv2d(96, 256, 5)),
        ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2, 2)),
        ("conv3", nn.Conv2d(256, 384, 3)),
        ("relu3", nn.ReLU()),
        ("conv4", nn.Conv2d(384, 384, 2)),
        ("relu4", nn.ReLU()),
        ("conv5", nn.Conv2d(384, 256, 2)),
        ("relu5", nn.ReLU()),
        ("pool5", nn.MaxPool2d(2, 2)),
        ("flatten", nn.Flatten()),
        ("fc6", nn.Linear(256 * 6 * 6, 4096)),
        ("relu6", nn.ReLU()),
        ("drop6", nn.Dropout(0.5)),
        ("fc7", nn.Linear(4096, 4096)),
        ("relu7", nn.ReLU()),
        ("drop7", nn.Dropout(0.5)),
        ("fc8", nn.Linear(4096, num_classes)),
    )
    _fill_biases_(model, 0.1)
    return model


def _lenet5_report(shape: Shape3, num_classes: int) -> nn.Sequential:
    """The LeNet-5 variant of the KTH report (Vicente & Lindé 2024), for 1x28x28 MNIST.

    conv 5x5 (30) - ReLU - max-pool 2 - conv 5x5 (40) - ReLU - BatchNorm(40) - max-pool 2 -
    FC 640->700 - ReLU - FC 10, exactly as the report's libtorch code. The report states
    4,866,100 parameters; this architecture has 486,610 (780 + 30,040 + 80 + 448,700 +
    7,010), exactly a tenth of that, so the report's figure looks like a stray digit. The
    BatchNorm running statistics are buffers, not parameters, and are not counted.
    """
    return _seq(
        ("conv1", nn.Conv2d(shape[0], 30, 5)),
        ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2, 2)),
        ("conv2", nn.Conv2d(30, 40, 5)),
        ("relu2", nn.ReLU()),
        ("bn2", nn.BatchNorm2d(40)),
        ("pool2", nn.MaxPool2d(2, 2)),
        ("flatten", nn.Flatten()),
        ("fc3", nn.Linear(4 * 4 * 40, 700)),
        ("relu3", nn.ReLU()),
        ("fc4", nn.Linear(700, num_classes)),
    )


MODELS: dict[str, ModelSpec] = {
    "digits-cnn": ModelSpec(
        _digits_cnn, (1, 8, 8), "small CNN for scikit-learn digits: 2 conv 3x3, pool, 2 FC"
    ),
    "mlp": ModelSpec(_mlp, (1, 8, 8), f"2-layer perceptron ({_MLP_HIDDEN} hidden), any input"),
    "cifar-paper": ModelSpec(
        _cifar_paper, (3, 28, 28), "paper's 7-layer CIFAR-10 net (3 conv, 2 FC), biases 0"
    ),
    "imagenet-paper": ModelSpec(
        _imagenet_paper,
        (3, 221, 221),
        "paper's 11-layer ImageNet net (5 conv, 3 FC), biases 0.1",
        num_classes=1000,
    ),
    "lenet5-report": ModelSpec(
        _lenet5_report, (1, 28, 28), "LeNet-5 variant of the KTH report (MNIST, BatchNorm)"
    ),
}


def _lookup(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; valid names: {', '.join(MODELS)} (see `easgd models`)"
        ) from None


def _check_positive(value: int | None, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{what}={value!r} must be a positive integer")


def build_model(
    name: str,
    *,
    num_classes: int | None = None,
    in_channels: int | None = None,
    image_size: int | None = None,
    seed: int | None = None,
    device: torch.device | str | None = None,
    height: int | None = None,
) -> nn.Module:
    """Build a registered network (see ``MODELS``) that returns logits.

    Args:
        name: a key of ``MODELS``, e.g. ``"cifar-paper"``.
        num_classes: width of the last layer (default: the network's, 1000 for
            ``imagenet-paper`` and 10 for the others).
        in_channels: input channels (default: the network's, e.g. 3 for ``cifar-paper``).
        image_size: side of the square input (default: the network's, e.g. 28).
        seed: if given, the initial parameters depend on it alone: the same seed gives
            bit-identical parameters (all EASGD workers and the center start from one init).
            The global RNG is left untouched. If ``None``, the global RNG draws the init.
        device: where the parameters live (default CPU). The init is drawn on the CPU and
            moved, so a seed gives the same values on every device; ``"meta"`` builds the
            shapes only, without allocating or initializing anything.
        height: the input's height when it is not square (default ``image_size``, which is
            then the width), e.g. for your own data (:mod:`easgd.data.custom`).

    Raises:
        ValueError: an unknown name, a non-positive size, or an input shape the network
            cannot take (the message lists the image sizes it accepts).
    """
    spec = _lookup(name)
    _check_positive(num_classes, "num_classes")
    _check_positive(in_channels, "in_channels")
    _check_positive(image_size, "image_size")
    _check_positive(height, "height")
    c, h, w = spec.input_shape
    shape = (in_channels or c, height or image_size or h, image_size or w)
    num_classes = num_classes or spec.num_classes
    with torch.device("meta"):
        try:
            skeleton = spec.builder(shape, num_classes)
        except ValueError as exc:
            raise ValueError(f"model {name!r} cannot take input {shape}: {exc}") from None
    try:
        feature_shapes(skeleton, shape)
    except ValueError as exc:
        sizes = accepted_image_sizes(skeleton, shape[0], _SCAN_FACTOR * h)
        accepts = f"image sizes {size_ranges(sizes)}" if sizes else f"input {spec.input_shape}"
        raise ValueError(
            f"model {name!r} cannot take input {shape}: {exc}; it accepts {accepts} "
            f"(default {spec.input_shape})"
        ) from None
    if torch.device(device or "cpu").type == "meta":
        return skeleton
    if seed is None:
        model = spec.builder(shape, num_classes)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = spec.builder(shape, num_classes)
    return model.to(device) if device is not None else model


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (buffers such as BatchNorm running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def describe_models() -> list[dict[str, Any]]:
    """One dict per registered network at its default shape: ``name``, ``input_shape``,
    ``num_classes``, ``parameters`` (counted on the meta device: nothing is allocated) and
    ``description``."""
    return [
        {
            "name": name,
            "input_shape": spec.input_shape,
            "num_classes": spec.num_classes,
            "parameters": count_parameters(build_model(name, device="meta")),
            "description": spec.description,
        }
        for name, spec in MODELS.items()
    ]
