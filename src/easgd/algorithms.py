"""Every update rule of the EASGD family, once.

Pure, in-place functions on flat 1-D tensors, and two thin state holders that sequence them:

* :class:`Worker` runs one local step as a generator that *yields* what it needs from the
  outside world (a gradient, an exchange with the center) and resumes when the request is
  fulfilled. The simulator, the all-reduce runtime, the parameter-server runtime and the
  ``easgd.optim`` wrappers all drive this same generator, so the order of operations of
  every method is written here and nowhere else.
* :class:`Center` holds the center variable and answers exchanges, atomically; the
  parameter server calls it under its lock, the simulator calls it directly.

The rules follow ``paper-spec.md`` (Zhang, Choromanska & LeCun 2015, and the authors' code):

* EASGD / EAMSGD (Algorithms 1 and 2): when ``t % tau == 0`` (local clock ``t`` counted from
  0) the elastic difference ``d = alpha * (x - center)`` is taken from ``x`` *before* the
  local step, the center moves by ``+d`` and the worker by ``-d`` *after* its local step, so
  the gradient is the one at the pre-elastic snapshot. Synchronously the center update uses
  time-``t`` values of every worker: ``center += beta/p * sum_i (x_i - center)``.
* EAMSGD's local step is the authors' Nesterov form: ``v = delta*v; x += v; g = grad(x);
  x -= lr*g; v -= lr*g``; ``delta = 0`` is EASGD exactly.
* DOWNPOUR: every local step accumulates ``-lr*g``; when ``t % tau == 0`` the accumulator is
  pushed (``center += acc``) and the pull overwrites the worker (``x = center``); that
  step's update reaches the worker only through the center, as in the authors' code.
* MDOWNPOUR: ``tau = 1``, the gradient is pushed and the *server* applies Nesterov momentum:
  ``v = delta*v - lr*g; center += delta*v - lr*g``.
* ADOWNPOUR / MVADOWNPOUR (and sequential ASGD / MVASGD): an average ``z`` of the center
  (of ``x``) with rate ``1/(t+1)`` or a constant rate; ``z`` is what gets evaluated.
* All-reduce SGD (DDP) averages gradients every step; local SGD averages parameters after
  every ``tau``-th local step.
* L2 weight decay is added to the gradient (``g += wd * x`` at the point of evaluation) and
  the learning rate decays on the local clock: ``lr_t = lr / (1 + t*lr_decay) ** lr_power``.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import warnings
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_BETA",
    "DEFAULT_MOMENTUM",
    "DEFAULT_MOVING_RATE",
    "METHODS",
    "Center",
    "Hyperparams",
    "MethodSpec",
    "Op",
    "Request",
    "StabilityWarning",
    "Worker",
    "average_rate",
    "downpour_accumulate_",
    "elastic_center_sync_",
    "elastic_difference_",
    "elastic_exchange_",
    "learning_rate",
    "local_step_",
    "mdownpour_center_",
    "nesterov_lookahead_",
    "run_settle",
    "run_step",
]

DEFAULT_BETA = 0.9
DEFAULT_MOMENTUM = 0.99
DEFAULT_MOVING_RATE = 0.001


class StabilityWarning(UserWarning):
    """A legal hyperparameter outside the analytic stability region."""


# ---------------------------------------------------------------------------------------
# The rules: pure, in-place functions on flat tensors.
# ---------------------------------------------------------------------------------------


def learning_rate(lr: float, t: int, lr_decay: float = 0.0, lr_power: float = 0.0) -> float:
    """The authors' decay on the local clock: ``lr / (1 + t*lr_decay) ** lr_power``."""
    if lr_decay == 0.0 or lr_power == 0.0:
        return lr
    return lr / (1.0 + t * lr_decay) ** lr_power


def nesterov_lookahead_(x: Tensor, v: Tensor, momentum: float) -> None:
    """First half of the Nesterov step: ``v = delta*v; x += v`` (gradient is then taken at x)."""
    v.mul_(momentum)
    x.add_(v)


