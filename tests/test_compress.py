"""Compressed exchanges: the codecs, error feedback, the two-phase compressed sum, and the
compressed synchronous runs (real 2-rank processes) held bitwise against the simulator."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from easgd.algorithms import (
    CompressedSum,
    Hyperparams,
    compress_with_feedback_,
    simulate_compressed_sum,
)
from easgd.compress import CHUNK, codec
from easgd.sim import Quadratic, simulate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


@pytest.mark.parametrize("name", ["none", "bf16", "int8"])
def test_codecs_round_trip_within_their_precision(name: str) -> None:
    c = codec(name)
    v = torch.randn(4 * CHUNK, generator=torch.Generator().manual_seed(0)) * 3
    v[:CHUNK] = 0.0  # an all-zero chunk: scale 0, decoded exactly
    packed = torch.empty(c.packed_size(v.numel()), dtype=torch.uint8)
    c.encode(v, packed)
    back = torch.empty_like(v)
    c.decode(packed, back)
    err = (back - v).abs()
    if name == "none":
        assert torch.equal(back, v)
    elif name == "bf16":
        assert (err <= v.abs() * 2**-8).all()
    else:
        rows = v.view(-1, CHUNK).abs().amax(1, keepdim=True)
        assert (err.view(-1, CHUNK) <= rows / 127 / 2 * (1 + 1e-6)).all()
        assert torch.equal(back[:CHUNK], torch.zeros(CHUNK))
    assert {"none": 4.0, "bf16": 2.0, "int8": 1 + 4 / CHUNK}[name] == c.bytes_per_value()


def test_int8_needs_whole_chunks_and_unknown_codecs_are_refused() -> None:
    with pytest.raises(ValueError, match="whole chunks of 256"):
        codec("int8").packed_size(100)
    with pytest.raises(ValueError, match="compress='fp8'; choose one of none, bf16, int8"):
        codec("fp8")


@pytest.mark.parametrize("name", ["bf16", "int8"])
def test_error_feedback_loses_nothing_over_time(name: str) -> None:
    # What was sent over K exchanges sums to what was meant, up to the current residual.
    c = codec(name)
    gen = torch.Generator().manual_seed(1)
    residual = torch.zeros(CHUNK, dtype=torch.float64)
    packed = torch.empty(c.packed_size(CHUNK), dtype=torch.uint8)
    meant = torch.zeros(CHUNK, dtype=torch.float64)
    sent = torch.zeros(CHUNK, dtype=torch.float64)
    for _ in range(200):
        v = torch.randn(CHUNK, generator=gen, dtype=torch.float64) * 1e-3
        meant += v
        compress_with_feedback_(v, residual, c, packed)
        sent += v  # v is now what crossed the wire
    torch.testing.assert_close(sent + residual, meant, rtol=0, atol=1e-12)
    assert residual.abs().max() < 1e-4  # bounded: one quantization step, not a drift


@pytest.mark.parametrize("name", ["bf16", "int8"])
def test_compressed_sum_is_the_same_on_every_rank_and_close_to_the_sum(name: str) -> None:
    world, n = 3, 1000  # shards padded to whole chunks
    gen = torch.Generator().manual_seed(2)
    vectors = [torch.randn(n, generator=gen) for _ in range(world)]
    exact = torch.stack(vectors).sum(0)
    sums = [CompressedSum(codec(name), n, world, torch.float32) for _ in range(world)]
    outs = [v.clone() for v in vectors]
    simulate_compressed_sum(sums, outs)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    tol = 0.05 if name == "int8" else 0.03
    assert (outs[0] - exact).abs().max() < tol * exact.abs().max()
    # Bytes one rank sends: 2 (p-1)/p of a compressed vector.
    per_rank = 2 * (world - 1) * sums[0].shard_bytes
    assert per_rank <= 2 * (world - 1) / world * codec(name).packed_size(sums[0].shard * world)


@pytest.mark.parametrize("name", ["bf16", "int8"])
def test_simulated_stationary_center_variance_matches_uncompressed(name: str) -> None:
    # The target: stationary center variance within 5% of the uncompressed run.
    def variance(compress: str) -> tuple[float, int]:
        hp = Hyperparams(method="easgd", lr=0.1, tau=3, workers=4)
        r = simulate(Quadratic(sigma=0.5, x0=1.0, dim=1024), hp, schedule="sync", steps=1500,
                     seed=0, compress=compress, trajectory=True)  # fmt: skip
        tail = torch.stack(r.center_trajectory[500:])
        return float(tail.var(0).mean()), r.bytes_moved

    base, base_bytes = variance("none")
    var, nbytes = variance(name)
    assert abs(var - base) <= 0.05 * base
    assert base_bytes / nbytes >= (3.5 if name == "int8" else 2.0)


def test_compression_is_refused_where_it_does_not_apply() -> None:
    hp = Hyperparams(method="easgd", workers=2)
    with pytest.raises(ValueError, match="asynchronous compressed exchange is not implemented"):
        simulate(Quadratic(dim=4), hp, schedule="async", steps=2, compress="int8")
    from easgd.optim import ElasticAveraging

    params = torch.nn.Linear(2, 1).parameters()
    with pytest.raises(ValueError, match="compress='int8' with method='localsgd'"):
        ElasticAveraging(torch.optim.SGD(params, lr=0.1), method="localsgd", compress="int8",
                         enabled=False)  # fmt: skip


def test_train_config_refuses_compress_outside_synchronous_easgd() -> None:
    from easgd.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="--compress int8 with --method easgd in mode async"):
        TrainConfig(method="easgd", compress="int8", steps=10)
    with pytest.raises(ConfigError, match="--compress int8 with --method localsgd"):
        TrainConfig(method="localsgd", compress="int8", steps=10)
    with pytest.raises(ConfigError, match="compress='fp8'"):
        TrainConfig(method="easgd", mode="sync", compress="fp8", steps=10)
    assert TrainConfig(method="eamsgd", mode="sync", compress="bf16", steps=10).compress == "bf16"


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("name", "method"), [("bf16", "easgd"), ("int8", "eamsgd")])
def test_compressed_wrapper_equals_the_simulator_bitwise(name: str, method: str) -> None:
    from test_optim_sync import QUADRATIC, torchrun_lines

    (out,) = torchrun_lines(QUADRATIC, "--method", method, "--steps", "20", "--tau", "3",
                            "--compress", name, "--dim", "300")  # fmt: skip
    kw = {"momentum": 0.9} if method == "eamsgd" else {}
    hp = Hyperparams(method=method, lr=0.1, tau=3, workers=2, **kw)
    sim = simulate(Quadratic(sigma=0.5, x0=1.0, dim=300), hp, schedule="sync", steps=20,
                   seed=0, compress=name)  # fmt: skip
    assert torch.equal(torch.tensor(out["center"], dtype=torch.float64), sim.center)
    uncompressed = simulate(Quadratic(sigma=0.5, x0=1.0, dim=300), hp, schedule="sync",
                            steps=20, seed=0)  # fmt: skip
    assert not torch.equal(sim.center, uncompressed.center)  # compression did something


@pytest.mark.timeout(400)
def test_easgd_train_compressed_moves_fewer_bytes_to_the_same_center(tmp_path: Path) -> None:
    import json
    import subprocess

    def run(name: str) -> dict:
        out = tmp_path / name
        proc = subprocess.run(
            [sys.executable, "-m", "easgd", "train", "--method", "easgd", "--mode", "sync",
             "--workers", "2", "--steps", "60", "--tau", "3", "--compress", name,
             "--out", str(out), "--quiet"],
            capture_output=True, text=True, cwd=ROOT, timeout=360,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        config = json.loads((out / "config.json").read_text())
        assert config["compress"] == name
        return json.loads((out / "summary.json").read_text())

    base, bf16, int8 = run("none"), run("bf16"), run("int8")
    assert base["exchanges"] == bf16["exchanges"] == int8["exchanges"] == 40
    assert base["bytes_sent"] / bf16["bytes_sent"] >= 2.0
    assert base["bytes_sent"] / int8["bytes_sent"] >= 3.5
    for run_ in (bf16, int8):
        assert abs(run_["center_test_error"] - base["center_test_error"]) <= 0.05
