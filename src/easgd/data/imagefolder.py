"""ImageNet-format folders: class folders of images, decoded with Pillow (no torchvision).

``--dataset imagenet --data-dir ROOT`` reads the layout torchvision's ``ImageFolder`` reads,
once per split::

    ROOT/train/<class>/<image>      e.g. ROOT/train/n01440764/n01440764_10026.JPEG
    ROOT/val/<class>/<image>        (or ROOT/test/...)

Classes are the training folder's subfolder names in sorted order (label ``k`` is the
``k``-th); a test class must be one of them. Images are the files whose suffix is one of
:data:`IMAGE_SUFFIXES` (any case), decoded to RGB with Pillow, at any size.

Preprocessing (paper-spec 3: only the 221x221 input of the network is the paper's; its
resizing, crops and flips are in the unretrieved supplement):

* every image is resized so that its shorter side is :data:`STORE_SIZE` (256, bilinear) and
  center-cropped to 256x256 (**our choice**, the common practice of the paper's reference
  [4], Krizhevsky et al.);
* training batches: a random 221x221 crop per image, no flip (**our choice**: the paper
  says neither; the CIFAR set is cropped the same way, :mod:`easgd.data.datasets`);
* test images: the central 221x221 crop (**our choice**);
* both splits are normalized per channel with the training images' mean and standard
  deviation, as every built-in set is (**our choice**).

The decoded images are written once into a cache (:func:`prepare_image_folder`; under
``$EASGD_DATA_DIR`` or ``~/.cache/easgd/data``, in ``imagenet/<key>/``, the key a hash of
the folder's file list, sizes and modification times): the training images as ``uint8``
(3x256x256: 197 kB each, 252 GB for ILSVRC's 1.28M), the test images normalized and cropped
as ``float32`` (3x221x221: 586 kB each, 29 GB for 50,000). Every process of a run
memory-maps the same files, so they share one copy in the page cache and none holds the set
in its own memory; a changed folder gets a new key (the old cache is left, delete it by
hand). The training tensor is ``uint8``: the training transform (:class:`FolderTrainTransform`)
crops, converts and normalizes each batch.

Example (a tiny folder, as the tests write one)::

    >>> ds = load_image_folder("tiny", size=40, crop=32)   # doctest: +SKIP
    >>> ds.train_x.dtype, ds.test_x.shape[1:]               # doctest: +SKIP
    (torch.uint8, torch.Size([3, 32, 32]))
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from easgd.data.datasets import Dataset
from easgd.data.download import default_cache_dir
from easgd.data.errors import CorruptFileError, DatasetNotFoundError
from easgd.data.transforms import RandomCrop, center_crop, normalize_

__all__ = [
    "CROP",
    "IMAGE_SUFFIXES",
    "STORE_SIZE",
    "TEST_SPLITS",
    "FolderIndex",
    "FolderTrainTransform",
    "decode_image",
    "load_image_folder",
    "prepare_image_folder",
    "scan_image_folder",
]

logger = logging.getLogger(__name__)

#: The files read as images (compared lower-case).
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".webp")
#: Side of the stored images: shorter side resized to it, then center-cropped (our choice).
STORE_SIZE = 256
#: Side of the crops the network sees: the paper's ImageNet input is 3x221x221.
CROP = 221
#: The names the test split's folder may have, tried in order.
TEST_SPLITS = ("val", "test")
#: Bump when the cache's format or the preprocessing changes: old caches are not reused.
_CACHE_VERSION = 1
_CHUNK = 256


@dataclass(frozen=True)
class FolderIndex:
    """The images of a folder: ``(path, label)`` per split, and the class names."""

    root: Path
    classes: tuple[str, ...]
    train: tuple[tuple[Path, int], ...]
    test: tuple[tuple[Path, int], ...]

    def key(self, size: int, crop: int) -> str:
        """A hash of every file (name, size, modification time) and the preprocessing."""
        h = hashlib.sha256(json.dumps([_CACHE_VERSION, str(self.root), size, crop]).encode())
        for path, label in (*self.train, *self.test):
            st = path.stat()
            h.update(f"{path.relative_to(self.root)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n"
                     .encode())  # fmt: skip
        return h.hexdigest()[:16]


def _images(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


def scan_image_folder(root: str | os.PathLike[str]) -> FolderIndex:
    """Find the classes and images of ``root`` (see the module docstring for the layout).

    Raises:
        DatasetNotFoundError: no ``train/`` or test folder, no class folder, or a split
            without images; the message says which layout is expected.
        CorruptFileError: a test class that the training split does not have.
    """
    root = Path(root).expanduser().resolve()
    layout = "ROOT/train/<class>/<image> and ROOT/val/<class>/<image>"
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DatasetNotFoundError(f"{root} has no train/ folder; expected {layout}")
    test_dir = next((root / s for s in TEST_SPLITS if (root / s).is_dir()), None)
    if test_dir is None:
        raise DatasetNotFoundError(f"{root} has no val/ (or test/) folder; expected {layout}")
    classes = tuple(sorted(p.name for p in train_dir.iterdir() if p.is_dir()))
    if not classes:
        raise DatasetNotFoundError(f"{train_dir} has no class folders; expected {layout}")
    label = {c: i for i, c in enumerate(classes)}
    unknown = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and p.name not in label)
    if unknown:
        raise CorruptFileError(
            f"{test_dir} has class folders that {train_dir} does not: {', '.join(unknown[:5])}"
            f"{' ...' if len(unknown) > 5 else ''}; both splits must use the same class names"
        )
    splits = {}
    for split, folder in (("train", train_dir), ("test", test_dir)):
        pairs = tuple(
            (path, label[c])
            for c in sorted(p.name for p in folder.iterdir() if p.is_dir())
            for path in _images(folder / c)
        )
        if not pairs:
            raise DatasetNotFoundError(
                f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); expected {layout}"
            )
        splits[split] = pairs
    return FolderIndex(root, classes, splits["train"], splits["test"])


def decode_image(path: Path, size: int) -> np.ndarray:
    """``path`` as ``uint8`` ``(3, size, size)``: RGB, shorter side resized to ``size``
    (bilinear), center-cropped.

    Raises:
        CorruptFileError: Pillow cannot decode the file.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise CorruptFileError(
            f"{path}: not a readable image ({exc}); remove or replace it"
        ) from None
    w, h = rgb.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    rgb = rgb.resize(new, Image.Resampling.BILINEAR)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    rgb = rgb.crop((left, top, left + size, top + size))
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


