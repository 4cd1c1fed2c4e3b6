"""The ELBO, computed in fp32 whatever the autocast dtype.

    loss = recon + kl_weight(step) * KL

KL is the closed form for a diagonal Gaussian against N(0, I), summed over the latent and averaged
over the batch: 0.5 * sum(mean^2 + exp(logvar) - 1 - logvar). logvar is clamped to [-30, 20] before
exp() so a wild encoder output cannot overflow.

How kl_weight relates across reductions and resolutions
--------------------------------------------------------
`loss.reduction=sum` sums the reconstruction error over the C*H*W elements of each image and averages
over the batch; `mean` averages over every element. The KL term is the same in both. So the two
settings describe the same objective when

    kl_weight_mean = kl_weight_sum / (C * H * W)

The reference model (64 px RGB, mean, kl_weight 0.00025) is sum-reduction kl_weight 0.00025 * 12288
= 3.07. With `sum`, a Gaussian decoder of variance sigma^2 corresponds to kl_weight = 2 * sigma^2
(kl_weight 1 is sigma^2 = 0.5, the textbook ELBO up to a constant), and the same kl_weight keeps the
same per-pixel noise model at every resolution: keep it when moving from 64 to 128 to 256 px. With
`mean`, the reconstruction term is divided by the pixel count, so kl_weight must shrink 4x for every
doubling of resolution to keep the balance; a `mean` loss with kl_weight 1 lets the KL term win and
the decoder produces noise (or the dataset mean). For `bce` the same rules hold, with BCE summed or
averaged in place of the squared error.

The training objective is the ELBO only up to a scale and a constant. `negative_elbo` is the real
thing, in nats per image, with kl weight 1: for `bce` the Bernoulli decoder's summed cross-entropy
plus KL; for `mse` the Gaussian decoder whose variance the objective implies, sigma^2 = w / 2 with
w = loss.kl_weight (sum) or loss.kl_weight * C*H*W (mean), that is SSE / (2 sigma^2) +
(C*H*W / 2) * log(2 pi sigma^2) + KL. (With 8-bit images on [0, 1] this is a density, not a
probability: compare it between models at the same resolution, not with discrete likelihoods.)

Free bits
---------
`loss.free_bits=LAMBDA` (nats, off at 0) floors the KL of each latent dimension in the objective:

    loss = recon + kl_weight(step) * sum_j max(LAMBDA, mean over the micro-batch of KL_j)

A dimension whose KL is under the floor gets no KL gradient, so the encoder is free to put up to
LAMBDA nats into it without paying for them (Kingma et al. 2016, "free bits"): the usual remedy for
posterior collapse. The floor is taken over each rank's micro-batch, so it depends on the batch split
as BatchNorm does. Only the objective changes: `train/kl`, `val/kl` and `val/neg_elbo` report the true
KL and the true ELBO, and `train/loss`/`val/loss` are at least kl_weight * D * LAMBDA for a latent of D
dimensions. (The floored objective is not a bound on the likelihood.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distvae.config import LossConfig
from distvae.model import LOGVAR_MAX, LOGVAR_MIN


@dataclass
class LossTerms:
    total: torch.Tensor  # the value to minimise (fp32 scalar)
    recon: torch.Tensor  # reconstruction term, as reduced by loss.reduction
    kl: torch.Tensor  # KL per image, averaged over the batch (unweighted, never floored by free_bits)
    kl_weight: float  # the weight applied to kl at this step


def kl_per_dimension(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) of each image and latent dimension, (N, D) in fp32."""
    mean = mean.float()
    logvar = logvar.float().clamp(LOGVAR_MIN, LOGVAR_MAX)
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per image, in fp32."""
    return kl_per_dimension(mean, logvar).sum(dim=1)


def reconstruction(recon: torch.Tensor, target: torch.Tensor, kind: str, reduction: str) -> torch.Tensor:
    recon, target = recon.float(), target.float()
    if kind == "mse":
        per_element = (recon - target).square()
    else:  # binary_cross_entropy clamps its log at -100, so outputs of exactly 0 or 1 stay finite
        per_element = F.binary_cross_entropy(recon, target, reduction="none")
    if reduction == "sum":
        return per_element.flatten(1).sum(dim=1).mean()
    return per_element.mean()


def kl_weight_at(cfg: LossConfig, step: int) -> float:
    if cfg.kl_warmup_steps == 0:
        return cfg.kl_weight
    return cfg.kl_weight * min(1.0, step / cfg.kl_warmup_steps)


def elbo(
    recon: torch.Tensor,
    target: torch.Tensor,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    cfg: LossConfig,
    step: int = 0,
) -> LossTerms:
    # Autocast would run BCE and exp() in low precision (and refuses BCE outright on CUDA).
    with torch.autocast(device_type=recon.device.type, enabled=False):
        recon_term = reconstruction(recon, target, cfg.recon, cfg.reduction)
        kl_dims = kl_per_dimension(mean, logvar).mean(dim=0)
        kl = kl_dims.sum()
        objective_kl = kl_dims.clamp_min(cfg.free_bits).sum() if cfg.free_bits > 0 else kl
        weight = kl_weight_at(cfg, step)
        return LossTerms(total=recon_term + weight * objective_kl, recon=recon_term, kl=kl, kl_weight=weight)


def negative_elbo(recon: torch.Tensor, target: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
                  cfg: LossConfig) -> torch.Tensor | None:
    """-ELBO per image in nats (fp32, one value per image); None for mse with kl_weight 0 (no variance implied)."""
    with torch.autocast(device_type=recon.device.type, enabled=False):
        recon, target = recon.float(), target.float()
        values = target[0].numel()
        kl = kl_divergence(mean, logvar)
        if cfg.recon == "bce":
            return F.binary_cross_entropy(recon, target, reduction="none").flatten(1).sum(dim=1) + kl
        weight = cfg.kl_weight * (values if cfg.reduction == "mean" else 1)
        if weight <= 0:
            return None
        variance = weight / 2.0
        squared_error = (recon - target).square().flatten(1).sum(dim=1)
        return squared_error / (2.0 * variance) + 0.5 * values * math.log(2.0 * math.pi * variance) + kl
