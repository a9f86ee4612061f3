"""The simulator: P replicas in one process, on exact schedules or a virtual clock.

It is the oracle that every distributed path is tested against (it drives the same
:class:`easgd.algorithms.Worker` generators and :class:`easgd.algorithms.Center` as the real
runtimes) and the laboratory for scales this machine does not have.

Schedules:

* ``sync``: a global clock; every worker takes one local step per global step, collectives
  (sums, means) combine all workers' payloads at once, and the asynchronous methods
  (DOWNPOUR family) are served by the center in worker order. The clock charges a ring
  all-reduce per collective; synchronous EASGD's, as the real runtime overlaps it with the
  next tau - 1 local steps, only where they do not cover it. DiLoCo (synchronous only) runs
  here: its outer step needs the sum of the pseudo-gradients at once, charged in full.
* ``round-robin``: at global step t only worker ``t mod p`` acts (the paper's analysis,
  paper-spec 2.4): with ``tau = 1`` EASGD is exactly eqs. (12)-(13).
* ``async``: event-driven on a virtual clock. Each local step costs a compute time drawn
  from :class:`CostModel`, each message a latency plus size/bandwidth, and the center serves
  one request at a time with a service time. Deterministic for a seed.

Engines (``simulate(engine=...)``): ``per-worker`` drives one Worker generator per replica;
``batched`` (:mod:`easgd.sim_batched`, the synchronous schedule) drives ONE Worker whose
vectors hold every replica as a row, so a global step costs a few tensor operations
whatever P is (bitwise the per-worker results without noise); ``auto`` picks it where it
gives the per-worker results. :class:`CostModel` ``group_size`` prices groups of workers
(:class:`Grouped`): a ring all-reduce of the gradient over the group's link in every step.

Objectives: :class:`Quadratic` (``F(x) = h/2 * |x|^2`` with Gaussian gradient noise, the
setting of the stability and variance analysis) or :class:`ModelObjective` (a real model on real
data: per-worker replicas whose parameters are views of the worker's flat vector); either
wrapped in :class:`Grouped` simulates ``easgd train --group-size G`` (each simulated worker
a group whose gradient is the mean of its G ranks' batches).
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import math
import random
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from easgd.algorithms import (
    Center,
    CompressedSum,
    Evaluated,
    Hyperparams,
    Mode,
    Op,
    Request,
    Worker,
    check_compress,
    compressed_elastic_receive_,
    compressed_elastic_send_,
    run_settle,
    run_step,
    simulate_compressed_sum,
)
from easgd.compress import Codec, codec, padded

__all__ = [
    "ENGINES",
    "SCHEDULES",
    "CostModel",
    "GradFn",
    "Grouped",
    "ModelObjective",
    "Objective",
    "Quadratic",
    "SimResult",
    "resolve_mode",
    "simulate",
]

SCHEDULES = ("sync", "round-robin", "async")
#: The simulator's engines (``simulate(engine=...)``).
ENGINES = ("auto", "per-worker", "batched")

GradFn = Callable[[Tensor, Tensor], float]


class Objective(Protocol):
    """What the simulator needs of an objective."""

    def initial_point(self) -> Tensor: ...

    def grad_fn(self, rank: int, seed: int) -> GradFn:
        """A gradient oracle for worker ``rank``: ``fn(x, out) -> loss``."""
        ...

    def grad_buffer(self, rank: int) -> Tensor | None:
        """Where worker ``rank``'s gradients land (a model's flat grad), or None."""
        ...

    def evaluate(self, x: Tensor) -> dict[str, float]:
        """Metrics of a point (the center): at least ``loss``."""
        ...


@dataclass
class Quadratic:
    """``F(x) = h/2 * |x|^2`` in ``dim`` independent coordinates; ``g = h*x + sigma*xi``.

    ``dim > 1`` runs that many independent 1-D problems at once (Monte-Carlo in one run).
    """

    h: float = 1.0
    sigma: float = 0.0
    x0: float = 1.0
    dim: int = 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.h) and self.h > 0):
            raise ValueError(f"h={self.h!r} must be a positive curvature, e.g. h=1")
        if not (math.isfinite(self.sigma) and self.sigma >= 0):
            raise ValueError(f"noise sigma={self.sigma!r} must be >= 0")
        if not math.isfinite(self.x0):
            raise ValueError(f"x0={self.x0!r} must be a finite number")
        if self.dim < 1:
            raise ValueError(f"dim={self.dim!r} must be >= 1")

    def initial_point(self) -> Tensor:
        return torch.full((self.dim,), float(self.x0), dtype=torch.float64)

    def grad_fn(self, rank: int, seed: int) -> GradFn:
        return self._oracle(torch.Generator().manual_seed(seed * 1_000_003 + rank), self.dim)

    def _oracle(self, gen: torch.Generator, n: int) -> GradFn:
        """``g = h*x + sigma*xi`` on vectors of ``n`` values, ``xi`` drawn from ``gen``; the
        loss is ``h/2 * |x|^2 / n`` (the mean over the coordinates)."""
        noise = torch.empty(n, dtype=torch.float64)

        def fn(x: Tensor, out: Tensor) -> float:
            torch.mul(x, self.h, out=out)
            if self.sigma:
                noise.normal_(generator=gen)
                out.add_(noise, alpha=self.sigma)
            return 0.5 * self.h * float(x.dot(x)) / n

        return fn

    def batched_grad_fn(self, p: int, seed: int, stream: int = 0) -> GradFn:
        """A gradient oracle for all ``p`` workers at once (the batched engine,
        :mod:`easgd.sim_batched`): ``fn(X, out)`` on flat vectors of ``p * dim`` values,
        worker ``r``'s ``dim`` at ``r*dim``; the loss is the workers' mean loss.

        The gradient ``h*x`` is :meth:`grad_fn`'s bitwise. The noise comes from ONE generator
        for the whole ``p * dim`` block (seeded from ``seed`` and ``stream``), not from the
        per-worker generators of :meth:`grad_fn`: it has the same distribution (independent
        standard normals), but not the same draws, so with ``sigma > 0`` the two engines
        agree in distribution only.
        """
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 999_983 * (stream + 1))
        return self._oracle(gen, p * self.dim)

    @property
    def batched_is_exact(self) -> bool:
        """Whether :meth:`batched_grad_fn` gives :meth:`grad_fn`'s values (no noise)."""
        return self.sigma == 0

    def grad_buffer(self, rank: int) -> Tensor | None:
        return None

    def evaluate(self, x: Tensor) -> dict[str, float]:
        return {"loss": 0.5 * self.h * float(x.dot(x)) / self.dim}


