"""Find a data file locally or download it, and never hand back one with the wrong MD5.

:func:`fetch_file` looks, in order, in ``data_dir`` (files the user already has), in the
cache (``$EASGD_DATA_DIR`` or ``~/.cache/easgd/data``, one folder per data set), and then
downloads from each mirror in turn.

Failure behaviour:

- A file in ``data_dir`` whose MD5 is wrong raises :class:`ChecksumError`: it is the user's
  file, so it is never deleted or silently replaced.
- A cached file whose MD5 is wrong is downloaded again when ``download=True`` (the cache is
  ours), and raises :class:`ChecksumError` otherwise.
- A download goes to a hidden temporary file beside the final name; only a complete file
  with the right MD5 is moved into place (``os.replace``, atomic on one file system), and the
  temporary file is removed on any failure, interrupts included. Concurrent workers that
  download the same file therefore never see half a file.
- When every mirror fails, :class:`DownloadError` lists each URL with its reason and says
  how to supply the file by hand.
- ``verify=False`` (``easgd train --no-verify``: your own files under the canonical names):
  a file in ``data_dir`` or in the cache whose MD5 differs is used as it is, never replaced,
  and a warning names it (:data:`MISMATCH_WARNING`); a download is still verified.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from easgd.data.errors import ChecksumError, DatasetNotFoundError, DownloadError

__all__ = ["DEFAULT_TIMEOUT", "MISMATCH_WARNING", "default_cache_dir", "fetch_file", "md5sum"]

logger = logging.getLogger(__name__)

#: Seconds a socket may wait to connect or between two reads before the mirror counts as down.
DEFAULT_TIMEOUT = 30.0

_CHUNK = 1 << 20
#: The warning (a ``logging`` format of path, actual and expected MD5) for a file used
#: with ``verify=False`` although its MD5 differs.
MISMATCH_WARNING = "%s has MD5 %s, not the published %s: used as it is (--no-verify)"
_NO_VERIFY = " Or, to train on this file as it is, pass --no-verify (verify=False)."
# (path, MD5) of the files this process warned about: once each, not at every load.
_WARNED: set[tuple[str, str]] = set()


def default_cache_dir() -> Path:
    """``$EASGD_DATA_DIR`` if set, else ``~/.cache/easgd/data``."""
    env = os.environ.get("EASGD_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "easgd" / "data"


def md5sum(path: str | os.PathLike[str]) -> str:
    """Hex MD5 of a file, read in chunks (the digest checks integrity, not authenticity)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _mismatch_message(path: Path, expected: str, actual: str, remedy: str) -> str:
    return (
        f"{path} has MD5 {actual} but {path.name} should have MD5 {expected}: the file is "
        f"incomplete, corrupt or a different file. {remedy}"
    )


def fetch_file(
    filename: str,
    md5: str,
    *,
    mirrors: Sequence[str],
    cache_dir: Path,
    data_dir: Path | None = None,
    data_subdirs: Sequence[str] = (),
    download: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    verify: bool = True,
) -> Path:
    """Return the path of ``filename`` with MD5 ``md5``, downloading it if needed.

    Args:
        filename: the file's name on the mirrors and on disk.
        md5: its expected hex MD5.
        mirrors: base URLs tried in order; ``filename`` is appended to each.
        cache_dir: folder downloads go to (created when needed).
        data_dir: folder of files the user already has, looked at first (default None).
        data_subdirs: subfolders of ``data_dir`` also looked in, before ``data_dir`` itself,
            e.g. torchvision's ``MNIST/raw`` (default none).
        download: whether a missing file may be downloaded (default True).
        timeout: socket timeout in seconds for each connection and read (default 30).
        verify: False: a file present (``data_dir``, the cache) whose MD5 differs is used,
            with a warning naming it (default True: refused, or downloaded again).
    """
    user_folders = [] if data_dir is None else [*(data_dir / s for s in data_subdirs), data_dir]
    for folder in user_folders:
        path = folder / filename
        if path.is_file():
            actual = md5sum(path)
            if actual != md5 and not verify:
                _warn_mismatch(path, actual, md5)
            elif actual != md5:
                raise ChecksumError(
                    _mismatch_message(
                        path,
                        md5,
                        actual,
                        "Replace it with the original file, or delete it and run without "
                        "--data-dir (download=True) to download a fresh copy." + _NO_VERIFY,
                    )
                )
            logger.debug("using %s", path)
            return path

    path = cache_dir / filename
    if path.is_file():
        actual = md5sum(path)
        if actual == md5:
            logger.debug("using cached %s", path)
            return path
        if not verify:
            _warn_mismatch(path, actual, md5)
            return path
        if not download:
            raise ChecksumError(
                _mismatch_message(
                    path,
                    md5,
                    actual,
                    f"Delete it and allow downloading (download=True) to fetch it again, or "
                    f"pass --data-dir with a good copy. URL: {_join(mirrors[0], filename)}."
                    + _NO_VERIFY,
                )
            )
        logger.warning("cached %s has a wrong MD5 (%s); downloading it again", path, actual)

    if not download:
        looked = ", ".join(str(folder) for folder in [*user_folders, cache_dir])
        raise DatasetNotFoundError(
            f"{filename} not found; looked in: {looked}. Pass --data-dir "
            f"(data_dir=) pointing to a folder that holds it, or allow downloading "
            f"(download=True) from {_join(mirrors[0], filename)}"
        )

    cache_dir.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    for base in mirrors:
        url = _join(base, filename)
        try:
            _download(url, path, md5, timeout=timeout)
            return path
        except (OSError, http.client.HTTPException, ValueError) as exc:
            # OSError covers URLError, HTTPError, timeouts and resets; ValueError a bad URL.
            if isinstance(exc, urllib.error.HTTPError):
                exc.close()  # an HTTPError holds the open response
            logger.warning("download of %s failed: %s", url, exc)
            failures.append(f"  {url}: {exc}")
    raise DownloadError(
        f"could not download {filename}; tried:\n"
        + "\n".join(failures)
        + f"\nCheck the network, or download {filename} yourself into a folder and pass "
        f"--data-dir (data_dir=) pointing to it."
    )


def _warn_mismatch(path: Path, actual: str, md5: str) -> None:
    if (str(path), actual) not in _WARNED:
        _WARNED.add((str(path), actual))
        logger.warning(MISMATCH_WARNING, path, actual, md5)


def _join(base: str, filename: str) -> str:
    return base.rstrip("/") + "/" + filename


def _download(url: str, path: Path, md5: str, *, timeout: float) -> None:
    """Download ``url`` to ``path`` via a temporary file; raise OSError-like on failure."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise ValueError(f"unsupported URL scheme {scheme!r} (use http or https)")
    # A fresh opener reads the proxy settings of the environment at call time.
    opener = urllib.request.build_opener()
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, opener.open(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0)
            logger.info("downloading %s (%s bytes) to %s", url, total or "?", path)
            received, next_report = 0, 0.1
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                if total and received / total >= next_report:
                    logger.info("%s: %.0f%%", path.name, 100 * received / total)
                    next_report += 0.1
        if total and received != total:
            raise OSError(f"truncated download: received {received} of {total} bytes")
        actual = digest.hexdigest()
        if actual != md5:
            raise OSError(f"MD5 mismatch: expected {md5}, got {actual} ({received} bytes)")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
