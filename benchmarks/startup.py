"""Start-up: ``easgd train`` from the command to its first training step, vs ``import torch``.

Three commands, run side by side (interleaved rounds, medians), each a fresh process:

* ``import_torch``: ``python -c "import torch"`` (start, import, exit), the floor: the
  launcher imports torch too;
* ``subprocess`` (before): ``easgd train --steps 30 --quiet --out TMP`` (4 workers, 1 server,
  digits) with ``EASGD_SPAWN=subprocess``: every server, worker and the evaluator is a fresh
  interpreter that imports torch itself;
* ``forkserver`` (after): the same command with ``EASGD_SPAWN=forkserver``: every process is
  a fork of a fork server (:mod:`easgd.spawner`), itself a fork of the launcher once it has
  imported torch (``Spawner.warm(fork=True)``), or an interpreter of its own where the
  launcher cannot fork one.

For a run, ``first_step_s`` is the time from starting the command to the first
``train_start`` event in ``TMP/metrics.jsonl`` (the file is polled every 5 ms, so the
figure is late by at most that), and ``exit_s`` to the command's exit. The target figure is
``first_step_s / import_torch_s`` of ``forkserver``, at most 1.5 (the median of the
per-round ratios; each round runs every command once). ``bg_cores`` is how many cores other
people's processes kept busy meanwhile: a figure with a large one says the machine was shared.

Usage, from the repository root::

    python -m benchmarks.startup [--quick] [--rounds 5] [--steps 30] [--modes ...] [--json PATH]

``--quick`` runs one round (the tests run it). Figures and limits: ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import (
    CpuMeter,
    Missing,
    base_parser,
    interleaved,
    machine_info,
    median,
    print_table,
    ratio,
    summary,
    write_json,
)

TARGET = 1.5
MODES = ("subprocess", "forkserver")
BASELINE = "import_torch"
POLL = 0.005  # seconds between two looks at metrics.jsonl
TIMEOUT = 600.0  # one command, at most
TRAIN_START = "train_start"  # easgd.runlog.Event.TRAIN_START, the first step of a worker


def time_import() -> dict[str, float]:
    """Wall seconds of ``python -c "import torch"``."""
    with CpuMeter() as meter:
        proc = subprocess.run([sys.executable, "-c", "import torch"], timeout=TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"python -c 'import torch' exited with status {proc.returncode}")
    return {"first_step_s": meter.wall, "exit_s": meter.wall, "bg": meter.background_cores}


def time_train(mode: str, steps: int) -> dict[str, Any]:
    """One ``easgd train`` in spawn mode ``mode``: seconds to the first step and to exit."""
    env = dict(os.environ, EASGD_SPAWN=mode)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        metrics = out / "metrics.jsonl"
        cmd = [sys.executable, "-m", "easgd", "train", "--steps", str(steps), "--quiet",
               "--out", str(out)]  # fmt: skip
        first: float | None = None
        offset = 0
        with open(Path(tmp) / "stderr", "w+b") as err, CpuMeter() as meter:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
            try:
                while first is None and proc.poll() is None:
                    found, offset = _train_started(metrics, offset)
                    if found:
                        first = time.perf_counter() - t0
                    elif time.perf_counter() - t0 > TIMEOUT:
                        proc.kill()
                    else:
                        time.sleep(POLL)
                proc.wait(TIMEOUT)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            exit_s = time.perf_counter() - t0
            err.seek(0)
            lines = err.read().decode(errors="replace").strip().splitlines()
        if first is None and proc.returncode == 0 and _train_started(metrics, offset)[0]:
            first = exit_s  # it ended between two looks: censored at its exit
    why = None
    if proc.returncode != 0:
        why = f"easgd train exited with status {proc.returncode}: {lines[-1] if lines else ''}"
    elif first is None:
        why = "no train_start event in metrics.jsonl"
    return {
        "first_step_s": math.nan if first is None else first,
        "exit_s": exit_s,
        "bg": meter.background_cores,
        "no_samples": why,
    }


def _train_started(path: Path, offset: int) -> tuple[bool, int]:
    """Whether a ``train_start`` event is in ``path`` past byte ``offset``; the new offset."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return False, offset
    end = data.rfind(b"\n") + 1  # a line still being written is read next time
    events = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return any(e.get("event") == TRAIN_START for e in events), offset + end


