"""`distvae evaluate`: how good a checkpoint is, in numbers, over a split (one process, CPU or GPU).

    distvae evaluate --ckpt runs/tiny --shards shards/synth/manifest.json [--iw 64] [--json scores.json]

Per image, averaged over the split (every sample once, in order; noise from --seed):
    neg_elbo_nats   -ELBO with the analytic KL, kl weight 1 (loss.negative_elbo says which decoder)
    mc_elbo_nats    -ELBO from one sample z ~ q(z|x): -(log p(x|z) + log p(z) - log q(z|x))
    iw_nats         with --iw K: -log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x); K = 1 is mc_elbo_nats exactly
    bits_per_dim    (neg_elbo_nats + D log 256) / (D log 2), D = C*H*W: the Gaussian decoder's density
                    times the 1/256 width of an 8-bit bin. Only the mse decoder with kl_weight > 0 defines
                    this likelihood (sigma printed); bce and kl_weight 0 give none, and it is left out.
    recon_mse, psnr the posterior mean decoded, against the input
    kl_per_dim      KL of each latent dimension; active_units: dimensions whose posterior mean varies over
                    the data by more than 0.01 (variance), the usual definition
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from distvae.config import Config
from distvae.errors import UserError
from distvae.loss import LOGVAR_MAX, LOGVAR_MIN, negative_elbo
from distvae.model import ConvVAE

ACTIVE_VARIANCE = 0.01
_LOG_2PI = math.log(2 * math.pi)


def decoder_sigma(cfg: Config, values: int) -> float | None:
    """The Gaussian decoder's std the mse objective implies (see loss.py); None when there is none."""
    if cfg.loss.recon != "mse":
        return None
    weight = cfg.loss.kl_weight * (values if cfg.loss.reduction == "mean" else 1)
    return math.sqrt(weight / 2.0) if weight > 0 else None


def log_likelihood(recon: torch.Tensor, images: torch.Tensor, cfg: Config, sigma: float | None) -> torch.Tensor:
    """log p(x|z) per image: the Gaussian density of the mse decoder, or Bernoulli's for bce."""
    recon, images = recon.float().flatten(1), images.float().flatten(1)
    if cfg.loss.recon == "bce":
        return -torch.nn.functional.binary_cross_entropy(recon, images, reduction="none").sum(dim=1)
    if sigma is None:
        raise UserError("loss.recon=mse with loss.kl_weight=0 implies no decoder variance: no likelihood to bound")
    squared = (recon - images).square().sum(dim=1)
    return -(squared / (2 * sigma**2) + recon.shape[1] * (math.log(sigma) + 0.5 * _LOG_2PI))


def _log_normal(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * (((z - mean).square() / logvar.exp()) + logvar + _LOG_2PI).sum(dim=-1)


@torch.no_grad()
def score_batch(model: ConvVAE, images: torch.Tensor, cfg: Config, generator: torch.Generator, iw: int) -> dict:
    """Sums over this batch of every figure, and the posterior means (for active units)."""
    mean, logvar = model.encode(images)
    logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
    values = images[0].numel()
    sigma = decoder_sigma(cfg, values)
    eps = torch.randn(iw, *mean.shape, generator=generator, device=mean.device)
    z = mean + torch.exp(0.5 * logvar) * eps  # (K, B, L); z[0] is the one-sample ELBO's draw
    recon_z = model.decode(z.flatten(0, 1)).float().view(iw, *images.shape)
    if sigma is None and cfg.loss.recon != "bce":  # no likelihood: no Monte Carlo or IW bound either
        log_weights = torch.full((iw, len(images)), float("nan"))
    else:
        prior = torch.zeros_like(mean)
        log_weights = torch.stack([log_likelihood(recon_z[k], images, cfg, sigma) for k in range(iw)]) \
            + _log_normal(z, prior, prior) - _log_normal(z, mean, logvar)
    recon_mean = model.decode(mean).float()
    mse = (recon_mean - images).square().flatten(1).mean(dim=1)
    neg = negative_elbo(recon_z[0], images, mean, logvar, cfg.loss)
    kl_dims = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)
    return {
        "neg_elbo": neg.sum().item() if neg is not None else float("nan"),
        "mc_elbo": -log_weights[0].sum().item(),
        "iw": -(torch.logsumexp(log_weights, dim=0) - math.log(iw)).sum().item(),
        "iw_squares": ((torch.logsumexp(log_weights, dim=0) - math.log(iw)) ** 2).sum().item(),
        "mse": mse.sum().item(),
        "psnr": (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).sum().item(),
        "kl_dims": kl_dims.sum(dim=0),
        "means": mean,
        "images": len(images),
        "sigma": sigma,
    }


