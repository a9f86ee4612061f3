"""Every update rule of the EASGD family, once.

Pure, in-place functions on flat 1-D tensors, and two thin state holders that sequence them:

* :class:`Worker` runs one local step as a generator that *yields* what it needs from the
  outside world (a gradient, an exchange with the center) and resumes when the request is
  fulfilled. The simulator, the all-reduce runtime, the parameter-server runtime and the
  ``easgd.optim`` wrappers all drive this same generator, so the order of operations of
  every method is written here and nowhere else.
* :class:`Center` holds the center variable and answers exchanges, atomically; the
  parameter server calls it under its lock, the simulator calls it directly. The atomic
  exchange is **our choice**: the authors' server adds each update to its copy without a
  lock and expects inconsistent reads (paper-spec 2.2).

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
* MDOWNPOUR: ``tau = 1``, the gradient is pushed and the *server* applies Nesterov momentum
  (the paper's); the master rule ``v = delta*v - lr*g; center += delta*v - lr*g`` is **our
  choice**, a recollection of the paper that no source confirms (paper-spec 2.5, and 8
  "Not confirmed", item 1).
* ADOWNPOUR / MVADOWNPOUR (and sequential ASGD / MVASGD): an average ``z`` of the center
  (of ``x``) with rate ``1/(t+1)`` or a constant rate; ``z`` is what gets evaluated.
  MVADOWNPOUR's 0.001 is the paper's; MVASGD's rate is not confirmed, and its default of
  0.001 is **our choice** (paper-spec 2.5, and 8 item 2).
* All-reduce SGD (DDP) averages gradients every step; local SGD averages parameters after
  every ``tau``-th local step.
* DiLoCo (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of
  Language Models"): every worker takes ``tau`` (the paper's H) inner steps from the global
  parameters ``c``; then the pseudo-gradient ``Delta = c - mean_i(x_i)`` (one flat
  all-reduce) takes an outer Nesterov step on ``c`` and every worker restarts from the new
  ``c`` (:func:`diloco_outer_step_`). The paper names Nesterov momentum; its
  parametrization here is PyTorch's (``torch.optim.SGD(nesterov=True)``, as torchft's):
  **our choice**. The paper's inner optimizer is AdamW
  (``inner="adamw"``, :func:`adamw_step_`, or any optimizer wrapped by
  ``easgd.optim.DiLoCo``); ``inner="sgd"`` (the default) is **our choice** for a
  comparison with local SGD: SGD or the authors' Nesterov form (``momentum``). The paper's
  outer defaults are lr 0.7, momentum 0.9. The inner state (momentum, AdamW's moments) is
  kept across rounds, as torchft keeps it; our choices: a run ends on the last completed
  round's ``c`` (no extra outer step), and buffers are averaged, not extrapolated.
* L2 weight decay is added to the gradient (``g += wd * x`` at the point of evaluation) and
  the learning rate decays on the local clock: ``lr_t = lr / (1 + t*lr_decay) ** lr_power``
  (the authors' code's form; the paper's schedule is not confirmed, and no decay, the
  default, is **our choice**: paper-spec 3).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import warnings
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from easgd.compress import Codec

__all__ = [
    "DEFAULT_BETA",
    "DEFAULT_MOMENTUM",
    "DEFAULT_MOVING_RATE",
    "DEFAULT_OUTER_LR",
    "DEFAULT_OUTER_MOMENTUM",
    "INNER_OPTIMIZERS",
    "METHODS",
    "Average",
    "Center",
    "CompressedSum",
    "Evaluated",
    "Exchange",
    "Hyperparams",
    "MethodSpec",
    "Mode",
    "Momentum",
    "Op",
    "Request",
    "StabilityWarning",
    "Worker",
    "adamw_step_",
    "average_rate",
    "check_compress",
    "check_overlap",
    "compress_with_feedback_",
    "compressed_elastic_receive_",
    "compressed_elastic_send_",
    "compressed_elastic_serve_",
    "contribution",
    "diloco_outer_step_",
    "downpour_accumulate_",
    "drive",
    "elastic_center_sync_",
    "elastic_difference_",
    "elastic_exchange_",
    "learning_rate",
    "local_step_",
    "mdownpour_center_",
    "nesterov_lookahead_",
    "run_exchanges",
    "run_finish",
    "run_settle",
    "run_step",
    "simulate_compressed_sum",
]

DEFAULT_BETA = 0.9
DEFAULT_MOMENTUM = 0.99
DEFAULT_MOVING_RATE = 0.001
#: DiLoCo's outer Nesterov SGD (Douillard et al. 2023: lr 0.7, momentum 0.9).
DEFAULT_OUTER_LR = 0.7
DEFAULT_OUTER_MOMENTUM = 0.9


class StabilityWarning(UserWarning):
    """A legal hyperparameter outside the analytic stability region."""


# ---------------------------------------------------------------------------------------
# The rules: pure, in-place functions on flat tensors (hyperparameters keyword-only).
# ---------------------------------------------------------------------------------------


class Average(enum.Enum):
    """The running average ``z = (1-a)*z + a*x`` of ADOWNPOUR/ASGD (uniform) or MV* (moving)."""

    UNIFORM = "uniform"  # a_{t+1} = 1/(t+1): the Polyak average
    MOVING = "moving"  # a constant rate (moving_rate)


def learning_rate(lr: float, t: int, *, lr_decay: float = 0.0, lr_power: float = 0.0) -> float:
    """The authors' decay on the local clock: ``lr / (1 + t*lr_decay) ** lr_power``."""
    if lr_decay == 0.0 or lr_power == 0.0:
        return lr
    return lr / (1.0 + t * lr_decay) ** lr_power


def nesterov_lookahead_(x: Tensor, v: Tensor, *, momentum: float) -> None:
    """First half of the Nesterov step: ``v = delta*v; x += v`` (gradient is then taken at x)."""
    v.mul_(momentum)
    x.add_(v)


