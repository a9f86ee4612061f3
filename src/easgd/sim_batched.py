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

So on a noise-free objective the two engines agree bitwise (held by
``tests/test_sim_batched.py``). With noise they agree in distribution only: the objective's
batched oracle (:meth:`easgd.sim.Quadratic.batched_grad_fn`) draws the whole block from one
generator, not each worker from its own.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from easgd.algorithms import Evaluated, Hyperparams, Mode, Worker
from easgd.sim import _Sim, resolve_mode

__all__ = ["BatchedSim", "batched_unsupported"]


def batched_unsupported(
    objective: Any, hp: Hyperparams, schedule: str, *, compress: str = "none", overlap: int = 0
) -> str | None:
    """Why the batched engine cannot run this simulation, or None when it can."""
    if schedule != "sync":
        return f"it runs the synchronous schedule only, not schedule={schedule!r}"
    if resolve_mode(hp, schedule) is Mode.ASYNC:
        return (
            f"method={hp.method!r} is asynchronous: on the synchronous schedule the center "
            "serves its workers one at a time"
        )
    if compress != "none":
        return (
            f"compress={compress!r}: the compressed sum keeps every worker's own error "
            "feedback (the per-worker engine runs it)"
        )
    if overlap:
        return f"overlap={overlap!r} is the asynchronous exchange's"
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
        x = x0.repeat(self.p)  # row r: worker r, starting at x0
        self.workers.append(Worker(self.hp, x, self.mode, overlap=overlap))
        self.grads.append(self.objective.batched_grad_fn(self.p, seed))  # type: ignore[attr-defined]

    def _rows(self, flat: Tensor) -> Tensor:
        return flat.view(self.p, self.dim)

    def all_reduce_(self, payloads: list[Tensor], *, mean: bool) -> None:
        (payload,) = payloads
        rows = self._rows(payload)
        total = rows.sum(0)  # over the workers, in row (rank) order
        if mean:
            total /= self.p
        rows.copy_(total)

    def center_vector(self) -> Tensor:
        rows = self._rows(self.workers[0].evaluation_vector())
        return rows.mean(0) if self.hp.spec.evaluated is Evaluated.MEAN_X else rows[0]

    def worker_vectors(self) -> list[Tensor]:
        return list(self._rows(self.workers[0].x).unbind(0))

    def worker_momenta(self) -> list[Tensor | None]:
        v = self.workers[0].v
        return [None] * self.p if v is None else list(self._rows(v).unbind(0))

    def local_steps(self) -> int:
        return self.p * self.workers[0].t
