"""``easgd train`` on your own model and data: ``--model MODULE:FUNCTION``, ``--dataset
MODULE:FUNCTION`` and ``npz:PATH``, and ``--no-verify`` for your own files of the built-in sets.

The module files, the ``.npz`` file and the IDX files are written into ``tmp_path``; nothing is
downloaded. The error cases run the preflight alone (in this process, nothing spawned); the
end-to-end runs are the real command in a subprocess, a few steps with two workers, bounded by
the run itself (and pytest's timeout), never by a wall-clock allowance.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from easgd.cli import build_parser, main
from easgd.cli.train import _apply_config_file, config_from_args, resume_config
from easgd.config import ConfigError, TrainConfig
from easgd.data import ChecksumError, custom, load_dataset
from easgd.data.cifar import CIFAR10_MEMBERS
from easgd.data.custom import (
    SpecError,
    absolute_spec,
    build_custom_model,
    is_custom,
    load_custom_dataset,
)
from easgd.preflight import PreflightError, check_train

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)

#: A user's module: a network taking its input's shape, data sets in every accepted form,
#: and the mistakes the preflight must name.
MODULE = """
import numpy as np
import torch
from torch import nn


def build(in_channels, height, width, num_classes):
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * height * width, num_classes),
    )


def build_any(**kwargs):
    c, h, w = kwargs["input_shape"]
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, kwargs["num_classes"]))


class Net(nn.Module):
    def __init__(self, in_channels, image_size, num_classes=3):
        super().__init__()
        self.fc = nn.Linear(in_channels * image_size * image_size, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _arrays(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 5, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()  # 3 classes
    return x[:96], y[:96], x[96:], y[96:]


def four():
    return _arrays()


def pairs():
    a, b, c, d = _arrays()
    return (a, b), (c, d)


def as_dict():
    a, b, c, d = _arrays()
    return {"x_train": a.numpy(), "y_train": b.numpy(), "x_test": c.numpy(), "y_test": d.numpy()}


class Items(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class Stream(torch.utils.data.IterableDataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x.numpy(), self.y.numpy()))


def torch_sets():
    a, b, c, d = _arrays()
    return Items(a, b), Stream(c, d)


def with_data_dir(data_dir):
    assert data_dir == "wanted"
    return _arrays()


class DataDependent(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.fc = nn.Linear(30, num_classes)

    def forward(self, x):
        if float(x.abs().sum()) >= 0:  # a value: no meta kernel can give it
            return self.fc(x.flatten(1))
        return -self.fc(x.flatten(1))


# ---- mistakes ----
NOT_CALLABLE = 3


def returns_int():
    return 3


def raises(num_classes):
    raise RuntimeError("boom")


def needs_depth(depth, num_classes):
    return nn.Linear(2, num_classes)


def narrow(in_channels, height, width):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * height * width, 2))


def wrong_input(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(7, num_classes))


def no_parameters():
    return nn.Flatten()


def returns_tuple(in_channels, height, width, num_classes):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(in_channels * height * width, num_classes)

        def forward(self, x):
            return self.fc(x.flatten(1)), x
    return Two()


def _randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _rand(*shape):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(1))


def _replace(**changes):
    a, b, c, d = _arrays()
    parts = {"x_train": a, "y_train": b, "x_test": c, "y_test": d, **changes}
    return parts


def float_labels():
    return _replace(y_train=_rand(96))


def lengths_differ():
    return _replace(y_train=torch.zeros(95, dtype=torch.long))


def negative_label():
    return _replace(y_test=-torch.ones(24, dtype=torch.long))


def label_out_of_range():
    return {**_replace(), "num_classes": 2}


def flat_images():
    return _replace(x_train=_randn(96, 30))


def five_d_images():
    return _replace(x_train=_randn(96, 1, 1, 6, 5))


def int64_images():
    return _replace(x_train=torch.zeros(96, 1, 6, 5, dtype=torch.int64))


