"""VAAL: Variational Adversarial Active Learning (Sinha, Ebrahimi & Darrell, ICCV 2019).

A VAE learns a latent space of labelled and unlabelled inputs while a discriminator learns to
tell which latent codes come from the labelled set; the VAE is also trained to fool it. The
unlabelled items the discriminator is most sure are *unlabelled* are chosen. The task model is
not used at all; only inputs are read, a batch at a time.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from saal.core.model_state import model_device
from saal.core.scan import Batch, load_inputs, scan
from saal.core.seeding import derive_seed
from saal.errors import SaalError
from saal.pool import Pool
from saal.strategies.bald import forked_torch_rng
from saal.strategies.base import Selection, Strategy, top_k


def _downsampled_sizes(h: int, w: int, max_levels: int = 3, min_side: int = 4) -> list[tuple[int, int]]:
    """Spatial sizes after each stride-2 convolution (3x3, padding 1: ``ceil(s / 2)``), stopping
    at ``max_levels`` levels or when a side would go below ``min_side``."""
    sizes = [(h, w)]
    while len(sizes) <= max_levels and min(sizes[-1]) >= 2 * min_side:
        a, b = sizes[-1]
        sizes.append((math.ceil(a / 2), math.ceil(b / 2)))
    return sizes


class VAE(nn.Module):
    """A small VAE sized from the input shape.

    Images ``(C, H, W)``: stride-2 3x3 conv blocks (width, 2 width, 4 width channels, BatchNorm,
    ReLU; up to three, fewer for small images: 8x8 -> 4x4, 28 -> 14 -> 7, 32 -> 16 -> 8 -> 4),
    linear layers to the latent mean and log-variance, and a mirrored decoder that upsamples
    (nearest) to the exact sizes of the encoder, a conv block before each upsampling and a single
    3x3 conv to the image's channels at full resolution. Flat ``(D,)`` inputs: a two-layer MLP each way.
    """

    def __init__(self, input_shape: tuple[int, ...], latent_dim: int = 32, width: int = 32) -> None:
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.latent_dim = latent_dim
        if len(self.input_shape) == 3:
            c, h, w = self.input_shape
            self.sizes = _downsampled_sizes(h, w)
            chans = [c] + [width * 2**i for i in range(len(self.sizes) - 1)]
            enc: list[nn.Module] = []
            for i in range(1, len(self.sizes)):
                enc += [nn.Conv2d(chans[i - 1], chans[i], 3, stride=2, padding=1), nn.BatchNorm2d(chans[i]), nn.ReLU()]
            self.encoder = nn.Sequential(*enc, nn.Flatten())
            self.bottom = (chans[-1], *self.sizes[-1])
            flat = math.prod(self.bottom)
            self.ups = nn.ModuleList()
            for i in range(len(self.sizes) - 1, 1, -1):
                self.ups.append(
                    nn.Sequential(
                        nn.Conv2d(chans[i], chans[i - 1], 3, padding=1), nn.BatchNorm2d(chans[i - 1]), nn.ReLU()
                    )
                )
            # Straight to the image's channels at full resolution: a wide block there would cost most of the VAE.
            self.final: nn.Module = nn.Conv2d(chans[1] if len(chans) > 1 else c, c, 3, padding=1)
        elif len(self.input_shape) == 1:
            d = self.input_shape[0]
            self.encoder = nn.Sequential(nn.Linear(d, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())
            flat = 128
            self.decoder = nn.Sequential(nn.Linear(latent_dim, 128), nn.ReLU(), nn.Linear(128, 256), nn.ReLU())
            self.final = nn.Linear(256, d)
        else:
            raise SaalError(f"vaal works on images (C, H, W) or vectors (D,), got input shape {self.input_shape}")
        self.to_stats = nn.Linear(flat, 2 * latent_dim)
        self.from_latent = nn.Linear(latent_dim, flat) if len(self.input_shape) == 3 else None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the latent mean and log-variance of a batch."""
        mu, logvar = self.to_stats(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Return the reconstruction of latent codes ``z`` (same shape as the inputs)."""
        if self.from_latent is None:
            return self.final(self.decoder(z))
        y = self.from_latent(z).view(len(z), *self.bottom)
        for up, size in zip(self.ups, reversed(self.sizes[1:-1]), strict=True):
            y = F.interpolate(up(y), size=size, mode="nearest")  # conv at the lower resolution: 4x cheaper
        return self.final(F.interpolate(y, size=self.sizes[0], mode="nearest"))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(reconstruction, mu, logvar)``, sampling ``z = mu + sigma * eps`` (torch's generator)."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar


def vae_loss(x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-item negative ELBO, averaged over the batch: squared error summed over the input plus
    ``beta`` times the KL divergence to N(0, I) summed over the latent dimensions."""
    rec = (recon - x).pow(2).flatten(1).sum(1)
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
    return (rec + beta * kl).mean()


class Discriminator(nn.Module):
    """MLP on latent codes: ``latent -> 512 -> 512 -> 1`` logit of 'labelled' (as in VAAL)."""

    def __init__(self, latent_dim: int = 32, hidden: int = 512) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).squeeze(1)


