"""`distvae evaluate`: how good a checkpoint is, in numbers, over a split.

    distvae evaluate --ckpt runs/tiny --shards shards/synth/manifest.json [--iw 64] [--json scores.json]
    accelerate launch -m distvae evaluate --ckpt ... --shards ...     # several processes, the same figures

Per image, averaged over the split (every sample once, in order):
    neg_elbo_nats   -ELBO with the analytic KL, kl weight 1 (loss.negative_elbo says which decoder)
    mc_elbo_nats    -ELBO from one sample z ~ q(z|x): -(log p(x|z) + log p(z) - log q(z|x))
    iw_nats         with --iw K: -log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x); K = 1 is mc_elbo_nats exactly
    bits_per_dim    (neg_elbo_nats + D log 256) / (D log 2), D = C*H*W: the Gaussian decoder's density
                    times the 1/256 width of an 8-bit bin. Only the mse decoder with kl_weight > 0 defines
                    this likelihood (sigma printed); bce and kl_weight 0 give none, and it is left out.
    recon_mse, psnr, ssim   the posterior mean decoded, against the input
    kl_per_dim      KL of each latent dimension; active_units: dimensions whose posterior mean varies over
                    the data by more than 0.01 (variance), the usual definition
    fid_recon, fid_samples  FID of the inputs against their reconstructions and against decoder samples
                    (z ~ N(0, I); a conditional model takes each input's attributes), over the first
                    --fid-images inputs, with Inception weights found on this machine (quality.py)

The noise of image i is a function of (--seed, i) alone (noise.py), and every sum is taken in float64
and reduced over processes, so 1 and N processes give the same figures up to float rounding.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from distvae.config import Config
from distvae.errors import UserError
from distvae.evaluate import active_units
from distvae.loss import LOGVAR_MAX, LOGVAR_MIN, kl_per_dimension, negative_elbo
from distvae.model import ConvVAE
from distvae.noise import sample_noise
from distvae.quality import FID, fid_note, inception_weights, missing_weights_message, ssim_per_image

FID_IMAGES = 10_000
_LOG_2PI = math.log(2 * math.pi)
_PRIOR_STREAM = 1 << 20  # the noise "epoch" of the prior samples for FID; 0..K-1 are the posterior draws
_SCALARS = ("neg_elbo", "mc_elbo", "iw", "iw_squares", "mse", "psnr", "ssim", "images")


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


def posterior_noise(seed: int, positions: torch.Tensor, iw: int, dim: int, device) -> torch.Tensor:
    """(K, B, L) standard normals: draw k of image i depends on (seed, k, i) only."""
    return torch.stack([sample_noise(seed, k, positions, dim, device) for k in range(iw)])


@torch.no_grad()
def score_batch(model: ConvVAE, images: torch.Tensor, cond: torch.Tensor | None, positions: torch.Tensor,
                cfg: Config, seed: int, iw: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(float64 sums over this batch of every figure, the decoded posterior means)."""
    mean, logvar = model.encode(images, cond)
    mean, logvar = mean.float(), logvar.float().clamp(LOGVAR_MIN, LOGVAR_MAX)
    sigma = decoder_sigma(cfg, images[0].numel())
    z = mean + torch.exp(0.5 * logvar) * posterior_noise(seed, positions, iw, model.latent_dim, mean.device)
    repeat = None if cond is None else cond.repeat(iw, 1)
    recon_z = model.decode(z.flatten(0, 1), repeat).float().view(iw, *images.shape)  # z[0]: the ELBO's draw
    if sigma is None and cfg.loss.recon != "bce":  # no likelihood: no Monte Carlo or IW bound either
        log_weights = torch.full((iw, len(images)), float("nan"), device=mean.device)
    else:
        prior = torch.zeros_like(mean)
        log_weights = torch.stack([log_likelihood(recon_z[k], images, cfg, sigma) for k in range(iw)]) \
            + _log_normal(z, prior, prior) - _log_normal(z, mean, logvar)
    bound = (torch.logsumexp(log_weights, dim=0) - math.log(iw)).double()
    recon_mean = model.decode(mean, cond).float()
    mse = (recon_mean - images).square().flatten(1).mean(dim=1).double()
    neg = negative_elbo(recon_z[0], images, mean, logvar, cfg.loss)
    kl_dims = kl_per_dimension(mean, logvar)
    means = mean.double()
    sums = {
        "neg_elbo": neg.double().sum() if neg is not None else torch.tensor(float("nan"), dtype=torch.float64),
        "mc_elbo": -log_weights[0].double().sum(), "iw": -bound.sum(), "iw_squares": bound.square().sum(),
        "mse": mse.sum(), "psnr": (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).sum(),
        "ssim": ssim_per_image(recon_mean.clamp(0, 1), images).double().sum(),
        "images": torch.tensor(float(len(images)), dtype=torch.float64),
        "kl_dims": kl_dims.double().sum(dim=0), "mean_sum": means.sum(dim=0), "mean_squares": means.square().sum(0),
    }
    return {key: value.to(mean.device) for key, value in sums.items()}, recon_mean


