"""A model's parameters and gradients as views into two flat buffers.

EASGD moves whole parameter vectors around (the elastic difference ``x^i - x~``, one
collective per averaging), so the optimizer wrappers, the simulator, the workers and the
evaluator all want a model's parameters as one contiguous 1-D tensor that they share with
the model without copies. :func:`parameters_to_flat_views` builds it, for any
``nn.Module``; :class:`FlatParams` keeps the views attached. Nothing here knows which
networks exist (that is :mod:`easgd.models`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["FlatParams", "buffer_of", "floating_buffers", "parameters_to_flat_views"]


def _is_view_of(t: torch.Tensor, buffer: torch.Tensor, offset: int, shape: torch.Size) -> bool:
    return (
        t.device == buffer.device
        and t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        and t.storage_offset() == buffer.storage_offset() + offset
        and t.shape == shape
        and t.is_contiguous()
    )


@dataclass
class FlatParams:
    """A model's parameters and gradients as views into two flat buffers.

    ``params[offsets[i] : offsets[i] + shapes[i].numel()]`` is the storage of the i-th
    parameter (in ``model.parameters()`` order) and likewise for ``grads``, so an optimizer
    stepping the parameters updates ``params`` in place, ``loss.backward()`` accumulates into
    ``grads``, and a collective on ``params`` updates the model, all without copies.

    Keeping the views:

    - ``optimizer.zero_grad(set_to_none=False)`` zeroes ``grads`` in place and keeps them.
    - ``set_to_none=True`` (the default of ``zero_grad``) drops them: the next backward
      allocates fresh gradients. Call :meth:`ensure_grad_views_` (or :meth:`zero_grad_`)
      after it; it re-attaches every gradient that is ``None`` or not a view.
    - Replacing ``p.data`` (``model.to(other dtype)``, ``load_state_dict(assign=True)``)
      detaches the parameters; ``load_state_dict`` without ``assign`` copies in place and is
      safe. Buffers (BatchNorm running statistics) are not parameters and are not included.
    """

    params: torch.Tensor
    grads: torch.Tensor
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    parameters: tuple[nn.Parameter, ...] = field(repr=False, compare=False)
    #: ``params`` followed by the buffers' values (``params`` is its head); equal to
    #: ``params`` when no buffers were included.
    vector: torch.Tensor | None = field(default=None, repr=False, compare=False)
    #: The included buffers as ``(module, name, qualified name)``, in ``vector`` order.
    buffers: tuple[tuple[nn.Module, str, str], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.vector is None:
            self.vector = self.params

    @property
    def numel(self) -> int:
        """Total number of scalar parameters."""
        return self.params.numel()

    def copy_from_(self, flat: torch.Tensor) -> FlatParams:
        """Copy a flat vector (any dtype/device, ``numel`` values) into the parameters."""
        if flat.numel() != self.numel:
            raise ValueError(f"flat has {flat.numel()} values, the model has {self.numel}")
        self.params.copy_(flat.reshape(-1))
        return self

    def ensure_grad_views_(self) -> int:
        """Re-attach gradients that are ``None`` or not views of ``grads``; returns how many.

        A detached gradient keeps its value (copied into ``grads``); a missing one becomes 0.
        """
        reattached = 0
        for p, shape, offset in zip(self.parameters, self.shapes, self.offsets, strict=True):
            if p.grad is not None and _is_view_of(p.grad, self.grads, offset, shape):
                continue
            view = self.grads[offset : offset + shape.numel()].view(shape)
            if p.grad is None:
                view.zero_()
            else:
                view.copy_(p.grad.detach())
            p.grad = view
            reattached += 1
        return reattached

    def zero_grad_(self) -> None:
        """Zero all gradients in place, re-attaching any view that was lost."""
        self.ensure_grad_views_()
        self.grads.zero_()


def buffer_of(module: nn.Module, name: str) -> torch.Tensor:
    """``module``'s buffer ``name`` (registered and not None)."""
    buf = module._buffers[name]
    assert buf is not None, name
    return buf


def floating_buffers(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """``model``'s floating-point buffers as ``(module, name, qualified name)``.

    These are the statistics a forward pass updates (BatchNorm's running mean and
    variance); integer buffers (``num_batches_tracked``) are counters, not averaged.
    """
    out = []
    for qualified, module in model.named_modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_floating_point():
                out.append((module, name, f"{qualified}.{name}" if qualified else name))
    return out


def parameters_to_flat_views(
    model: nn.Module, *, buffers: list[tuple[nn.Module, str, str]] | None = None
) -> FlatParams:
    """Move ``model``'s parameters (and gradients) into flat buffers; see :class:`FlatParams`.

    Current values and any existing gradients are preserved. All parameters must share one
    dtype and device. ``buffers`` (e.g. :func:`floating_buffers` of a model) are placed
    after the parameters in the same storage (``FlatParams.vector``), their modules holding
    views, so one collective moves parameters and buffers together. Example::

        >>> model = torch.nn.Linear(3, 2)
        >>> flat = parameters_to_flat_views(model)
        >>> flat.numel
        8
        >>> _ = flat.params.mul_(0.5)  # halves the model's weights in place
    """
    params = tuple(model.parameters())
    kinds = {(p.dtype, p.device) for p in params}
    if len(kinds) > 1:
        raise ValueError(
            f"parameters must share one dtype and device, got {sorted(map(str, kinds))}"
        )
    dtype, device = kinds.pop() if kinds else (torch.get_default_dtype(), torch.device("cpu"))
    shapes = tuple(p.shape for p in params)
    sizes = [s.numel() for s in shapes]
    offsets = tuple(itertools.accumulate(sizes[:-1], initial=0)) if sizes else ()
    total = sum(sizes)
    extra = list(buffers or ())
    for module, name, qualified in extra:
        buf = module._buffers[name]
        assert buf is not None
        if (buf.dtype, buf.device) != (dtype, device):
            raise ValueError(
                f"buffer {qualified!r} is {buf.dtype} on {buf.device} but the parameters are "
                f"{dtype} on {device}: one flat vector holds both; convert the model as a "
                "whole (model.to(dtype)) or leave buffers out of the averaging"
            )
    extra_total = sum(buffer_of(module, name).numel() for module, name, _ in extra)
    vector = torch.empty(total + extra_total, dtype=dtype, device=device)
    flat = vector[:total] if extra else vector
    flat_grad = torch.zeros(total, dtype=dtype, device=device)
    with torch.no_grad():
        for p, shape, offset in zip(params, shapes, offsets, strict=True):
            n = shape.numel()
            flat[offset : offset + n].copy_(p.reshape(-1))
            p.data = flat[offset : offset + n].view(shape)
            if p.grad is not None:
                flat_grad[offset : offset + n].copy_(p.grad.reshape(-1))
            p.grad = flat_grad[offset : offset + n].view(shape)
        at = total
        for module, name, _ in extra:
            buf = module._buffers[name]
            assert buf is not None
            view = vector[at : at + buf.numel()].view(buf.shape)
            view.copy_(buf)
            module._buffers[name] = view
            at += buf.numel()
    return FlatParams(flat, flat_grad, shapes, offsets, params, vector, tuple(extra))
