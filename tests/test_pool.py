import numpy as np
import pytest

from saal.data.base import ArrayDataset
from saal.errors import SaalError
from saal.pool import Pool, initial_indices


@pytest.fixture
def pool() -> Pool:
    import torch

    x = torch.arange(20, dtype=torch.float32).view(20, 1)
    return Pool(ArrayDataset(x, np.arange(20) % 4), num_classes=4)


def test_label_speaks_dataset_indices_and_records_rounds(pool: Pool) -> None:
    pool.label([7, 3], [1, 2])
    pool.next_round()
    pool.label(np.array([15]), np.array([3]))
    assert pool.labelled_indices().tolist() == [3, 7, 15]
    assert pool.labels_of([7, 3, 15]).tolist() == [1, 2, 3]
    assert pool.round_labelled([3, 7, 15, 0]).tolist() == [0, 0, 1, -1]
    assert pool.num_labelled == 3 and pool.num_unlabelled == 17
    assert 7 not in pool.unlabelled_indices()


@pytest.mark.parametrize(
    ("indices", "labels", "message"),
    [
        ([20], [0], "out of range"),
        ([-1], [0], "out of range"),
        ([2, 2], [0, 0], "repeated"),
        ([1], [4], "not a class"),
        ([1], [-2], "not a class"),
        ([1, 2], [0], "one label per index"),
        ([1.5], [0], "must be integers"),
    ],
)
def test_bad_labels_raise_and_change_nothing(pool: Pool, indices, labels, message) -> None:
    with pytest.raises(SaalError, match=message):
        pool.label(indices, labels)
    assert pool.num_labelled == 0


def test_already_labelled_is_an_error(pool: Pool) -> None:
    pool.label([1], [0])
    with pytest.raises(SaalError, match="already labelled"):
        pool.label([2, 1], [0, 0])
    assert pool.labelled_indices().tolist() == [1]


def test_labels_of_unlabelled_is_an_error(pool: Pool) -> None:
    with pytest.raises(SaalError, match="not labelled"):
        pool.labels_of([0])


def test_state_dict_round_trip(pool: Pool) -> None:
    pool.label([4, 9], [0, 1])
    pool.next_round()
    pool.label([11], [3])
    other = Pool(pool.dataset, 4)
    other.load_state_dict(pool.state_dict())
    assert other.labelled_indices().tolist() == [4, 9, 11]
    assert other.round_labelled([4, 11]).tolist() == [0, 1]
    assert other.current_round == 1
    with pytest.raises(SaalError, match="same dataset"):
        Pool(pool.dataset, 5).load_state_dict(pool.state_dict())


def test_initial_indices_balanced_and_seeded() -> None:
    y = np.repeat(np.arange(5), 30)
    a = initial_indices(y, 10, 123)
    assert np.bincount(y[a], minlength=5).tolist() == [2] * 5
    assert a.tolist() == initial_indices(y, 10, np.random.default_rng(123)).tolist()
    assert a.tolist() != initial_indices(y, 10, 124).tolist()
    u = initial_indices(y, 7, 0, balanced=False)
    assert len(np.unique(u)) == 7


@pytest.mark.parametrize(("size", "message"), [(0, "impossible"), (151, "impossible"), (7, "multiple")])
def test_initial_indices_impossible_sizes(size: int, message: str) -> None:
    with pytest.raises(SaalError, match=message):
        initial_indices(np.repeat(np.arange(5), 30), size, 0)