class ModelObjective:
    """A real model on real data: each worker a replica whose parameters view its flat x.

    Args:
        build: returns a fresh model; called once per worker and once for evaluation, and must
            give identical initial parameters every call (build with a fixed seed).
        train: ``(x, y)`` training tensors; each worker samples the whole set (the paper's
            setting) with its own seeded :class:`easgd.data.loader.BatchStream`.
        test: ``(x, y)`` test tensors for evaluating the center.
        batch_size: mini-batch size per worker.
        transform: optional per-batch training transform ``(batch, generator) -> batch``.
    """

    def __init__(
        self,
        build: Callable[[], torch.nn.Module],
        train: tuple[Tensor, Tensor],
        test: tuple[Tensor, Tensor],
        batch_size: int,
        transform: Callable[[Tensor, torch.Generator], Tensor] | None = None,
        eval_batch_size: int = 1024,
    ) -> None:
        from easgd.flat import parameters_to_flat_views

        self._build = build
        self._flat = parameters_to_flat_views
        self.train, self.test = train, test
        self.batch_size = batch_size
        self.transform = transform
        self.eval_batch_size = eval_batch_size
        self.eval_model = build()
        self.eval_flat = parameters_to_flat_views(self.eval_model)
        self.replicas: dict[int, Any] = {}

    def _replica(self, rank: int) -> Any:
        if rank not in self.replicas:
            model = self._build()
            self.replicas[rank] = (model, self._flat(model))
        return self.replicas[rank]

    def initial_point(self) -> Tensor:
        return self.eval_flat.params.detach().clone()

    def grad_buffer(self, rank: int) -> Tensor | None:
        return self._replica(rank)[1].grads

    def grad_fn(self, rank: int, seed: int) -> GradFn:
        from easgd.data.loader import BatchStream
        from easgd.task import model_grad_fn

        model, flat = self._replica(rank)
        stream = BatchStream(
            self.train[0],
            self.train[1],
            self.batch_size,
            seed=seed + rank,
            transform=self.transform,
        )
        return model_grad_fn(model, flat, stream)

    def worker_vector(self, rank: int) -> Tensor:
        """The flat parameter vector of worker ``rank``'s replica (used as its x)."""
        return self._replica(rank)[1].params

    def evaluate(self, x: Tensor) -> dict[str, float]:
        from easgd.evaluation import evaluate_center

        return evaluate_center(
            self.eval_model, self.eval_flat, x, self.test, self.train[0], self.eval_batch_size,
            transform=self.transform,
        )  # fmt: skip


