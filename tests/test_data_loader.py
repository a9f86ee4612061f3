"""Batch transforms and the deterministic mini-batch streams the workers and simulator share."""

from __future__ import annotations

import pickle

import pytest
import torch

from easgd.data import BatchStream, RandomCrop, center_crop, channel_stats, iter_batches, normalize_

# --------------------------------------------------------------------------- transforms


def numbered_images(n: int = 8, c: int = 3, size: int = 32) -> torch.Tensor:
    """Every pixel holds its own flat index, so a crop's content reveals its offset."""
    return torch.arange(n * c * size * size, dtype=torch.float32).view(n, c, size, size)


def test_center_crop_is_the_middle_28x28() -> None:
    x = numbered_images()
    torch.testing.assert_close(center_crop(x, 28), x[..., 2:30, 2:30])
    torch.testing.assert_close(center_crop(x, 32), x)


def test_random_crop_windows_are_real_windows_with_per_image_offsets() -> None:
    x = numbered_images(n=64)
    crops = RandomCrop(28)(x, torch.Generator().manual_seed(0))
    assert crops.shape == (64, 3, 28, 28)
    offsets = set()
    for i in range(64):
        top, left = divmod(int(crops[i, 0, 0, 0] - x[i, 0, 0, 0]), 32)
        assert 0 <= top <= 4 and 0 <= left <= 4
        torch.testing.assert_close(crops[i], x[i, :, top : top + 28, left : left + 28])
        offsets.add((top, left))
    assert len(offsets) > 5  # each image draws its own offset


def test_random_crop_depends_only_on_the_generator() -> None:
    x = numbered_images()
    crop = RandomCrop(28)
    a = crop(x, torch.Generator().manual_seed(1))
    b = crop(x, torch.Generator().manual_seed(1))
    c = crop(x, torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)


def test_random_crop_pickles_for_spawned_workers() -> None:
    crop = pickle.loads(pickle.dumps(RandomCrop(28)))
    assert isinstance(crop, RandomCrop) and crop.size == 28 and repr(crop) == "RandomCrop(28)"


@pytest.mark.parametrize(
    ("size", "error"),
    [(28, None), (32, None), (1, None), (33, "crop size=33 must be in 1..32"), (0, "Invalid crop")],
)
def test_crop_size_table(size: int, error: str | None) -> None:
    x = torch.zeros(2, 3, 32, 32)
    if error is None:
        assert RandomCrop(size)(x, torch.Generator()).shape == (2, 3, size, size)
        assert center_crop(x, size).shape == (2, 3, size, size)
    else:
        with pytest.raises(ValueError, match=error):
            RandomCrop(size)(x, torch.Generator())


def test_normalization_gives_zero_mean_unit_std_per_channel() -> None:
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.5, 2.0, 10.0]).view(1, 3, 1, 1)
    shift = torch.tensor([0.1, -3.0, 7.0]).view(1, 3, 1, 1)
    x = torch.rand(100, 3, 6, 6, generator=g) * scale + shift
    mean, std = channel_stats(x, chunk=7)  # chunks that do not divide N
    expected_std = x.transpose(0, 1).reshape(3, -1).std(1, unbiased=False)
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float32), expected_std)
    normalize_(x, mean, std)
    flat = x.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(1, unbiased=False), torch.ones(3), atol=1e-5, rtol=0)


def test_constant_channel_is_not_divided_by_zero() -> None:
    mean, std = channel_stats(torch.full((4, 1, 2, 2), 3.0))
    assert mean == (3.0,) and std == (1.0,)


# --------------------------------------------------------------------------- BatchStream


