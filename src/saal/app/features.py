"""What the model job trains on: each image decoded once, then cached in the project folder.

* ``pretrained``: the 1280-d embedding of the offline ImageNet-pretrained EfficientNet-Lite0
  (:mod:`saal.models.pretrained`) of each image resized to ``image_size``; retraining is then a small head on these
  vectors, cheap enough to run every few labels on a CPU.
* ``cnn``: the image's pixels at a small side (uint8), for the small CNN of :mod:`saal.models` trained from scratch
  (the fallback when the ``pretrained`` extra or its weights are missing).

The cache is a ``.npy`` file of one row per item id plus a ``done`` mask, written chunk by chunk: a killed job
keeps what it finished. Its name holds the weights' fingerprint and the side, so other weights or sizes never mix.
Images are resized to a square (squashed, not cropped: nothing at the borders is cut away).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from saal.errors import SaalError

CHUNK = 64
CNN_MAX_SIDE = 64


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
    """Rows of features per item id, cached in ``folder``; grows when items are added.

    Args:
        folder: the project's state folder.
        extractor: what a row is.
    """

    def __init__(self, folder: Path, extractor: Extractor) -> None:
        self.extractor = extractor
        stem = f"features-{extractor.kind}-{extractor.side}-{extractor.tag}"
        self.path = folder / f"{stem}.npy"
        self.done_path = folder / f"{stem}-done.npy"

    def _open(self, size: int) -> tuple[np.memmap, np.ndarray]:
        done = np.load(self.done_path) if self.done_path.exists() and self.path.exists() else np.zeros(0, bool)
        rows = np.lib.format.open_memmap(self.path, mode="r+") if done.size else None
        if rows is None or len(rows) < size:
            grown = np.lib.format.open_memmap(
                self.path.with_suffix(".tmp.npy"),
                mode="w+",
                dtype=self.extractor.dtype,
                shape=(size, *self.extractor.row_shape),
            )
            if rows is not None:
                grown[: len(rows)] = rows
                del rows
            grown.flush()
            del grown
            self.path.with_suffix(".tmp.npy").replace(self.path)
            done = np.concatenate([done, np.zeros(size - len(done), dtype=bool)])
            self._save_done(done)
            rows = np.lib.format.open_memmap(self.path, mode="r+")
        return rows, done

    def _save_done(self, done: np.ndarray) -> None:
        tmp = self.done_path.with_suffix(".tmp.npy")
        np.save(tmp, done)
        tmp.replace(self.done_path)  # atomic: a killed job leaves the old mask or the new one

    def ensure(
        self,
        items: list[tuple[int, Path]],
        size: int,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[np.ndarray, dict[int, str]]:
        """Compute the rows of ``items`` (id, file) that are not cached yet.

        Args:
            items: the readable items.
            size: the number of item ids (rows) the cache must hold.
            progress: called with (done, to do) after each chunk.

        Returns:
            The rows (a read-only memory map, ``size`` rows) and ``{id: why}`` for images that failed to decode.
        """
        rows, done = self._open(size)
        todo = [(i, p) for i, p in items if not done[i]]
        failed: dict[int, str] = {}
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start : start + CHUNK]
            decoded, ids = [], []
            for item_id, path in chunk:
                try:
                    decoded.append(decode(path, self.extractor.side))
                    ids.append(item_id)
                except SaalError as error:
                    failed[item_id] = str(error)
            if ids:
                rows[np.asarray(ids)] = self.extractor.encode(np.stack(decoded))
                rows.flush()
                done[np.asarray(ids)] = True
                self._save_done(done)
            if progress is not None:
                progress(min(start + CHUNK, len(todo)), len(todo))
        del rows
        return np.load(self.path, mmap_mode="r"), failed