def nan_images():
    x = _randn(96, 1, 6, 5)
    x[3, 0, 0, 0] = float("nan")
    return _replace(x_train=x)


def shapes_differ():
    return _replace(x_test=_randn(24, 1, 5, 6))


def one_hot():
    return _replace(y_train=torch.nn.functional.one_hot(torch.arange(96) % 3))


def one_class():
    return _replace(y_train=torch.zeros(96, dtype=torch.long),
                    y_test=torch.zeros(24, dtype=torch.long))


def tiny():
    return _replace(x_train=_randn(96, 1, 1, 5), x_test=_randn(24, 1, 1, 5))


def unseeded():
    x = torch.randn(120, 1, 4, 4)  # the global RNG: other data in every process
    return x[:96], torch.arange(96) % 2, x[96:], torch.arange(24) % 2


def three_things():
    return 1, 2, 3


class Triples(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.zeros(1, 6, 5), 0, "extra"


def triples():
    return Triples(), Triples()


class Ragged(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.zeros(1, 6, 5 + i), i % 2


def ragged():
    return Ragged(), Ragged()
"""


@pytest.fixture
def user(tmp_path: Path) -> Path:
    """The folder of the user's files: ``mynet.py`` (above) and ``digits.npz``."""
    (tmp_path / "mynet.py").write_text(MODULE)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (150, 8, 8), dtype=np.uint8)  # (N, H, W) pixels
    y = (x.reshape(150, -1).mean(1) > 127).astype(np.int64)
    np.savez(tmp_path / "data.npz", x_train=x[:120], y_train=y[:120], x_test=x[120:],
             y_test=y[120:])  # fmt: skip
    return tmp_path


def _cfg(out: Path, **fields: Any) -> TrainConfig:
    return TrainConfig(workers=2, steps=8, tau=2, out=str(out), **fields)


# ------------------------------------------------------------------------------------------
# Loading: every form of data gives the same tensors; the model is the same in every process
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["four", "pairs", "as_dict", "torch_sets"])
def test_every_form_of_a_dataset_function_gives_the_same_tensors(user: Path, form: str) -> None:
    reference = load_custom_dataset(f"{user}/mynet.py:four")
    data = load_custom_dataset(f"{user}/mynet.py:{form}")
    for name in ("train_x", "train_y", "test_x", "test_y"):
        torch.testing.assert_close(getattr(data, name), getattr(reference, name), rtol=0, atol=0)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert (data.num_classes, data.in_channels, tuple(data.test_x.shape[2:])) == (3, 1, (6, 5))
    assert data.mean == (0.0,) and data.std == (1.0,)  # floats are used as given


def test_npz_pixels_are_scaled_and_normalized_like_the_built_in_sets(user: Path) -> None:
    data = load_custom_dataset(f"npz:{user}/data.npz")
    assert data.train_x.shape == (120, 1, 8, 8) and data.test_x.shape == (30, 1, 8, 8)
    assert data.num_classes == 2 and data.image_size == 8
    assert abs(float(data.train_x.mean())) < 1e-5
    assert float(data.train_x.std()) == pytest.approx(1.0, abs=1e-3)
    raw = np.load(user / "data.npz")["x_test"][0, 0, 0] / 255.0
    assert float(data.test_x[0, 0, 0, 0]) == pytest.approx((raw - data.mean[0]) / data.std[0])


def test_pil_images_of_a_torch_dataset_are_read_channels_first(
    user: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image_module = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (10, 6, 5, 3), dtype=np.uint8)  # (N, H, W, C)

    class Pictures(torch.utils.data.Dataset[Any]):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int) -> tuple[Any, int]:
            return image_module.fromarray(pixels[i]), i % 2

    (user / "pictures.py").write_text("SETS = None\ndef sets():\n    return SETS\n")
    module = custom._import_file(str(user / "pictures.py"), "--dataset", "x")
    monkeypatch.setattr(module, "SETS", (Pictures(), Pictures()), raising=False)
    data = load_custom_dataset(f"{user}/pictures.py:sets")
    assert data.train_x.shape == (10, 3, 6, 5) and data.num_classes == 2
    expected = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(data.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.std).view(1, 3, 1, 1)
    torch.testing.assert_close(data.train_x, (expected - mean) / std)


