"""The convolutional VAE family: nn.Modules only (no I/O, no printing).

    ConvVAE(arch="plain")                                   # the tutorial's stride-2 conv stages (BatchNorm, ReLU)
    ConvVAE(arch="resnet", blocks_per_stage=2, attention_resolution=8)   # residual stages, GroupNorm, SiLU
    ConvVAE(latent="spatial", latent_channels=4)            # z of 4 x bottom x bottom, a first stage for latent models

The reference tutorial model is the special case arch="plain", resolution=64, hiddens=[16, 32, 64, 128, 256],
latent_dim=128, output="relu", norm="batch" (`--config reference`); the plain arch keeps its state-dict keys.
Every stage halves the image in the encoder and doubles it back in the decoder, so resolution must be
divisible by 2**len(hiddens). The named sizes are the YAML configs in distvae/configs/.

The latent bottleneck (the mean and logvar heads, z = mean + std * eps, and the decoder's first
layer) runs in fp32 under any autocast: in bf16, with 8 bits of mantissa, a std of 1e-3 x |mean|
vanishes when added to the mean, and the decoder's first layer would cast z back to bf16. These are
three small layers (linear for a vector latent, 3x3 convs for a spatial one); the rest keep the autocast dtype.

The noise `eps` is an argument, drawn by the caller, so a compiled forward holds no RNG state and
no torch.Generator (which graph-breaks torch.compile).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from distvae.config import ModelConfig

# logvar is clamped to this range wherever it is produced or used. exp(20) = 4.9e8 fits in fp32 and bf16
# (not in fp16, whose maximum is 65504: exp() of logvar is always taken in fp32 here), and exp(-30) is a
# variance far below anything an 8-bit image can resolve.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def _norm(kind: str, width: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(width)
    if kind == "group":
        return nn.GroupNorm(min(32, width // 8), width)
    return nn.Identity()


_OUTPUTS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "none": nn.Identity}


def _fp32(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off for a region (the meta device, which `distvae info` uses, has no autocast). A plain test
    of the device type: torch.compile cannot trace torch.amp.is_autocast_available before torch 2.14."""
    if device.type != "meta":
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _plain_encoder(channels: int, hiddens: list[int], norm: str) -> list[nn.Module]:
    layers, previous = [], channels
    for width in hiddens:
        layers += [nn.Conv2d(previous, width, 3, stride=2, padding=1), _norm(norm, width), nn.ReLU()]
        previous = width
    return layers


def _plain_decoder(channels: int, hiddens: list[int], norm: str, output: str) -> list[nn.Module]:
    layers = []
    for wide, narrow in zip(hiddens[:0:-1], hiddens[-2::-1]):
        layers += [nn.ConvTranspose2d(wide, narrow, 3, stride=2, padding=1, output_padding=1), _norm(norm, narrow),
                   nn.ReLU()]
    first = hiddens[0]
    return layers + [nn.ConvTranspose2d(first, first, 3, stride=2, padding=1, output_padding=1), _norm(norm, first),
                     nn.ReLU(), nn.Conv2d(first, channels, 3, padding=1), _OUTPUTS[output]()]


def _resnet_encoder(channels: int, hiddens: list[int], blocks: int, attention: int,
                    resolution: int) -> list[nn.Module]:
    """A 3x3 conv in; per stage `blocks` residual blocks, a stride-2 conv, and self-attention when the map is
    now `attention` pixels wide; GroupNorm and SiLU out. One nn.Sequential per stage."""
    layers: list[nn.Module] = [nn.Conv2d(channels, hiddens[0], 3, padding=1)]
    previous, side = hiddens[0], resolution
    for width in hiddens:
        side //= 2
        stage = [ResBlock(previous if index == 0 else width, width) for index in range(blocks)]
        stage.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        if side == attention:
            stage.append(SelfAttention(width))
        layers.append(nn.Sequential(*stage))
        previous = width
    return layers + [_group_norm(previous), nn.SiLU()]


