"""Shared fixtures: the real data beside the repo, and small loaded datasets."""

from __future__ import annotations

from pathlib import Path

import pytest

from saal.data import DatasetBundle, load_dataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real MNIST / CIFAR-10 files beside the repo; skips the test when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def digits() -> DatasetBundle:
    return load_dataset("digits")


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared CPU OpenMP spin-waits make them erratic."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
