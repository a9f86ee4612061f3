"""The paper's experiments as a GPU user starts them: exact dry runs, ``--device``,
``--same-init``, and learning-rate grids that extend past an edge their best sits on."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from easgd.cli import main
from easgd.config import TrainConfig
from easgd.data.loader import BatchStream
from easgd.experiments import (
    Experiment,
    MethodPlan,
    RunSpec,
    get_experiment,
    grid_edge,
    next_rates,
    run_sweep,
)
from easgd.flat import parameters_to_flat_views
from easgd.runlog import RunPaths, iter_jsonl, write_summary
from easgd.task import task_from_config

pytestmark = pytest.mark.timeout(120)

_NAME = re.compile(r"\b([a-z]+_tau\d+_p\d+_lr[0-9.e-]+_s\d+)\b")


def _dry_run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[list[str], str]:
    assert main(["experiment", *argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    return _NAME.findall(out), out


# -- --dry-run lists exactly the runs ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "count", "named", "absent"),
    [
        # 5 methods x 4 taus x 4 rates x 3 seeds + MDOWNPOUR (tau 1) and MSGD: 4 x 3 each.
        ("paper-fig2", 264,
         ["eamsgd_tau64_p4_lr0.002_s2", "easgd_tau16_p4_lr0.1_s0",
          "mvadownpour_tau4_p4_lr0.05_s1", "mdownpour_tau1_p4_lr0.001_s0",
          "msgd_tau1_p1_lr0.005_s2"],
         ["mdownpour_tau4_p4_lr0.001_s0", "easgd_tau10_p4_lr0.1_s0"]),
        # 4 distributed methods x 3 p x 4 rates x 3 seeds + MSGD 4 x 3.
        ("paper-fig3", 156,
         ["easgd_tau10_p16_lr0.1_s2", "eamsgd_tau10_p8_lr0.0005_s0",
          "downpour_tau1_p4_lr0.01_s1", "mdownpour_tau1_p16_lr0.005_s2"],
         ["adownpour_tau1_p4_lr0.01_s0", "easgd_tau1_p4_lr0.1_s0"]),
        # 4 distributed methods x 2 p x 4 rates, one seed + MSGD 4.
        ("paper-fig4", 36,
         ["eamsgd_tau10_p8_lr0.0005_s0", "downpour_tau1_p4_lr0.1_s0",
          "msgd_tau1_p1_lr0.001_s0"],
         ["eamsgd_tau10_p8_lr0.0005_s1", "easgd_tau10_p16_lr0.1_s0"]),
    ],
)  # fmt: skip
def test_dry_run_of_each_paper_experiment_lists_exactly_its_runs(
    name: str, count: int, named: list[str], absent: list[str], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    names, out = _dry_run(capsys, name, "--out", str(tmp_path / "x"))
    assert len(names) == count == len(set(names))
    assert names == [r.name for r in get_experiment(name).runs()]
    assert set(named) <= set(names) and not set(absent) & set(names)
    assert f"{count} runs" in out and "--same-init on" in out
    assert not (tmp_path / "x").exists()  # a dry run writes nothing


def test_paper_fig4_is_the_papers_imagenet_setting() -> None:
    exp = get_experiment("paper-fig4")
    assert (exp.dataset, exp.model, exp.panel, exp.workers) == (
        "imagenet", "imagenet-paper", "workers", (4, 8)
    )  # fmt: skip
    assert (exp.weight_decay, exp.batch_size, exp.seeds, exp.same_init) == (1e-5, 128, 1, True)
    assert {(r.method, r.tau) for r in exp.runs()} == {
        ("easgd", 10), ("eamsgd", 10), ("downpour", 1), ("mdownpour", 1), ("msgd", 1)
    }  # fmt: skip
    assert "our choice" in exp.notes.lower()
    for name in ("paper-fig2", "paper-fig3"):
        assert get_experiment(name).same_init and "our choice" in get_experiment(name).notes


# -- --device ----------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["experiment", "paper-fig2", "--device", "cuda", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "--device cuda" in err and "use --device cpu (or auto)" in err
    assert not (tmp_path / "x").exists()
    _, out = _dry_run(capsys, "paper-fig2", "--device", "auto", "--out", str(tmp_path / "x"))
    assert "workers on cpu" in out  # auto: no CUDA here


def test_device_applies_to_the_real_runtime_only(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["experiment", "digits-fig2", "--runtime", "sim", "--device", "cuda"])
    assert rc == 2 and "applies to --runtime real" in capsys.readouterr().err


def test_real_runs_get_the_device_and_the_shared_init(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each run's configuration names the device (the launcher puts the workers there and the
    servers on the CPU, as ``easgd train --device`` does) and the init seed."""
    import easgd.launch

    configs: list[TrainConfig] = []

    def fake_launch(cfg: TrainConfig, progress: Any = None) -> dict[str, Any]:
        configs.append(cfg)
        return write_summary(
            RunPaths(cfg.out), cfg, runtime="real", center={"loss": 0.3, "error": 0.1},
            curve=[0.5, 0.1], wall_seconds=1.0, startup_seconds=0.0, train_seconds=1.0,
            exchanges=0, bytes_sent=0, bytes_received=0, local_steps=0,
        )  # fmt: skip

    monkeypatch.setattr(easgd.launch, "launch_local", fake_launch)
    exp = get_experiment("paper-fig2")
    res = run_sweep(exp, tmp_path, only=["easgd"], lr_grid=False, device="cuda",
                    max_extensions=0)  # fmt: skip
    assert not res.failed and len(configs) == 4 * 3
    assert {c.device for c in configs} == {"cuda"}
    assert {c.init_seed for c in configs} == {0} and {c.seed for c in configs} == {0, 1, 2}
    header = json.loads((tmp_path / "experiment.json").read_text())
    assert (header["device"], header["same_init"]) == ("cuda", True)
    info = json.loads((tmp_path / "easgd_tau1_p4_lr0.05_s2" / "run.json").read_text())
    assert (info["device"], info["init_seed"]) == ("cuda", 0)
    # Runs on another device (or init policy) never mix with these in one folder.
    with pytest.raises(ValueError, match="device='cuda'"):
        run_sweep(exp, tmp_path, only=["easgd"], lr_grid=False, device="cpu")
    with pytest.raises(ValueError, match="same_init=True"):
        run_sweep(exp, tmp_path, only=["easgd"], lr_grid=False, device="cuda", same_init=False)


