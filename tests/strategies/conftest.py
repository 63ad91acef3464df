"""One torch thread for the strategy tests: on a small shared CPU, several threads per process are
many times slower (they wait on each other), and every test here works on tiny batches."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