class Grouped:
    """Groups of ``size`` workers that average their gradients every step, as single workers.

    Worker ``r`` of a simulation of this objective is group ``r`` of a real run with
    ``--group-size size``: its gradient oracle is the mean of ``base``'s oracles of the
    ranks ``r*size .. r*size + size - 1`` (their own mini-batches) at the same point, summed
    in rank order, as the group's all-reduce sums them (bitwise for ``size`` 2). So a group
    of G workers with the mean gradient is one worker with a G-times larger batch.
    """

    def __init__(self, base: Objective, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size={size!r} must be an integer >= 1 (workers per group)")
        self.base, self.size = base, size

    def initial_point(self) -> Tensor:
        return self.base.initial_point()

    def worker_vector(self, rank: int) -> Tensor:
        """Group ``rank``'s x: its first rank's replica (where the base has replicas)."""
        vec = getattr(self.base, "worker_vector", None)
        return vec(rank * self.size) if vec is not None else self.base.initial_point()

    def grad_buffer(self, rank: int) -> Tensor | None:
        return self.base.grad_buffer(rank * self.size)

    def grad_fn(self, rank: int, seed: int) -> GradFn:
        return self._mean([self.base.grad_fn(rank * self.size + j, seed) for j in range(self.size)])

    @property
    def batched(self) -> bool:
        """Whether the base gives batched gradients (then so do the groups)."""
        return callable(getattr(self.base, "batched_grad_fn", None))

    @property
    def batched_is_exact(self) -> bool:
        return bool(getattr(self.base, "batched_is_exact", False))

    def batched_grad_fn(self, p: int, seed: int, stream: int = 0) -> GradFn:
        """All ``p`` groups at once: the mean of ``size`` batched oracles of the base (each
        its own noise stream); see :meth:`Quadratic.batched_grad_fn`."""
        streams = range(stream * self.size, (stream + 1) * self.size)
        return self._mean([self.base.batched_grad_fn(p, seed, j) for j in streams])  # type: ignore[attr-defined]

    def _mean(self, fns: list[GradFn]) -> GradFn:
        """The mean of the oracles' gradients, summed in order (as the group's all-reduce)."""
        scratch: list[Tensor] = []

        def fn(x: Tensor, out: Tensor) -> float:
            loss = fns[0](x, out)
            for f in fns[1:]:
                if not scratch:
                    scratch.append(torch.empty_like(out))
                loss += f(x, scratch[0])
                out.add_(scratch[0])
            out.div_(self.size)
            return loss / self.size

        return fn

    def evaluate(self, x: Tensor) -> dict[str, float]:
        return self.base.evaluate(x)


@dataclass(frozen=True)
class CostModel:
    """Virtual costs of the asynchronous (and synchronous) schedules, in seconds and bytes.

    Args:
        step_time: mean compute time of one local step (default 1.0).
        step_dist: ``"constant"``, ``"exponential"`` or ``"lognormal"`` (default constant).
        step_cv: coefficient of variation of the lognormal distribution (default 0.2).
        stragglers: ``{worker: slowdown factor}``, e.g. ``{0: 3.0}`` (default none).
        latency: one-way message latency (default 0).
        bandwidth: link bandwidth in bytes/s (default infinite).
        server_time: the center's service time per request (default 0).
        bytes_per_param: bytes of one parameter on the wire (default 4, float32).
        numel: parameters counted for message sizes; None means the objective's own size
            (set it to model a large network while computing on a small objective).
        group_size: G > 1: every simulated worker is a group of G workers (``easgd train
            --group-size G``, with the objective wrapped in :class:`Grouped`) whose local
            step ends with a ring all-reduce of the gradients (``numel * bytes_per_param``
            bytes) over the group's own link: each local step costs
            ``step_time + allreduce(bytes, G)`` on that link (default 1: no group).
        group_latency: one-way latency of the group's link (an intra-node link, e.g. NVLink
            or shared memory); None (default) means ``latency``.
        group_bandwidth: bytes/s of the group's link; None (default) means ``bandwidth``.
    """

    step_time: float = 1.0
    step_dist: str = "constant"
    step_cv: float = 0.2
    stragglers: dict[int, float] = field(default_factory=dict)
    latency: float = 0.0
    bandwidth: float = math.inf
    server_time: float = 0.0
    bytes_per_param: int = 4
    numel: int | None = None
    group_size: int = 1
    group_latency: float | None = None
    group_bandwidth: float | None = None

    def __post_init__(self) -> None:
        if self.step_dist not in ("constant", "exponential", "lognormal"):
            raise ValueError(
                f"step_dist={self.step_dist!r}; choose constant, exponential or lognormal"
            )
        for name in ("step_time", "latency", "server_time"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r} must be a finite number >= 0 (seconds)")
        if not self.bandwidth > 0:
            raise ValueError(f"bandwidth={self.bandwidth!r} must be > 0 bytes/s")
        for w, f in self.stragglers.items():
            if isinstance(w, bool) or not isinstance(w, int) or w < 0:
                raise ValueError(f"stragglers: worker {w!r} must be an integer index >= 0")
            if not (math.isfinite(f) and f > 0):
                raise ValueError(f"straggler factor {f!r} of worker {w} must be > 0")
        if not (math.isfinite(self.step_cv) and self.step_cv >= 0):
            raise ValueError(f"step_cv={self.step_cv!r} must be a finite number >= 0")
        if isinstance(self.bytes_per_param, bool) or not (
            isinstance(self.bytes_per_param, int) and self.bytes_per_param >= 1
        ):
            raise ValueError(f"bytes_per_param={self.bytes_per_param!r} must be an integer >= 1")
        if self.numel is not None and (
            isinstance(self.numel, bool) or not isinstance(self.numel, int) or self.numel < 1
        ):
            raise ValueError(
                f"numel={self.numel!r} must be an integer >= 1 (parameters in a message), or "
                "None for the objective's own size"
            )
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(
                f"group_size={g!r} must be an integer >= 1 (workers per group; 1: no groups)"
            )
        given = [n for n in ("group_latency", "group_bandwidth") if getattr(self, n) is not None]
        if given and g == 1:
            raise ValueError(
                f"{given[0]}={getattr(self, given[0])!r} with group_size=1: there is no group "
                "link to price; set group_size > 1, or drop it"
            )
        if self.group_latency is not None and not (
            math.isfinite(self.group_latency) and self.group_latency >= 0
        ):
            raise ValueError(
                f"group_latency={self.group_latency!r} must be a finite number >= 0 (seconds)"
            )
        if self.group_bandwidth is not None and not self.group_bandwidth > 0:
            raise ValueError(f"group_bandwidth={self.group_bandwidth!r} must be > 0 bytes/s")

    def draw_step(self, rank: int, rng: random.Random) -> float:
        """One local step's virtual time: the compute (drawn), and a group's all-reduce."""
        return self._draw_compute(rank, rng) + self.group_allreduce()

    def _draw_compute(self, rank: int, rng: random.Random) -> float:
        mean = self.step_time * self.stragglers.get(rank, 1.0)
        if self.step_dist == "exponential":
            return rng.expovariate(1.0 / mean) if mean > 0 else 0.0
        if self.step_dist == "lognormal" and mean > 0:
            s2 = math.log(1.0 + self.step_cv**2)
            return rng.lognormvariate(math.log(mean) - s2 / 2, math.sqrt(s2))
        return mean

    def message(self, nbytes: int, *, group: bool = False) -> float:
        """One message's time on the workers' link (or, ``group=True``, the group's)."""
        if group:
            latency = self.latency if self.group_latency is None else self.group_latency
            bandwidth = self.bandwidth if self.group_bandwidth is None else self.group_bandwidth
            return latency + nbytes / bandwidth
        return self.latency + nbytes / self.bandwidth

    def allreduce(self, nbytes: int, p: int, *, group: bool = False) -> float:
        """Ring all-reduce: 2(p-1) messages of nbytes/p each (on the group's link: group)."""
        if p == 1:
            return 0.0
        return 2 * (p - 1) * self.message(math.ceil(nbytes / p), group=group)

    def group_allreduce(self) -> float:
        """A group's all-reduce of its gradients in every local step (0 without groups)."""
        if self.group_size == 1:
            return 0.0
        if self.numel is None:
            raise ValueError(
                f"group_size={self.group_size} needs numel (the gradient's size) to price the "
                "group's all-reduce; the simulator sets it to the objective's size"
            )
        return self.allreduce(self.numel * self.bytes_per_param, self.group_size, group=True)


@dataclass
class SimResult:
    """What a simulation reports: the center over (virtual) time and the traffic."""

    center: Tensor
    times: list[float] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)
    center_trajectory: list[Tensor] = field(default_factory=list)
    workers: list[Tensor] = field(default_factory=list)
    #: Each worker's momentum ``v`` at the end (None for methods without local momentum).
    worker_momenta: list[Tensor | None] = field(default_factory=list)
    exchanges: int = 0
    bytes_moved: int = 0
    virtual_seconds: float = 0.0
    real_seconds: float = 0.0
    local_steps: int = 0
    #: The engine that ran it: ``per-worker`` or ``batched`` (``simulate(engine=...)``).
    engine: str = "per-worker"