def indexed(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x[i] = i as a float feature, y[i] = i: a batch's y lists the samples it holds."""
    return torch.arange(n, dtype=torch.float32).view(n, 1), torch.arange(n)


def take(stream: BatchStream, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(stream) for _ in range(steps)]


def test_same_seed_same_batches_other_seed_other_batches() -> None:
    x, y = indexed(50)
    torch.manual_seed(123)  # global RNG state must not matter
    a = take(BatchStream(x, y, 8, seed=7), 20)
    torch.manual_seed(456)
    b = take(BatchStream(x, y, 8, seed=7), 20)
    c = take(BatchStream(x, y, 8, seed=8), 20)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        torch.testing.assert_close(xa, xb)
        torch.testing.assert_close(ya, yb)
    assert any(not torch.equal(ya, yc) for (_, ya), (_, yc) in zip(a, c, strict=True))


def test_every_index_once_per_epoch_and_a_new_order_each_epoch() -> None:
    x, y = indexed(12)
    stream = BatchStream(x, y, 4, seed=0)
    assert stream.steps_per_epoch == 3
    orders = []
    for epoch in range(3):
        batches = take(stream, 3)
        assert stream.epoch == epoch and stream.position == 12
        order = torch.cat([yb for _, yb in batches])
        assert sorted(order.tolist()) == list(range(12))
        torch.testing.assert_close(torch.cat([xb for xb, _ in batches]).view(-1), order.float())
        orders.append(order)
    assert not torch.equal(orders[0], orders[1])
    assert stream.steps == 9


def test_partial_last_batch_is_dropped() -> None:
    x, y = indexed(10)
    stream = BatchStream(x, y, 4, seed=3)
    sizes = [len(yb) for _, yb in take(stream, 5)]
    assert sizes == [4] * 5
    assert (stream.epoch, stream.position, stream.steps) == (2, 4, 5)


def test_epoch_permutation_seed_is_stable() -> None:
    # The documented recipe: epoch e's order is randperm under seed * 1_000_003 + e.
    x, y = indexed(9)
    stream = BatchStream(x, y, 3, seed=5)
    _ = take(stream, 3)
    _, yb = next(stream)  # first batch of epoch 1
    expected = torch.randperm(9, generator=torch.Generator().manual_seed(5 * 1_000_003 + 1))
    torch.testing.assert_close(yb, expected[:3])


@pytest.mark.parametrize("with_transform", [False, True])
def test_state_dict_round_trip_resumes_the_identical_sequence(with_transform: bool) -> None:
    x, y = numbered_images(n=20), torch.arange(20)
    transform = RandomCrop(28) if with_transform else None
    stream = BatchStream(x, y, 6, seed=11, transform=transform)
    _ = take(stream, 5)
    state = stream.state_dict()
    expected = take(stream, 7)

    restarted = BatchStream(x, y, 6, seed=0, transform=transform)
    restarted.load_state_dict(state)
    assert (restarted.epoch, restarted.position, restarted.steps) == (
        state["epoch"],
        state["position"],
        state["steps"],
    )
    for (xa, ya), (xb, yb) in zip(expected, take(restarted, 7), strict=True):
        torch.testing.assert_close(xa, xb)
        torch.testing.assert_close(ya, yb)
    if with_transform:
        assert expected[0][0].shape == (6, 3, 28, 28)


def test_transform_gets_a_fresh_generator_each_step() -> None:
    x = numbered_images(n=4)
    stream = BatchStream(x, torch.arange(4), 4, seed=0, transform=RandomCrop(28))
    crops = [xb for xb, _ in take(stream, 4)]
    # Same four images every step (one batch per epoch), different crops.
    assert len({tuple(c[:, 0, 0, 0].tolist()) for c in crops}) > 1


def test_load_state_dict_refuses_another_stream() -> None:
    x, y = indexed(12)
    state = BatchStream(x, y, 4, seed=0).state_dict()
    with pytest.raises(ValueError, match="batch_size=4 but this stream has batch_size=3"):
        BatchStream(x, y, 3, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples=12 but this stream has num_samples=10"):
        BatchStream(*indexed(10), 4, seed=0).load_state_dict(state)


@pytest.mark.parametrize(
    ("batch_size", "error"),
    [
        (1, None),
        (12, None),
        (0, r"Invalid batch_size: 0; it must be an integer in 1\.\.12"),
        (13, r"Invalid batch_size: 13.*1\.\.12 \(the number of samples\)"),
        (2.0, "Invalid batch_size: 2.0"),
        (True, "Invalid batch_size: True"),
    ],
)
def test_batch_size_table(batch_size: int, error: str | None) -> None:
    x, y = indexed(12)
    if error is None:
        assert len(next(BatchStream(x, y, batch_size, seed=0))[1]) == batch_size
    else:
        with pytest.raises(ValueError, match=error):
            BatchStream(x, y, batch_size, seed=0)


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="x has 5 samples but y has 4"):
        BatchStream(torch.zeros(5, 1), torch.zeros(4), 2, seed=0)


# --------------------------------------------------------------------------- iter_batches


def test_iter_batches_is_sequential_with_a_short_last_batch() -> None:
    x, y = indexed(10)
    batches = list(iter_batches(x, y, 4))
    assert [len(yb) for _, yb in batches] == [4, 4, 2]
    torch.testing.assert_close(torch.cat([yb for _, yb in batches]), y)


def test_iter_batches_validates_at_the_call() -> None:
    x, y = indexed(10)
    with pytest.raises(ValueError, match="Invalid batch_size: 0"):
        iter_batches(x, y, 0)  # raises before iteration starts
