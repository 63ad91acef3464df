"""What every dataset in the registry provides."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from saal.errors import SaalError

if TYPE_CHECKING:
    from saal.tasks.classification import Classification


class ArrayDataset(Dataset):
    """An in-memory dataset of ready, normalised input tensors and integer targets.

    ``targets`` is a numpy int64 array (the simulated annotator reads it).
    """

    def __init__(self, inputs: torch.Tensor, targets: np.ndarray | torch.Tensor) -> None:
        targets = np.asarray(targets, dtype=np.int64).reshape(-1)
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.inputs[i], int(self.targets[i])

    def __getitems__(self, items: list[int]) -> list[tuple[torch.Tensor, int]]:
        return [(self.inputs[i], int(self.targets[i])) for i in items]


@dataclass
class DatasetBundle:
    """A dataset's train and test splits plus what a model needs to know about them.

    Attributes:
        name: registry name or a description of the source.
        train: ``Dataset`` of ``(normalised input tensor, target)``; the unlabelled pool.
        test: the held-out evaluation split, same format.
        train_targets: true class of every train item (the simulated annotator's answers).
        classes: class names, in label order.
        channels, image_size: input shape ``(channels, image_size, image_size)``; ``image_size``
            is 0 for flat vector inputs.
        mean, std: the per-channel normalisation already applied to the inputs.
    """

    name: str
    train: Dataset
    test: Dataset
    train_targets: np.ndarray
    classes: list[str]
    channels: int
    image_size: int
    mean: tuple[float, ...] = field(default_factory=tuple)
    std: tuple[float, ...] = field(default_factory=tuple)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def task(self) -> Classification:
        """The task the dataset is labelled for: classification into :attr:`classes`."""
        from saal.tasks.classification import Classification  # tasks read datasets: imported late

        return Classification(self.num_classes, self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self.image_size == 0:
            return (self.channels,)
        return (self.channels, self.image_size, self.image_size)


def normalise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Return ``(images - mean) / std`` per channel for an ``N x C x H x W`` float tensor in [0, 1]."""
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s


def to_unit_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Return ``images`` as a new float32 tensor: uint8 pixels scaled to [0, 1], other numbers kept as they are."""
    if isinstance(images, np.ndarray):
        t = torch.from_numpy(images.astype(np.float32))  # a fresh, writable copy
        return t.div_(255.0) if images.dtype == np.uint8 else t
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images.to(torch.float32, copy=True)


STATS_CHUNK = 4096  # items per float64 partial sum of the normalisation statistics (fixes the rounding)
DEFAULT_STATS_SAMPLE = 50_000


class ChannelMoments:
    """Running per-channel (dim 1) float64 sums of values and squares, for a mean and standard deviation.

    Fed chunk by chunk with :meth:`add`; the same chunks in the same order give bit-identical results,
    however they were produced.
    """

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None
        self.count = 0

    def add(self, images: torch.Tensor, consume: bool = False) -> None:
        """Add an ``N x C [x H x W]`` chunk of items to the sums.

        With ``consume``, a float64 ``images`` may be overwritten (squared in place, saving a copy).
        """
        dims = [0, *range(2, images.dim())]
        part = images.to(torch.float64)
        if self.total is None or self.squares is None:
            self.total = torch.zeros(images.shape[1], dtype=torch.float64)
            self.squares = torch.zeros(images.shape[1], dtype=torch.float64)
        self.total += part.sum(dim=dims)
        # square in place when ``part`` is ours to overwrite: a fresh copy, or a consumed chunk
        squared = part.square_() if consume or part.data_ptr() != images.data_ptr() else part.square()
        self.squares += squared.sum(dim=dims)
        self.count += images.numel() // images.shape[1]

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Return ``(mean, std)`` per channel; a channel with no spread gets std 1.0.

        Raises:
            ValueError: nothing was added.
        """
        if self.total is None or self.squares is None:
            raise ValueError("no items to compute statistics of")
        mean = self.total / self.count
        std = (self.squares / self.count - mean.square()).clamp_min(0).sqrt()
        std = torch.where(std > 1e-8, std, torch.ones_like(std))
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def channel_mean_std(images: torch.Tensor, chunk: int = STATS_CHUNK) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return the per-channel (dim 1) mean and standard deviation of an ``N x C [x H x W]`` float tensor.

    Accumulated in float64 over chunks of items so that large sets need little extra memory. A channel
    with no spread gets std 1.0, so that normalising it never divides by zero.
    """
    moments = ChannelMoments()
    for start in range(0, len(images), chunk):
        moments.add(images[start : start + chunk])
    return moments.mean_std()


def check_stats_sample(stats_sample: object) -> int:
    """Return ``stats_sample`` if it is a positive integer.

    Raises:
        SaalError: it is not (bools, floats and strings are refused too).
    """
    if isinstance(stats_sample, bool) or not isinstance(stats_sample, (int, np.integer)) or stats_sample < 1:
        raise SaalError(
            f"stats_sample must be a positive integer (train items the normalisation statistics are taken from), "
            f"got {stats_sample!r}"
        )
    return int(stats_sample)


def stats_indices(n: int, stats_sample: int, seed: int) -> np.ndarray:
    """Return the sorted indices of the train items the normalisation statistics are computed from.

    All ``n`` items (``0..n-1``, in order) when ``stats_sample >= n``; else ``stats_sample`` distinct items
    drawn by ``numpy.random.default_rng(seed)``.
    """
    if stats_sample >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=stats_sample, replace=False)).astype(np.int64)


def streamed_mean_std(
    read: Callable[[np.ndarray], torch.Tensor], indices: np.ndarray, chunk: int = STATS_CHUNK, part: int = 1024
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return the per-channel mean and std of the items at ``indices``, decoding a few at a time.

    ``read(idx)`` returns the ``len(idx) x C [x H x W]`` float32 tensor (before normalisation) of those
    items; it is called on at most ``part`` items at a time, which are copied into one float64 buffer of
    ``chunk`` items, the unit of accumulation. So at most one such buffer is held, and with every item in
    order the result is bit-identical to :func:`channel_mean_std` on the whole (contiguous) float32 tensor.

    Raises:
        ValueError: ``indices`` is empty.
    """
    moments = ChannelMoments()
    for start in range(0, len(indices), chunk):
        idx = indices[start : start + chunk]
        buffer: torch.Tensor | None = None
        for s in range(0, len(idx), part):
            x = read(idx[s : s + part])
            if buffer is None:
                buffer = torch.empty((len(idx), *x.shape[1:]), dtype=torch.float64)
            buffer[s : s + len(x)] = x  # float32 -> float64 is exact: the same values as ``x.to(float64)``
            del x
        if buffer is not None:
            moments.add(buffer, consume=True)
    return moments.mean_std()


def normalise_(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Normalise an ``N x C x H x W`` or ``N x D`` float tensor in place per channel (feature); return it."""
    shape = (1, -1) + (1,) * (images.dim() - 2)
    images.sub_(torch.tensor(mean, dtype=images.dtype).view(shape))
    images.div_(torch.tensor(std, dtype=images.dtype).view(shape))
    return images


def stratified_split(targets: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split item indices into train and test, class by class, reproducibly.

    Each class sends ``round(test_fraction * n_class)`` of its items, drawn with a generator seeded by
    ``seed``, to the test split, but always keeps at least one item for training (so a class of one
    item has no test item).

    Returns:
        ``(train_indices, test_indices)``, each sorted ascending.

    Raises:
        SaalError: ``test_fraction`` is not strictly between 0 and 1, or no item lands in the test split.
    """
    if not 0.0 < test_fraction < 1.0:
        raise SaalError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    targets = np.asarray(targets).reshape(-1)
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        n_test = min(round(test_fraction * len(members)), len(members) - 1)
        test.append(rng.permutation(members)[:n_test])
    test_idx = np.sort(np.concatenate(test)) if test else np.empty(0, dtype=np.int64)
    if len(test_idx) == 0:
        raise SaalError(
            f"a test fraction of {test_fraction} of {len(targets)} items leaves no test item; "
            "add items or raise test_fraction"
        )
    train_idx = np.setdiff1d(np.arange(len(targets)), test_idx)
    return train_idx.astype(np.int64), test_idx.astype(np.int64)
