"""The one feature cache: one computation shared by its consumers, keys that hold what features depend on,
damaged files rebuilt, rows per item added incrementally (``saal label``), projects of the earlier format kept."""

from __future__ import annotations

import os
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saal.app.features import FeatureCache, make_extractor
from saal.data import load_dataset
from saal.data.base import ArrayDataset
from saal.data.feature_cache import (
    MEMORY_CACHE,
    FeatureCacheWarning,
    MemoryCache,
    RowCache,
    cached,
    content_digest,
)
from saal.errors import SaalError
from saal.models.detectors import Lite0FPN
from saal.models.frozen_backbone import feature_bundle
from saal.models.pretrained import default_weights_path
from saal.strategies.embedding_input import pretrained_features

KEY = {"backbone": "toy", "weights": "w1", "image_size": 8, "pixels": "identity"}


# -- one computation shared -------------------------------------------------------------------------------------
def test_two_consumers_asking_at_once_share_one_computation(tmp_path: Path) -> None:
    calls: list[int] = []

    def compute() -> dict[str, torch.Tensor]:
        calls.append(threading.get_ident())
        time.sleep(0.3)  # the other consumer asks meanwhile and waits on the lock
        return {"pool": torch.arange(6.0).reshape(3, 2)}

    results: list[tuple[dict[str, torch.Tensor], Path, bool]] = []
    threads = [threading.Thread(target=lambda: results.append(cached(KEY, compute, tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(hit for _, _, hit in results) == [False, True]
    assert results[0][1] == results[1][1] and torch.equal(results[0][0]["pool"], results[1][0]["pool"])
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file and a rename


def toy_rows(calls: list[int]):  # a RowCompute
    """A row computer: row = the file's first 4 bytes as float32 (ids of files starting with 'x' fail)."""

    def compute(chunk: list[tuple[int, Path]]) -> tuple[list[int], np.ndarray, dict[int, str]]:
        ids, rows, failed = [], [], {}
        for item_id, path in chunk:
            data = path.read_bytes()
            if data.startswith(b"x"):
                failed[item_id] = "not an image"
                continue
            calls.append(item_id)
            ids.append(item_id)
            rows.append(np.frombuffer(data[:4].ljust(4, b"\0"), dtype=np.uint8).astype(np.float32))
        return ids, np.asarray(rows, dtype=np.float32).reshape(len(ids), 4), failed

    return compute


def write_items(folder: Path, n: int, start: int = 0) -> list[tuple[int, Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(start, start + n):
        (folder / f"{i}.bin").write_bytes(bytes([i % 251, 1, 2, 3]))
        items.append((i, folder / f"{i}.bin"))
    return items


def test_row_caches_of_two_consumers_and_two_threads_compute_each_row_once(tmp_path: Path) -> None:
    items = write_items(tmp_path / "files", 40)
    calls: list[int] = []
    caches = [RowCache(tmp_path / "cache", KEY, (4,), np.float32, prefix="toy") for _ in range(2)]
    out: list[np.ndarray] = []
    threads = [
        threading.Thread(target=lambda c=c: out.append(c.ensure(items, 40, toy_rows(calls), chunk=8)[0]))
        for c in caches
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(calls) == list(range(40))  # every row once, whichever thread held the lock first
    assert np.array_equal(out[0], out[1]) and out[0][7, 0] == 7


def test_the_detector_backbone_features_are_shared_by_weights_and_exact_input() -> None:
    MEMORY_CACHE.clear()
    first, second = Lite0FPN(), Lite0FPN()
    assert first.cache_key == second.cache_key
    image = torch.rand(1, 3, 64, 64)
    hits = MEMORY_CACHE.hits
    a = first.body_features(image)
    b = second.body_features(image.clone())  # another detector, the same image: read, not computed
    assert MEMORY_CACHE.hits == hits + 1 and all(x is y for x, y in zip(a, b, strict=True))
    assert content_digest(image) != content_digest(image.double())  # dtype, size and content are in the key
    assert content_digest(image) != content_digest(torch.rand(1, 3, 64, 64))
    assert content_digest(image) != content_digest(image[..., :32])
    small = MemoryCache(max_items=2)
    for k in "abc":
        small.put(("key", k), [torch.zeros(1)])
    assert list(small.items) == [("key", "b"), ("key", "c")]  # least recently used dropped


# -- keys ------------------------------------------------------------------------------------------------------
def write_images(folder: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        (folder / "train" / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        (folder / "test" / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
            folder / "train" / "ab"[i % 2] / f"{i}.png"
        )
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
            folder / "test" / "ab"[i % 2] / f"{i}.png"
        )
    return folder


def test_keys_differ_when_weights_data_or_size_differ(tmp_path: Path) -> None:
    weights = tmp_path / "weights.pth"  # other weights: the packaged ones with one value changed
    state = torch.load(default_weights_path(), weights_only=True)
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] + 1e-3
    torch.save(state, weights)
    bundle = load_dataset(f"folder:{write_images(tmp_path / 'a')}")
    other = load_dataset(f"folder:{write_images(tmp_path / 'b', 4)}")
    cache = tmp_path / "cache"
    files = {
        feature_bundle(bundle, 32, cache_dir=cache).cache_file,
        feature_bundle(bundle, 48, cache_dir=cache).cache_file,
        feature_bundle(bundle, 32, cache_dir=cache, weights=weights).cache_file,
        feature_bundle(other, 32, cache_dir=cache).cache_file,
    }
    assert len(files) == 4 and feature_bundle(bundle, 32, cache_dir=cache).cache_hit
    # the strategies' pool features: one file per weights, data, size and pixel mapping
    pool = ArrayDataset(torch.rand(4, 3, 8, 8), np.arange(4) % 2)
    pretrained_features(pool, image_size=32, cache_dir=cache)
    pretrained_features(pool, image_size=48, cache_dir=cache)
    pretrained_features(pool, image_size=32, cache_dir=cache, weights=weights)
    pretrained_features(ArrayDataset(pool.inputs * 0.5, pool.targets), image_size=32, cache_dir=cache)
    assert len(list(cache.glob("*-pool-*.pt"))) == 4
    # saal label: one file per extractor kind, weights and side
    paths = {
        FeatureCache(tmp_path, make_extractor(kind, side)[0]).path
        for kind in ("cnn", "pretrained")
        for side in (16, 32)
    }
    assert len(paths) == 4
    # the detector: other weights, another key
    assert Lite0FPN().cache_key != Lite0FPN(weights).cache_key


# -- damage ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_dataset_file_is_rebuilt_with_one_line(tmp_path: Path, damage: str) -> None:
    calls: list[int] = []

    def compute() -> dict[str, torch.Tensor]:
        calls.append(1)
        return {"pool": torch.ones(2, 3)}

    _, path, _ = cached(KEY, compute, tmp_path)
    path.write_bytes(path.read_bytes()[:50] if damage == "truncate" else b"garbage")
    with pytest.warns(FeatureCacheWarning, match="computing it again") as caught:
        tensors, _, hit = cached(KEY, compute, tmp_path)
    assert not hit and len(calls) == 2 and torch.equal(tensors["pool"], torch.ones(2, 3))
    assert all("\n" not in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FeatureCacheWarning)
        assert cached(KEY, compute, tmp_path)[2]


def test_a_damaged_row_is_computed_again_and_the_others_kept(tmp_path: Path) -> None:
    items = write_items(tmp_path / "files", 10)
    calls: list[int] = []
    cache = RowCache(tmp_path, KEY, (4,), np.float32, prefix="toy")
    good, _ = cache.ensure(items, 10, toy_rows(calls))
    good = np.array(good)
    rows = np.lib.format.open_memmap(cache.path, mode="r+")
    rows[3, 0] += 1.0  # a flipped value: only the checksum can tell
    rows.flush()
    del rows
    calls.clear()
    with pytest.warns(FeatureCacheWarning, match="damaged in 1 of 10 rows"):
        again, _ = RowCache(tmp_path, KEY, (4,), np.float32, prefix="toy").ensure(items, 10, toy_rows(calls))
    assert calls == [3] and np.array_equal(again, good)


@pytest.mark.parametrize("damage", ["truncated rows", "garbage state", "rows removed", "other shape"])
def test_an_unusable_row_cache_file_is_rebuilt_with_one_line(tmp_path: Path, damage: str) -> None:
    items = write_items(tmp_path / "files", 10)
    calls: list[int] = []
    cache = RowCache(tmp_path, KEY, (4,), np.float32, prefix="toy")
    good = np.array(cache.ensure(items, 10, toy_rows(calls))[0])
    if damage == "truncated rows":
        cache.path.write_bytes(cache.path.read_bytes()[:150])
    elif damage == "garbage state":
        cache.state_path.write_bytes(b"PK not a zip")
    elif damage == "rows removed":
        cache.path.unlink()
    else:
        np.save(cache.path, np.zeros((10, 5), dtype=np.float32))
    calls.clear()
    with pytest.warns(FeatureCacheWarning) as caught:
        again, _ = RowCache(tmp_path, KEY, (4,), np.float32, prefix="toy").ensure(items, 10, toy_rows(calls))
    assert len(caught) == 1 and "\n" not in str(caught[0].message) and "computing it again" in str(caught[0].message)
    assert sorted(calls) == list(range(10)) and np.array_equal(again, good)


def test_an_unwritable_row_cache_folder_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(SaalError, match="cannot use feature cache folder"):
        RowCache(blocker / "sub", KEY, (4,), np.float32).ensure(write_items(tmp_path / "f", 2), 2, toy_rows([]))


# -- incremental rows (saal label) -------------------------------------------------------------------------------
def test_rows_are_added_incrementally_and_a_changed_file_is_computed_again(tmp_path: Path) -> None:
    folder = tmp_path / "files"
    items = write_items(folder, 10)
    calls: list[int] = []
    cache = RowCache(tmp_path / "cache", KEY, (4,), np.float32, prefix="toy")
    first, _ = cache.ensure(items, 10, toy_rows(calls), chunk=4)
    first = np.array(first)
    assert sorted(calls) == list(range(10))
    calls.clear()
    more = items + write_items(folder, 5, start=10)
    (folder / "11.bin").write_bytes(b"xbad")  # a new file that cannot be computed
    progress: list[tuple[int, int]] = []
    rows, failed = cache.ensure(more, 20, toy_rows(calls), lambda d, t: progress.append((d, t)), chunk=4)
    assert sorted(calls) == [10, 12, 13, 14] and list(failed) == [11]  # only the new files
    assert rows.shape == (20, 4) and np.array_equal(rows[:10], first) and progress == [(4, 5), (5, 5)]
    calls.clear()
    (folder / "2.bin").write_bytes(bytes([99, 1, 2, 3, 4]))  # the file changed (size): its row is computed again
    rows, _ = RowCache(tmp_path / "cache", KEY, (4,), np.float32, prefix="toy").ensure(more, 20, toy_rows(calls))
    assert calls == [2]  # (11 is tried again and fails again: a failed row is never cached)
    assert rows[2, 0] == 99 and np.array_equal(rows[3:10], first[3:10])


def test_a_killed_computation_keeps_the_chunks_it_finished(tmp_path: Path) -> None:
    items = write_items(tmp_path / "files", 12)
    calls: list[int] = []
    plain = toy_rows(calls)

    def dies_on_the_third_chunk(chunk: list[tuple[int, Path]]) -> tuple[list[int], np.ndarray, dict[int, str]]:
        if chunk[0][0] >= 8:
            raise KeyboardInterrupt
        return plain(chunk)

    with pytest.raises(KeyboardInterrupt):
        RowCache(tmp_path, KEY, (4,), np.float32).ensure(items, 12, dies_on_the_third_chunk, chunk=4)
    calls.clear()
    RowCache(tmp_path, KEY, (4,), np.float32).ensure(items, 12, plain, chunk=4)
    assert sorted(calls) == [8, 9, 10, 11]


def test_the_app_cache_of_a_growing_folder_decodes_only_new_images(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    items = [(i, folder / f"{i}.png") for i in range(12)]
    extractor, _ = make_extractor("cnn", 16)
    cache = FeatureCache(tmp_path, extractor)
    rows, failed = cache.ensure(items[:8], 8)
    before = np.array(rows)
    assert not failed and rows.shape == (8, 16, 16, 3)
    decoded: list[int] = []
    compute = cache.compute
    cache.compute = lambda chunk: (decoded.extend(i for i, _ in chunk), compute(chunk))[1]  # type: ignore[method-assign]
    rows, _ = cache.ensure(items, 12)
    assert decoded == [8, 9, 10, 11] and np.array_equal(rows[:8], before)


# -- projects of the earlier format --------------------------------------------------------------------------
def test_a_project_cached_by_the_earlier_format_keeps_its_rows(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(np.full((20, 20, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    items = [(i, folder / f"{i}.png") for i in range(6)]
    extractor, _ = make_extractor("cnn", 16)
    state = tmp_path / "state"
    state.mkdir()
    fresh = np.array(FeatureCache(tmp_path / "fresh", extractor).ensure(items, 6)[0])
    old = fresh.copy()
    old[5] = 0  # the earlier job had not reached image 5
    np.save(state / "features-cnn-16-pixels.npy", old)
    np.save(state / "features-cnn-16-pixels-done.npy", np.array([True] * 5 + [False]))
    cache = FeatureCache(state, extractor)
    decoded: list[int] = []
    compute = cache.compute
    cache.compute = lambda chunk: (decoded.extend(i for i, _ in chunk), compute(chunk))[1]  # type: ignore[method-assign]
    with pytest.warns(FeatureCacheWarning, match="of an earlier saal; kept its 5 rows"):
        rows, _ = cache.ensure(items, 6)
    assert decoded == [5] and np.array_equal(rows, fresh)
    names = sorted(p.name for p in state.glob("features-*"))
    assert names == sorted([cache.path.name, cache.rows.state_path.name, cache.path.name + ".lock"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FeatureCacheWarning)
        assert np.array_equal(FeatureCache(state, extractor).ensure(items, 6)[0], fresh)


def test_a_damaged_earlier_format_file_is_computed_again(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(folder / "0.png")
    (tmp_path / "features-cnn-16-pixels.npy").write_bytes(b"\x93NUMPY broken")
    np.save(tmp_path / "features-cnn-16-pixels-done.npy", np.array([True]))
    with pytest.warns(FeatureCacheWarning, match="unreadable .*computing it again"):
        rows, _ = FeatureCache(tmp_path, make_extractor("cnn", 16)[0]).ensure([(0, folder / "0.png")], 1)
    assert rows.shape == (1, 16, 16, 3) and not os.path.exists(tmp_path / "features-cnn-16-pixels.npy")
