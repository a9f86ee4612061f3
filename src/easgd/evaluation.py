"""Evaluation of a model (the center variable) on a test set."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["evaluate_center", "evaluate_model", "has_batchnorm", "recalibrate_batchnorm"]


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024
) -> dict[str, float]:
    """Mean cross-entropy ``loss`` and classification ``error`` (fraction wrong) on ``(x, y)``."""
    if len(x) == 0:
        raise ValueError("the test set is empty: nothing to evaluate")
    was_training = model.training
    model.eval()
    total_loss, wrong = 0.0, 0
    device = next(iter(model.parameters()), torch.empty(0)).device  # batches go to the model
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size].to(device, non_blocking=True)
        yb = y[start : start + batch_size].to(device, non_blocking=True)
        logits = model(xb)
        total_loss += float(torch.nn.functional.cross_entropy(logits, yb, reduction="sum"))
        wrong += int((logits.argmax(1) != yb).sum())
    model.train(was_training)
    return {"loss": total_loss / len(x), "error": wrong / len(x)}


def has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def recalibrate_batchnorm(
    model: torch.nn.Module,
    x: Tensor,
    batch_size: int = 256,
    batches: int = 8,
    transform: Callable[[Tensor, torch.Generator], Tensor] | None = None,
) -> None:
    """Recompute batch-norm running statistics for the current parameters.

    The center is an average of parameters and has no statistics of its own (as in SWA):
    ``torch.optim.swa_utils.update_bn`` re-estimates them, as a cumulative average, on the
    first ``batches`` batches of the training images ``x``, each passed through the training
    ``transform`` when the data set has one (the network sees what it trained on: CIFAR-10's
    28x28 crops of 32x32 images, an image folder's ``uint8`` images cropped and normalized),
    drawn from a generator seeded 0 so that every evaluation of a center sees the same
    batches.
    """
    if not has_batchnorm(model):
        return
    limit = min(len(x), batch_size * batches)
    chunks = [x[start : start + batch_size] for start in range(0, limit, batch_size)]
    if transform is not None:
        gen = torch.Generator().manual_seed(0)
        chunks = [transform(chunk, gen) for chunk in chunks]
    device = next(iter(model.parameters()), torch.empty(0)).device
    torch.optim.swa_utils.update_bn(chunks, model, device=device)


def evaluate_center(
    model: torch.nn.Module,
    flat: Any,
    center: Tensor,
    test: tuple[Tensor, Tensor],
    train_x: Tensor | None = None,
    batch_size: int = 1024,
    transform: Callable[[Tensor, torch.Generator], Tensor] | None = None,
) -> dict[str, float]:
    """Load ``center`` into ``model`` (through its flat views) and evaluate it on ``test``
    (batch norm recalibrated on ``train_x`` through the training ``transform``, if given)."""
    flat.params.copy_(center)
    if train_x is not None:
        recalibrate_batchnorm(model, train_x, transform=transform)
    return evaluate_model(model, test[0], test[1], batch_size)