def local_step_(
    x: Tensor, grad: Tensor, lr: float, v: Tensor | None = None, weight_decay: float = 0.0
) -> None:
    """Second half of the local step: ``g += wd*x; x -= lr*g`` (and ``v -= lr*g``).

    ``grad`` is modified in place when ``weight_decay`` is non-zero (it becomes the
    regularized gradient), which saves a buffer on the hot path.
    """
    if weight_decay:
        grad.add_(x, alpha=weight_decay)
    x.add_(grad, alpha=-lr)
    if v is not None:
        v.add_(grad, alpha=-lr)


def elastic_difference_(out: Tensor, x: Tensor, center: Tensor, alpha: float) -> Tensor:
    """``out = alpha * (x - center)``, the elastic force between a worker and the center."""
    torch.sub(x, center, out=out)
    out.mul_(alpha)
    return out


def elastic_exchange_(center: Tensor, x: Tensor, alpha: float, out: Tensor) -> Tensor:
    """Asynchronous exchange on the center's side: ``d = alpha*(x - center); center += d``.

    Computed against the center as it is when the request is served, so with the server's
    lock held no update is lost and no read is torn. Returns ``d`` (in ``out``), which the
    worker subtracts from its own variable.
    """
    elastic_difference_(out, x, center, alpha)
    center.add_(out)
    return out


def elastic_center_sync_(center: Tensor, diff_sum: Tensor, beta: float, p: int) -> None:
    """Synchronous center update from the sum of the p differences ``x_i - c``.

    ``c += (beta/p) * sum_i (x_i - c)`` is ``c = (1-beta)*c + beta*mean_i(x_i)``, the
    paper's eq. (6), with time-t values. The differences are left unscaled by alpha (the
    worker scales its own pull), which saves a pass over the vector on the hot path.
    """
    center.add_(diff_sum, alpha=beta / p)


def downpour_accumulate_(acc: Tensor, grad: Tensor, lr: float) -> None:
    """DOWNPOUR's accumulated update: ``acc += -lr*g``."""
    acc.add_(grad, alpha=-lr)


def mdownpour_center_(center: Tensor, v: Tensor, grad: Tensor, lr: float, momentum: float) -> None:
    """MDOWNPOUR's master rule, Nesterov on the server.

    ``v = delta*v - lr*g; c += delta*v - lr*g`` (the look-ahead form).
    """
    v.mul_(momentum).add_(grad, alpha=-lr)
    center.add_(v, alpha=momentum).add_(grad, alpha=-lr)


def average_rate(kind: str, t: int, moving_rate: float) -> float:
    """Rate of the running average ``z = (1-a)*z + a*x``: ``1/(t+1)`` (uniform) or constant."""
    return 1.0 / (t + 1) if kind == "uniform" else moving_rate