def evaluate(model: ConvVAE, cfg: Config, batches, iw: int = 1, seed: int = 0, reduce=None, fid: FID | None = None,
             fid_images: int = 0, progress=None) -> dict:
    """Figures over `batches` of (images float (B, C, H, W) in [0, 1], cond or None, global positions (B,)).

    `reduce` sums a float64 tensor over processes (None: one process); `fid` also takes the first
    `fid_images` positions' inputs, reconstructions and prior samples.
    """
    if iw < 1:
        raise UserError("--iw must be at least 1")
    totals: dict[str, torch.Tensor] = {}
    for images, cond, positions in batches:
        sums, recon = score_batch(model, images, cond, positions, cfg, seed, iw)
        for key, value in sums.items():
            totals[key] = totals[key] + value if key in totals else value
        if fid is not None:
            chosen = positions < fid_images  # the split's first inputs, whichever rank reads them
            if chosen.any():
                picked = None if cond is None else cond[chosen]
                prior = sample_noise(seed, _PRIOR_STREAM, positions[chosen], model.latent_dim, images.device)
                fid.update(images[chosen], recon[chosen].clamp(0, 1))
                fid.update_samples(model.decode(prior, picked).float().clamp(0, 1))
        if progress is not None:
            progress(len(images))
    if not totals:  # this rank had no images: zeros of the right sizes, so the reduction still lines up
        dim = model.latent_dim
        totals = {key: torch.zeros((), dtype=torch.float64) for key in _SCALARS}
        totals.update({key: torch.zeros(dim, dtype=torch.float64) for key in ("kl_dims", "mean_sum", "mean_squares")})
    keys = list(totals)
    device = next(model.parameters()).device
    flat = torch.cat([totals[key].reshape(-1).to(device) for key in keys])
    flat = reduce(flat) if reduce is not None else flat
    sizes = [totals[key].numel() for key in keys]
    totals = dict(zip(keys, (part.cpu() for part in flat.split(sizes))))
    images = int(totals["images"].item())
    if images == 0:
        raise UserError("the shards hold no images to evaluate")
    mean_of = {key: totals[key].item() / images for key in _SCALARS}
    iw_std = math.sqrt(max(mean_of["iw_squares"] - mean_of["iw"] ** 2, 0.0))
    values = model.channels * model.resolution**2
    sigma = decoder_sigma(cfg, values)
    result = {
        "images": images, "iw_samples": iw, "neg_elbo_nats": mean_of["neg_elbo"], "mc_elbo_nats": mean_of["mc_elbo"],
        "iw_nats": mean_of["iw"], "iw_standard_error": iw_std / math.sqrt(images),
        "recon_mse": mean_of["mse"], "psnr": mean_of["psnr"], "ssim": mean_of["ssim"],
        "kl_per_dim": (totals["kl_dims"] / images).tolist(),
        "active_units": active_units(totals["mean_sum"], totals["mean_squares"], images),
        "latent_dim": model.latent_dim, "decoder_sigma": sigma,
    }
    if sigma is not None:
        result["bits_per_dim"] = (result["neg_elbo_nats"] + values * math.log(256)) / (values * math.log(2))
        result["likelihood"] = (f"Gaussian decoder, sigma {sigma:.4g} (from loss.kl_weight), density x 1/256 per "
                                f"8-bit value")
    else:
        result["likelihood"] = ("none: bits per dimension need a normalised decoder likelihood; "
                                + ("bce on 8-bit images is not one" if cfg.loss.recon == "bce"
                                   else "mse with loss.kl_weight=0 implies no variance"))
    if fid is not None:
        result.update(fid.compute())  # torchmetrics adds the other processes' feature sums itself
    return result


