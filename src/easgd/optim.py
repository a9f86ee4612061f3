"""``torch.optim``-style wrappers that add elastic averaging to a user's own training loop.

Wrap any local optimizer; every ``tau`` calls of ``step()`` the wrapper exchanges with the
center, exactly as :class:`easgd.algorithms.Worker` does (the same generator drives both):
the elastic difference ``d = alpha * (x - center)`` is taken before the local step and
subtracted after it, and the center moves by ``+d`` (asynchronously, through a parameter
server) or by ``beta/p`` times the mean difference (synchronously, one flat all-reduce).

Example (under ``torchrun``; see ``examples/own_loop.py``)::

    torch.distributed.init_process_group("gloo")
    model = Net()
    local = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    opt = easgd.optim.EASGD(local, tau=10)              # synchronous, beta = 0.9
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    opt.center_model_(model)                            # load the center to evaluate it

Notes:

* The parameters become views of one flat buffer (one collective per exchange, no
  flattening on the hot path); the optimizer keeps working on the same ``Parameter`` objects.
* ``state_dict()`` holds the local optimizer's state plus the center and the step counter;
  ``load_state_dict()`` restores both and warns (does not fail) on a checkpoint without them.
* The wrapper is a ``torch.optim.Optimizer`` of its own: step, ``state_dict`` and
  ``load_state_dict`` hooks registered on it fire once per call of the wrapper (those of the
  local optimizer keep firing on its own calls; global hooks therefore fire for both).
* Every parameter group must be given to the local optimizer before wrapping it:
  ``add_param_group`` on the wrapper raises (the new parameters would never be averaged).
* Convert or move the model (``model.double()``, ``model.to(...)``) before wrapping: a
  parameter whose storage changed afterwards is reported by the next exchange (a
  ``RuntimeError`` naming it) instead of silently dropping out of the averaging.
* Optimizers that evaluate a closure many times per step (``LBFGS``) are refused.
* With a plain ``torch.optim.SGD`` local optimizer the result equals the simulator's EASGD;
  with ``SGD(momentum=delta, nesterov=True)`` it is EAMSGD in PyTorch's parametrization of
  Nesterov momentum (the authors' form is ``easgd train --method eamsgd``).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from easgd.algorithms import METHODS, Hyperparams, Mode, Request, Worker, drive, run_settle
from easgd.comm.base import Transport
from easgd.comm.staging import Staged

if TYPE_CHECKING:
    from easgd.comm.ps_client import PSClient

__all__ = ["EAMSGD", "EASGD", "ElasticAveraging", "LocalSGD"]


class ElasticAveraging(torch.optim.Optimizer):
    """Elastic averaging (or periodic averaging) around a local optimizer.

    Args:
        optimizer: the local optimizer (any ``torch.optim.Optimizer``).
        tau: communication period in calls of ``step()`` (default 1).
        alpha, beta: moving rates; ``alpha = beta/p`` unless given (default beta = 0.9).
            Asynchronously the server's values rule: given ones must agree with them.
        method: ``"easgd"`` (default) or ``"localsgd"`` (periodic parameter averaging).
        client: an :class:`easgd.comm.ps.PSClient` for the asynchronous mode; ``None`` means
            synchronous over ``process_group``. p, alpha and beta then come from the server
            (its JOIN reply carries its hyperparameters).
        process_group: group of the synchronous mode (default: the default group).
        enabled: ``False`` turns every exchange off (the local optimizer alone): for
            measuring the wrapper's overhead.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        tau: int = 1,
        alpha: float | None = None,
        beta: float | None = None,
        method: str = "easgd",
        client: PSClient | None = None,
        process_group: dist.ProcessGroup | None = None,
        enabled: bool = True,
    ) -> None:
        from easgd.flat import parameters_to_flat_views

        spec = METHODS.get(method)
        if spec is None or not spec.wraps_optimizer or spec.sequential:
            raise ValueError(f"method={method!r}; the wrapper supports easgd and localsgd")
        _refuse_closure_optimizers(optimizer)
        self._init_optimizer_hooks()
        self.optimizer = optimizer
        self.client = client
        self.process_group = process_group
        self.enabled = enabled
        mode = Mode.ASYNC if client is not None else Mode.SYNC
        spec.resolve_mode(mode)  # localsgd has no asynchronous form: say so
        synchronous = mode is Mode.SYNC
        if synchronous and spec.elastic and enabled and not dist.is_initialized():
            raise RuntimeError(
                "the synchronous EASGD wrapper needs torch.distributed: call "
                "init_process_group first (torchrun sets the variables), or pass client= for "
                "the asynchronous parameter server"
            )
        params = [q for group in optimizer.param_groups for q in group["params"]]
        self._names: list[str | None] = []  # known when built from named_parameters()
        for group in optimizer.param_groups:
            self._names += group.get("param_names", [None] * len(group["params"]))
        self.flat = parameters_to_flat_views(torch.nn.ParameterList(params))
        x = self.flat.params
        # Where each parameter lives now; a change means it left the flat buffer.
        self._data_ptrs = tuple(q.data_ptr() for q in self.flat.parameters)
        self._transport: Transport | None = None
        self._loss: Any = None  # the local optimizer's last return value
        if enabled and (client is not None or dist.is_initialized()):
            self._transport = self._open_transport(client, x.device)
            self._transport.start(x)  # start from the center (or rank 0), like every worker
        requested: dict[str, Any] = {"alpha": alpha, "beta": beta}
        fields: dict[str, Any] = {"method": method, "tau": tau, "workers": 1, "lr": 1.0}
        if client is not None and enabled:
            fields.update(self._server_fields(client, requested))
        else:
            if synchronous and dist.is_initialized():
                fields["workers"] = dist.get_world_size(process_group)
            fields.update({k: v for k, v in requested.items() if v is not None})
        self.hp = Hyperparams(**fields)
        self.worker = Worker(self.hp, x, mode, grad=self.flat.grads, external_local=True)

    def _init_optimizer_hooks(self) -> None:
        # What torch.optim.Optimizer.__init__ sets up for hooks and profiling, without its
        # parameter handling (the local optimizer owns the parameter groups).
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()  # step() runs the step hooks (profile_hook_step)
        self._warned_capturable_if_run_uncaptured = True

    def _check_parameters(self) -> None:
        """Raise if a parameter left the flat buffer (a few int compares per parameter)."""
        count = sum(len(group["params"]) for group in self.optimizer.param_groups)
        if count != len(self.flat.parameters):
            raise RuntimeError(
                f"the local optimizer has {count} parameters but the wrapper averages "
                f"{len(self.flat.parameters)}: a parameter group was added to it after "
                "wrapping. Pass every parameter group to the local optimizer before "
                "wrapping it, or build a new wrapper around it"
            )
        x = self.flat.params
        for i, (p, ptr) in enumerate(zip(self.flat.parameters, self._data_ptrs, strict=True)):
            if p.data_ptr() == ptr and p.dtype == x.dtype and p.device == x.device:
                continue
            name = self._names[i]
            label = f"parameter {i}" + ("" if name is None else f" ({name!r})")
            raise RuntimeError(
                f"{label} of shape {tuple(p.shape)} no longer lives in the wrapper's flat "
                f"buffer (it is now {p.dtype} on {p.device}; the buffer is {x.dtype} on "
                f"{x.device}, and its storage was replaced), so elastic averaging would "
                "silently stop for it. model.double(), model.to(...) or "
                "load_state_dict(..., assign=True) after wrapping replace parameter storage: "
                "convert or move the model (and load with assign=True) before building the "
                "local optimizer and the wrapper, or load without assign=True (copies in place)"
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused: the flat buffer (what is averaged) is fixed at construction."""
        raise ValueError(
            "add_param_group on an elastic averaging wrapper: the new parameters would be "
            "stepped but never averaged (the wrapper's flat buffer is fixed when it is built). "
            "Pass every parameter group to the local optimizer before wrapping it, or build "
            "a new wrapper around the local optimizer after adding the group to it"
        )

    def _open_transport(self, client: PSClient | None, device: torch.device) -> Transport:
        if client is not None:
            return Staged(client, device) if device.type == "cuda" else client
        from easgd.comm.allreduce import AllReduceTransport

        return AllReduceTransport(self.process_group)

    @staticmethod
    def _server_fields(client: PSClient, requested: dict[str, Any]) -> dict[str, Any]:
        """p, alpha and beta as the server applies them; given values must agree."""
        server = client.server_hp
        for name, value in requested.items():
            theirs = getattr(server, name)
            if value is not None and not math.isclose(value, theirs, rel_tol=1e-12):
                raise ValueError(
                    f"{name}={value} but the parameter server applies {name}={theirs:g} "
                    f"(method {server.method}, p={server.workers}); leave {name} unset to use "
                    "the server's, or start the server with the value you want"
                )
        return {"workers": server.workers, "alpha": server.alpha, "beta": server.beta}

    # torch.optim.Optimizer surface: delegate to the local optimizer.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def center(self) -> Tensor:
        """The center variable as this worker knows it (synchronous: exact; async: pulled).

        Synchronous EASGD first completes the exchange still in flight (a local wait);
        local SGD's center is the parameters (right after an average, the workers' mean).
        """
        if self.worker.spec.evaluated_on_server(self.worker.mode):
            assert self.client is not None
            out = torch.empty_like(self.flat.params)
            self.client.pull(out)
            return out
        self.settle()
        return self.worker.evaluation_vector()

    def settle(self) -> None:
        """Complete the synchronous exchange still in flight, if any (a local wait).

        Synchronous EASGD overlaps its all-reduce with the next ``tau`` local steps;
        ``center``, ``state_dict`` and ``finish`` settle by themselves.
        """
        if self.worker.in_flight:
            run_settle(self.worker, self._serve)

    def finish(self) -> None:
        """End of training: complete every exchange in flight (call it on every rank)."""
        self.settle()

    def center_model_(self, model: torch.nn.Module) -> None:
        """Copy the center into ``model`` (a replica of the wrapped one) to evaluate it."""
        from easgd.flat import parameters_to_flat_views

        parameters_to_flat_views(model).params.copy_(self.center)

    def _serve(self, req: Request) -> None:
        if self._transport is None:
            raise RuntimeError(
                "the wrapper has no process group to exchange with: call "
                "torch.distributed.init_process_group before constructing it (torchrun "
                "sets the variables), or pass client= for the parameter server"
            )
        self._check_parameters()
        self._transport.serve(req)

    def _local_step(self, closure: Callable[[], float] | None) -> float:
        if closure is None:
            loss = self.optimizer.step()
        else:
            with torch.enable_grad():
                loss = self.optimizer.step(closure)
        self._loss = loss
        return float("nan") if loss is None else float(loss)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """The local optimizer's step, with an exchange every ``tau`` calls."""
        if not self.enabled:
            return self.optimizer.step(closure)
        self._loss = None
        drive(self.worker.step(), lambda _req: self._local_step(closure), self._serve)
        return self._loss

    def state_dict(self) -> dict[str, Any]:
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        self.settle()
        w = self.worker
        state: dict[str, Any] = {
            "local": self.optimizer.state_dict(),
            "easgd": {
                "t": w.t, "center": None if w.center is None else w.center.clone(),
                "tau": self.hp.tau, "alpha": self.hp.alpha, "beta": self.hp.beta,
                "method": self.hp.method,
            },
        }  # fmt: skip
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state)
            if result is not None:
                state = result
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = state_dict.copy()  # shallow, like torch.optim (hooks may edit it)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._load_state_dict(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "local" not in state_dict:
            # A plain optimizer checkpoint: restore it, keep counters at their current values.
            warnings.warn(
                "loaded a checkpoint without easgd state (step counter, center); the step "
                "counter stays at its current value and the center at the parameters",
                UserWarning,
                stacklevel=3,
            )
            self.optimizer.load_state_dict(state_dict)
            return
        self.optimizer.load_state_dict(state_dict["local"])
        extra = state_dict.get("easgd", {})
        self.worker.t = int(extra.get("t", 0))
        center = extra.get("center")
        if center is not None and self.worker.center is not None:
            self.worker.center.copy_(center)


