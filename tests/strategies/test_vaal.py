"""VAAL: VAE shapes for the supported inputs, stable training, and a preference for the unfamiliar."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from saal.data import ArrayDataset
from saal.errors import SaalError
from saal.pool import Pool
from saal.strategies import build_strategy
from saal.strategies.vaal import VAAL, VAE, Discriminator, vae_loss


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (64,)])
def test_vae_reconstructs_inputs_of_each_supported_shape(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    vae = VAE(shape, latent_dim=32, width=8)
    x = torch.randn(3, *shape)
    recon, mu, logvar = vae(x)
    assert recon.shape == x.shape and mu.shape == (3, 32) and logvar.shape == (3, 32)
    assert Discriminator(32)(mu).shape == (3,)
    assert torch.isfinite(vae_loss(x, recon, mu, logvar, 1.0))


def test_vae_loss_is_the_negative_elbo() -> None:
    x = torch.zeros(2, 4)
    recon = torch.ones(2, 4)
    mu, logvar = torch.zeros(2, 3), torch.zeros(2, 3)
    assert float(vae_loss(x, recon, mu, logvar, 1.0)) == pytest.approx(4.0)  # KL(N(0,1) || N(0,1)) = 0
    mu = torch.ones(2, 3)
    assert float(vae_loss(x, recon, mu, logvar, 2.0)) == pytest.approx(4.0 + 2.0 * 0.5 * 3)


def _two_clusters(n: int = 120) -> tuple[Pool, int]:
    """Cluster A: bright top half; cluster B: bright bottom half. The labelled items are all from A."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, 1, 8, 8, generator=g) * 0.3
    a[:, :, :4] += 1.0
    b = torch.randn(n, 1, 8, 8, generator=g) * 0.3
    b[:, :, 4:] += 1.0
    pool = Pool(ArrayDataset(torch.cat([a, b]), np.r_[np.zeros(n), np.ones(n)].astype(np.int64)), 2)
    pool.label(np.arange(20), np.zeros(20, dtype=np.int64))
    return pool, n


def test_vaal_prefers_items_unlike_the_labelled_ones() -> None:
    pool, n = _two_clusters()
    strategy = VAAL(steps=20, train_batch=32)
    sel = strategy.select(nn.Linear(1, 1), pool, 20, 0)  # the task model is not used
    assert (sel.indices >= n).mean() >= 0.9
    p_labelled_a = sel.scores[sel.scored_indices < n].mean()
    p_labelled_b = sel.scores[sel.scored_indices >= n].mean()
    assert p_labelled_b < p_labelled_a
    losses = strategy.last_losses
    assert len(losses["vae"]) == len(losses["disc"]) == 20
    assert np.isfinite(losses["vae"]).all() and np.isfinite(losses["disc"]).all()


def test_vaal_is_seeded_and_leaves_torch_randomness_alone() -> None:
    pool, _ = _two_clusters(40)
    strategy = build_strategy("vaal[steps=3,train_batch=8]")
    model = nn.Linear(1, 1)
    state = torch.random.get_rng_state()
    a = strategy.select(model, pool, 5, 4)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = strategy.select(model, pool, 5, 4)
    c = strategy.select(model, pool, 5, 5)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert not np.array_equal(a.scores, c.scores)


def test_vaal_errors() -> None:
    pool = Pool(ArrayDataset(torch.randn(10, 4), np.zeros(10, dtype=np.int64)), 2)
    with pytest.raises(SaalError, match="at least one labelled"):
        VAAL(steps=1).select(nn.Linear(4, 2), pool, 2, 0)
    with pytest.raises(SaalError, match="steps must be at least 1"):
        build_strategy("vaal[steps=0]")