def measure(modes: list[str], rounds: int, steps: int) -> dict[str, list[dict[str, Any]]]:
    variants = [BASELINE, *modes]
    samples: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for i, v in interleaved(variants, rounds):
        s = time_import() if v == BASELINE else time_train(v, steps)
        samples[v].append(s)
        print(f"[{i + 1}/{rounds}] {v:<12} first step {s['first_step_s']:6.2f} s, exit "
              f"{s['exit_s']:6.2f} s (background {s['bg']:.2f} cores)", flush=True)  # fmt: skip
    return samples


def rows_of(samples: dict[str, list[dict[str, Any]]], missing: Missing) -> list[dict[str, Any]]:
    base = [s["first_step_s"] for s in samples[BASELINE]]
    rows = []
    for variant, runs in samples.items():
        first = [s["first_step_s"] for s in runs]
        exits = [s["exit_s"] for s in runs]
        # Per round: this command over import torch in the same round (side by side).
        paired = [ratio(a, b) for a, b in zip(first, base, strict=True) if a == a]
        reasons = sorted({s["no_samples"] for s in runs if s.get("no_samples")})
        if reasons:
            missing.add(variant, "; ".join(reasons))
        rows.append(
            {
                "variant": variant,
                "first_step_s": summary([t for t in first if t == t]),
                "exit_s": summary(exits),
                "ratio": median(paired),
                "ratio_of_medians": ratio(median([t for t in first if t == t]), median(base)),
                "exit_ratio": ratio(median(exits), median(base)),
                "paired_ratios": paired,
                "background_cores": median([s["bg"] for s in runs]),
                "no_samples": reasons,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("startup", __doc__)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (5)")
    parser.add_argument("--steps", type=int, default=30, help="steps per worker (30)")
    parser.add_argument(
        "--modes", nargs="+", default=list(MODES), choices=MODES,
        help=f"spawn modes of easgd train (default: {' '.join(MODES)})",
    )  # fmt: skip
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 5)
    info = machine_info()
    missing = Missing()
    rows = rows_of(measure(args.modes, rounds, args.steps), missing)
    print()
    print_table(
        f"easgd train --steps {args.steps} (4 workers, 1 server, digits): seconds from the "
        f"command to its first training step and to its exit, median of {rounds} rounds; "
        "ratio = first step / import torch (median of per-round ratios)",
        ["variant", "first_step_s", "exit_s", "ratio", "exit_ratio", "bg_cores"],
        [
            [
                r["variant"],
                r["first_step_s"]["median"],
                r["exit_s"]["median"],
                r["ratio"],
                r["exit_ratio"],
                r["background_cores"],
            ]
            for r in rows
        ],
    )
    after = next((r for r in rows if r["variant"] == "forkserver"), None)
    met = None
    if after is not None and not math.isnan(after["ratio"]):
        met = bool(after["ratio"] <= TARGET)
        print(f"target forkserver first step / import torch <= {TARGET}: {after['ratio']:.3f} "
              f"-> {'met' if met else 'MISSED'}")  # fmt: skip
    write_json(
        args.json,
        {
            "benchmark": "startup",
            "quick": args.quick,
            "machine": info,
            "settings": {
                "rounds": rounds,
                "steps": args.steps,
                "modes": args.modes,
                "poll_s": POLL,
            },
            "target": TARGET,
            "target_met": met,
            "rows": rows,
            "missing": missing.rows,
        },
    )
    return missing.exit_code(args.quick)


if __name__ == "__main__":
    sys.exit(main())
