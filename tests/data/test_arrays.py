"""``npz:`` datasets: every accepted shape, the split, and the mistakes users make."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from old_eager_loaders import all_inputs

from saal.data import load_dataset
from saal.data.arrays import load
from saal.errors import SaalError


def _labels(n: int, k: int = 3) -> np.ndarray:
    return np.arange(n) % k


def _save(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((30, 6, 6), (1, 6, 6)),  # N x H x W
        ((30, 6, 6, 3), (3, 6, 6)),  # N x H x W x C
        ((30, 3, 6, 6), (3, 6, 6)),  # N x C x H x W
        ((30, 4, 4, 4), (4, 4, 4)),  # all equal: channels-first, as in PyTorch
        ((30, 17), (17,)),  # flat vectors
    ],
)
def test_shapes(tmp_path: Path, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    b = load_dataset(f"npz:{_save(tmp_path / 'd.npz', x=x, y=_labels(30))}")
    assert b.input_shape == expected
    assert b.image_size == (0 if len(expected) == 1 else expected[1])
    assert len(b.train) + len(b.test) == 30 and b.classes == ["0", "1", "2"]


def test_channels_last_keeps_pixels_in_place(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (6, 5, 5, 3), dtype=np.uint8)
    _save(tmp_path / "train.npz", x=x, y=_labels(6, 2))
    _save(tmp_path / "test.npz", x=x[:2], y=_labels(2, 2))
    b = load(str(tmp_path))
    m, s = torch.tensor(b.mean).view(1, 3, 1, 1), torch.tensor(b.std).view(1, 3, 1, 1)
    restored = (all_inputs(b.train) * s + m) * 255
    expected = torch.tensor(x, dtype=torch.float32).permute(0, 3, 1, 2)
    torch.testing.assert_close(restored, expected, atol=1e-3, rtol=0)


def test_split_is_stratified_seeded_and_normalised(tmp_path: Path) -> None:
    x = np.random.default_rng(2).random((40, 4, 4)).astype(np.float32) * 3 + 1
    path = str(_save(tmp_path / "d.npz", x=x, y=_labels(40, 4)))
    b = load(path, test_fraction=0.25, seed=1)
    assert np.bincount(b.test.targets).tolist() == [2, 2, 2, 2]
    assert torch.equal(all_inputs(load(path, test_fraction=0.25, seed=1).test), all_inputs(b.test))
    assert not torch.equal(all_inputs(load(path, test_fraction=0.25, seed=2).test), all_inputs(b.test))
    # floats are taken as they are, then standardised with the train split's statistics
    assert 1.0 < b.mean[0] < 4.0
    assert abs(float(all_inputs(b.train).mean())) < 1e-5 and abs(float(all_inputs(b.train).std()) - 1) < 0.05


def test_flat_vectors_are_standardised_per_feature(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x = np.stack([rng.normal(0, 1, 50), rng.normal(100, 10, 50), np.full(50, 7.0)], axis=1)
    b = load(str(_save(tmp_path / "d.npz", x=x, y=_labels(50, 2))))
    assert b.input_shape == (3,) and len(b.mean) == 3
    torch.testing.assert_close(all_inputs(b.train).mean(dim=0), torch.zeros(3), atol=1e-4, rtol=0)
    assert b.std[2] == 1.0  # a constant feature is not divided by zero


def test_train_test_folder_and_class_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    names = np.array(["cat", "dog", "eel"])
    _save(tmp_path / "train.npz", x=rng.random((9, 4, 4)), y=_labels(9).astype(float), classes=names)
    _save(tmp_path / "test.npz", x=rng.random((5, 4, 4)), y=_labels(5).reshape(5, 1))
    b = load_dataset(f"npz:{tmp_path}")
    assert (len(b.train), len(b.test), b.classes) == (9, 5, ["cat", "dog", "eel"])
    assert b.test.targets.tolist() == [0, 1, 2, 0, 1]
    assert b.train_targets.dtype == np.int64


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        (
            {"images": np.zeros((4, 2, 2)), "labels": np.zeros(4)},
            r"must hold arrays 'x' and 'y' \(found images, labels\)",
        ),
        ({"x": np.zeros((4, 2, 2)), "y": np.zeros(3)}, r"one label per item of 'x' \(4\)"),
        ({"x": np.zeros((4, 2, 2)), "y": np.array([0, 1.5, 1, 0])}, "labels 'y' must be integers"),
        ({"x": np.zeros((4, 2, 2)), "y": np.array(["a", "b", "a", "b"])}, "labels 'y' must be integers"),
        ({"x": np.zeros((4, 2, 2)), "y": np.array([0, -1, 1, 0])}, "found -1"),
        ({"x": np.zeros((4, 2, 3)), "y": np.array([0, 1, 0, 1])}, "must be square"),
        ({"x": np.zeros(4), "y": np.array([0, 1, 0, 1])}, "'x' must be N x D"),
        ({"x": np.zeros((4, 2)), "y": np.array([0, 1, 0, 1]), "classes": np.array(["a"])}, "names 1 classes"),
    ],
)
def test_bad_arrays(tmp_path: Path, arrays: dict[str, np.ndarray], match: str) -> None:
    path = _save(tmp_path / "d.npz", **arrays)
    with pytest.raises(SaalError, match=match) as info:
        load(str(path), test_fraction=0.5)
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(SaalError, match="does not exist"):
        load_dataset(f"npz:{tmp_path / 'missing.npz'}")
    _save(tmp_path / "train.npz", x=np.zeros((4, 2, 2)), y=_labels(4))
    with pytest.raises(SaalError, match=r"lacks test\.npz"):
        load(str(tmp_path))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 broken zip")
    with pytest.raises(SaalError, match=re.escape(f"cannot read {junk}")):
        load(str(junk))
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(SaalError, match=r"single array, not a \.npz"):
        load(str(single))
    _save(tmp_path / "test.npz", x=np.zeros((4, 3, 3)), y=_labels(4))
    with pytest.raises(SaalError, match="make them match"):
        load(str(tmp_path))
