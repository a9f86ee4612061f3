"""Pack the raw runs of a sweep into ``results/<name>/runs.tar.xz``, beside its report.

Run from the repository root after ``easgd experiment NAME`` (and ``easgd report``):

    python results/pack.py runs/experiments/digits-hard-fig3 results/digits-hard-fig3

The archive holds, for every run directory of the sweep, exactly the files ``easgd report``
reads (``summary.json``, ``config.json``, ``run.json``, ``eval.jsonl``, ``metrics.jsonl``),
plus the sweep's ``experiment.json``; not the snapshots, checkpoints or logs (about 37 MB a
run). It is deterministic (sorted names, no owners, zero times), so packing the same runs
twice gives the same bytes. To draw the report again, or to resume the sweep where it
stopped (a run whose ``summary.json`` exists is skipped):

    mkdir -p runs/experiments && tar -xJf results/digits-hard-fig3/runs.tar.xz -C runs/experiments

``tests/test_shipped_results.py`` extracts every archive here and checks that ``easgd
report`` draws the shipped ``table.md`` from it again, line for line.
"""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

#: What ``easgd report`` reads of a run directory.
RUN_FILES = ("config.json", "eval.jsonl", "metrics.jsonl", "run.json", "summary.json")
#: The sweep's own record, at the top of its folder.
SWEEP_FILES = ("experiment.json",)


def pack(sweep: Path, out: Path) -> tuple[int, int]:
    """Write ``out/runs.tar.xz`` from the sweep folder ``sweep``: (runs packed, bytes)."""
    sweep = sweep.resolve()
    if not sweep.is_dir():
        raise SystemExit(f"{sweep} is not a folder; give the sweep's --out folder")
    runs = sorted(p.parent for p in sweep.glob("*/summary.json"))
    if not runs:
        raise SystemExit(f"{sweep} holds no finished run (no */summary.json); nothing packed")
    files = [sweep / f for f in SWEEP_FILES if (sweep / f).exists()]
    for run in runs:
        files += [run / f for f in RUN_FILES if (run / f).exists()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz", format=tarfile.PAX_FORMAT) as tar:
        for path in files:
            data = path.read_bytes()
            info = tarfile.TarInfo(f"{sweep.name}/{path.relative_to(sweep).as_posix()}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    out.mkdir(parents=True, exist_ok=True)
    target = out / "runs.tar.xz"
    tmp = target.with_suffix(".xz.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(target)  # atomic: a failed pack leaves the previous archive
    return len(runs), len(buf.getvalue())


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python results/pack.py SWEEP_DIR RESULTS_DIR")
    n, size = pack(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"packed {n} runs into {Path(sys.argv[2]) / 'runs.tar.xz'} ({size / 1e6:.1f} MB)")
