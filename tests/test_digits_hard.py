"""digits-hard: deterministic per seed, a fixed test set, cached once, loaded like the others."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from easgd.data import DATASET_INFO, load_dataset
from easgd.data.digits import digits_arrays
from easgd.data.digits_hard import (
    DIGITS_HARD_SIZE,
    TEST_COPIES,
    TRAIN_COPIES,
    digits_hard_arrays,
    digits_hard_cache_path,
    distort_digits,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    digits_hard_arrays(0, str(root))  # generated once for the module, then read back
    return root


def test_distortion_is_deterministic_per_seed() -> None:
    x = digits_arrays()[0][:20]
    a, b, c = distort_digits(x, 2, 5), distort_digits(x, 2, 5), distort_digits(x, 2, 6)
    assert a.dtype == np.uint8 and a.shape == (40, 1, DIGITS_HARD_SIZE, DIGITS_HARD_SIZE)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert (a[:20] != a[20:]).any()  # two copies of an image differ
    with pytest.raises(ValueError, match="copies=0"):
        distort_digits(x, 0, 0)


def test_splits_sizes_and_labels(cache: Path) -> None:
    train_x, train_y, test_x, test_y = digits_hard_arrays(0, str(cache))
    info = DATASET_INFO["digits-hard"]
    assert (len(train_y), len(test_y)) == (info.train_size, info.test_size)
    _, y8, _, t8 = digits_arrays()
    np.testing.assert_array_equal(train_y, np.tile(y8, TRAIN_COPIES))
    np.testing.assert_array_equal(test_y, np.tile(t8, TEST_COPIES))
    assert train_x.shape[1:] == test_x.shape[1:] == (1, 28, 28)
    assert not train_x.flags.writeable


def test_the_test_set_is_the_same_for_every_seed(cache: Path) -> None:
    _, _, test0, _ = digits_hard_arrays(0, str(cache))
    train0 = digits_hard_arrays(0, str(cache))[0]
    train1, _, test1, _ = digits_hard_arrays(1, str(cache))
    np.testing.assert_array_equal(test0, test1)
    assert (train0 != train1).any()


def test_the_cache_is_written_once_and_read_back(cache: Path) -> None:
    path = digits_hard_cache_path(0, cache)
    assert path.is_file()
    before, first = path.stat().st_mtime_ns, digits_hard_arrays(0, str(cache))
    digits_hard_arrays.cache_clear()
    again = digits_hard_arrays(0, str(cache))
    assert path.stat().st_mtime_ns == before  # read, not written again
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_damaged_cache_is_generated_again(cache: Path, tmp_path: Path) -> None:
    good = digits_hard_arrays(0, str(cache))
    path = digits_hard_cache_path(0, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an npz file")
    digits_hard_arrays.cache_clear()
    regenerated = digits_hard_arrays(0, str(tmp_path))
    np.testing.assert_array_equal(regenerated[2], good[2])
    assert path.stat().st_size > 1000


def test_load_dataset(cache: Path) -> None:
    ds = load_dataset("digits-hard", cache_dir=cache)
    assert ds.name == "digits-hard" and ds.image_size == 28 and ds.num_classes == 10
    assert ds.train_x.shape == (DATASET_INFO["digits-hard"].train_size, 1, 28, 28)
    assert abs(float(ds.train_x.mean())) < 1e-3  # normalized with the training statistics


def test_the_experiments_have_the_papers_grids() -> None:
    from easgd.experiments import get_experiment

    fig2, fig3 = get_experiment("digits-hard-fig2"), get_experiment("digits-hard-fig3")
    assert (fig2.dataset, fig2.seeds, fig3.seeds) == ("digits-hard", 3, 3)
    assert {r.tau for r in fig2.runs() if r.method == "easgd"} == {1, 4, 16, 64}
    assert {r.workers for r in fig3.runs() if r.method != "msgd"} == {2, 4, 8}
    assert {r.seed for r in fig2.runs()} == {0, 1, 2} and fig2.same_init