# ---------------------------------------------------------------------------------------
# The family and its hyperparameters.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    """How one method is put together from the rules above."""

    name: str
    local: str  # "sgd" or "nesterov"
    exchange: str  # "elastic" | "downpour" | "mdownpour" | "grad-mean" | "param-mean" | "none"
    modes: tuple[str, ...]  # "sync" and/or "async"; sequential methods: ("sequential",)
    average: str | None  # None | "uniform" | "moving"
    momentum_default: float
    description: str


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec(
            "easgd",
            "sgd",
            "elastic",
            ("sync", "async"),
            None,
            0.0,
            "elastic averaging SGD (Algorithm 1; synchronous eqs. 5-6)",
        ),
        MethodSpec(
            "eamsgd",
            "nesterov",
            "elastic",
            ("sync", "async"),
            None,
            DEFAULT_MOMENTUM,
            "elastic averaging with local Nesterov momentum (Algorithm 2)",
        ),
        MethodSpec(
            "downpour",
            "sgd",
            "downpour",
            ("async",),
            None,
            0.0,
            "DOWNPOUR: push accumulated -lr*sum(g) every tau steps, pull the center",
        ),
        MethodSpec(
            "mdownpour",
            "sgd",
            "mdownpour",
            ("async",),
            None,
            DEFAULT_MOMENTUM,
            "DOWNPOUR with Nesterov momentum on the server, tau = 1",
        ),
        MethodSpec(
            "adownpour",
            "sgd",
            "downpour",
            ("async",),
            "uniform",
            0.0,
            "DOWNPOUR with a uniform (Polyak) average of the center",
        ),
        MethodSpec(
            "mvadownpour",
            "sgd",
            "downpour",
            ("async",),
            "moving",
            0.0,
            "DOWNPOUR with a moving average of the center",
        ),
        MethodSpec("sgd", "sgd", "none", ("sequential",), None, 0.0, "sequential SGD"),
        MethodSpec(
            "msgd",
            "nesterov",
            "none",
            ("sequential",),
            None,
            DEFAULT_MOMENTUM,
            "sequential SGD with Nesterov momentum",
        ),
        MethodSpec(
            "asgd",
            "sgd",
            "none",
            ("sequential",),
            "uniform",
            0.0,
            "sequential SGD with a uniform average of the iterates",
        ),
        MethodSpec(
            "mvasgd",
            "sgd",
            "none",
            ("sequential",),
            "moving",
            0.0,
            "sequential SGD with a moving average of the iterates",
        ),
        MethodSpec(
            "allreduce",
            "sgd",
            "grad-mean",
            ("sync",),
            None,
            0.0,
            "synchronous all-reduce SGD (what DDP does): gradients averaged every step",
        ),
        MethodSpec(
            "localsgd",
            "sgd",
            "param-mean",
            ("sync",),
            None,
            0.0,
            "local SGD: parameters averaged after every tau local steps",
        ),
    )
}


def _check_real(
    name: str, value: float, lo: float, hi: float, *, lo_open: bool, hi_open: bool, hint: str = ""
) -> None:
    ok = (
        math.isfinite(value)
        and (value > lo if lo_open else value >= lo)
        and (value < hi if hi_open else value <= hi)
    )
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        hi_s = "inf" if math.isinf(hi) else f"{hi:g}"
        msg = f"{name}={value!r} is outside {left}{lo:g}, {hi_s}{right}"
        raise ValueError(f"{msg}; {hint}" if hint else msg)


