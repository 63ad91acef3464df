"""The `saal` and `saal-reference` strategies: options, scores, selection, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from saal.data import DatasetBundle
from saal.data.base import ArrayDataset
from saal.errors import SaalError
from saal.experiment import ActiveLearningRun, RunConfig
from saal.models import MLP
from saal.pool import Pool
from saal.sharpness import naive_perturbed_losses
from saal.strategies import build_strategy, strategy_options
from saal.strategies.saal import SAAL, SAALReference, kmeans_pp_1d
from saal.tasks import Classification
from saal.training import TrainConfig


def _pool(n: int = 60, labelled: int = 10) -> Pool:
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.randn(n, 1, 8, 8, generator=g), np.arange(n) % 10)
    pool = Pool(data, 10)
    pool.label(np.arange(labelled), np.arange(labelled) % 10)
    return pool


def _model() -> nn.Module:
    torch.manual_seed(0)
    return MLP((1, 8, 8), 10)


def test_spec_options_reach_the_strategy() -> None:
    s = build_strategy("saal[rho=0.1,score=diff,scope=last-layer,granularity=per-batch,selection=kmeans++]")
    assert isinstance(s, SAAL)
    assert (s.rho, s.score_kind, s.scope, s.granularity, s.selection) == (
        0.1,
        "diff",
        "last-layer",
        "per-batch",
        "kmeans++",
    )
    d = build_strategy("saal")
    assert (d.rho, d.perturbation, d.score_kind, d.granularity, d.scope, d.selection, d.subset) == (
        0.05,
        "asam",
        "max",
        "per-instance",
        "all",
        "top-k",
        None,
    )


def test_reference_defaults_are_the_reference_code() -> None:
    opts = strategy_options("saal-reference")
    assert opts["perturbation"] == "asam" and opts["rho"] == 0.05 and opts["granularity"] == "per-instance"
    assert opts["score"] == "max" and opts["selection"] == "kmeans++" and opts["subset"] == 2000
    s = build_strategy("saal-reference", subset=None, batch_size=32)
    assert isinstance(s, SAALReference) and s.subset == 2000 and s.batch_size == 32
    assert build_strategy("saal-reference", subset=500).subset == 500


def test_a_reference_variant_is_its_parent_with_other_defaults_and_the_same_repr() -> None:
    assert repr(SAALReference()) == (
        "SAALReference(rho=0.05, perturbation='asam', score='max', granularity='per-instance', scope='all', "
        "selection='kmeans++', batch_size=256, subset=2000)"
    )
    assert repr(SAAL(rho=0.1, selection="diversity")) == (
        "SAAL(rho=0.1, perturbation='asam', score='max', granularity='per-instance', scope='all', "
        "selection='kmeans++', batch_size=256, subset=None)"
    )
    assert SAALReference(selection="top-k", scope="last-layer").selection == "top-k"
    with pytest.raises(TypeError, match="nosuch"):

        class Broken(SAAL):  # an override of no option is a mistake in the class, found when it is defined
            default_overrides = {"nosuch": 1}  # noqa: RUF012


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        ("saal[perturbation=adam]", "perturbation must be one of asam, sam"),
        ("saal[score=mean]", "score must be one of max, diff"),
        ("saal[granularity=per-pixel]", "granularity must be one of per-instance, per-batch"),
        ("saal[scope=first-layer]", "scope must be one of all, last-layer"),
        ("saal[selection=random]", "selection must be one of top-k, kmeans\\+\\+"),
        ("saal[rho=-0.5]", "rho must be a finite number >= 0"),
        ("saal[rho=big]", "rho must be a finite number >= 0"),
        ("saal-reference[subset=0]", "subset must be"),
    ],
)
def test_bad_option_values_name_the_option_and_allowed_values(spec: str, text: str) -> None:
    with pytest.raises(SaalError, match=text):
        build_strategy(spec)


@pytest.mark.parametrize("score", ["max", "diff"])
def test_select_returns_the_score_of_every_candidate_and_takes_the_top_k(score: str) -> None:
    pool, model = _pool(), _model()
    s = SAAL(score=score, batch_size=7)
    sel = s.select(model, pool, 5, 0)
    np.testing.assert_array_equal(sel.scored_indices, pool.unlabelled_indices())
    assert sel.scores.shape == (50,) and np.isfinite(sel.scores).all()
    order = np.argsort(-sel.scores, kind="stable")[:5]
    np.testing.assert_array_equal(sel.indices, sel.scored_indices[order])
    # The scores are the definition's, instance by instance.
    x = pool.dataset.inputs[sel.scored_indices[:4]]
    loss, pert = naive_perturbed_losses(model, x)
    expected = (pert if score == "max" else pert - loss).double().numpy()
    np.testing.assert_allclose(sel.scores[:4], expected, rtol=1e-4, atol=2e-6)


def test_same_generator_same_selection_and_seeds_matter() -> None:
    pool, model = _pool(), _model()
    ref = SAALReference(subset=30)
    a = ref.select(model, pool, 6, np.random.default_rng(3))
    b = ref.select(model, pool, 6, np.random.default_rng(3))
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert len(a.scored_indices) == 30 and not pool.is_labelled(a.indices).any()
    others = {tuple(ref.select(model, pool, 6, seed).indices) for seed in range(4, 9)}
    assert len(others | {tuple(a.indices)}) > 1


def test_select_leaves_the_model_as_it_was() -> None:
    pool, model = _pool(), _model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    SAAL(selection="kmeans++").select(model, pool, 3, 0)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_kmeans_pp_first_pick_is_the_largest_magnitude() -> None:
    scores = np.array([0.5, -3.0, 2.0, 2.9])
    picks = kmeans_pp_1d(scores, 4, np.random.default_rng(0))
    assert picks[0] == 1
    assert sorted(picks) == [0, 1, 2, 3]


def test_kmeans_pp_samples_in_proportion_to_squared_distance() -> None:
    rng = np.random.default_rng(0)
    scores = np.array([0.0, 1.0, 3.0])  # first pick 3.0; then d^2 = 9, 4 -> P(0.0) = 9 / 13
    second = np.array([kmeans_pp_1d(scores, 2, rng)[1] for _ in range(3000)])
    assert abs((second == 0).mean() - 9 / 13) < 0.03


def test_kmeans_pp_with_equal_scores_still_picks_distinct_items() -> None:
    picks = kmeans_pp_1d(np.ones(10), 10, np.random.default_rng(1))
    assert sorted(picks) == list(range(10))
    with pytest.raises(SaalError):
        kmeans_pp_1d(np.ones(3), 4, np.random.default_rng(1))


def _kmeans_pp_1d_before_d2_sample(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """kmeans_pp_1d as it was before it called saal.core.selection.d2_sample: the picks must not change."""
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=0.0, posinf=np.finfo(np.float64).max / 4)
    n = len(s)
    if k == 0:
        return np.empty(0, dtype=np.int64)
    first = int(np.argmax(np.abs(s)))
    picked = [first]
    taken = np.zeros(n, dtype=bool)
    taken[first] = True
    d2 = (s - s[first]) ** 2
    for _ in range(k - 1):
        d2[taken] = 0.0
        total = d2.sum()
        if total > 0 and np.isfinite(total):
            cumulative = np.cumsum(d2)
            nxt = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
            nxt = min(nxt, n - 1)
            while d2[nxt] == 0.0:
                nxt -= 1
        else:
            nxt = int(rng.choice(np.flatnonzero(~taken)))
        picked.append(nxt)
        taken[nxt] = True
        d2 = np.minimum(d2, (s - s[nxt]) ** 2)
    return np.asarray(picked, dtype=np.int64)


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_kmeans_pp_picks_are_exactly_those_of_the_loop_it_replaced() -> None:
    gen = np.random.default_rng(0)
    for trial in range(300):
        n = int(gen.integers(1, 40))
        s = gen.normal(size=n) * 3
        if trial % 5 == 0:
            s[: n // 2] = 1.0  # ties and zero distances
        if trial % 7 == 0:
            s[0] = np.nan
        if trial % 11 == 0:
            s[-1] = np.inf
        if trial % 13 == 0:
            s[-1] = -np.inf
        k = int(gen.integers(0, n + 1))
        got = kmeans_pp_1d(s, k, np.random.default_rng(trial))
        np.testing.assert_array_equal(got, _kmeans_pp_1d_before_d2_sample(s, k, np.random.default_rng(trial)))
        assert got.dtype == np.int64


class _SmoothedClassification(Classification):
    """Label-smoothed cross-entropy: a task whose loss is not the default one."""

    def output_losses(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(outputs, targets, reduction="none", label_smoothing=0.2)


def test_saal_scores_under_the_pools_task() -> None:
    assert SAAL.tasks == ("classification",) and SAALReference.tasks == ("classification",)
    task = _SmoothedClassification(10)
    g = torch.Generator().manual_seed(0)
    pool = Pool(ArrayDataset(torch.randn(40, 1, 8, 8, generator=g, dtype=torch.float64), np.arange(40) % 10), task=task)
    pool.label(np.arange(10), np.arange(10) % 10)
    model = _model().double()
    sel = SAAL(batch_size=16).select(model, pool, 3, 0)
    x = pool.dataset.inputs[sel.scored_indices[:5]]
    _, pert = naive_perturbed_losses(model, x, task=task)
    np.testing.assert_allclose(sel.scores[:5], pert.numpy(), rtol=1e-10)
    _, plain = naive_perturbed_losses(model, x)
    assert not np.allclose(sel.scores[:5], plain.numpy())


def test_saal_reference_runs_inside_an_active_learning_run(digits: DatasetBundle) -> None:
    config = RunConfig(
        dataset="digits", model="mlp", initial=10, query=5, rounds=2, subset=40, train=TrainConfig(epochs=2)
    )
    results = ActiveLearningRun(config, "saal-reference", seed=0, bundle=digits).run()
    assert [r.labelled for r in results] == [10, 15, 20]
    assert all(len(r.chosen) == 5 for r in results[:-1])
