"""``easgd export``: a run's final center as the model's state_dict, equal to what it scored."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from easgd.cli import main
from easgd.evaluation import evaluate_model
from easgd.task import build_task

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    result = subprocess.run(
        [sys.executable, "-m", "easgd", "train", "--out", str(out), "--steps", "60",
         "--workers", "2", "--quiet"], capture_output=True, text=True, cwd=ROOT, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


def test_the_exported_model_scores_the_summarys_center_error(run_dir: Path, tmp_path: Path):
    out = tmp_path / "model.pt"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    state = torch.load(out, weights_only=True)  # plain tensors: nothing to unpickle
    task = build_task("digits", seed=0)
    model = task.build()
    model.load_state_dict(state, strict=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert evaluate_model(model, *task.test, 1024)["error"] == summary["center_test_error"]
    before = {k: v.clone() for k, v in task.build().state_dict().items()}
    assert any(not torch.equal(state[k], before[k]) for k in before), "the center is the init"


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["{tmp}/none", "--out", "{tmp}/m.pt"], "no run there"),
        (["{run}", "--out", "{tmp}"], "is a folder"),
        (["{run}", "--out", "{tmp}/exists.pt"], "exists; choose another --out or pass --overwrite"),
    ],
)
def test_bad_input_is_one_line(
    run_dir: Path,
    tmp_path: Path,
    argv: list[str],
    fragment: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "exists.pt").write_bytes(b"keep")
    args = [a.format(tmp=tmp_path, run=run_dir) for a in argv]
    assert main(["export", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and fragment in err, err
    assert (tmp_path / "exists.pt").read_bytes() == b"keep"
