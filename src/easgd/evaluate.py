"""Evaluation of a model (the center variable) on a test set."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["evaluate_model"]


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
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        logits = model(xb)
        total_loss += float(torch.nn.functional.cross_entropy(logits, yb, reduction="sum"))
        wrong += int((logits.argmax(1) != yb).sum())
    model.train(was_training)
    return {"loss": total_loss / len(x), "error": wrong / len(x)}