@dataclass(frozen=True)
class Hyperparams:
    """Validated hyperparameters of one method.

    Args:
        method: one of :data:`METHODS` (default ``"eamsgd"``).
        lr: learning rate eta > 0 (default 0.01).
        tau: communication period >= 1, in local steps (default 1; MDOWNPOUR requires 1).
        workers: number of workers p >= 1 (sequential methods require 1).
        beta: center's moving rate; ``alpha = beta/p`` unless ``alpha`` is given
            (default 0.9, the paper's).
        alpha: worker's moving rate; give ``alpha`` or ``beta``, or both (then the elastic
            symmetry ``beta = p*alpha`` is not imposed, and only the synchronous rule uses beta).
        momentum: delta in [0, 1) (default 0.99 for EAMSGD, MSGD and MDOWNPOUR, else 0).
        weight_decay: L2 coefficient added to the gradient (default 0).
        lr_decay, lr_power: ``lr_t = lr / (1 + t*lr_decay) ** lr_power`` (default no decay).
        moving_rate: constant rate of MVADOWNPOUR / MVASGD (default 0.001).

    Values outside the analytic stability region of synchronous EASGD for every learning
    rate (``alpha + beta >= 2``, paper-spec 6.3 as eta*h -> 0) warn with
    :class:`StabilityWarning`.

    Example:
        >>> hp = Hyperparams(method="eamsgd", lr=0.01, tau=10, workers=4)
        >>> hp.alpha, hp.beta, hp.momentum
        (0.225, 0.9, 0.99)
    """

    method: str = "eamsgd"
    lr: float = 0.01
    tau: int = 1
    workers: int = 1
    # None means "derived" (see Args); after validation every field holds a float.
    beta: float = None  # type: ignore[assignment]
    alpha: float = None  # type: ignore[assignment]
    momentum: float = None  # type: ignore[assignment]
    weight_decay: float = 0.0
    lr_decay: float = 0.0
    lr_power: float = 0.0
    moving_rate: float = DEFAULT_MOVING_RATE

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"method={self.method!r} is not a known method; choose one of {', '.join(METHODS)}"
            )
        spec = METHODS[self.method]
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers={self.workers!r} must be an integer >= 1")
        if isinstance(self.tau, bool) or not isinstance(self.tau, int) or self.tau < 1:
            raise ValueError(
                f"tau={self.tau!r} must be an integer >= 1 (local steps between exchanges)"
            )
        _check_real(
            "lr",
            self.lr,
            0.0,
            math.inf,
            lo_open=True,
            hi_open=True,
            hint="the learning rate must be a positive number, e.g. lr=0.01",
        )
        if spec.modes == ("sequential",) and self.workers != 1:
            raise ValueError(
                f"workers={self.workers} with method={self.method!r}: {self.method} is "
                "sequential and runs one worker; use workers=1, or a distributed method "
                "such as easgd or eamsgd"
            )
        if self.method == "mdownpour" and self.tau != 1:
            raise ValueError(
                f"tau={self.tau} with method='mdownpour': MDOWNPOUR exchanges every step (tau=1); "
                "use downpour for tau > 1"
            )
        momentum = spec.momentum_default if self.momentum is None else self.momentum
        _check_real(
            "momentum",
            momentum,
            0.0,
            1.0,
            lo_open=False,
            hi_open=True,
            hint="the paper uses delta=0.99",
        )
        if momentum and self.method in (
            "easgd",
            "sgd",
            "asgd",
            "mvasgd",
            "downpour",
            "adownpour",
            "mvadownpour",
        ):
            hint = {"easgd": "eamsgd", "sgd": "msgd"}.get(self.method, "eamsgd or mdownpour")
            raise ValueError(
                f"momentum={momentum} with method={self.method!r}, which has no momentum; "
                f"use method {hint} for Nesterov momentum, or momentum=0"
            )
        object.__setattr__(self, "momentum", float(momentum))
        _check_real(
            "weight_decay",
            self.weight_decay,
            0.0,
            math.inf,
            lo_open=False,
            hi_open=True,
            hint="the paper uses 1e-4 on CIFAR",
        )
        _check_real("lr_decay", self.lr_decay, 0.0, math.inf, lo_open=False, hi_open=True)
        _check_real("lr_power", self.lr_power, 0.0, math.inf, lo_open=False, hi_open=True)
        rate = self.moving_rate
        _check_real(
            "moving_rate",
            rate,
            0.0,
            1.0,
            lo_open=True,
            hi_open=False,
            hint="the paper's MVADOWNPOUR uses 0.001",
        )
        object.__setattr__(self, "moving_rate", float(rate))
        self._resolve_elasticity()

    def _resolve_elasticity(self) -> None:
        p = self.workers
        if self.beta is None and self.alpha is None:
            beta, alpha = DEFAULT_BETA, DEFAULT_BETA / p
        elif self.alpha is None:
            beta, alpha = self.beta, self.beta / p
        elif self.beta is None:
            alpha, beta = self.alpha, self.alpha * p
        else:
            alpha, beta = self.alpha, self.beta
        paper = f"with p={p} workers the paper's choice is alpha=beta/p={DEFAULT_BETA / p:.4g}"
        _check_real("alpha", alpha, 0.0, 1.0, lo_open=True, hi_open=False, hint=paper)
        _check_real(
            "beta",
            beta,
            0.0,
            2.0,
            lo_open=True,
            hi_open=True,
            hint=f"the paper's choice is beta=0.9 (alpha=beta/p); {paper}",
        )
        object.__setattr__(self, "alpha", float(alpha))
        object.__setattr__(self, "beta", float(beta))
        if METHODS[self.method].exchange == "elastic" and alpha + beta >= 2.0:
            warnings.warn(
                f"alpha={alpha:g}, beta={beta:g}: alpha + beta >= 2 lies outside the stability "
                f"region of synchronous EASGD for every learning rate (paper-spec 6.3); {paper}",
                StabilityWarning,
                stacklevel=4,
            )

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    def check_quadratic(self, h: float) -> None:
        """Warn when ``eta*h`` on a quadratic of curvature ``h`` leaves the stable region."""
        u = self.lr * h
        if not 0.0 < u < 2.0:
            warnings.warn(
                f"lr*h={u:g} (lr={self.lr:g}, h={h:g}) is outside (0, 2): the local SGD step "
                "alone diverges on this quadratic; lower the learning rate",
                StabilityWarning,
                stacklevel=2,
            )

    def replace(self, **changes: Any) -> Hyperparams:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------