def test_a_dataset_function_gets_data_dir_when_it_names_it(user: Path) -> None:
    data = load_custom_dataset(f"{user}/mynet.py:with_data_dir", data_dir="wanted")
    assert len(data.train_y) == 96


def test_the_model_is_the_same_for_one_seed_and_leaves_the_global_rng_alone(user: Path) -> None:
    state = torch.random.get_rng_state()
    one = build_custom_model(f"{user}/mynet.py:build", (1, 6, 5), 3, seed=7)
    two = build_custom_model(f"{user}/mynet.py:build", (1, 6, 5), 3, seed=7)
    other = build_custom_model(f"{user}/mynet.py:build", (1, 6, 5), 3, seed=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    for a, b in zip(one.state_dict().values(), two.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(one[0].weight, other[0].weight)
    # **kwargs gets every argument; a class is a callable returning a module.
    assert build_custom_model(f"{user}/mynet.py:build_any", (2, 3, 4), 5)(
        torch.zeros(1, 2, 3, 4)
    ).shape == (1, 5)
    assert build_custom_model(f"{user}/mynet.py:Net", (1, 4, 4), 3).fc.in_features == 16


def test_a_large_network_is_checked_on_the_meta_device(
    user: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(custom, "REAL_CHECK_PARAMETERS", 0)  # every network is "large"
    built: list[str] = []
    real = custom.build_custom_model

    def spy(*args: Any, **kwargs: Any) -> torch.nn.Module:
        built.append(kwargs.get("device") or "cpu")
        return real(*args, **kwargs)

    monkeypatch.setattr(custom, "build_custom_model", spy)
    net = real(f"{user}/mynet.py:build", (1, 6, 5), 3)
    count = sum(p.numel() for p in net.parameters())
    assert custom.check_custom_model(f"{user}/mynet.py:build", (1, 6, 5), 3, dataset="d") == count
    assert built == ["meta"]
    # A forward that reads a value cannot run on the meta device: checked on the CPU.
    assert custom.check_custom_model(f"{user}/mynet.py:DataDependent", (1, 6, 5), 3,
                                     dataset="d") == 30 * 3 + 3  # fmt: skip
    assert built[-2:] == ["meta", "cpu"]
    with pytest.raises(SpecError, match=r"mat1 and mat2 shapes cannot be multiplied"):
        custom.check_custom_model(f"{user}/mynet.py:wrong_input", (1, 6, 5), 3, dataset="d")


def test_relative_paths_become_absolute_in_the_config(
    user: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(user)
    cfg = _cfg(user / "run", model="./mynet.py:build", dataset="npz:data.npz")
    assert cfg.model == f"{user}/mynet.py:build"
    assert cfg.dataset == f"npz:{user}/data.npz"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg.resolved()
    assert absolute_spec("mypkg.nets:build", "--model") == "mypkg.nets:build"
    assert not is_custom("mnist") and is_custom("a:b") and is_custom("npz:x")
    assert _cfg(user / "run", dataset="npz:data.npz").to_dict()["model"] == "mlp"


def test_an_importable_module_name_is_found_from_the_current_directory(
    user: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = user / "userpkg_own_model_test"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(MODULE)
    monkeypatch.chdir(user)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(user))])
    net = build_custom_model("userpkg_own_model_test.nets:build", (1, 6, 5), 3, seed=0)
    assert net[-1].out_features == 3


def test_config_file_and_resume_take_the_specs_as_the_flags_do(
    user: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(user)
    (user / "run.toml").write_text(
        'model = "./mynet.py:build"\ndataset = "./mynet.py:four"\nno_verify = true\nsteps = 4\n'
    )
    args = build_parser().parse_args(["train", "--config", "run.toml", "--out", "r"])
    _apply_config_file(args)
    cfg = config_from_args(args)
    assert (cfg.model, cfg.dataset, cfg.no_verify) == (
        f"{user}/mynet.py:build", f"{user}/mynet.py:four", True,
    )  # fmt: skip
    # A run to resume: its config.json and a checkpoint file.
    run = user / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    (run / "checkpoints" / "worker-0.pt").write_bytes(b"x")
    same = build_parser().parse_args(
        ["train", "--resume", "r", "--model", "./mynet.py:build", "--steps", "8"]
    )
    assert resume_config(same).model == cfg.model
    other = build_parser().parse_args(["train", "--resume", "r", "--model", "./mynet.py:Net"])
    with pytest.raises(ValueError, match=r"--model \./mynet\.py:Net would change the experiment"):
        resume_config(other)


# ------------------------------------------------------------------------------------------
# The preflight: what fits is measured, what does not is named (nothing spawned or written)
# ------------------------------------------------------------------------------------------


def test_preflight_of_your_own_model_and_data(user: Path) -> None:
    checked = check_train(_cfg(user / "run", model=f"{user}/mynet.py:build",
                               dataset=f"{user}/mynet.py:pairs"))  # fmt: skip
    net = build_custom_model(f"{user}/mynet.py:build", (1, 6, 5), 3)
    assert checked.parameters == sum(p.numel() for p in net.parameters())
    assert (checked.input_shape, checked.num_classes, checked.train_size) == ((1, 6, 5), 3, 96)
    assert checked.data_files == (user / "mynet.py",)
    npz = check_train(_cfg(user / "run", dataset=f"npz:{user}/data.npz"))
    assert (npz.model, npz.input_shape, npz.data_files) == ("mlp", (1, 8, 8), (user / "data.npz",))
    mlp = check_train(_cfg(user / "run", dataset=f"{user}/mynet.py:four"))  # not square
    assert (mlp.model, mlp.parameters) == ("mlp", 30 * 128 + 128 + 128 * 3 + 3)
    digits = check_train(_cfg(user / "run", model=f"{user}/mynet.py:build"))
    assert (digits.dataset, digits.input_shape, digits.num_classes) == ("digits", (1, 8, 8), 10)
    assert not (user / "run").exists()


_M, _D, _DIR = "--model", "--dataset", "--data-dir"
#: (dataset, model, data_dir, the flag named, what the message says)
# fmt: off
ERRORS = [
    ("digits", "missing.py:build", None, _M, r"missing\.py does not exist; give the path"),
    ("digits", "syntax.py:f", None, _M, r"importing .*syntax\.py failed: SyntaxError"),
    ("digits", "broken.py:f", None, _M, r"importing .*broken\.py failed: ModuleNotFoundError: "
     r"No module named 'not_a_package_xyz' \(broken\.py:1\); install not_a_package_xyz"),
    ("digits", "no_such_module_xyz:build", None, _M, r"no module named no_such_module_xyz"),
    ("digits", "mynet.py:missing", None, _M, r"has no attribute missing; it has .*build"),
    ("digits", "mynet.py:NOT_CALLABLE", None, _M, r"NOT_CALLABLE is an int, not a function"),
    ("digits", "mynet.py:returns_int", None, _M, r"returned an int, not a torch\.nn\.Module"),
    ("digits", "mynet.py:raises", None, _M, r"raised RuntimeError: boom \(mynet\.py:\d+\)"),
    ("digits", "mynet.py:needs_depth", None, _M, r"it needs depth, which easgd does not give"),
    ("digits", "mynet.py:narrow", None, _M, r"output of shape \(2, 2\); it must be logits "
     r"\(2, 10\)"),
    ("digits", "mynet.py:wrong_input", None, _M, r"does not take the 1x8x8 images of --dataset "
     r"digits: RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
    ("digits", "mynet.py:no_parameters", None, _M, r"has no parameters"),
    ("digits", "mynet.py:returns_tuple", None, _M, r"returns a tuple, not a tensor of logits"),
    ("mynet.py:tiny", "digits-cnn", None, _M, r"--model digits-cnn does not take the 1x1x5 "
     r"images of --dataset .*mynet\.py:tiny: needs an image of at least 2x2"),
    ("mynet.py:float_labels", None, None, _D, r"y_train is torch\.float32; labels must be "
     r"integer"),
    ("mynet.py:lengths_differ", None, None, _D, r"x_train holds 96 images but y_train 95 "
     r"labels"),
    ("mynet.py:negative_label", None, None, _D, r"y_test holds label -1"),
    ("mynet.py:label_out_of_range", None, None, _D, r"holds label 2 but num_classes is 2"),
    ("mynet.py:flat_images", None, None, _D, r"x_train has shape \(96, 30\); images must be "
     r"\(N, H, W\) or \(N, C, H, W\); reshape flat features to \(N, 1, 1, D\)"),
    ("mynet.py:five_d_images", None, None, _D, r"x_train has shape \(96, 1, 1, 6, 5\)"),
    ("mynet.py:int64_images", None, None, _D, r"x_train is torch\.int64; images must be uint8"),
    ("mynet.py:nan_images", None, None, _D, r"x_train holds 1 NaN or infinite values"),
    ("mynet.py:shapes_differ", None, None, _D, r"train images are 1x6x5 but the test images "
     r"1x5x6"),
    ("mynet.py:one_hot", None, None, _D, r"y_train has shape \(96, 3\).*argmax"),
    ("mynet.py:one_class", None, None, _D, r"every label is 0: one class"),
    ("mynet.py:unseeded", None, None, _D, r"two calls returned different train_x: every "
     r"process of the run calls it.*torch\.Generator\(\)\.manual_seed\(0\)"),
    ("mynet.py:three_things", None, None, _D, r"returned a tuple of 3 items; return "
     r"\(train_x, train_y, test_x, test_y\)"),
    ("mynet.py:triples", None, None, _D, r"item 0 of its train set is a tuple of 3; each item "
     r"must be an \(image, label\) pair"),
    ("mynet.py:ragged", None, None, _D, r"image 1 of its train set has shape \(1, 6, 6\) but "
     r"image 0 has \(1, 6, 5\)"),
    ("mynet.py:four", None, "elsewhere", _DIR, r"takes no data_dir argument; drop --data-dir"),
    ("data.npz", None, None, _D, r"not a data set easgd knows; .* give your own: "
     r"npz:data\.npz or MODULE:FUNCTION"),
    ("npz:missing.npz", None, None, _D, r"missing\.npz does not exist"),
    ("npz:mynet.py", None, None, _D, r"mynet\.py is not an \.npz file"),
    ("npz:keys.npz", None, None, _D, r"the file has x_train, y_train but no x_test, y_test"),
    ("npz:data.npz", None, "elsewhere", _DIR, r"an \.npz file is read from its path"),
]
# fmt: on


@pytest.mark.parametrize(("dataset", "model", "data_dir", "flag", "message"), ERRORS,
                         ids=[f"{d}|{m}|{dd}" for d, m, dd, _f, _m in ERRORS])  # fmt: skip
def test_each_mistake_is_one_line_naming_its_flag_and_nothing_is_written(
    user: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    dataset: str,
    model: str | None,
    data_dir: str | None,
    flag: str,
    message: str,
) -> None:
    (user / "syntax.py").write_text("def f(:\n")
    (user / "broken.py").write_text("import not_a_package_xyz\n")
    np.savez(user / "keys.npz", x_train=np.zeros((2, 4, 4)), y_train=np.zeros(2, dtype=int))
    monkeypatch.chdir(user)
    args = ["train", "--dataset", dataset, "--steps", "4", "--workers", "2", "--out", "run"]
    args += ["--model", model] if model else []
    args += ["--data-dir", data_dir] if data_dir else []
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"easgd train: error: {flag} "), err
    assert __import__("re").search(message, err), err
    assert not (user / "run").exists()
    # The library's own error: the same flag, from check_train.
    cfg = TrainConfig(workers=2, steps=4, out="run", dataset=dataset, model=model,
                      data_dir=data_dir)  # fmt: skip
    with pytest.raises(PreflightError) as info:
        check_train(cfg)
    assert info.value.flag == flag


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("model", "mynet.py:", r"--model mynet\.py:: no function"),
        ("model", ":build", r"--model :build: no module"),
        ("model", "my-net:build", r"'my-net' is neither a module name nor a \.py file"),
        ("model", "mynet.py:2x", r"'2x' is not a Python name"),
        ("model", "npz:data.npz", r"npz:PATH is a data set, not a network"),
        ("dataset", "npz:", r"no path after npz:"),
    ],
)
def test_a_malformed_spec_is_refused_by_the_config(field: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        TrainConfig(steps=4, **{field: value})
    assert info.value.field == field
    with pytest.raises(SpecError, match=message):
        absolute_spec(value, f"--{field}")


# ------------------------------------------------------------------------------------------
# --no-verify: your own files under the names of a built-in set, used only when asked, named
# ------------------------------------------------------------------------------------------

MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _idx_gz(array: np.ndarray) -> bytes:
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


@pytest.fixture
def own_mnist(tmp_path: Path) -> Path:
    """Small MNIST files in the real format whose MD5s are not the published ones."""
    folder = tmp_path / "mnist-files"
    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (64, 28, 28)), rng.integers(0, 10, 64),
              rng.integers(0, 256, (16, 28, 28)), rng.integers(0, 10, 16)]  # fmt: skip
    for name, array in zip(MNIST_FILES, arrays, strict=True):
        (folder / name).write_bytes(_idx_gz(array))
    return folder


