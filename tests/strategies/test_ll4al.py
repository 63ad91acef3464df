"""LL4AL: the paper's ranking loss, joint training through the hook, learning to rank, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from saal.data import DatasetBundle
from saal.errors import SaalError
from saal.experiment import ActiveLearningRun, RunConfig
from saal.models import build_model
from saal.pool import Pool
from saal.strategies import build_strategy
from saal.strategies.ll4al import LL4AL, LossPredictionModule, loss_prediction_loss
from saal.training import TrainConfig, fit


def paper_loss(pred: list[float], true: list[float], margin: float) -> float:
    """Yoo & Kweon's eq. (2) over the pairs (i, m-1-i) of the even-length prefix, sign(0) = -1."""
    m = len(pred) // 2 * 2
    terms = []
    for i in range(m // 2):
        j = m - 1 - i
        sign = 1.0 if true[i] - true[j] > 0 else -1.0
        terms.append(max(0.0, -sign * (pred[i] - pred[j]) + margin))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("n", [2, 5, 8])
def test_ranking_loss_is_the_papers_formula(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    pred = torch.randn(n, generator=g, dtype=torch.float64, requires_grad=True)
    true = torch.rand(n, generator=g, dtype=torch.float64)
    true[n // 2 * 2 - 1] = true[0]  # a tie in the first pair
    got = loss_prediction_loss(pred, true, margin=1.0)
    assert float(got.detach()) == pytest.approx(paper_loss(pred.tolist(), true.tolist(), 1.0), abs=1e-12)
    got.backward()
    if n % 2:
        assert pred.grad[n - 1] == 0, "an odd last item takes no part"


def test_ranking_loss_of_hand_made_values() -> None:
    pred = torch.tensor([2.0, 0.0, 0.5, 1.0, 7.0])  # the last (odd) item is dropped
    true = torch.tensor([3.0, 1.0, 1.0, 0.0, 9.0])
    # pairs (0, 3): l0 > l3, lhat0 - lhat3 = 1 -> max(0, -1 + 1) = 0
    #       (1, 2): tie -> sign -1, lhat1 - lhat2 = -0.5 -> max(0, -0.5 + 1) = 0.5
    assert float(loss_prediction_loss(pred, true, 1.0)) == pytest.approx(0.25)
    assert float(loss_prediction_loss(pred[:1], true[:1], 1.0)) == 0.0


def test_module_pools_feature_maps_of_any_shape() -> None:
    module = LossPredictionModule(3, hidden=16)
    feats = [torch.randn(4, 8, 5, 5), torch.randn(4, 6), torch.randn(4, 2, 7)]
    out = module(feats)
    assert out.shape == (4,) and module.materialised
    assert module.branches[0][0].weight.shape == (16, 8)


def _model(digits: DatasetBundle, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", digits.input_shape, 10)


def test_features_are_detached_after_the_detach_fraction(digits: DatasetBundle) -> None:
    model = _model(digits)
    strategy = LL4AL(detach_fraction=0.5)
    hook = strategy.training_hook()
    params = hook.start(model, epochs=4)
    assert len(params) == 2 * 2 + 2  # two lazy branch layers (weight, bias) and the output layer
    x, y = digits.train.inputs[:10], torch.as_tensor(digits.train_targets[:10])
    for epoch, model_gets_gradient in ((1, True), (2, False)):
        model.zero_grad()
        strategy.module.zero_grad()
        logits = model(x)
        extra = hook.loss(model, x, y, logits, F.cross_entropy(logits, y, reduction="none"), epoch)
        extra.backward()
        model_grad = sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None)
        module_grad = sum(float(p.grad.abs().sum()) for p in strategy.module.parameters())
        assert module_grad > 0
        assert (model_grad > 0) == model_gets_gradient
    hook.end(model)
    assert not model.body[2]._forward_hooks, "the feature hooks are removed after training"


def test_predicted_loss_ranking_improves_with_training(digits: DatasetBundle) -> None:
    model = _model(digits, seed=1)
    gen = torch.Generator().manual_seed(1)
    fit(model, digits.train, np.arange(100), digits.train_targets[:100], TrainConfig(epochs=10, batch_size=20), gen)
    strategy = build_strategy("ll4al[detach_fraction=0]")
    pool = Pool(digits.train, 10)
    held_out = np.arange(300, len(pool))
    x, y = digits.train.inputs[held_out], torch.as_tensor(digits.train_targets[held_out])

    def correlation() -> float:
        predicted = strategy.score(model, pool, held_out, np.random.default_rng(0))
        with torch.no_grad():
            true = F.cross_entropy(model.eval()(x), y, reduction="none").numpy()
        return float(spearmanr(predicted, true).statistic)

    idx = np.arange(300)
    # A vanishing learning rate only gives the module its shapes: the ranking of an untrained module.
    fit(model, digits.train, idx, digits.train_targets[idx], TrainConfig(epochs=1, lr=1e-9), gen,
        hook=strategy.training_hook())  # fmt: skip
    before = correlation()
    fit(model, digits.train, idx, digits.train_targets[idx], TrainConfig(epochs=10, batch_size=20), gen,
        hook=strategy.training_hook())  # fmt: skip
    after = correlation()
    assert after > 0.45 and after > before + 0.3, (before, after)


def test_state_dict_round_trip_gives_the_same_scores(digits: DatasetBundle) -> None:
    model = _model(digits)
    strategy = LL4AL()
    idx = np.arange(60)
    fit(model, digits.train, idx, digits.train_targets[idx], TrainConfig(epochs=2), torch.Generator(),
        hook=strategy.training_hook())  # fmt: skip
    pool = Pool(digits.train, 10)
    cand = np.arange(100, 400)
    state = strategy.state_dict()
    restored = LL4AL()
    restored.load_state_dict(state)
    np.testing.assert_array_equal(restored.score(model, pool, cand, None), strategy.score(model, pool, cand, None))
    restored.load_state_dict({})
    with pytest.raises(SaalError, match="untrained"):
        restored.select(model, pool, 3, 0)


def test_interrupted_run_resumes_exactly(digits: DatasetBundle, tmp_path) -> None:
    cfg = RunConfig(dataset="digits", model="mlp", initial=20, query=10, rounds=3, train=TrainConfig(epochs=3))
    whole = ActiveLearningRun(cfg, "ll4al", 0, tmp_path / "whole", bundle=digits).run()

    class Stop(Exception):
        pass

    def stop_after_first(result) -> None:
        if result.round == 1:
            raise Stop

    with pytest.raises(Stop):
        ActiveLearningRun(cfg, "ll4al", 0, tmp_path / "cut", bundle=digits).run(progress=stop_after_first)
    resumed = ActiveLearningRun(cfg, "ll4al", 0, tmp_path / "cut", bundle=digits)
    resumed._prepare_folder()
    assert len(resumed.results) == 2 and resumed.strategy.module is not None
    results = resumed.run()
    assert [r.chosen for r in results] == [r.chosen for r in whole]
    assert [r.accuracy for r in results] == [r.accuracy for r in whole]


def test_layers_option_and_its_errors(digits: DatasetBundle) -> None:
    model = _model(digits)
    strategy = build_strategy("ll4al[layers=body.0+body.3]")
    assert strategy.layers == ("body.0", "body.3")
    idx = np.arange(40)
    fit(model, digits.train, idx, digits.train_targets[idx], TrainConfig(epochs=1), torch.Generator(),
        hook=strategy.training_hook())  # fmt: skip
    pool = Pool(digits.train, 10)
    pool.label(idx, digits.train_targets[idx])
    assert len(strategy.select(model, pool, 4, 0).indices) == 4
    with pytest.raises(SaalError, match="no module 'nope'"):
        build_strategy("ll4al[layers=nope]").training_hook().start(model, 1)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(SaalError, match=r"layers=layer1\+layer2"):
        LL4AL().training_hook().start(plain, 1)
