"""After training: pictures from a checkpoint, on any machine (CPU is enough).

    distvae sample --ckpt runs/celeba64 --n 64 --temperature 0.8 --seed 0 --out grid.png
    distvae reconstruct --ckpt runs/celeba64 --shards shards/celeba64/manifest.json --n 16 --out recon.png
    distvae interpolate --ckpt runs/celeba64 --shards shards/celeba64/manifest.json --pairs 4 --steps 8 --slerp \\
        --out interp.png

--ckpt takes a checkpoint folder, RUN_DIR/checkpoints/latest or a run directory (its latest complete
checkpoint). The model is rebuilt from the config stored in the checkpoint, with the EMA weights when
the run kept them (`--raw` for the live ones); the first line printed says which. --shards follows
data.*_shards (a manifest's val split unless `manifest.json#split` says otherwise); images are
cropped and resized as in training. The same arguments give the same PNG bytes.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

from distvae.checkpoint import load_ema_state, load_model_state, load_train_state, resolve_checkpoint
from distvae.config import Config, config_from_dict
from distvae.data.shards import resolve_shards
from distvae.data.stream import ShardStream
from distvae.errors import UserError
from distvae.evaluate import to_uint8_grid
from distvae.model import ConvVAE, build_model


def load_checkpoint(path: str, raw: bool = False) -> tuple[ConvVAE, Config, str]:
    """(model in eval mode on CPU, the run's config, which weights: a phrase for the first line)."""
    folder = resolve_checkpoint(path)
    cfg = config_from_dict(load_train_state(folder)["config"])
    model = build_model(cfg.model)
    ema = None if raw else load_ema_state(folder)
    weights = ema if ema is not None else load_model_state(folder)
    model.load_state_dict(weights)
    which = "EMA weights" if ema is not None else ("live weights (--raw)" if raw else "live weights (no EMA kept)")
    return model.eval(), cfg, f"{folder} ({which})"


def save_png(grid, out: str) -> None:
    path = Path(out)
    if path.parent and not path.parent.is_dir():
        raise UserError(f"--out {out}: folder {path.parent} does not exist")
    Image.fromarray(grid).save(path, format="PNG")


def check_unconditional(model: ConvVAE, command: str) -> None:
    if model.cond_dim:
        raise UserError(f"this checkpoint's model is conditional (model.cond_dim={model.cond_dim}); {command} of "
                        f"conditional models is not supported yet")


@torch.no_grad()
def sample(ckpt: str, out: str, n: int = 64, temperature: float = 1.0, seed: int = 0, raw: bool = False) -> str:
    if n < 1 or not temperature > 0:
        raise UserError("--n must be at least 1 and --temperature positive")
    model, _, which = load_checkpoint(ckpt, raw)
    check_unconditional(model, "sampling")
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, model.latent_dim, generator=generator) * temperature
    save_png(to_uint8_grid(model.decode(z), rows=math.ceil(math.sqrt(n))), out)
    return f"{n} samples at temperature {temperature:g}, seed {seed}, from {which} -> {out}"


def image_batches(cfg: Config, shards: str, batch_size: int = 64):
    """Float (B, C, H, W) batches of the split in order, cropped and resized as in training."""
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    found = resolve_shards(shards, split="val")
    stream = ShardStream(found, batch_size=batch_size, resolution=cfg.model.resolution,
                         channels=cfg.model.channels, crop=cfg.data.crop, train=False, num_workers=0)
    for batch in stream:
        if batch.readable:
            yield batch.to("cpu")[0]


def _images(cfg: Config, shards: str, count: int) -> torch.Tensor:
    taken = []
    for images in image_batches(cfg, shards, min(count, 64)):
        taken.append(images)
        if sum(len(t) for t in taken) >= count:
            break
    images = torch.cat(taken)[:count] if taken else torch.empty(0)
    if len(images) < count:
        raise UserError(f"--shards {shards} holds {len(images)} images, fewer than the {count} asked for")
    return images


@torch.no_grad()
def reconstruct(ckpt: str, shards: str, out: str, n: int = 16, raw: bool = False) -> str:
    if n < 1:
        raise UserError("--n must be at least 1")
    model, cfg, which = load_checkpoint(ckpt, raw)
    check_unconditional(model, "reconstruction")
    images = _images(cfg, shards, n)
    mean, _ = model.encode(images)
    pairs = torch.stack([images, model.decode(mean).float()], dim=1).flatten(0, 1)  # input, reconstruction, ...
    save_png(to_uint8_grid(pairs, rows=min(2 * n, 16)), out)
    return f"{n} images and their reconstructions (posterior means decoded) from {which} -> {out}"


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between rows of a and b (linear where they are parallel)."""
    cos = (a * b).sum(-1, keepdim=True) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True)).clamp_min(1e-12)
    omega = torch.acos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(omega)
    linear = (1 - t) * a + t * b
    curved = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / sin.clamp_min(1e-12)
    return torch.where(sin > 1e-6, curved, linear)


@torch.no_grad()
def interpolate(ckpt: str, shards: str, out: str, pairs: int = 4, steps: int = 8, spherical: bool = False,
                raw: bool = False) -> str:
    if pairs < 1 or steps < 2:
        raise UserError("--pairs must be at least 1 and --steps at least 2")
    model, cfg, which = load_checkpoint(ckpt, raw)
    check_unconditional(model, "interpolation")
    images = _images(cfg, shards, 2 * pairs)
    mean, _ = model.encode(images)
    start, end = mean[0::2], mean[1::2]
    path = [slerp(start, end, t) if spherical else torch.lerp(start, end, t)
            for t in torch.linspace(0, 1, steps).tolist()]
    decoded = model.decode(torch.stack(path, dim=1).flatten(0, 1)).float().view(pairs, steps, *images.shape[1:])
    rows = torch.cat([images[0::2, None], decoded, images[1::2, None]], dim=1).flatten(0, 1)
    save_png(to_uint8_grid(rows, rows=steps + 2), out)
    kind = "spherical" if spherical else "linear"
    return f"{pairs} pairs, {steps} {kind} steps between posterior means (inputs at both ends) from {which} -> {out}"
