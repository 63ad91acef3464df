"""Lazy ``folder:`` and ``npz:`` datasets: the same items as the old eager loaders, seeded statistics samples,
memory that does not grow with the number of images, damaged files, and DataLoader workers."""

from __future__ import annotations

import pickle
import re
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from old_eager_loaders import Eager, all_inputs, load_folder, load_npz
from old_eager_loaders import channel_mean_std as old_channel_mean_std

from saal.core.scan import batches
from saal.data import load_dataset
from saal.data.arrays import NpzArrayDataset
from saal.data.arrays import load as load_arrays
from saal.data.base import ArrayDataset, DatasetBundle, channel_mean_std, stats_indices, streamed_mean_std
from saal.data.image_folder import ImageFileDataset
from saal.data.image_folder import load as load_images
from saal.errors import SaalError

V010_IMAGES = Path(__file__).resolve().parents[1] / "fixtures" / "v0.1.0" / "images"


def _same_as_eager(b: DatasetBundle, old: Eager) -> None:
    """Every item, label and statistic of the lazy bundle equals the old eager loader's, bit for bit."""
    assert b.mean == old.mean and b.std == old.std
    assert torch.equal(all_inputs(b.train), old.x_train) and torch.equal(all_inputs(b.test), old.x_test)
    assert b.train.targets.dtype == np.int64 and b.train.targets.tolist() == old.y_train.tolist()
    assert b.test.targets.tolist() == old.y_test.tolist() and b.train_targets.tolist() == old.y_train.tolist()
    assert b.input_shape == tuple(old.x_train.shape[1:])


def _write_folder(root: Path, fmt, counts: dict[str, int], make: Callable[[int], np.ndarray], suffix: str) -> Path:
    seed = 0
    for cls, n in counts.items():
        for i in range(n):
            fmt.save_image(root / cls / f"{i:04d}{suffix}", make(seed))
            seed += 1
    return root