def resolve_mode(hp: Hyperparams, schedule: str) -> Mode:
    """The worker mode a method runs in under a schedule, or a ValueError saying why not.

    The synchronous schedule runs every method (the DOWNPOUR family is served in worker
    order); round-robin and async need a method with an asynchronous mode.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if schedule == "sync":
        return hp.spec.resolve_mode(Mode.SYNC, strict=False)
    try:
        return hp.spec.resolve_mode(Mode.ASYNC)
    except ValueError:
        raise ValueError(
            f"method={hp.method!r} is synchronous only; it cannot run on the {schedule!r} "
            "schedule: use schedule='sync'"
        ) from None


class _AsyncCompressed:
    """One worker's asynchronous compressed exchange in the simulator: the client's side and
    the server's side of :func:`easgd.algorithms.compressed_elastic_serve_`, each with its
    own copy of the reference (as the real client and server keep them)."""

    def __init__(self, codec: Codec, x: Tensor) -> None:
        self.codec = codec
        n = padded(x.numel(), codec.align)
        self.worker_ref, self.server_ref = x.clone(), x.clone()
        self.scratch = torch.zeros(n, dtype=x.dtype)
        self.server_scratch = torch.zeros(n, dtype=x.dtype)
        size = codec.packed_size(n, x.dtype)
        self.request = torch.zeros(size, dtype=torch.uint8)
        self.reply = torch.zeros(size, dtype=torch.uint8)

    def exchange(self, center: Center, x: Tensor, d: Tensor) -> None:
        compressed_elastic_send_(x, self.worker_ref, self.codec, self.scratch, self.request)
        center.handle_compressed(self.server_ref, self.request, self.reply,
                                 self.server_scratch, self.codec)  # fmt: skip
        compressed_elastic_receive_(self.worker_ref, self.reply, d, self.codec, self.scratch)


class _Sim:
    def __init__(
        self,
        objective: Objective,
        hp: Hyperparams,
        schedule: str,
        seed: int,
        cost: CostModel,
        compress: str = "none",
        overlap: int = 0,
    ) -> None:
        x0 = objective.initial_point()
        if cost.group_size > 1 and cost.numel is None:  # the group all-reduces the gradient
            cost = dataclasses.replace(cost, numel=x0.numel())
        size = objective.size if isinstance(objective, Grouped) else cost.group_size
        if cost.group_size > 1 and size != cost.group_size:
            raise ValueError(
                f"CostModel(group_size={cost.group_size}) prices groups of {cost.group_size}, "
                f"but the objective is Grouped(size={size}); give both the same size"
            )
        self.objective, self.hp, self.schedule, self.cost = objective, hp, schedule, cost
        self.mode = resolve_mode(hp, schedule)
        if overlap and self.mode is not Mode.ASYNC:
            raise ValueError(
                f"overlap={overlap!r} on the {schedule!r} schedule: the overlapped exchange is the "
                "asynchronous one; use schedule='async' or 'round-robin'"
            )
        self.codec = codec(compress)
        check_compress(hp, compress)
        self._sums: list[CompressedSum] = []
        # Asynchronous compressed exchanges: each worker's reference, as the worker and as the
        # server keep it (equal by construction), and the packed buffers (AsyncCompressed).
        self._async: list[_AsyncCompressed] = []
        self.p = hp.workers
        missing = sorted(w for w in cost.stragglers if w >= self.p)
        if missing:
            raise ValueError(
                f"stragglers: worker {missing[0]} does not exist with workers={self.p} "
                f"(workers are 0..{self.p - 1})"
            )
        self.numel = cost.numel if cost.numel is not None else x0.numel()
        self.msg_bytes = self.numel * cost.bytes_per_param
        if compress != "none":  # what crosses the wire: the codec's bytes per value
            self.msg_bytes = math.ceil(self.numel * self.codec.bytes_per_value())
        self.center = Center(hp, x0.clone())
        self.workers: list[Worker] = []
        self.grads: list[GradFn] = []
        self._build_workers(x0, seed, overlap)
        self.rng = random.Random(seed)
        # Constant step times draw nothing: the synchronous step (the slowest worker's) is
        # the same at every global step, computed once instead of p draws a step.
        self._constant_step: float | None = None
        if cost.step_dist == "constant":
            self._constant_step = max(cost.draw_step(r, self.rng) for r in range(self.p))
        self.exchanges = 0
        self.bytes = 0
        self._in_flight = 0.0  # virtual seconds of a synchronous all-reduce still running

    def _build_workers(self, x0: Tensor, seed: int, overlap: int) -> None:
        """One :class:`Worker` and one gradient oracle per replica, each starting at ``x0``."""
        objective = self.objective
        for r in range(self.p):
            vec = getattr(objective, "worker_vector", None)
            x = vec(r) if vec is not None else torch.empty_like(x0)
            x.copy_(x0)
            self.workers.append(
                Worker(self.hp, x, self.mode, grad=objective.grad_buffer(r), overlap=overlap)
            )
            self.grads.append(objective.grad_fn(r, seed))

    def worker_vectors(self) -> list[Tensor]:
        """Every worker's x, in rank order (views)."""
        return [w.x for w in self.workers]

    def worker_momenta(self) -> list[Tensor | None]:
        """Every worker's momentum v, in rank order (None for methods without one)."""
        return [w.v for w in self.workers]

    def local_steps(self) -> int:
        """The local steps all workers took."""
        return sum(w.t for w in self.workers)

    def all_reduce_(self, payloads: list[Tensor], *, mean: bool) -> None:
        """A synchronous SUM (or MEAN) of the workers' payloads, in rank order, in place."""
        total = torch.stack(payloads).sum(0)
        if mean:
            total /= self.p
        for payload in payloads:
            payload.copy_(total)

    def center_vector(self) -> Tensor:
        """The method's result (MethodSpec.evaluated): on the center, or on the workers."""
        spec = self.hp.spec
        if spec.evaluated_on_server(self.mode):
            return self.center.evaluation_vector()
        if spec.evaluated is Evaluated.MEAN_X:
            return torch.stack([w.x for w in self.workers]).mean(0)
        return self.workers[0].evaluation_vector()

    def serve(self, req: Request, rank: int, after: Callable[[], None] | None = None) -> None:
        """Worker ``rank``'s exchange with the center, served at once; then ``after()``
        (the asynchronous schedule's bookkeeping of one center update)."""
        assert req.reply is not None
        if self.codec.name != "none" and req.op is Op.ELASTIC:
            if not self._async:
                self._async = [_AsyncCompressed(self.codec, w.x) for w in self.workers]
            self._async[rank].exchange(self.center, req.payload, req.reply)
        else:
            self.center.handle(req.op, req.payload, req.reply)
        self.exchanges += 1
        self.bytes += 2 * self.msg_bytes
        if after is not None:
            after()

    # -- schedules with a global clock ----------------------------------------------------

    def sync_step(self) -> float:
        """One global step of every worker in lockstep; returns its virtual duration."""
        gens = [w.step() for w in self.workers]
        replies: list[Any] = [None] * len(gens)
        live = list(range(len(gens)))
        comm_time = 0.0
        started_in_flight = False
        overlapped = self.hp.spec.elastic  # as the real runtime overlaps it
        if overlapped and self.workers[0].communicates():
            comm_time += self._in_flight  # the previous exchange's all-reduce, if not done
            self._in_flight = 0.0
        while live:
            reqs: dict[int, Request] = {}
            for r in live:
                with contextlib.suppress(StopIteration):
                    reqs[r] = gens[r].send(replies[r])
            live = sorted(reqs)
            if not live:
                break
            ops = {reqs[r].op for r in live}
            if len(ops) != 1 or len(live) != len(self.workers):
                raise RuntimeError(f"workers out of lockstep: {sorted(o.value for o in ops)}")
            op = ops.pop()
            if op is Op.GRAD:
                for r in live:
                    replies[r] = self.grads[r](self.workers[r].x, reqs[r].payload)
            elif op is Op.SUM and self.codec.name != "none":
                payloads = [reqs[r].payload for r in live]
                if not self._sums:  # every rank's two-phase state, as AllReduceTransport's
                    x = payloads[0]
                    self._sums = [CompressedSum(self.codec, x.numel(), self.p, x.dtype)
                                  for _ in live]  # fmt: skip
                simulate_compressed_sum(self._sums, payloads)
                for r in live:
                    replies[r] = None
                self.exchanges += 1
                self.bytes += self.p * 2 * (self.p - 1) * math.ceil(self.msg_bytes / self.p)
                self._in_flight = self.cost.allreduce(self.msg_bytes, self.p)
                started_in_flight = True
            elif op in (Op.SUM, Op.MEAN):
                self.all_reduce_([reqs[r].payload for r in live], mean=op is Op.MEAN)
                for r in live:
                    replies[r] = None
                self.exchanges += 1
                self.bytes += self.p * 2 * (self.p - 1) * math.ceil(self.msg_bytes / self.p)
                if overlapped:
                    # Synchronous EASGD's sum runs during the next tau - 1 local steps
                    # (AllReduceTransport overlaps it); only what they do not cover is paid,
                    # at the next exchange.
                    self._in_flight = self.cost.allreduce(self.msg_bytes, self.p)
                    started_in_flight = True
                else:
                    comm_time += self.cost.allreduce(self.msg_bytes, self.p)
            else:
                for r in live:
                    self.serve(reqs[r], r)
                    replies[r] = None
                comm_time += self.p * self.cost.server_time + 2 * self.cost.message(self.msg_bytes)
        step = self._constant_step
        if step is None:
            step = max(self.cost.draw_step(r, self.rng) for r in range(self.p))
        if overlapped and not started_in_flight:
            self._in_flight = max(0.0, self._in_flight - step)
        return step + comm_time

    def finish_sync(self) -> float:
        """The wait for an all-reduce still in flight at the end (overlapped EASGD)."""
        left, self._in_flight = self._in_flight, 0.0
        return left

    def round_robin_step(self, t: int) -> float:
        r = t % self.p
        duration = self.cost.draw_step(r, self.rng)

        def serve(req: Request) -> None:
            nonlocal duration
            self.serve(req, r)
            duration += self.cost.server_time + 2 * self.cost.message(self.msg_bytes)

        run_step(self.workers[r], self.grads[r], serve)
        return duration

    # -- the asynchronous schedule: a discrete-event simulation ---------------------------

    def run_async(
        self, steps: int, record: Callable[[float], None], on_update: Callable[[float], None]
    ) -> float:
        """Every worker runs ``steps`` local steps on its own clock; returns the end time."""
        events: list[tuple[float, int, int, str]] = []  # (time, seq, worker, kind)
        seq = 0
        gens: list[Generator[Request, Any, None]] = [w.step() for w in self.workers]
        n = len(self.workers)  # P, or 1 on the batched engine (all P workers' rows)
        pending: list[Request | None] = [None] * n
        # Overlapped exchanges (Worker(overlap=True)): the request on its way, and whether
        # the worker waits for its reply (it yielded WAIT before the reply came back).
        flying: list[Request | None] = [None] * n
        waiting = [False] * n
        done_steps = [0] * n
        server_free = 0.0
        now = 0.0

        def push(at: float, rank: int, kind: str) -> None:
            nonlocal seq
            heapq.heappush(events, (at, seq, rank, kind))
            seq += 1

        def advance(rank: int, reply: Any, at: float) -> None:
            """Resume worker ``rank`` until it needs time to pass; schedule that event."""
            while True:
                try:
                    req = gens[rank].send(reply)
                except StopIteration:
                    done_steps[rank] += 1
                    if done_steps[rank] >= steps:
                        return
                    gens[rank] = self.workers[rank].step()
                    reply = None
                    continue
                if req.deferrable:  # overlapped: on its way while the worker computes
                    req.deferred = True
                    flying[rank] = req
                    push(at + self.cost.message(self.msg_bytes), rank, "o-arrive")
                    reply = None
                    continue
                if req.op is Op.WAIT:
                    if flying[rank] is None:  # the reply is already in
                        reply = None
                        continue
                    waiting[rank] = True
                    return
                pending[rank] = req
                if req.op is Op.GRAD:
                    push(at + self.cost.draw_step(rank, self.rng), rank, "computed")
                else:
                    push(at + self.cost.message(self.msg_bytes), rank, "arrive")
                return

        def updated() -> None:
            """After each center update (on the batched engine, each row's), as after
            each event: the update's bookkeeping, then the evaluation if one is due."""
            on_update(now)
            record(now)

        for r in range(n):
            advance(r, None, 0.0)
        while events:
            now, _, r, kind = heapq.heappop(events)
            req = flying[r] if kind.startswith("o-") else pending[r]
            assert req is not None
            if kind == "o-reply":  # an overlapped reply reached its worker
                flying[r] = None
                if waiting[r]:
                    waiting[r] = False
                    advance(r, None, now)
            elif kind == "computed":
                loss = self.grads[r](self.workers[r].x, req.payload)
                advance(r, loss, now)
            elif kind in ("arrive", "o-arrive"):
                # The center serves one request at a time, in arrival order.
                start = max(now, server_free)
                server_free = start + self.cost.server_time
                push(server_free, r, "o-served" if kind == "o-arrive" else "served")
            elif kind in ("served", "o-served"):
                self.serve(req, r, updated)
                push(now + self.cost.message(self.msg_bytes), r,
                     "o-reply" if kind == "o-served" else "reply")  # fmt: skip
            else:  # reply reached the worker
                advance(r, None, now)
            record(now)
        return now


