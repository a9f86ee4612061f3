"""The shipped results are what their raw runs say: every ``results/*/runs.tar.xz`` (packed
by ``results/pack.py``) is extracted and ``easgd report``'s table is drawn from it again;
it must equal the shipped ``table.md`` line for line, and ``report.json``'s numbers.

A report whose raw runs were not kept (its README says so) is held to itself: every row of
its ``table.md`` is what its ``report.json`` says of that line, seed by seed."""

from __future__ import annotations

import importlib.util
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from easgd.report import build_report, load_runs, report_json, table_markdown

RESULTS = Path(__file__).resolve().parent.parent / "results"
ARCHIVES = sorted(RESULTS.glob("**/runs.tar.xz"))
#: Reports shipped without their raw runs, each with the reason in its README.
WITHOUT_RUNS = sorted(p.parent for p in RESULTS.glob("*/report.json")
                      if not (p.parent / "runs.tar.xz").exists())  # fmt: skip


def _extract(archive: Path, into: Path) -> Path:
    with tarfile.open(archive, "r:xz") as tar:
        names = tar.getnames()
        for name in names:  # plain relative paths only (the data filter where Python has it)
            assert not name.startswith("/") and ".." not in Path(name).parts, name
        if hasattr(tarfile, "data_filter"):
            tar.extractall(into, filter="data")
        else:  # pragma: no cover - Python before 3.10.12
            tar.extractall(into)  # the names were checked above
    tops = {Path(n).parts[0] for n in names}
    assert len(tops) == 1, f"{archive} should hold one sweep folder, holds {sorted(tops)}"
    return into / tops.pop()


def test_the_results_ship_their_raw_runs() -> None:
    """The real-process digits-hard sweeps ship their runs; a report shipped without them
    says why in its README."""
    assert RESULTS / "digits-hard-fig3" / "runs.tar.xz" in ARCHIVES
    # digits-hard-fig2's sweep was lost before packing; its rerun at the chosen rates is not
    assert RESULTS / "digits-hard-fig2" / "rerun" / "runs.tar.xz" in ARCHIVES
    for folder in WITHOUT_RUNS:  # only where the README says why
        assert "raw runs are not shipped" in (folder / "README.md").read_text(), folder


def _cell(values: list[float]) -> str:
    """A table cell of medians and spread, as ``easgd report`` writes it (odd seed counts)."""
    ordered = sorted(values)
    med, lo, hi = ordered[len(ordered) // 2], ordered[0], ordered[-1]
    return f"{med:.4f}" if lo == hi else f"{med:.4f} [{lo:.4f}–{hi:.4f}]"


@pytest.mark.parametrize("folder", WITHOUT_RUNS, ids=[f.name for f in WITHOUT_RUNS])
def test_a_table_without_its_runs_is_what_its_report_json_says(folder: Path) -> None:
    meta: dict[str, Any] = json.loads((folder / "report.json").read_text())
    rows = [line.split(" | ") for line in (folder / "table.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith(("| panel", "|---"))]  # fmt: skip
    assert len(rows) == len(meta["lines"])
    for row, line in zip(rows, meta["lines"], strict=True):
        seeds = line["per_seed"]
        assert len(seeds) == line["seeds"] and len({s["seed"] for s in seeds}) == len(seeds)
        assert len(seeds) % 2 == 1, "the median below is the middle seed's"
        best, final = ([s[k] for s in seeds] for k in ("best_error", "final_error"))
        assert row[1] == line["label"], row
        assert row[2].split(" (")[0] == f"{line['lr']:g}", row
        assert (row[3], row[4]) == (str(line["seeds"]), str(line["runs_tried"])), row
        assert (row[5], row[6]) == (_cell(best), _cell(final)), row
        reached = sum(s["time_to_target"] is not None for s in seeds)
        assert (
            row[8]
            == f"{reached}/{line['seeds']}"
            == f"{line['seeds_reaching_target']}/{line['seeds']}"
        )
        assert line["best_error"] == sorted(best)[len(best) // 2]
        assert (line["grid_edge"] is None) == ("edge" not in row[2] and "one rate" not in row[2])


@pytest.mark.parametrize(
    "archive", ARCHIVES, ids=[a.parent.relative_to(RESULTS).as_posix() for a in ARCHIVES]
)
def test_the_shipped_table_is_drawn_again_from_the_shipped_runs(
    archive: Path, tmp_path: Path
) -> None:
    shipped = archive.parent
    sweep = _extract(archive, tmp_path)
    table = (shipped / "table.md").read_text()
    meta: dict[str, Any] = json.loads((shipped / "report.json").read_text())
    title = table.splitlines()[0].removeprefix("# ")
    given = meta["target_rule"] == "given with --target"
    runs = load_runs([sweep])
    report = build_report(runs, target=meta["target"] if given else None)
    assert table_markdown(report, title).splitlines() == table.splitlines()
    assert json.loads(json.dumps(report_json(report))) == meta  # every curve and number


def test_pack_is_deterministic_and_holds_what_report_reads(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("pack", RESULTS / "pack.py")
    assert spec is not None and spec.loader is not None
    pack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack)
    sweep = tmp_path / "sweep"
    for i in range(2):
        run = sweep / f"run{i}"
        (run / "snapshots").mkdir(parents=True)
        (run / "snapshots" / "center.pt").write_bytes(b"x" * 100)
        for name in pack.RUN_FILES:
            (run / name).write_text(f"{name} {i}\n")
    (sweep / "unfinished" / "logs").mkdir(parents=True)  # no summary.json: not packed
    (sweep / "experiment.json").write_text("{}")
    assert pack.pack(sweep, tmp_path / "a") == (2, (tmp_path / "a" / "runs.tar.xz").stat().st_size)
    pack.pack(sweep, tmp_path / "b")
    first = (tmp_path / "a" / "runs.tar.xz").read_bytes()
    assert first == (tmp_path / "b" / "runs.tar.xz").read_bytes()
    with tarfile.open(tmp_path / "a" / "runs.tar.xz", "r:xz") as tar:
        names = tar.getnames()
    assert names == ["sweep/experiment.json"] + [
        f"sweep/run{i}/{name}" for i in range(2) for name in pack.RUN_FILES
    ]
    with pytest.raises(SystemExit, match="no finished run"):
        pack.pack(sweep / "unfinished", tmp_path / "c")