def _grey(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def _rgb(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------- the same items as before


def test_cifar_jpegs_equal_the_eager_loader(cifar_jpg_folder: Path) -> None:
    b = load_dataset(f"folder:{cifar_jpg_folder}")
    assert isinstance(b.train, ImageFileDataset) and isinstance(b.test, ImageFileDataset)
    _same_as_eager(b, load_folder(str(cifar_jpg_folder)))
    item, label = b.test[7]
    assert item.dtype == torch.float32 and item.shape == (3, 32, 32) and item.is_contiguous() and type(label) is int


def test_v0_1_0_fixture_folder_equals_the_eager_loader() -> None:
    """The folder that the upgrade test resumes a 0.1.0 run over: its inputs must not change by one bit."""
    _same_as_eager(load_images(str(V010_IMAGES)), load_folder(str(V010_IMAGES)))


@pytest.mark.parametrize(
    ("options", "shape"),
    [({}, (1, 8, 8)), ({"channels": 3}, (3, 8, 8)), ({"image_size": 11}, (1, 11, 11))],
)
def test_greyscale_folder_equals_the_eager_loader(tmp_path: Path, fmt, options: dict, shape: tuple) -> None:
    _write_folder(tmp_path, fmt, {"a": 7, "b": 5}, _grey, ".png")
    b = load_images(str(tmp_path), seed=2, **options)
    assert b.input_shape == shape
    _same_as_eager(b, load_folder(str(tmp_path), seed=2, **options))


def test_mixed_modes_and_sizes_equal_the_eager_loader(tmp_path: Path, fmt) -> None:
    _write_folder(tmp_path / "train", fmt, {"a": 4, "b": 4}, _grey, ".png")
    _write_folder(tmp_path / "test", fmt, {"a": 2, "b": 2}, lambda s: _rgb(s, 12), ".jpg")
    fmt.save_image(tmp_path / "train" / "b" / "rgb.jpg", _rgb(99, 9))
    for options in ({"image_size": 10}, {"image_size": 10, "channels": 1}):
        b = load_images(str(tmp_path), **options)
        _same_as_eager(b, load_folder(str(tmp_path), **options))


NPZ_CASES = [
    ("uint8 N x H x W x C", lambda r: r.integers(0, 256, (53, 6, 6, 3), dtype=np.uint8)),
    ("uint8 N x H x W", lambda r: r.integers(0, 256, (53, 5, 5), dtype=np.uint8)),
    ("float64 N x C x H x W", lambda r: r.normal(3, 2, (53, 2, 4, 4))),
    ("float32 N x D", lambda r: r.normal(0, 5, (53, 9)).astype(np.float32)),
    ("big-endian int16 N x D", lambda r: r.integers(-300, 300, (53, 4)).astype(">i2")),
    ("bool N x H x W", lambda r: r.random((53, 3, 3)) > 0.5),
    ("Fortran uint8 N x H x W x C", lambda r: np.asfortranarray(r.integers(0, 256, (53, 4, 4, 3)).astype("u1"))),
]


@pytest.mark.parametrize(("what", "make"), NPZ_CASES, ids=[c[0] for c in NPZ_CASES])
@pytest.mark.parametrize("compressed", [False, True], ids=["savez", "savez_compressed"])
def test_npz_equals_the_eager_loader(tmp_path: Path, what: str, make: Callable, compressed: bool) -> None:
    rng = np.random.default_rng(5)
    save = np.savez_compressed if compressed else np.savez
    x, y = make(rng), np.arange(53) % 4
    save(tmp_path / "one.npz", x=x, y=y)
    b = load_arrays(str(tmp_path / "one.npz"), seed=3)
    # uncompressed x is memory-mapped; a compressed (or Fortran-ordered) one is loaded as before
    assert isinstance(b.train, ArrayDataset if compressed or "Fortran" in what else NpzArrayDataset)
    _same_as_eager(b, load_npz(str(tmp_path / "one.npz"), seed=3))
    (tmp_path / "two").mkdir()
    save(tmp_path / "two" / "train.npz", x=x[:40], y=y[:40])
    np.savez(tmp_path / "two" / "test.npz", x=x[40:], y=y[40:])  # may differ from train's storage
    _same_as_eager(load_arrays(str(tmp_path / "two")), load_npz(str(tmp_path / "two")))


def test_npz_batch_reads_equal_item_reads(tmp_path: Path) -> None:
    x = np.random.default_rng(6).integers(0, 256, (30, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(30) % 3)
    test = load_arrays(str(tmp_path / "d.npz")).test
    assert isinstance(test, NpzArrayDataset)
    picked = [5, 0, 3, 3]
    for (a, ya), (b, yb) in zip(test.__getitems__(picked), [test[i] for i in picked], strict=True):
        assert torch.equal(a, b) and ya == yb


# ---------------------------------------------------------------- the statistics sample


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_statistics_are_computed_exactly_as_before(dtype: torch.dtype) -> None:
    x = (torch.rand(9000, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 7 - 2).to(dtype)
    kept = x.clone()
    expected = old_channel_mean_std(x)
    assert channel_mean_std(x) == expected and torch.equal(x, kept)  # the input is left as it was
    everything = stats_indices(len(x), 50_000, seed=3)
    assert everything.tolist() == list(range(9000))
    assert streamed_mean_std(lambda idx: x[torch.from_numpy(idx)].float(), everything) == old_channel_mean_std(
        x.float()
    )
    assert torch.equal(x, kept)


def test_stats_sample_is_seeded(tmp_path: Path, fmt) -> None:
    """Given splits (so that ``seed`` draws only the statistics sample): seeded, and all items when it covers."""
    _write_folder(tmp_path / "imgs" / "train", fmt, {"a": 20, "b": 20}, _rgb, ".png")
    _write_folder(tmp_path / "imgs" / "test", fmt, {"a": 2, "b": 2}, _rgb, ".png")
    folder = str(tmp_path / "imgs")
    whole = load_images(folder, seed=1)
    assert load_images(folder, seed=7, stats_sample=40).mean == whole.mean  # 40 train items: the whole split
    one, same = load_images(folder, seed=1, stats_sample=10), load_images(folder, seed=1, stats_sample=10)
    assert (one.mean, one.std) == (same.mean, same.std) and torch.equal(one.train[3][0], same.train[3][0])
    other = load_images(folder, seed=2, stats_sample=10)
    assert one.mean != other.mean and one.std != other.std
    assert one.mean != whole.mean
    # the inputs are normalised by the sampled statistics
    m, s = torch.tensor(one.mean).view(3, 1, 1), torch.tensor(one.std).view(3, 1, 1)
    torch.testing.assert_close(
        one.train[0][0] * s + m,
        whole.train[0][0] * torch.tensor(whole.std).view(3, 1, 1) + torch.tensor(whole.mean).view(3, 1, 1),
        atol=1e-5,
        rtol=0,
    )

    x = np.random.default_rng(7).random((60, 5)) * 10
    for name, save in (("mapped", np.savez), ("compressed", np.savez_compressed)):
        (tmp_path / name).mkdir()
        save(tmp_path / name / "train.npz", x=x, y=np.arange(60) % 2)
        save(tmp_path / name / "test.npz", x=x[:6], y=np.arange(6) % 2)
        path = str(tmp_path / name)
        a = load_arrays(path, seed=4, stats_sample=15)
        assert (a.mean, a.std) == (load_arrays(path, seed=4, stats_sample=15).mean, a.std)
        assert a.mean != load_arrays(path, seed=5, stats_sample=15).mean
        assert load_arrays(path, seed=4, stats_sample=60).mean == load_arrays(path, seed=4).mean
    # memory-mapped and in-memory files draw the same sample and give the same statistics
    mapped, compressed = (load_arrays(str(tmp_path / n), stats_sample=15) for n in ("mapped", "compressed"))
    assert isinstance(mapped.train, NpzArrayDataset) and isinstance(compressed.train, ArrayDataset)
    assert (mapped.mean, mapped.std) == (compressed.mean, compressed.std)
    assert torch.equal(all_inputs(mapped.train), all_inputs(compressed.train))


@pytest.mark.parametrize("bad", [0, -3, 2.5, "100", True, None])
def test_bad_stats_sample_is_one_line(tmp_path: Path, fmt, bad: object) -> None:
    _write_folder(tmp_path / "imgs", fmt, {"a": 3, "b": 3}, _grey, ".png")
    np.savez(tmp_path / "d.npz", x=np.zeros((6, 3)), y=np.arange(6) % 2)
    for name in (f"folder:{tmp_path / 'imgs'}", f"npz:{tmp_path / 'd.npz'}"):
        with pytest.raises(SaalError, match=re.escape("stats_sample must be a positive integer")) as info:
            load_dataset(name, stats_sample=bad)
        assert "\n" not in str(info.value) and repr(bad) in str(info.value)


# ---------------------------------------------------------------- memory


def _peak(load: Callable[[], object]) -> int:
    """Peak bytes traced while ``load()`` runs and reads three items of what it returns."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        bundle = load()
        train = bundle.train if isinstance(bundle, DatasetBundle) else None
        if train is not None:
            for i in (0, 1, len(train) - 1):
                train[i]
        peak = tracemalloc.get_traced_memory()[1] - base
        del bundle, train
    finally:
        tracemalloc.stop()
    return peak


def test_folder_memory_does_not_grow_with_the_number_of_images(tmp_path: Path, fmt) -> None:
    """N vs 4N images of 64 x 64 RGB: the load's peak differs by far less than 3N decoded images.

    The statistics sample is kept small here: when the train split is smaller than ``stats_sample``, the
    statistics pass holds one chunk of up to 4,096 decoded items, which would grow with N below that.
    tracemalloc sees numpy's buffers (the old loader decoded into one) but not torch's.
    """
    n, side = 48, 64
    small = _write_folder(tmp_path / "small", fmt, {"a": n // 2, "b": n // 2}, lambda s: _rgb(s, side), ".png")
    large = _write_folder(tmp_path / "large", fmt, {"a": 2 * n, "b": 2 * n}, lambda s: _rgb(s, side), ".png")
    decoded_3n = 3 * n * 3 * side * side * 4  # float32
    margin = decoded_3n // 16
    lazy = [_peak(lambda f=f: load_images(str(f), stats_sample=8)) for f in (small, small, large, small, large)]
    assert max(lazy[2], lazy[4]) - min(lazy[1], lazy[3]) < margin, (lazy, margin)  # lazy[0] warms up
    # the check has teeth: the old eager loader's peak grows by more than the margin
    eager = [_peak(lambda f=f: load_folder(str(f))) for f in (small, large)]
    assert eager[1] - eager[0] > margin, (eager, margin)


def test_npz_statistics_stream_in_chunks(tmp_path: Path) -> None:
    """A memory-mapped train split of N vs 4N items larger than one statistics chunk (4,096 items)."""
    n, side = 5000, 16
    rng = np.random.default_rng(8)
    for name, k in (("small", n), ("large", 4 * n)):
        (tmp_path / name).mkdir()
        x = rng.integers(0, 256, (k, side, side, 3), dtype=np.uint8)
        np.savez(tmp_path / name / "train.npz", x=x, y=np.arange(k) % 5)
        np.savez(tmp_path / name / "test.npz", x=x[:10], y=np.arange(10) % 5)
    margin = 3 * n * 3 * side * side * 4 // 16  # 1/16 of 3N decoded items (labels and indices: 8 bytes an item)
    _peak(lambda: load_arrays(str(tmp_path / "small")))  # warm up
    small, large = (_peak(lambda p=p: load_arrays(str(tmp_path / p))) for p in ("small", "large"))
    assert large - small < margin, (small, large, margin)
    old_small, old_large = (_peak(lambda p=p: load_npz(str(tmp_path / p))) for p in ("small", "large"))
    assert old_large - old_small > margin, (old_small, old_large, margin)
    # several statistics chunks, and still exactly the old statistics
    lazy, eager = load_arrays(str(tmp_path / "large")), load_npz(str(tmp_path / "large"))
    assert (lazy.mean, lazy.std) == (eager.mean, eager.std)
    assert torch.equal(lazy.train[19_999][0], eager.x_train[19_999])


# ---------------------------------------------------------------- damaged files


def test_damaged_pixels_fail_on_first_decode_with_one_line(tmp_path: Path, fmt) -> None:
    """A file whose header is intact but whose pixel data is cut: reported when it is first decoded."""
    _write_folder(tmp_path / "train", fmt, {"a": 4, "b": 4}, lambda s: _rgb(s, 32), ".jpg")
    _write_folder(tmp_path / "test", fmt, {"a": 2, "b": 2}, lambda s: _rgb(s + 50, 32), ".jpg")
    bad_test = tmp_path / "test" / "b" / "0001.jpg"
    bad_test.write_bytes(bad_test.read_bytes()[:-200])
    b = load_images(str(tmp_path))  # test images are not decoded at load
    assert len(b.test) == 4 and b.test.files[3] == str(bad_test)
    b.test[2]
    with pytest.raises(SaalError, match=re.escape(f"cannot decode image {bad_test} (OSError")) as info:
        b.test[3]
    assert "\n" not in str(info.value)
    # a train image in the statistics sample is decoded at load, so it is reported there
    bad_train = tmp_path / "train" / "a" / "0002.jpg"
    bad_train.write_bytes(bad_train.read_bytes()[:-200])
    with pytest.raises(SaalError, match=re.escape(f"cannot decode image {bad_train}")) as info:
        load_images(str(tmp_path))
    assert "\n" not in str(info.value)
    # a damaged header is reported at load, wherever the file is
    bad_test.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(SaalError, match=re.escape(f"cannot decode image {bad_test}")):
        load_images(str(tmp_path), stats_sample=1)


def test_npz_cut_short_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((40, 8, 8), dtype=np.float32), y=np.arange(40) % 2)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SaalError, match=re.escape(f"cannot read {path}")) as info:
        load_arrays(str(path))
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- DataLoader workers


def test_memmapped_npz_in_dataloader_workers(tmp_path: Path) -> None:
    x = np.random.default_rng(9).integers(0, 256, (70, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(70) % 7)
    train = load_arrays(str(tmp_path / "d.npz")).train
    assert isinstance(train, NpzArrayDataset)
    expected = all_inputs(train)  # opens the memory map here, before the workers start
    # no memory map (nor the array) travels in a pickle; the copy reopens the file
    blob = pickle.dumps(train)
    assert len(blob) < x.nbytes // 4
    assert torch.equal(all_inputs(pickle.loads(blob)), expected)
    order = np.arange(len(train))[::-1].copy()
    got = list(batches(train, order, 16, num_workers=2))
    assert [len(g) for g in got] == [16, 16, 16, 8]
    assert torch.equal(torch.cat([g.inputs for g in got]), expected[torch.from_numpy(order)])


def test_image_folder_in_dataloader_workers(cifar_jpg_folder: Path) -> None:
    test = load_images(str(cifar_jpg_folder)).test
    assert len(pickle.dumps(test)) < 2 * sum(len(f) for f in test.files) + 10_000  # paths and labels, no pixels
    idx = np.arange(0, len(test), 3)
    got = torch.cat([g.inputs for g in batches(test, idx, 8, num_workers=2)])
    assert torch.equal(got, torch.stack([test[int(i)][0] for i in idx]))
