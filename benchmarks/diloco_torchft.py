"""DiLoCo parity: torchft's ``DiLoCo`` against ours on the same tiny problem.

Optional: torchft is not a dependency of easgd. The comparison runs only when torchft
imports, or with ``--install-torchft`` (``pip install -c constraints-cpu.txt
torchft==0.2.0``, the torch pin kept); otherwise it says it is skipped, writes its JSON
with ``skipped`` set, and exits 0.

The problem: the simulator's quadratic (``easgd.sim.Quadratic``, dim 5, gradient noise 0.5),
p = 2 replicas, each with the simulator's noise stream of its rank, float64, H = ``--tau``
inner steps per round. Each row runs both sides from the same start on the same gradients:

* ours, inner SGD: ``easgd.sim.simulate(..., method="diloco")`` (the oracle every easgd
  path is held against); inner AdamW: two :class:`easgd.algorithms.Worker` generators with
  ``external_local=True`` stepped in lockstep, each around its own ``torch.optim.AdamW``
  (what ``easgd.optim.DiLoCo`` drives, without the process group);
* torchft: two ``torchft.local_sgd.DiLoCo`` replicas in two threads, each with a mocked
  ``torchft.Manager`` (``unittest.mock.create_autospec``, as torchft's own unit tests do;
  no lighthouse) whose ``allreduce`` averages the two replicas' pseudo-gradients in place;
  the outer optimizer is ``torch.optim.SGD(lr, momentum, nesterov=True)``, the DiLoCo
  paper's.

Reported: the largest absolute difference between the two sides' global parameters after
every round, and, for outer ``SGD(lr=1)`` without momentum, ours and torchft's distance to
local SGD (periodic averaging).

Usage, from the repository root::

    python -m benchmarks.diloco_torchft [--quick] [--install-torchft] [--tau 5] [--rounds 10]
"""

from __future__ import annotations

import contextlib
import importlib
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import base_parser, machine_info, print_table, write_json
from easgd.algorithms import Hyperparams, Mode, Op, Request, Worker
from easgd.sim import Quadratic, simulate

ROOT = Path(__file__).resolve().parents[1]
TORCHFT = "torchft==0.2.0"
P = 2

Inner = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
INNER: dict[str, Inner] = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.05, weight_decay=0.1),
}


def torchft_available(install: bool) -> str | None:
    """None when torchft imports (installing it first if asked), else why not."""
    try:
        importlib.import_module("torchft.local_sgd")
        return None
    except ImportError as exc:
        if not install:
            return f"torchft is not installed ({exc}); pass --install-torchft to install {TORCHFT}"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "-c",
           str(ROOT / "constraints-cpu.txt"), TORCHFT]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return f"pip install {TORCHFT} failed: {proc.stderr.strip().splitlines()[-1:]}"
    importlib.invalidate_caches()
    try:
        importlib.import_module("torchft.local_sgd")
    except ImportError as exc:
        return f"torchft installed but does not import: {exc}"
    return None


def _problem() -> Quadratic:
    return Quadratic(h=1.0, sigma=0.5, x0=1.0, dim=5)


def torchft_run(inner: str, tau: int, rounds: int, lr: float, mu: float) -> list[torch.Tensor]:
    """torchft's DiLoCo, two replicas in two threads; the global parameters after each round."""
    from unittest.mock import create_autospec

    from torchft.local_sgd import DiLoCo
    from torchft.manager import Manager
    from torchft.work import _DummyWork

    barrier = threading.Barrier(P)
    slots: list[torch.Tensor | None] = [None] * P
    problem = _problem()
    centers: list[list[torch.Tensor]] = [[] for _ in range(P)]
    errors: list[BaseException] = []

    def replica(rank: int) -> None:
        def allreduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            slots[rank] = tensor
            barrier.wait()
            total = slots[0].clone()  # type: ignore[union-attr]
            for other in slots[1:]:
                total.add_(other)  # type: ignore[arg-type]
            barrier.wait()  # every replica has read every slot
            tensor.copy_(total.div_(P))
            return _DummyWork(tensor)

        try:
            manager = create_autospec(Manager)
            manager._use_async_quorum = False
            manager.errored.return_value = None
            manager.should_commit.return_value = True
            manager.current_step.return_value = 0
            manager.allreduce.side_effect = allreduce
            model = torch.nn.Module()
            model.x = torch.nn.Parameter(problem.initial_point())
            inner_opt = INNER[inner]([model.x])
            outer_opt = torch.optim.SGD([model.x], lr=lr, momentum=mu, nesterov=mu > 0)
            grad = problem.grad_fn(rank, 0)
            with DiLoCo(manager, [model], inner_opt, outer_opt, sync_every=tau,
                        pin_memory=False):  # fmt: skip
                for step in range(tau * rounds):
                    g = torch.empty_like(model.x)
                    grad(model.x.detach(), g)
                    model.x.grad = g
                    inner_opt.step()
                    if (step + 1) % tau == 0:
                        centers[rank].append(model.x.detach().clone())
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=replica, args=(r,)) for r in range(P)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    for other in centers[1:]:
        assert all(torch.equal(a, b) for a, b in zip(centers[0], other, strict=True))
    return centers[0]


