"""The convolutional VAE: nn.Modules only (no I/O, no printing).

The reference tutorial model is the special case resolution=64, hiddens=[16, 32, 64, 128, 256],
latent_dim=128, output="relu", norm="batch" (`--config reference`). Every stage halves the image
in the encoder and doubles it back in the decoder, so resolution must be divisible by 2**len(hiddens).

The latent bottleneck (the mean and logvar heads, z = mean + std * eps, and the decoder's first
linear layer) runs in fp32 under any autocast: in bf16, with 8 bits of mantissa, a std of 1e-3 x |mean|
vanishes when added to the mean, and the decoder's first layer would cast z back to bf16. These are
three small matrix products; the convolutions keep the autocast dtype.

The noise `eps` is an argument, drawn by the caller, so a compiled forward holds no RNG state and
no torch.Generator (which graph-breaks torch.compile).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

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


class ConvVAE(nn.Module):
    def __init__(
        self,
        resolution: int = 64,
        channels: int = 3,
        hiddens: tuple[int, ...] | list[int] = (16, 32, 64, 128, 256),
        latent_dim: int = 128,
        output: str = "sigmoid",
        norm: str = "batch",
        cond_dim: int = 0,
    ):
        super().__init__()
        hiddens = list(hiddens)
        self.resolution, self.channels, self.latent_dim, self.cond_dim = resolution, channels, latent_dim, cond_dim
        self.bottom = resolution // 2 ** len(hiddens)  # spatial size after the last encoder stage
        self.bottom_shape = (hiddens[-1], self.bottom, self.bottom)
        features = hiddens[-1] * self.bottom * self.bottom

        encoder, previous = [], channels
        for width in hiddens:
            encoder += [nn.Conv2d(previous, width, 3, stride=2, padding=1), _norm(norm, width), nn.ReLU()]
            previous = width
        self.encoder = nn.Sequential(*encoder, nn.Flatten())
        self.mean_head = nn.Linear(features + cond_dim, latent_dim)
        self.logvar_head = nn.Linear(features + cond_dim, latent_dim)

        self.decoder_input = nn.Linear(latent_dim + cond_dim, features)
        decoder = []
        for wide, narrow in zip(hiddens[:0:-1], hiddens[-2::-1]):
            decoder += [
                nn.ConvTranspose2d(wide, narrow, 3, stride=2, padding=1, output_padding=1),
                _norm(norm, narrow),
                nn.ReLU(),
            ]
        first = hiddens[0]
        decoder += [
            nn.ConvTranspose2d(first, first, 3, stride=2, padding=1, output_padding=1),
            _norm(norm, first),
            nn.ReLU(),
            nn.Conv2d(first, channels, 3, padding=1),
            _OUTPUTS[output](),
        ]
        self.decoder = nn.Sequential(*decoder)

    def _with_cond(self, features: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if self.cond_dim == 0:
            return features
        if cond is None or cond.shape[-1] != self.cond_dim:
            raise ValueError(f"this model is conditional: pass cond with {self.cond_dim} values per image")
        return torch.cat([features, cond.to(features.dtype)], dim=1)

    def encode(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and logvar, fp32."""
        features = self.encoder(x)
        with _fp32(features.device):
            features = self._with_cond(features.float(), cond)
            logvar = self.logvar_head(features).clamp(LOGVAR_MIN, LOGVAR_MAX)
            return self.mean_head(features), logvar

    @staticmethod
    def reparameterize(mean: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """z = mean + std * eps in fp32; eps ~ N(0, I) of mean's shape, drawn by the caller."""
        mean, logvar = mean.float(), logvar.float()
        return mean + torch.exp(0.5 * logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)) * eps.float()

    def decode(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        with _fp32(z.device):
            hidden = self.decoder_input(self._with_cond(z.float(), cond))
        return self.decoder(hidden.view(-1, *self.bottom_shape))

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
    )
