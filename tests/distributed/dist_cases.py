"""The pool, model and strategies the distributed tests score, shared by the test and its torchrun workers."""

from __future__ import annotations

import numpy as np
import torch

from saal.data.base import ArrayDataset
from saal.models.cnn import SmallCNN
from saal.pool import Pool

# 101 unlabelled items: over 2 ranks in batches of 8, 13 batches split 7 + 6 (56 + 45 items).
UNLABELLED = 101
BATCH = 8
STRATEGIES = (
    "random",
    "entropy",
    "margin",
    "least-confidence",
    "bald[samples=3]",
    "coreset",
    "coreset[prefilter=30]",
    "badge",
    "badge[prefilter=30]",
    "saal",
    "saal[scope=last-layer]",
    "saal[granularity=per-batch,score=diff]",
    "saal-reference",
)


def make_case() -> tuple[torch.nn.Module, Pool]:
    """Return a seeded small CNN and a pool of 107 items, 6 labelled."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(UNLABELLED + 6, 1, 8, 8, generator=g)
    y = np.arange(UNLABELLED + 6) % 3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = SmallCNN(1, 3, 8, width=4)
    pool = Pool(ArrayDataset(x, y), 3)
    labelled = np.array([0, 20, 40, 60, 80, 100])
    pool.label(labelled, y[labelled])
    return model.eval(), pool