# Sequencing: the worker's step as a generator of requests, and the center.
# ---------------------------------------------------------------------------------------


class Op(enum.Enum):
    """What a worker asks of its driver."""

    GRAD = "grad"  # compute the gradient at x into payload; the driver sends back the loss
    LOCAL = "local"  # an external optimizer takes the local step on x; the driver sends the loss
    ELASTIC = "elastic"  # async: payload x -> reply d = alpha*(x - center), center += d
    SUM = "sum"  # sync: all-reduce (sum) payload in place; the driver may defer it (below)
    WAIT = "wait"  # sync: complete the deferred SUM of payload (started by this worker)
    MEAN = "mean"  # sync: all-reduce (mean) payload in place across workers
    PUSH_PULL = "push_pull"  # DOWNPOUR: payload acc -> center += acc; reply = center
    GRAD_PULL = "grad_pull"  # MDOWNPOUR: payload g -> server Nesterov step; reply = center


@dataclass
class Request:
    """One request of a worker's step. ``reply`` is filled by the driver where needed."""

    op: Op
    payload: Tensor
    reply: Tensor | None = None
    #: Set by a driver that started a ``SUM`` without completing it (an asynchronous
    #: all-reduce); the worker then yields ``WAIT`` on the same payload before it reads it.
    deferred: bool = False


