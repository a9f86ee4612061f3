"""The data sets of the experiments, loaded into normalized tensors.

``digits`` (scikit-learn, offline, 1x8x8), ``digits-hard`` (made from digits: 1x28x28,
distorted, offline; :mod:`easgd.data.digits_hard`), ``mnist`` and ``fashion-mnist`` (1x28x28),
``cifar10`` (3x32x32, trained on random 28x28 crops and tested on the center crop: the
28x28 input is the paper's, the random/center crops our choice, paper-spec 3) and
``imagenet`` (your ImageNet-format folder, ``data_dir``: :mod:`easgd.data.imagefolder`,
3x221x221 crops). Every set is scaled to [0, 1] and then normalized per channel with the
mean and standard deviation of its training images (our choice: the paper's preprocessing
is in its unretrieved supplement, paper-spec 3).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from torch import Tensor

from easgd.data.cifar import read_cifar10
from easgd.data.digits import digits_arrays
from easgd.data.download import DEFAULT_TIMEOUT, default_cache_dir, fetch_file
from easgd.data.errors import CorruptFileError, DatasetNotFoundError
from easgd.data.idx import read_idx_images, read_idx_labels
from easgd.data.transforms import RandomCrop, center_crop, channel_stats, normalize_

__all__ = [
    "DATASETS",
    "DATASET_INFO",
    "SPECS",
    "Dataset",
    "DatasetInfo",
    "DatasetSpec",
    "dataset_info",
    "load_dataset",
    "locate_dataset",
]

logger = logging.getLogger(__name__)

DATASETS = ("digits", "digits-hard", "mnist", "fashion-mnist", "cifar10", "imagenet")

#: Side of the CIFAR crops the model sees (the paper: 28 of 32).
CIFAR_CROP = 28
#: Side of the ImageNet crops the model sees (the paper's network takes 3x221x221).
IMAGENET_CROP = 221

_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "ilsvrc": "imagenet",
    "digits_hard": "digits-hard",
}


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split as normalized tensors.

    Args:
        name: one of :data:`DATASETS`.
        train_x: float32 ``(N, C, H, W)``, normalized; may be larger than ``image_size``
            when ``train_transform`` crops it (CIFAR-10: 32x32 stored, 28x28 seen);
            ``imagenet``: ``uint8``, memory-mapped, which its ``train_transform`` converts.
        train_y: int64 ``(N,)``.
        test_x: float32 ``(M, C, image_size, image_size)``, normalized (and center-cropped);
            without ``train_transform``, the training images' ``(H, W)`` (which may be
            non-square: your own data, :mod:`easgd.data.custom`).
        test_y: int64 ``(M,)``.
        num_classes: number of classes.
        in_channels: ``C``.
        image_size: side of the images the model sees (their width, if not square).
        mean, std: per-channel statistics of the training images in [0, 1] that were used to
            normalize both splits.
        train_transform: ``(batch, generator) -> batch`` applied to each training batch,
            e.g. :class:`~easgd.data.transforms.RandomCrop` (default None: identity).
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_transform: Callable[[Tensor, torch.Generator], Tensor] | None = None

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.ndim != 4 or x.shape[1] != self.in_channels or y.shape != x.shape[:1]:
                raise ValueError(
                    f"{split}_x of shape {tuple(x.shape)} and {split}_y of shape "
                    f"{tuple(y.shape)} do not form (N, {self.in_channels}, H, W) and (N,)"
                )
        cropped = self.train_transform is not None
        seen = (self.image_size,) * 2 if cropped else tuple(self.train_x.shape[2:])
        if tuple(self.test_x.shape[2:]) != seen or seen[-1] != self.image_size:
            raise ValueError(
                f"test_x of shape {tuple(self.test_x.shape)} is not {seen[0]}x{seen[1]}"
            )

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={tuple(self.train_x.shape)}, "
            f"test={tuple(self.test_x.shape)}, num_classes={self.num_classes}, "
            f"image_size={self.image_size}, train_transform={self.train_transform!r})"
        )


@dataclass(frozen=True)
class DatasetSpec:
    """Where a data set's files come from and what they must hash to.

    Args:
        name: the data set, also the name of its folder in the cache.
        files: ``{filename: md5}``; the readers use these canonical file names.
        mirrors: base URLs tried in order.
        data_subdirs: subfolders of ``data_dir`` looked in before ``data_dir`` itself,
            e.g. torchvision's layout (default none).

    Tests build one with the MD5s of the small files they write, e.g.
    ``dataclasses.replace(SPECS["mnist"], files={...})``, and pass it to
    :func:`load_dataset` as ``spec=``.
    """

    name: str
    files: Mapping[str, str]
    mirrors: tuple[str, ...]
    data_subdirs: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.mirrors:
            raise ValueError(f"DatasetSpec {self.name!r} needs at least one mirror")
        object.__setattr__(self, "files", MappingProxyType(dict(self.files)))


_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
_CIFAR10_FILE = "cifar-10-python.tar.gz"

SPECS: Mapping[str, DatasetSpec] = MappingProxyType(
    {
        "mnist": DatasetSpec(
            name="mnist",
            files={
                "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
                "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
                "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
            },
            mirrors=(
                "https://ossci-datasets.s3.amazonaws.com/mnist/",
                "http://yann.lecun.com/exdb/mnist/",
            ),
            data_subdirs=("mnist", "MNIST/raw"),
        ),
        # Fashion-MNIST's own site publishes no MD5s; these are the ones torchvision checks.
        "fashion-mnist": DatasetSpec(
            name="fashion-mnist",
            files={
                "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
            },
            mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
            data_subdirs=("fashion-mnist", "FashionMNIST/raw"),
        ),
        "cifar10": DatasetSpec(
            name="cifar10",
            files={_CIFAR10_FILE: "c58f30108f718f92721af3b95e74349a"},
            mirrors=("https://www.cs.toronto.edu/~kriz/",),
            data_subdirs=("cifar10",),
        ),
    }
)


@dataclass(frozen=True)
class DatasetInfo:
    """What a data set is, known without loading it: shapes, classes and split sizes.

    ``image_size`` is the side the model sees (CIFAR-10: the 28x28 crops of 32x32 images).
    The sizes are those of the published files (the files whose MD5s :data:`SPECS` lists).
    """

    name: str
    in_channels: int
    image_size: int
    num_classes: int
    train_size: int
    test_size: int


#: Every data set's :class:`DatasetInfo` (digits: scikit-learn's 1797 images split 80/20).
DATASET_INFO: Mapping[str, DatasetInfo] = MappingProxyType(
    {
        "digits": DatasetInfo("digits", 1, 8, 10, 1437, 360),
        # 8 distorted 28x28 copies of each training digit, 3 of each test digit.
        "digits-hard": DatasetInfo("digits-hard", 1, 28, 10, 11496, 1080),
        "mnist": DatasetInfo("mnist", 1, 28, 10, 60000, 10000),
        "fashion-mnist": DatasetInfo("fashion-mnist", 1, 28, 10, 60000, 10000),
        "cifar10": DatasetInfo("cifar10", 3, CIFAR_CROP, 10, 50000, 10000),
        # ILSVRC's train and val sets; your folder's own sizes are counted when it is read.
        "imagenet": DatasetInfo("imagenet", 3, IMAGENET_CROP, 1000, 1281167, 50000),
    }
)


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` (aliases such as ``cifar-10`` accepted).

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
    """
    return DATASET_INFO[_canonical_name(name)]