def test_a_wrong_checksum_names_no_verify_which_uses_the_file_with_a_warning(
    own_mnist: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ChecksumError, match=r"train-images-idx3-ubyte\.gz.*pass --no-verify"):
        load_dataset("mnist", data_dir=own_mnist, download=False)
    cfg = _cfg(tmp_path / "run", dataset="mnist", data_dir=str(own_mnist))
    with pytest.raises(PreflightError, match=r"^--data-dir .*pass --no-verify") as info:
        check_train(cfg, download=False)
    assert info.value.flag == "--data-dir"
    checked = check_train(cfg.replace(no_verify=True), download=False)
    for name in MNIST_FILES:
        assert sum(name in w and "--no-verify" in w for w in checked.warnings) == 1, name
    assert checked.train_size == 64
    # In Python: verify=False; a logging warning names each file (once per process).
    copy = tmp_path / "copy"
    shutil.copytree(own_mnist, copy)
    with caplog.at_level(logging.WARNING, logger="easgd.data.download"):
        data = load_dataset("mnist", data_dir=copy, download=False, verify=False,
                            cache_dir=tmp_path / "cache")  # fmt: skip
        load_dataset("mnist", data_dir=copy, download=False, verify=False,
                     cache_dir=tmp_path / "cache")  # fmt: skip
    assert data.train_x.shape == (64, 1, 28, 28)
    warned = [r.getMessage() for r in caplog.records if "--no-verify" in r.getMessage()]
    assert sorted(Path(m.split()[0]).name for m in warned) == sorted(MNIST_FILES)
    assert not (tmp_path / "run").exists()


