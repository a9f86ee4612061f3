"""Shared helpers of the benchmarks: interleaving, medians, tables, JSON, machine and load.

Every benchmark is one command, run from the repository root as a module
(``python -m benchmarks.<name>``), that prints a table and writes JSON (default
``benchmarks/results/<name>.json``). The machine is shared with other people's jobs, so
compared variants are always interleaved (each repeat runs every variant once, in a rotating
order) and reported as medians, and :class:`CpuMeter` records how much CPU *other* processes
used while each sample ran, so a figure taken on a busy machine says so. A row that got no
samples (a run that never started training within its budget, say) is reported by
:class:`Missing`, never a traceback: ``--quick`` still writes its JSON and exits 0.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

__all__ = [
    "RESULTS",
    "CpuMeter",
    "Missing",
    "ProcessSampler",
    "background_cores",
    "base_parser",
    "by_role",
    "free_port",
    "init_gloo",
    "interleaved",
    "machine_info",
    "median",
    "partial_json",
    "print_table",
    "ratio",
    "single_thread",
    "summary",
    "wait_until_quiet",
    "write_json",
]


def single_thread() -> None:
    """One torch thread here and in every child (``mp.spawn`` does not set OMP_NUM_THREADS)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a gloo rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_gloo(rank: int, port: int, world_size: int) -> None:
    """Join a gloo group of ``world_size`` local processes at ``127.0.0.1:port`` (60 s timeout)."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )


def base_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """The flags every benchmark has: ``--quick`` and ``--json PATH``."""
    first = (doc or name).strip().split("\n\n")[0]
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{name}",
        description=first,
        epilog="Run from the repository root. The figures, the commands that produced them "
        "and what limits each one: benchmarks/RESULTS.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="a small, fast form (the tests run it)"
    )
    parser.add_argument(
        "--json", type=Path, default=RESULTS / f"{name}.json", help="where to write the results"
    )
    return parser


def partial_json(args: argparse.Namespace, name: str) -> Path:
    """Where a run with ``--only PART`` writes its results: ``--json`` if given, else
    ``results/<name>-<PART>.json``, so that a partial run never overwrites the full run's
    ``results/<name>.json`` (which RESULTS.md cites)."""
    only = getattr(args, "only", None)
    if only and args.json == RESULTS / f"{name}.json":
        return RESULTS / f"{name}-{only}.json"
    return Path(args.json)


def interleaved(variants: Sequence[str], repeats: int) -> Iterator[tuple[int, str]]:
    """``(repeat, variant)`` in a rotating order: A B C, B C A, C A B, ...

    Every variant runs once per repeat and takes every position equally often, so a slow
    drift of the machine's load (other people's jobs) falls on all of them alike.
    """
    n = len(variants)
    for i in range(repeats):
        shift = i % n
        for v in list(variants[shift:]) + list(variants[:shift]):
            yield i, v


def median(values: Sequence[float]) -> float:
    """The median; censored samples (inf: never reached) sort last; nan when there are none."""
    if not values:
        return math.nan
    finite = [v for v in values if v == v and v != float("inf")]
    if len(finite) < len(values):
        # Censored samples (inf: never reached) sort last; the median is inf if they dominate.
        ordered = sorted(values)
        return float(ordered[(len(ordered) - 1) // 2]) if len(ordered) % 2 else _mid(ordered)
    return float(statistics.median(values))


def _mid(ordered: list[float]) -> float:
    k = len(ordered) // 2
    return (ordered[k - 1] + ordered[k]) / 2


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, or nan when the denominator is not a positive number."""
    if not denominator > 0 or math.isinf(denominator):
        return math.nan
    return numerator / denominator


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and the samples themselves (nan and ``n = 0`` when there are none)."""
    return {
        "median": median(values),
        "min": min(values, default=math.nan),
        "max": max(values, default=math.nan),
        "n": len(values),
        "samples": list(values),
    }


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain aligned table (numbers right-aligned), the same in every benchmark."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(header)]

    def line(values: Sequence[str], numeric: Sequence[bool]) -> str:
        out = [
            v.rjust(w) if n else v.ljust(w)
            for v, w, n in zip(values, widths, numeric, strict=False)
        ]
        return "  ".join(out).rstrip()

    numeric = [
        all(_is_number(row[i]) for row in rows) if rows else False for i in range(len(header))
    ]
    print(title)
    print(line(list(header), numeric))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print(line(row, numeric))
    print()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "-"
        if value == float("inf"):
            return "never"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3f}"
    return str(value)


def machine_info() -> dict[str, Any]:
    """What the figures were measured on, and how busy it was when the benchmark started."""
    import torch

    model = ""
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                model = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(load),
        "command": _command(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _command() -> str:
    """The command line as typed: ``python3 -m benchmarks.<name> ...`` for a module."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = ["-m", spec.name] if spec is not None else sys.argv[:1]
    return " ".join([Path(sys.executable).name, *program, *sys.argv[1:]])


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n")
    print(f"wrote {path}")