class Worker:
    """One worker's state and its local step.

    ``step()`` is a generator: drive it with :func:`run_step` (or by hand: ``send`` the loss
    back after a ``GRAD`` request, ``None`` after the others). ``x`` is the worker's flat
    parameter vector, used in place (it may be a view of a model's flat parameter buffer).

    Args:
        hp: validated hyperparameters.
        x: the flat parameter vector (starts equal to the center).
        mode: ``"sync"``, ``"async"`` or ``"sequential"``; must be one the method supports.
        grad: where ``GRAD`` requests are to write the gradient (default: a new buffer).
        external_local: yield ``LOCAL`` (take your own optimizer's step on ``x``) instead of
            computing the method's own local step; the exchanges stay the method's.
    """

    def __init__(
        self,
        hp: Hyperparams,
        x: Tensor,
        mode: str,
        grad: Tensor | None = None,
        *,
        external_local: bool = False,
    ) -> None:
        spec = hp.spec
        if external_local and spec.exchange not in ("elastic", "param-mean", "none"):
            raise ValueError(
                f"method={hp.method!r} cannot wrap an external optimizer: its exchange "
                f"({spec.exchange}) needs the raw gradient; use easgd, eamsgd or localsgd"
            )
        self.external_local = external_local
        if mode not in spec.modes:
            raise ValueError(
                f"mode={mode!r} is not available for method={hp.method!r}; it runs in "
                f"{' or '.join(spec.modes)} mode"
            )
        if x.dim() != 1:
            raise ValueError(f"x must be a flat 1-D tensor, got shape {tuple(x.shape)}")
        self.hp = hp
        self.mode = mode
        self.x = x
        self.t = 0
        if grad is not None and grad.shape != x.shape:
            raise ValueError(f"grad has shape {tuple(grad.shape)}, x has {tuple(x.shape)}")
        # The gradient buffer may be a model's flat gradient (its .grad tensors are views).
        self.grad = torch.zeros_like(x) if grad is None else grad
        zeros = torch.zeros_like
        self.v = zeros(x) if spec.local == "nesterov" else None
        self.acc = zeros(x) if spec.exchange == "downpour" else None
        # Synchronous EASGD: every worker holds an identical copy of the center, and one
        # buffer serves as its difference x_t - c_t and then as the all-reduced sum.
        sync_elastic = spec.exchange == "elastic" and mode == "sync"
        self.center = x.clone() if sync_elastic else None
        self.sum_buf = zeros(x) if sync_elastic else None
        self.diff = zeros(x) if spec.exchange == "elastic" and not sync_elastic else None
        self.z = x.clone() if (spec.average and mode == "sequential") else None
        self.last_loss = math.nan
        self._in_flight = False  # a deferred synchronous sum awaits its center update

    @property
    def in_flight(self) -> bool:
        """Whether a deferred synchronous exchange still owes its center update."""
        return self._in_flight

    def settle(self) -> Generator[Request, Any, None]:
        """Complete a deferred synchronous exchange: ``WAIT`` for the sum, update the center.

        A no-op unless the driver deferred the last ``SUM``. Call it (e.g. with
        :func:`run_settle`) before reading ``center`` for evaluation or a checkpoint and at
        the end of training; waiting is local (the all-reduce was started by every rank),
        so one rank may settle alone.
        """
        if not self._in_flight:
            return
        assert self.center is not None and self.sum_buf is not None
        yield Request(Op.WAIT, self.sum_buf)
        elastic_center_sync_(self.center, self.sum_buf, self.hp.beta, self.hp.workers)
        self._in_flight = False

    def communicates(self) -> bool:
        """Whether the step about to run exchanges with the center (``t % tau == 0``)."""
        exchange = self.hp.spec.exchange
        if exchange in ("elastic", "downpour"):
            return self.t % self.hp.tau == 0
        if exchange == "param-mean":
            return (self.t + 1) % self.hp.tau == 0
        return exchange in ("mdownpour", "grad-mean")

    def evaluation_vector(self) -> Tensor:
        """What is evaluated for this worker alone: its average, its center copy, or x."""
        if self.z is not None:
            return self.z
        if self.center is not None:
            return self.center
        return self.x

    def step(self) -> Generator[Request, Any, None]:
        hp, spec, x = self.hp, self.hp.spec, self.x
        lr = learning_rate(hp.lr, self.t, hp.lr_decay, hp.lr_power)
        comm = self.communicates()
        if spec.exchange == "elastic" and comm:
            if self.mode == "async":
                assert self.diff is not None
                yield Request(Op.ELASTIC, x, self.diff)
            else:
                assert self.center is not None
                assert self.sum_buf is not None
                yield from self.settle()  # the previous exchange's center update
                # x_t - c_t, unscaled: the pull and the center update scale it. It is
                # all-reduced after the pull below, in place: no copy, no second buffer.
                torch.sub(x, self.center, out=self.sum_buf)
        if self.z is not None:
            # Sequential averages use x_t, before this step's update.
            self.z.lerp_(x, average_rate(spec.average or "", self.t, hp.moving_rate))
        if self.external_local:
            # A user's own optimizer (easgd.optim) takes the local step, whatever it is.
            self.last_loss = yield Request(Op.LOCAL, x)
        else:
            if self.v is not None:
                nesterov_lookahead_(x, self.v, hp.momentum)
            self.last_loss = yield Request(Op.GRAD, self.grad)
        g = self.grad
        if spec.exchange == "downpour":
            assert self.acc is not None
            if hp.weight_decay:
                g.add_(x, alpha=hp.weight_decay)
            downpour_accumulate_(self.acc, g, lr)
            if comm:
                yield Request(Op.PUSH_PULL, self.acc, x)
                self.acc.zero_()
            else:
                x.add_(g, alpha=-lr)
        elif spec.exchange == "mdownpour":
            if hp.weight_decay:
                g.add_(x, alpha=hp.weight_decay)
            yield Request(Op.GRAD_PULL, g, x)
        else:
            if spec.exchange == "grad-mean":
                yield Request(Op.MEAN, g)
            if not self.external_local:
                local_step_(x, g, lr, self.v, hp.weight_decay)
            if spec.exchange == "elastic" and comm:
                if self.mode == "sync":
                    assert self.center is not None and self.sum_buf is not None
                    x.sub_(self.sum_buf, alpha=hp.alpha)  # x -= alpha*(x_t - c_t)
                    req = Request(Op.SUM, self.sum_buf)
                    yield req
                    if req.deferred:
                        # In flight during the next tau - 1 local steps, which never read
                        # it; the center is next needed at the next exchange (settle).
                        self._in_flight = True
                    else:
                        elastic_center_sync_(self.center, self.sum_buf, hp.beta, hp.workers)
                else:
                    assert self.diff is not None
                    x.sub_(self.diff)  # the server's d = alpha*(x - c)
            elif spec.exchange == "param-mean" and comm:
                yield Request(Op.MEAN, x)
        self.t += 1


