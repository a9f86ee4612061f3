"""The method table is the only place that knows a method.

Adding a method means a table entry in ``easgd.algorithms`` (and, for a new rule, its code
there): the simulator, the parameter server, the configuration and the command line ask the
table. These tests register a method that exists nowhere else and run it through each, and
scan the sources for the string comparisons the table replaced.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from easgd.algorithms import METHODS, Hyperparams, Mode, Worker, run_step
from easgd.config import TrainConfig
from easgd.sim import Quadratic, simulate

SRC = Path(__file__).resolve().parents[1] / "src" / "easgd"


@pytest.fixture
def new_method(monkeypatch: pytest.MonkeyPatch) -> str:
    """DOWNPOUR under another name: a method that only the table knows."""
    spec = dataclasses.replace(METHODS["downpour"], name="hogpour", description="a new method")
    monkeypatch.setitem(METHODS, "hogpour", spec)
    return "hogpour"


def test_a_new_table_entry_runs_everywhere(new_method: str) -> None:
    from easgd.comm.ps import ParameterServer, PSClient

    hp = Hyperparams(method=new_method, workers=1, tau=2, lr=0.1)
    ref = simulate(Quadratic(sigma=0.0, dim=3), hp.replace(method="downpour"),
                   schedule="async", steps=6)  # fmt: skip
    res = simulate(Quadratic(sigma=0.0, dim=3), hp, schedule="async", steps=6)
    assert_close(res.center, ref.center, rtol=0, atol=0)
    # The parameter server serves it, and a worker driven against it agrees with the oracle.
    x0 = Quadratic(dim=3).initial_point().float()
    with ParameterServer(hp, x0.clone()) as server:
        client = PSClient([server.address], 3, worker_id=0, heartbeat=0)
        x = torch.empty(3)
        client.start(x)
        worker = Worker(hp, x, Mode.ASYNC)
        for _ in range(6):
            run_step(worker, lambda x, out: float(torch.mul(x, 1.0, out=out).sum()), client.serve)
        client.close()
        assert_close(server.snapshot().double(), ref.center, rtol=1e-6, atol=1e-7)
    cfg = TrainConfig(method=new_method, workers=2, steps=5)
    assert cfg.resolved_mode() is Mode.ASYNC and cfg.world_size() == 3


def test_the_command_line_lists_a_new_method(new_method: str, capsys: pytest.CaptureFixture[str]):
    from easgd.cli import build_parser

    args = build_parser().parse_args(["simulate", "--method", new_method])
    assert args.method == new_method


# Patterns that put method knowledge outside the table.
_NAMES = "|".join(METHODS)
_FORBIDDEN = [
    re.compile(rf"""(method|name)\s*(==|!=)\s*["']({_NAMES})["']"""),
    re.compile(rf"""(method|name)\s+(not\s+)?in\s+\(\s*["']({_NAMES})["']"""),
    re.compile(r"""modes\s*==\s*\("""),
    re.compile(r"""\bmode\s*(==|!=)\s*["'](sync|async|sequential)["']"""),
    re.compile(r"""["'](sync|async)["']\s+(not\s+)?in\s+[\w.]*modes"""),
    re.compile(r"""exchange\s*(==|!=)\s*["']"""),
]


def test_no_module_compares_method_mode_or_exchange_strings() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "algorithms.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if any(p.search(line) for p in _FORBIDDEN):
                offenders.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert not offenders, "method knowledge outside the table:\n" + "\n".join(offenders)
