"""The contract every registered strategy keeps, and a short real run of each baseline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from saal.cli import main
from saal.data import DatasetBundle
from saal.errors import SaalError
from saal.models import build_model
from saal.pool import Pool, initial_indices
from saal.strategies import Strategy, build_strategy, strategies_for
from saal.training import TrainConfig, fit

# Cheaper settings where a strategy has an expensive default; the contract does not depend on them.
FAST = {"bald": "bald[samples=4]", "vaal": "vaal[steps=4,train_batch=16]"}
BASELINES = ["entropy", "least-confidence", "margin", "bald", "coreset", "badge", "ll4al", "vaal"]


def _strategy(name: str, **overrides: object) -> Strategy:
    return build_strategy(FAST.get(name, name), **overrides)


def _trained(name: str, model_name: str, digits: DatasetBundle, **overrides: object):
    """A strategy, a model trained for 2 epochs on 30 labels (with the strategy's hook) and the pool."""
    strategy = _strategy(name, **overrides)
    torch.manual_seed(0)
    model = build_model(model_name, digits.input_shape, digits.num_classes)
    pool = Pool(digits.train, digits.num_classes)
    start = initial_indices(digits.train_targets, 30, 0)
    pool.label(start, digits.train_targets[start])
    cfg = TrainConfig(epochs=2, batch_size=16)
    fit(model, digits.train, start, digits.train_targets[start], cfg, torch.Generator().manual_seed(0),
        hook=strategy.training_hook())  # fmt: skip
    return strategy, model, pool


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[bool]]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("name", strategies_for("classification"))
def test_strategy_contract(name: str, model_name: str, digits: DatasetBundle) -> None:
    strategy, model, pool = _trained(name, model_name, digits)
    # A mix of modes, so that "restored" cannot pass by accident.
    model.train()
    next(m for m in model.modules() if isinstance(m, nn.Linear)).eval()
    weights, modes = _snapshot(model)

    sel = strategy.select(model, pool, 7, np.random.default_rng(3))
    assert len(sel.indices) == 7 and len(np.unique(sel.indices)) == 7
    assert not pool.is_labelled(sel.indices).any()
    assert len(sel.scores) == len(sel.scored_indices)
    assert not pool.is_labelled(sel.scored_indices).any()
    assert np.isfinite(sel.scores).all()
    if len(sel.scored_indices):
        assert set(sel.indices) <= set(sel.scored_indices)

    again = strategy.select(model, pool, 7, np.random.default_rng(3))
    np.testing.assert_array_equal(again.indices, sel.indices)
    np.testing.assert_array_equal(again.scores, sel.scores)

    after_weights, after_modes = _snapshot(model)
    assert after_modes == modes
    assert all(torch.equal(weights[k], after_weights[k]) for k in weights)

    with pytest.raises(SaalError, match="larger than the unlabelled pool"):
        strategy.select(model, pool, pool.num_unlabelled + 1, 0)


@pytest.mark.parametrize("name", strategies_for("classification"))
def test_pool_subset_restricts_what_is_scored(name: str, digits: DatasetBundle) -> None:
    strategy, model, pool = _trained(name, "mlp", digits, subset=60)
    assert strategy.subset == 60
    sel = strategy.select(model, pool, 5, np.random.default_rng(11))
    subset = strategy.candidates(pool, 5, np.random.default_rng(11))  # the same draw
    assert len(subset) == 60 and not pool.is_labelled(subset).any()
    assert set(sel.indices) <= set(subset)
    if len(sel.scored_indices):
        np.testing.assert_array_equal(sel.scored_indices, subset)
    with pytest.raises(SaalError, match="pool subset"):
        strategy.select(model, pool, 61, 0)


@pytest.mark.parametrize("name", BASELINES)
def test_short_cli_run_on_digits(name: str, tmp_path) -> None:
    spec = {"vaal": "vaal[steps=10]", "bald": "bald[samples=5]"}.get(name, name)
    out = tmp_path / "out"
    argv = ["run", "--dataset", "digits", "--model", "cnn", "--strategies", spec, "--seeds", "1", "--initial", "20",
            "--query", "10", "--rounds", "1", "--epochs", "2", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["labelled"] for r in rows] == [20, 30]
    chosen = rows[0]["chosen"]
    assert len(chosen) == 10 and len(set(chosen)) == 10
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