def _answered(req: Request) -> None:
    """The simulator's answer to a settling worker: every reply is in by the end."""
    if req.op is not Op.WAIT:
        raise RuntimeError(f"a settling worker made a {req.op.value!r} request")


def simulate(
    objective: Objective,
    hp: Hyperparams,
    *,
    schedule: str = "sync",
    steps: int = 100,
    seed: int = 0,
    cost: CostModel | None = None,
    eval_interval: float | None = None,
    trajectory: bool = False,
    progress: Callable[[int, int], None] | None = None,
    compress: str = "none",
    overlap: int = 0,
    engine: str = "auto",
) -> SimResult:
    """Run ``hp.workers`` replicas of ``objective`` for ``steps`` steps on ``schedule``.

    ``steps`` counts global steps for ``sync`` and ``round-robin`` (in round-robin each
    global step is one worker's local step) and local steps per worker for ``async``.
    ``eval_interval`` (virtual seconds) evaluates the center periodically; it is always
    evaluated at the start and at the end. ``trajectory=True`` records a copy of the center
    after every global step (sync, round-robin) or every center update (async).
    ``compress`` (``none``, ``bf16``, ``int8``; synchronous EASGD/EAMSGD) runs the
    compressed two-phase sum of :class:`easgd.algorithms.CompressedSum`, as the real
    runtime does, and counts its bytes.
    ``overlap`` (``K`` in ``1..tau``; asynchronous EASGD/EAMSGD, schedules ``async`` and
    ``round-robin``): the overlapped exchange of ``Worker(overlap=K)``: each reply is
    applied ``K`` steps after its exchange; on the ``async`` schedule the worker computes
    while its request and the reply cross the links and the server serves it, and waits
    only if the reply is not back when it is due. At the end every worker applies its last
    reply, as the runtime's workers do.
    ``engine``: ``per-worker`` drives one :class:`Worker` per replica; ``batched``
    (:mod:`easgd.sim_batched`) drives ONE worker whose tensors hold all P replicas' rows, so
    a local step is a few tensor operations whatever P is (the synchronous schedule, or the
    asynchronous one where every worker's events fall on the same instants: constant step
    times, no stragglers, ``server_time=0``; the center serves an instant's P requests one
    row at a time; no compression; an objective with batched gradients, e.g.
    :class:`Quadratic`; its noise is one stream for all workers, the per-worker engine's in
    distribution only); ``auto``
    (default) is ``batched`` where it applies and gives the per-worker results (a
    noise-free quadratic), else ``per-worker``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} must be an integer >= 0")
    if eval_interval is not None and not eval_interval > 0:
        raise ValueError(f"eval_interval={eval_interval!r} must be > 0 virtual seconds")
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}; choose one of {', '.join(ENGINES)}")
    cost = cost or CostModel()
    sim_class: type[_Sim] = _Sim
    if engine != "per-worker":
        from easgd.sim_batched import BatchedSim, batched_unsupported

        why = batched_unsupported(objective, schedule, compress=compress, cost=cost)
        if why is not None and engine == "batched":
            raise ValueError(f"engine='batched' cannot run this: {why}; use engine='per-worker'")
        if why is None and (engine == "batched" or getattr(objective, "batched_is_exact", False)):
            sim_class = BatchedSim
    sim = sim_class(objective, hp, schedule, seed, cost, compress, overlap)
    result = SimResult(center=sim.center_vector())
    started = time.perf_counter()
    next_eval = [0.0]

    def record(now: float, force: bool = False) -> None:
        if force or (eval_interval is not None and now >= next_eval[0]):
            result.times.append(now)
            result.metrics.append(objective.evaluate(sim.center_vector()))
            if eval_interval is not None:
                while next_eval[0] <= now:
                    next_eval[0] += eval_interval

    record(0.0, force=True)
    now = 0.0
    if schedule in ("sync", "round-robin"):
        for t in range(steps):
            if schedule == "round-robin":
                now += sim.round_robin_step(t)
            else:
                now += sim.sync_step()
                if t == steps - 1:
                    now += sim.finish_sync()
            if trajectory:
                result.center_trajectory.append(sim.center_vector().clone())
            record(now)
            if progress is not None:
                progress(t + 1, steps)
    else:

        def on_update(at: float) -> None:
            if trajectory:
                result.center_trajectory.append(sim.center_vector().clone())

        now = sim.run_async(steps, record, on_update)
    for w in sim.workers:  # the last overlapped reply (every event was processed: it is in)
        run_settle(w, _answered)
    if not result.times or result.times[-1] != now or eval_interval is None:
        record(now, force=True)
    result.center = sim.center_vector().clone()
    result.workers = [x.clone() for x in sim.worker_vectors()]
    result.worker_momenta = [None if v is None else v.clone() for v in sim.worker_momenta()]
    result.exchanges = sim.exchanges
    result.bytes_moved = sim.bytes
    result.virtual_seconds = now
    result.real_seconds = time.perf_counter() - started
    result.local_steps = sim.local_steps()
    result.engine = "per-worker" if sim_class is _Sim else "batched"
    return result
