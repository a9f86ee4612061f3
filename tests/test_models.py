"""Networks: shapes against the paper's layer strings, counts, init, validation, the CLI."""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from typing import Any

import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from easgd.cli import main
from easgd.models import MODELS, build_model, count_parameters, describe_models
from easgd.shapes import accepted_image_sizes, feature_shapes, size_ranges

torch.set_num_threads(1)

# The paper's layer strings (Zhang et al. 2015, Sec. 5.1): (maps, side) after each layer.
CIFAR_PAPER = "(3,28) C(64,24) P(64,12) C(128,8) P(128,4) C(64,2) D(256,1) S(10,1)"
IMAGENET_PAPER = (
    "(3,221) C(96,108) P(96,36) C(256,32) P(256,16) C(384,14) C(384,13) C(256,12) "
    "P(256,6) D(4096,1) D(4096,1) S(1000,1)"
)


def paper_layers(layout: str) -> list[tuple[str, tuple[int, ...]]]:
    """``"C(64,24)"`` -> ``("C", (64, 24, 24))``; D and S layers -> ``(c,)``; input dropped."""
    out: list[tuple[str, tuple[int, ...]]] = []
    for kind, c, y in re.findall(r"([CPDS]?)\((\d+),(\d+)\)", layout)[1:]:
        shape = (int(c),) if kind in "DS" else (int(c), int(y), int(y))
        out.append((kind, shape))
    return out


def layer_kind(name: str) -> str | None:
    """Our layer names -> the paper's letters (ReLU, dropout, flatten have none)."""
    for prefix, kind in (("conv", "C"), ("pool", "P"), ("fc", "D")):
        if name.startswith(prefix):
            return kind
    return None


def hooked_shapes(model: nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """Shapes (batch dropped) that a real forward pass produces after every layer."""
    seen: list[tuple[str, tuple[int, ...]]] = []
    handles = [
        layer.register_forward_hook(
            lambda _m, _i, out, name=name: seen.append((name, tuple(out.shape[1:])))
        )
        for name, layer in model.named_children()
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def as_paper(shapes: list[tuple[str, tuple[int, ...]]]) -> list[tuple[str, tuple[int, ...]]]:
    kinds = [(kind, s) for n, s in shapes if (kind := layer_kind(n)) is not None]
    # The last FC is the paper's S (softmax) layer; the softmax itself is in the loss.
    return [(k if i < len(kinds) - 1 else "S", s) for i, (k, s) in enumerate(kinds)]


# ---------------------------------------------------------------- shapes and sizes


@pytest.mark.parametrize("name", ["digits-cnn", "mlp", "cifar-paper", "lenet5-report"])
def test_output_shape_batch_of_two(name: str) -> None:
    model = build_model(name, seed=0)
    x = torch.randn(2, *MODELS[name].input_shape)
    assert model(x).shape == (2, 10)


def test_imagenet_output_shape_on_meta() -> None:
    model = build_model("imagenet-paper", device="meta")
    out = model(torch.empty(1, 3, 221, 221, device="meta"))
    assert out.shape == (1, 1000)


def test_cifar_paper_map_sizes_match_the_paper() -> None:
    model = build_model("cifar-paper", seed=0).eval()
    assert isinstance(model, nn.Sequential)
    expected = paper_layers(CIFAR_PAPER)
    assert as_paper(feature_shapes(model, (3, 28, 28))) == expected
    assert as_paper(hooked_shapes(model, torch.randn(2, 3, 28, 28))) == expected


def test_imagenet_paper_map_sizes_match_the_paper() -> None:
    model = build_model("imagenet-paper", device="meta")
    assert isinstance(model, nn.Sequential)
    expected = paper_layers(IMAGENET_PAPER)
    assert len(expected) == 11  # the paper's "11-layer" network
    assert as_paper(feature_shapes(model, (3, 221, 221))) == expected
    x = torch.empty(1, 3, 221, 221, device="meta")
    assert as_paper(hooked_shapes(model, x)) == expected


def test_feature_shapes_agrees_with_forward_on_every_layer() -> None:
    for name in ("digits-cnn", "mlp", "lenet5-report", "cifar-paper"):
        model = build_model(name, seed=0).eval()
        shape = MODELS[name].input_shape
        assert feature_shapes(model, shape) == hooked_shapes(model, torch.randn(2, *shape))


# Hand counts: conv = out*in*k*k + out, linear = out*in + out, BatchNorm = 2*channels.
PARAMETER_COUNTS = {
    "digits-cnn": (8 * 1 * 9 + 8) + (16 * 8 * 9 + 16) + (64 * 256 + 64) + (10 * 64 + 10),
    "mlp": (128 * 64 + 128) + (10 * 128 + 10),
    "cifar-paper": (64 * 3 * 25 + 64)  # conv 5x5
    + (128 * 64 * 25 + 128)  # conv 5x5
    + (64 * 128 * 9 + 64)  # conv 3x3
    + (256 * 256 + 256)  # D(256): 64*2*2 = 256 inputs
    + (10 * 256 + 10),  # S(10)
    "imagenet-paper": (96 * 3 * 49 + 96)  # conv 7x7 s2
    + (256 * 96 * 25 + 256)  # conv 5x5
    + (384 * 256 * 9 + 384)  # conv 3x3
    + (384 * 384 * 4 + 384)  # conv 2x2
    + (256 * 384 * 4 + 256)  # conv 2x2
    + (4096 * 256 * 36 + 4096)  # D(4096) on 256*6*6
    + (4096 * 4096 + 4096)  # D(4096)
    + (1000 * 4096 + 1000),  # S(1000)
    "lenet5-report": (30 * 1 * 25 + 30)
    + (40 * 30 * 25 + 40)
    + 2 * 40  # BatchNorm weight and bias (running stats are buffers)
    + (700 * 640 + 700)
    + (10 * 700 + 10),
}


def test_parameter_counts_match_hand_arithmetic() -> None:
    assert PARAMETER_COUNTS == {
        "digits-cnn": 18_346,
        "mlp": 9_610,
        "cifar-paper": 351_946,
        "imagenet-paper": 61_128_808,
        "lenet5-report": 486_610,
    }
    # The report claims 4,866,100: ten times the real count.
    assert PARAMETER_COUNTS["lenet5-report"] * 10 == 4_866_100
    for name, count in PARAMETER_COUNTS.items():
        assert count_parameters(build_model(name, device="meta")) == count, name
    assert {d["name"]: d["parameters"] for d in describe_models()} == PARAMETER_COUNTS


def test_lenet_batchnorm_buffers_are_not_parameters() -> None:
    model = build_model("lenet5-report", seed=0)
    assert sum(b.numel() for b in model.buffers()) == 40 + 40 + 1
    assert count_parameters(model) == PARAMETER_COUNTS["lenet5-report"]


def test_options_change_the_network() -> None:
    model = build_model("cifar-paper", num_classes=100, in_channels=1, seed=0)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 100)
    model = build_model("digits-cnn", image_size=28, seed=0)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    model = build_model("mlp", in_channels=3, image_size=5, num_classes=4, seed=0)
    assert model(torch.randn(2, 3, 5, 5)).shape == (2, 4)


# ---------------------------------------------------------------- init


def test_paper_bias_init() -> None:
    cifar = build_model("cifar-paper", seed=0)
    imagenet = build_model("imagenet-paper", seed=0)
    for model, value in ((cifar, 0.0), (imagenet, 0.1)):
        biases = [m.bias for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        assert len(biases) == (5 if model is cifar else 8)
        for b in biases:
            assert b is not None
            torch.testing.assert_close(b, torch.full_like(b, value), rtol=0, atol=0)
        # Weights keep the default (random) init.
        assert all(m.weight.std() > 0 for m in model.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("name", ["digits-cnn", "cifar-paper", "lenet5-report"])
def test_same_seed_same_parameters(name: str) -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    a = build_model(name, seed=7).state_dict()
    b = build_model(name, seed=7).state_dict()
    c = build_model(name, seed=8).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    # The global RNG is untouched by a seeded build.
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), before)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "resnet50"}, r"unknown model 'resnet50'; valid names: digits-cnn, mlp"),
        ({"name": "CIFAR-paper"}, r"unknown model 'CIFAR-paper'.*cifar-paper"),
        ({"name": "cifar-paper", "image_size": 32}, r"accepts image sizes 28-31"),
        ({"name": "cifar-paper", "image_size": 8}, r"\(3, 8, 8\).*accepts image sizes 28-31"),
        ({"name": "imagenet-paper", "image_size": 200}, r"accepts image sizes 221-244"),
        ({"name": "imagenet-paper", "image_size": 256}, r"expects 9216 features"),
        ({"name": "lenet5-report", "image_size": 32}, r"accepts image sizes 28-31"),
        ({"name": "digits-cnn", "image_size": 1}, r"at least 2x2"),
        ({"name": "mlp", "num_classes": 0}, r"num_classes=0"),
        ({"name": "mlp", "in_channels": -1}, r"in_channels=-1"),
        ({"name": "mlp", "image_size": 2.5}, r"image_size=2.5"),
        ({"name": "cifar-paper", "image_size": 30}, None),
        ({"name": "imagenet-paper", "image_size": 224, "device": "meta"}, None),
        ({"name": "mlp", "image_size": 1}, None),
    ],
)
def test_build_model_validation(kwargs: dict[str, Any], match: str | None) -> None:
    if match is None:
        build_model(**kwargs)
    else:
        with pytest.raises(ValueError, match=match):
            build_model(**kwargs)


