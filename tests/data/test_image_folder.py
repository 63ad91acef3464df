"""Image folders: real CIFAR-10 JPEGs, the held-out layout, channels, sizes and every user mistake."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from old_eager_loaders import all_inputs
from PIL import Image

from saal.data import load_dataset
from saal.data.image_folder import load
from saal.errors import SaalError

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _grey(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def _rgb(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _make_flat(root: Path, fmt, counts: dict[str, int], image=_grey, suffix: str = ".png") -> Path:
    seed = 0
    for cls, n in counts.items():
        for i in range(n):
            fmt.save_image(root / cls / f"{i:03d}{suffix}", image(seed))
            seed += 1
    return root


def test_cifar_jpegs_through_folder_prefix(cifar_jpg_folder: Path) -> None:
    b = load_dataset(f"folder:{cifar_jpg_folder}")
    assert (len(b.train), len(b.test), b.input_shape) == (300, 100, (3, 32, 32))
    assert b.classes == CIFAR_CLASSES
    assert np.bincount(b.train_targets).tolist() == [30] * 10
    assert np.bincount(b.test.targets).tolist() == [10] * 10
    # normalised by the train split's own per-channel statistics
    x = all_inputs(b.train)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)
    assert all(0.3 < m < 0.6 for m in b.mean) and all(0.15 < s < 0.35 for s in b.std)
    # item 0 is the first file of the first class, decoded the same way PIL decodes it
    first = sorted((cifar_jpg_folder / "train" / "airplane").iterdir())[0]
    pixels = np.asarray(Image.open(first).convert("RGB")).transpose(2, 0, 1) / 255.0
    m, s = np.array(b.mean).reshape(3, 1, 1), np.array(b.std).reshape(3, 1, 1)
    np.testing.assert_allclose(all_inputs(b.train)[0].numpy(), (pixels - m) / s, atol=1e-5)
    assert b.name == f"folder:{cifar_jpg_folder.resolve()}"


def test_threads_decode_the_same_as_one_thread(cifar_jpg_folder: Path) -> None:
    one = load(str(cifar_jpg_folder), workers=1)
    four = load(str(cifar_jpg_folder), workers=4)
    assert torch.equal(all_inputs(one.train), all_inputs(four.train))
    assert torch.equal(all_inputs(one.test), all_inputs(four.test))


def test_flat_layout_holds_out_a_seeded_stratified_fraction(tmp_path: Path, fmt) -> None:
    _make_flat(tmp_path, fmt, {"b": 10, "a": 5, "c": 1})
    b = load(str(tmp_path), test_fraction=0.2, seed=3)
    assert b.classes == ["a", "b", "c"] and b.input_shape == (1, 8, 8)
    assert np.bincount(b.test.targets, minlength=3).tolist() == [1, 2, 0]  # a one-item class stays in train
    assert np.bincount(b.train_targets, minlength=3).tolist() == [4, 8, 1]
    again = load(str(tmp_path), test_fraction=0.2, seed=3)
    other = load(str(tmp_path), test_fraction=0.2, seed=4)
    assert torch.equal(all_inputs(again.test), all_inputs(b.test))
    assert not torch.equal(all_inputs(other.test), all_inputs(b.test))


def test_train_folder_without_test_is_split_too(tmp_path: Path, fmt) -> None:
    _make_flat(tmp_path / "train", fmt, {"x": 4, "y": 4})
    b = load(str(tmp_path), test_fraction=0.25)
    assert b.classes == ["x", "y"] and (len(b.train), len(b.test)) == (6, 2)


def test_channels_follow_the_images_or_the_option(tmp_path: Path, fmt) -> None:
    grey = _make_flat(tmp_path / "grey", fmt, {"a": 3, "b": 3})
    assert load(str(grey)).channels == 1
    assert load(str(grey), channels=3).input_shape == (3, 8, 8)
    mixed = _make_flat(tmp_path / "mixed", fmt, {"a": 3, "b": 3})
    fmt.save_image(mixed / "b" / "rgb.png", _rgb(99))
    b = load(str(mixed))
    assert b.channels == 3
    # a greyscale image becomes three equal channels
    x = all_inputs(b.train) * torch.tensor(b.std).view(1, 3, 1, 1) + torch.tensor(b.mean).view(1, 3, 1, 1)
    torch.testing.assert_close(x[0, 0], x[0, 1])
    assert load(str(mixed), channels=1).channels == 1


def test_image_size_resizes_and_otherwise_sizes_must_match(tmp_path: Path, fmt) -> None:
    _make_flat(tmp_path, fmt, {"a": 3, "b": 3})
    odd = fmt.save_image(tmp_path / "b" / "zz_big.png", _grey(50, size=12))
    with pytest.raises(SaalError, match=re.escape(f"{odd} is 12x12")) as info:
        load(str(tmp_path))
    assert "image_size" in str(info.value)
    b = load_dataset(f"folder:{tmp_path}", image_size=16)
    assert b.input_shape == (1, 16, 16) and len(b.train) + len(b.test) == 7


def test_non_square_images_need_image_size(tmp_path: Path, fmt) -> None:
    for cls in ("a", "b"):
        for i in range(2):
            fmt.save_image(tmp_path / cls / f"{i}.png", np.zeros((6, 10), dtype=np.uint8) + i)
    with pytest.raises(SaalError, match="10x6; images must be square"):
        load(str(tmp_path), test_fraction=0.5)
    assert load(str(tmp_path), image_size=8, test_fraction=0.5).image_size == 8
    with pytest.raises(SaalError, match="leaves no test item"):
        load(str(tmp_path), image_size=8, test_fraction=0.2)


def test_corrupt_image_names_the_file(tmp_path: Path, fmt) -> None:
    _make_flat(tmp_path, fmt, {"a": 3, "b": 3}, image=_rgb, suffix=".jpg")
    bad = tmp_path / "b" / "001.jpg"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(SaalError, match=re.escape(f"cannot decode image {bad}")) as info:
        load(str(tmp_path), workers=2)
    assert "\n" not in str(info.value)
    (tmp_path / "a" / "notes.txt").write_text("not an image, ignored")
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(SaalError, match=re.escape(str(bad))):
        load(str(tmp_path))


def test_mismatched_class_sets_are_rejected(tmp_path: Path, fmt) -> None:
    _make_flat(tmp_path / "train", fmt, {"cat": 2, "dog": 2})
    _make_flat(tmp_path / "test", fmt, {"cat": 1, "cow": 1})
    with pytest.raises(SaalError, match=r"only in train: \['dog'\], only in test: \['cow'\]") as info:
        load_dataset(f"folder:{tmp_path}")
    assert "\n" not in str(info.value)


def test_empty_folder_class_and_missing_path(tmp_path: Path, fmt) -> None:
    with pytest.raises(SaalError, match="no class folders"):
        load(str(tmp_path))
    _make_flat(tmp_path, fmt, {"a": 2})
    (tmp_path / "b").mkdir()
    with pytest.raises(SaalError, match=re.escape(f"class folder {tmp_path / 'b'} holds no images")):
        load(str(tmp_path))
    with pytest.raises(SaalError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nowhere'}")
    only_test = tmp_path / "only_test"
    _make_flat(only_test / "test", fmt, {"a": 1})
    with pytest.raises(SaalError, match="no train/ folder"):
        load(str(only_test))


def test_bad_options(tmp_path: Path, fmt) -> None:
    _make_flat(tmp_path, fmt, {"a": 2, "b": 2})
    with pytest.raises(SaalError, match="test_fraction"):
        load(str(tmp_path), test_fraction=1.0)
    with pytest.raises(SaalError, match="channels"):
        load(str(tmp_path), channels=2)
    with pytest.raises(SaalError, match="image_size"):
        load(str(tmp_path), image_size=0)
