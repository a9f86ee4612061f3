"""The ImageNet-format folder reader, on tiny folders of PNG and JPEG images written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from easgd.config import TrainConfig
from easgd.data import CorruptFileError, DatasetNotFoundError, imagefolder, load_dataset
from easgd.data.imagefolder import (
    FolderTrainTransform,
    decode_image,
    load_image_folder,
    prepare_image_folder,
    scan_image_folder,
)
from easgd.data.loader import BatchStream
from easgd.preflight import PreflightError, check_train

pytestmark = pytest.mark.timeout(120)

CLASSES = ("n01", "n02", "n03")
# Each class has its own colour: the label can be read back from the pixels.
COLOURS = {"n01": (250, 10, 10), "n02": (10, 250, 10), "n03": (10, 10, 250)}


def _write_folder(root: Path, *, train: int = 3, val: int = 2) -> Path:
    """``root/train/<class>/`` and ``root/val/<class>/``: images of varied sizes and formats."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in CLASSES:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                w, h = 30 + 7 * i, 24 + 5 * i  # never square, never the stored size
                pixels = np.clip(
                    np.array(COLOURS[c]) + rng.integers(-5, 6, (h, w, 3)), 0, 255
                ).astype(np.uint8)
                image = Image.fromarray(pixels)
                if i % 2:
                    image.save(folder / f"{c}_{i}.JPEG", quality=95)
                else:
                    image.convert("L" if i == 2 else "RGB").save(folder / f"{c}_{i}.png")
            (folder / "notes.txt").write_text("not an image")  # ignored
    return root


def test_scan_finds_classes_and_images(tmp_path: Path) -> None:
    index = scan_image_folder(_write_folder(tmp_path / "in"))
    assert index.classes == CLASSES
    assert len(index.train) == 9 and len(index.test) == 6
    assert [lbl for _, lbl in index.train] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(p.suffix in (".png", ".JPEG") for p, _ in (*index.train, *index.test))


