"""Flat parameter views: one buffer for a model's parameters, one for its gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from easgd.flat import FlatParams, parameters_to_flat_views
from easgd.models import build_model, count_parameters

torch.set_num_threads(1)


def _model_and_flat() -> tuple[nn.Module, FlatParams]:
    model = build_model("lenet5-report", seed=0).eval()  # BatchNorm: buffers stay out
    return model, parameters_to_flat_views(model)


def test_flat_views_preserve_values_and_layout() -> None:
    model = build_model("digits-cnn", seed=3)
    reference = [p.detach().clone() for p in model.parameters()]
    flat = parameters_to_flat_views(model)
    assert flat.numel == count_parameters(model) == flat.grads.numel()
    assert flat.params.is_contiguous() and flat.params.dim() == 1
    torch.testing.assert_close(flat.params, torch.cat([r.reshape(-1) for r in reference]))
    for p, r, shape, offset in zip(
        model.parameters(), reference, flat.shapes, flat.offsets, strict=True
    ):
        assert p.shape == shape and torch.equal(p, r)
        assert p.data_ptr() == flat.params[offset:].data_ptr()
        assert p.grad is not None and p.grad.data_ptr() == flat.grads[offset:].data_ptr()


def test_writing_flat_changes_the_model() -> None:
    model, flat = _model_and_flat()
    x = torch.randn(2, 1, 28, 28)
    before = model(x)
    flat.params.mul_(0.5)
    assert not torch.allclose(model(x), before)
    flat.copy_from_(torch.zeros(flat.numel, dtype=torch.float64))
    assert all(torch.count_nonzero(p) == 0 for p in model.parameters())
    with pytest.raises(ValueError, match="flat has 3 values"):
        flat.copy_from_(torch.zeros(3))


def test_backward_and_sgd_step_go_through_the_flat_buffers() -> None:
    model, flat = _model_and_flat()
    twin = build_model("lenet5-report", seed=0).eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad(set_to_none=False)
            nn.functional.cross_entropy(m(x), y).backward()
        # Backward accumulated into the flat gradient buffer, in place.
        twin_grads = torch.cat([p.grad.reshape(-1) for p in twin.parameters()])  # type: ignore[union-attr]
        torch.testing.assert_close(flat.grads, twin_grads)
        assert flat.ensure_grad_views_() == 0
        before = flat.params.clone()
        opt.step()
        twin_opt.step()
        assert not torch.equal(flat.params, before)
        torch.testing.assert_close(
            flat.params, torch.cat([p.detach().reshape(-1) for p in twin.parameters()])
        )


def test_backward_accumulates_into_the_views() -> None:
    model, flat = _model_and_flat()
    x = torch.randn(2, 1, 28, 28)
    model(x).sum().backward()
    once = flat.grads.clone()
    model(x).sum().backward()
    torch.testing.assert_close(flat.grads, 2 * once)
    assert flat.ensure_grad_views_() == 0


def test_set_to_none_detaches_and_ensure_grad_views_reattaches() -> None:
    model, flat = _model_and_flat()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 1, 28, 28)
    model(x).sum().backward()
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    model(x).sum().backward()  # fresh gradients, not views
    assert flat.grads.abs().sum() > 0  # stale: still the first backward's values
    expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]
    assert flat.ensure_grad_views_() == len(flat.shapes)
    torch.testing.assert_close(flat.grads, expected)
    flat.zero_grad_()
    model(x).sum().backward()
    torch.testing.assert_close(flat.grads, expected)
    # A gradient set to None becomes a zero view.
    first = next(model.parameters())
    first.grad = None
    assert flat.ensure_grad_views_() == 1
    assert first.grad is not None and torch.count_nonzero(first.grad) == 0


def test_flat_views_reject_mixed_dtypes() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double())
    with pytest.raises(ValueError, match="one dtype and device"):
        parameters_to_flat_views(model)
