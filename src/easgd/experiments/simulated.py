"""The simulated runtime: each run on :func:`easgd.sim.simulate`'s virtual clock.

The budget is in virtual seconds: each worker runs ``time_budget / step_time`` local steps,
where ``step_time`` is given or measured once per sweep (:func:`measure_step_time`, one
gradient step of the experiment's network on one thread), and messages cost the
experiment's ``sim_latency`` and ``sim_bandwidth``. The run directory holds the same files
as a real run's, so ``easgd report`` treats both alike.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from easgd.algorithms import Mode
from easgd.experiments.definition import RunSpec
from easgd.experiments.runtime import SweepContext
from easgd.runlog import Event, JsonlWriter, RunPaths, atomic_write_json, eval_line, write_summary

__all__ = ["SimRuntime", "measure_step_time"]

log = logging.getLogger(__name__)

#: Mini-batch losses averaged into one ``metrics.jsonl`` step event (at most).
_LOSS_CHUNK = 50


def measure_step_time(
    dataset: str,
    model: str | None,
    batch_size: int,
    *,
    data_dir: str | None = None,
    steps: int = 20,
) -> float:
    """Median seconds of one gradient step of ``model`` on one thread (the sim's step cost)."""
    import torch

    from easgd.sim import ModelObjective
    from easgd.task import build_task

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        parts = build_task(dataset, model, data_dir=data_dir)
        problem = ModelObjective(parts.build, parts.train, parts.test, batch_size, parts.transform)
        fn, x = problem.grad_fn(0, 0), problem.worker_vector(0)
        grad = problem.grad_buffer(0)
        assert grad is not None
        times = []
        for i in range(steps + 3):
            began = time.perf_counter()
            fn(x, grad)
            if i >= 3:
                times.append(time.perf_counter() - began)
        return statistics.median(times)
    finally:
        torch.set_num_threads(threads)


class _LossLog:
    """A problem proxy that records every worker's mini-batch losses (for metrics.jsonl)."""

    def __init__(self, problem: Any) -> None:
        self.problem = problem
        self.losses: dict[int, list[float]] = {}

    def initial_point(self) -> Any:
        return self.problem.initial_point()

    def grad_buffer(self, rank: int) -> Any:
        return self.problem.grad_buffer(rank)

    def worker_vector(self, rank: int) -> Any:
        return self.problem.worker_vector(rank)

    def evaluate(self, x: Any) -> dict[str, float]:
        result: dict[str, float] = self.problem.evaluate(x)
        return result

    def grad_fn(self, rank: int, seed: int) -> Callable[[Any, Any], float]:
        fn = self.problem.grad_fn(rank, seed)
        losses = self.losses.setdefault(rank, [])

        def logged(x: Any, out: Any) -> float:
            loss = float(fn(x, out))
            losses.append(loss)
            return loss

        return logged


def _write_losses(path: Path, losses: dict[int, list[float]], tau: int, seconds: float) -> None:
    """Every worker's losses as ``step`` events, averaged over chunks of the period.

    The simulator does not timestamp gradients: a worker's k-th loss is placed at k/steps
    of the run's virtual length (exact for constant step and message costs).
    """
    every = max(1, min(tau, _LOSS_CHUNK))
    with JsonlWriter(path) as out:
        for rank, worker in sorted(losses.items()):
            for k in range(every, len(worker) + every, every):
                chunk = worker[k - every : k]
                if chunk:
                    step = min(k, len(worker))
                    out.write({"event": Event.STEP.value, "worker": rank, "step": step,
                               "wall": seconds * step / len(worker),
                               "loss": sum(chunk) / len(chunk)})  # fmt: skip


@dataclass
class SimRuntime:
    """Runs on the simulator; measures the step time once unless it is given.

    Args:
        step_time: virtual seconds of one local step (None: measured on this machine).
    """

    step_time: float | None = None
    #: The problem (network, data) per init seed, built once per sweep.
    parts: dict[int, Any] = field(default_factory=dict)
    name: ClassVar[str] = "sim"

    def sim_step_time(self, ctx: SweepContext) -> float:
        if self.step_time is None:
            e = ctx.experiment
            self.step_time = measure_step_time(
                e.dataset, e.model, e.batch_size, data_dir=ctx.data_dir
            )
            log.info("measured step time: %.4g s", self.step_time)
        return self.step_time

    def run_info(self, ctx: SweepContext, run: RunSpec) -> dict[str, Any]:
        return {"step_time": self.sim_step_time(ctx)}

    def __call__(self, ctx: SweepContext, run: RunSpec, folder: Path) -> dict[str, Any]:
        import torch

        from easgd.sim import CostModel, ModelObjective, simulate
        from easgd.task import build_task

        e = ctx.experiment
        paths = RunPaths(folder)
        step_time = self.sim_step_time(ctx)
        steps = max(1, round(ctx.budget / step_time))
        cfg = e.train_config(run, folder, data_dir=ctx.data_dir, steps=steps,
                             eval_interval=ctx.eval_interval, same_init=ctx.same_init)  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(paths.config, cfg.to_dict())
        init_seed = e.init_seed(run, ctx.same_init)
        if init_seed not in self.parts:
            self.parts[init_seed] = build_task(
                e.dataset, e.model, seed=init_seed, data_dir=ctx.data_dir
            )
        parts = self.parts[init_seed]
        problem = _LossLog(
            ModelObjective(parts.build, parts.train, parts.test, e.batch_size, parts.transform)
        )
        cost = CostModel(step_time=step_time, latency=e.sim_latency, bandwidth=e.sim_bandwidth)
        mode = cfg.resolved_mode()
        # The virtual clock runs every worker on its own clock; synchronous-only methods
        # (all-reduce, local SGD) need the simulator's synchronous schedule.
        schedule = "sync" if mode is Mode.SYNC else "async"
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as a real worker: the simulated cluster has a core per worker
        try:
            res = simulate(problem, cfg.hyperparams(), schedule=schedule, steps=steps,
                           seed=run.seed, cost=cost, eval_interval=ctx.eval_interval)  # fmt: skip
        finally:
            torch.set_num_threads(threads)
        with JsonlWriter(paths.eval) as out:
            for t, m in zip(res.times, res.metrics, strict=True):
                out.write(eval_line(t, m))
        _write_losses(paths.metrics, problem.losses, run.tau, res.virtual_seconds)
        # The virtual clock starts with the first step: no start-up, all of it training.
        return write_summary(
            paths, cfg, runtime=self.name, center=res.metrics[-1],
            curve=[m["error"] for m in res.metrics], wall_seconds=res.virtual_seconds,
            startup_seconds=0.0, train_seconds=res.virtual_seconds, exchanges=res.exchanges,
            bytes_sent=res.bytes_moved // 2, bytes_received=res.bytes_moved - res.bytes_moved // 2,
            local_steps=res.local_steps, experiment=e.name, real_seconds=res.real_seconds,
            step_time=step_time,
        )  # fmt: skip
