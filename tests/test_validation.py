"""Validation's latent-health figures (evaluate.validate) against a direct computation on a small split."""

import contextlib

import pytest
import torch

from distvae.config import load_config
from distvae.data.stream import Batch
from distvae.evaluate import validate
from distvae.loss import LOGVAR_MAX, LOGVAR_MIN
from distvae.model import build_model

SEED = 31


class OneCPU:
    """What validate asks of an Accelerator, for one CPU process."""

    device, process_index, num_processes = torch.device("cpu"), 0, 1

    def autocast(self):
        return contextlib.nullcontext()

    def reduce(self, tensor, reduction="sum"):
        return tensor


def split(count: int = 24, batch: int = 8) -> list[Batch]:
    generator = torch.Generator().manual_seed(SEED)
    images = torch.randint(0, 256, (count, 32, 32, 3), dtype=torch.uint8, generator=generator)
    return [Batch(images[i : i + batch], None, 0) for i in range(0, count, batch)]


def test_active_units_posterior_std_and_decoder_range_equal_a_direct_computation():
    print(f"seed {SEED}")
    cfg = load_config("tiny", ["train.val_batches=0"])
    torch.manual_seed(SEED)
    model = build_model(cfg.model)
    with torch.no_grad():  # a spread mean head: some dimensions vary over the data by more than 0.01, some not
        model.mean_head.weight.mul_(torch.linspace(0, 30, cfg.model.latent_dim)[:, None])
    batches = split()
    metrics = validate(model, batches, cfg, OneCPU(), step=1)
    images = torch.cat([batch.to("cpu")[0] for batch in batches])
    with torch.no_grad():
        mean, logvar = model.eval().encode(images)
        std = torch.exp(0.5 * logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))
        variance = mean.double().var(dim=0, unbiased=False)
    active = int((variance > 0.01).sum())
    print(f"active units {metrics['val/active_units']:.0f} of {cfg.model.latent_dim} (direct {active})")
    assert 0 < active < cfg.model.latent_dim  # the control: the threshold separates these dimensions
    assert metrics["val/active_units"] == active
    assert metrics["val/posterior_std"] == pytest.approx(std.mean().item(), rel=1e-6)
    generator = torch.Generator().manual_seed(cfg.run.seed + 1_000_003)  # validate's draws on rank 0
    with torch.no_grad():
        recon = torch.cat([model(batch.to("cpu")[0], None, torch.randn(8, cfg.model.latent_dim,
                                                                       generator=generator))[0] for batch in batches])
    assert metrics["val/decoder_min"] == recon.min().item() and metrics["val/decoder_max"] == recon.max().item()
    assert 0.0 <= metrics["val/decoder_min"] < metrics["val/decoder_max"] <= 1.0  # the sigmoid head


def test_a_mean_head_of_zeros_has_no_active_units():
    cfg = load_config("tiny", ["train.val_batches=0"])
    torch.manual_seed(SEED)
    model = build_model(cfg.model)
    with torch.no_grad():
        model.mean_head.weight.zero_()
        model.mean_head.bias.fill_(0.3)
    assert validate(model, split(), cfg, OneCPU(), step=1)["val/active_units"] == 0