class FolderTrainTransform:
    """A training batch of ``uint8`` images: random ``crop`` x ``crop`` window per image,
    then scaled to [0, 1] and normalized with ``mean``/``std`` (no flip: our choice).

    Args:
        crop: side of the crop (the paper's network: 221).
        mean, std: per-channel statistics of the training images in [0, 1].
    """

    def __init__(self, crop: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.crop = RandomCrop(crop)
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        out = self.crop(x, generator).to(torch.float32).div_(255.0)
        return normalize_(out, self.mean, self.std)

    def __repr__(self) -> str:
        return f"FolderTrainTransform(crop={self.crop.size})"


def prepare_image_folder(
    root: str | os.PathLike[str],
    *,
    size: int = STORE_SIZE,
    crop: int = CROP,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Decode ``root`` into its cache once (see the module docstring); the cache's folder.

    A cache already there is reused. It is written into a temporary folder and renamed into
    place, so that a process that stops half-way leaves nothing a later one would trust, and
    two processes preparing the same folder at once both end with the same complete cache.
    """
    if not 0 < crop <= size:
        raise ValueError(f"crop={crop} must be in 1..size={size}")
    index = scan_image_folder(root)
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = base / "imagenet" / index.key(size, crop)
    if (target / "meta.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        logger.info("decoding %d + %d images of %s into %s", len(index.train),
                    len(index.test), index.root, target)  # fmt: skip
        mean, std = _write_train(index, tmp, size)
        _write_test(index, tmp, size, crop, mean, std)
        meta = {"version": _CACHE_VERSION, "root": str(index.root), "classes": index.classes,
                "size": size, "crop": crop, "mean": mean, "std": std,
                "train_size": len(index.train), "test_size": len(index.test)}  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep its cache
            if not (target / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_train(index: FolderIndex, folder: Path, size: int) -> tuple[list[float], list[float]]:
    """The training images as ``uint8``; their per-channel mean and std in [0, 1]."""
    n = len(index.train)
    x = np.lib.format.open_memmap(folder / "train_x.npy", "w+", np.uint8, (n, 3, size, size))
    total, squares = np.zeros(3), np.zeros(3)
    for i, (path, _) in enumerate(index.train):
        img = decode_image(path, size)
        x[i] = img
        pixels = img.reshape(3, -1).astype(np.float64) / 255.0
        total += pixels.sum(axis=1)
        squares += np.square(pixels).sum(axis=1)
    x.flush()
    del x
    np.save(folder / "train_y.npy", np.array([lbl for _, lbl in index.train], dtype=np.int64))
    count = n * size * size
    mean = total / count
    std = np.sqrt(np.clip(squares / count - mean**2, 0, None))
    std = np.where(std > 0, std, 1.0)  # a constant channel is left unscaled
    return mean.tolist(), std.tolist()


def _write_test(
    index: FolderIndex, folder: Path, size: int, crop: int, mean: list[float], std: list[float]
) -> None:
    """The test images center-cropped and normalized, as ``float32``."""
    n = len(index.test)
    x = np.lib.format.open_memmap(folder / "test_x.npy", "w+", np.float32, (n, 3, crop, crop))
    for start in range(0, n, _CHUNK):
        part = index.test[start : start + _CHUNK]
        batch = torch.from_numpy(np.stack([decode_image(p, size) for p, _ in part]))
        batch = center_crop(batch, crop).to(torch.float32).div_(255.0)
        x[start : start + len(part)] = normalize_(batch, tuple(mean), tuple(std)).numpy()
    x.flush()
    del x
    np.save(folder / "test_y.npy", np.array([lbl for _, lbl in index.test], dtype=np.int64))


def load_image_folder(
    root: str | os.PathLike[str],
    *,
    size: int = STORE_SIZE,
    crop: int = CROP,
    cache_dir: str | os.PathLike[str] | None = None,
    name: str = "imagenet",
) -> Dataset:
    """The folder ``root`` as a :class:`~easgd.data.datasets.Dataset`, memory-mapped.

    Prepares the cache first if needed (:func:`prepare_image_folder`). ``train_x`` is
    ``uint8`` ``(N, 3, size, size)`` with a :class:`FolderTrainTransform`; ``test_x`` is
    ``float32`` ``(M, 3, crop, crop)``, normalized.
    """
    folder = prepare_image_folder(root, size=size, crop=crop, cache_dir=cache_dir)
    meta = json.loads((folder / "meta.json").read_text())

    def tensor(file: str) -> Tensor:
        # Copy-on-write mapping: writable for torch, shared in the page cache, never written.
        return torch.from_numpy(np.load(folder / file, mmap_mode="c"))

    mean, std = tuple(meta["mean"]), tuple(meta["std"])
    return Dataset(
        name=name,
        train_x=tensor("train_x.npy"),
        train_y=torch.from_numpy(np.load(folder / "train_y.npy")),
        test_x=tensor("test_x.npy"),
        test_y=torch.from_numpy(np.load(folder / "test_y.npy")),
        num_classes=len(meta["classes"]),
        in_channels=3,
        image_size=crop,
        mean=mean,
        std=std,
        train_transform=FolderTrainTransform(crop, mean, std),
    )
