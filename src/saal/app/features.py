"""What the model job trains on: each image decoded once, then cached in the project folder.

* ``pretrained``: the 1280-d embedding of the offline ImageNet-pretrained EfficientNet-Lite0
  (:mod:`saal.models.pretrained`) of each image resized to ``image_size``; retraining is then a small head on these
  vectors, cheap enough to run every few labels on a CPU.
* ``cnn``: the image's pixels at a small side (uint8), for the small CNN of :mod:`saal.models` trained from scratch
  (the fallback when the ``pretrained`` extra or its weights are missing).

The rows are kept by the one feature cache (:class:`saal.data.feature_cache.RowCache`) in the project's state folder:
one row per item id, keyed by the model kind, the weights' fingerprint, the side and the pixel mapping (so other
weights or sizes never mix), each row checked by a checksum and tied to its image file's size and modification time.
Only new or changed images are decoded, chunk by chunk: a killed job keeps what it finished. A project cached by an
earlier saal (``features-KIND-SIDE-TAG.npy`` and its ``-done.npy`` mask) keeps its rows (one line says so).
Images are resized to a square (squashed, not cropped: nothing at the borders is cut away).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from saal.data.feature_cache import RowCache
from saal.errors import SaalError

CNN_MAX_SIDE = 64
# How images become the pixels an extractor encodes (part of the cache key: a change here is a new cache).
PIXELS = "PIL RGB, squashed to side x side (bilinear), uint8"


def decode(path: Path, side: int) -> np.ndarray:
    """Return the image at ``path`` as ``side x side x 3`` uint8 RGB.

    Raises:
        SaalError: the file cannot be decoded (the message names it and why).
    """
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except Exception as error:  # PIL raises many kinds for damaged pixel data
        reason = str(error).splitlines()[0] if str(error) else "unreadable"
        raise SaalError(f"{type(error).__name__}: {reason}") from None


@dataclass
class Extractor:
    """Turns decoded images into the rows the model trains on.

    Attributes:
        kind: ``pretrained`` or ``cnn``.
        side: the side images are decoded at.
        row_shape, dtype: one cached row.
        tag: what the cache file is keyed by (weights fingerprint or ``pixels``).
        encode: ``(n, side, side, 3) uint8 -> (n, *row_shape)`` array.
    """

    kind: str
    side: int
    row_shape: tuple[int, ...]
    dtype: type
    tag: str
    encode: Callable[[np.ndarray], np.ndarray]


def make_extractor(kind: str, image_size: int) -> tuple[Extractor, str | None]:
    """Return the extractor for the model ``kind`` (``auto`` picks pretrained when possible) and, when ``auto``
    fell back to ``cnn``, why.

    Raises:
        SaalError: ``pretrained`` was asked for but its extra or weights are missing.
    """
    if kind in ("auto", "pretrained"):
        try:
            return _pretrained(image_size), None
        except SaalError as error:
            if kind == "pretrained":
                raise
            reason = str(error)
    else:
        reason = None
    side = min(image_size, CNN_MAX_SIDE)
    return Extractor("cnn", side, (side, side, 3), np.uint8, "pixels", lambda images: images), reason


def _pretrained(image_size: int) -> Extractor:
    from saal.models.pretrained import FEATURE_DIM, efficientnet_lite0, normalize, weights_fingerprint

    backbone = efficientnet_lite0()
    tag = weights_fingerprint()

    def encode(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
        with torch.no_grad():
            emb = backbone.forward_head(backbone.forward_features(normalize(x)), pre_logits=True)  # type: ignore[operator]
        out: np.ndarray = emb.numpy().astype(np.float32)
        return out

    return Extractor("pretrained", image_size, (FEATURE_DIM,), np.float32, tag, encode)


class FeatureCache:
    """The rows of ``extractor`` per item id of a project, in the one feature cache in ``folder``.

    Args:
        folder: the project's state folder.
        extractor: what a row is.
    """

    def __init__(self, folder: Path, extractor: Extractor) -> None:
        self.extractor = extractor
        side = extractor.side
        key = {
            "app": "saal label",
            "kind": extractor.kind,
            "weights": extractor.tag,
            "image_size": side,
            "pixels": PIXELS,
        }
        legacy = folder / f"features-{extractor.kind}-{extractor.side}-{extractor.tag}"
        self.rows = RowCache(
            folder,
            key,
            extractor.row_shape,
            extractor.dtype,
            prefix=f"features-{extractor.kind}-{extractor.side}px",
            legacy=(legacy.with_name(legacy.name + ".npy"), legacy.with_name(legacy.name + "-done.npy")),
        )
        self.path = self.rows.path

    def ensure(
        self,
        items: list[tuple[int, Path]],
        size: int,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[np.ndarray, dict[int, str]]:
        """Compute the rows of ``items`` (id, file) that are not cached yet, or whose file changed.

        Args:
            items: the readable items.
            size: the number of item ids (rows) the cache must hold.
            progress: called with (done, to do) after each chunk.

        Returns:
            The rows (a read-only memory map, ``size`` rows) and ``{id: why}`` for images that failed to decode.

        Raises:
            SaalError: the state folder cannot be written.
        """
        return self.rows.ensure(items, size, self.compute, progress)

    def compute(self, chunk: list[tuple[int, Path]]) -> tuple[list[int], np.ndarray, dict[int, str]]:
        """Decode and encode the images of ``chunk``; return the ids done, their rows and ``{id: why}`` of the rest."""
        decoded, ids, failed = [], [], {}
        for item_id, path in chunk:
            try:
                decoded.append(decode(path, self.extractor.side))
                ids.append(item_id)
            except SaalError as error:
                failed[item_id] = str(error)
        rows = self.extractor.encode(np.stack(decoded)) if decoded else np.empty((0, *self.extractor.row_shape))
        return ids, rows, failed