def test_shape_calculator_lists_the_sizes_a_network_takes() -> None:
    skeleton = build_model("cifar-paper", device="meta")
    assert accepted_image_sizes(skeleton, 3, 112) == [28, 29, 30, 31]
    assert size_ranges([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10"
    assert size_ranges([5]) == "5"
    with pytest.raises(TypeError, match="cannot follow a Softmax layer"):
        feature_shapes(nn.Sequential(nn.Softmax(dim=1)), (4,))
    with pytest.raises(ValueError, match=r"layer 'fc' \(Linear\) expects 3 features, got 4"):
        feature_shapes(nn.Sequential(OrderedDict(fc=nn.Linear(3, 2))), (4,))


# ---------------------------------------------------------------- training


def test_digits_cnn_trains() -> None:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(digits.target)
    train, test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.2, random_state=0, stratify=digits.target
    )
    train_t, test_t = torch.as_tensor(train), torch.as_tensor(test)
    model = build_model("digits-cnn", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        batch = train_t[torch.randint(len(train_t), (32,), generator=gen)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
    with torch.no_grad():
        accuracy = (model(x[test_t]).argmax(1) == y[test_t]).float().mean().item()
    assert accuracy >= 0.90


# ---------------------------------------------------------------- CLI


def test_cli_models_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(MODELS)
    by_name = {r["name"]: r for r in rows}
    assert by_name["cifar-paper"]["input_shape"] == [3, 28, 28]
    assert by_name["imagenet-paper"]["parameters"] == 61_128_808
    assert by_name["imagenet-paper"]["num_classes"] == 1000
    assert all(r["description"] for r in rows)


def test_cli_models_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:4] == ["name", "input", "classes", "parameters"]
    assert "3x221x221" in out and "61128808" in out
