"""The stability figures: every file written, atomically, through the run directory's writer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import easgd.runlog
from easgd.analysis.figures import write_figures


def test_write_figures_leaves_no_temporary_files(tmp_path: Path) -> None:
    paths = write_figures(tmp_path / "figs", resolution=12)
    assert sorted(p.suffix for p in paths) == [".png"] * 3 + [".svg"] * 3
    assert all(p.stat().st_size > 0 for p in paths)
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(p.name for p in paths)
    assert paths[0].read_bytes().startswith(b"\x89PNG")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        write_figures(tmp_path / "file", resolution=12)


def test_every_figure_goes_through_the_atomic_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[Path] = []
    real = easgd.runlog.atomic_write_bytes

    def spy(path: str | Path, data: bytes, **kwargs: Any) -> None:
        written.append(Path(path))
        real(path, data, **kwargs)

    monkeypatch.setattr(easgd.runlog, "atomic_write_bytes", spy)
    paths = write_figures(tmp_path, resolution=10)
    assert written == paths


@pytest.mark.parametrize("resolution", [3, 1001, True, 20.0])
def test_resolution_outside_the_range_is_refused(resolution: object) -> None:
    with pytest.raises(ValueError, match=f"resolution={resolution!r}"):
        write_figures("unused", resolution=resolution)  # type: ignore[arg-type]
