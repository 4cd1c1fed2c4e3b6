"""After training: pictures from a checkpoint, on any machine (CPU is enough).

    distvae sample --ckpt runs/celeba64 --n 64 --temperature 0.8 --seed 0 --out grid.png
    distvae sample --ckpt runs/celeba64-cond --attr Smiling=1 --attr Eyeglasses=0 --out smiling.png
    distvae reconstruct --ckpt runs/celeba64 --shards shards/celeba64/manifest.json --n 16 --out recon.png
    distvae interpolate --ckpt runs/celeba64 --shards shards/celeba64/manifest.json --pairs 4 --steps 8 --slerp \\
        --out interp.png

--ckpt takes a checkpoint folder, RUN_DIR/checkpoints/latest or a run directory (its latest complete
checkpoint). The model is rebuilt from the config stored in the checkpoint, with the EMA weights when
the run kept them (`--raw` for the live ones); the first line printed says which. --shards follows
data.*_shards (a manifest's val split unless `manifest.json#split` says otherwise); images are
cropped and resized as in training (a one-line notice when they were packed at another resolution;
shards of another channel count are refused). A conditional model takes each image's own attributes
from the shards; its samples take real attribute rows kept in the checkpoint (see attributes.py), and
--attr fixes some of them. The same arguments give the same PNG bytes.
"""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distvae.attributes import FILE as ATTRIBUTES_FILE
from distvae.attributes import AttributeTable
from distvae.checkpoint import load_ema_state, load_model_state, load_train_state, resolve_checkpoint
from distvae.config import Config, config_from_dict
from distvae.data.shards import Shard, ShardError, read_samples, resolve_shards
from distvae.data.stream import Batch, ShardStream, check_attributes
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


def conditions(model: ConvVAE, ckpt: str, attrs: list[str], count: int, generator: torch.Generator):
    """(cond for `count` samples or None, the words that say where it came from)."""
    if not model.cond_dim:
        if attrs:
            raise UserError("--attr needs a conditional model; this checkpoint's model is unconditional "
                            "(model.cond_dim=0)")
        return None, ""
    table = AttributeTable.load(resolve_checkpoint(ckpt))
    if table is None:
        raise UserError(f"this conditional checkpoint keeps no attribute rows ({ATTRIBUTES_FILE}; checkpoints "
                        f"written before distvae kept them have none): retrain to sample from it")
    cond, agreeing = table.draw(table.parse(attrs), count, generator)
    given = " ".join(attrs) if attrs else "no attribute fixed"
    return cond, f" with {given} (the other attributes from {agreeing} of {len(table.rows)} training rows)"


@torch.no_grad()
def sample(ckpt: str, out: str, n: int = 64, temperature: float = 1.0, seed: int = 0, raw: bool = False,
           attrs: list[str] = ()) -> str:
    if n < 1 or not temperature > 0:
        raise UserError("--n must be at least 1 and --temperature positive")
    model, _, which = load_checkpoint(ckpt, raw)
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, model.latent_dim, generator=generator) * temperature  # first: the same z whatever --attr
    cond, said = conditions(model, ckpt, list(attrs), n, generator)
    save_png(to_uint8_grid(model.decode(z, cond), rows=math.ceil(math.sqrt(n))), out)
    line = f"{n} samples at temperature {temperature:g}, seed {seed}{said}, from {which} -> {out}"
    if model.latent == "spatial":
        shape = "x".join(map(str, model.latent_shape))
        line += (f"\nnote: this model has a spatial latent ({shape}); samples of N(0, I) at that shape are not "
                 f"expected to look like faces: its latents are meant for a second-stage model (reconstruct and "
                 f"interpolate show what it learned)")
    return line


def first_image(shard: Shard) -> tuple[int, int, bool]:
    """(side, channels, packed at a fixed size) of a shard's first image; (0, 0, False) when unreadable."""
    try:
        _, sample = next(read_samples(shard.url, 0, 1))
        if "npy" in sample:
            array = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
            return array.shape[0], 1 if array.ndim == 2 else array.shape[2], True
        meta = json.loads(sample.get("json", b"{}"))
        for ext in ("png", "jpg", "jpeg", "webp"):
            if ext in sample:
                image = Image.open(io.BytesIO(sample[ext]))
                return min(image.size), len(image.getbands()), bool(meta.get("resolution"))
    except (OSError, ShardError, ValueError, StopIteration):
        pass
    return 0, 0, False


def check_shards(cfg: Config, shards: list[Shard], spec: str) -> None:
    """Refuse images of another channel count; say so in one line when they are resized."""
    side, channels, fixed = first_image(shards[0])
    if fixed and channels and channels != cfg.model.channels:
        raise UserError(f"--shards {spec} holds {channels}-channel images and this model takes "
                        f"{cfg.model.channels} (model.channels): use shards of the kind it was trained on")
    if fixed and side and side != cfg.model.resolution:
        print(f"notice: --shards {spec} holds {side}x{side} images and the model takes {cfg.model.resolution}x"
              f"{cfg.model.resolution}: they are resized as in training", file=sys.stderr)
    if cfg.model.cond_dim:
        check_attributes(shards[0], cfg.model.cond_dim)