def test_no_verify_counts_the_images_of_your_own_cifar_archive(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for name in CIFAR10_MEMBERS:  # 6 images per batch: 30 training images, not 50000
            batch = {b"batch_label": b"own", b"data": rng.integers(0, 256, (6, 3072), np.uint8),
                     b"labels": [int(v) for v in rng.integers(0, 10, 6)]}  # fmt: skip
            data = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "cifar").mkdir()
    (tmp_path / "cifar" / "cifar-10-python.tar.gz").write_bytes(archive.getvalue())
    cfg = _cfg(tmp_path / "run", dataset="cifar10", data_dir=str(tmp_path / "cifar"),
               batch_size=8)  # fmt: skip
    with pytest.raises(PreflightError, match=r"pass --no-verify"):
        check_train(cfg, download=False)
    checked = check_train(cfg.replace(no_verify=True), download=False)
    assert checked.train_size == 30 and checked.input_shape == (3, 28, 28)
    assert len(checked.warnings) == 1 and "cifar-10-python.tar.gz has MD5" in checked.warnings[0]


def _train(cwd: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "easgd", "train", "--out", str(out), "--workers", "2", "--tau",
         "2", "--eval-interval", "0.5", "--quiet", "--json", *args],
        capture_output=True, text=True, cwd=cwd, timeout=240,
    )  # fmt: skip


