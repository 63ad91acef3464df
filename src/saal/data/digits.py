"""scikit-learn's bundled 8x8 digits: the embedded default that needs no download."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from saal.data.base import ArrayDataset, DatasetBundle, normalise

SPLIT_SEED = 0
TEST_FRACTION = 0.25


def load(data_dir: str | None = None) -> DatasetBundle:
    """Return digits as 1 x 8 x 8 images in [0, 1], normalised; a fixed stratified 75/25 split."""
    del data_dir  # bundled with scikit-learn
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = d.target.astype(np.int64)
    tr, te = train_test_split(np.arange(len(y)), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y)
    mean = (float(x[tr].mean()),)
    std = (float(x[tr].std()),)
    x = normalise(x, mean, std)
    return DatasetBundle(
        name="digits",
        train=ArrayDataset(x[tr], y[tr]),
        test=ArrayDataset(x[te], y[te]),
        train_targets=y[tr],
        classes=[str(i) for i in range(10)],
        channels=1,
        image_size=8,
        mean=mean,
        std=std,
    )
