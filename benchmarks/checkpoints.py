"""What checkpoints cost a training run: throughput with every worker's checkpoints on vs off.

Synchronous EASGD, 2 worker processes, tau 10, digits, ``--eval-deferred`` (so evaluation
takes no CPU), the same step budget for every variant, interleaved repeats:

* ``off``: worker checkpoints so rare that none is taken during training (one at the end);
* ``default``: the default period (the steps of about ``--checkpoint-interval`` = 5 s);
* ``frequent``: ``--checkpoint-interval 0.5``, ten times the default frequency.

The figure is the training throughput (local steps per second of ``train_seconds``, from
each run's ``summary.json``) of ``off`` over that of each variant: 1.0 means free, the issue's
target is at most 1.03 at the default. ``--quick`` runs a short budget once (shape only).
Figures and limits: ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._common import (
    Missing,
    base_parser,
    interleaved,
    machine_info,
    median,
    print_table,
    ratio,
    single_thread,
    write_json,
)

VARIANTS = {
    "off": {"checkpoint_steps": 10**9},
    "default": {},
    "frequent": {"checkpoint_interval": 0.5},
}
TARGET = 1.03


def one_run(variant: str, steps: int, out: Path) -> float:
    """Training steps per second of one run of ``variant`` (nan when it reports no time)."""
    from easgd.config import TrainConfig
    from easgd.launch import launch_local

    cfg = TrainConfig(
        method="easgd", mode="sync", workers=2, tau=10, lr=0.05, steps=steps,
        eval_deferred=True, eval_interval=5.0, out=str(out), **VARIANTS[variant],
    )  # fmt: skip
    summary = launch_local(cfg)
    seconds = summary.get("train_seconds")
    if not seconds or not seconds > 0:
        return math.nan
    return float(summary["local_steps"]) / float(seconds)


def run(steps: int, repeats: int, missing: Missing) -> dict[str, Any]:
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for i, variant in interleaved(list(VARIANTS), repeats):
            rate = one_run(variant, steps, Path(tmp) / f"{variant}-{i}")
            if math.isnan(rate):
                missing.add(variant, f"repeat {i} reported no training time")
            else:
                samples[variant].append(rate)
    med = {v: median(s) for v, s in samples.items()}
    rows = [
        {"name": v, "steps_per_s": med[v], "ratio": ratio(med["off"], med[v]),
         "samples": samples[v]}
        for v in VARIANTS
    ]  # fmt: skip
    return {"steps": steps, "repeats": repeats, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("checkpoints", __doc__)
    parser.add_argument("--steps", type=int, default=None, help="steps per worker (6000)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (3)")
    args = parser.parse_args(argv)
    single_thread()
    steps = args.steps or (200 if args.quick else 6000)
    repeats = args.repeats or (1 if args.quick else 3)
    missing = Missing()
    result = {"benchmark": "checkpoints", "quick": args.quick, "machine": machine_info(),
              **run(steps, repeats, missing), "missing": missing.rows}  # fmt: skip
    print_table(
        f"Sync EASGD, 2 workers, tau 10, {steps} steps each, median of {repeats} interleaved "
        "runs; ratio = throughput with checkpoints off / with this variant",
        ["variant", "steps_per_s", "ratio"],
        [[r["name"], r["steps_per_s"], r["ratio"]] for r in result["rows"]],
    )
    default = next(r["ratio"] for r in result["rows"] if r["name"] == "default")
    met = None if math.isnan(default) else bool(default <= TARGET)
    result["target_met"] = {f"default <= {TARGET}": met}
    print(f"target default <= {TARGET}: {default:.3f} -> {'met' if met else 'MISSED'}")
    write_json(args.json, result)
    return missing.exit_code(args.quick)


if __name__ == "__main__":
    sys.exit(main())