def image_batches(cfg: Config, shards: str, batch_size: int = 64, rank: int = 0, world_size: int = 1,
                  workers: int = 0, split: str = "val"):
    """The split's readable Batches (this rank's part), cropped and resized as in training; with workers the
    batches interleave, and each carries its samples' positions in the split."""
    if batch_size < 1 or workers < 0:
        raise UserError("--batch-size must be at least 1 and --workers at least 0")
    found = resolve_shards(shards, split=split)
    check_shards(cfg, found, shards)
    stream = ShardStream(found, batch_size=batch_size, resolution=cfg.model.resolution,
                         channels=cfg.model.channels, crop=cfg.data.crop, train=False, num_workers=workers,
                         cond_dim=cfg.model.cond_dim, rank=rank, world_size=world_size)
    for batch in stream:
        if batch.readable:
            yield batch


def _images(cfg: Config, shards: str, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first `count` images of the split and their attributes (None for an unconditional model)."""
    taken: list[Batch] = []
    for batch in image_batches(cfg, shards, min(count, 64)):
        taken.append(batch)
        if sum(len(b.images) for b in taken) >= count:
            break
    pairs = [batch.to("cpu") for batch in taken]
    images = torch.cat([images for images, _ in pairs])[:count] if pairs else torch.empty(0)
    if len(images) < count:
        raise UserError(f"--shards {shards} holds {len(images)} images, fewer than the {count} asked for")
    cond = torch.cat([cond for _, cond in pairs])[:count] if cfg.model.cond_dim else None
    return images, cond


@torch.no_grad()
def reconstruct(ckpt: str, shards: str, out: str, n: int = 16, raw: bool = False) -> str:
    if n < 1:
        raise UserError("--n must be at least 1")
    model, cfg, which = load_checkpoint(ckpt, raw)
    images, cond = _images(cfg, shards, n)
    mean, _ = model.encode(images, cond)
    pairs = torch.stack([images, model.decode(mean, cond).float()], dim=1).flatten(0, 1)  # input, recon, ...
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
    images, cond = _images(cfg, shards, 2 * pairs)
    mean, _ = model.encode(images, cond)
    start, end = mean[0::2], mean[1::2]
    times = torch.linspace(0, 1, steps).tolist()
    path = [slerp(start, end, t) if spherical else torch.lerp(start, end, t) for t in times]
    # A conditional model's attributes move from the first image's to the second's along with z.
    cond_path = None if cond is None else torch.stack([torch.lerp(cond[0::2], cond[1::2], t) for t in times], dim=1)
    decoded = model.decode(torch.stack(path, dim=1).flatten(0, 1),
                           None if cond_path is None else cond_path.flatten(0, 1))
    decoded = decoded.float().view(pairs, steps, *images.shape[1:])
    rows = torch.cat([images[0::2, None], decoded, images[1::2, None]], dim=1).flatten(0, 1)
    save_png(to_uint8_grid(rows, rows=steps + 2), out)
    kind = "spherical" if spherical else "linear"
    return f"{pairs} pairs, {steps} {kind} steps between posterior means (inputs at both ends) from {which} -> {out}"


@torch.no_grad()
def latent_scale(ckpt: str, shards: str | None = None, images: int = 2048, seed: int = 0,
                 raw: bool = False) -> tuple[float, str]:
    """(scaling factor, the line that says it): 1 / the standard deviation of z = mean + std * eps over the first
    `images` images of the training split (the run's own data.train_shards unless --shards says otherwise), all
    latent values together: what a second-stage model multiplies z by so that it has unit variance."""
    if images < 2:
        raise UserError("--images must be at least 2")
    model, cfg, which = load_checkpoint(ckpt, raw)
    spec = shards or cfg.data.train_shards
    generator = torch.Generator().manual_seed(seed)
    total, total_sq, count, seen = 0.0, 0.0, 0, 0
    for batch in image_batches(cfg, spec, min(images, 64), split="train"):
        pixels, cond = batch.to("cpu")
        pixels, cond = pixels[: images - seen], None if cond is None else cond[: images - seen]
        mean, logvar = model.encode(pixels, cond)
        z = model.reparameterize(mean, logvar, torch.randn(mean.shape, generator=generator)).double()
        total, total_sq, count = total + z.sum().item(), total_sq + z.square().sum().item(), count + z.numel()
        seen += len(pixels)
        if seen >= images:
            break
    if seen < 2:
        raise UserError(f"--shards {spec}: no readable training images to measure the latents on")
    variance = total_sq / count - (total / count) ** 2
    factor = 1.0 / math.sqrt(variance)
    shape = "x".join(map(str, model.latent_shape))
    return factor, (f"latent scaling factor {factor:.6g}: 1 / the std of {count:,} latent values ({seen} training "
                    f"images x {shape}) from {which}; z * {factor:.4g} has unit variance")
