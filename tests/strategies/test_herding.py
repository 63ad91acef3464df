"""MaxHerding, Uncertainty Herding and SAAL-herding: the greedy against plain loops, the sampled approximation, the
parameter rules (adaptive radius, temperature) and the strategies on a real tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from saal.data import DatasetBundle
from saal.errors import SaalError
from saal.models import build_model
from saal.pool import Pool, initial_indices
from saal.sharpness import pool_sharpness
from saal.strategies import build_strategy, strategy_class
from saal.strategies.embedding_input import l2_normalise
from saal.strategies.herding import (
    DEFAULT_BANDWIDTH,
    TEMPERATURES,
    MaxHerding,
    SAALHerding,
    UncertaintyHerding,
    adaptive_bandwidth,
    calibrated_temperature,
    expected_calibration_error,
    greedy_coverage,
    herding_select,
    kernel_matrix,
    margin_uncertainty,
    plan_samples,
    pool_logits,
    select_temperature,
)
from saal.training import TrainConfig, fit

# ------------------------------------------------------------------------------------------------ references


def ref_kernel(a: np.ndarray, b: np.ndarray, sigma: float) -> float:
    return math.exp(-float(((a - b) ** 2).sum()) / (2 * sigma**2))


def ref_coverage(points: np.ndarray, chosen: list[np.ndarray], sigma: float, u: np.ndarray) -> float:
    """C = mean_x u(x) max_{c in chosen} k(x, c), with plain loops."""
    total = 0.0
    for i, x in enumerate(points):
        best = 0.0
        for c in chosen:
            best = max(best, ref_kernel(x, c, sigma))
        total += u[i] * best
    return total / len(points)


def ref_greedy(
    points: np.ndarray, labelled: np.ndarray, k: int, sigma: float, u: np.ndarray | None = None
) -> tuple[list[int], list[float]]:
    """Greedy: each pick is the x maximising C(L + picks + {x}) (ties to the smaller position); returns the gains."""
    u = np.ones(len(points)) if u is None else u
    chosen = [row for row in labelled]
    picks: list[int] = []
    gains: list[float] = []
    for _ in range(k):
        before = ref_coverage(points, chosen, sigma, u)
        best, best_gain = -1, -math.inf
        for j in range(len(points)):
            if j in picks:
                continue
            gain = ref_coverage(points, [*chosen, points[j]], sigma, u) - before
            if gain > best_gain:
                best, best_gain = j, gain
        picks.append(best)
        gains.append(best_gain)
        chosen.append(points[best])
    return picks, gains


def _points(seed: int, n: int = 40, d: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, d)) * 2
    return centres[rng.integers(0, 4, n)] + rng.normal(size=(n, d)) * 0.6


# ------------------------------------------------------------------------------------------------ the math


def test_first_pick_in_one_dimension_is_the_densest_point() -> None:
    # By hand (sigma 1): 1.2 has the largest kernel density (1.0 and 1.4 at 0.2 on either side: 2.96 against
    # 2.90 for 1.0 or 1.4); then the two lone points, 7 first (nothing covers it: gain 1 - 5e-8) before -3
    # (covered 1.5e-4 by 1.2: gain 1 - 1.5e-4).
    points = np.array([[-3.0], [1.0], [1.2], [1.4], [7.0]])
    picks, _, scores = herding_select(points, None, 3, np.random.default_rng(0), bandwidth=1.0)
    assert picks.tolist() == [2, 4, 0]
    density = np.array([[ref_kernel(a, b, 1.0) for b in points] for a in points]).mean(0)
    assert int(np.argmax(density)) == 2 and scores[2] == pytest.approx(density[2], rel=1e-12)
    assert ref_greedy(points, points[:0], 3, 1.0)[0] == picks.tolist()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_exact_greedy_equals_plain_loops(seed: int) -> None:
    points = _points(seed)
    labelled = _points(seed + 100, n=3)
    sigma = [0.5, 1.0, 1.7, 3.0][seed]
    picks, scored, scores = herding_select(points, labelled, 6, np.random.default_rng(seed), bandwidth=sigma)
    ref_picks, ref_gains = ref_greedy(points, labelled, 6, sigma)
    assert picks.tolist() == ref_picks
    assert scored.tolist() == list(range(len(points)))
    np.testing.assert_allclose(scores[picks], ref_gains, rtol=1e-9, atol=1e-12)
    assert np.all(np.diff(scores[picks]) <= 1e-12)  # gains never rise (coverage is submodular)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_greedy_equals_plain_loops(seed: int) -> None:
    points = _points(seed, n=35)
    u = np.random.default_rng(seed + 7).uniform(0.0, 1.0, len(points))
    labelled = _points(seed + 50, n=2)
    picks, _, scores = herding_select(points, labelled, 5, np.random.default_rng(0), bandwidth=0.9, weights=u)
    ref_picks, ref_gains = ref_greedy(points, labelled, 5, 0.9, u)
    assert picks.tolist() == ref_picks
    np.testing.assert_allclose(scores[picks], ref_gains, rtol=1e-9, atol=1e-12)


def test_unpicked_scores_are_their_gains_after_all_picks() -> None:
    points = _points(5, n=25)
    picks, _, scores = herding_select(points, None, 3, np.random.default_rng(0), bandwidth=1.0)
    chosen = [points[p] for p in picks]
    ones = np.ones(len(points))
    after = ref_coverage(points, chosen, 1.0, ones)
    for j in [j for j in range(len(points)) if j not in picks][:5]:
        assert scores[j] == pytest.approx(ref_coverage(points, [*chosen, points[j]], 1.0, ones) - after, abs=1e-12)


def test_weights_concentrate_the_picks_where_the_uncertainty_is() -> None:
    # two equal clusters; all the uncertainty on the second: the first pick goes there.
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(0, 0.3, (20, 2)), rng.normal(5, 0.3, (20, 2))])
    u = np.r_[np.zeros(20), np.ones(20)]
    picks, _, _ = herding_select(points, None, 2, np.random.default_rng(0), bandwidth=1.0, weights=u)
    assert picks[0] >= 20
    plain, _, _ = herding_select(points, None, 2, np.random.default_rng(0), bandwidth=1.0)
    assert {int(plain[0]) < 20, int(plain[1]) < 20} == {True, False}  # unweighted: one pick per cluster


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_approximation_is_exact_when_the_samples_cover_everything(seed: int) -> None:
    points = torch.as_tensor(l2_normalise(_points(seed, n=300, d=8).astype(np.float32)))
    labelled = points[:0] if seed == 0 else torch.as_tensor(l2_normalise(_points(seed + 9, n=4, d=8)).astype("f4"))
    u = torch.rand(300, generator=torch.Generator().manual_seed(seed)) if seed == 2 else None
    exact = herding_select(points, labelled, 8, np.random.default_rng(seed), weights=u)
    approx = herding_select(
        points, labelled, 8, np.random.default_rng(seed), weights=u,
        exact_limit=0, candidate_sample=300, coverage_sample=10_000,
    )  # fmt: skip
    assert plan_samples(300, 8, np.random.default_rng(0), exact_limit=0, candidate_sample=300).exact
    assert exact[0].tolist() == approx[0].tolist()
    np.testing.assert_array_equal(exact[2], approx[2])


def test_sampled_approximation_picks_from_its_seeded_candidate_sample() -> None:
    points = torch.as_tensor(l2_normalise(_points(4, n=2000, d=8).astype(np.float32)))
    opts = {"exact_limit": 100, "candidate_sample": 150, "coverage_sample": 400}
    picks, scored, scores = herding_select(points, None, 10, np.random.default_rng(1), **opts)
    again = herding_select(points, None, 10, np.random.default_rng(1), **opts)
    assert picks.tolist() == again[0].tolist() and len(scored) == len(scores) == 150
    assert set(picks.tolist()) <= set(scored.tolist()) and np.all(np.diff(scored) > 0)
    other = herding_select(points, None, 10, np.random.default_rng(2), **opts)
    assert other[1].tolist() != scored.tolist()  # another seed, another sample
    with pytest.raises(SaalError, match="raise candidate_sample"):
        herding_select(points, None, 151, np.random.default_rng(1), **opts)


def test_sampled_coverage_is_close_to_the_exact_choice_on_clusters() -> None:
    points = torch.as_tensor(l2_normalise(_points(6, n=3000, d=16).astype(np.float32)))
    exact, _, _ = herding_select(points, None, 10, np.random.default_rng(0))
    approx, _, _ = herding_select(
        points, None, 10, np.random.default_rng(0), exact_limit=0, candidate_sample=1000, coverage_sample=1500
    )
    everything = torch.arange(3000)
    cover = [
        float(kernel_matrix(points, points[torch.as_tensor(p)], DEFAULT_BANDWIDTH).max(1).values.mean())
        for p in (exact, approx)
    ]
    assert len(everything) == 3000 and cover[1] >= 0.97 * cover[0]


def test_greedy_rejects_a_bad_query_size() -> None:
    kernel = torch.ones(3, 3)
    with pytest.raises(SaalError, match="cannot pick 4 of 3"):
        greedy_coverage(kernel, 4)
    with pytest.raises(SaalError, match="cannot pick 0 of 3"):
        greedy_coverage(kernel, 0)


def test_adaptive_bandwidth_is_the_smallest_labelled_distance_over_sqrt2() -> None:
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 4.0], [0.0, 2.5]])  # a duplicate pair is skipped
    assert adaptive_bandwidth(x) == pytest.approx(2.5 / math.sqrt(2))
    assert adaptive_bandwidth(x[:1]) is None and adaptive_bandwidth(x[1:3]) is None


def test_expected_calibration_error_and_the_temperature_rule() -> None:
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.95, 0.05]])
    labels = np.array([0, 1, 0, 0])
    # bins of width 1/15: 0.9 and 0.95 share bin 14 (acc 1, conf .925), 0.8 bin 12 (acc 0), 0.6 bin 9 (acc 1)
    by_hand = (2 * abs(1 - 0.925) + abs(0 - 0.8) + abs(1 - 0.6)) / 4
    assert expected_calibration_error(probs, labels) == pytest.approx(by_hand)
    # an over-confident model (right half the time at confidence ~1) is calibrated by a large temperature
    logits = np.array([[8.0, 0.0], [8.0, 0.0], [0.0, 8.0], [0.0, 8.0]])
    t = select_temperature(logits, np.array([0, 1, 0, 1]))
    assert t in TEMPERATURES and t >= 10
    assert select_temperature(np.array([[0.0, 0.5]]), np.array([1])) == 1.0  # ties: the first
    z = torch.tensor([[2.0, 1.0, 0.0]])
    p = torch.softmax(z.double() / 2, 1)[0]
    assert float(margin_uncertainty(z, 2.0)) == pytest.approx(1 - float(p[0] - p[1]))


# ------------------------------------------------------------------------------------------------ strategies


def _pool(digits: DatasetBundle, labelled: int) -> Pool:
    pool = Pool(digits.train, digits.num_classes)
    if labelled:
        start = initial_indices(digits.train_targets, labelled, 0)
        pool.label(start, digits.train_targets[start])
    return pool


def _trained_mlp(digits: DatasetBundle, pool: Pool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    idx = pool.labelled_indices()
    fit(model, digits.train, idx, pool.labels_of(idx), TrainConfig(epochs=3, batch_size=16), torch.Generator())
    return model


def _inputs(digits: DatasetBundle, indices: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(l2_normalise(digits.train.inputs[torch.as_tensor(indices)].reshape(len(indices), -1)))


def test_registry_options_and_bad_values() -> None:
    s = build_strategy("herding[bandwidth=0.5]")
    assert isinstance(s, MaxHerding) and s.bandwidth == 0.5 and s.cold_start
    assert strategy_class("uherding") is UncertaintyHerding and strategy_class("saal-herding") is SAALHerding
    assert build_strategy("saal-herding").uncertainty == "saal" and build_strategy("uherding").uncertainty == "margin"
    assert UncertaintyHerding.cold_start and SAALHerding.cold_start
    for spec in ["herding[bandwidth=0]", "herding[bandwidth=-1]", "herding[bandwidth=auto]", "uherding[bandwidth=0]"]:
        with pytest.raises(SaalError, match="bandwidth must be a positive number") as err:
            build_strategy(spec)
        assert "\n" not in str(err.value)
    for spec, what in [
        ("uherding[temperature=0]", "temperature"),
        ("uherding[uncertainty=entropy]", "uncertainty"),
        ("herding[candidate_sample=0]", "candidate_sample"),
        ("herding[exact_limit=-1]", "exact_limit"),
        ("uherding[calibration_epochs=0]", "calibration_epochs"),
        ("herding[embedding=pixels]", "embedding"),
    ]:
        with pytest.raises(SaalError, match=what):
            build_strategy(spec)
    assert build_strategy("uherding[bandwidth=0.3,temperature=2]").temperature == 2.0


def test_maxherding_strategy_zero_labels_matches_the_array_function(digits: DatasetBundle) -> None:
    pool = _pool(digits, 0)
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    sel = build_strategy("herding[embedding=input]").select(model, pool, 6, 0)
    ref, _, scores = herding_select(_inputs(digits, np.arange(len(digits.train))), None, 6, np.random.default_rng(0))
    assert sel.indices.tolist() == ref.tolist()
    np.testing.assert_allclose(sel.scores, scores, rtol=1e-4, atol=1e-7)  # float32 rounding of the normalisation
    again = build_strategy("herding[embedding=input]").select(model, pool, 6, 0)
    assert again.indices.tolist() == sel.indices.tolist()
    # the same choice through the sampled path when the samples hold every candidate
    big = build_strategy("herding[embedding=input,exact_limit=0,candidate_sample=99999,coverage_sample=99999]")
    assert big.select(model, pool, 6, 0).indices.tolist() == sel.indices.tolist()
    # the sampled path draws the same samples as the array function with the same seed
    small = "herding[embedding=input,exact_limit=100,candidate_sample=200,coverage_sample=300]"
    sampled = build_strategy(small).select(model, pool, 6, 5)
    x = _inputs(digits, np.arange(len(digits.train)))
    ref_s, scored, _ = herding_select(
        x, None, 6, np.random.default_rng(5), exact_limit=100, candidate_sample=200, coverage_sample=300
    )
    assert sampled.indices.tolist() == ref_s.tolist() and sampled.scored_indices.tolist() == scored.tolist()
    # uherding with nothing labelled is MaxHerding
    u = build_strategy("uherding[embedding=input]").select(model, pool, 6, 0)
    assert u.indices.tolist() == sel.indices.tolist() and "nothing labelled" in u.reason


def test_uherding_margin_weights_on_a_trained_mlp(digits: DatasetBundle) -> None:
    pool = _pool(digits, 30)
    model = _trained_mlp(digits, pool)
    s = UncertaintyHerding(embedding="input", temperature=1.5)
    sel = s.select(model, pool, 5, np.random.default_rng(0))
    cands, lab = pool.unlabelled_indices(), pool.labelled_indices()
    u = margin_uncertainty(pool_logits(model, pool, cands, 256), 1.5)
    bw = adaptive_bandwidth(_inputs(digits, lab))
    assert bw is not None and s.last_bandwidth == pytest.approx(bw) and s.last_temperature == 1.5
    ref, _, scores = herding_select(
        _inputs(digits, cands), _inputs(digits, lab), 5, np.random.default_rng(0), bandwidth=bw, weights=u.float()
    )
    assert sel.indices.tolist() == cands[ref].tolist()
    np.testing.assert_allclose(sel.scores, scores, rtol=1e-4, atol=1e-7)
    assert not pool.is_labelled(sel.scored_indices).any()


def test_saal_herding_weights_are_saals_perturbed_losses(digits: DatasetBundle) -> None:
    pool = _pool(digits, 30)
    model = _trained_mlp(digits, pool)
    sel = build_strategy("saal-herding[embedding=input,bandwidth=0.4]").select(model, pool, 5, 0)
    cands, lab = pool.unlabelled_indices(), pool.labelled_indices()
    model.eval()
    u = pool_sharpness(model, digits.train, cands, rho=0.05).perturbed_loss
    ref, _, _ = herding_select(
        _inputs(digits, cands), _inputs(digits, lab), 5, np.random.default_rng(0), bandwidth=0.4, weights=u
    )
    assert sel.indices.tolist() == cands[ref].tolist() and "SAAL" in sel.reason


def test_calibrated_temperature_trains_a_copy_and_leaves_the_model(digits: DatasetBundle) -> None:
    pool = _pool(digits, 40)
    model = _trained_mlp(digits, pool)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = calibrated_temperature(model, pool, TrainConfig(epochs=2, batch_size=16), np.random.default_rng(0))
    assert t in TEMPERATURES
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    three = Pool(digits.train, digits.num_classes)
    three.label([0, 1, 2], digits.train_targets[:3])  # 30 % of 3 items is no item: nothing to calibrate on
    assert calibrated_temperature(model, three, TrainConfig(epochs=1), np.random.default_rng(0)) == 1.0
    s = UncertaintyHerding(embedding="input", calibration_epochs=2)
    first = s.select(model, pool, 4, 0)
    assert s.last_temperature in TEMPERATURES and f"temperature {s.last_temperature:g}" in first.reason
    again = UncertaintyHerding(embedding="input", calibration_epochs=2).select(model, pool, 4, 0)
    assert again.indices.tolist() == first.indices.tolist()
