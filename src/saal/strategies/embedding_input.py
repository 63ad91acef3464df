"""The embedding a representativeness strategy works in: the inputs, the model's, the pretrained backbone's or yours.

Cold-start strategies (TypiClust, ProbCover, ...) choose *representative* items in an embedding space, and the
space decides what "representative" means. :func:`pool_embeddings` returns ``len(indices) x d`` float32 rows for
dataset indices, from one of:

* ``"input"``: the dataset's inputs, flattened, read in batches through :mod:`saal.core.scan`. When the pool's
  items are feature vectors (a run with ``--model pretrained-linear`` / ``pretrained-mlp``, whose dataset is the
  cached backbone features), these *are* the pretrained embeddings.
* ``"model"``: the model's penultimate features (the task's ``embed``, as core-set uses them).
* ``"pretrained"``: the frozen ImageNet-pretrained EfficientNet-Lite0's 1,280-d features of the pool's images
  (:mod:`saal.models.frozen_backbone`), computed once for the whole dataset and kept in the feature cache
  (:func:`saal.data.feature_cache.cached`, keyed by the weights, a fingerprint of the dataset, the input size
  and the pixel mapping). When the items are already 1-D vectors, ``"pretrained"`` means the inputs themselves.
  Needs ``saal[pretrained]``.
* ``"auto"``: ``"input"`` when the items are 1-D vectors, else ``"pretrained"``.
* a numpy array of ``len(pool.dataset) x d`` finite numbers: your own embedding, row ``i`` for dataset item ``i``.

The backbone sees pixels in [0, 1]: a dataset that records its normalisation (``mean`` / ``std`` attributes, as
image folders and ``.npz`` / ``.npy`` pools do) is un-normalised with it; any other (an in-memory
:class:`~saal.data.base.ArrayDataset`) is mapped per channel from its smallest to its largest input value onto
[0, 1], which recovers the pixels exactly when every channel holds a black and a white pixel somewhere (MNIST,
CIFAR, digits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from saal.core.model_state import model_device
from saal.core.scan import Batch, batches, scan
from saal.errors import SaalError
from saal.pool import Pool

EMBEDDINGS = ("auto", "input", "model", "pretrained")
DEFAULT_IMAGE_SIZE = 96
_WHAT = (
    "pass embedding='auto', 'input', 'model', 'pretrained' or a 2-D numpy array of finite numbers "
    "with one row per dataset item"
)


def check_embedding_option(value: Any) -> str | np.ndarray:
    """Return a strategy's ``embedding`` option, checked (for a constructor: a bad value fails at once).

    Returns:
        The name (one of :data:`EMBEDDINGS`) or the array as float32 (its row count is checked against the
        pool's dataset at selection time, by :func:`pool_embeddings`).

    Raises:
        SaalError: an unknown name, or an array that is not 2-D or holds NaN / inf (one line saying what to pass).
    """
    if isinstance(value, str):
        if value not in EMBEDDINGS:
            raise SaalError(f"unknown embedding {value!r}; {_WHAT}")
        return value
    if isinstance(value, (np.ndarray, torch.Tensor)):
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        if array.ndim != 2 or array.shape[1] < 1:
            raise SaalError(f"an embedding array must be 2-D (items x dimensions), got shape {array.shape}; {_WHAT}")
        if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
            raise SaalError(f"an embedding array must hold real numbers, got dtype {array.dtype}; {_WHAT}")
        array = np.asarray(array, dtype=np.float32)
        if not np.isfinite(array).all():
            raise SaalError(f"the embedding array holds NaN or inf (or values beyond float32); {_WHAT}")
        return array
    raise SaalError(f"embedding must be a name or an array, got {type(value).__name__}; {_WHAT}")


def describe_embedding(value: str | np.ndarray) -> str:
    """Return a short text for ``repr``: the name, or ``array(N x d)``."""
    return repr(value) if isinstance(value, str) else f"array({value.shape[0]} x {value.shape[1]})"


def l2_normalise(x: np.ndarray | torch.Tensor, eps: float = 1e-12) -> Any:
    """Return every row of ``x`` divided by its Euclidean norm (a zero row stays zero).

    Returns:
        The same kind (numpy array or tensor), shape and dtype as ``x``; a new array / tensor.
    """
    if isinstance(x, torch.Tensor):
        return x / x.norm(dim=1, keepdim=True).clamp_min(eps)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(x.dtype, copy=False)


def items_are_vectors(dataset: Dataset[Any], indices: np.ndarray | None = None) -> bool:
    """Return whether the dataset's items are 1-D vectors (feature rows), judged by one item.

    The item read is ``indices[0]`` when given and not empty, else item 0; an empty dataset counts as vectors.
    """
    if indices is not None and len(indices):
        first = int(indices[0])
    elif len(dataset) > 0:  # type: ignore[arg-type]
        first = 0
    else:
        return True
    return torch.as_tensor(dataset[first][0]).dim() == 1


def pool_embeddings(
    embedding: str | np.ndarray,
    model: nn.Module,
    pool: Pool,
    indices: np.ndarray,
    batch_size: int = 256,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    cache_dir: str | Path | None = None,
    weights: str | Path | None = None,
) -> np.ndarray:
    """Return the embeddings of dataset items ``indices`` (see the module docstring for the choices).

    Args:
        embedding: ``"auto"``, ``"input"``, ``"model"``, ``"pretrained"`` or a ``len(pool.dataset) x d`` array.
        model: the current model (read only for ``"model"``; its device runs the backbone for ``"pretrained"``).
        pool: the pool whose dataset and task are read.
        indices: dataset indices, in the order the rows are wanted.
        batch_size: items read (and embedded) at once.
        image_size: the side images are resized to before the pretrained backbone.
        cache_dir: the feature cache folder for ``"pretrained"`` (default ``$SAAL_FEATURE_CACHE``).
        weights: the backbone's weights file (default the packaged ImageNet weights).

    Returns:
        A C-contiguous float32 array of ``len(indices)`` rows (``0 x 0`` when ``indices`` is empty and no array
        was given).

    Raises:
        SaalError: a bad ``embedding`` (unknown name; an array that is not 2-D, holds NaN / inf, or whose row
            count differs from the dataset's); images the backbone cannot take; an unusable cache folder.
        MissingExtra: ``"pretrained"`` (or ``"auto"`` on images) without ``saal[pretrained]`` installed.
    """
    choice = check_embedding_option(embedding)
    idx = np.ascontiguousarray(indices, dtype=np.int64).reshape(-1)
    if isinstance(choice, np.ndarray):
        n = len(pool.dataset)  # type: ignore[arg-type]
        if len(choice) != n:
            raise SaalError(f"the embedding array has {len(choice)} rows but the pool's dataset {n} items; {_WHAT}")
        return np.ascontiguousarray(choice[idx])
    if len(idx) == 0:
        return np.empty((0, 0), dtype=np.float32)
    if choice == "model":
        from saal.strategies.coreset import embeddings  # coreset imports little, but keep this module light

        return np.ascontiguousarray(embeddings(model, pool.dataset, idx, batch_size, pool.task).cpu().numpy())
    if choice == "input" or items_are_vectors(pool.dataset, idx):
        return input_rows(pool.dataset, idx, batch_size, getattr(pool.task, "collate", None))
    features = pretrained_features(
        pool.dataset, image_size=image_size, cache_dir=cache_dir, weights=weights,
        batch_size=batch_size, device=model_device(model),
    )  # fmt: skip
    return np.ascontiguousarray(features[torch.as_tensor(idx)].numpy())


def input_rows(dataset: Dataset[Any], indices: np.ndarray, batch_size: int, collate: Any = None) -> np.ndarray:
    """Return the inputs of ``dataset[indices]`` flattened to rows (float32), read ``batch_size`` at a time."""

    def flat(batch: Batch) -> dict[str, torch.Tensor]:
        return {"x": torch.as_tensor(batch.inputs).reshape(len(batch), -1).to(torch.float32)}

    out = scan(dataset, indices, flat, batch_size=batch_size, collate=collate)
    rows = out["x"].cpu().numpy() if out else np.empty((0, 0), dtype=np.float32)
    return np.ascontiguousarray(rows, dtype=np.float32)


def pixel_mapping(dataset: Dataset[Any]) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Return ``(mean, std)``, the dataset's recorded normalisation (``pixels = inputs * std + mean``), or None.

    Image folders and ``.npz`` / ``.npy`` pools record it (``mean`` and ``std`` attributes); an in-memory
    :class:`~saal.data.base.ArrayDataset` does not (then see :func:`input_range`).
    """
    mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
    if mean is not None and std is not None and len(mean) and len(mean) == len(std):
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)
    return None


def input_range(dataset: Dataset[Any], batch_size: int = 256) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return ``(mean, std)`` mapping each channel's smallest input to 0 and its largest to 1 (one pass).

    ``pixels = inputs * std + mean``; a channel without spread maps to 0. An empty dataset gives the identity.
    """
    low: torch.Tensor | None = None
    high: torch.Tensor | None = None
    for batch in batches(dataset, np.arange(len(dataset)), batch_size):  # type: ignore[arg-type]
        x = torch.as_tensor(batch.inputs).to(torch.float32)
        dims = [0, *range(2, x.dim())]
        lo, hi = x.amin(dim=dims), x.amax(dim=dims)
        low = lo if low is None else torch.minimum(low, lo)
        high = hi if high is None else torch.maximum(high, hi)
    if low is None or high is None:
        return (0.0,), (1.0,)
    spread = high - low
    scale = torch.where(spread > 0, spread, torch.ones_like(spread))
    return tuple(float(v) for v in (-low / scale)), tuple(float(v) for v in (1.0 / scale))


def pretrained_features(
    dataset: Dataset[Any],
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    cache_dir: str | Path | None = None,
    weights: str | Path | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Return the frozen EfficientNet-Lite0's features of every item of ``dataset`` (``N x 1280``, CPU, float32).

    Read from the feature cache when it holds them (keyed by the weights' hash, the dataset's fingerprint,
    ``image_size`` and the pixel mapping: the recorded normalisation, else the inputs' range, see
    :func:`input_range`), else computed (``batch_size`` images at a time) and stored.

    Raises:
        MissingExtra: ``saal[pretrained]`` is not installed.
        SaalError: items that are not 1- or 3-channel images, a bad ``image_size`` or weights file, an
            unusable cache folder.
    """
    from saal.data.feature_cache import cached, dataset_fingerprint
    from saal.models.frozen_backbone import BackboneFeatures, extract_features
    from saal.models.pretrained import BACKBONE_NAME, FEATURE_DIM, weights_fingerprint

    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 16 <= image_size <= 1024:
        raise SaalError(f"image_size must be an integer in 16..1024, got {image_size!r}")
    n = len(dataset)  # type: ignore[arg-type]
    shape = tuple(torch.as_tensor(dataset[0][0]).shape) if n else ()
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise SaalError(
            f"the pretrained backbone needs 1- or 3-channel images (C, H, W), the pool's items have shape {shape}; "
            "use embedding='input' or 'model', or pass an array"
        )
    recorded = pixel_mapping(dataset)
    key = {
        "backbone": BACKBONE_NAME,
        "weights": weights_fingerprint(weights),
        "image_size": image_size,
        "pixels": ["normalisation", *map(list, recorded)] if recorded is not None else ["range"],
        "data": dataset_fingerprint(dataset),
    }

    def compute() -> dict[str, torch.Tensor]:
        mean, std = recorded if recorded is not None else input_range(dataset, batch_size)
        extractor = BackboneFeatures(image_size, mean, std, weights).to(device)
        return {"pool": extract_features(extractor, dataset, batch_size, "pretrained features (pool)")}

    tensors, path, _ = cached(key, compute, cache_dir, prefix=f"{BACKBONE_NAME}-{image_size}px-pool")
    features = tensors["pool"]
    if features.shape != (n, FEATURE_DIM):
        raise SaalError(f"feature cache {path} holds {tuple(features.shape)} features for {n} items; delete it")
    return features


__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "EMBEDDINGS",
    "check_embedding_option",
    "describe_embedding",
    "input_range",
    "input_rows",
    "items_are_vectors",
    "l2_normalise",
    "pixel_mapping",
    "pool_embeddings",
    "pretrained_features",
]