def _refuse_closure_optimizers(optimizer: torch.optim.Optimizer) -> None:
    """Refuse optimizers whose step needs a closure it evaluates many times (LBFGS)."""
    step = inspect.signature(type(optimizer).step).parameters.get("closure")
    needs_closure = step is not None and step.default is inspect.Parameter.empty
    if isinstance(optimizer, torch.optim.LBFGS) or needs_closure:
        raise ValueError(
            f"optimizer={type(optimizer).__name__}: its step(closure) evaluates the loss many "
            "times and keeps curvature history that each elastic exchange would invalidate, "
            "so the wrapper does not support it; wrap a first-order optimizer (SGD, Adam, "
            "AdamW, ...) instead"
        )


def EASGD(optimizer: torch.optim.Optimizer, **kwargs: Any) -> ElasticAveraging:
    """Elastic averaging SGD around ``optimizer`` (plain SGD: the paper's EASGD)."""
    return ElasticAveraging(optimizer, method="easgd", **kwargs)


def EAMSGD(
    params: Any, *, lr: float, momentum: float = 0.99, weight_decay: float = 0.0, **kwargs: Any
) -> ElasticAveraging:
    """Elastic averaging around Nesterov-momentum SGD (the paper's EAMSGD; delta = 0.99)."""
    local = torch.optim.SGD(
        params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay
    )
    return ElasticAveraging(local, method="easgd", **kwargs)


def LocalSGD(optimizer: torch.optim.Optimizer, **kwargs: Any) -> ElasticAveraging:
    """Periodic model averaging every ``tau`` steps (local SGD)."""
    return ElasticAveraging(optimizer, method="localsgd", **kwargs)
