"""``torch.optim``-style wrappers that add elastic averaging to a user's own training loop.

Wrap any local optimizer; every ``tau`` calls of ``step()`` the wrapper exchanges with the
center, exactly as :class:`easgd.algorithms.Worker` does (the same generator drives both):
the elastic difference ``d = alpha * (x - center)`` is taken before the local step and
subtracted after it, and the center moves by ``+d`` (asynchronously, through a parameter
server) or by ``beta/p`` times the mean difference (synchronously, one flat all-reduce).
:func:`LocalSGD` averages the parameters instead, and :func:`DiLoCo` takes an outer Nesterov
step on the averaged pseudo-gradient ``center - x`` after every ``tau`` steps of your
optimizer (its inner one; AdamW in the DiLoCo paper).

Example (under ``torchrun``; see ``examples/own_loop.py`` and ``examples/torchrun_bn.py``)::

    torch.distributed.init_process_group("gloo")
    model = Net()
    local = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    opt = easgd.optim.EASGD(local, tau=10, model=model)  # synchronous, beta = 0.9
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    opt.finish()                                         # on every rank
    model.load_state_dict(opt.center_state_dict())       # the center, to evaluate it

When an exchange happens: ``step()`` number ``t`` (counting from 0) exchanges when ``t`` is
a multiple of ``tau``, so the first exchange is at the first step and then after every
``tau``-th. For local SGD that is PyTorch's post-local SGD with ``warmup_steps = tau - 1``
(``PostLocalSGDOptimizer(PeriodicModelAverager(period=tau, warmup_steps=tau - 1))``),
bitwise. The default ``tau`` is 10 here and in ``easgd train`` (the paper's most used
communication period).

Notes:

* The parameters (and, with ``model=``, the floating-point buffers) become views of one
  flat buffer (one collective per exchange, no flattening on the hot path); the optimizer
  keeps working on the same ``Parameter`` objects.
* **Buffers.** Given ``model=``, its floating-point buffers (BatchNorm's running mean and
  variance) are averaged into the center with the parameters, in the same collective (or
  through the server), so :meth:`ElasticAveraging.center_state_dict` is a model that
  evaluates as the center. Integer buffers (``num_batches_tracked``) are counters: each
  rank keeps its own, and the center's copy is the local one. ``average_buffers=False``
  leaves buffers out (re-estimate them with ``torch.optim.swa_utils.update_bn``).
* **Ranks stay in step.** Each synchronous exchange also carries every rank's step counter;
  ranks that disagree (or one that finishes while another is still exchanging) get an
  :class:`easgd.comm.allreduce.OutOfStepError` naming the ranks and counters, never a hang.
  With ``torch.amp.GradScaler`` pass the wrapper to ``scaler.step(opt)``: a rank whose
  gradients overflowed skips its local update but keeps its exchanges, so ranks stay in
  step whatever each one's scaler finds.
* ``state_dict()`` holds the local optimizer's state plus the center and the step counter;
  ``load_state_dict()`` restores both and warns (does not fail) on a checkpoint without them.
* The wrapper is a ``torch.optim.Optimizer`` of its own: step, ``state_dict`` and
  ``load_state_dict`` hooks registered on it fire once per call of the wrapper (those of the
  local optimizer keep firing on its own calls; global hooks therefore fire for both).
* Every parameter group must be given to the local optimizer before wrapping it:
  ``add_param_group`` on the wrapper raises (the new parameters would never be averaged).
* Convert or move the model (``model.double()``, ``model.to(...)``) before wrapping: a
  parameter or buffer whose storage changed afterwards is reported by the next exchange (a
  ``RuntimeError`` naming it) instead of silently dropping out of the averaging; with
  ``model=``, so is a parameter that ``load_state_dict(..., assign=True)`` replaced.
* Optimizers that evaluate a closure many times per step (``LBFGS``) are refused.
* :func:`EAMSGD` is the paper's Algorithm 2 in the authors' order (exchange, Nesterov
  look-ahead ``x + delta*v``, gradient there, update): it equals the simulator's EAMSGD
  bitwise. Between two ``step()`` calls the model holds the look-ahead point, where the
  next gradient is taken. :func:`EAMSGDTorchNesterov` is elastic averaging around
  ``torch.optim.SGD(nesterov=True)``, PyTorch's parametrization of Nesterov momentum (a
  different sequence of iterates); with a plain ``SGD`` local optimizer :func:`EASGD`
  equals the simulator's EASGD.
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

from easgd.algorithms import (
    METHODS,
    Hyperparams,
    Mode,
    Momentum,
    Request,
    Worker,
    drive,
    run_exchanges,
    run_settle,
)
from easgd.comm.base import Transport
from easgd.comm.staging import Staged
from easgd.flat import buffer_of, floating_buffers, parameters_to_flat_views

if TYPE_CHECKING:
    from easgd.comm.ps_client import PSClient

__all__ = [
    "EAMSGD",
    "EASGD",
    "DiLoCo",
    "EAMSGDTorchNesterov",
    "ElasticAveraging",
    "LocalSGD",
    "exchanged_numel",
]


class ElasticAveraging(torch.optim.Optimizer):
    """Elastic averaging (or periodic averaging) around a local optimizer.

    Args:
        optimizer: the local optimizer (any ``torch.optim.Optimizer``). With
            ``method="eamsgd"`` a plain ``torch.optim.SGD`` (no momentum) that holds the
            parameters and the learning rate: the wrapper takes the paper's local step
            itself (see :func:`EAMSGD`), and schedulers still act on its ``lr``.
        model: the module whose parameters the optimizer steps (optional): its
            floating-point buffers are then averaged too, ``center_state_dict()`` works,
            and a parameter replaced by ``load_state_dict(..., assign=True)`` is detected.
        average_buffers: with ``model``, average its floating-point buffers (default True).
        tau: communication period in calls of ``step()`` (default 10, as ``easgd train``).
        alpha, beta: moving rates; ``alpha = beta/p`` unless given (default beta = 0.9).
            Asynchronously the server's values rule: given ones must agree with them.
        method: ``"easgd"`` (default), ``"eamsgd"`` (the paper's Algorithm 2; the wrapper
            takes the local step), ``"localsgd"`` (periodic parameter averaging) or
            ``"diloco"`` (the local optimizer is DiLoCo's inner one; see :func:`DiLoCo`).
        outer_lr, outer_momentum: DiLoCo's outer Nesterov SGD (default 0.7 and 0.9, the
            DiLoCo paper's); only with ``method="diloco"``.
        momentum: EAMSGD's delta (default 0.99); only with ``method="eamsgd"``.
        client: an :class:`easgd.comm.ps.PSClient` for the asynchronous mode; ``None`` means
            synchronous over ``process_group``. p, alpha and beta then come from the server
            (its JOIN reply carries its hyperparameters).
        process_group: group of the synchronous mode (default: the default group).
        enabled: ``False`` turns every exchange off (the local optimizer alone): for
            measuring the wrapper's overhead.
        compress: ``"none"`` (default), ``"bf16"`` or ``"int8"``: synchronous EASGD/EAMSGD
            send their elastic differences compressed, with error feedback (2x and 3.9x
            fewer bytes; :class:`easgd.algorithms.CompressedSum`). Asynchronously, build
            the client with ``PSClient(..., compress=...)``.
        overlap: asynchronously, ``K`` in ``1..tau``: each exchange goes out at the end of
            the ``step()`` call before its step, in the background, so it is in flight
            while the loop computes the next gradient; its reply is applied ``K`` calls
            later. ``K = 1`` is the paper's update exactly (the blocking wrapper's
            trajectory, bitwise), with the round trip hidden behind the loop's forward and
            backward pass; see ``easgd.algorithms.Worker``. Default 0: ``step()`` waits.
    """

    #: ``GradScaler.step`` calls ``step()`` even when it found inf/nan gradients (it sets
    #: ``grad_scale`` and ``found_inf``), so a skipped update keeps the exchange schedule.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        model: torch.nn.Module | None = None,
        average_buffers: bool = True,
        tau: int = 10,
        alpha: float | None = None,
        beta: float | None = None,
        method: str = "easgd",
        momentum: float | None = None,
        outer_lr: float | None = None,
        outer_momentum: float | None = None,
        client: PSClient | None = None,
        process_group: dist.ProcessGroup | None = None,
        enabled: bool = True,
        compress: str = "none",
        overlap: int = 0,
    ) -> None:
        spec = METHODS.get(method)
        if spec is None or not spec.wraps_optimizer or spec.sequential:
            raise ValueError(
                f"method={method!r}; the wrapper supports easgd, eamsgd, localsgd and diloco"
            )
        _refuse_closure_optimizers(optimizer)
        # EAMSGD (elastic, local momentum): the wrapper takes the paper's local step itself.
        self._own_step = spec.elastic and spec.momentum is Momentum.LOCAL
        if self._own_step:
            _check_eamsgd_holder(optimizer, enabled)
        elif momentum is not None:
            raise ValueError(
                f"momentum={momentum} with method={method!r}: the local optimizer's momentum "
                "rules; momentum= is EAMSGD's delta (method='eamsgd')"
            )
        self._init_optimizer_hooks()
        self.optimizer = optimizer
        self.client = client
        self.process_group = process_group
        self.enabled = enabled
        self.model = model
        self.compress = compress
        mode = Mode.ASYNC if client is not None else Mode.SYNC
        if compress != "none" and (client is not None or not spec.elastic):
            raise ValueError(
                f"compress={compress!r} with method={method!r}"
                + (
                    " and client=: an asynchronous client compresses its own exchanges, "
                    "build it with PSClient(..., compress=...)"
                    if client is not None
                    else ": compression is for easgd and eamsgd (their elastic differences)"
                )
            )
        spec.resolve_mode(mode)  # localsgd has no asynchronous form: say so
        synchronous = mode is Mode.SYNC
        if synchronous and enabled and not dist.is_initialized():  # every method: say it now
            raise RuntimeError(
                f"the synchronous {method} wrapper needs torch.distributed: call "
                "init_process_group first (torchrun sets the variables), or pass client= for "
                "the asynchronous parameter server"
            )
        params = [q for group in optimizer.param_groups for q in group["params"]]
        self._names: list[str | None] = []  # known when built from named_parameters()
        for group in optimizer.param_groups:
            self._names += group.get("param_names", [None] * len(group["params"]))
        buffers = []
        if model is not None:
            self._names = _names_in(model, params, self._names)
            buffers = floating_buffers(model) if average_buffers else []
        self.flat = parameters_to_flat_views(torch.nn.ParameterList(params), buffers=buffers)
        x = self.flat.vector
        assert x is not None
        # Where each parameter and buffer lives now; a change means it left the flat buffer.
        self._data_ptrs = tuple(q.data_ptr() for q in self.flat.parameters)
        self._buffer_ptrs = tuple(buffer_of(m, n).data_ptr() for m, n, _ in buffers)
        self._transport: Transport | None = None
        self._loss: Any = None  # the local optimizer's last return value
        if enabled and (client is not None or dist.is_initialized()):
            self._transport = self._open_transport(client, x)
            self._transport.start(x)  # start from the center (or rank 0), like every worker
        requested: dict[str, Any] = {"alpha": alpha, "beta": beta}
        fields: dict[str, Any] = {"method": method, "tau": tau, "workers": 1}
        outer = {"outer_lr": outer_lr, "outer_momentum": outer_momentum}
        fields.update({k: v for k, v in outer.items() if v is not None})  # refused unless diloco
        fields["lr"] = optimizer.param_groups[0]["lr"] if self._own_step else 1.0
        if self._own_step:
            fields["momentum"] = 0.99 if momentum is None else momentum
            fields["weight_decay"] = optimizer.param_groups[0].get("weight_decay", 0.0)
        if client is not None and enabled:
            fields.update(self._server_fields(client, requested))
        else:
            if synchronous and dist.is_initialized():
                fields["workers"] = dist.get_world_size(process_group)
            fields.update({k: v for k, v in requested.items() if v is not None})
        self.hp = Hyperparams(**fields)
        reserve = getattr(self._transport, "reserve", None)  # room for the step counters
        self.worker = Worker(
            self.hp, x, mode, grad=self.flat.grads, external_local=not self._own_step,
            trainable=self.flat.numel, reserve=reserve(x.dtype) if reserve else 0,
            overlap=overlap,
        )  # fmt: skip
        # EAMSGD: whether the current step's first half (exchange, look-ahead) has run.
        self._begun = False

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

    def _label(self, i: int) -> str:
        name = self._names[i]
        return f"parameter {i}" + ("" if name is None else f" ({name!r})")

    def _check_parameters(self) -> None:
        """Raise if a parameter or buffer left the flat buffer (a few compares each)."""
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
            raise RuntimeError(
                f"{self._label(i)} of shape {tuple(p.shape)} no longer lives in the wrapper's "
                f"flat buffer (it is now {p.dtype} on {p.device}; the buffer is {x.dtype} on "
                f"{x.device}, and its storage was replaced), so elastic averaging would "
                "silently stop for it. model.double(), model.to(...) or "
                "load_state_dict(..., assign=True) after wrapping replace parameter storage: "
                "convert or move the model (and load with assign=True) before building the "
                "local optimizer and the wrapper, or load without assign=True (copies in place)"
            )
        for (module, name, qualified), ptr in zip(
            self.flat.buffers, self._buffer_ptrs, strict=True
        ):
            buf = module._buffers[name]
            if buf is not None and buf.data_ptr() == ptr:
                continue
            raise RuntimeError(
                f"buffer {qualified!r} no longer lives in the wrapper's flat buffer (it was "
                "replaced: model.to(...), model.double() or load_state_dict(..., assign=True) "
                "after wrapping), so its averaging would silently stop. Convert or move the "
                "model before building the optimizer and the wrapper, or load without "
                "assign=True"
            )
        if self.model is not None:
            mine = {id(q) for q in self.model.parameters()}
            for i, q in enumerate(self.flat.parameters):
                if id(q) not in mine:
                    raise RuntimeError(
                        f"{self._label(i)} that the optimizer steps is no longer a parameter "
                        "of model= (load_state_dict(..., assign=True) or a reassigned "
                        "attribute replaced it), so the model would stop training and "
                        "averaging. Load with assign=False (copies in place), or build the "
                        "optimizer and the wrapper after replacing parameters"
                    )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused: the flat buffer (what is averaged) is fixed at construction."""
        raise ValueError(
            "add_param_group on an elastic averaging wrapper: the new parameters would be "
            "stepped but never averaged (the wrapper's flat buffer is fixed when it is built). "
            "Pass every parameter group to the local optimizer before wrapping it, or build "
            "a new wrapper around the local optimizer after adding the group to it"
        )

    def _open_transport(self, client: PSClient | None, x: Tensor) -> Transport:
        if client is not None:
            if client.numel != x.numel():
                extra = x.numel() - self.flat.numel
                raise ValueError(
                    f"the parameter server client has numel={client.numel} but the wrapper "
                    f"exchanges {x.numel()} values ({self.flat.numel} parameters"
                    + (f" + {extra} buffer values of model=" if extra else "")
                    + "): start the server and client with numel="
                    f"{x.numel()} (easgd.optim.exchanged_numel(model)), or pass "
                    "average_buffers=False to exchange parameters only"
                )
            return Staged(client, x.device) if x.device.type == "cuda" else client
        from easgd.comm.allreduce import AllReduceTransport

        return AllReduceTransport(self.process_group, check_steps=True, compress=self.compress)

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

        Parameters first, then the averaged buffers (with ``model=``). Synchronous EASGD
        first completes the exchange still in flight (a local wait); local SGD's center is
        the parameters (right after an average, the workers' mean).
        """
        if self.worker.spec.evaluated_on_server(self.worker.mode):
            assert self.client is not None
            x = self.worker.x
            host = torch.empty(x.shape, dtype=x.dtype)
            self.client.pull(host)
            return host.to(x.device)
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
        """End of training, on every rank: complete the exchanges in flight, check the ranks.

        Synchronously, every rank must have taken the same number of steps: a rank that
        finishes while another still exchanges is an ``OutOfStepError`` on both.
        """
        self.settle()
        check = getattr(self._transport, "finish_check", None)
        if check is not None:
            check(self.worker.t)

    def center_state_dict(self) -> dict[str, Tensor]:
        """The center as ``model``'s ``state_dict`` (copies; needs ``model=``).

        Optimized parameters and averaged buffers hold the center's values; everything else
        (integer buffers such as ``num_batches_tracked``, parameters the optimizer does not
        step, buffers when ``average_buffers=False``) is the local model's. Load it into a
        replica (``replica.load_state_dict(opt.center_state_dict())``) to evaluate the center.
        """
        if self.model is None:
            raise RuntimeError(
                "center_state_dict() needs the model: build the wrapper with model=, or use "
                "center_model_(replica)"
            )
        center = self.center
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        for name, (lo, hi) in self._slices().items():
            state[name].copy_(center[lo:hi].view_as(state[name]))
        return state

    def _slices(self) -> dict[str, tuple[int, int]]:
        """Where each named parameter and averaged buffer lives in the flat vector."""
        out: dict[str, tuple[int, int]] = {}
        for i, (shape, offset) in enumerate(zip(self.flat.shapes, self.flat.offsets, strict=True)):
            name = self._names[i]
            if name is not None:
                out[name] = (offset, offset + shape.numel())
        at = self.flat.numel
        for module, name, qualified in self.flat.buffers:
            size = buffer_of(module, name).numel()
            out[qualified] = (at, at + size)
            at += size
        return out

    def center_model_(self, model: torch.nn.Module) -> None:
        """Copy the center into ``model`` (a replica of the wrapped one) to evaluate it."""
        if self.model is not None:
            model.load_state_dict(self.center_state_dict())
            return
        parameters_to_flat_views(model).params.copy_(self.center)
        names = [q for _, _, q in floating_buffers(model)]
        if names:
            warnings.warn(
                f"center_model_: the model's floating-point buffers ({', '.join(names[:4])}"
                f"{', ...' if len(names) > 4 else ''}) were not averaged and keep the "
                "replica's own values, because the wrapper was built without model=; pass "
                "model= to the wrapper to average them, or re-estimate them on training data "
                "with torch.optim.swa_utils.update_bn(loader, model)",
                UserWarning,
                stacklevel=2,
            )

    def _serve(self, req: Request) -> None:
        if self._transport is None:
            raise RuntimeError(
                "the wrapper has no process group to exchange with: call "
                "torch.distributed.init_process_group before constructing it (torchrun "
                "sets the variables), or pass client= for the parameter server"
            )
        self._check_parameters()
        self._transport.serve(req)

    def _scaler_says_skip(self) -> bool:
        """Unscale the gradients ``GradScaler.step`` handed over; whether they overflowed."""
        found_inf = getattr(self, "found_inf", None)
        scale = getattr(self, "grad_scale", None)
        if found_inf is not None and float(found_inf) > 0:
            return True
        if scale is not None:
            inv = 1.0 / float(scale)
            grads = [q.grad for q in self.flat.parameters if q.grad is not None]
            if grads:
                torch._foreach_mul_(grads, inv)
        return False

    def _local_step(self, closure: Callable[[], float] | None, skip: bool) -> float:
        if skip:
            return float("nan")  # overflowed gradients: no update, the exchange goes on
        if closure is None:
            loss = self.optimizer.step()
        else:
            with torch.enable_grad():
                loss = self.optimizer.step(closure)
        self._loss = loss
        return float("nan") if loss is None else float(loss)

    def _eamsgd_step(self, skip: bool) -> None:
        """The paper's EAMSGD step around a gradient the user's loop already computed."""
        group = self.optimizer.param_groups[0]
        lr, wd = group["lr"], group.get("weight_decay", 0.0)
        if (lr, wd) != (self.hp.lr, self.hp.weight_decay):  # a scheduler changed it
            self.hp = self.hp.replace(lr=lr, weight_decay=wd)
            self.worker.hp = self.hp
        if not self._begun:  # the first step: exchange at t = 0, look-ahead (v = 0: none)
            run_exchanges(self.worker.begin_step(), self._serve)
        self.flat.ensure_grad_views_()
        if skip:
            self.flat.grads.zero_()  # keep the step and its exchange; momentum only
        run_exchanges(self.worker.end_step(), self._serve)
        # The next step's first half, so the next gradient is taken at its look-ahead.
        run_exchanges(self.worker.begin_step(), self._serve)
        self._begun = True

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """The local optimizer's step, with an exchange every ``tau`` calls."""
        if not self.enabled:
            return self.optimizer.step(closure)
        skip = self._scaler_says_skip()
        if self._own_step:
            if closure is not None:
                with torch.enable_grad():
                    self._loss = closure()
            self._eamsgd_step(skip)
            return self._loss
        self._loss = None
        if self.worker.overlap:
            # Overlapped: the exchange of step t goes out at the end of call t - 1, so it
            # is in flight while the loop computes step t's gradient; its pull is applied at
            # the end of call t + K - 1, where the blocking exchange applies it for K = 1.
            if not self._begun:
                run_exchanges(self.worker.begin_step(), self._serve)
            self._local_step(closure, skip)
            run_exchanges(self.worker.end_step(), self._serve)
            run_exchanges(self.worker.begin_step(), self._serve)
            self._begun = True
            return self._loss
        drive(self.worker.step(), lambda _req: self._local_step(closure, skip), self._serve)
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
        if w.spec.outer:
            state["easgd"].update(
                outer_lr=self.hp.outer_lr,
                outer_momentum=self.hp.outer_momentum,
                outer_v=None if w.outer_v is None else w.outer_v.clone(),
            )
        if self._own_step:
            assert w.v is not None or self.hp.momentum == 0
            state["easgd"]["v"] = None if w.v is None else w.v.clone()
        if self._own_step or w.overlap:
            state["easgd"]["begun"] = self._begun
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
            if center.shape != self.worker.center.shape:
                raise ValueError(
                    f"the checkpoint's center has {center.numel()} values but this wrapper "
                    f"exchanges {self.worker.center.numel()}: it was saved with a different "
                    "model or average_buffers setting; build the wrapper as it was saved"
                )
            self.worker.center.copy_(center)
        outer_v = extra.get("outer_v")
        if outer_v is not None and self.worker.outer_v is not None:
            self.worker.outer_v.copy_(outer_v)  # DiLoCo's outer momentum
        if self._own_step:
            v = extra.get("v")
            if v is not None and self.worker.v is not None:
                self.worker.v.copy_(v)
        if self._own_step or self.worker.overlap:
            # The model saved with it holds the point of the pending step (EAMSGD: its
            # look-ahead; overlapped: its exchange was sent, and applied by the save).
            self._begun = bool(extra.get("begun", False))


def _names_in(
    model: torch.nn.Module, params: list[torch.nn.Parameter], names: list[str | None]
) -> list[str | None]:
    """The parameters' qualified names in ``model``; each must be one of its parameters."""
    where = {id(q): n for n, q in model.named_parameters()}
    out: list[str | None] = []
    for i, q in enumerate(params):
        name = where.get(id(q))
        if name is None:
            raise ValueError(
                f"parameter {i} of the optimizer (shape {tuple(q.shape)}) is not a parameter "
                "of model=: pass the model whose parameters the optimizer steps"
            )
        out.append(name)
    return out


def _check_eamsgd_holder(optimizer: torch.optim.Optimizer, enabled: bool) -> None:
    """method='eamsgd' takes the step itself: the optimizer only holds params and lr."""
    groups = optimizer.param_groups
    plain = type(optimizer) is torch.optim.SGD and all(
        g.get("momentum", 0) == 0 and not g.get("nesterov", False) for g in groups
    )
    if not plain or len(groups) != 1:
        raise ValueError(
            f"method='eamsgd' with {type(optimizer).__name__} ({len(groups)} parameter "
            "group(s)): the wrapper takes the paper's local step itself, so the optimizer "
            "must be one plain torch.optim.SGD group without momentum (it holds the "
            "parameters, lr and weight_decay); use easgd.optim.EAMSGD(params, lr=...), or "
            "EASGD(your optimizer) to let your optimizer take the step"
        )
    if not enabled:
        raise ValueError(
            "method='eamsgd' with enabled=False: there is no local optimizer to fall back "
            "on; use torch.optim.SGD(momentum=..., nesterov=True) alone"
        )


def exchanged_numel(model: torch.nn.Module, *, average_buffers: bool = True) -> int:
    """How many values a wrapper with ``model=`` exchanges: parameters plus float buffers.

    The size to start an asynchronous parameter server and its clients with.
    """
    n = sum(q.numel() for q in model.parameters())
    if average_buffers:
        n += sum(buffer_of(m, b).numel() for m, b, _ in floating_buffers(model))
    return n


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
    """The paper's EAMSGD (Algorithm 2, delta = ``momentum``, default 0.99), bitwise.

    Each step, in the authors' order: the elastic exchange (every ``tau`` steps), the
    Nesterov look-ahead ``x + delta*v``, the gradient there, ``v = delta*v - lr*g`` and
    ``x += v`` (:mod:`easgd.algorithms`). The user's loop computes the gradient before
    ``step()``, so between steps the model holds the look-ahead point. ``lr`` lives in a
    plain ``torch.optim.SGD`` group that schedulers can change.
    """
    holder = torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    return ElasticAveraging(holder, method="eamsgd", momentum=momentum, **kwargs)


def EAMSGDTorchNesterov(
    params: Any, *, lr: float, momentum: float = 0.99, weight_decay: float = 0.0, **kwargs: Any
) -> ElasticAveraging:
    """Elastic averaging around ``torch.optim.SGD(nesterov=True)``: PyTorch's Nesterov.

    Not the paper's EAMSGD iterates (PyTorch's parametrization keeps a different point as
    the parameters); :func:`EAMSGD` is the paper's.
    """
    local = torch.optim.SGD(
        params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay
    )
    return ElasticAveraging(local, method="easgd", **kwargs)


def LocalSGD(optimizer: torch.optim.Optimizer, **kwargs: Any) -> ElasticAveraging:
    """Periodic model averaging every ``tau`` steps (local SGD)."""
    return ElasticAveraging(optimizer, method="localsgd", **kwargs)


def DiLoCo(
    optimizer: torch.optim.Optimizer,
    *,
    tau: int = 10,
    outer_lr: float = 0.7,
    outer_momentum: float = 0.9,
    **kwargs: Any,
) -> ElasticAveraging:
    """DiLoCo (Douillard et al. 2023) around ``optimizer``, its inner optimizer.

    Every ``tau`` calls of ``step()`` (the paper's H inner steps; the paper uses AdamW and
    H = 500), the pseudo-gradient ``Delta = c - mean_i(x_i)`` is averaged in one flat
    all-reduce and takes an outer Nesterov step on the global parameters ``c``
    (``torch.optim.SGD(lr=outer_lr, momentum=outer_momentum, nesterov=True)``'s update; the
    paper's defaults 0.7 and 0.9); every rank then restarts from ``c``. The inner
    optimizer's state (AdamW's moments) is kept across rounds, as in the paper.
    ``center`` and ``center_state_dict()`` are ``c``; ``state_dict()`` holds the outer
    momentum and ``c``. Our choices: buffers given with ``model=`` are averaged, not
    extrapolated; the run does not end with an extra outer step (the result is ``c`` after
    the last completed round).

    Example::

        inner = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
        opt = easgd.optim.DiLoCo(inner, tau=500, model=model)
    """
    return ElasticAveraging(
        optimizer, method="diloco", tau=tau, outer_lr=outer_lr, outer_momentum=outer_momentum,
        **kwargs,
    )  # fmt: skip
