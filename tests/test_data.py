"""Data sets: reading the real file formats, downloading with MD5 checks, failure messages.

No internet: the tests write small files in the real formats (gzipped IDX, a
cifar-10-python.tar.gz with tiny batches) and serve them from a local HTTP server.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import pickle
import re
import socket
import struct
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from easgd.data import (
    DATASETS,
    SPECS,
    ChecksumError,
    CorruptFileError,
    DatasetError,
    DatasetNotFoundError,
    DatasetSpec,
    DownloadError,
    RandomCrop,
    RestrictedUnpickler,
    default_cache_dir,
    load_dataset,
    read_cifar10,
    read_idx_images,
    read_idx_labels,
)
from easgd.data.cifar import CIFAR10_MEMBERS, restricted_loads

TIMEOUT = 5.0
MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
CIFAR_FILE = "cifar-10-python.tar.gz"

# --------------------------------------------------------------------------- file builders


def idx_gz(array: np.ndarray) -> bytes:
    """A gzipped unsigned-byte IDX file, as published for MNIST."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def mnist_files(seed: int = 0, n_train: int = 20, n_test: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        MNIST_FILES[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        MNIST_FILES[1]: rng.integers(0, 10, n_train, dtype=np.uint8),
        MNIST_FILES[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        MNIST_FILES[3]: rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def cifar_members(
    seed: int = 0, per_batch: int = 10
) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """The six pickled batches of cifar-10-python.tar.gz, ``per_batch`` images each."""
    rng = np.random.default_rng(seed)
    members, xs, ys = {}, [], []
    for name in CIFAR10_MEMBERS:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        batch = {b"batch_label": b"tiny", b"data": data, b"labels": labels}
        members[name] = pickle.dumps(batch, protocol=2)
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(np.array(labels, dtype=np.int64))
    arrays = {
        "train_x": np.concatenate(xs[:5]),
        "train_y": np.concatenate(ys[:5]),
        "test_x": xs[5],
        "test_y": ys[5],
    }
    return members, arrays


def cifar_archive(seed: int = 0, per_batch: int = 10) -> tuple[bytes, dict[str, np.ndarray]]:
    """A cifar-10-python.tar.gz with ``per_batch`` images per batch, pickled as the real one."""
    members, arrays = cifar_members(seed, per_batch)
    return tar_gz(members), arrays


def spec_for(name: str, files: dict[str, bytes]) -> DatasetSpec:
    """The real spec with the MD5s of the test files: the real checksum path still runs."""
    return dataclasses.replace(SPECS[name], files={f: md5(data) for f, data in files.items()})


def all_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- fixtures


class Server:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.truncate: set[str] = set()
        self.requests: list[str] = []
        self.url = ""


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Never touch ~/.cache, never go through a proxy for the local server.
    monkeypatch.setenv("EASGD_DATA_DIR", str(tmp_path / "default-cache"))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            name = self.path.rsplit("/", 1)[-1]
            data = state.files.get(name) if self.path.startswith("/files/") else None
            if data is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            # A truncated transfer: the promised length, half the body, then the close.
            self.wfile.write(data[: len(data) // 2] if name in state.truncate else data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/files/"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


# --------------------------------------------------------------------------- specs and names


def test_real_specs_carry_the_published_md5s() -> None:
    assert dict(SPECS["mnist"].files) == {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }
    assert dict(SPECS["fashion-mnist"].files) == {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    }
    assert dict(SPECS["cifar10"].files) == {CIFAR_FILE: "c58f30108f718f92721af3b95e74349a"}
    assert SPECS["mnist"].mirrors[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/"
    assert SPECS["cifar10"].mirrors == ("https://www.cs.toronto.edu/~kriz/",)
    # digits is scikit-learn's, digits-hard made from it, imagenet your own folder: none of
    # them has files to fetch.
    assert set(SPECS) | {"digits", "digits-hard", "imagenet"} == set(DATASETS)


def test_unknown_name_lists_valid_names() -> None:
    names = r"'svhn'.*digits, digits-hard, mnist, fashion-mnist, cifar10"
    with pytest.raises(ValueError, match=names):
        load_dataset("svhn")


def test_spec_for_another_dataset_is_refused() -> None:
    with pytest.raises(ValueError, match="spec is for 'mnist'"):
        load_dataset("cifar10", spec=SPECS["mnist"], download=False)


def test_default_cache_dir_follows_env(tmp_path: Path) -> None:
    assert default_cache_dir() == tmp_path / "default-cache"


# --------------------------------------------------------------------------- digits


def test_digits_shapes_split_and_normalization() -> None:
    ds = load_dataset("digits")
    assert ds.name == "digits" and ds.num_classes == 10
    assert (ds.in_channels, ds.image_size) == (1, 8)
    assert ds.train_x.shape == (1437, 1, 8, 8) and ds.test_x.shape == (360, 1, 8, 8)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert ds.train_transform is None
    # Stratified: every class has about a fifth of its images in the test split.
    counts = torch.bincount(ds.test_y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    assert abs(ds.train_x.mean().item()) < 1e-5
    assert ds.train_x.std().item() == pytest.approx(1.0, abs=1e-3)
    # The statistics are those of the [0, 1]-scaled training images.
    raw = ds.train_x * ds.std[0] + ds.mean[0]
    assert raw.min().item() == pytest.approx(0.0, abs=1e-6)
    assert raw.max().item() == pytest.approx(1.0, abs=1e-6)


def test_digits_is_deterministic_and_returns_fresh_tensors() -> None:
    a, b = load_dataset("digits"), load_dataset("DIGITS")
    torch.testing.assert_close(a.train_x, b.train_x)
    torch.testing.assert_close(a.test_y, b.test_y)
    a.train_x.zero_()  # must not corrupt the per-process cache
    c = load_dataset("digits")
    torch.testing.assert_close(c.train_x, b.train_x)


# --------------------------------------------------------------------------- MNIST-like


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_download_verify_read_and_cache_hit(server: Server, tmp_path: Path, name: str) -> None:
    arrays = mnist_files()
    server.files = {f: idx_gz(a) for f, a in arrays.items()}
    cache = tmp_path / "cache"
    kwargs = dict(cache_dir=cache, base_url=server.url, spec=spec_for(name, server.files))
    ds = load_dataset(name, timeout=TIMEOUT, **kwargs)  # type: ignore[arg-type]

    assert len(server.requests) == 4
    assert all_files(cache) == sorted(f"{name}/{f}" for f in MNIST_FILES)
    assert ds.train_x.shape == (20, 1, 28, 28) and ds.test_x.shape == (10, 1, 28, 28)
    assert (ds.in_channels, ds.image_size, ds.num_classes) == (1, 28, 10)
    torch.testing.assert_close(
        ds.train_y, torch.from_numpy(arrays[MNIST_FILES[1]].astype(np.int64))
    )
    torch.testing.assert_close(ds.test_y, torch.from_numpy(arrays[MNIST_FILES[3]].astype(np.int64)))
    for x, images in ((ds.train_x, arrays[MNIST_FILES[0]]), (ds.test_x, arrays[MNIST_FILES[2]])):
        expected = torch.from_numpy(images[:, None].astype(np.float32) / 255)
        torch.testing.assert_close(x * ds.std[0] + ds.mean[0], expected, atol=1e-5, rtol=0)
    assert abs(ds.train_x.mean().item()) < 1e-5
    assert ds.train_x.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)

    again = load_dataset(name, download=False, **kwargs)  # type: ignore[arg-type]
    assert len(server.requests) == 4  # a cache hit: no request at all
    torch.testing.assert_close(again.train_x, ds.train_x)


def test_next_mirror_is_tried_after_a_failure(server: Server, tmp_path: Path) -> None:
    server.files = {f: idx_gz(a) for f, a in mnist_files().items()}
    ds = load_dataset(
        "mnist",
        cache_dir=tmp_path,
        base_url=[server.url.replace("/files/", "/gone/"), server.url],
        spec=spec_for("mnist", server.files),
        timeout=TIMEOUT,
    )
    assert ds.train_x.shape[0] == 20
    assert len(server.requests) == 8
    assert server.requests[0].startswith("/gone/") and server.requests[1].startswith("/files/")


def test_missing_file_on_server_names_file_and_urls(server: Server, tmp_path: Path) -> None:
    server.files = {f: idx_gz(a) for f, a in mnist_files().items()}
    spec = spec_for("mnist", server.files)
    del server.files[MNIST_FILES[2]]  # 404
    with pytest.raises(DownloadError) as info:
        load_dataset("mnist", cache_dir=tmp_path, base_url=server.url, spec=spec, timeout=TIMEOUT)
    message = str(info.value)
    assert f"{server.url}{MNIST_FILES[2]}" in message and "404" in message
    assert "--data-dir" in message
    assert isinstance(info.value, FileNotFoundError)  # the CLI reports it in one line
    assert MNIST_FILES[2] not in all_files(tmp_path)
    assert not [f for f in all_files(tmp_path) if f.endswith(".part")]


def test_truncated_download_leaves_nothing_behind(server: Server, tmp_path: Path) -> None:
    server.files = {f: idx_gz(a) for f, a in mnist_files().items()}
    server.truncate = {MNIST_FILES[0]}
    spec = spec_for("mnist", server.files)
    with pytest.raises(
        DownloadError, match=r"(?s)train-images-idx3-ubyte\.gz.*truncated.*--data-dir"
    ):
        load_dataset("mnist", cache_dir=tmp_path, base_url=server.url, spec=spec, timeout=TIMEOUT)
    assert all_files(tmp_path) == []  # the first file failed, nothing else was tried


def test_wrong_md5_download_leaves_nothing_behind(server: Server, tmp_path: Path) -> None:
    server.files = {f: idx_gz(a) for f, a in mnist_files().items()}
    spec = spec_for("mnist", server.files)
    server.files[MNIST_FILES[0]] = idx_gz(mnist_files(seed=1)[MNIST_FILES[0]])  # other content
    with pytest.raises(DownloadError) as info:
        load_dataset("mnist", cache_dir=tmp_path, base_url=server.url, spec=spec, timeout=TIMEOUT)
    message = str(info.value)
    assert MNIST_FILES[0] in message and "MD5 mismatch" in message
    assert spec.files[MNIST_FILES[0]] in message and "--data-dir" in message
    assert all_files(tmp_path) == []


def free_port() -> int:
    """A local port that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_server_names_url_and_suggests_data_dir(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/"  # the connection is refused at once
    with pytest.raises(DownloadError, match=r"(?s)" + re.escape(url) + r"cifar-10.*--data-dir"):
        load_dataset("cifar10", cache_dir=tmp_path, base_url=url, timeout=TIMEOUT)
    assert all_files(tmp_path) == []


def test_data_dir_with_present_files_needs_no_download(tmp_path: Path) -> None:
    arrays = mnist_files()
    files = {f: idx_gz(a) for f, a in arrays.items()}
    raw = tmp_path / "data" / "MNIST" / "raw"  # torchvision's layout is found too
    raw.mkdir(parents=True)
    for f, data in files.items():
        (raw / f).write_bytes(data)
    cache = tmp_path / "cache"
    ds = load_dataset(
        "mnist",
        data_dir=tmp_path / "data",
        cache_dir=cache,
        download=False,
        spec=spec_for("mnist", files),
    )
    assert ds.train_x.shape == (20, 1, 28, 28)
    assert not cache.exists()  # nothing copied, nothing downloaded


def test_data_dir_file_with_wrong_md5_is_reported(tmp_path: Path) -> None:
    files = {f: idx_gz(a) for f, a in mnist_files().items()}
    for f, data in files.items():
        (tmp_path / f).write_bytes(data)
    spec = spec_for("mnist", files)
    bad = idx_gz(mnist_files(seed=3)[MNIST_FILES[1]])
    (tmp_path / MNIST_FILES[1]).write_bytes(bad)
    with pytest.raises(ChecksumError) as info:
        load_dataset(
            "mnist", data_dir=tmp_path, cache_dir=tmp_path / "c", download=False, spec=spec
        )
    message = str(info.value)
    assert str(tmp_path / MNIST_FILES[1]) in message
    assert spec.files[MNIST_FILES[1]] in message and md5(bad) in message
    assert "delete it" in message and "download" in message
    assert (tmp_path / MNIST_FILES[1]).read_bytes() == bad  # the user's file is left alone


def test_missing_file_without_download_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", data_dir=tmp_path / "mine", cache_dir=tmp_path / "c", download=False)
    message = str(info.value)
    assert MNIST_FILES[0] in message
    assert str(tmp_path / "mine") in message and str(tmp_path / "c" / "mnist") in message
    assert "--data-dir" in message and "download=True" in message
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz" in message
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, DatasetError)


def test_bad_cached_file_is_downloaded_again_or_reported(server: Server, tmp_path: Path) -> None:
    server.files = {f: idx_gz(a) for f, a in mnist_files().items()}
    spec = spec_for("mnist", server.files)
    folder = tmp_path / "mnist"
    folder.mkdir()
    for f, data in server.files.items():
        (folder / f).write_bytes(data)
    (folder / MNIST_FILES[0]).write_bytes(b"garbage")
    with pytest.raises(ChecksumError, match=r"train-images-idx3-ubyte\.gz.*Delete it"):
        load_dataset("mnist", cache_dir=tmp_path, download=False, spec=spec)
    load_dataset("mnist", cache_dir=tmp_path, base_url=server.url, spec=spec, timeout=TIMEOUT)
    assert server.requests == [f"/files/{MNIST_FILES[0]}"]
    assert (folder / MNIST_FILES[0]).read_bytes() == server.files[MNIST_FILES[0]]


def test_truncated_gzip_is_a_corrupt_file(tmp_path: Path) -> None:
    files = {f: idx_gz(a) for f, a in mnist_files().items()}
    files[MNIST_FILES[0]] = files[MNIST_FILES[0]][:-100]  # MD5 matches, stream does not
    for f, data in files.items():
        (tmp_path / f).write_bytes(data)
    with pytest.raises(CorruptFileError, match=r"train-images-idx3-ubyte\.gz.*download it again"):
        load_dataset("mnist", data_dir=tmp_path, download=False, spec=spec_for("mnist", files))


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (idx_gz(np.zeros(5, np.uint8)), "magic number 2049, expected 2051"),
        (
            gzip.compress(struct.pack(">IIII", 2051, 2, 3, 3) + bytes(17), mtime=0),
            r"17 bytes.*\(2, 3, 3\)",
        ),
        (gzip.compress(struct.pack(">IIII", 2051, 1, 2, 2) + bytes(5), mtime=0), "5 bytes of data"),
        (gzip.compress(struct.pack(">II", 2051, 1), mtime=0), "ends inside its IDX header"),
        (b"not gzip at all", "not a complete gzip file"),
    ],
)
def test_idx_header_and_size_are_validated(tmp_path: Path, payload: bytes, match: str) -> None:
    path = tmp_path / "images.gz"
    path.write_bytes(payload)
    with pytest.raises(CorruptFileError, match=match):
        read_idx_images(path)


def test_idx_labels_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "labels.gz"
    path.write_bytes(idx_gz(np.array([1, 2, 12], np.uint8)))
    with pytest.raises(CorruptFileError, match="label 12"):
        read_idx_labels(path)


# --------------------------------------------------------------------------- CIFAR-10


def test_cifar10_download_read_crop_and_normalize(server: Server, tmp_path: Path) -> None:
    archive, arrays = cifar_archive()
    server.files = {CIFAR_FILE: archive}
    ds = load_dataset(
        "cifar10",
        cache_dir=tmp_path,
        base_url=server.url,
        spec=spec_for("cifar10", server.files),
        timeout=TIMEOUT,
    )
    assert all_files(tmp_path) == [f"cifar10/{CIFAR_FILE}"]
    assert (ds.in_channels, ds.image_size, ds.num_classes) == (3, 28, 10)
    assert ds.train_x.shape == (50, 3, 32, 32) and ds.test_x.shape == (10, 3, 28, 28)
    torch.testing.assert_close(ds.train_y, torch.from_numpy(arrays["train_y"]))
    torch.testing.assert_close(ds.test_y, torch.from_numpy(arrays["test_y"]))
    mean = torch.tensor(ds.mean).view(1, 3, 1, 1)
    std = torch.tensor(ds.std).view(1, 3, 1, 1)
    train = torch.from_numpy(arrays["train_x"].astype(np.float32) / 255)
    test = torch.from_numpy(arrays["test_x"].astype(np.float32) / 255)
    torch.testing.assert_close(ds.train_x * std + mean, train, atol=1e-5, rtol=0)
    torch.testing.assert_close(ds.test_x * std + mean, test[..., 2:30, 2:30], atol=1e-5, rtol=0)
    # Per-channel statistics of the training set, not of the test set or of all channels.
    torch.testing.assert_close(
        torch.tensor(ds.mean, dtype=torch.float32), train.mean(dim=(0, 2, 3))
    )
    per_channel = ds.train_x.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.std(1, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    assert isinstance(ds.train_transform, RandomCrop) and ds.train_transform.size == 28
    crops = ds.train_transform(ds.train_x[:4], torch.Generator().manual_seed(0))
    assert crops.shape == (4, 3, 28, 28)
    assert "cifar10" in repr(ds)


def test_cifar10_from_data_dir_without_download(tmp_path: Path) -> None:
    archive, arrays = cifar_archive(per_batch=4)
    (tmp_path / CIFAR_FILE).write_bytes(archive)
    ds = load_dataset(
        "cifar10",
        data_dir=tmp_path,
        download=False,
        spec=spec_for("cifar10", {CIFAR_FILE: archive}),
    )
    torch.testing.assert_close(ds.train_y, torch.from_numpy(arrays["train_y"]))


def test_cifar10_members_in_any_order_and_others_never_unpickled(tmp_path: Path) -> None:
    members, arrays = cifar_members(per_batch=3)
    shuffled = dict(reversed(list(members.items())))
    # The real archive also holds batches.meta and readme.html; only the six batches are read.
    shuffled["cifar-10-batches-py/batches.meta"] = MALICIOUS
    shuffled["cifar-10-batches-py/readme.html"] = b"<html></html>"
    path = tmp_path / CIFAR_FILE
    path.write_bytes(tar_gz(shuffled))
    train_x, train_y, test_x, test_y = read_cifar10(path)
    np.testing.assert_array_equal(train_x, arrays["train_x"])
    np.testing.assert_array_equal(train_y, arrays["train_y"])
    np.testing.assert_array_equal(test_x, arrays["test_x"])
    np.testing.assert_array_equal(test_y, arrays["test_y"])


def test_read_cifar10_reports_missing_member_and_truncation(tmp_path: Path) -> None:
    archive, _ = cifar_archive(per_batch=2)
    path = tmp_path / CIFAR_FILE
    path.write_bytes(archive[: len(archive) // 2])
    with pytest.raises(CorruptFileError, match=r"cifar-10-python\.tar\.gz.*download it again"):
        read_cifar10(path)
    members, _ = cifar_members(per_batch=2)
    path.write_bytes(tar_gz({CIFAR10_MEMBERS[0]: members[CIFAR10_MEMBERS[0]]}))
    with pytest.raises(CorruptFileError, match="no member cifar-10-batches-py/data_batch_2"):
        read_cifar10(path)


# A pickle that would call os.system("echo unsafe") if loaded unrestricted. Written by hand
# in protocol 0 opcodes (GLOBAL, MARK, STRING, TUPLE, REDUCE, STOP); it is never executed.
MALICIOUS = b"cos\nsystem\n(S'echo unsafe'\ntR."


def test_restricted_unpickler_refuses_globals_outside_numpy() -> None:
    with pytest.raises(pickle.UnpicklingError, match=r"os\.system"):
        restricted_loads(MALICIOUS)
    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.eval"):
        restricted_loads(b"cbuiltins\neval\n(S'1'\ntR.")
    assert issubclass(RestrictedUnpickler, pickle.Unpickler)


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_restricted_unpickler_rebuilds_numpy_batches(protocol: int) -> None:
    batch = {b"data": np.arange(12, dtype=np.uint8).reshape(2, 6), b"labels": [3, 7]}
    loaded = restricted_loads(pickle.dumps(batch, protocol=protocol))
    np.testing.assert_array_equal(loaded[b"data"], batch[b"data"])
    assert loaded[b"labels"] == [3, 7]


def test_malicious_member_in_archive_is_refused(tmp_path: Path) -> None:
    path = tmp_path / CIFAR_FILE
    path.write_bytes(tar_gz({CIFAR10_MEMBERS[0]: MALICIOUS}))
    with pytest.raises(
        CorruptFileError, match=r"data_batch_1.*refusing to unpickle global os\.system"
    ):
        read_cifar10(path)
