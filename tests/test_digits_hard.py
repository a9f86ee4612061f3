"""digits-hard: deterministic per seed, a fixed test set, cached once, loaded like the others."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from easgd.data import DATASET_INFO, load_dataset, locate_dataset
from easgd.data.digits import digits_arrays
from easgd.data.digits_hard import (
    DIGITS_HARD_SIZE,
    TEST_COPIES,
    TRAIN_COPIES,
    _smooth,
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


def test_the_blur_does_not_depend_on_its_block() -> None:
    """The elastic field is blurred in blocks of planes (bounded memory), to the same bytes."""
    gen = torch.Generator().manual_seed(3)
    field = 2 * torch.rand(37, 2, 28, 28, generator=gen, dtype=torch.float64) - 1
    whole = _smooth(field, 4.0, block=10_000)
    for block in (1, 5, 74):
        assert torch.equal(_smooth(field, 4.0, block=block), whole)


def test_generating_the_set_needs_well_under_a_gigabyte() -> None:
    """Generated at once, the blur's unfolded input took 3.6 GB: 4.2 GB per process, and the
    six processes of a sweep's first run, each generating it, were ended by the OOM killer.

    The peak is the kernel's ``VmHWM``, reset first (``clear_refs`` 5): ``ru_maxrss`` is not
    a measure here, a child started by ``fork`` + ``exec`` inherits its parent's high-water
    mark, which hid the 4.2 GB whenever this process had generated the set before."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident size")
    code = (
        "import re, torch; torch.set_num_threads(1)\n"
        "from easgd.data.digits_hard import _generate\n"
        "def kb(field):\n"
        "    text = open('/proc/self/status').read()\n"
        "    return int(re.search(field + r':\\s+(\\d+) kB', text).group(1))\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "base = kb('VmRSS')\n"
        "_generate(0)\n"
        "print(kb('VmHWM') - base)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600, check=True)  # fmt: skip
    grown_mb = int(out.stdout.split()[-1]) / 1024
    assert grown_mb < 1000, f"generating digits-hard grew the process by {grown_mb:.0f} MB"


def test_a_process_that_finds_the_set_being_generated_waits_for_it(
    cache: Path, tmp_path: Path
) -> None:
    """Two readers find no cache while another process holds the generation lock: they wait
    for it and read its file, instead of each generating (and holding) their own copy."""
    fcntl = pytest.importorskip("fcntl")
    path = digits_hard_cache_path(0, tmp_path)
    path.parent.mkdir(parents=True)
    code = (
        "import hashlib, logging, sys\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
        "from easgd.data.digits_hard import digits_hard_arrays\n"
        f"a = digits_hard_arrays(0, {str(tmp_path)!r})\n"
        "print(hashlib.sha256(a[0].tobytes() + a[2].tobytes()).hexdigest())"
    )
    procs: list[subprocess.Popen[str]] = []
    try:
        with open(path.with_name(path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # as the generating process holds it
            for _ in range(2):
                argv = [sys.executable, "-c", code]
                pipe = subprocess.PIPE
                procs.append(subprocess.Popen(argv, text=True, stdout=pipe, stderr=pipe))
            for proc in procs:  # each says it waits (or exits: it did not wait)
                assert proc.stderr is not None
                said = []
                for line in proc.stderr:
                    said.append(line)
                    if "waiting for it" in line:
                        break
                else:
                    pytest.fail(f"a reader did not wait for the lock: {''.join(said)}")
            shutil.copyfile(digits_hard_cache_path(0, cache), path)  # the holder's file
        outs = [proc.communicate(timeout=600) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    train_x, _, test_x, _ = digits_hard_arrays(0, str(cache))
    expected = hashlib.sha256(train_x.tobytes() + test_x.tobytes()).hexdigest()
    for proc, (out, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err
        assert "generating digits-hard" not in err  # read the holder's file
        assert out.split()[-1] == expected


def test_locating_digits_hard_generates_it_for_the_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep locates its data set once before its first run; for digits-hard that now
    writes the cache its runs' processes read (it used to return nothing and write nothing,
    so every process of the first run generated the set)."""
    import easgd.data.digits_hard as digits_hard
    from easgd.cli.experiment import _prepare_data

    def small(seed: int) -> dict[str, np.ndarray]:  # the plumbing, not the distortions
        x = np.full((10, 1, DIGITS_HARD_SIZE, DIGITS_HARD_SIZE), seed, dtype=np.uint8)
        return {"train_x": x, "train_y": np.arange(10), "test_x": x, "test_y": np.arange(10)}

    monkeypatch.setattr(digits_hard, "_generate", small)
    monkeypatch.setenv("EASGD_DATA_DIR", str(tmp_path / "default"))
    path = digits_hard_cache_path(0, tmp_path / "default")
    assert not path.exists()
    _prepare_data("digits-hard", None)
    assert path.is_file()
    found = locate_dataset("digits-hard", cache_dir=tmp_path / "explicit")
    assert found == {path.name: digits_hard_cache_path(0, tmp_path / "explicit")}
    np.testing.assert_array_equal(np.load(found[path.name])["test_x"], np.load(path)["test_x"])