def ours_run(inner: str, tau: int, rounds: int, lr: float, mu: float) -> list[torch.Tensor]:
    """Our DiLoCo; the global parameters after each round."""
    problem = _problem()
    if inner == "sgd":
        hp = Hyperparams(method="diloco", lr=0.1, tau=tau, workers=P, outer_lr=lr,
                         outer_momentum=mu)  # fmt: skip
        res = simulate(problem, hp, steps=tau * rounds, trajectory=True)
        return [res.center_trajectory[(k + 1) * tau - 1] for k in range(rounds)]
    hp = Hyperparams(method="diloco", lr=1.0, tau=tau, workers=P, outer_lr=lr,
                     outer_momentum=mu)  # fmt: skip
    params = [torch.nn.Parameter(problem.initial_point()) for _ in range(P)]
    opts = [INNER[inner]([q]) for q in params]
    workers = [Worker(hp, q.data, Mode.SYNC, external_local=True) for q in params]
    grads = [problem.grad_fn(r, 0) for r in range(P)]
    centers = []
    for step in range(tau * rounds):
        gens = [w.step() for w in workers]
        replies: list[Any] = [None] * P
        while True:
            reqs: list[Request] = []
            for g, rep in zip(gens, replies, strict=True):  # every worker, in lockstep
                with contextlib.suppress(StopIteration):
                    reqs.append(g.send(rep))
            if not reqs:
                break
            assert len(reqs) == P, "workers out of lockstep"
            if reqs[0].op is Op.LOCAL:
                for r, q in enumerate(params):
                    q.grad = torch.empty_like(q)
                    grads[r](q.detach(), q.grad)
                    opts[r].step()
                replies = [0.0] * P
            else:  # SUM: every worker's payload becomes the sum
                assert reqs[0].op is Op.SUM
                total = torch.stack([req.payload for req in reqs]).sum(0)
                for req in reqs:
                    req.payload.copy_(total)
                replies = [None] * P
        if (step + 1) % tau == 0:
            assert workers[0].center is not None
            centers.append(workers[0].center.clone())
    return centers


def local_sgd(tau: int, rounds: int) -> list[torch.Tensor]:
    """Periodic averaging with SGD (the simulator's localsgd), after each round."""
    hp = Hyperparams(method="localsgd", lr=0.1, tau=tau, workers=P)
    res = simulate(_problem(), hp, steps=tau * rounds, trajectory=True)
    return [res.center_trajectory[(k + 1) * tau - 1] for k in range(rounds)]


def _sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("diloco_torchft", __doc__)
    parser.add_argument("--install-torchft", action="store_true",
                        help=f"pip install {TORCHFT} first (with the torch pin)")  # fmt: skip
    parser.add_argument("--tau", type=int, default=5, help="inner steps per round (H)")
    parser.add_argument("--rounds", type=int, default=10, help="outer steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tau, rounds = (2, 3) if args.quick else (args.tau, args.rounds)
    payload: dict[str, Any] = {"quick": args.quick, "machine": machine_info(), "tau": tau,
                               "rounds": rounds, "workers": P, "rows": []}  # fmt: skip
    why = torchft_available(args.install_torchft)
    if why is not None:
        print(f"skipped: {why}")
        payload["skipped"] = why
        write_json(args.json, payload)
        return 0
    import torchft  # noqa: F401  (available: checked above)

    payload["torchft"] = getattr(sys.modules["torchft"], "__version__", TORCHFT)
    rows = []
    for inner in ("sgd", "adamw"):
        for lr, mu in ((0.7, 0.9), (1.0, 0.0)):
            theirs = torchft_run(inner, tau, rounds, lr, mu)
            ours = ours_run(inner, tau, rounds, lr, mu)
            row = {"inner": inner, "outer_lr": lr, "outer_momentum": mu,
                   "max_abs_diff": _max_diff(ours, theirs)}  # fmt: skip
            if inner == "sgd" and (lr, mu) == (1.0, 0.0):
                ref = local_sgd(tau, rounds)
                row["ours_vs_local_sgd"] = _max_diff(ours, ref)
                row["torchft_vs_local_sgd"] = _max_diff(theirs, ref)
            rows.append(row)
    payload["rows"] = rows
    print_table(
        f"DiLoCo, ours against torchft (p = {P}, H = {tau}, {rounds} rounds, float64)",
        ["inner", "outer lr", "outer momentum", "max |ours - torchft|", "ours - local SGD",
         "torchft - local SGD"],
        [[r["inner"], r["outer_lr"], r["outer_momentum"], _sci(r["max_abs_diff"]),
          _sci(r.get("ours_vs_local_sgd")), _sci(r.get("torchft_vs_local_sgd"))] for r in rows],
    )  # fmt: skip
    write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
