"""Validation metrics and image grids from a model (used during training; later by `distvae evaluate`).

Metrics over the validation split, summed on each rank and reduced across ranks:
    val/loss        the training objective (same reduction, kl_weight at this step), averaged over images
    val/neg_elbo    the negative ELBO in nats per image, kl weight 1 (loss.negative_elbo says which decoder);
                    absent for mse with kl_weight 0
    val/kl          KL(q(z|x) || N(0, I)) in nats per image
    val/recon_mse   mean squared error per pixel of the reconstruction from one posterior sample
    val/psnr        mean over images of 10 * log10(1 / mse), in dB, for images in [0, 1]
    val/active_units  latent dimensions whose posterior mean varies over the split by more than 0.01
                    (variance): few of them is posterior collapse, the decoder ignoring most of z
    val/posterior_std mean over images and dimensions of the posterior's standard deviation (near 1:
                    the encoder says little; collapsed dimensions sit at 1)
    val/decoder_min, val/decoder_max  the range of the reconstructions (outside [0, 1]: an unbounded
                    output head; a narrow range around the mean pixel: the decoder draws the average face)
and, beside the scalars, the KL of each latent dimension in nats per image (Validation.kl_per_dim): the
tracker gets it as a histogram (val/kl_per_dim) and as a sorted curve (the image kl_per_dim_sorted).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.utils import make_grid

from distvae.config import Config
from distvae.data.stream import ShardStream
from distvae.loss import LOGVAR_MAX, LOGVAR_MIN, elbo, kl_per_dimension, negative_elbo
from distvae.model import ConvVAE

ACTIVE_VARIANCE = 0.01  # the usual threshold on the variance of a dimension's posterior mean


def active_units(mean_sum: torch.Tensor, square_sum: torch.Tensor, images: float) -> int:
    """Latent dimensions whose posterior mean varies over the data by more than ACTIVE_VARIANCE, from the
    float64 sums of the means and of their squares over `images` images."""
    variance = square_sum / images - (mean_sum / images).square()
    return int((variance > ACTIVE_VARIANCE).sum())


@dataclass
class Validation:
    scalars: dict[str, float]  # the metrics above, under their prefix
    kl_per_dim: np.ndarray  # (latent_dim,) float64: KL of each dimension, nats per image
    prefix: str = "val"


@torch.no_grad()
def validate(model: ConvVAE, stream: ShardStream, cfg: Config, accelerator, step: int,
             prefix: str = "val") -> Validation:
    """The metrics above under `prefix` ("val" for the live weights, "val_ema" for the EMA)."""
    was_training = model.training
    model.eval()
    device = accelerator.device
    generator = torch.Generator(device).manual_seed(cfg.run.seed + 1_000_003 * (accelerator.process_index + 1))
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # loss, -elbo, kl, mse, psnr, images
    dims = model.latent_dim
    # Sums of the means, of their squares, of each dimension's KL, and of the mean std per image.
    latent = torch.zeros(3 * dims + 1, dtype=torch.float64, device=device)
    extremes = torch.tensor([float("inf"), float("inf")], dtype=torch.float64, device=device)  # min, -max
    for index, batch in enumerate(stream):
        if cfg.train.val_batches and index >= cfg.train.val_batches:
            break
        images, cond = batch.to(device, cfg.train.channels_last)
        eps = torch.randn(images.shape[0], model.latent_dim, generator=generator, device=device)
        with accelerator.autocast():
            recon, mean, logvar = model(images, cond, eps)
        terms = elbo(recon, images, mean, logvar, cfg.loss, step)
        neg_elbo = negative_elbo(recon, images, mean, logvar, cfg.loss)
        mse = (recon.float() - images).square().flatten(1).mean(dim=1)
        count = images.shape[0]
        psnr = 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))
        sums += torch.stack([terms.total.double() * count,
                             neg_elbo.double().sum() if neg_elbo is not None else torch.zeros_like(sums[0]),
                             terms.kl.double() * count, mse.double().sum(), psnr.double().sum(),
                             torch.tensor(count, dtype=torch.float64, device=device)])
        std = torch.exp(0.5 * logvar.float().clamp(LOGVAR_MIN, LOGVAR_MAX))
        latent += torch.cat([mean.double().sum(0), mean.double().square().sum(0),
                             kl_per_dimension(mean, logvar).double().sum(0), std.double().mean(1).sum()[None]])
        recon_range = torch.stack([recon.float().amin(), -recon.float().amax()]).double()
        extremes = torch.minimum(extremes, recon_range)
    sums, latent = accelerator.reduce(sums, reduction="sum"), accelerator.reduce(latent, reduction="sum")
    if getattr(accelerator, "num_processes", 1) > 1:
        torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MIN)
    model.train(was_training)
    totals = sums.tolist()
    images_seen = max(totals[5], 1.0)
    metrics = {"val/loss": totals[0] / images_seen, "val/neg_elbo": totals[1] / images_seen,
               "val/kl": totals[2] / images_seen, "val/recon_mse": totals[3] / images_seen,
               "val/psnr": totals[4] / images_seen, "val/images": totals[5]}
    metrics["val/active_units"] = float(active_units(latent[:dims], latent[dims : 2 * dims], images_seen))
    metrics["val/posterior_std"] = latent[-1].item() / images_seen
    metrics["val/decoder_min"], metrics["val/decoder_max"] = extremes[0].item(), -extremes[1].item()
    if cfg.loss.recon == "mse" and cfg.loss.kl_weight <= 0:
        del metrics["val/neg_elbo"]
    kl_per_dim = (latent[2 * dims : 3 * dims] / images_seen).cpu().numpy()
    if getattr(model, "latent", "vector") == "spatial":  # a map's channels: how the rate is spread over them
        for channel, kl in enumerate(kl_per_dim.reshape(model.latent_shape[0], -1).sum(axis=1).tolist()):
            metrics[f"val/kl_channel{channel}"] = kl
    return Validation({key.replace("val/", f"{prefix}/", 1): value for key, value in metrics.items()}, kl_per_dim,
                      prefix)


def to_uint8_grid(images: torch.Tensor, rows: int) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1] -> one (H', W', 3) uint8 picture, `rows` images per row."""
    grid = make_grid(images.float().clamp(0, 1).cpu(), nrow=rows, padding=2, pad_value=1.0)
    if grid.shape[0] == 1:
        grid = grid.expand(3, -1, -1)
    return (grid.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)


@torch.no_grad()
def sample_grid(model: ConvVAE, seed: int, count: int = 64, cond: torch.Tensor | None = None) -> np.ndarray:
    """Decodes the same z (drawn from `seed`) every time, so grids over a run show one set of faces evolving."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    if model.cond_dim and cond is None:
        cond = torch.zeros(count, model.cond_dim, device=device)
    samples = model.sample(count, cond, generator=generator)
    model.train(was_training)
    return to_uint8_grid(samples, rows=int(count**0.5))


@torch.no_grad()
def reconstruction_pairs(model: ConvVAE, images: torch.Tensor, cond: torch.Tensor | None = None) -> np.ndarray:
    """Inputs in the top row, their reconstructions (posterior means decoded) below."""
    was_training = model.training
    model.eval()
    mean, _ = model.encode(images, cond)
    recon = model.decode(mean, cond)
    model.train(was_training)
    return to_uint8_grid(torch.cat([images, recon.float()]), rows=images.shape[0])
