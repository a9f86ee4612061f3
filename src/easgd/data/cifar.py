"""Reader for ``cifar-10-python.tar.gz``, straight from the archive.

The archive holds ``cifar-10-batches-py/data_batch_1`` .. ``data_batch_5`` and
``test_batch``: Python pickles of a dict with ``b"data"`` (``uint8``, ``N x 3072``, each row
the red, green then blue 32x32 planes) and ``b"labels"`` (a list of ints).

Unpickling can run arbitrary code, so only those six members are ever read, each with
:class:`RestrictedUnpickler`, which resolves nothing but the few numpy callables that rebuild
an array. Nothing is extracted to disk.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np

from easgd.data.errors import CorruptFileError

__all__ = ["CIFAR10_MEMBERS", "RestrictedUnpickler", "read_cifar10", "restricted_loads"]

_PREFIX = "cifar-10-batches-py/"
CIFAR10_MEMBERS = (*(f"{_PREFIX}data_batch_{i}" for i in range(1, 6)), f"{_PREFIX}test_batch")

_REMEDY = "Delete it and download it again (download=True), or pass --data-dir with a good copy."

# The globals an ndarray's pickle refers to, whichever numpy (1.x: numpy.core, 2.x:
# numpy._core) or Python (protocol 2 bytes go through _codecs.encode) wrote it. Each maps to
# the object itself, so no module is imported by name while unpickling.
_reconstruct = cast(Callable[..., Any], np.zeros(0).__reduce__()[0])
_ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global except those needed to rebuild numpy arrays.

    Dicts, lists, ints and bytes need no globals at all. Anything else (``os.system``,
    ``builtins.eval``, ...) raises :class:`pickle.UnpicklingError` before it is looked up.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to unpickle global {module}.{name}: only numpy arrays are allowed"
            ) from None


def restricted_loads(data: bytes) -> Any:
    """``pickle.loads`` through :class:`RestrictedUnpickler` (Python 2 strings as bytes)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


def _parse_batch(raw: bytes, member: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = restricted_loads(raw)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise CorruptFileError(f"{path}: cannot read {member} ({exc}). {_REMEDY}") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise CorruptFileError(f"{path}: {member} is not a CIFAR-10 batch dict. {_REMEDY}")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2):
        raise CorruptFileError(f"{path}: {member} data is not a uint8 matrix. {_REMEDY}")
    if data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise CorruptFileError(
            f"{path}: {member} has data of shape {data.shape} and {labels.size} labels; "
            f"expected (N, 3072) and N labels. {_REMEDY}"
        )
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) > 9):
        raise CorruptFileError(f"{path}: {member} has labels outside 0..9. {_REMEDY}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_cifar10(
    path: str | os.PathLike[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_x, train_y, test_x, test_y)``: ``uint8`` ``(N, 3, 32, 32)`` and ``int64``."""
    path = Path(path)
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        # One streaming pass: the archive's members are not in our order, and random access
        # into a gzip stream would decompress it again for every backward seek.
        with tarfile.open(path, "r|gz") as tar:
            for info in tar:
                f = tar.extractfile(info) if info.name in CIFAR10_MEMBERS else None
                if f is not None:
                    found[info.name] = _parse_batch(f.read(), info.name, path)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise CorruptFileError(
            f"{path} is not a complete tar.gz archive ({exc}). {_REMEDY}"
        ) from exc
    missing = [m for m in CIFAR10_MEMBERS if m not in found]
    if missing:
        raise CorruptFileError(f"{path} has no member {', '.join(missing)}. {_REMEDY}")
    batches = [found[m] for m in CIFAR10_MEMBERS]
    train = batches[:-1]
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    test_x, test_y = batches[-1]
    return train_x, train_y, test_x, test_y