def _canonical_name(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return key


def _to_unit_tensor(images: np.ndarray) -> Tensor:
    """``uint8`` (N, C, H, W) -> float32 in [0, 1]."""
    return torch.from_numpy(images.astype(np.float32, order="C")).div_(255.0)


def _build(
    name: str,
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    crop: int | None = None,
) -> Dataset:
    mean, std = channel_stats(train_x)
    normalize_(train_x, mean, std)
    normalize_(test_x, mean, std)
    if crop is not None:
        test_x = center_crop(test_x, crop).contiguous()
    return Dataset(
        name=name,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=10,
        in_channels=train_x.shape[1],
        image_size=crop or train_x.shape[-1],
        mean=mean,
        std=std,
        train_transform=RandomCrop(crop) if crop is not None else None,
    )


def _load_idx(name: str, paths: Mapping[str, Path]) -> Dataset:
    train_img, train_lbl, test_img, test_lbl = (paths[f] for f in _MNIST_FILES)
    arrays = {}
    for split, img, lbl in (("train", train_img, train_lbl), ("test", test_img, test_lbl)):
        images, labels = read_idx_images(img), read_idx_labels(lbl)
        if images.shape[0] != labels.shape[0]:
            raise CorruptFileError(
                f"{img.name} holds {images.shape[0]} images but {lbl.name} holds "
                f"{labels.shape[0]} labels; the files belong to different sets. Replace them."
            )
        arrays[split] = (
            _to_unit_tensor(images[:, None]),
            torch.from_numpy(labels.astype(np.int64)),
        )
    return _build(name, *arrays["train"], *arrays["test"])


def _load_cifar10(name: str, paths: Mapping[str, Path]) -> Dataset:
    train_x, train_y, test_x, test_y = read_cifar10(paths[_CIFAR10_FILE])
    return _build(
        name,
        _to_unit_tensor(train_x),
        torch.from_numpy(train_y),
        _to_unit_tensor(test_x),
        torch.from_numpy(test_y),
        crop=CIFAR_CROP,
    )


_READERS: Mapping[str, Callable[[str, Mapping[str, Path]], Dataset]] = {
    "mnist": _load_idx,
    "fashion-mnist": _load_idx,
    "cifar10": _load_cifar10,
}


def load_dataset(
    name: str = "digits",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    base_url: str | Sequence[str] | None = None,
    spec: DatasetSpec | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    verify: bool = True,
) -> Dataset:
    """Load a data set as normalized tensors, finding or downloading its files first.

    Args:
        name: one of :data:`DATASETS` (default ``"digits"``, which needs no files).
        data_dir: folder of files already present, looked at first (default None).
        cache_dir: download folder; default ``$EASGD_DATA_DIR`` or ``~/.cache/easgd/data``.
            Files go to ``cache_dir/<name>/``.
        download: whether missing files may be downloaded (default True).
        base_url: base URL (or URLs, tried in order) replacing the spec's mirrors.
        spec: replaces ``SPECS[name]`` (file MD5s, mirrors), e.g. for tests.
        timeout: socket timeout in seconds for downloads (default 30).
        verify: False (``easgd train --no-verify``): files already present whose MD5
            differs are used, with a warning naming each (downloads are always verified).

    Raises:
        ValueError: unknown ``name``, or ``spec`` for another data set.
        DatasetNotFoundError: a file is missing and ``download=False``.
        DownloadError: every mirror failed.
        ChecksumError, CorruptFileError: a file is damaged.

    Example:
        >>> ds = load_dataset("digits")
        >>> ds.train_x.shape, ds.num_classes
        (torch.Size([1437, 1, 8, 8]), 10)
    """
    key = _canonical_name(name)
    if spec is not None and spec.name != key:
        raise ValueError(f"spec is for {spec.name!r} but the data set asked for is {key!r}")
    if key == "digits":
        train_x, train_y, test_x, test_y = (torch.tensor(a) for a in digits_arrays())
        return _build(key, train_x, train_y, test_x, test_y)
    if key == "digits-hard":  # generated from digits once, then cached (easgd.data.digits_hard)
        from easgd.data.digits_hard import digits_hard_arrays

        arrays = digits_hard_arrays(cache_dir=None if cache_dir is None else str(cache_dir))
        train_x, test_x = (_to_unit_tensor(a) for a in arrays[0::2])
        train_y, test_y = (torch.from_numpy(a.copy()) for a in arrays[1::2])
        return _build(key, train_x, train_y, test_x, test_y)
    if key == "imagenet":  # your folder, decoded once into the cache (easgd.data.imagefolder)
        from easgd.data.imagefolder import load_image_folder

        return load_image_folder(_image_root(data_dir), cache_dir=cache_dir, crop=IMAGENET_CROP)

    paths = locate_dataset(
        key, data_dir=data_dir, cache_dir=cache_dir, download=download, base_url=base_url,
        spec=spec, timeout=timeout, verify=verify,
    )  # fmt: skip
    logger.info("reading %s from %s", key, ", ".join(str(p) for p in paths.values()))
    return _READERS[key](key, paths)


def _image_root(data_dir: str | os.PathLike[str] | None) -> Path:
    """The folder of ``imagenet``: ``data_dir``, which it needs (nothing to download)."""
    if data_dir is None:
        raise DatasetNotFoundError(
            "imagenet is read from your own folder: give --data-dir ROOT, with "
            "ROOT/train/<class>/<image> and ROOT/val/<class>/<image> (ImageNet's layout)"
        )
    return Path(data_dir).expanduser()


def locate_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    base_url: str | Sequence[str] | None = None,
    spec: DatasetSpec | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    verify: bool = True,
) -> dict[str, Path]:
    """The files of ``name``, found (or downloaded) and MD5-verified, without reading them.

    Looks where :func:`load_dataset` looks, with the same arguments and the same errors;
    ``{filename: path}`` in the spec's order, empty for ``digits`` (no files: scikit-learn's);
    ``digits-hard``: its cache file, generated here if it is missing (so a launcher's workers
    read it rather than each generating it); ``imagenet``: its two split folders
    (``{"train": ..., "val": ...}``), scanned.
    A launcher calls it once before starting its workers, which then find the files in place.
    """
    key = _canonical_name(name)
    if spec is not None and spec.name != key:
        raise ValueError(f"spec is for {spec.name!r} but the data set asked for is {key!r}")
    if key == "digits":  # scikit-learn's, nothing to fetch
        return {}
    if key == "digits-hard":  # generated here once, into the cache its readers find
        from easgd.data.digits_hard import digits_hard_arrays, digits_hard_cache_path

        where = None if cache_dir is None else str(cache_dir)
        try:
            digits_hard_arrays(cache_dir=where)
        except (ImportError, OSError, ValueError) as exc:
            raise DatasetNotFoundError(f"digits-hard could not be generated: {exc}") from exc
        path = digits_hard_cache_path(cache_dir=where)
        return {path.name: path} if path.is_file() else {}
    if key == "imagenet":  # nothing to fetch: the split folders, checked (easgd.data.imagefolder)
        from easgd.data.imagefolder import TEST_SPLITS, scan_image_folder

        root = scan_image_folder(_image_root(data_dir)).root
        test = next(root / name for name in TEST_SPLITS if (root / name).is_dir())
        return {"train": root / "train", test.name: test}
    spec = spec or SPECS[key]
    if base_url is not None:
        mirrors = (base_url,) if isinstance(base_url, str) else tuple(base_url)
        spec = dataclasses.replace(spec, mirrors=mirrors)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return {
        filename: fetch_file(
            filename,
            md5,
            mirrors=spec.mirrors,
            cache_dir=root / spec.name,
            data_dir=Path(data_dir).expanduser() if data_dir is not None else None,
            data_subdirs=spec.data_subdirs,
            download=download,
            timeout=timeout,
            verify=verify,
        )
        for filename, md5 in spec.files.items()
    }
