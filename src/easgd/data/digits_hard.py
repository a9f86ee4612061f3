"""``digits-hard``: a harder, embedded twin of scikit-learn's digits that does not saturate.

The 8x8 digits reach their floor in a second or two of training, before the methods of the
paper separate. This set is made from the same images (no download), 28x28 like MNIST:

1. each 8x8 digit is upsampled (bilinear) to 20x20 and centered on a 28x28 canvas;
2. a random affine map: rotation within +-15 degrees, scale 0.85-1.1, shear within +-0.2,
   shift within +-3 pixels;
3. a random elastic distortion (Simard et al. 2003): a displacement field of uniform noise
   smoothed by a Gaussian of sigma 4 pixels, scaled to 1 pixel RMS;
4. a random contrast in 0.6-1, then Gaussian pixel noise of std 0.1, clipped to [0, 1],
   and quantized to 8 bits.

Training set: :data:`TRAIN_COPIES` distorted copies of each of digits' 1437 training images,
drawn from ``seed`` (default 0): deterministic per seed. Test set: :data:`TEST_COPIES` copies
of each of its 360 test images, always from :data:`TEST_SEED` whatever ``seed`` is, so every
training set is scored on the same images; the originals of the two splits are digits' own
disjoint split (:mod:`easgd.data.digits`). Every choice above is ours (nothing like it is in
the paper).

The arrays are generated once and cached as ``digits-hard/v<VERSION>-seed<seed>.npz``
under the data cache (``$EASGD_DATA_DIR`` or ``~/.cache/easgd/data``), written
atomically, so the workers of a run read the file the launcher's preflight wrote
(``easgd train``'s preflight, and :func:`easgd.data.locate_dataset` before a sweep's first
run). A process that finds the file missing while another is generating it waits for that
one (a file lock) rather than generating its own copy.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from easgd.data.digits import digits_arrays
from easgd.data.download import default_cache_dir

__all__ = [
    "DIGITS_HARD_SIZE",
    "DIGITS_HARD_VERSION",
    "TEST_COPIES",
    "TEST_SEED",
    "TRAIN_COPIES",
    "digits_hard_arrays",
    "digits_hard_cache_path",
    "distort_digits",
]

logger = logging.getLogger(__name__)

#: Bumped whenever the generation changes: a cache of another version is never read.
DIGITS_HARD_VERSION = 1
DIGITS_HARD_SIZE = 28
TRAIN_COPIES = 8
TEST_COPIES = 3
#: The seed of the test set's distortions, whatever the training seed.
TEST_SEED = 1_000_003

_INNER = 20  # the digit's side on the canvas (MNIST's 20x20 box in 28x28)
_ROTATION = math.radians(15.0)
_SCALE = (0.85, 1.1)
_SHEAR = 0.2
_SHIFT = 3.0  # pixels
_ELASTIC_SIGMA = 4.0  # pixels
_ELASTIC_RMS = 1.0  # pixels
_CONTRAST = (0.6, 1.0)
_NOISE = 0.1


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = math.ceil(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    return k / k.sum()


#: Planes blurred per convolution call. ``conv2d`` unfolds its input into a matrix of
#: ``taps x H x W`` values per plane (25 taps at sigma 4): 3.6 GB in float64 for the 22,992
#: planes of the training set at once, which was every worker's peak when the workers of a
#: run generated the set together (the kernel's OOM killer ended a sweep's first run). In
#: blocks of 1024 planes the peak is 160 MB, and the bytes are the same: a plane's blur
#: does not depend on the others (tests/test_digits_hard.py holds it).
_SMOOTH_BLOCK = 1024


def _smooth(field: torch.Tensor, sigma: float, block: int = _SMOOTH_BLOCK) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, C, H, W)``, reflecting at the borders.

    Done ``block`` planes at a time (:data:`_SMOOTH_BLOCK`), so the memory it needs does not
    grow with ``N``; the result does not depend on ``block``.
    """
    k = _gaussian_kernel(sigma)
    r = (len(k) - 1) // 2
    n, c, h, w = field.shape
    planes = field.reshape(n * c, 1, h, w)
    out = torch.empty_like(planes)
    for start in range(0, n * c, block):
        x = planes[start : start + block]
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
        out[start : start + block] = F.conv2d(
            F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1)
        )
    return out.reshape(n, c, h, w)


