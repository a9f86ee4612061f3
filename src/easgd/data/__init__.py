"""Data sets, batch transforms and deterministic mini-batch streams.

>>> from easgd.data import BatchStream, load_dataset
>>> ds = load_dataset("digits")
>>> stream = BatchStream(ds.train_x, ds.train_y, 32, seed=0, transform=ds.train_transform)
>>> xb, yb = next(stream)

``load_dataset`` finds the files of ``mnist``, ``fashion-mnist`` and ``cifar10`` in
``data_dir``, in the cache or on the canonical mirrors, and checks every file's MD5.
"""

from easgd.data.cifar import RestrictedUnpickler, read_cifar10
from easgd.data.datasets import (
    DATASET_INFO,
    DATASETS,
    SPECS,
    Dataset,
    DatasetInfo,
    DatasetSpec,
    dataset_info,
    load_dataset,
    locate_dataset,
)
from easgd.data.download import default_cache_dir, fetch_file, md5sum
from easgd.data.errors import (
    ChecksumError,
    CorruptFileError,
    DatasetError,
    DatasetNotFoundError,
    DownloadError,
)
from easgd.data.idx import read_idx, read_idx_images, read_idx_labels, read_idx_shape
from easgd.data.loader import BatchStream, iter_batches
from easgd.data.transforms import RandomCrop, center_crop, channel_stats, normalize_

__all__ = [
    "DATASETS",
    "DATASET_INFO",
    "SPECS",
    "BatchStream",
    "ChecksumError",
    "CorruptFileError",
    "Dataset",
    "DatasetError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "DatasetSpec",
    "DownloadError",
    "RandomCrop",
    "RestrictedUnpickler",
    "center_crop",
    "channel_stats",
    "dataset_info",
    "default_cache_dir",
    "fetch_file",
    "iter_batches",
    "load_dataset",
    "locate_dataset",
    "md5sum",
    "normalize_",
    "read_cifar10",
    "read_idx",
    "read_idx_images",
    "read_idx_labels",
    "read_idx_shape",
]
