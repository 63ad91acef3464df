"""``auto``: cold-start selection until the labelled set supports a regime test, then the test decides; labelled
data only, deterministic, hysteresis, reasons, bad options."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from saal.data import DatasetBundle
from saal.data.base import ArrayDataset
from saal.errors import SaalError
from saal.models import build_model
from saal.pool import Pool, initial_indices
from saal.strategies import build_strategy, strategy_names
from saal.strategies.auto import Auto, RegimeTest
from saal.training import TrainConfig, fit

FAST = TrainConfig(epochs=5, batch_size=16)


def trained(digits: DatasetBundle, n: int, dataset: ArrayDataset | None = None) -> tuple[torch.nn.Module, Pool]:
    """A small MLP trained on ``n`` class-balanced labels (none for 0), and its pool over ``dataset``."""
    torch.manual_seed(0)
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    pool = Pool(dataset if dataset is not None else digits.train, digits.num_classes)
    if n:
        start = initial_indices(digits.train_targets, n, 0)
        pool.label(start, digits.train_targets[start])
        fit(model, digits.train, start, digits.train_targets[start], FAST, torch.Generator().manual_seed(0))
    return model, pool


def auto(spec: str = "auto[cold=random]") -> Auto:
    strategy = build_strategy(spec)
    assert isinstance(strategy, Auto) and strategy.cold_start
    strategy.use_training(FAST)
    return strategy


@pytest.mark.parametrize("n", [0, 10])
def test_below_min_test_the_cold_selector_chooses(digits: DatasetBundle, n: int) -> None:
    model, pool = trained(digits, n)
    sel = auto().select(model, pool, 7, np.random.default_rng(3))
    assert sel.reason == f"random: {n} labels < min_test 20"  # 2 per class by default
    # exactly the cold selector's choice with the same generator
    np.testing.assert_array_equal(sel.indices, build_strategy("random").select(model, pool, 7, 3).indices)
    assert auto("auto[cold=random,min_test=30]").select(model, pool, 7, 3).reason.endswith("< min_test 30")


def test_the_regime_test_is_deterministic_and_says_its_numbers(digits: DatasetBundle) -> None:
    model, pool = trained(digits, 30)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = auto().select(model, pool, 7, np.random.default_rng(5))
    b = auto().select(model, pool, 7, np.random.default_rng(5))
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.reason == b.reason
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # copies were trained
    pattern = (
        r"^(random: regime test \d\.\d\d vs \d\.\d\d \(margin\), margin ahead in [0-3] of 3 repeats at 30 labels; it "
        r"must win by more than 0\.02 and in most repeats|margin: regime test \d\.\d\d vs \d\.\d\d \(random\), "
        r"ahead in [23] of 3 repeats at 30 labels)$"
    )
    assert re.match(pattern, a.reason), a.reason


def test_the_regime_test_reads_the_pool_labels_only(digits: DatasetBundle) -> None:
    """Scrambling every dataset target (the test labels' stand-in) changes nothing: only given labels count."""
    model, pool = trained(digits, 30)
    scrambled = ArrayDataset(digits.train.inputs, np.random.default_rng(0).permutation(digits.train_targets))
    _, other = trained(digits, 30, scrambled)
    assert auto().regime_test(model, pool, 11) == auto().regime_test(model, other, 11)


def test_it_switches_when_warm_wins_by_the_margin_and_stays_switched(
    digits: DatasetBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, pool = trained(digits, 30)
    strategy = auto()

    def tested(cold: list[float], warm: list[float]) -> None:
        monkeypatch.setattr(strategy, "regime_test", lambda *args: RegimeTest(cold, warm))

    tested([0.5, 0.5, 0.5], [0.52, 0.52, 0.52])  # by 0.02: not more than the margin
    assert strategy.select(model, pool, 5, 0).reason == (
        "random: regime test 0.50 vs 0.52 (margin), margin ahead in 3 of 3 repeats at 30 labels; it must win by "
        "more than 0.02 and in most repeats"
    )
    tested([0.4, 0.4, 0.4], [0.3, 0.3, 0.9])  # a mean 0.1 higher, from one lucky repeat: no switch
    assert strategy.select(model, pool, 5, 0).reason.startswith(
        "random: regime test 0.40 vs 0.50 (margin), margin ahead in 1"
    )
    assert strategy.switched == ""
    tested([0.5, 0.6, 0.55], [0.6, 0.58, 0.65])
    sel = strategy.select(model, pool, 5, 0)
    assert sel.reason == "margin: regime test 0.61 vs 0.55 (random), ahead in 2 of 3 repeats at 30 labels"
    np.testing.assert_array_equal(sel.indices, build_strategy("margin").select(model, pool, 5, 0).indices)

    def never(*args: object) -> tuple[float, float]:
        raise AssertionError("the test ran again after the switch")

    monkeypatch.setattr(strategy, "regime_test", never)  # hysteresis: no test, warm stays
    assert strategy.select(model, pool, 5, 0).reason.startswith("margin: switched earlier (regime test 0.61")
    resumed = auto()  # the switch survives a checkpoint
    resumed.load_state_dict(strategy.state_dict())
    monkeypatch.setattr(resumed, "regime_test", never)
    assert resumed.select(model, pool, 5, 0).reason.startswith("margin: switched earlier")


def test_a_real_regime_test_can_switch(digits: DatasetBundle) -> None:
    """With a switch margin of 0 a real test on digits that margin wins switches (numbers from labelled data)."""
    model, pool = trained(digits, 30)
    strategy = auto("auto[cold=random,margin=0,repeats=2]")
    result = strategy.regime_test(model, pool, 1)
    assert len(result.cold) == len(result.warm) == 2 and all(0.0 <= a <= 1.0 for a in result.cold + result.warm)
    sel = strategy.select(model, pool, 5, np.random.default_rng(0))
    assert sel.reason.split(":")[0] in ("random", "margin")
    assert (strategy.switched != "") == sel.reason.startswith("margin:")


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("auto[cold=margin]", "cold: 'margin' cannot choose from zero labels"),
        ("auto[cold=oracle]", "cold: unknown strategy 'oracle'"),
        ("auto[cold=random,warm=oracle]", "warm: unknown strategy 'oracle'"),
        ("auto[cold=auto]", "cold: auto cannot hand its choice to auto"),
        ("auto[cold=random,warm=det-margin]", "does not work on classification"),
        ("auto[cold=random,min_test=2]", "min_test must be at least 4"),
        ("auto[cold=random,repeats=0]", "repeats must be a whole number in 1..50"),
        ("auto[cold=random,margin=1.5]", "margin must be a number in [0, 1)"),
        ("auto[cold=random,validation=0.9]", "validation must be a share in (0, 0.5]"),
        ("auto[colder=random]", "has no option 'colder'"),
    ],
)
def test_bad_options_are_one_line(spec: str, needle: str) -> None:
    with pytest.raises(SaalError) as info:
        build_strategy(spec)
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.skipif("typiclust" not in strategy_names(), reason="typiclust is not registered yet")
def test_the_default_cold_selector_is_typiclust(digits: DatasetBundle) -> None:
    model, pool = trained(digits, 0)
    strategy = build_strategy("auto")
    sel = strategy.select(model, pool, 10, np.random.default_rng(0))
    assert sel.reason == "typiclust: 0 labels < min_test 20"
    np.testing.assert_array_equal(sel.indices, build_strategy("typiclust").select(model, pool, 10, 0).indices)
