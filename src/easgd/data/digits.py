"""scikit-learn's 8x8 handwritten digits: the offline data set for tests and quick runs.

1797 grey images with values 0..16, split 80/20, stratified by class with a fixed seed, so
every process and every call sees the same split. The CSV file is read straight from
scikit-learn's package data: importing scikit-learn itself costs about a second per process,
which every worker of a run would pay at start-up.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np

__all__ = ["DIGITS_SPLIT_SEED", "DIGITS_TEST_FRACTION", "digits_arrays"]

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_x, train_y, test_x, test_y)``: read-only float32 ``(N, 1, 8, 8)`` in [0, 1].

    Loaded and split once per process; copy before modifying.
    """
    data = np.loadtxt(_digits_csv(), delimiter=",", dtype=np.float32)
    x = (data[:, :-1].reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    y = data[:, -1].astype(np.int64)
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    labels, counts = np.unique(y, return_counts=True)
    # ceil(N * fraction) test images (as scikit-learn's split), shared out between the classes
    # in proportion to their sizes (largest remainders first): a stratified split.
    share = counts * DIGITS_TEST_FRACTION
    per_class = np.floor(share).astype(int)
    extra = int(np.ceil(len(y) * DIGITS_TEST_FRACTION)) - per_class.sum()
    per_class[np.argsort(-(share - per_class), kind="stable")[:extra]] += 1
    test_idx = [
        rng.permutation(np.flatnonzero(y == label))[:n]
        for label, n in zip(labels, per_class, strict=True)
    ]
    test_mask = np.zeros(len(y), dtype=bool)
    test_mask[np.concatenate(test_idx)] = True
    train_x, test_x = np.ascontiguousarray(x[~test_mask]), np.ascontiguousarray(x[test_mask])
    train_y, test_y = y[~test_mask].copy(), y[test_mask].copy()
    for a in (train_x, train_y, test_x, test_y):
        a.flags.writeable = False
    return train_x, train_y, test_x, test_y


def _digits_csv() -> gzip.GzipFile:
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "scikit-learn is needed for the digits data set: pip install scikit-learn"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    return gzip.open(path)