# -- --same-init -------------------------------------------------------------------------------


def _initial_and_first_batch(cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Worker 0's initial parameters and first batch, built as the worker builds them."""
    task = task_from_config(cfg)
    flat = parameters_to_flat_views(task.build())
    stream = BatchStream(task.train[0], task.train[1], cfg.batch_size, seed=cfg.seed + 0,
                         transform=task.transform)  # fmt: skip
    return flat.params.detach().clone(), next(stream)[1]


def test_same_init_keeps_the_weights_and_changes_the_data_order(tmp_path: Path) -> None:
    exp = dataclasses.replace(get_experiment("digits-fig2"), same_init=True)
    runs = [RunSpec("easgd", 4, 4, 0.1, seed) for seed in (0, 1)]
    cfgs = [exp.train_config(r, tmp_path / r.name, steps=10) for r in runs]
    assert [c.init_seed for c in cfgs] == [0, 0] and [c.seed for c in cfgs] == [0, 1]
    (x0, y0), (x1, y1) = (_initial_and_first_batch(c) for c in cfgs)
    assert torch.equal(x0, x1)  # one initial network
    assert not torch.equal(y0, y1)  # two data orders
    # Without --same-init the seed draws the init too (the behaviour of every older run).
    off = [exp.train_config(r, tmp_path / r.name, steps=10, same_init=False) for r in runs]
    assert not torch.equal(_initial_and_first_batch(off[0])[0], _initial_and_first_batch(off[1])[0])


def test_same_init_sweep_starts_every_seed_from_one_center(tmp_path: Path) -> None:
    """Simulated runs of two seeds: the same center at time 0, different ones after."""
    exp = dataclasses.replace(
        get_experiment("digits-fig2"), same_init=True, time_budget=0.5, taus=(4,)
    )
    res = run_sweep(exp, tmp_path, runtime="sim", only=["easgd"], lr_grid=False, seeds=2,
                    step_time=0.01, max_extensions=0)  # fmt: skip
    assert not res.failed
    curves = [list(iter_jsonl(tmp_path / f"easgd_tau4_p4_lr0.03_s{s}" / "eval.jsonl"))
              for s in (0, 1)]  # fmt: skip
    assert curves[0][0]["wall"] == 0 and curves[0][0]["test_loss"] == curves[1][0]["test_loss"]
    assert curves[0][-1]["test_loss"] != curves[1][-1]["test_loss"]
    saved = [json.loads((tmp_path / f"easgd_tau4_p4_lr0.03_s{s}" / "config.json").read_text())
             for s in (0, 1)]  # fmt: skip
    assert [(c["seed"], c["init_seed"]) for c in saved] == [(0, 0), (1, 0)]


def test_a_config_without_init_seed_starts_from_its_seed() -> None:
    """An older config.json (and so ``--resume`` of an older run) keeps its initial network."""
    old = TrainConfig(seed=3, steps=1).to_dict()
    del old["init_seed"]
    cfg = TrainConfig.from_dict(old)
    assert cfg.init_seed is None and cfg.resolved().init_seed == 3
    new = TrainConfig(seed=3, init_seed=3, steps=1)
    assert torch.equal(_initial_and_first_batch(cfg)[0], _initial_and_first_batch(new)[0])


# -- learning-rate grids that cannot fool you ---------------------------------------------------

_GRID = (0.01, 0.02, 0.05, 0.1)
#: The best rate of each tau of the fake runner: above, below, inside and far above the grid.
_OPTIMUM = {1: 0.4, 4: 0.003, 16: 0.03, 64: 100.0}


def _experiment() -> Experiment:
    return Experiment(
        name="grid-test", version="1", description="", dataset="digits", model="digits-cnn",
        plans=(MethodPlan("easgd", _GRID, 0.05),), taus=tuple(_OPTIMUM), workers=(2,),
        panel="tau", time_budget=1.0, seeds=2,
    )  # fmt: skip


def _fake_runner(calls: list[str]) -> Any:
    """No training: the error is the distance of log(lr) from the tau's optimum."""

    def runner(ctx: Any, run: RunSpec, folder: Path) -> dict[str, Any]:
        calls.append(run.name)
        error = 0.1 + abs(math.log(run.lr / _OPTIMUM[run.tau])) / 100 + run.seed / 1000
        summary = {"method": run.method, "tau": run.tau, "workers": run.workers, "lr": run.lr,
                   "best_center_test_error": error, "center_test_error": error}  # fmt: skip
        (folder / "summary.json").write_text(json.dumps(summary))
        return summary

    return runner


def test_next_rates_and_grid_edge() -> None:
    assert next_rates(0.1, _GRID) == [0.2] and next_rates(0.01, _GRID) == [0.005]
    assert next_rates(0.05, _GRID) == []
    assert next_rates(0.1, (0.03, 0.1)) == [0.333] and next_rates(0.05, (0.05,)) == [0.025, 0.1]
    assert [grid_edge(lr, _GRID) for lr in (0.1, 0.01, 0.02)] == ["top", "bottom", None]
    assert grid_edge(0.05, (0.05,)) == "only"


def test_a_grid_extends_past_the_edge_its_best_sits_on(tmp_path: Path) -> None:
    calls: list[str] = []
    res = run_sweep(_experiment(), tmp_path, runtime="sim", step_time=0.01,
                    runner=_fake_runner(calls))  # fmt: skip
    assert not res.failed
    key = {tau: ("easgd", tau, 2) for tau in _OPTIMUM}
    # Top edge: 0.1 -> 0.2 -> 0.4 -> 0.8; the best, 0.4, is then inside.
    assert res.extended[key[1]] == [0.2, 0.4, 0.8] and res.best[key[1]]["lr"] == 0.4
    # Bottom edge: 0.01 -> 0.005 -> 0.0025; the best, 0.0025, is inside after one more.
    assert res.extended[key[4]] == [0.005, 0.0025, 0.00125]
    assert res.best[key[4]]["lr"] == 0.0025
    # Inside: nothing added.
    assert key[16] not in res.extended and res.best[key[16]]["lr"] == 0.02
    # Still on the edge after the limit of 3: reported as such.
    assert res.extended[key[64]] == [0.2, 0.4, 0.8] and res.best[key[64]]["lr"] == 0.8
    assert [res.edge(key[t]) for t in _OPTIMUM] == [None, None, None, "top"]
    assert len(calls) == (4 * 4 + 3 + 3 + 3) * 2  # every new rate for both seeds
    assert "easgd_tau1_p2_lr0.8_s1" in calls and "easgd_tau4_p2_lr0.00125_s0" in calls
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    edges = {row["tau"]: row["edge"] for row in sweep["best"]}
    assert edges == {1: None, 4: None, 16: None, 64: "top"}
    grid64 = next(row["grid"] for row in sweep["best"] if row["tau"] == 64)
    assert grid64 == [*_GRID, 0.2, 0.4, 0.8]
    listed = [r["name"] for r in json.loads((tmp_path / "experiment.json").read_text())["runs"]]
    assert listed == calls  # experiment.json lists the extension runs too
    # Resumed: the same extensions, found done; nothing runs twice.
    calls.clear()
    again = run_sweep(_experiment(), tmp_path, runtime="sim", step_time=0.01,
                      runner=_fake_runner(calls))  # fmt: skip
    assert calls == [] and again.extended == res.extended and len(again.skipped) == len(listed)


def test_the_limit_and_zero_extensions(tmp_path: Path) -> None:
    calls: list[str] = []
    res = run_sweep(_experiment(), tmp_path / "one", runtime="sim", step_time=0.01,
                    max_extensions=1, runner=_fake_runner(calls))  # fmt: skip
    assert res.extended[("easgd", 1, 2)] == [0.2] and res.edge(("easgd", 1, 2)) == "top"
    assert res.edge(("easgd", 4, 2)) == "bottom" and res.edge(("easgd", 16, 2)) is None
    res = run_sweep(_experiment(), tmp_path / "none", runtime="sim", step_time=0.01,
                    max_extensions=0, runner=_fake_runner([]))  # fmt: skip
    assert not res.extended and res.edge(("easgd", 64, 2)) == "top"


def test_the_cli_table_marks_a_best_still_on_an_edge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from easgd.experiments import SimRuntime, registry

    fake = _fake_runner([])
    monkeypatch.setitem(registry.EXPERIMENTS, "digits-fig2", dataclasses.replace(
        _experiment(), name="digits-fig2"))  # fmt: skip
    monkeypatch.setattr(
        SimRuntime, "__call__", lambda self, ctx, run, folder: fake(ctx, run, folder)
    )
    rc = main(["experiment", "digits-fig2", "--runtime", "sim", "--step-time", "0.01",
               "--out", str(tmp_path), "--lr-extensions", "1", "--quiet"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("easgd")}
    assert "top" in rows["1"] and "bottom" in rows["4"] and "top" in rows["64"]
    assert "top" not in rows["16"] and "bottom" not in rows["16"]
    assert "the optimum may lie beyond it" in out


def test_an_older_sweep_folder_without_device_or_same_init_is_resumed(tmp_path: Path) -> None:
    """A folder written before ``device`` and ``same_init`` existed: cpu, shared init off."""
    exp, calls = _experiment(), list[str]()
    run_sweep(exp, tmp_path, runtime="sim", step_time=0.01, max_extensions=0,
              runner=_fake_runner(calls))  # fmt: skip
    header = json.loads((tmp_path / "experiment.json").read_text())
    del header["device"], header["same_init"]
    (tmp_path / "experiment.json").write_text(json.dumps(header))
    calls.clear()
    again = run_sweep(exp, tmp_path, runtime="sim", step_time=0.01, max_extensions=0,
                      runner=_fake_runner(calls))  # fmt: skip
    assert calls == [] and len(again.skipped) == len(exp.runs())


# -- ImageNet ----------------------------------------------------------------------------------


def test_paper_fig4_needs_the_folder_and_decodes_it_before_the_first_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    from easgd.cli.experiment import _prepare_data

    rc = main(["experiment", "paper-fig4", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--data-dir ROOT" in err
    assert not (tmp_path / "x" / "experiment.json").exists()
    for split in ("train", "val"):
        (tmp_path / "in" / split / "n01").mkdir(parents=True)
        Image.new("RGB", (12, 9), (200, 30, 30)).save(tmp_path / "in" / split / "n01" / "a.png")
    monkeypatch.setenv("EASGD_DATA_DIR", str(tmp_path / "cache"))
    _prepare_data("imagenet", str(tmp_path / "in"))
    (cache,) = (tmp_path / "cache" / "imagenet").iterdir()
    assert json.loads((cache / "meta.json").read_text())["train_size"] == 1


def test_the_sweep_extends_by_the_median_seed_as_the_report_chooses(tmp_path: Path) -> None:
    """One lucky seed at the smallest rate must not steer the extension: the sweep judges a
    rate by its median seed, as ``easgd report``'s table does (the digits-hard-fig3 sweep
    once extended by the best single run and left MSGD's median best on the top edge)."""
    exp = dataclasses.replace(_experiment(), taus=(1,), seeds=3)

    def runner(ctx: Any, run: RunSpec, folder: Path) -> dict[str, Any]:
        lucky = run.lr == 0.01 and run.seed == 0
        error = 0.01 if lucky else (0.5 if run.lr == 0.01 else 0.3 - run.lr)
        summary = {"method": run.method, "tau": run.tau, "workers": run.workers, "lr": run.lr,
                   "seed": run.seed, "best_center_test_error": error,
                   "center_test_error": error}  # fmt: skip
        (folder / "summary.json").write_text(json.dumps(summary))
        return summary

    res = run_sweep(exp, tmp_path, runtime="sim", step_time=0.01, max_extensions=1,
                    runner=runner)  # fmt: skip
    key = ("easgd", 1, 2)
    assert res.extended[key] == [0.2]  # up: the median of 0.1 is best; never down to 0.005
    assert res.best[key]["lr"] == 0.2 and res.edge(key) == "top"
    # The report, drawn from the same runs, picks the same rate and marks the same edge.
    from easgd.report import build_report, load_runs

    for run in tmp_path.glob("easgd_*"):
        summary = json.loads((run / "summary.json").read_text())
        (run / "config.json").write_text(json.dumps(summary))
        (run / "eval.jsonl").write_text("")
        (run / "metrics.jsonl").write_text("")
    (line,) = build_report(load_runs([tmp_path])).lines
    assert line.run.lr == 0.2 and line.edge == "top"


def test_the_sweep_judges_a_real_run_by_its_budget_as_the_report_does(tmp_path: Path) -> None:
    """A real run's final center is evaluated when its last worker stops, a little past the
    budget. The table reads evaluations up to the budget only; the sweep read the summary,
    so in the digits-hard-fig2 sweep MDOWNPOUR's median seed was best inside its grid by the
    summary (not extended) and on its bottom edge by the table."""
    exp = dataclasses.replace(_experiment(), taus=(1,), seeds=1)

    def runner(ctx: Any, run: RunSpec, folder: Path) -> dict[str, Any]:
        in_budget = 0.2 + run.lr  # within the budget: the smaller the rate the better
        past = 0.05 if run.lr == 0.02 else in_budget  # after it: 0.02 gets lucky
        summary = {"method": run.method, "tau": run.tau, "workers": run.workers, "lr": run.lr,
                   "seed": run.seed, "runtime": "real", "wall_seconds": 1.5,
                   "best_center_test_error": min(in_budget, past),
                   "center_test_error": past}  # fmt: skip
        (folder / "config.json").write_text(json.dumps(summary))
        (folder / "run.json").write_text(json.dumps({"runtime": "real", "train_budget": 1.0}))
        (folder / "metrics.jsonl").write_text(
            json.dumps({"event": "train_start", "wall": 100.0}) + "\n"
            + json.dumps({"event": "worker_done", "wall": 101.2}) + "\n"
        )  # fmt: skip
        (folder / "eval.jsonl").write_text(
            json.dumps({"wall": 100.9, "test_error": in_budget, "test_loss": 1.0}) + "\n"
        )
        (folder / "summary.json").write_text(json.dumps(summary))
        return summary

    res = run_sweep(exp, tmp_path, runtime="sim", step_time=0.01, max_extensions=1,
                    runner=runner)  # fmt: skip
    key = ("easgd", 1, 2)
    assert res.extended.get(key) == [0.005]  # the table's bottom edge, not the lucky 0.02
    assert res.best[key]["lr"] == 0.005 and res.edge(key) == "bottom"
    assert res.best[key]["best_center_test_error"] == pytest.approx(0.205)
    from easgd.report import build_report, load_runs

    (line,) = build_report(load_runs([tmp_path])).lines
    assert line.run.lr == 0.005 and line.edge == "bottom"