def test_decode_resizes_the_shorter_side_and_center_crops(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    pixels = np.zeros((20, 60, 3), np.uint8)
    pixels[:, 20:40] = 200  # the central third is bright
    Image.fromarray(pixels).save(path)
    out = decode_image(path, 10)
    assert out.shape == (3, 10, 10) and out.dtype == np.uint8
    assert out.min() > 150  # the 30x10 resize, cropped to its central 10x10: the bright part
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(grey)  # one channel -> RGB
    assert (decode_image(grey, 8) == 77).all()


def test_load_gives_normalized_crops_labelled_by_class(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "in")
    ds = load_image_folder(root, size=40, crop=32, cache_dir=tmp_path / "cache")
    assert ds.train_x.dtype == torch.uint8 and tuple(ds.train_x.shape) == (9, 3, 40, 40)
    assert ds.test_x.dtype == torch.float32 and tuple(ds.test_x.shape) == (6, 3, 32, 32)
    assert ds.num_classes == 3 and ds.image_size == 32 and ds.in_channels == 3
    assert ds.test_y.tolist() == [0, 0, 1, 1, 2, 2]
    # The red class is red after normalization: channel 0 above channels 1 and 2.
    red = ds.test_x[ds.test_y == 0]
    assert (red[:, 0].mean() > red[:, 1].mean()) and (red[:, 0].mean() > red[:, 2].mean())
    # A training batch: random 32x32 crops, float, normalized with the training statistics.
    stream = BatchStream(ds.train_x, ds.train_y, 9, seed=0, transform=ds.train_transform)
    xb, yb = next(stream)
    assert xb.dtype == torch.float32 and tuple(xb.shape) == (9, 3, 32, 32)
    assert abs(float(xb.mean())) < 0.3 and sorted(yb.tolist()) == sorted(ds.train_y.tolist())
    again = BatchStream(ds.train_x, ds.train_y, 9, seed=0, transform=ds.train_transform)
    torch.testing.assert_close(next(again)[0], xb)  # deterministic per seed


def test_train_transform_normalizes_with_the_given_statistics() -> None:
    x = torch.full((2, 3, 6, 6), 51, dtype=torch.uint8)  # 0.2 in [0, 1]
    out = FolderTrainTransform(4, (0.2, 0.1, 0.3), (0.1, 0.1, 0.1))(x, torch.Generator())
    torch.testing.assert_close(out[:, 0], torch.zeros(2, 4, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 1], torch.ones(2, 4, 4), atol=1e-5, rtol=0)


def test_the_cache_is_reused_and_a_changed_folder_gets_a_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _write_folder(tmp_path / "in")
    cache = tmp_path / "cache"
    first = prepare_image_folder(root, size=16, crop=12, cache_dir=cache)
    assert (first / "meta.json").exists()

    def no_decoding(path: Path, size: int) -> np.ndarray:
        raise AssertionError("decoded again")

    monkeypatch.setattr(imagefolder, "decode_image", no_decoding)
    assert prepare_image_folder(root, size=16, crop=12, cache_dir=cache) == first
    load_image_folder(root, size=16, crop=12, cache_dir=cache)  # from the cache alone
    monkeypatch.undo()
    extra = Image.fromarray(np.zeros((9, 9, 3), np.uint8))
    extra.save(root / "train" / "n01" / "extra.png")
    second = prepare_image_folder(root, size=16, crop=12, cache_dir=cache)
    assert second != first
    assert load_image_folder(root, size=16, crop=12, cache_dir=cache).train_x.shape[0] == 10
    assert not [p for p in (cache / "imagenet").iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize(
    ("damage", "error", "words"),
    [
        (lambda r: (r / "train" / "n02" / "n02_0.png").write_bytes(b"garbage"),
         CorruptFileError, "not a readable image"),
        (lambda r: (r / "val").rename(r / "elsewhere"), DatasetNotFoundError, "no val/"),
        (lambda r: (r / "val" / "n99").mkdir(), CorruptFileError, "n99"),
    ],
)  # fmt: skip
def test_bad_folders_are_refused_in_one_line(
    tmp_path: Path, damage: object, error: type[Exception], words: str
) -> None:
    root = _write_folder(tmp_path / "in", train=1, val=1)
    damage(root)  # type: ignore[operator]
    with pytest.raises(error, match=words) as info:
        load_image_folder(root, size=8, crop=8, cache_dir=tmp_path / "cache")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "cache" / "imagenet").exists() or not [
        p for p in (tmp_path / "cache" / "imagenet").iterdir()
    ]


def test_dataset_imagenet_reads_the_folder_at_the_papers_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EASGD_DATA_DIR", str(tmp_path / "cache"))
    root = _write_folder(tmp_path / "in", train=2, val=1)
    ds = load_dataset("imagenet", data_dir=root)
    assert tuple(ds.train_x.shape) == (6, 3, 256, 256)
    assert tuple(ds.test_x.shape) == (3, 3, 221, 221)
    with pytest.raises(DatasetNotFoundError, match="--data-dir ROOT"):
        load_dataset("imagenet")


def test_preflight_decodes_the_folder_once_and_checks_the_paper_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EASGD_DATA_DIR", str(tmp_path / "cache"))
    root = _write_folder(tmp_path / "in", train=2, val=1)
    cfg = TrainConfig(
        method="eamsgd", workers=2, tau=10, lr=0.001, batch_size=4, steps=20,
        dataset="imagenet", data_dir=str(root), out=str(tmp_path / "run"),
    )  # fmt: skip
    checked = check_train(cfg)
    assert (checked.model, checked.train_size, checked.input_shape) == (
        "imagenet-paper", 6, (3, 221, 221)
    )  # fmt: skip
    assert len(list((tmp_path / "cache" / "imagenet").iterdir())) == 1  # decoded, here
    with pytest.raises(PreflightError, match="--batch-size 7 is larger"):
        check_train(cfg.replace(batch_size=7))
    with pytest.raises(PreflightError, match="--data-dir"):
        check_train(cfg.replace(data_dir=None))


def test_batchnorm_recalibration_sees_the_training_transform() -> None:
    # The center of a batch-norm net on an image folder (or CIFAR-10's crops) is evaluated
    # after update_bn on training images: they must pass through the training transform
    # (uint8 -> cropped, normalized float), as the network saw them. Before, the raw uint8
    # tensor went into the network and the evaluation failed.
    from easgd.data.imagefolder import FolderTrainTransform
    from easgd.evaluation import evaluate_center
    from easgd.flat import parameters_to_flat_views

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3),
    )  # fmt: skip
    flat = parameters_to_flat_views(model)
    gen = torch.Generator().manual_seed(1)
    train_x = torch.randint(0, 256, (40, 3, 10, 10), dtype=torch.uint8, generator=gen)
    transform = FolderTrainTransform(8, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    test = (torch.randn(6, 3, 8, 8, generator=gen), torch.tensor([0, 1, 2, 0, 1, 2]))
    with pytest.raises(RuntimeError):  # what happened before: uint8 into the network
        evaluate_center(model, flat, flat.params.clone(), test, train_x)
    center = flat.params.detach().clone()
    result = evaluate_center(model, flat, center, test, train_x, batch_size=16,
                             transform=transform)  # fmt: skip
    assert 0.0 <= result["error"] <= 1.0
    # The running mean is that of the transformed batches (seeded 0, as the function says).
    bn = model[1]
    again = torch.nn.Sequential(*[m for m in model])
    seeded = torch.Generator().manual_seed(0)
    chunks = [transform(train_x[i : i + 256], seeded) for i in range(0, 40, 256)]
    ref = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        ref.train()
        ref.momentum = None
        ref(again[0](torch.cat(chunks)))
    assert torch.allclose(bn.running_mean, ref.running_mean, atol=1e-6)