def evaluate(model: ConvVAE, cfg: Config, batches, iw: int = 1, seed: int = 0) -> dict:
    """Figures over the images `batches` yields (float (B, C, H, W) in [0, 1])."""
    if iw < 1:
        raise UserError("--iw must be at least 1")
    generator = torch.Generator().manual_seed(seed)
    totals, kl_dims, means, images, sigma, values = {}, None, [], 0, None, 0
    for batch in batches:
        part = score_batch(model, batch, cfg, generator, iw)
        for key in ("neg_elbo", "mc_elbo", "iw", "iw_squares", "mse", "psnr"):
            totals[key] = totals.get(key, 0.0) + part[key]
        kl_dims = part["kl_dims"] if kl_dims is None else kl_dims + part["kl_dims"]
        means.append(part["means"])
        images, sigma, values = images + part["images"], part["sigma"], batch[0].numel()
    if images == 0:
        raise UserError("the shards hold no images to evaluate")
    mean_of = {key: value / images for key, value in totals.items()}
    variance = torch.cat(means).var(dim=0, unbiased=False) if images > 1 else torch.zeros_like(kl_dims)
    iw_std = math.sqrt(max(mean_of["iw_squares"] - mean_of["iw"] ** 2, 0.0))
    result = {
        "images": images, "iw_samples": iw, "neg_elbo_nats": mean_of["neg_elbo"], "mc_elbo_nats": mean_of["mc_elbo"],
        "iw_nats": mean_of["iw"], "iw_standard_error": iw_std / math.sqrt(images),
        "recon_mse": mean_of["mse"], "psnr": mean_of["psnr"],
        "kl_per_dim": (kl_dims / images).tolist(), "active_units": int((variance > ACTIVE_VARIANCE).sum()),
        "latent_dim": int(kl_dims.numel()), "decoder_sigma": sigma,
    }
    if sigma is not None:
        result["bits_per_dim"] = (result["neg_elbo_nats"] + values * math.log(256)) / (values * math.log(2))
        result["likelihood"] = (f"Gaussian decoder, sigma {sigma:.4g} (from loss.kl_weight), density x 1/256 per "
                                f"8-bit value")
    else:
        result["likelihood"] = ("none: bits per dimension need a normalised decoder likelihood; "
                                + ("bce on 8-bit images is not one" if cfg.loss.recon == "bce"
                                   else "mse with loss.kl_weight=0 implies no variance"))
    return result


def evaluate_checkpoint(ckpt: str, shards: str, json_path: str | None = None, batch_size: int = 64, iw: int = 1,
                        seed: int = 0, raw: bool = False) -> str:
    from distvae.tools import check_unconditional, image_batches, load_checkpoint

    model, cfg, which = load_checkpoint(ckpt, raw)
    check_unconditional(model, "evaluation")
    result = evaluate(model, cfg, image_batches(cfg, shards, batch_size), iw, seed)
    result["checkpoint"] = which
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    bpd = f"{result['bits_per_dim']:.4f} bits/dim ({result['likelihood']})" if "bits_per_dim" in result else \
        f"no bits/dim ({result['likelihood']})"
    iw_line = f", IW bound (K={iw}) {result['iw_nats']:.2f} +- {result['iw_standard_error']:.2f}" if iw > 1 else ""
    return (f"{result['images']} images, {which}: -ELBO {result['neg_elbo_nats']:.2f} nats/image{iw_line}; {bpd}; "
            f"recon mse {result['recon_mse']:.5f}, psnr {result['psnr']:.2f} dB; active units "
            f"{result['active_units']}/{result['latent_dim']}")