class Missing:
    """The rows that got no samples, and why: each printed as it is found, all in the JSON.

    A benchmark's ``--quick`` form, which the tests run on machines of any speed and load,
    reports them and exits 0; a full run exits 1, since its table has holes.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, str]] = []

    def add(self, row: str, why: str) -> None:
        print(f"no samples: {row}: {why}", flush=True)
        self.rows.append({"row": row, "why": why})

    def exit_code(self, quick: bool) -> int:
        if not self.rows:
            return 0
        names = ", ".join(r["row"] for r in self.rows)
        print(f"{len(self.rows)} row(s) without samples: {names} (reasons above)", flush=True)
        return 0 if quick else 1


# ---------------------------------------------------------------------------------------
# Load accounting: how much of the machine was ours while a sample ran.
# ---------------------------------------------------------------------------------------


def _machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used (all cores), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return float("nan")
    ticks = [int(f) for f in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    # guest time is already counted in user time: take the first 8 fields only.
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class CpuMeter:
    """Context manager: wall seconds, our CPU seconds and everybody else's, over a block.

    ``background_cores`` is the average number of cores other people's processes kept busy
    (machine-wide busy time minus ours, over wall time). Our children count once they have
    been waited for, so the block must end after they exit.
    """

    wall: float = 0.0
    ours: float = 0.0
    busy: float = 0.0
    _t0: tuple[float, float, float] = field(default=(0.0, 0.0, 0.0), repr=False)

    def __enter__(self) -> CpuMeter:
        self._t0 = (time.perf_counter(), _own_seconds(), _machine_busy_seconds())
        return self

    def __exit__(self, *exc: object) -> None:
        wall0, own0, busy0 = self._t0
        self.wall = time.perf_counter() - wall0
        self.ours = _own_seconds() - own0
        self.busy = _machine_busy_seconds() - busy0

    @property
    def background_cores(self) -> float:
        if self.wall <= 0:
            return float("nan")
        return max(0.0, (self.busy - self.ours) / self.wall)

    def as_dict(self) -> dict[str, float]:
        return {
            "wall_s": self.wall,
            "our_cpu_s": self.ours,
            "machine_busy_cpu_s": self.busy,
            "background_cores": self.background_cores,
        }


def background_cores(window: float = 1.0) -> float:
    """Cores other processes keep busy now, averaged over ``window`` seconds."""
    with CpuMeter() as meter:
        time.sleep(window)
    return meter.background_cores


def wait_until_quiet(max_wait: float, threshold: float = 0.3, window: float = 1.0) -> float:
    """Wait (up to ``max_wait`` s) until other processes use under ``threshold`` cores.

    Returns the last background load seen. ``max_wait <= 0`` does not wait at all.
    """
    if max_wait <= 0:
        return float("nan")
    deadline = time.monotonic() + max_wait
    load = background_cores(window)
    while load >= threshold and time.monotonic() < deadline:
        load = background_cores(window)
    return load


class ProcessSampler:
    """Samples the CPU time of this process's descendants (a thread, every ``period`` s).

    The last sample before each process exits is its CPU time (to within ``period``). The
    role of a process is taken from the run's ``processes.json`` (``run_dir``: the local
    launcher forks its processes from a fork server, so their /proc environment is the
    launcher's), else from its environment (``EASGD_ROLE``, ``RANK``), so a benchmark can
    say how the CPU was shared between workers, servers and the evaluator.
    """

    def __init__(self, period: float = 0.2, run_dir: str | os.PathLike[str] | None = None) -> None:
        import threading

        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.period = period
        self.cpu: dict[int, float] = {}
        self.series: dict[int, list[tuple[float, float]]] = {}  # (time.time(), cpu seconds)
        self.labels: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _children(self, pid: int) -> list[int]:
        out: list[int] = []
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                text = (task / "children").read_text().split()
                out.extend(int(t) for t in text)
        except OSError:
            pass
        return out

    def _sample(self) -> None:
        todo = self._children(os.getpid())
        while todo:
            pid = todo.pop()
            todo.extend(self._children(pid))
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                self.cpu[pid] = (int(fields[11]) + int(fields[12])) / self._tick
                self.series.setdefault(pid, []).append((time.time(), self.cpu[pid]))
                if pid not in self.labels:
                    self.labels[pid] = self._label(pid)
            except (OSError, ValueError, IndexError):
                continue

    def _label(self, pid: int) -> str:
        if self.run_dir is not None:
            try:
                doc = json.loads((self.run_dir / "processes.json").read_text())
            except (OSError, ValueError):
                doc = {"processes": []}
            for proc in doc["processes"]:
                if proc["pid"] == pid:
                    return "evaluator" if proc["role"] == "evaluator" else f"rank{proc['rank']}"
        try:
            env = dict(
                item.split("=", 1)
                for item in Path(f"/proc/{pid}/environ").read_text().split("\0")
                if "=" in item
            )
        except OSError:
            return "?"
        if env.get("EASGD_ROLE"):
            return env["EASGD_ROLE"]
        if "RANK" in env:
            return f"rank{env['RANK']}"
        return "other"

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def cores_between(self, t0: float, t1: float) -> dict[str, float]:
        """Average cores each label used between two ``time.time()`` instants."""
        out: dict[str, float] = {}
        for pid, points in self.series.items():
            used = _cpu_at(points, t1) - _cpu_at(points, t0)
            label = self.labels.get(pid, "?")
            out[label] = out.get(label, 0.0) + used / max(t1 - t0, 1e-9)
        return out

    def by_label(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, seconds in self.cpu.items():
            label = self.labels.get(pid, "?")
            out[label] = out.get(label, 0.0) + seconds
        return out


def by_role(cfg: Any, per_label: dict[str, float]) -> dict[str, float]:
    """Sum per-label figures of :class:`ProcessSampler` by the run's roles: ``rank<k>`` is
    the role of rank k in ``cfg`` (a ``TrainConfig``: server or worker); other labels (the
    evaluator's ``EASGD_ROLE``) stay as they are."""
    out: dict[str, float] = {}
    for label, value in per_label.items():
        role = cfg.role_of(int(label[4:]))[0] if label.startswith("rank") else label
        out[role] = out.get(role, 0.0) + value
    return out


def _cpu_at(points: list[tuple[float, float]], t: float) -> float:
    """A process's CPU seconds at instant ``t``, interpolated between samples."""
    if not points or t <= points[0][0]:
        return points[0][1] if points else 0.0
    for (ta, ca), (tb, cb) in itertools.pairwise(points):
        if ta <= t <= tb:
            return ca + (cb - ca) * (t - ta) / max(tb - ta, 1e-9)
    return points[-1][1]
