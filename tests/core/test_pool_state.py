import numpy as np
import pytest
import torch

from saal.core.pool_state import ItemState, PoolState
from saal.data.base import ArrayDataset
from saal.errors import SaalError
from saal.pool import Pool
from saal.tasks.base import Task


def test_states_labels_rounds_and_annotators() -> None:
    s = PoolState(6)
    s.label([4, 1], ["cat", {"boxes": [1, 2]}], annotator="ann")
    s.next_round()
    s.skip([2])
    assert s.ids(ItemState.LABELLED).tolist() == [1, 4]
    assert s.ids(ItemState.SKIPPED).tolist() == [2]
    assert s.ids(ItemState.UNLABELLED).tolist() == [0, 3, 5]
    assert s.labels([4, 1]) == ["cat", {"boxes": [1, 2]}]  # opaque values, as given
    assert s.rounds([1, 2, 0]).tolist() == [0, 1, -1]
    assert s.annotators([1, 0]) == ["ann", None]


def test_relabel_unlabel_and_errors_change_nothing() -> None:
    s = PoolState(4)
    s.label([0, 1], [5, 6])
    with pytest.raises(SaalError, match="already labelled"):
        s.label([2, 1], [7, 7])
    assert s.count(ItemState.LABELLED) == 2 and s.states([2]).tolist() == [ItemState.UNLABELLED]
    s.next_round()
    s.relabel([1], [9], annotator="b")
    assert s.labels([1]) == [9] and s.rounds([1]).tolist() == [1] and s.annotators([1]) == ["b"]
    with pytest.raises(SaalError, match="not labelled"):
        s.relabel([3], [1])
    s.unlabel([0])
    assert s.ids(ItemState.UNLABELLED).tolist() == [0, 2, 3] and s.rounds([0]).tolist() == [-1]
    with pytest.raises(SaalError, match="not labelled"):
        s.labels([0])
    with pytest.raises(SaalError, match="unlabel it before skipping"):
        s.skip([1])


def test_grows_without_reusing_ids() -> None:
    s = PoolState(3)
    s.label([2], ["x"])
    new = s.append(2)
    assert new.tolist() == [3, 4] and len(s) == 5
    assert s.ids(ItemState.UNLABELLED).tolist() == [0, 1, 3, 4] and s.labels([2]) == ["x"]
    with pytest.raises(SaalError, match="out of range"):
        s.label([5], ["y"])
    with pytest.raises(SaalError, match="cannot append"):
        s.append(-1)


def test_state_dict_round_trip_keeps_everything() -> None:
    s = PoolState(5)
    s.label([0, 3], [[1.0, 2.0], [3.0]], annotator="a")
    s.next_round()
    s.skip([4], annotator="b")
    t = PoolState()
    t.load_state_dict(s.state_dict())
    assert len(t) == 5 and t.current_round == 1
    assert t.labels([0, 3]) == [[1.0, 2.0], [3.0]] and t.annotators([0, 4]) == ["a", "b"]
    assert t.ids(ItemState.SKIPPED).tolist() == [4]
    with pytest.raises(SaalError, match="format"):
        t.load_state_dict({"format": 99})


@pytest.fixture
def pool() -> Pool:
    return Pool(ArrayDataset(torch.zeros(10, 2), np.arange(10) % 3), num_classes=3)


def test_pool_reads_a_state_written_by_0_1_0(pool: Pool) -> None:
    labels = np.full(10, -1)
    labels[[2, 7]] = [1, 0]
    rounds = np.full(10, -1)
    rounds[[2, 7]] = [0, 1]
    pool.load_state_dict({"labels": labels, "round": rounds, "current_round": 1, "num_classes": 3})
    assert pool.labelled_indices().tolist() == [2, 7]
    assert pool.labels_of([2, 7]).tolist() == [1, 0]
    assert pool.round_labelled([2, 7]).tolist() == [0, 1] and pool.current_round == 1
    with pytest.raises(SaalError, match="same dataset"):
        pool.load_state_dict({"labels": labels, "round": rounds, "current_round": 1, "num_classes": 4})


def test_pool_skip_unlabel_relabel_and_grow(pool: Pool) -> None:
    pool.label([1, 2], [0, 2], annotator="x")
    pool.skip([3])
    assert 3 not in pool.unlabelled_indices() and pool.skipped_indices().tolist() == [3]
    assert pool.num_unlabelled == 7
    pool.relabel([2], [1])
    assert pool.labels_of([2]).tolist() == [1]
    with pytest.raises(SaalError, match="not a class"):
        pool.relabel([2], [3])
    pool.unlabel([1, 3])
    assert pool.labelled_indices().tolist() == [2] and pool.num_unlabelled == 9
    new = pool.grow(ArrayDataset(torch.zeros(12, 2), np.arange(12) % 3))
    assert new.tolist() == [10, 11] and len(pool) == 12 and pool.labels_of([2]).tolist() == [1]
    with pytest.raises(SaalError, match="cannot grow"):
        pool.grow(ArrayDataset(torch.zeros(3, 2), np.arange(3)))


def test_pool_needs_a_class_count_or_a_task() -> None:
    data = ArrayDataset(torch.zeros(2, 1), np.zeros(2))
    with pytest.raises(SaalError, match="either num_classes"):
        Pool(data)
    with pytest.raises(SaalError, match="at least 1"):
        Pool(data, 0)


class _Words(Task):
    """A task whose labels are non-empty strings: the pool stores whatever the task accepts."""

    name = "words"

    def check_labels(self, labels, count):
        values = list(labels)
        if len(values) != count or not all(isinstance(v, str) and v for v in values):
            raise SaalError("labels must be non-empty strings, one per index")
        return values

    def pseudo_targets(self, outputs):  # pragma: no cover - not used here
        raise NotImplementedError

    def output_losses(self, outputs, targets):  # pragma: no cover
        raise NotImplementedError

    def embed(self, model, inputs):  # pragma: no cover
        raise NotImplementedError

    def evaluate(self, model, dataset, batch_size=512):  # pragma: no cover
        raise NotImplementedError


def test_label_values_are_the_tasks_business() -> None:
    pool = Pool(ArrayDataset(torch.zeros(4, 1), np.zeros(4)), task=_Words())
    pool.label([0, 3], ["a", "bc"])
    assert pool.labels_of([3, 0]) == ["bc", "a"]
    with pytest.raises(SaalError, match="non-empty strings"):
        pool.label([1], [""])
    restored = Pool(pool.dataset, task=_Words())
    restored.load_state_dict(pool.state_dict())
    assert restored.labels_of([0]) == ["a"]
    with pytest.raises(SaalError, match="same dataset"):
        Pool(pool.dataset, 2).load_state_dict(pool.state_dict())