def evaluate_checkpoint(ckpt: str, shards: str, json_path: str | None = None, batch_size: int = 64, iw: int = 1,
                        seed: int = 0, raw: bool = False, fid_images: int = FID_IMAGES,
                        fid_weights: str | None = None, workers: int = 0) -> str:
    """The command: every process (under `accelerate launch`) takes its part of the split; rank 0 reports."""
    from accelerate import Accelerator

    from distvae.tools import image_batches, load_checkpoint

    if fid_images < 0:
        raise UserError("--fid-images must be 0 (no FID) or more")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model, cfg, which = load_checkpoint(ckpt, raw)
    model.to(accelerator.device)
    fid, notes = None, []
    if fid_images:
        weights = inception_weights(fid_weights)
        if weights is None:
            notes.append(missing_weights_message())
        else:
            fid = FID(weights=weights, device=accelerator.device)
    world, rank = accelerator.num_processes, accelerator.process_index
    device = accelerator.device
    batches = ((*batch.to(device), batch.positions.to(device))
               for batch in image_batches(cfg, shards, batch_size, rank, world, workers))
    reduce = (lambda flat: accelerator.reduce(flat, reduction="sum")) if world > 1 else None
    try:
        with Progress(accelerator.is_main_process and sys.stderr.isatty(), world) as progress:
            result = evaluate(model, cfg, batches, iw, seed, reduce, fid, fid_images, progress)
    finally:  # a gloo group left to the interpreter's exit can abort a process ("terminate called ...")
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if fid is not None:
        note = fid_note(result["fid_images"], fid.dims)
        if note:
            notes.append(note)
    result["checkpoint"], result["processes"] = which, world
    if not accelerator.is_main_process:
        return ""
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    for note in notes:
        print(note, file=sys.stderr)
    return summary(result)


def summary(result: dict) -> str:
    """The one line `distvae evaluate` prints."""
    bpd = f"{result['bits_per_dim']:.4f} bits/dim ({result['likelihood']})" if "bits_per_dim" in result else \
        f"no bits/dim ({result['likelihood']})"
    iw = result["iw_samples"]
    iw_line = f", IW bound (K={iw}) {result['iw_nats']:.2f} +- {result['iw_standard_error']:.2f}" if iw > 1 else ""
    fid_line = ""
    if result.get("fid_recon") is not None:
        fid_line = (f"; FID over {result['fid_images']} images: reconstructions {result['fid_recon']:.2f}, "
                    f"samples {result['fid_samples']:.2f}")
    return (f"{result['images']} images, {result['checkpoint']}: -ELBO {result['neg_elbo_nats']:.2f} nats/image"
            f"{iw_line}; {bpd}; recon mse {result['recon_mse']:.5f}, psnr {result['psnr']:.2f} dB, ssim "
            f"{result['ssim']:.4f}; active units {result['active_units']}/{result['latent_dim']}{fid_line}")


class Progress:
    """A rich progress bar of images on rank 0 when stderr is a terminal; otherwise nothing."""

    def __init__(self, show: bool, world: int):
        self.show, self.world, self.bar = show, world, None

    def __enter__(self):
        if self.show:
            from rich.progress import Progress as Bar

            self.bar = Bar(transient=True)
            self.bar.start()
            self.task = self.bar.add_task("evaluating", total=None)
        return self

    def __call__(self, images: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, images * self.world)  # the other ranks go at about the same pace

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