def local_step_(
    x: Tensor, grad: Tensor, v: Tensor | None = None, *, lr: float, weight_decay: float = 0.0
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


#: The inner optimizers of ``inner=`` (DiLoCo): the method's own SGD step (with its Nesterov
#: momentum, if any) or AdamW.
INNER_OPTIMIZERS = ("sgd", "adamw")
#: AdamW's constants for ``inner="adamw"`` (PyTorch's defaults; not flags).
ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPS = 1e-8


def adamw_step_(
    x: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = ADAMW_BETAS,
    eps: float = ADAMW_EPS,
) -> None:
    """One AdamW step (Loshchilov & Hutter 2019), DiLoCo's inner optimizer; ``step`` from 1.

    ``x *= 1 - lr*wd`` (decoupled weight decay); ``m = lerp(m, g, 1-b1)``;
    ``s = b2*s + (1-b2)*g^2``; ``x -= lr/(1-b1^step) * m / (sqrt(s)/sqrt(1-b2^step) + eps)``:
    the operations of ``torch.optim.AdamW(foreach=False)``, in its order.
    """
    beta1, beta2 = betas
    if weight_decay:
        x.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    x.addcdiv_(exp_avg, denom, value=-step_size)


def elastic_difference_(out: Tensor, x: Tensor, center: Tensor, *, alpha: float) -> Tensor:
    """``out = alpha * (x - center)``, the elastic force between a worker and the center."""
    torch.sub(x, center, out=out)
    out.mul_(alpha)
    return out


def elastic_exchange_(center: Tensor, x: Tensor, out: Tensor, *, alpha: float) -> Tensor:
    """Asynchronous exchange on the center's side: ``d = alpha*(x - center); center += d``.

    Computed against the center as it is when the request is served, so with the server's
    lock held no update is lost and no read is torn. Returns ``d`` (in ``out``), which the
    worker subtracts from its own variable.
    """
    elastic_difference_(out, x, center, alpha=alpha)
    center.add_(out)
    return out


def elastic_center_sync_(center: Tensor, diff_sum: Tensor, *, beta: float, p: int) -> None:
    """Synchronous center update from the sum of the p differences ``x_i - c``.

    ``c += (beta/p) * sum_i (x_i - c)`` is ``c = (1-beta)*c + beta*mean_i(x_i)``, the
    paper's eq. (6), with time-t values. The differences are left unscaled by alpha (the
    worker scales its own pull), which saves a pass over the vector on the hot path.
    """
    center.add_(diff_sum, alpha=beta / p)


def diloco_outer_step_(
    center: Tensor,
    delta_sum: Tensor,
    v: Tensor | None,
    *,
    p: int,
    outer_lr: float,
    outer_momentum: float,
    trainable: int | None = None,
) -> None:
    """DiLoCo's outer step on the global parameters from the sum of the p pseudo-gradients.

    ``delta_sum = sum_i (c - x_i)`` (all-reduced), so the pseudo-gradient is
    ``g = delta_sum / p = c - mean_i(x_i)``; then Nesterov SGD in PyTorch's form
    (``torch.optim.SGD(nesterov=True)``, torchft's outer optimizer; our choice of form):
    ``v = mu*v + g; c -= outer_lr * (g + mu*v)``. ``outer_lr = 1, mu = 0`` is
    ``c = mean_i(x_i)``: local SGD (up to rounding). ``delta_sum`` is overwritten.

    Only ``c[:trainable]`` takes the outer step (``v`` has that size); the rest (a model's
    floating-point buffers, e.g. BatchNorm statistics, which are no parameters to
    extrapolate) becomes the workers' mean. Our choice: the paper has no buffers.
    """
    n = center.numel() if trainable is None else trainable
    g = delta_sum.div_(p)
    if n < center.numel():
        center[n:].sub_(g[n:])  # c - mean(c - x) = mean(x)
    g, c = g[:n], center[:n]
    if v is not None and outer_momentum:
        v.mul_(outer_momentum).add_(g)
        g.add_(v, alpha=outer_momentum)
    c.sub_(g, alpha=outer_lr)


def downpour_accumulate_(acc: Tensor, grad: Tensor, *, lr: float) -> None:
    """DOWNPOUR's accumulated update: ``acc += -lr*g``."""
    acc.add_(grad, alpha=-lr)


def mdownpour_center_(
    center: Tensor, v: Tensor, grad: Tensor, *, lr: float, momentum: float
) -> None:
    """MDOWNPOUR's master rule, Nesterov on the server.

    ``v = delta*v - lr*g; c += delta*v - lr*g`` (the look-ahead form). **Our choice**: the
    paper applies momentum on the master but its pseudo-code was not retrieved; this rule
    is a recollection of it (paper-spec 2.5 "[R]", and 8 "Not confirmed", item 1).
    """
    v.mul_(momentum).add_(grad, alpha=-lr)
    center.add_(v, alpha=momentum).add_(grad, alpha=-lr)


def average_rate(kind: Average, t: int, *, moving_rate: float) -> float:
    """Rate of the running average ``z = (1-a)*z + a*x``: ``1/(t+1)`` (uniform) or constant."""
    return 1.0 / (t + 1) if kind is Average.UNIFORM else moving_rate


# ---------------------------------------------------------------------------------------
# The method table: the only place that knows a method.
# ---------------------------------------------------------------------------------------


class Op(enum.Enum):
    """What a worker asks of its driver."""

    GRAD = "grad"  # compute the gradient at x into payload; the driver sends back the loss
    LOCAL = "local"  # an external optimizer takes the local step on x; the driver sends the loss
    ELASTIC = "elastic"  # async: payload x -> reply d = alpha*(x - center), center += d
    SUM = "sum"  # sync: all-reduce (sum) payload in place; the driver may defer it (below)
    WAIT = "wait"  # complete a deferred SUM of payload, or a deferred ELASTIC's reply payload
    MEAN = "mean"  # sync: all-reduce (mean) payload in place across workers
    PUSH_PULL = "push_pull"  # DOWNPOUR: payload acc -> center += acc; reply = center
    GRAD_PULL = "grad_pull"  # MDOWNPOUR: payload g -> server Nesterov step; reply = center


class Mode(enum.Enum):
    """How the workers of a run meet the center."""

    SYNC = "sync"  # collectives on every rank (no server)
    ASYNC = "async"  # each worker on its own clock, through the parameter server
    SEQUENTIAL = "sequential"  # one worker alone


class Exchange(enum.Enum):
    """What a communication step does."""

    ELASTIC = "elastic"  # the elastic force between x and the center (EASGD, EAMSGD)
    DOWNPOUR = "downpour"  # push the accumulated -lr*sum(g), pull the center
    MDOWNPOUR = "mdownpour"  # push the gradient, the server takes a Nesterov step, pull
    GRAD_MEAN = "grad-mean"  # average the gradients (all-reduce SGD, as DDP does)
    PARAM_MEAN = "param-mean"  # average the parameters (local SGD)
    #: average the pseudo-gradients c - x_i, an outer Nesterov step on c (DiLoCo)
    PSEUDO_GRADIENT = "pseudo-gradient"
    NONE = "none"  # sequential methods


class Momentum(enum.Enum):
    """Where a method's Nesterov momentum lives, if anywhere."""

    NONE = "none"
    LOCAL = "local"  # the worker's local step (authors' Nesterov form)
    SERVER = "server"  # the center's update (MDOWNPOUR)


class Evaluated(enum.Enum):
    """Which vector a method's result is: what is evaluated, snapshotted and reported."""

    CENTER = "center"  # the center (the server's, sync EASGD's copy, DiLoCo's global params)
    AVERAGE = "average"  # the running average z (of the center, or of x when sequential)
    X = "x"  # the worker's own variable (sequential; all-reduce SGD, equal on every rank)
    MEAN_X = "mean-x"  # the workers' mean: local SGD's x right after an average


#: The server's answer to each asynchronous exchange.
_SERVER_OP = {
    Exchange.ELASTIC: Op.ELASTIC,
    Exchange.DOWNPOUR: Op.PUSH_PULL,
    Exchange.MDOWNPOUR: Op.GRAD_PULL,
}


@dataclass(frozen=True)
class MethodSpec:
    """How one method is put together from the rules above, and everything it implies.

    Every other module asks the spec (which modes, which hyperparameters, when it
    communicates, what its server answers, which vector is its result) instead of comparing
    method names.
    """

    name: str
    exchange: Exchange
    #: The modes it runs in; the first is the default (``--mode auto``).
    modes: tuple[Mode, ...]
    momentum: Momentum
    momentum_default: float
    description: str
    average: Average | None = None
    #: A communication period the method requires (MDOWNPOUR exchanges every step).
    fixed_tau: int | None = None

    @property
    def sequential(self) -> bool:
        return self.modes == (Mode.SEQUENTIAL,)

    @property
    def elastic(self) -> bool:
        return self.exchange is Exchange.ELASTIC

    @property
    def outer(self) -> bool:
        """Whether an outer optimizer steps the center on averaged pseudo-gradients (DiLoCo)."""
        return self.exchange is Exchange.PSEUDO_GRADIENT

    @property
    def hyperparams(self) -> frozenset[str]:
        """The optional hyperparameters the method uses (the others are refused when given)."""
        used = {"momentum"} if self.momentum is not Momentum.NONE else set()
        if self.elastic:
            used |= {"alpha", "beta"}
        if self.average is Average.MOVING:
            used.add("moving_rate")
        if self.outer:
            used |= {"outer_lr", "outer_momentum", "inner"}
        return frozenset(used)

    def uses(self, field_name: str) -> bool:
        return field_name in self.hyperparams

    @property
    def server_op(self) -> Op | None:
        """The exchange a parameter server answers for this method (None: no server)."""
        return _SERVER_OP.get(self.exchange) if Mode.ASYNC in self.modes else None

    @property
    def recoverable(self) -> bool:
        """Whether the center is the initial one plus the sum of the workers' contributions.

        EASGD/EAMSGD add ``d``, the DOWNPOUR family adds ``acc``: a restarted server can be
        rebuilt exactly from its checkpoint and the contributions the workers re-send.
        MDOWNPOUR's center also carries the server's momentum, which no worker holds.
        """
        return self.exchange in (Exchange.ELASTIC, Exchange.DOWNPOUR)

    @property
    def wraps_optimizer(self) -> bool:
        """Whether an external optimizer can take the local step (its exchange needs only x)."""
        return self.exchange in (
            Exchange.ELASTIC,
            Exchange.PARAM_MEAN,
            Exchange.PSEUDO_GRADIENT,
            Exchange.NONE,
        )

    def resolve_mode(self, requested: Mode | str | None = None, *, strict: bool = True) -> Mode:
        """The mode a run of this method uses.

        ``None`` (or ``"auto"``) is the method's default; a sequential method is always
        sequential. A mode the method does not run in is a ValueError, or with
        ``strict=False`` the default instead (the simulator's synchronous schedule serves
        the DOWNPOUR family asynchronously, in worker order).
        """
        if self.sequential:
            return Mode.SEQUENTIAL
        if requested is None or requested == "auto":
            return self.modes[0]
        try:
            mode = Mode(requested)
        except ValueError:
            choices = ", ".join(["auto", *(m.value for m in Mode)])
            raise ValueError(f"mode={requested!r}; choose one of {choices}") from None
        if mode in self.modes:
            return mode
        if not strict:
            return self.modes[0]
        raise ValueError(
            f"mode={mode.value!r} is not available for method={self.name!r}; it runs in "
            f"{' or '.join(m.value for m in self.modes)} mode"
        )

    def communicates(self, t: int, tau: int) -> bool:
        """Whether the local step ``t`` (counted from 0) exchanges.

        Elastic and DOWNPOUR exchange before the step when ``t % tau == 0``; local SGD
        averages after every tau-th step (``(t+1) % tau == 0``, as PyTorch's
        PeriodicModelAverager), and DiLoCo takes its outer step there (after H = tau inner
        steps); MDOWNPOUR and all-reduce SGD at every step.
        """
        if self.exchange in (Exchange.ELASTIC, Exchange.DOWNPOUR):
            return t % tau == 0
        if self.exchange in (Exchange.PARAM_MEAN, Exchange.PSEUDO_GRADIENT):
            return (t + 1) % tau == 0
        return self.exchange in (Exchange.MDOWNPOUR, Exchange.GRAD_MEAN)

    @property
    def evaluated(self) -> Evaluated:
        """Which vector is the method's result."""
        if self.average is not None:
            return Evaluated.AVERAGE
        if self.exchange in (Exchange.NONE, Exchange.GRAD_MEAN):
            return Evaluated.X
        if self.exchange is Exchange.PARAM_MEAN:
            return Evaluated.MEAN_X
        return Evaluated.CENTER

    def evaluated_on_server(self, mode: Mode) -> bool:
        """Whether the result lives on the parameter server (else on every worker)."""
        return mode is Mode.ASYNC

    def result_is_current(self, mode: Mode, t: int, tau: int) -> bool:
        """Whether a worker at local clock ``t`` holds the result (local SGD: after an average)."""
        if self.exchange is Exchange.PARAM_MEAN and mode is Mode.SYNC:
            return t % tau == 0
        return True

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain strings (for ``easgd models``-style listings and files)."""
        return {
            "name": self.name,
            "exchange": self.exchange.value,
            "modes": [m.value for m in self.modes],
            "momentum": self.momentum.value,
            "momentum_default": self.momentum_default,
            "average": None if self.average is None else self.average.value,
            "evaluated": self.evaluated.value,
            "hyperparams": sorted(self.hyperparams),
            "description": self.description,
        }


_A, _S, _Q = Mode.ASYNC, Mode.SYNC, Mode.SEQUENTIAL
_LOCAL, _NONE = Momentum.LOCAL, Momentum.NONE

METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec("easgd", Exchange.ELASTIC, (_A, _S), _NONE, 0.0,
                   "elastic averaging SGD (Algorithm 1; synchronous eqs. 5-6)"),
        MethodSpec("eamsgd", Exchange.ELASTIC, (_A, _S), _LOCAL, DEFAULT_MOMENTUM,
                   "elastic averaging with local Nesterov momentum (Algorithm 2)"),
        MethodSpec("downpour", Exchange.DOWNPOUR, (_A,), _NONE, 0.0,
                   "DOWNPOUR: push accumulated -lr*sum(g) every tau steps, pull the center"),
        MethodSpec("mdownpour", Exchange.MDOWNPOUR, (_A,), Momentum.SERVER, DEFAULT_MOMENTUM,
                   "DOWNPOUR with Nesterov momentum on the server, tau = 1", fixed_tau=1),
        MethodSpec("adownpour", Exchange.DOWNPOUR, (_A,), _NONE, 0.0,
                   "DOWNPOUR with a uniform (Polyak) average of the center", Average.UNIFORM),
        MethodSpec("mvadownpour", Exchange.DOWNPOUR, (_A,), _NONE, 0.0,
                   "DOWNPOUR with a moving average of the center", Average.MOVING),
        MethodSpec("sgd", Exchange.NONE, (_Q,), _NONE, 0.0, "sequential SGD"),
        MethodSpec("msgd", Exchange.NONE, (_Q,), _LOCAL, DEFAULT_MOMENTUM,
                   "sequential SGD with Nesterov momentum"),
        MethodSpec("asgd", Exchange.NONE, (_Q,), _NONE, 0.0,
                   "sequential SGD with a uniform average of the iterates", Average.UNIFORM),
        MethodSpec("mvasgd", Exchange.NONE, (_Q,), _NONE, 0.0,
                   "sequential SGD with a moving average of the iterates", Average.MOVING),
        MethodSpec("allreduce", Exchange.GRAD_MEAN, (_S,), _LOCAL, 0.0,
                   "synchronous all-reduce SGD (what DDP does): gradients averaged every step; "
                   "optional Nesterov momentum"),
        MethodSpec("localsgd", Exchange.PARAM_MEAN, (_S,), _LOCAL, 0.0,
                   "local SGD: parameters averaged after every tau local steps; optional "
                   "Nesterov momentum (kept local)"),
        MethodSpec("diloco", Exchange.PSEUDO_GRADIENT, (_S,), _LOCAL, 0.0,
                   "DiLoCo: tau inner steps, then an outer Nesterov step (outer_lr 0.7, "
                   "outer_momentum 0.9) on the averaged pseudo-gradient; optional inner "
                   "Nesterov momentum"),
    )
}  # fmt: skip

#: What to suggest instead when a method is given a hyperparameter it does not use.
_INSTEAD = {
    "momentum": {"easgd": "eamsgd", "sgd": "msgd"},
    "alpha": {},
    "beta": {},
    "moving_rate": {"adownpour": "mvadownpour", "asgd": "mvasgd", "downpour": "mvadownpour",
                    "sgd": "mvasgd"},
    "outer_lr": {},
    "outer_momentum": {},
    "inner": {},
}  # fmt: skip
_WHAT = {
    "momentum": ("has no momentum", "for Nesterov momentum, or momentum=0", "eamsgd or msgd"),
    "alpha": ("has no elastic force", "for elastic averaging", "easgd or eamsgd"),
    "beta": ("has no elastic force", "for elastic averaging", "easgd or eamsgd"),
    "moving_rate": ("keeps no moving average", "for a moving average", "mvadownpour or mvasgd"),
    "outer_lr": ("has no outer optimizer", "for an outer step on averaged pseudo-gradients",
                 "diloco"),
    "outer_momentum": ("has no outer optimizer",
                       "for an outer step on averaged pseudo-gradients", "diloco"),
    "inner": ("takes only its own SGD steps", "for an AdamW inner optimizer", "diloco"),
}  # fmt: skip


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
        momentum: delta in [0, 1) (default 0.99 for EAMSGD, MSGD and MDOWNPOUR, else 0;
            all-reduce and local SGD take it too, in the authors' Nesterov form).
        weight_decay: L2 coefficient added to the gradient (default 0).
        lr_decay, lr_power: ``lr_t = lr / (1 + t*lr_decay) ** lr_power`` (default no decay).
        moving_rate: constant rate of MVADOWNPOUR / MVASGD (default 0.001: MVADOWNPOUR's
            is the paper's, MVASGD's is not confirmed and is our choice, paper-spec 2.5).
        outer_lr, outer_momentum: DiLoCo's outer Nesterov SGD on the pseudo-gradient
            (default 0.7 and 0.9, the DiLoCo paper's); outer_lr 1 with outer_momentum 0 is
            local SGD.
        inner: DiLoCo's inner optimizer: ``"sgd"`` (default: the local step above, Nesterov
            with ``momentum``) or ``"adamw"`` (:func:`adamw_step_`, betas 0.9/0.999, eps
            1e-8; ``weight_decay`` is then AdamW's decoupled decay, ``momentum`` must be 0).

    A hyperparameter the method does not use (``MethodSpec.hyperparams``), given with a
    non-trivial value, is refused. Values outside the analytic stability region of
    synchronous EASGD for every learning rate (``alpha + beta >= 2``, paper-spec 6.3 as
    eta*h -> 0) warn with :class:`StabilityWarning`.

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
    moving_rate: float = None  # type: ignore[assignment]
    outer_lr: float = None  # type: ignore[assignment]
    outer_momentum: float = None  # type: ignore[assignment]
    inner: str = None  # type: ignore[assignment]

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
        if spec.sequential and self.workers != 1:
            raise ValueError(
                f"workers={self.workers} with method={self.method!r}: {self.method} is "
                "sequential and runs one worker; use workers=1, or a distributed method "
                "such as easgd or eamsgd"
            )
        if spec.fixed_tau is not None and self.tau != spec.fixed_tau:
            raise ValueError(
                f"tau={self.tau} with method={self.method!r}: {self.method.upper()} exchanges "
                f"every step (tau={spec.fixed_tau}); use downpour for tau > 1"
            )
        self._refuse_unused(spec)
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
        rate = DEFAULT_MOVING_RATE if self.moving_rate is None else self.moving_rate
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
        self._resolve_outer()
        self._resolve_elasticity()

    def _refuse_unused(self, spec: MethodSpec) -> None:
        """A hyperparameter the method would silently drop is an error (momentum=0 is "off")."""
        for name, (lacks, purpose, default_hint) in _WHAT.items():
            value = getattr(self, name)
            trivial = (name == "momentum" and value == 0) or (name == "inner" and value == "sgd")
            if value is None or spec.uses(name) or trivial:
                continue
            instead = _INSTEAD[name].get(self.method, default_hint)
            off = ", or momentum=0" if name == "momentum" else ""
            purpose = purpose.replace(", or momentum=0", "")
            shown = repr(value) if isinstance(value, str) else value  # inner='adamw'
            raise ValueError(
                f"{name}={shown} with method={self.method!r}, which {lacks}; use method "
                f"{instead} {purpose}{off}"
            )

    def _resolve_outer(self) -> None:
        outer_lr = DEFAULT_OUTER_LR if self.outer_lr is None else self.outer_lr
        hint = "the DiLoCo paper uses outer_lr=0.7 with outer_momentum=0.9"
        _check_real("outer_lr", outer_lr, 0.0, math.inf, lo_open=True, hi_open=True, hint=hint)
        mu = DEFAULT_OUTER_MOMENTUM if self.outer_momentum is None else self.outer_momentum
        _check_real("outer_momentum", mu, 0.0, 1.0, lo_open=False, hi_open=True, hint=hint)
        object.__setattr__(self, "outer_lr", float(outer_lr))
        object.__setattr__(self, "outer_momentum", float(mu))
        inner = "sgd" if self.inner is None else self.inner
        if inner not in INNER_OPTIMIZERS:
            raise ValueError(f"inner={inner!r}; choose one of {', '.join(INNER_OPTIMIZERS)}")
        if inner == "adamw" and self.momentum:
            raise ValueError(
                f"momentum={self.momentum:g} with inner='adamw': AdamW keeps its own moment "
                "estimates (betas 0.9, 0.999); use momentum=0, or inner='sgd' for Nesterov "
                "inner steps"
            )
        object.__setattr__(self, "inner", inner)

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
        if self.spec.elastic and alpha + beta >= 2.0:
            warnings.warn(
                f"alpha={alpha:g}, beta={beta:g}: alpha + beta >= 2 lies outside the stability "
                f"region of synchronous EASGD for every learning rate (paper-spec 6.3); {paper}",
                StabilityWarning,
                stacklevel=4,
            )

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    def lr_at(self, t: int) -> float:
        """The learning rate at local step ``t`` (see :func:`learning_rate`)."""
        return learning_rate(self.lr, t, lr_decay=self.lr_decay, lr_power=self.lr_power)

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

    def to_dict(self) -> dict[str, Any]:
        """The fields as given to the constructor: those the method does not use are None."""
        out = dataclasses.asdict(self)
        for name in _WHAT:
            if not self.spec.uses(name):
                out[name] = None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Hyperparams:
        """Hyperparameters from :meth:`to_dict` (or an older file that lists every field)."""
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in known and v is not None}
        spec = METHODS.get(str(fields.get("method", "eamsgd")))
        if spec is not None:
            fields = {k: v for k, v in fields.items() if k not in _WHAT or spec.uses(k)}
        return cls(**fields)

    def replace(self, **changes: Any) -> Hyperparams:
        """A copy with some fields changed (validated again).

        Optional hyperparameters the (new) method does not use are dropped unless given.
        """
        fields = self.to_dict()
        fields.update(changes)
        spec = METHODS.get(str(fields["method"]))
        for name in _WHAT:
            if spec is not None and name not in changes and not spec.uses(name):
                fields[name] = None
        return Hyperparams(**{k: v for k, v in fields.items() if v is not None})


# ---------------------------------------------------------------------------------------
# Sequencing: the worker's step as a generator of requests, and the center.
# ---------------------------------------------------------------------------------------


@dataclass
class Request:
    """One request of a worker's step. ``reply`` is filled by the driver where needed."""

    op: Op
    payload: Tensor
    reply: Tensor | None = None
    #: The worker's step counter when it made the request (collectives carry it so that a
    #: transport can check that every rank is at the same exchange); -1 where unset.
    step: int = -1
    #: How many trailing elements of ``payload`` are not data but the transport's own (a
    #: synchronous exchange's step counters); 0 where none were reserved.
    tail: int = 0
    #: Set by a driver that started a ``SUM`` without completing it (an asynchronous
    #: all-reduce), or an ``ELASTIC`` exchange whose reply is still on its way (only where
    #: ``deferrable``); the worker then yields ``WAIT`` on the same buffer (the ``SUM``'s
    #: payload, the ``ELASTIC``'s reply) before it reads it.
    deferred: bool = False
    #: Whether the driver may defer this request (an overlapped worker's ``ELASTIC``: its
    #: payload is the worker's own copy of x, untouched until the reply is waited for).
    #: A ``SUM`` is always deferrable.
    deferrable: bool = False


#: The tensors of :meth:`Worker.state_dict` (None where a method has no use for one).
_STATE = ("x", "v", "acc", "center", "z", "outer_v", "exp_avg", "exp_avg_sq")


class Worker:
    """One worker's state and its local step.

    ``step()`` is a generator: drive it with :func:`run_step` (or :func:`drive`). ``x`` is
    the worker's flat parameter vector, used in place (it may be a view of a model's flat
    parameter buffer).

    Args:
        hp: validated hyperparameters.
        x: the flat parameter vector (starts equal to the center).
        mode: a :class:`Mode` (or its string) that the method supports.
        grad: where ``GRAD`` requests are to write the gradient (default: a new buffer).
        external_local: yield ``LOCAL`` (take your own optimizer's step on ``x``) instead of
            computing the method's own local step; the exchanges stay the method's.
        trainable: only ``x[:trainable]`` is stepped (gradient, momentum, weight decay);
            the rest of ``x`` (a model's floating-point buffers, e.g. BatchNorm running
            statistics) is only exchanged with the center. Default: all of ``x``.
        reserve: extra trailing elements of the synchronous exchange's buffer that belong
            to the transport (``AllReduceTransport(check_steps=True)`` carries every rank's
            step counter there, in the same collective as the data).
        overlap: ``K`` in ``1..tau`` overlaps the asynchronous elastic exchange (EASGD,
            EAMSGD in the asynchronous mode) with ``K`` local steps, as the authors' code
            did: at an exchange the worker sends a copy of its x and goes on computing; the
            reply ``d = alpha*(x_sent - center)`` is applied to x at the start of the step
            ``K`` steps later (the driver waits for it there if it is not back yet), or
            earlier when the worker settles (evaluation, checkpoint, the end). ``K = 1`` is
            the paper's update exactly (bitwise): ``d`` is applied before the next gradient,
            where the blocking exchange applies it, so it hides the round trip behind one
            gradient computation; ``K > 1`` hides up to ``K`` steps of latency, and the
            steps in between take their gradients without the pull (``K = tau``: one
            exchange stale). The center's update is never stale (the server applies ``d``
            on arrival). The lag is the rule's, not the driver's: a driver that answers at
            once (the simulator's round-robin schedule) gives the trajectory of one that
            answers while the worker computes (``PSClient``). Default 0: blocking.
    """

    def __init__(
        self,
        hp: Hyperparams,
        x: Tensor,
        mode: Mode | str,
        grad: Tensor | None = None,
        *,
        external_local: bool = False,
        trainable: int | None = None,
        reserve: int = 0,
        overlap: int = 0,
    ) -> None:
        spec = hp.spec
        if external_local and not spec.wraps_optimizer:
            raise ValueError(
                f"method={hp.method!r} cannot wrap an external optimizer: its exchange "
                f"({spec.exchange.value}) needs the raw gradient; use easgd, eamsgd or localsgd"
            )
        self.external_local = external_local
        self.mode = spec.resolve_mode(mode)
        if x.dim() != 1:
            raise ValueError(f"x must be a flat 1-D tensor, got shape {tuple(x.shape)}")
        self.hp = hp
        self.spec = spec
        self.x = x
        self.t = 0
        n = x.numel() if trainable is None else trainable
        if not 0 <= n <= x.numel():
            raise ValueError(f"trainable={trainable} but x has {x.numel()} values")
        if n < x.numel() and not (spec.elastic or spec.outer):
            raise ValueError(
                f"method={hp.method!r} exchanges gradients or accumulated updates, which "
                "buffers do not have: only the elastic methods and diloco exchange extra values"
            )
        # The stepped part of x: the parameters (the rest is buffers, exchanged only).
        self.xt = x if n == x.numel() else x[:n]
        if grad is not None and grad.shape != self.xt.shape:
            raise ValueError(
                f"grad has shape {tuple(grad.shape)}, the stepped part of x has "
                f"{tuple(self.xt.shape)}"
            )
        # The gradient buffer may be a model's flat gradient (its .grad tensors are views).
        self.grad = torch.zeros_like(self.xt) if grad is None else grad
        zeros = torch.zeros_like
        local_momentum = spec.momentum is Momentum.LOCAL and hp.momentum > 0
        self.v = zeros(self.xt) if local_momentum and not external_local else None
        self.acc = zeros(x) if spec.exchange is Exchange.DOWNPOUR else None
        # Synchronous EASGD: every worker holds an identical copy of the center, and one
        # buffer serves as its difference x_t - c_t and then as the all-reduced sum.
        # DiLoCo likewise: the global parameters, and the pseudo-gradient c - x_i's sum.
        sync_elastic = spec.elastic and self.mode is Mode.SYNC
        replicated = sync_elastic or (spec.outer and self.mode is Mode.SYNC)
        self.center = x.clone() if replicated else None
        self._sum_full = x.new_zeros(x.numel() + reserve) if replicated else None
        self._reserve = reserve
        self.sum_buf = None
        if self._sum_full is not None:
            self.sum_buf = self._sum_full[: x.numel()] if reserve else self._sum_full
        self.diff = zeros(x) if spec.elastic and not sync_elastic else None
        self.z = x.clone() if (spec.average and self.mode is Mode.SEQUENTIAL) else None
        # DiLoCo's outer momentum (the same on every rank: it sees only all-reduced values).
        self.outer_v = zeros(self.xt) if spec.outer and hp.outer_momentum > 0 else None
        # DiLoCo's AdamW inner optimizer: its moments, kept across rounds (as the paper's).
        adamw = spec.uses("inner") and hp.inner == "adamw" and not external_local
        self.exp_avg = zeros(self.xt) if adamw else None
        self.exp_avg_sq = zeros(self.xt) if adamw else None
        self.last_loss = math.nan
        self._in_flight = False  # a deferred synchronous sum awaits its center update
        check_overlap(hp, self.mode, overlap)
        self.overlap = overlap
        # Overlapped: the copy of x that was sent; the exchange whose reply d (in self.diff)
        # is still to be applied to x (and may still be on its way), and the step it is due.
        self.sent = zeros(x) if overlap else None
        self._owed = False
        self._due = 0
        self._elastic: Request | None = None

    @property
    def in_flight(self) -> bool:
        """Whether an exchange still owes its update: a deferred synchronous sum the
        center's, an overlapped asynchronous exchange its pull on x (settle to apply it)."""
        return self._in_flight or self._owed

    def settle(self) -> Generator[Request, Any, None]:
        """Complete a deferred synchronous exchange: ``WAIT`` for the sum, update the center.

        A no-op unless the driver deferred the last ``SUM``. Call it (e.g. with
        :func:`run_settle`) before reading ``center`` for evaluation or a checkpoint and at
        the end of training; waiting is local (the all-reduce was started by every rank),
        so one rank may settle alone.
        """
        if self._owed:  # an overlapped asynchronous exchange: apply its pull on x
            yield from self._apply_owed()
        if not self._in_flight:
            return
        assert self.center is not None and self.sum_buf is not None
        assert self._sum_full is not None
        yield Request(Op.WAIT, self._sum_full, tail=self._reserve)
        elastic_center_sync_(self.center, self.sum_buf, beta=self.hp.beta, p=self.hp.workers)
        self._in_flight = False

    def _apply_owed(self) -> Generator[Request, Any, None]:
        """An overlapped exchange's pull: ``WAIT`` for its reply if deferred, ``x -= d``."""
        req, self._elastic = self._elastic, None
        assert req is not None and self.diff is not None
        if req.deferred:
            yield Request(Op.WAIT, self.diff, step=self.t)
        self.x.sub_(self.diff)  # the server's d = alpha*(x_sent - c)
        self._owed = False

    def finish(self) -> Generator[Request, Any, None]:
        """The end of training, on every rank: settle, and make the result current.

        Local SGD ends on an average (a collective: every rank must finish) when its last
        step was not one; everything else only settles.
        """
        yield from self.settle()
        if self.mode is Mode.SYNC and not self.result_is_current():
            yield Request(Op.MEAN, self.x, step=self.t)

    def state_dict(self) -> dict[str, Any]:
        """The worker's state: ``x``, ``v``, ``acc``, ``center``, ``z``, ``outer_v``,
        ``exp_avg``, ``exp_avg_sq`` (None where unused), ``t``.

        Settle first (:func:`run_settle`): a deferred exchange still owes the center its
        update, and a state taken before it is not the state the run continues from.
        Scratch buffers (the gradient, the elastic difference, the sum) are not state.
        """
        if self.in_flight:
            raise RuntimeError("state_dict() with an exchange in flight: settle the worker first")
        return {"x": self.x, "v": self.v, "acc": self.acc, "center": self.center, "z": self.z,
                "outer_v": self.outer_v, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq,
                "t": self.t}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (copied in place; buffers this worker lacks are ignored)."""
        for name in _STATE:
            mine, theirs = getattr(self, name), state.get(name)
            if mine is not None and theirs is not None:
                if theirs.shape != mine.shape:
                    raise ValueError(
                        f"state_dict[{name!r}] has shape {tuple(theirs.shape)}, this worker's "
                        f"has {tuple(mine.shape)}; load a state of the same model"
                    )
                mine.copy_(theirs)
        self.t = int(state["t"])
        self._in_flight = self._owed = False
        self._elastic = None

    def communicates(self) -> bool:
        """Whether the step about to run exchanges with the center."""
        return self.spec.communicates(self.t, self.hp.tau)

    def result_is_current(self) -> bool:
        """Whether :meth:`evaluation_vector` is the method's result now (see MethodSpec)."""
        return self.spec.result_is_current(self.mode, self.t, self.hp.tau)

    def evaluation_vector(self) -> Tensor:
        """The method's result as this worker holds it: its average, center copy, or x.

        Asynchronous workers hold no result: it lives on the server
        (:meth:`Center.evaluation_vector`).
        """
        if self.spec.evaluated_on_server(self.mode):
            raise RuntimeError(
                f"an asynchronous {self.hp.method} worker does not hold the center; pull it "
                "from the parameter server (its evaluation vector)"
            )
        evaluated = self.spec.evaluated
        if evaluated is Evaluated.AVERAGE:
            assert self.z is not None
            return self.z
        if evaluated is Evaluated.CENTER:
            assert self.center is not None
            return self.center
        return self.x  # X, and MEAN_X right after an average (result_is_current)

    def step(self) -> Generator[Request, Any, None]:
        """One step: :meth:`begin_step`, the gradient (or external step), :meth:`end_step`."""
        yield from self.begin_step()
        self.last_loss = yield self.compute_request()
        yield from self.end_step()

    def compute_request(self) -> Request:
        """The request in the middle of a step: ``GRAD`` at x, or ``LOCAL`` (external step)."""
        if self.external_local:
            # A user's own optimizer (easgd.optim) takes the local step, whatever it is.
            return Request(Op.LOCAL, self.x)
        return Request(Op.GRAD, self.grad)

    def begin_step(self) -> Generator[Request, Any, None]:
        """The part of a step before its gradient: the exchange's first half, the look-ahead.

        A driver that gets the gradient from outside (``easgd.optim``, where the user's
        loop computes it before calling ``step()``) runs this at the end of the previous
        call, so that the gradient is taken where the method takes it (EAMSGD: at the
        Nesterov look-ahead point ``x + delta*v``, after the elastic exchange).
        """
        spec, x = self.spec, self.x
        if self._owed and self.t >= self._due:  # overlapped: the last exchange's pull
            yield from self._apply_owed()
        if spec.elastic and self.communicates():
            if self.mode is Mode.ASYNC and self.sent is not None:  # overlapped
                assert not self._owed  # due at most tau steps after its exchange
                self.sent.copy_(x)
                req = Request(Op.ELASTIC, self.sent, self.diff, step=self.t, deferrable=True)
                yield req
                self._elastic, self._owed, self._due = req, True, self.t + self.overlap
            elif self.mode is Mode.ASYNC:
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
            assert spec.average is not None
            self.z.lerp_(x, average_rate(spec.average, self.t, moving_rate=self.hp.moving_rate))
        if not self.external_local and self.v is not None:
            nesterov_lookahead_(self.xt, self.v, momentum=self.hp.momentum)

    def end_step(self) -> Generator[Request, Any, None]:
        """The part of a step after its gradient: the update, the exchange's second half."""
        hp, spec, x = self.hp, self.spec, self.x
        lr = hp.lr_at(self.t)
        comm = self.communicates()
        g = self.grad
        if spec.exchange is Exchange.DOWNPOUR:
            assert self.acc is not None
            if hp.weight_decay:
                g.add_(x, alpha=hp.weight_decay)
            downpour_accumulate_(self.acc, g, lr=lr)
            if comm:
                yield Request(Op.PUSH_PULL, self.acc, x)
                self.acc.zero_()
            else:
                x.add_(g, alpha=-lr)
        elif spec.exchange is Exchange.MDOWNPOUR:
            if hp.weight_decay:
                g.add_(x, alpha=hp.weight_decay)
            yield Request(Op.GRAD_PULL, g, x)
        else:
            if spec.exchange is Exchange.GRAD_MEAN:
                yield Request(Op.MEAN, g, step=self.t)
            if self.exp_avg is not None and self.exp_avg_sq is not None:  # AdamW, step t+1
                adamw_step_(self.xt, g, self.exp_avg, self.exp_avg_sq, step=self.t + 1, lr=lr,
                            weight_decay=hp.weight_decay)  # fmt: skip
            elif not self.external_local:
                local_step_(self.xt, g, self.v, lr=lr, weight_decay=hp.weight_decay)
            if spec.elastic and comm:
                if self.mode is Mode.SYNC:
                    assert self.center is not None and self.sum_buf is not None
                    x.sub_(self.sum_buf, alpha=hp.alpha)  # x -= alpha*(x_t - c_t)
                    assert self._sum_full is not None
                    req = Request(Op.SUM, self._sum_full, step=self.t, tail=self._reserve)
                    yield req
                    if req.deferred:
                        # In flight during the next tau - 1 local steps, which never read
                        # it; the center is next needed at the next exchange (settle).
                        self._in_flight = True
                    else:
                        elastic_center_sync_(self.center, self.sum_buf, beta=hp.beta, p=hp.workers)
                elif self.sent is None:  # overlapped: applied at the next exchange
                    assert self.diff is not None
                    x.sub_(self.diff)  # the server's d = alpha*(x - c)
            elif spec.exchange is Exchange.PARAM_MEAN and comm:
                yield Request(Op.MEAN, x, step=self.t)
            elif spec.outer and comm:
                yield from self._outer_step()
        self.t += 1

    def _outer_step(self) -> Generator[Request, Any, None]:
        """DiLoCo's round end: sum the pseudo-gradients ``c - x_i``, step ``c``, restart at it."""
        assert self.center is not None and self.sum_buf is not None
        assert self._sum_full is not None
        hp = self.hp
        torch.sub(self.center, self.x, out=self.sum_buf)
        req = Request(Op.SUM, self._sum_full, step=self.t, tail=self._reserve)
        yield req
        if req.deferred:  # the outer step needs the sum now: nothing to overlap it with
            yield Request(Op.WAIT, self._sum_full, tail=self._reserve)
        diloco_outer_step_(
            self.center, self.sum_buf, self.outer_v, p=hp.workers, outer_lr=hp.outer_lr,
            outer_momentum=hp.outer_momentum, trainable=self.xt.numel(),
        )  # fmt: skip
        self.x.copy_(self.center)


class Center:
    """The center variable (or one contiguous shard of it) and its server-side state.

    ``handle`` applies one request atomically with respect to other ``handle`` calls as
    long as the caller serializes them (the parameter server holds a lock; the simulator is
    single-threaded). ``t`` is the master clock: the number of center updates so far. The
    atomicity is **our choice**: the authors' server adds updates without a lock ("no lock
    ... expect inconsistent read", paper-spec 2.2), so a worker's pull there may see half of
    another's push; here it never does.
    """

    def __init__(self, hp: Hyperparams, center: Tensor) -> None:
        if center.dim() != 1:
            raise ValueError(f"center must be a flat 1-D tensor, got shape {tuple(center.shape)}")
        self.hp = hp
        self.center = center
        self.t = 0
        spec = hp.spec
        self.v = torch.zeros_like(center) if spec.momentum is Momentum.SERVER else None
        self.z = center.clone() if spec.average else None

    def evaluation_vector(self) -> Tensor:
        """The method's result: the average ``z`` for the averaging methods, else the center."""
        if self.hp.spec.evaluated is Evaluated.AVERAGE:
            assert self.z is not None
            return self.z
        return self.center

    def handle(self, op: Op, payload: Tensor, reply: Tensor) -> None:
        """Serve one request: ``op`` with its ``payload``, the answer into ``reply``."""
        self._check_op(op)
        self._apply(op, payload, reply)

    def handle_each(
        self,
        op: Op,
        payloads: Sequence[Tensor],
        replies: Sequence[Tensor],
        after: Callable[[], None] | None = None,
    ) -> None:
        """Serve several requests of one ``op`` one after another, in order (each exactly as
        :meth:`handle` serves it), calling ``after()`` after each: the simulator's batched
        engine serves the P workers of one instant so."""
        self._check_op(op)
        for payload, reply in zip(payloads, replies, strict=True):
            self._apply(op, payload, reply)
            if after is not None:
                after()

    def _check_op(self, op: Op) -> None:
        expected = self.hp.spec.server_op
        if op is not expected:
            served = "nothing" if expected is None else repr(expected.value)
            raise ValueError(
                f"the center of {self.hp.method} does not serve {op.value!r} requests; it "
                f"serves {served}"
            )

    def _apply(self, op: Op, payload: Tensor, reply: Tensor) -> None:
        hp, c = self.hp, self.center
        if self.z is not None:
            # ADOWNPOUR / MVADOWNPOUR: z_{t+1} = (1 - a) z_t + a * center_t.
            assert hp.spec.average is not None
            self.z.lerp_(c, average_rate(hp.spec.average, self.t, moving_rate=hp.moving_rate))
        if op is Op.ELASTIC:
            elastic_exchange_(c, payload, reply, alpha=hp.alpha)
        elif op is Op.PUSH_PULL:
            c.add_(payload)
            reply.copy_(c)
        else:  # Op.GRAD_PULL
            assert self.v is not None
            mdownpour_center_(c, self.v, payload, lr=hp.lr_at(self.t), momentum=hp.momentum)
            reply.copy_(c)
        self.t += 1

    def handle_compressed(
        self,
        reference: Tensor,
        packed_in: Tensor,
        packed_out: Tensor,
        scratch: Tensor,
        codec: Codec,
    ) -> None:
        """One asynchronous compressed elastic exchange (:func:`compressed_elastic_serve_`)
        with the worker whose ``reference`` it is; the clock moves as for :meth:`handle`."""
        if self.hp.spec.server_op is not Op.ELASTIC:
            raise ValueError(
                f"the center of {self.hp.method} does not serve compressed elastic exchanges"
            )
        compressed_elastic_serve_(self.center, reference, packed_in, packed_out, scratch,
                                  alpha=self.hp.alpha, codec=codec)  # fmt: skip
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


# ---------------------------------------------------------------------------------------
# The one loop that drives a worker's generator.
# ---------------------------------------------------------------------------------------

Compute = Callable[[Request], float]
Serve = Callable[[Request], None]


def check_compress(hp: Hyperparams, compress: str) -> None:
    """A ValueError unless ``compress`` (a codec name) applies to ``hp``'s method: only the
    elastic methods' exchanges (their elastic differences) are compressed."""
    if compress != "none" and not hp.spec.elastic:
        raise ValueError(
            f"compress={compress!r} with method={hp.method!r}: compressed exchanges are "
            "EASGD/EAMSGD's elastic differences; use method='easgd' or method='eamsgd', or "
            "compress='none'"
        )


def check_overlap(hp: Hyperparams, mode: Mode, overlap: int) -> None:
    """A ValueError unless ``overlap`` (see :class:`Worker`) is 0 or a lag this run can use."""
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise ValueError(f"overlap={overlap!r} must be an integer >= 0 (0: blocking exchanges)")
    if not overlap:
        return
    if not (hp.spec.elastic and mode is Mode.ASYNC):
        raise ValueError(
            f"overlap={overlap} with method={hp.method!r} in mode {mode.value!r}: only the "
            "asynchronous elastic exchange (easgd, eamsgd in the async mode) is overlapped; "
            "use overlap=0"
        )
    if overlap > hp.tau:
        raise ValueError(
            f"overlap={overlap} is more than tau={hp.tau}: an exchange's reply is applied "
            f"before the next exchange is sent; use an overlap between 1 and {hp.tau}"
        )


def drive(steps: Generator[Request, Any, None], compute: Compute, serve: Serve) -> None:
    """Run a worker generator to its end with blocking callables.

    ``compute(request) -> loss`` fulfils ``GRAD`` (write the gradient at x into
    ``request.payload``) and ``LOCAL`` (take an external optimizer's step on x);
    ``serve(request)`` fulfils every exchange (fills ``request.reply`` or reduces
    ``request.payload`` in place). This is the only loop over a worker's requests: the
    runtimes, ``easgd.optim`` and the simulator's round-robin schedule all use it.
    """
    reply: Any = None
    try:
        while True:
            req = steps.send(reply)
            if req.op is Op.GRAD or req.op is Op.LOCAL:
                reply = float(compute(req))
            else:
                serve(req)
                reply = None
    except StopIteration:
        pass


def contribution(req: Request) -> Tensor | None:
    """What an answered asynchronous exchange added to the center (see ``recoverable``).

    ``d`` (the reply) for an elastic exchange, ``acc`` (the payload) for DOWNPOUR's push;
    None for MDOWNPOUR, whose center update involves the server's own momentum.
    """
    if req.op is Op.ELASTIC:
        return req.reply
    if req.op is Op.PUSH_PULL:
        return req.payload
    return None


def _no_compute(req: Request) -> float:
    raise RuntimeError(f"a part of a step without its gradient made a {req.op.value!r} request")


def run_exchanges(steps: Generator[Request, Any, None], serve: Serve) -> None:
    """Drive a generator that only exchanges (:meth:`Worker.settle`, :meth:`Worker.finish`,
    :meth:`Worker.begin_step`, :meth:`Worker.end_step`); a compute request is an error."""
    drive(steps, _no_compute, serve)


def run_settle(worker: Worker, serve: Serve) -> None:
    """Drive :meth:`Worker.settle` (complete a deferred exchange)."""
    run_exchanges(worker.settle(), serve)


def run_finish(worker: Worker, serve: Serve) -> None:
    """Drive :meth:`Worker.finish` (every rank, at the end of training)."""
    run_exchanges(worker.finish(), serve)


def run_step(worker: Worker, grad_fn: Callable[[Tensor, Tensor], float], serve: Serve) -> float:
    """Drive one step of ``worker``; returns the step's loss.

    ``grad_fn(x, out) -> float`` writes the gradient at ``x`` into ``out`` and returns the
    loss; ``serve`` as in :func:`drive`.
    """
    drive(worker.step(), lambda req: grad_fn(worker.x, req.payload), serve)
    return worker.last_loss


# ---------------------------------------------------------------------------------------
# Compressed exchanges (easgd.compress codecs) with error feedback.
# ---------------------------------------------------------------------------------------


def compress_with_feedback_(v: Tensor, residual: Tensor, codec: Codec, packed: Tensor) -> None:
    """Send ``v`` compressed, carrying what compression drops into the next exchange.

    ``residual += v``; ``packed = encode(residual)``; ``v = decode(packed)`` (what was
    sent); ``residual -= v``. Over exchanges the sum of what was sent differs from the sum
    of the ``v`` by the current residual only: nothing is lost over time.

    Where the codec has a fused kernel for it (int8 on float32 CPU vectors:
    :meth:`easgd.compress.Codec.feedback_`) the same four operations run in one pass over
    memory, bitwise the same (``tests/test_compress.py``).
    """
    if codec.feedback_(v, residual, packed):
        return
    residual.add_(v)
    codec.encode(residual, packed)
    codec.decode(packed, v)
    residual.sub_(v)


class CompressedSum:
    """One rank's part of the compressed sum of p vectors (synchronous compressed EASGD).

    Two phases, so that every byte on the wire is compressed and every rank ends with the
    same sum: (1) each rank compresses its vector (with its own error feedback) and sends
    shard s to rank s (an all-to-all); (2) rank s decodes the p parts of its shard, sums
    them in rank order, compresses the sum (with the owner's error feedback) and every rank
    gathers every shard's compressed sum (an all-gather) and decodes it. A rank sends and
    receives ``2 (p-1)/p`` of a compressed vector, as a ring all-reduce does of a full one.
    The simulator runs the same arithmetic for every rank in one process.

    Args:
        codec: the compression (:func:`easgd.compress.codec`).
        numel: values of the vector; padded with zeros to ``p`` equal shards (of whole
            chunks for int8).
        world: p.
        dtype: the vector's dtype (the sums are computed in it).
    """

    def __init__(self, codec: Codec, numel: int, world: int, dtype: torch.dtype) -> None:
        from easgd.compress import padded

        self.codec, self.numel, self.world = codec, numel, world
        self.shard = padded(math.ceil(numel / world), codec.align)
        total = self.shard * world
        self.shard_bytes = codec.packed_size(self.shard, dtype)
        self.vector = torch.zeros(total, dtype=dtype)  # the padded vector being sent
        self.send_residual = torch.zeros(total, dtype=dtype)
        self.own_residual = torch.zeros(self.shard, dtype=dtype)
        self.packed = torch.zeros(world * self.shard_bytes, dtype=torch.uint8)
        self.parts = torch.zeros(world * self.shard_bytes, dtype=torch.uint8)
        self.own_sum = torch.zeros(self.shard_bytes, dtype=torch.uint8)
        self.gathered = torch.zeros(world * self.shard_bytes, dtype=torch.uint8)
        self._total = torch.zeros(self.shard, dtype=dtype)
        self._part = torch.zeros(self.shard, dtype=dtype)

    def encode_local(self, v: Tensor) -> Tensor:
        """Phase 1 send: ``v``'s shards compressed with feedback, shard s at ``[s]``."""
        self.vector[: self.numel].copy_(v)
        b, n = self.shard_bytes, self.shard
        for s in range(self.world):
            compress_with_feedback_(self.vector[s * n : (s + 1) * n],
                                    self.send_residual[s * n : (s + 1) * n], self.codec,
                                    self.packed[s * b : (s + 1) * b])  # fmt: skip
        return self.packed

    def reduce_owned(self) -> Tensor:
        """Phase 2 send: the sum of the received parts of this rank's shard, compressed."""
        b = self.shard_bytes
        self.codec.decode(self.parts[:b], self._total)
        for r in range(1, self.world):
            self.codec.decode(self.parts[r * b : (r + 1) * b], self._part)
            self._total.add_(self._part)
        compress_with_feedback_(self._total, self.own_residual, self.codec, self.own_sum)
        return self.own_sum

    def decode_all(self, out: Tensor) -> None:
        """The end: every shard's compressed sum (``gathered``) decoded into ``out``."""
        b, n = self.shard_bytes, self.shard
        for s in range(self.world):
            self.codec.decode(self.gathered[s * b : (s + 1) * b], self.vector[s * n : (s + 1) * n])
        out.copy_(self.vector[: self.numel])


def simulate_compressed_sum(sums: list[CompressedSum], vectors: list[Tensor]) -> None:
    """Every rank's :class:`CompressedSum` in one process; ``vectors[r]`` becomes the sum."""
    world = len(sums)
    b = sums[0].shard_bytes
    packed = [s.encode_local(v) for s, v in zip(sums, vectors, strict=True)]
    for owner in range(world):  # the all-to-all: shard `owner` of every rank
        for r in range(world):
            sums[owner].parts[r * b : (r + 1) * b].copy_(packed[r][owner * b : (owner + 1) * b])
    owned = [s.reduce_owned() for s in sums]
    for s, v in zip(sums, vectors, strict=True):  # the all-gather
        for owner in range(world):
            s.gathered[owner * b : (owner + 1) * b].copy_(owned[owner])
        s.decode_all(v)


# Asynchronous compressed elastic exchange. Both sides keep the same ``reference``: what the
# server has reconstructed of the worker's x. The worker sends ``x - reference`` compressed
# (what compression drops stays in the next difference: error feedback without a residual
# buffer); the server computes the elastic force against its current center from the
# reconstructed x, applies the compressed force it sends back (so what the center gains is
# exactly what the worker loses), and both sides move the reference by it. The center stays
# in full precision. ``scratch`` holds a padded shard (easgd.compress.padded).


def compressed_elastic_send_(
    x: Tensor, reference: Tensor, codec: Codec, scratch: Tensor, packed: Tensor
) -> None:
    """Worker, before the exchange: ``packed = encode(x - reference)``; ``reference += sent``."""
    n = x.numel()
    torch.sub(x, reference, out=scratch[:n])
    scratch[n:].zero_()
    codec.encode(scratch, packed)
    codec.decode(packed, scratch)
    reference.add_(scratch[:n])


def compressed_elastic_serve_(
    center: Tensor,
    reference: Tensor,
    packed_in: Tensor,
    packed_out: Tensor,
    scratch: Tensor,
    *,
    alpha: float,
    codec: Codec,
) -> None:
    """Server: ``reference += decode(in)``; ``d = alpha (reference - center)`` sent compressed
    as ``out``; ``center += decode(out)``; ``reference -= decode(out)``."""
    n = center.numel()
    codec.decode(packed_in, scratch)
    reference.add_(scratch[:n])
    torch.sub(reference, center, out=scratch[:n]).mul_(alpha)
    scratch[n:].zero_()
    codec.encode(scratch, packed_out)
    codec.decode(packed_out, scratch)
    center.add_(scratch[:n])
    reference.sub_(scratch[:n])


def compressed_elastic_receive_(
    reference: Tensor, packed: Tensor, d: Tensor, codec: Codec, scratch: Tensor
) -> None:
    """Worker, with the reply: ``d = decode(packed)`` (x then loses it); ``reference -= d``."""
    codec.decode(packed, scratch)
    d.copy_(scratch[: d.numel()])
    reference.sub_(d)
