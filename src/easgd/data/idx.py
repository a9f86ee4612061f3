"""Readers for the gzipped IDX files of MNIST and Fashion-MNIST.

An IDX file is a big-endian header, ``0x0000``, a type code (``0x08``: unsigned byte), the
number of dimensions, one ``uint32`` per dimension, then the data in C order. Labels have
magic ``2049`` (1 dimension), images ``2051`` (3 dimensions).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from easgd.data.errors import CorruptFileError

__all__ = [
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "read_idx",
    "read_idx_images",
    "read_idx_labels",
    "read_idx_shape",
]

IDX_LABELS_MAGIC = 2049
IDX_IMAGES_MAGIC = 2051

_REMEDY = "Delete it and download it again (download=True), or pass --data-dir with a good copy."


def read_idx(path: str | os.PathLike[str], *, magic: int) -> np.ndarray:
    """Read a gzipped unsigned-byte IDX file whose header starts with ``magic``.

    Raises:
        CorruptFileError: naming the file, if the gzip stream is truncated or invalid, the
            magic number differs, or the data size disagrees with the dimensions.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise CorruptFileError(f"{path} is not a complete gzip file ({exc}). {_REMEDY}") from exc
    if len(raw) < 4:
        raise CorruptFileError(f"{path} is too short for an IDX header. {_REMEDY}")
    _check_magic(path, raw, magic)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptFileError(f"{path} ends inside its IDX header. {_REMEDY}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise CorruptFileError(
            f"{path} has {len(raw) - header} bytes of data but its header declares dimensions "
            f"{dims} ({expected} bytes). {_REMEDY}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _check_magic(path: Path, raw: bytes, magic: int) -> None:
    """Refuse a file whose IDX magic number (its first 4 bytes) is not ``magic``."""
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        raise CorruptFileError(
            f"{path} has IDX magic number {found}, expected {magic} "
            f"({'labels' if magic == IDX_LABELS_MAGIC else 'images'}). Is it the right file? "
            f"{_REMEDY}"
        )


def read_idx_shape(path: str | os.PathLike[str], *, magic: int) -> tuple[int, ...]:
    """The dimensions an IDX file's header declares, reading nothing but the header.

    A check that costs microseconds (e.g. how many samples a file holds), not a verification
    of the data: :func:`read_idx` checks that the data matches the header.

    Raises:
        CorruptFileError: naming the file, if its gzip stream or header is bad or its magic
            number differs from ``magic``.
    """
    path = Path(path)
    ndim = magic & 0xFF
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read(4 + 4 * ndim)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise CorruptFileError(f"{path} is not a complete gzip file ({exc}). {_REMEDY}") from exc
    if len(raw) < 4 + 4 * ndim:
        raise CorruptFileError(f"{path} ends inside its IDX header. {_REMEDY}")
    _check_magic(path, raw, magic)
    return tuple(int(d) for d in struct.unpack(f">{ndim}I", raw[4:]))


def read_idx_images(path: str | os.PathLike[str]) -> np.ndarray:
    """Images as a ``uint8`` array of shape ``(N, H, W)``."""
    return read_idx(path, magic=IDX_IMAGES_MAGIC)


def read_idx_labels(path: str | os.PathLike[str], *, num_classes: int = 10) -> np.ndarray:
    """Labels as a ``uint8`` array of shape ``(N,)``, each checked to be below ``num_classes``."""
    labels = read_idx(path, magic=IDX_LABELS_MAGIC)
    if labels.size and int(labels.max()) >= num_classes:
        raise CorruptFileError(
            f"{path} holds label {int(labels.max())}, outside 0..{num_classes - 1}. {_REMEDY}"
        )
    return labels
