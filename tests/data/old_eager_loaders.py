"""The eager ``folder:`` and ``npz:`` loaders of saal 0.1.0, kept verbatim as the reference the lazy ones must match.

Every image (array) is decoded at once into one normalised float tensor; the lazy datasets must give items that are
``torch.equal`` to ``inputs[i]`` here. Also used by ``benchmarks/lazy_data.py`` for the old-versus-new measurement.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from saal.data.base import stratified_split
from saal.errors import SaalError

_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})


def to_unit_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        t = torch.from_numpy(images.astype(np.float32))
        return t.div_(255.0) if images.dtype == np.uint8 else t
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images.to(torch.float32, copy=True)


def channel_mean_std(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    dims = [0, *range(2, images.dim())]
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk].to(torch.float64)
        total += part.sum(dim=dims)
        squares += part.square().sum(dim=dims)
    count = images.numel() // c
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def normalise_(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    shape = (1, -1) + (1,) * (images.dim() - 2)
    images.sub_(torch.tensor(mean, dtype=images.dtype).view(shape))
    images.div_(torch.tensor(std, dtype=images.dtype).view(shape))
    return images


class Eager:
    """What the old loaders returned, reduced to what the comparison needs."""

    def __init__(
        self,
        x_train: torch.Tensor,
        y_train: np.ndarray,
        x_test: torch.Tensor,
        y_test: np.ndarray,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        classes: list[str],
    ) -> None:
        self.x_train, self.y_train, self.x_test, self.y_test = x_train, y_train, x_test, y_test
        self.mean, self.std, self.classes = mean, std, classes


# ---------------------------------------------------------------- folder:


def load_folder(
    path: str, image_size: int | None = None, test_fraction: float = 0.2, seed: int = 0, channels: int | None = None
) -> Eager:
    root = Path(path).expanduser()
    train_dir, test_dir = root / "train", root / "test"
    classes, files, labels = _scan(train_dir if train_dir.is_dir() else root)
    given_test = test_dir.is_dir() and train_dir.is_dir()
    if given_test:
        _, test_files, test_labels = _scan(test_dir)
        n_train = len(files)
        files, labels = files + test_files, np.concatenate([labels, test_labels])
    pixels, grey = _decode_all(files, image_size, channels)
    if given_test:
        tr, te = np.arange(n_train), np.arange(n_train, len(files))
    else:
        tr, te = stratified_split(labels, test_fraction, seed)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    if grey:
        x = x[:, :1]
    x_train = to_unit_float(x[tr].contiguous())
    x_test = to_unit_float(x[te].contiguous())
    del x, pixels
    mean, std = channel_mean_std(x_train)
    normalise_(x_train, mean, std)
    normalise_(x_test, mean, std)
    return Eager(x_train, labels[tr], x_test, labels[te], mean, std, classes)


def _scan(folder: Path) -> tuple[list[str], list[Path], np.ndarray]:
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = _images_under(folder / name)
        files += found
        labels += [label] * len(found)
    return classes, files, np.asarray(labels, dtype=np.int64)


def _images_under(folder: Path) -> list[Path]:
    found = []
    for parent, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(parent, n) for n in names if not n.startswith(".") and n.lower().endswith(tuple(IMG_EXTENSIONS))]
    return sorted(found)


def _read(path: Path, channels: int | None) -> tuple[Image.Image, bool]:
    with Image.open(path) as img:
        img.load()
        grey = channels == 1 or (channels is None and img.mode in _GREY_MODES)
        mode = "L" if grey else "RGB"
        return (img if img.mode == mode else img.convert(mode)), grey


def _decode_all(files: list[Path], image_size: int | None, channels: int | None) -> tuple[np.ndarray, bool]:
    first, _ = _read(files[0], channels)
    side = image_size if image_size is not None else first.size[0]
    out = np.empty((len(files), side, side, 3), dtype=np.uint8)
    grey = np.zeros(len(files), dtype=bool)
    for i in range(len(files)):
        img, is_grey = _read(files[i], channels)
        if img.size != (side, side):
            img = img.resize((side, side), Image.BILINEAR)
        a = np.asarray(img)
        out[i] = a[..., None] if is_grey else a
        grey[i] = is_grey
    return out, bool(grey.all())


# ---------------------------------------------------------------- npz:


def load_npz(path: str, test_fraction: float = 0.2, seed: int = 0) -> Eager:
    source = Path(path).expanduser()
    if source.is_dir():
        (x_train, y_train), (x_test, y_test) = (_read_npz(source / f) for f in ("train.npz", "test.npz"))
    else:
        x, y_all = _read_npz(source)
        tr, te = stratified_split(y_all, test_fraction, seed)
        x_train, y_train, x_test, y_test = x[tr], y_all[tr], x[te], y_all[te]
    train, test = _to_nchw(to_unit_float(x_train)), _to_nchw(to_unit_float(x_test))
    mean, std = channel_mean_std(train)
    normalise_(train, mean, std)
    normalise_(test, mean, std)
    return Eager(train, y_train, test, y_test, mean, std, [])


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            x, y = npz["x"], npz["y"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise SaalError(f"cannot read {path}") from e
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    return x, y.astype(np.int64)


def _to_nchw(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:
        return x
    if x.dim() == 3:
        x = x.unsqueeze(1)
    elif x.shape[1] == x.shape[2] and x.shape[3] != x.shape[1]:
        x = x.permute(0, 3, 1, 2).contiguous()
    return x


def all_inputs(dataset: torch.utils.data.Dataset) -> torch.Tensor:
    """Return every item's input of ``dataset`` stacked into one tensor (what ``.inputs`` held when eager)."""
    return torch.stack([dataset[i][0] for i in range(len(dataset))])  # type: ignore[arg-type]