class Center:
    """The center variable (or one contiguous shard of it) and its server-side state.

    ``handle`` applies one request atomically with respect to other ``handle`` calls as
    long as the caller serializes them (the parameter server holds a lock; the simulator is
    single-threaded). ``t`` is the master clock: the number of center updates so far.
    """

    def __init__(self, hp: Hyperparams, center: Tensor) -> None:
        if center.dim() != 1:
            raise ValueError(f"center must be a flat 1-D tensor, got shape {tuple(center.shape)}")
        self.hp = hp
        self.center = center
        self.t = 0
        spec = hp.spec
        self.v = torch.zeros_like(center) if spec.exchange == "mdownpour" else None
        self.z = center.clone() if spec.average else None

    def evaluation_vector(self) -> Tensor:
        """The evaluated variable: the average ``z`` for the averaging methods, else the center."""
        return self.z if self.z is not None else self.center

    def handle(self, op: Op, payload: Tensor, reply: Tensor) -> None:
        hp, c = self.hp, self.center
        if self.z is not None:
            # ADOWNPOUR / MVADOWNPOUR: z_{t+1} = (1 - a) z_t + a * center_t.
            self.z.lerp_(c, average_rate(hp.spec.average or "", self.t, hp.moving_rate))
        if op is Op.ELASTIC:
            elastic_exchange_(c, payload, hp.alpha, reply)
        elif op is Op.PUSH_PULL:
            c.add_(payload)
            reply.copy_(c)
        elif op is Op.GRAD_PULL:
            assert self.v is not None
            lr = learning_rate(hp.lr, self.t, hp.lr_decay, hp.lr_power)
            mdownpour_center_(c, self.v, payload, lr, hp.momentum)
            reply.copy_(c)
        else:
            raise ValueError(f"the center does not serve {op.value!r} requests")
        self.t += 1

    def state_dict(self) -> dict[str, Any]:
        return {"center": self.center, "t": self.t, "v": self.v, "z": self.z}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.center.copy_(state["center"])
        self.t = int(state["t"])
        for name in ("v", "z"):
            mine, theirs = getattr(self, name), state.get(name)
            if mine is not None and theirs is not None:
                mine.copy_(theirs)


def run_settle(worker: Worker, serve: Any) -> None:
    """Drive :meth:`Worker.settle` with a blocking ``serve`` (see :func:`run_step`)."""
    for req in worker.settle():
        serve(req)


def run_step(worker: Worker, grad_fn: Any, serve: Any) -> float:
    """Drive one step of ``worker`` with blocking callables; returns the step's loss.

    ``grad_fn(x, out) -> float`` writes the gradient at ``x`` into ``out`` and returns the
    loss; ``serve(request) -> None`` fulfils every other request (fills ``request.reply``
    or reduces ``request.payload`` in place).
    """
    gen = worker.step()
    reply: Any = None
    try:
        while True:
            req = gen.send(reply)
            if req.op is Op.GRAD:
                reply = float(grad_fn(worker.x, req.payload))
            else:
                serve(req)
                reply = None
    except StopIteration:
        pass
    return worker.last_loss