def _resnet_decoder(channels: int, hiddens: list[int], blocks: int, attention: int, bottom: int,
                    output: str) -> list[nn.Module]:
    """The encoder's mirror: per stage (widest first) self-attention at `attention` pixels, `blocks` residual
    blocks, a stride-2 transposed conv (not interpolate, whose CUDA backward is not deterministic)."""
    layers: list[nn.Module] = []
    previous, side = hiddens[-1], bottom
    for width in reversed(hiddens):
        stage: list[nn.Module] = [SelfAttention(previous)] if side == attention else []
        stage += [ResBlock(previous if index == 0 else width, width) for index in range(blocks)]
        stage.append(nn.ConvTranspose2d(width, width, 4, stride=2, padding=1))
        layers.append(nn.Sequential(*stage))
        previous, side = width, side * 2
    return layers + [_group_norm(previous), nn.SiLU(), nn.Conv2d(previous, channels, 3, padding=1),
                     _OUTPUTS[output]()]


class ResBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv, twice, added to the input (a 1x1 conv when the width changes)."""

    def __init__(self, width_in: int, width_out: int):
        super().__init__()
        self.norm1, self.conv1 = _group_norm(width_in), nn.Conv2d(width_in, width_out, 3, padding=1)
        self.norm2, self.conv2 = _group_norm(width_out), nn.Conv2d(width_out, width_out, 3, padding=1)
        self.skip = nn.Conv2d(width_in, width_out, 1) if width_in != width_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(hidden)))


class SelfAttention(nn.Module):
    """One head of self-attention over the pixels of a feature map, added to it. Plain matrix products, not
    scaled_dot_product_attention: its fused CUDA kernels have no deterministic backward, and at the low
    resolutions it is used at (8x8, 16x16) the products are small."""

    def __init__(self, width: int):
        super().__init__()
        self.norm, self.qkv, self.proj = _group_norm(width), nn.Conv2d(width, 3 * width, 1), nn.Conv2d(width, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, width, height, breadth = x.shape
        query, key, value = self.qkv(self.norm(x)).flatten(2).chunk(3, dim=1)  # (B, C, N) each
        weights = torch.softmax(query.transpose(1, 2) @ key * width**-0.5, dim=-1)  # (B, N, N)
        attended = (value @ weights.transpose(1, 2)).view(batch, width, height, breadth)
        return x + self.proj(attended)


def _group_norm(width: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, width // 8), width)


class ConvVAE(nn.Module):
    """One family: `arch` plain (the tutorial's stride-2 conv stages) or resnet (residual blocks per stage,
    GroupNorm, SiLU, optional self-attention), with a `latent` vector (latent_dim values from linear heads) or
    spatial (latent_channels x bottom x bottom from 3x3 conv heads, the bottom being resolution / 2**stages).

    The public z is always flat, (B, latent_dim), whatever the latent: noise, loss, scores and tools treat every
    variant alike; `latent_shape` is its shape per image, for (B, *latent_shape) views.
    """

    def __init__(
        self,
        resolution: int = 64,
        channels: int = 3,
        hiddens: tuple[int, ...] | list[int] = (16, 32, 64, 128, 256),
        latent_dim: int = 128,
        output: str = "sigmoid",
        norm: str = "batch",
        cond_dim: int = 0,
        arch: str = "plain",
        blocks_per_stage: int = 2,
        attention_resolution: int = 0,
        latent: str = "vector",
        latent_channels: int = 4,
    ):
        super().__init__()
        hiddens = list(hiddens)
        self.resolution, self.channels, self.cond_dim, self.arch, self.latent = (
            resolution, channels, cond_dim, arch, latent)
        self.bottom = resolution // 2 ** len(hiddens)  # spatial size after the last encoder stage
        self.bottom_shape = (hiddens[-1], self.bottom, self.bottom)
        features = hiddens[-1] * self.bottom * self.bottom
        if latent == "spatial":
            self.latent_shape: tuple[int, ...] = (latent_channels, self.bottom, self.bottom)
        else:
            self.latent_shape = (latent_dim,)
        self.latent_dim = math.prod(self.latent_shape)  # the size of the flat z
        self.scaling_factor: float | None = None  # set by from_pretrained when the export measured it (export.py)
        # Recompute each stage (an nn.Sequential of the resnet arch) in backward instead of keeping its activations;
        # the trainer sets it (train.activation_checkpointing). GroupNorm only: no running statistics to update twice.
        self.checkpoint_stages = False

        # Built in this order (encoder, heads, decoder) so a seed gives the plain arch the weights it always had.
        if arch == "resnet":
            encoder = _resnet_encoder(channels, hiddens, blocks_per_stage, attention_resolution, resolution)
        else:
            encoder = _plain_encoder(channels, hiddens, norm)
        if latent == "spatial":
            self.encoder = nn.Sequential(*encoder)
            self.mean_head = nn.Conv2d(hiddens[-1] + cond_dim, latent_channels, 3, padding=1)
            self.logvar_head = nn.Conv2d(hiddens[-1] + cond_dim, latent_channels, 3, padding=1)
            self.decoder_input = nn.Conv2d(latent_channels + cond_dim, hiddens[-1], 3, padding=1)
        else:
            self.encoder = nn.Sequential(*encoder, nn.Flatten())
            self.mean_head = nn.Linear(features + cond_dim, latent_dim)
            self.logvar_head = nn.Linear(features + cond_dim, latent_dim)
            self.decoder_input = nn.Linear(latent_dim + cond_dim, features)
        if arch == "resnet":
            decoder = _resnet_decoder(channels, hiddens, blocks_per_stage, attention_resolution, self.bottom, output)
        else:
            decoder = _plain_decoder(channels, hiddens, norm, output)
        self.decoder = nn.Sequential(*decoder)

    def _with_cond(self, features: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """Features with the condition appended: as values of a vector, or as constant channels of a map."""
        if self.cond_dim == 0:
            return features
        if cond is None or cond.shape[-1] != self.cond_dim:
            raise ValueError(f"this model is conditional: pass cond with {self.cond_dim} values per image")
        cond = cond.to(features.dtype)
        if features.dim() == 4:
            cond = cond[:, :, None, None].expand(-1, -1, *features.shape[2:])
        return torch.cat([features, cond], dim=1)

    def _through(self, layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            if self.checkpoint_stages and isinstance(layer, nn.Sequential) and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)  # keeps the stage's input, recomputes the rest
            else:
                x = layer(x)
        return x

    def encode(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and logvar, fp32."""
        features = self._through(self.encoder, x)
        with _fp32(features.device):
            features = self._with_cond(features.float(), cond)
            logvar = self.logvar_head(features).flatten(1).clamp(LOGVAR_MIN, LOGVAR_MAX)
            return self.mean_head(features).flatten(1), logvar

    @staticmethod
    def reparameterize(mean: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """z = mean + std * eps in fp32; eps ~ N(0, I) of mean's shape, drawn by the caller."""
        mean, logvar = mean.float(), logvar.float()
        return mean + torch.exp(0.5 * logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)) * eps.float()

    def decode(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        with _fp32(z.device):
            hidden = self.decoder_input(self._with_cond(z.float().view(-1, *self.latent_shape), cond))
        return self._through(self.decoder, hidden.view(-1, *self.bottom_shape))

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor | None = None, eps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, mean, logvar); eps = None draws the noise from torch's global generator."""
        mean, logvar = self.encode(x, cond)
        if eps is None:
            eps = torch.randn_like(mean)
        z = self.reparameterize(mean, logvar, eps)
        return self.decode(z, cond), mean, logvar

    @classmethod
    def from_pretrained(cls, folder) -> ConvVAE:
        """A model written by `distvae export` (config.json + model.safetensors), in eval mode (export.py)."""
        from distvae.export import load_pretrained

        return load_pretrained(folder)

    @torch.no_grad()
    def sample(
        self, n: int, cond: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=generator, device=device)
        return self.decode(z, cond)


def build_model(cfg: ModelConfig) -> ConvVAE:
    return ConvVAE(
        resolution=cfg.resolution,
        channels=cfg.channels,
        hiddens=cfg.hiddens,
        latent_dim=cfg.latent_dim,
        output=cfg.output,
        norm=cfg.norm,
        cond_dim=cfg.cond_dim,
        arch=cfg.arch,
        blocks_per_stage=cfg.blocks_per_stage,
        attention_resolution=cfg.attention_resolution,
        latent=cfg.latent,
        latent_channels=cfg.latent_channels,
    )
