"""Validation's latent-health figures (evaluate.validate) against a direct computation on a small split, and the
sorted-KL picture and collapse watch that show them during training (latent_health.py)."""

import contextlib

import numpy as np
import pytest
import torch

from distvae.config import load_config
from distvae.data.stream import Batch
from distvae.evaluate import validate
from distvae.latent_health import CollapseWatch, kl_curve
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
    result = validate(model, batches, cfg, OneCPU(), step=1)
    metrics = result.scalars
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
    clamped = logvar.double().clamp(LOGVAR_MIN, LOGVAR_MAX)
    kl_direct = (0.5 * (mean.double().square() + clamped.exp() - 1.0 - clamped)).mean(dim=0)
    print(f"KL per dim, sorted: {sorted(result.kl_per_dim.round(3).tolist(), reverse=True)}")
    assert result.kl_per_dim.shape == (cfg.model.latent_dim,)
    assert kl_direct.std() > 0.1 * kl_direct.mean()  # the control: the dimensions differ, so a mix-up would show
    assert result.kl_per_dim == pytest.approx(kl_direct.numpy(), rel=1e-5, abs=1e-6)  # fp32 cancellation near 0
    assert result.kl_per_dim.sum() == pytest.approx(metrics["val/kl"], rel=1e-6)
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
    assert validate(model, split(), cfg, OneCPU(), step=1).scalars["val/active_units"] == 0


def test_kl_curve_draws_one_bar_per_dimension_tallest_first():
    values = np.array([0.0, 3.0, 0.5, 1.5])
    picture = kl_curve(values, width=208, height=120)
    assert picture.shape == (120, 208, 3) and picture.dtype == np.uint8
    blue = np.all(picture == (52, 101, 164), axis=2)
    heights = [int(blue[:, column].sum()) for column in (49 + 40 * i + 20 for i in range(4))]  # bar centres
    print(f"bar heights {heights}")
    assert heights[0] > heights[1] > heights[2] > 0 and heights[3] == 0
    assert heights[0] / heights[1] == pytest.approx(2.0, rel=0.05)  # 3.0 against 1.5


def test_collapse_watch_warns_once_after_the_stated_number_of_validations():
    watch = CollapseWatch(share=0.25, validations=2, latent_dim=32, from_step=20)  # under 8 active dimensions
    figures = [0, 1, 20, 5, 9, 3, 2, 1, 0, 12, 4, 4]  # one validation every 10 steps; the first two in warm-up
    warned = [index for index, active in enumerate(figures) if watch.add(10 * index, active, kl=1.0)]
    assert warned == [6, 11]  # the second low validation of each streak, once; a healthy one resets it
    message = CollapseWatch(0.25, 1, 32).add(0, 0, kl=0.0123)
    assert "0 of 32 latent dimensions active" in message and "KL 0.0123 nats" in message
    for knob in ("loss.kl_weight", "loss.kl_warmup_steps", "loss.free_bits", "loss.reduction"):
        assert knob in message
    assert CollapseWatch(0.0, 1, 32).add(0, 0, kl=0.0) is None  # share 0: never


def test_a_spatial_latent_reports_the_kl_of_each_channel():
    cfg = load_config("tiny", ["train.val_batches=0", "model.latent=spatial", "model.latent_channels=3"])
    torch.manual_seed(SEED)
    model = build_model(cfg.model)
    with torch.no_grad():  # channel 1 made loud, so the per-channel sums differ and a mix-up would show
        model.mean_head.weight[1].mul_(20)
    result = validate(model, split(), cfg, OneCPU(), step=1)
    per_channel = result.kl_per_dim.reshape(3, -1).sum(axis=1)
    reported = [result.scalars[f"val/kl_channel{channel}"] for channel in range(3)]
    print(f"KL per channel: {reported}")
    assert reported == pytest.approx(per_channel.tolist(), rel=1e-9)
    assert sum(reported) == pytest.approx(result.scalars["val/kl"], rel=1e-6)
    assert reported[1] > 2 * max(reported[0], reported[2])
    assert "val/kl_channel0" not in validate(build_model(load_config("tiny").model), split(), load_config(
        "tiny", ["train.val_batches=0"]), OneCPU(), step=1).scalars  # vector latents have no channels
