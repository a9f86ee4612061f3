"""Named experiments: the registry, run naming, dry runs, resuming, failures, lr selection."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest

from easgd.algorithms import METHODS
from easgd.cli import main
from easgd.experiments import (
    EXPERIMENTS,
    Experiment,
    MethodPlan,
    RunSpec,
    SimRuntime,
    get_experiment,
    run_sweep,
    select_best,
)
from easgd.runlog import (
    RunPaths,
    eval_errors,
    event_errors,
    summary_errors,
    write_summary,
)

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]


def _grid(name: str, **kw: Any) -> set[tuple[str, int, int]]:
    return {(r.method, r.tau, r.workers) for r in get_experiment(name).runs(**kw)}


# -- the registry ---------------------------------------------------------------------------


def test_paper_fig2_grid() -> None:
    exp = get_experiment("paper-fig2")
    grid = _grid("paper-fig2")
    for method in ("easgd", "eamsgd", "downpour", "adownpour", "mvadownpour"):
        assert {t for m, t, _ in grid if m == method} == {1, 4, 16, 64}
    assert {t for m, t, _ in grid if m == "mdownpour"} == {1}
    assert ("msgd", 1, 1) in grid and exp.reference == "msgd"
    assert {p for m, _, p in grid if m != "msgd"} == {4}
    assert (exp.dataset, exp.model, exp.panel) == ("cifar10", "cifar-paper", "tau")
    # The paper's hyperparameters (paper-spec 3).
    assert (exp.beta, exp.momentum, exp.batch_size) == (0.9, 0.99, 128)
    assert (exp.weight_decay, exp.moving_rate, exp.seeds) == (1e-4, 0.001, 3)
    assert "not published" in exp.notes


def test_paper_fig3_grid() -> None:
    grid = _grid("paper-fig3")
    assert {p for m, _, p in grid if m != "msgd"} == {4, 8, 16}
    assert {(m, t) for m, t, _ in grid} == {
        ("easgd", 10), ("eamsgd", 10), ("downpour", 1), ("mdownpour", 1), ("msgd", 1)
    }  # fmt: skip
    assert get_experiment("paper-fig3").panel == "workers"


def test_small_experiments() -> None:
    assert {p for m, _, p in _grid("digits-fig3") if m != "msgd"} == {2, 4, 8}
    assert {p for m, _, p in _grid("digits-fig2") if m != "msgd"} == {4}
    assert {t for m, t, _ in _grid("digits-fig2") if m == "mdownpour"} == {1}
    mnist = get_experiment("report-mnist")
    assert (mnist.dataset, mnist.model, mnist.reference) == ("mnist", "lenet5-report", "sgd")
    assert {t for m, t, _ in _grid("report-mnist") if m == "easgd"} == {1, 4, 16}
    assert get_experiment("digits-fig2").time_budget <= 10


def test_every_experiment_is_versioned_and_its_configs_validate(tmp_path: Path) -> None:
    for exp in EXPERIMENTS.values():
        assert isinstance(exp.version, str) and exp.version
        for run in exp.runs():
            cfg = exp.train_config(run, tmp_path / run.name, time_budget=1.0)
            hp = cfg.hyperparams()  # validates the method's hyperparameters
            assert hp.momentum == (0.99 if hp.spec.momentum_default else 0.0)
            assert cfg.seed == run.seed and cfg.weight_decay == exp.weight_decay


def _toy(*plans: MethodPlan, **kw: Any) -> Experiment:
    fields: dict[str, Any] = {
        "name": "toy", "version": "1", "description": "a test", "dataset": "digits",
        "model": "digits-cnn", "plans": plans, "taus": (4,), "workers": (2,), "panel": "tau",
        "time_budget": 0.12, "eval_interval": 0.05, "batch_size": 32,
    }  # fmt: skip
    return Experiment(**{**fields, **kw})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_method_gets_only_the_hyperparameters_it_uses(method: str, tmp_path: Path) -> None:
    exp = _toy(MethodPlan(method, lrs=(0.01,), lr=0.01, taus=(1,)))
    (run,) = exp.runs()
    cfg = exp.train_config(run, tmp_path, steps=3)
    spec = METHODS[method]
    for name in ("beta", "moving_rate", "momentum"):
        assert (getattr(cfg, name) is not None) == (
            spec.uses(name) and (name != "momentum" or spec.momentum_default > 0)
        ), name
    assert cfg.alpha is None  # alpha follows from beta / p
    cfg.hyperparams()  # a refused hyperparameter would raise here


def test_a_method_with_a_fixed_period_refuses_another() -> None:
    plan = MethodPlan("mdownpour", lrs=(0.001,), lr=0.001, taus=(4,))
    with pytest.raises(ValueError, match="toy: mdownpour runs with tau = 1 only"):
        _toy(plan)


def test_unknown_experiment_and_only() -> None:
    with pytest.raises(ValueError, match="no experiment named 'fig9'; choose one of"):
        get_experiment("fig9")
    with pytest.raises(ValueError, match="--only adam: not in experiment"):
        get_experiment("digits-fig2").runs(only=["adam"])


# -- runs -----------------------------------------------------------------------------------


def test_run_names_are_deterministic_and_distinct() -> None:
    run = RunSpec("eamsgd", 16, 4, 0.002, 1)
    assert run.name == "eamsgd_tau16_p4_lr0.002_s1"
    assert RunSpec("eamsgd", 16, 4, 0.002, 1).name == run.name
    runs = get_experiment("paper-fig2").runs()
    assert len({r.name for r in runs}) == len(runs)
    assert [r.name for r in runs] == [r.name for r in get_experiment("paper-fig2").runs()]


def test_grid_off_seeds_and_only() -> None:
    exp = get_experiment("digits-fig2")
    off = exp.runs(lr_grid=False)
    assert len(off) == len(_grid("digits-fig2"))
    assert len(exp.runs(seeds=3)) == 3 * len(exp.runs())
    only = exp.runs(only=["easgd", "msgd"], lr_grid=False)
    assert [r.name for r in only] == [
        "easgd_tau1_p4_lr0.03_s0", "easgd_tau4_p4_lr0.03_s0", "easgd_tau16_p4_lr0.03_s0",
        "easgd_tau64_p4_lr0.03_s0", "msgd_tau1_p1_lr0.001_s0",
    ]  # fmt: skip


def test_dry_run_lists_the_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["experiment", "digits-fig3", "--dry-run", "--out", str(tmp_path / "x")])
    out = capsys.readouterr().out
    runs = get_experiment("digits-fig3").runs()
    assert rc == 0
    assert all(r.name in out for r in runs)
    assert f"{len(runs)} runs" in out
    assert not (tmp_path / "x").exists()  # a dry run writes nothing


# -- the sweep ------------------------------------------------------------------------------


def _fake_runner(calls: list[str], fail: Collection[str] = ()) -> Any:
    def runner(ctx: Any, run: RunSpec, folder: Path) -> dict[str, Any]:
        calls.append(run.name)
        if run.name in fail:
            raise RuntimeError("worker 2 exited with status 1")
        summary = {"method": run.method, "tau": run.tau, "workers": run.workers, "lr": run.lr,
                   "best_center_test_error": 0.1 / run.lr if run.lr < 1 else 0.5,
                   "center_test_error": 0.2}  # fmt: skip
        (folder / "summary.json").write_text(json.dumps(summary))
        return summary

    return runner


def test_sweep_resumes_and_skips_done_runs(tmp_path: Path) -> None:
    exp = get_experiment("digits-fig2")
    kw: dict[str, Any] = {"runtime": "sim", "only": ["easgd"], "step_time": 0.01,
                          "max_extensions": 0}  # fmt: skip
    calls: list[str] = []
    first = run_sweep(exp, tmp_path, runner=_fake_runner(calls), **kw)
    n = len(exp.runs(only=["easgd"]))
    assert len(calls) == n and len(first.done) == n and not first.skipped
    header = json.loads((tmp_path / "experiment.json").read_text())
    assert [r["name"] for r in header["runs"]] == calls
    assert header["version"] == exp.version and header["runtime"] == "sim"

    calls.clear()
    again = run_sweep(exp, tmp_path, runner=_fake_runner(calls), **kw)
    assert calls == [] and len(again.skipped) == n  # nothing runs twice

    # An interrupted run (no summary.json) is cleared and run again; the others are kept.
    victim = tmp_path / "easgd_tau16_p4_lr0.1_s0"
    (victim / "summary.json").unlink()
    (victim / "eval.jsonl").write_text("half a line")
    run_sweep(exp, tmp_path, runner=_fake_runner(calls), **kw)
    assert calls == [victim.name]
    assert not (victim / "eval.jsonl").exists()


def test_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    exp = get_experiment("digits-fig2")
    calls: list[str] = []
    bad = "easgd_tau4_p4_lr0.03_s0"
    res = run_sweep(exp, tmp_path, runtime="sim", only=["easgd"], step_time=0.01,
                    max_extensions=0, runner=_fake_runner(calls, {bad}))  # fmt: skip
    assert list(res.failed) == [bad] and "status 1" in res.failed[bad]
    assert len(res.done) == len(calls) - 1
    failed = json.loads((tmp_path / bad / "failed.json").read_text())
    assert "RuntimeError: worker 2 exited" in failed["error"]
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert bad in sweep["failed"]
    # The next sweep retries only the failed run.
    calls.clear()
    res = run_sweep(exp, tmp_path, runtime="sim", only=["easgd"], step_time=0.01,
                    max_extensions=0, runner=_fake_runner(calls))  # fmt: skip
    assert calls == [bad] and not res.failed


def test_cli_exit_status_counts_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[str] = []
    bad = {"easgd_tau1_p4_lr0.03_s0", "easgd_tau64_p4_lr0.1_s0"}
    fake = _fake_runner(calls, bad)
    monkeypatch.setattr(
        SimRuntime, "__call__", lambda self, ctx, run, folder: fake(ctx, run, folder)
    )
    rc = main(["experiment", "digits-fig2", "--runtime", "sim", "--only", "easgd",
               "--out", str(tmp_path), "--step-time", "0.01", "--lr-extensions", "0"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 2
    assert "2 failed of 8" in captured.out
    assert "[8/8]" in captured.err and "FAILED" in captured.err


def test_out_folder_of_another_setting_is_refused(tmp_path: Path) -> None:
    exp = get_experiment("digits-fig2")
    run_sweep(exp, tmp_path, runtime="sim", only=["msgd"], runner=_fake_runner([]))
    with pytest.raises(ValueError, match=r"holds scale=1\.0"):
        run_sweep(exp, tmp_path, runtime="sim", scale=0.5, only=["msgd"], runner=_fake_runner([]))
    with pytest.raises(ValueError, match="holds runtime='sim'"):
        run_sweep(exp, tmp_path, runtime="real", only=["msgd"], runner=_fake_runner([]))


def test_select_best_per_method_tau_and_p() -> None:
    def s(method: str, tau: int, lr: float, best: float, final: float = 0.5) -> dict[str, Any]:
        return {"method": method, "tau": tau, "workers": 4, "lr": lr,
                "best_center_test_error": best, "center_test_error": final}  # fmt: skip

    runs = [
        s("easgd", 1, 0.05, 0.04), s("easgd", 1, 0.1, 0.03), s("easgd", 1, 0.2, math.nan),
        s("easgd", 4, 0.05, 0.02, 0.03), s("easgd", 4, 0.1, 0.02, 0.025),
        s("downpour", 4, 0.2, math.nan), s("downpour", 4, 0.1, 0.9),
    ]  # fmt: skip
    best = select_best(runs)
    assert set(best) == {("easgd", 1, 4), ("easgd", 4, 4), ("downpour", 4, 4)}
    assert best[("easgd", 1, 4)]["lr"] == 0.1
    assert best[("easgd", 4, 4)]["lr"] == 0.1  # tie on best error: the lower final error
    assert best[("downpour", 4, 4)]["lr"] == 0.1  # a diverged (NaN) run ranks last


def test_sim_runtime_writes_a_run_directory(tmp_path: Path) -> None:
    exp = get_experiment("digits-fig2")
    res = run_sweep(exp, tmp_path, runtime="sim", scale=0.02, only=["eamsgd"], lr_grid=False,
                    step_time=0.01, seeds=1)  # fmt: skip
    assert not res.failed and len(res.done) == 4
    run = tmp_path / "eamsgd_tau4_p4_lr0.001_s0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["runtime"] == "sim" and summary["method"] == "eamsgd"
    assert summary["local_steps"] == 4 * 12  # 0.12 virtual s / 0.01 s per step, 4 workers
    assert summary["exchanges"] == 4 * 3  # every tau = 4 steps from t = 0
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert evals[0]["wall"] == 0 and {"wall", "test_loss", "test_error"} <= set(evals[0])
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {e["worker"] for e in steps} == {0, 1, 2, 3}
    config = json.loads((run / "config.json").read_text())
    assert (config["tau"], config["workers"], config["steps"]) == (4, 4, 12)
    assert json.loads((run / "run.json").read_text())["train_budget"] == pytest.approx(0.12)
    # The simulated run directory holds to the run directory's schema, as a real one does.
    assert summary_errors(summary) == []
    assert [p for e in evals for p in eval_errors(e)] == []
    assert [p for e in steps for p in event_errors(e)] == []


def test_sim_runtime_runs_a_synchronous_only_method_on_the_synchronous_schedule(
    tmp_path: Path,
) -> None:
    exp = _toy(MethodPlan("localsgd", lrs=(0.05,), lr=0.05))
    res = run_sweep(exp, tmp_path, runtime="sim", step_time=0.01)
    assert not res.failed, res.failed
    summary = json.loads((tmp_path / "localsgd_tau4_p2_lr0.05_s0" / "summary.json").read_text())
    assert summary["mode"] == "sync" and summary["runtime"] == "sim"
    assert summary["local_steps"] == 2 * 12


def test_real_run_gets_the_budget_and_start_up_is_reported_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget counts from the first training step: no allowance, no second launch."""
    import easgd.launch

    budgets: list[float | None] = []

    def fake_launch(cfg: Any, progress: Any = None) -> dict[str, Any]:
        budgets.append(cfg.time_budget)
        startup = 20.0  # a slow start-up: it must not change the budget
        return write_summary(
            RunPaths(cfg.out), cfg, runtime="real", center={"loss": 0.3, "error": 0.1},
            curve=[0.5, 0.1], wall_seconds=startup + cfg.time_budget,
            startup_seconds=startup, train_seconds=cfg.time_budget, exchanges=0,
            bytes_sent=0, bytes_received=0, local_steps=0,
        )  # fmt: skip

    monkeypatch.setattr(easgd.launch, "launch_local", fake_launch)
    exp = get_experiment("digits-fig2")
    res = run_sweep(exp, tmp_path, only=["easgd"], lr_grid=False, seeds=1)
    assert not res.failed and len(res.done) == 4
    assert budgets == [exp.time_budget] * 4
    run = RunPaths(tmp_path / "easgd_tau1_p4_lr0.03_s0")
    summary = json.loads(run.summary.read_text())
    assert summary["runtime"] == "real" and summary["experiment"] == "digits-fig2"
    assert (summary["startup_seconds"], summary["train_seconds"]) == (20.0, 6.0)
    info = json.loads(run.run_info.read_text())
    assert info["train_budget"] == 6.0 and "startup_allowance" not in info


@pytest.mark.timeout(300)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_whole_sweep_not_one_run(tmp_path: Path, signum: int) -> None:
    # Before, the run's launcher turned the signal into an interrupted run, the sweep
    # recorded it as failed and started the next run: the sweep ignored Ctrl-C and SIGTERM.
    out = tmp_path / "sweep"
    proc = subprocess.Popen(
        [sys.executable, "-m", "easgd", "experiment", "digits-fig2", "--scale", "0.05",
         "--only", "easgd", "--lr-grid", "off", "--quiet", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        start_new_session=True,
    )  # fmt: skip
    try:
        first = out / "easgd_tau1_p4_lr0.03_s0" / "metrics.jsonl"
        while not (first.exists() and '"train_start"' in first.read_text()):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.05)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signum, stderr[-2000:]
    assert "interrupted during run easgd_tau1_p4_lr0.03_s0" in stderr
    started = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name.startswith("easgd"))
    assert started == ["easgd_tau1_p4_lr0.03_s0"]  # no run after the interrupted one