def distort_digits(images: np.ndarray, copies: int, seed: int) -> np.ndarray:
    """``copies`` distorted 28x28 versions of each 8x8 image in ``images``, as ``uint8``.

    ``images``: float ``(N, 1, 8, 8)`` in [0, 1]. Returns ``(copies * N, 1, 28, 28)``, copy
    ``k`` of image ``i`` at row ``k * N + i``; the same ``(images, copies, seed)`` always
    gives the same bytes (float64 throughout, one generator).
    """
    if copies < 1:
        raise ValueError(f"copies={copies!r} must be >= 1")
    gen = torch.Generator().manual_seed(int(seed))
    base = torch.from_numpy(np.asarray(images, dtype=np.float64)).repeat(copies, 1, 1, 1)
    n = base.shape[0]
    pad = (DIGITS_HARD_SIZE - _INNER) // 2
    x = F.interpolate(base, size=(_INNER, _INNER), mode="bilinear", align_corners=False)
    x = F.pad(x, (pad, pad, pad, pad))
    # Affine map, in affine_grid's normalized coordinates ([-1, 1] across the canvas).
    angle = _uniform(n, -_ROTATION, _ROTATION, gen)
    scale = _uniform(n, *_SCALE, gen)
    shear = _uniform(n, -_SHEAR, _SHEAR, gen)
    shift = _uniform(2 * n, -_SHIFT, _SHIFT, gen).view(n, 2) * (2.0 / DIGITS_HARD_SIZE)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos, -sin + shear * cos, shift[:, 0]], dim=1),
            torch.stack([sin, cos + shear * sin, shift[:, 1]], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Elastic field: smoothed uniform noise, scaled to _ELASTIC_RMS pixels per image.
    field = _smooth(2 * torch.rand(n, 2, *x.shape[2:], generator=gen, dtype=torch.float64) - 1,
                    _ELASTIC_SIGMA)  # fmt: skip
    rms = field.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)
    field = field / rms * (_ELASTIC_RMS * 2.0 / DIGITS_HARD_SIZE)
    grid = grid + field.permute(0, 2, 3, 1)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = x * _uniform(n, *_CONTRAST, gen).view(n, 1, 1, 1)
    x = x + _NOISE * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    return np.rint(x.clamp(0.0, 1.0).numpy() * 255.0).astype(np.uint8)


def digits_hard_cache_path(seed: int = 0, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the arrays of ``seed`` are cached (``cache_dir`` default: the data cache)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "digits-hard" / f"v{DIGITS_HARD_VERSION}-seed{int(seed)}.npz"


def _generate(seed: int) -> dict[str, np.ndarray]:
    train_x, train_y, test_x, test_y = digits_arrays()
    return {
        "train_x": distort_digits(train_x, TRAIN_COPIES, seed),
        "train_y": np.tile(train_y, TRAIN_COPIES),
        "test_x": distort_digits(test_x, TEST_COPIES, TEST_SEED),
        "test_y": np.tile(test_y, TEST_COPIES),
    }


def _read_cache(path: Path, *, warn: bool = True) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the file is absent or unreadable (then regenerated)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("train_x", "train_y", "test_x", "test_y")}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as exc:
        if warn:
            logger.warning("%s is unreadable (%s): generating digits-hard again", path, exc)
        return None
    side = (1, DIGITS_HARD_SIZE, DIGITS_HARD_SIZE)
    if any(arrays[f"{s}_x"].shape[1:] != side for s in ("train", "test")) or any(
        len(arrays[f"{s}_x"]) != len(arrays[f"{s}_y"]) for s in ("train", "test")
    ):
        if warn:
            logger.warning("%s has the wrong shapes: generating digits-hard again", path)
        return None
    return arrays


@contextlib.contextmanager
def _generation_lock(path: Path) -> Iterator[None]:
    """Hold ``<path>.lock`` (``flock``), so one process generates and the others wait.

    The workers, server and evaluator of a run, or the ranks of a torchrun job, may all
    find the cache missing at once; each generating its own copy multiplied the memory by
    the number of processes. The lock is the kernel's: it is released when its holder
    exits, however it exits. Where no lock can be taken (no ``fcntl``, a read-only cache
    folder) every process generates, as before.
    """
    try:
        import fcntl
    except ImportError:  # not on POSIX
        yield
        return
    lock = path.with_name(path.name + ".lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        logger.debug("no lock for %s (%s): generating without one", path, exc)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another process is generating %s: waiting for it", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@functools.lru_cache(maxsize=2)
def digits_hard_arrays(
    seed: int = 0, cache_dir: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_x, train_y, test_x, test_y)``: read-only ``uint8`` ``(N, 1, 28, 28)`` images
    and ``int64`` labels; 11496 training and 1080 test images.

    Read from the cache (:func:`digits_hard_cache_path`), or generated (about a second) and
    written there atomically; a cache that cannot be written is only logged.
    """
    from easgd.runlog import atomic_write_bytes

    path = digits_hard_cache_path(seed, cache_dir)
    arrays = _read_cache(path)
    if arrays is None:
        with _generation_lock(path):
            arrays = _read_cache(path, warn=False)  # written meanwhile by the lock's holder?
            if arrays is None:
                logger.info("generating digits-hard (seed %d) into %s", seed, path)
                arrays = _generate(seed)
                buf = io.BytesIO()
                np.savez(buf, **arrays)  # type: ignore[arg-type]
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_bytes(path, buf.getvalue(), mode=0o644)
                except OSError as exc:
                    logger.warning(
                        "cannot cache digits-hard in %s (%s); generated in memory", path, exc
                    )
    out = (
        np.ascontiguousarray(arrays["train_x"], dtype=np.uint8),
        np.ascontiguousarray(arrays["train_y"], dtype=np.int64),
        np.ascontiguousarray(arrays["test_x"], dtype=np.uint8),
        np.ascontiguousarray(arrays["test_y"], dtype=np.int64),
    )
    for a in out:
        a.flags.writeable = False
    return out