def test_no_verify_end_to_end(own_mnist: Path, tmp_path: Path) -> None:
    refused = _train(tmp_path, tmp_path / "refused", "--dataset", "mnist", "--data-dir",
                     str(own_mnist), "--steps", "4")  # fmt: skip
    assert refused.returncode == 2
    assert "--no-verify" in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert not (tmp_path / "refused").exists()
    done = _train(tmp_path, tmp_path / "run", "--dataset", "mnist", "--data-dir",
                  str(own_mnist), "--steps", "4", "--no-verify")  # fmt: skip
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "used as it is (--no-verify)" in line]
    assert sorted(name for name in MNIST_FILES for line in warned if name in line) == sorted(
        MNIST_FILES
    )
    assert json.loads(done.stdout)["status"] == "completed"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["no_verify"] is True


# ------------------------------------------------------------------------------------------
# End to end: the real command on your own files, from another folder; export builds the same
# ------------------------------------------------------------------------------------------


def test_train_and_export_your_own_model_on_your_own_data(user: Path, tmp_path: Path) -> None:
    result = _train(user, user / "run", "--model", "./mynet.py:build", "--dataset",
                    "./mynet.py:torch_sets", "--steps", "12")  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed" and summary["local_steps"] == 24
    cfg = json.loads((user / "run" / "config.json").read_text())
    assert (cfg["model"], cfg["dataset"]) == (
        f"{user}/mynet.py:build",
        f"{user}/mynet.py:torch_sets",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    export = subprocess.run(
        [sys.executable, "-m", "easgd", "export", str(user / "run"), "--out", "model.pt"],
        capture_output=True, text=True, cwd=elsewhere, timeout=240,
    )  # fmt: skip
    assert export.returncode == 0, export.stderr
    net = build_custom_model(f"{user}/mynet.py:build", (1, 6, 5), 3)
    net.load_state_dict(torch.load(elsewhere / "model.pt", weights_only=True))
    data = load_custom_dataset(f"{user}/mynet.py:torch_sets")
    net.eval()
    with torch.no_grad():
        error = float((net(data.test_x).argmax(1) != data.test_y).float().mean())
    assert error == pytest.approx(summary["center_test_error"], abs=1e-6)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_train_on_an_npz_file(user: Path, mode: str) -> None:
    result = _train(user, user / "run", "--dataset", "npz:data.npz", "--mode", mode, "--steps",
                    "12")  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed" and summary["center_test_error"] is not None
    cfg = json.loads((user / "run" / "config.json").read_text())
    assert (cfg["dataset"], cfg["model"]) == (f"npz:{user}/data.npz", "mlp")
