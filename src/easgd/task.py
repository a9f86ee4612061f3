"""A training task (a data set and the network trained on it), shared by every runtime.

Both build the model with the same seed and draw the same batches (worker ``i`` samples with
seed ``seed + i``), so a distributed run and the simulator see exactly the same computation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["DEFAULT_MODELS", "Task", "build_task", "model_grad_fn"]

#: The network trained on each data set when none is named.
DEFAULT_MODELS = {
    "digits": "digits-cnn",
    "mnist": "lenet5-report",
    "fashion-mnist": "lenet5-report",
    "cifar10": "cifar-paper",
}


@dataclass(frozen=True)
class Task:
    """A data set and its network: a model factory, the data, and the training transform."""

    build: Callable[[], torch.nn.Module]
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    transform: Callable[[Tensor, torch.Generator], Tensor] | None
    model: str
    dataset: str


def build_task(
    dataset: str,
    model: str | None = None,
    *,
    seed: int = 0,
    data_dir: str | None = None,
    download: bool = True,
) -> Task:
    """Load ``dataset`` and return a factory of ``model`` initialized from ``seed``."""
    from easgd.data import load_dataset
    from easgd.models import build_model

    data = load_dataset(dataset, data_dir=data_dir, download=download)
    name = model or DEFAULT_MODELS.get(data.name, "mlp")

    def build() -> torch.nn.Module:
        return build_model(
            name,
            num_classes=data.num_classes,
            in_channels=data.in_channels,
            image_size=data.image_size,
            seed=seed,
        )

    build()  # fail here, with the model's message, if the shapes do not fit
    return Task(
        build=build,
        train=(data.train_x, data.train_y),
        test=(data.test_x, data.test_y),
        transform=data.train_transform,
        model=name,
        dataset=data.name,
    )


def model_grad_fn(
    model: torch.nn.Module, flat: Any, stream: Any, device: torch.device | None = None
) -> Callable[[Tensor, Tensor], float]:
    """A gradient oracle ``fn(x, out) -> loss`` over ``model``'s next mini-batch.

    ``flat`` is the model's :class:`easgd.flat.FlatParams`. When ``x`` and ``out`` are the
    flat buffers themselves (the fast path: the worker's vector *is* the model) nothing is
    copied; otherwise ``x`` is loaded into the model and the gradient copied into ``out``.
    """
    loss_fn = torch.nn.functional.cross_entropy

    def fn(x: Tensor, out: Tensor) -> float:
        if x.data_ptr() != flat.params.data_ptr():
            flat.params.copy_(x)
        xb, yb = next(stream)
        if device is not None:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        flat.zero_grad_()
        model.train()
        loss = loss_fn(model(xb), yb)
        loss.backward()
        if out.data_ptr() != flat.grads.data_ptr():
            out.copy_(flat.grads)
        return float(loss.detach())

    return fn
