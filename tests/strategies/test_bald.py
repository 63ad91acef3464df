"""BALD: the mutual-information formula, zero without randomness, MC dropout with BatchNorm in eval."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from saal.data import ArrayDataset, DatasetBundle
from saal.errors import SaalError
from saal.models import MLP, SmallCNN
from saal.pool import Pool
from saal.strategies import build_strategy
from saal.strategies.bald import BALD, PrefixCache, dropout_modules, mutual_information


def _pool(digits: DatasetBundle, n_labelled: int = 20) -> Pool:
    pool = Pool(digits.train, digits.num_classes)
    pool.label(np.arange(n_labelled), digits.train_targets[:n_labelled])
    return pool


def test_mutual_information_of_hand_made_samples() -> None:
    probs = torch.tensor(
        [
            [[1.0, 0.0], [0.7, 0.3], [0.5, 0.5]],
            [[0.0, 1.0], [0.7, 0.3], [0.9, 0.1]],
        ],
        dtype=torch.float64,
    )  # T=2 samples, N=3 items, C=2 classes
    mi = mutual_information(probs)
    # Item 0: two certain, opposite votes -> H[mean] = ln 2, mean H = 0.
    # Item 1: identical votes -> 0.
    # Item 2: mean (0.7, 0.3); H(0.5, 0.5) = ln 2, H(0.9, 0.1).
    h = lambda p: -sum(x * math.log(x) for x in p if x > 0)  # noqa: E731
    expected = [math.log(2), 0.0, h([0.7, 0.3]) - 0.5 * (math.log(2) + h([0.9, 0.1]))]
    np.testing.assert_allclose(mi.numpy(), expected, atol=1e-12)


def test_mutual_information_matches_the_formula_on_random_samples() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(7, 5, 4, generator=g, dtype=torch.float64) * 3, dim=-1)
    p = probs.numpy()
    expected = []
    for n in range(p.shape[1]):
        mean = p[:, n].mean(0)
        expected.append(-(mean * np.log(mean)).sum() + np.mean([(s * np.log(s)).sum() for s in p[:, n]]))
    np.testing.assert_allclose(mutual_information(probs).numpy(), expected, rtol=1e-10)
    assert (mutual_information(probs) >= 0).all()


def test_bald_is_zero_for_a_model_whose_dropout_does_nothing(digits: DatasetBundle) -> None:
    torch.manual_seed(0)
    model = MLP(digits.input_shape, 10, dropout=0.0)
    sel = BALD(samples=5, batch_size=100).select(model, _pool(digits), 5, 0)
    assert len(sel.scores) == digits.train_targets.size - 20
    np.testing.assert_allclose(sel.scores, 0.0, atol=1e-12)


def test_bald_is_seeded_and_positive_with_dropout(digits: DatasetBundle) -> None:
    torch.manual_seed(0)
    model = MLP(digits.input_shape, 10, dropout=0.5)
    pool = _pool(digits)
    strategy = build_strategy("bald[samples=6]", batch_size=128)
    torch_state = torch.random.get_rng_state()
    a = strategy.select(model, pool, 5, 1)
    assert torch.equal(torch.random.get_rng_state(), torch_state), "the global torch stream must not move"
    b = strategy.select(model, pool, 5, 1)
    c = strategy.select(model, pool, 5, 2)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert not np.allclose(a.scores, c.scores)
    assert (a.scores > 0).all()
    np.testing.assert_array_equal(a.indices, a.scored_indices[np.argsort(-a.scores, kind="stable")[:5]])


class _BatchNormDropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.body(x)))


def test_only_dropout_runs_in_train_mode(digits: DatasetBundle) -> None:
    torch.manual_seed(0)
    model = _BatchNormDropoutNet()
    model.body[2].running_mean.fill_(0.3)  # distinctive running statistics
    seen: dict[str, set[bool]] = {"bn": set(), "drop": set()}
    model.body[2].register_forward_hook(lambda m, i, o: seen["bn"].add(m.training))
    model.drop.register_forward_hook(lambda m, i, o: seen["drop"].add(m.training))
    model.train()
    BALD(samples=3).select(model, _pool(digits), 4, 0)
    assert seen == {"bn": {False}, "drop": {True}}
    assert model.training and model.body[2].training  # restored
    assert torch.all(model.body[2].running_mean == 0.3)


def test_a_model_without_dropout_is_refused_with_the_fix() -> None:
    pool = Pool(ArrayDataset(torch.randn(10, 4), np.zeros(10, dtype=np.int64)), 2)
    with pytest.raises(SaalError, match=r"add an nn\.Dropout"):
        BALD().select(nn.Linear(4, 2), pool, 2, 0)


def test_too_few_samples_is_refused() -> None:
    with pytest.raises(SaalError, match="samples >= 2"):
        build_strategy("bald[samples=1]")


class _AwkwardNet(nn.Module):
    """In-place ops on reused outputs, a module called twice, and dropout in the middle."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(64, 32))
        self.act = nn.ReLU(inplace=True)
        self.shared = nn.Linear(32, 32)
        self.drop = nn.Dropout(0.5, inplace=True)
        self.out = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.stem(x))  # modifies the stem's output in place
        h = self.shared(h)
        h = self.drop(h)  # in place too
        return self.out(self.shared(h))  # `shared` runs again after the dropout


@pytest.mark.parametrize(
    "make", [lambda: MLP((1, 8, 8), 10), lambda: SmallCNN(1, 10, 8), _AwkwardNet, _BatchNormDropoutNet]
)
def test_reusing_the_prefix_gives_exactly_the_plain_scores(make, digits: DatasetBundle) -> None:
    torch.manual_seed(0)
    model = make()
    pool = _pool(digits)
    plain = BALD(samples=4, reuse_prefix=False, batch_size=200).select(model, pool, 5, 9)
    reused = BALD(samples=4, batch_size=200).select(model, pool, 5, 9)
    np.testing.assert_array_equal(reused.scores, plain.scores)
    np.testing.assert_array_equal(reused.indices, plain.indices)
    assert all("forward" not in vars(m) for m in model.modules()), "no replacement forward left behind"


def test_prefix_cache_reuses_only_what_ran_before_the_first_dropout() -> None:
    model = SmallCNN(1, 10, 8).train()
    cache = PrefixCache(model, dropout_modules(model))
    cache.first_pass(torch.randn(3, 1, 8, 8))
    assert {id(m) for m, _ in cache.reusable} == {id(model.block1), id(model.block2), id(model.fc)}
    awkward = _AwkwardNet()
    cache = PrefixCache(awkward, dropout_modules(awkward))
    cache.first_pass(torch.randn(3, 1, 8, 8))
    assert {id(m) for m, _ in cache.reusable} == {id(awkward.stem), id(awkward.act)}
