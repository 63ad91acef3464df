import numpy as np

from saal.core.selection import d2_sample, top_k


def test_top_k_best_first_ties_by_position_nan_last() -> None:
    s = np.array([0.5, np.nan, 2.0, 0.5, 2.0])
    assert top_k(s, 3).tolist() == [2, 4, 0]
    assert top_k(s, 2, ascending=True).tolist() == [0, 3]
    assert top_k(s, 5)[-1] == 1


def test_d2_sampling_is_seeded_distinct_and_follows_the_distances() -> None:
    points = np.array([0.0, 0.1, 10.0, 10.1, 20.0])

    def dist(j: int) -> np.ndarray:
        return (points - points[j]) ** 2

    picks, d2 = d2_sample(len(points), 3, 0, dist, np.random.default_rng(0))
    again, _ = d2_sample(len(points), 3, 0, dist, np.random.default_rng(0))
    assert picks.tolist() == again.tolist() and picks[0] == 0 and len(set(picks.tolist())) == 3
    counts = np.zeros(len(points))
    for seed in range(300):
        p, _ = d2_sample(len(points), 2, 0, dist, np.random.default_rng(seed))
        counts[p[1]] += 1
    # the second pick is drawn in proportion to the squared distance to point 0: 0.01 : 100 : 102 : 400
    assert counts[1] < 3 and 160 < counts[4] < 240 and 60 < counts[2] + counts[3] < 140
    assert d2[picks[1]] > 0 and np.all(d2[np.setdiff1d(np.arange(5), picks)] >= 0)


def test_d2_sampling_with_duplicates_falls_back_to_uniform() -> None:
    picks, _ = d2_sample(4, 4, 2, lambda j: np.zeros(4), np.random.default_rng(1))
    assert sorted(picks.tolist()) == [0, 1, 2, 3] and picks[0] == 2
