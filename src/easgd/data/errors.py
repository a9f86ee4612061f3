"""Exceptions raised while finding, downloading, verifying or reading a data set.

Every concrete error is also a :class:`ValueError` or a :class:`FileNotFoundError`, so the
command line reports it as one clear line instead of a traceback, and callers can catch all
of them with :class:`DatasetError`.
"""

from __future__ import annotations

__all__ = [
    "ChecksumError",
    "CorruptFileError",
    "DatasetError",
    "DatasetNotFoundError",
    "DownloadError",
]


class DatasetError(RuntimeError):
    """Base class of every data set error in :mod:`easgd.data`."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A file is neither in ``data_dir`` nor in the cache, and downloading is off."""


class DownloadError(DatasetNotFoundError):
    """Every mirror failed (network error, HTTP error, truncated or wrong content)."""


class CorruptFileError(DatasetError, ValueError):
    """A file is present but cannot be read: bad gzip stream, bad header, wrong sizes."""


class ChecksumError(CorruptFileError):
    """A file's MD5 differs from the published one."""
