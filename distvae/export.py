"""Export a checkpoint for other code, and load it back without distvae's trainer.

    distvae export --ckpt runs/celeba64 --out exported/celeba64         # EMA weights when the run kept them

    from distvae import ConvVAE
    vae = ConvVAE.from_pretrained("exported/celeba64")   # eval mode, CPU; .to("cuda") as usual
    mean, logvar = vae.encode(images)                     # images: float (B, C, H, W) in [0, 1]
    images = vae.decode(mean)                             # (B, C, H, W)
    images = vae.sample(16)                               # z ~ N(0, I)
    latents = vae.reparameterize(mean, logvar, eps) * vae.scaling_factor   # a spatial latent for a second stage

DIR/config.json holds the model config (model.* of the run), what the weights are and, for a spatial latent
(or with --scale-shards), `scaling_factor`: 1 / the std of the latents over training images, so that a
second-stage model sees unit variance (as latent-diffusion users expect); `distvae latent-scale` prints it.

DIR/model.safetensors holds the weights. Loading runs no code from the files.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from distvae.config import ModelConfig
from distvae.errors import UserError
from distvae.tools import load_checkpoint

FORMAT = "distvae-convvae-1"


def export(ckpt: str, out: str, raw: bool = False, scale_shards: str | None = None, scale_images: int = 2048) -> str:
    """A spatial-latent model's export also records its latent scaling factor, measured on the run's training
    shards (or --scale-shards); a vector-latent model's only when --scale-shards is given."""
    model, cfg, which = load_checkpoint(ckpt, raw)
    factor, said = None, ""
    if model.latent == "spatial" or scale_shards:
        from distvae.tools import latent_scale

        factor, said = latent_scale(ckpt, scale_shards, scale_images, raw=raw)
        said = f"; {said}"
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()},
              folder / "model.safetensors")
    config = {"format": FORMAT, "model": cfg.to_dict()["model"], "weights": which, "scaling_factor": factor}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return f"exported {which} -> {folder}/config.json, {folder}/model.safetensors{said}"


def load_pretrained(folder: str | Path):
    from distvae.model import build_model

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{folder} is not an exported distvae model (config.json: {error})") from None
    if config.get("format") != FORMAT:
        raise UserError(f"{folder}/config.json is format {config.get('format')!r}, not {FORMAT}")
    model = build_model(ModelConfig(**config["model"]))
    model.load_state_dict(load_file(folder / "model.safetensors"))
    model.scaling_factor = config.get("scaling_factor")  # None unless the export measured it
    return model.eval()
