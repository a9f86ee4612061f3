"""A training task (a data set and the network trained on it), shared by every runtime.

Both build the model with the same seed and draw the same batches (worker ``i`` samples with
seed ``seed + i``), so a distributed run and the simulator see exactly the same computation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from easgd.config import TrainConfig

__all__ = ["DEFAULT_MODELS", "Task", "build_task", "model_grad_fn", "task_from_config"]

#: The network trained on each data set when none is named.
DEFAULT_MODELS = {
    "digits": "digits-cnn",
    "digits-hard": "digits-cnn",
    "mnist": "lenet5-report",
    "fashion-mnist": "lenet5-report",
    "cifar10": "cifar-paper",
    "imagenet": "imagenet-paper",
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
    verify: bool = True,
) -> Task:
    """Load ``dataset`` and return a factory of ``model`` initialized from ``seed``.

    ``dataset`` and ``model`` may be your own (``MODULE:FUNCTION``, ``npz:PATH``:
    :mod:`easgd.data.custom`); ``verify=False`` uses the built-in sets' files whose MD5
    differs, with a warning (``--no-verify``).
    """
    from easgd.data import load_dataset
    from easgd.data.custom import build_custom_model, is_custom, load_custom_dataset
    from easgd.models import build_model

    if is_custom(dataset):
        data = load_custom_dataset(dataset, data_dir=data_dir)
    else:
        data = load_dataset(dataset, data_dir=data_dir, download=download, verify=verify)
    name = model or DEFAULT_MODELS.get(data.name, "mlp")
    shape = (data.in_channels, int(data.test_x.shape[2]), int(data.test_x.shape[3]))

    def build() -> torch.nn.Module:
        if is_custom(name):
            return build_custom_model(name, shape, data.num_classes, seed=seed)
        return build_model(
            name,
            num_classes=data.num_classes,
            in_channels=data.in_channels,
            image_size=data.image_size,
            seed=seed,
            height=shape[1],
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


def task_from_config(cfg: TrainConfig, *, download: bool = True) -> Task:
    """The :func:`build_task` of a run: every role builds the same network on the same data.

    The network is initialized from ``cfg.init_seed`` (``cfg.seed`` when it is None).
    """
    init_seed = cfg.seed if cfg.init_seed is None else cfg.init_seed
    return build_task(
        cfg.dataset, cfg.model, seed=init_seed, data_dir=cfg.data_dir, download=download,
        verify=not cfg.no_verify,
    )  # fmt: skip


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