class VAAL(Strategy):
    """VAAL (Sinha et al. 2019): adversarial VAE + discriminator, trained afresh at each selection.

    Every step draws a batch of labelled and a batch of unlabelled candidates (with the
    generator), takes ``vae_steps`` VAE updates (negative ELBO on both batches plus
    ``adversary_weight`` times the loss of making the discriminator call both 'labelled'; fresh
    batches per update) and one discriminator update (labelled -> 1, unlabelled -> 0), with Adam
    at ``lr`` as in the reference code. Then each candidate gets the discriminator's probability
    that its latent mean is labelled, and the ``k`` LOWEST are chosen. Everything is seeded by the
    generator. The VAE's reconstruction term is the per-item sum of squared errors (a proper
    Gaussian ELBO; the reference code averages it over pixels but sums the KL term).

    Scores: the predicted probability of 'labelled' (the smallest are chosen).

    Args:
        steps: training steps (each: ``vae_steps`` VAE updates, one discriminator update).
        vae_steps: VAE updates per step (the reference code: 2).
        train_batch: labelled and unlabelled items per training batch (each).
        latent_dim: size of the latent space (the paper: 32).
        beta: weight of the KL term (the paper: 1).
        adversary_weight: weight of the VAE's adversarial loss (the paper: 1).
        lr: Adam learning rate for both networks (the paper: 5e-4).
        width: channels of the VAE's first conv block (doubled per block).
        batch_size: pool items scored at once.
        subset: train on and score only a seeded random subset of the unlabelled pool.
    """

    name = "vaal"

    def __init__(
        self,
        *,
        steps: int = 300,
        vae_steps: int = 2,
        train_batch: int = 64,
        latent_dim: int = 32,
        beta: float = 1.0,
        adversary_weight: float = 1.0,
        lr: float = 5e-4,
        width: int = 32,
        batch_size: int = 256,
        subset: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, subset=subset)
        for key, value in (
            ("steps", steps),
            ("vae_steps", vae_steps),
            ("train_batch", train_batch),
            ("latent_dim", latent_dim),
            ("width", width),
        ):
            if value < 1:
                raise SaalError(f"vaal {key} must be at least 1, got {value}")
        if lr <= 0 or beta < 0 or adversary_weight < 0:
            raise SaalError(
                f"vaal needs lr > 0, beta >= 0 and adversary_weight >= 0; got {lr}, {beta}, {adversary_weight}"
            )
        self.steps, self.vae_steps, self.train_batch = int(steps), int(vae_steps), int(train_batch)
        self.latent_dim, self.width = int(latent_dim), int(width)
        self.beta, self.adversary_weight, self.lr = float(beta), float(adversary_weight), float(lr)
        self.last_losses: dict[str, list[float]] = {}

    def query(
        self, model: nn.Module, pool: Pool, candidates: np.ndarray, k: int, rng: np.random.Generator
    ) -> Selection:
        labelled = pool.labelled_indices()
        if len(labelled) == 0:
            raise SaalError("vaal needs at least one labelled item to tell labelled from unlabelled; label some first")
        device = model_device(model)
        input_shape = tuple(load_inputs(pool.dataset, candidates[:1], pool.task.collate).shape[1:])
        with forked_torch_rng(device, derive_seed(rng)):
            vae = VAE(input_shape, self.latent_dim, self.width).to(device)
            disc = Discriminator(self.latent_dim).to(device)
            self._train(vae, disc, pool, labelled, candidates, rng, device)
            scores = self._p_labelled(vae, disc, pool, candidates, device)
        return Selection(candidates[top_k(scores, k, ascending=True)], candidates, scores)

    def _batch(self, pool: Pool, indices: np.ndarray, rng: np.random.Generator, device: torch.device) -> torch.Tensor:
        idx = rng.choice(indices, size=self.train_batch, replace=len(indices) < self.train_batch)
        return load_inputs(pool.dataset, np.sort(idx), pool.task.collate).to(device)

    def _train(
        self,
        vae: VAE,
        disc: Discriminator,
        pool: Pool,
        labelled: np.ndarray,
        unlabelled: np.ndarray,
        rng: np.random.Generator,
        device: torch.device,
    ) -> None:
        opt_vae = torch.optim.Adam(vae.parameters(), lr=self.lr)
        opt_disc = torch.optim.Adam(disc.parameters(), lr=self.lr)
        vae.train()
        disc.train()
        history: dict[str, list[float]] = {"vae": [], "disc": []}
        for _ in range(self.steps):
            for _ in range(self.vae_steps):
                xl, xu = self._batch(pool, labelled, rng, device), self._batch(pool, unlabelled, rng, device)
                recon_l, mu_l, logvar_l = vae(xl)
                recon_u, mu_u, logvar_u = vae(xu)
                fool = disc(torch.cat([mu_l, mu_u]))
                loss = (
                    vae_loss(xl, recon_l, mu_l, logvar_l, self.beta)
                    + vae_loss(xu, recon_u, mu_u, logvar_u, self.beta)
                    + self.adversary_weight * F.binary_cross_entropy_with_logits(fool, torch.ones_like(fool)) * 2
                )
                opt_vae.zero_grad()
                loss.backward()
                opt_vae.step()
            history["vae"].append(float(loss.detach()))
            xl, xu = self._batch(pool, labelled, rng, device), self._batch(pool, unlabelled, rng, device)
            with torch.no_grad():
                mu_l, _ = vae.encode(xl)
                mu_u, _ = vae.encode(xu)
            logits = disc(torch.cat([mu_l, mu_u]))
            target = torch.cat([torch.ones(len(mu_l)), torch.zeros(len(mu_u))]).to(logits)
            # Mean over each half, summed: the reference code's bce(labelled) + bce(unlabelled).
            d_loss = F.binary_cross_entropy_with_logits(logits, target) * 2
            opt_disc.zero_grad()
            d_loss.backward()
            opt_disc.step()
            history["disc"].append(float(d_loss.detach()))
        self.last_losses = history

    def _p_labelled(
        self, vae: VAE, disc: Discriminator, pool: Pool, candidates: np.ndarray, device: torch.device
    ) -> np.ndarray:
        vae.eval()
        disc.eval()

        def batch_scores(batch: Batch) -> dict[str, torch.Tensor]:
            mu, _ = vae.encode(batch.inputs.to(device))
            return {"p": torch.sigmoid(disc(mu).double())}

        with torch.no_grad():
            out = scan(pool.dataset, candidates, batch_scores, batch_size=self.batch_size, collate=pool.task.collate)
        return out["p"].cpu().numpy()

    def __repr__(self) -> str:
        return (
            f"VAAL(steps={self.steps}, vae_steps={self.vae_steps}, train_batch={self.train_batch}, "
            f"latent_dim={self.latent_dim}, beta={self.beta}, adversary_weight={self.adversary_weight}, "
            f"lr={self.lr}, width={self.width}, batch_size={self.batch_size}, subset={self.subset})"
        )
