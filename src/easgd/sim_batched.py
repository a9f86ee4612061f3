"""The simulator's batched engine: all P workers as ONE population of rows.

The per-worker engine (:class:`easgd.sim._Sim`) drives one :class:`easgd.algorithms.Worker`
generator per replica, about 25 us of Python per worker and local step, so P = 1024 workers
cost about 900 real seconds per simulated hour of 0.1 s steps. This engine drives ONE
:class:`~easgd.algorithms.Worker` whose flat vectors hold the P replicas one after the other
(worker ``r``'s ``dim`` values at ``r*dim``: a ``(P, dim)`` block, flattened because a
worker's vectors are 1-D), so a global step is a few tensor operations whatever P is.

No update rule is written again: every rule of a synchronous method (EASGD/EAMSGD sync,
all-reduce SGD with or without momentum, local SGD, DiLoCo with SGD or AdamW inside, and the
sequential methods, each worker alone) is elementwise, and the Worker's scalars (the
learning rate at ``t``, ``alpha``, ``beta``, ``p``) are the same on every worker, so applying
a rule to the block applies it to every row. What couples the workers, the synchronous
SUM/MEAN (the elastic differences' sum, the gradients' or parameters' mean, DiLoCo's
pseudo-gradients), is served here by reducing over the worker dimension,
``X.view(P, dim).sum(0)``: the same operation on the same ``(P, dim)`` layout as the per-worker
engine's ``torch.stack(payloads).sum(0)``, so in the same row order. The clock, the
exchanges and the bytes are the per-worker engine's own code (``_Sim.sync_step``).

The asynchronous schedule runs here too where the workers stay in lockstep: with constant
step times, no stragglers and an unqueued center (``server_time=0``) every worker's events
fall on the same instants, and the per-worker engine's event loop (``_Sim.run_async``, run
as it is, with the block as its one worker) serves them in rank order. What the block's
exchange asks of the center, P requests of one instant, is served one row at a time in
rank order (:meth:`easgd.algorithms.Center.handle_each`, each row exactly as ``handle``
serves a worker), with the evaluation and the trajectory taken after each row's update,
where the per-worker engine takes them. That makes the DOWNPOUR family (served in worker
order on the synchronous schedule) batched as well. With a queued server or drawn step
times each worker has its own clock: the per-worker engine runs those.

So on a noise-free objective the two engines agree bitwise (held by
``tests/test_sim_batched.py``). With noise they agree in distribution only: the objective's
batched oracle (:meth:`easgd.sim.Quadratic.batched_grad_fn`) draws the whole block from one
generator, not each worker from its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from easgd.algorithms import Evaluated, Request, Worker
from easgd.sim import CostModel, _Sim

__all__ = ["BatchedSim", "batched_unsupported"]


def batched_unsupported(
    objective: Any, schedule: str, *, compress: str = "none", cost: CostModel | None = None
) -> str | None:
    """Why the batched engine cannot run this simulation, or None when it can."""
    if schedule == "round-robin":
        return "schedule='round-robin' runs one worker's step at a time"
    if schedule == "async":
        cost = cost or CostModel()
        # Lockstep: every worker's events fall on the same instants, in rank order.
        if cost.step_dist != "constant":
            return (
                f"step_dist={cost.step_dist!r}: on the asynchronous schedule each worker "
                "then has its own clock (the batched engine needs constant step times, "
                "so that every worker's events fall on the same instants)"
            )
        if cost.stragglers:
            return (
                f"stragglers={cost.stragglers!r}: on the asynchronous schedule a straggler "
                "has its own clock (the batched engine needs every worker on the same one)"
            )
        if cost.server_time > 0:
            return (
                f"server_time={cost.server_time!r}: the server's queue puts each worker on "
                "its own clock (the batched engine serves an instant's requests at once: "
                "server_time=0)"
            )
    if compress != "none":
        return (
            f"compress={compress!r}: the compressed exchange keeps every worker's own error "
            "feedback (the per-worker engine runs it)"
        )
    supported = getattr(objective, "batched", None)  # Grouped: whether its base has them
    if supported is None:
        supported = callable(getattr(objective, "batched_grad_fn", None))
    if not supported:
        return (
            f"the objective {type(objective).__name__} has no batched gradients "
            "(batched_grad_fn, as Quadratic's)"
        )
    return None


class BatchedSim(_Sim):
    """:class:`easgd.sim._Sim` with one Worker whose vectors hold every replica's row."""

    def _build_workers(self, x0: Tensor, seed: int, overlap: int) -> None:
        self.dim = x0.numel()
        self._views: dict[int, tuple[Tensor, tuple[Tensor, ...]]] = {}
        x = x0.repeat(self.p)  # row r: worker r, starting at x0
        self.workers.append(Worker(self.hp, x, self.mode, overlap=overlap))
        self.grads.append(self.objective.batched_grad_fn(self.p, seed))  # type: ignore[attr-defined]

    def _rows(self, flat: Tensor) -> Tensor:
        return flat.view(self.p, self.dim)

    def _row_views(self, flat: Tensor) -> tuple[Tensor, ...]:
        """``flat``'s P rows as views, made once per buffer (a worker's buffers persist)."""
        hit = self._views.get(id(flat))
        if hit is None or hit[0] is not flat:
            hit = (flat, self._rows(flat).unbind(0))
            self._views[id(flat)] = hit
        return hit[1]

    def serve(self, req: Request, rank: int, after: Callable[[], None] | None = None) -> None:
        """The P workers' exchanges of one instant, served one row at a time in rank order
        (as the per-worker engine serves the same instant's requests), each by
        :meth:`easgd.algorithms.Center.handle_each` on the row's views, ``after()`` after
        each."""
        assert req.reply is not None
        self.center.handle_each(req.op, self._row_views(req.payload),
                                self._row_views(req.reply), after)  # fmt: skip
        self.exchanges += self.p
        self.bytes += self.p * 2 * self.msg_bytes

    def all_reduce_(self, payloads: list[Tensor], *, mean: bool) -> None:
        (payload,) = payloads
        rows = self._rows(payload)
        total = rows.sum(0)  # over the workers, in row (rank) order
        if mean:
            total /= self.p
        rows.copy_(total)

    def center_vector(self) -> Tensor:
        if self.hp.spec.evaluated_on_server(self.mode):  # the center (or its average)
            return self.center.evaluation_vector()
        rows = self._rows(self.workers[0].evaluation_vector())
        return rows.mean(0) if self.hp.spec.evaluated is Evaluated.MEAN_X else rows[0]

    def worker_vectors(self) -> list[Tensor]:
        return list(self._rows(self.workers[0].x).unbind(0))

    def worker_momenta(self) -> list[Tensor | None]:
        v = self.workers[0].v
        return [None] * self.p if v is None else list(self._rows(v).unbind(0))

    def local_steps(self) -> int:
        return self.p * self.workers[0].t
