"""distvae evaluate's figures against direct computations, on a tiny random model (no checkpoint needed)."""

import math

import pytest
import torch

from distvae.config import load_config
from distvae.loss import LOGVAR_MAX, LOGVAR_MIN, negative_elbo
from distvae.model import build_model
from distvae.scores import evaluate

SEED = 20261203


def setup(*overrides: str, count: int = 8, batch: int = 8):
    cfg = load_config("tiny", list(overrides))
    torch.manual_seed(SEED)
    model = build_model(cfg.model).eval()
    images = torch.rand(count, 3, 32, 32, generator=torch.Generator().manual_seed(SEED + 1))
    return cfg, model, [images[i : i + batch] for i in range(0, count, batch)], images


def test_elbo_mse_and_psnr_equal_a_direct_computation():
    print(f"seed {SEED}")
    cfg, model, batches, images = setup()
    result = evaluate(model, cfg, batches, iw=1, seed=5)
    with torch.no_grad():
        mean, logvar = model.encode(images)
        logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        eps = torch.randn(1, *mean.shape, generator=torch.Generator().manual_seed(5))[0]
        z = mean + torch.exp(0.5 * logvar) * eps
        direct = negative_elbo(model.decode(z), images, mean, logvar, cfg.loss).mean().item()
        mse = (model.decode(mean) - images).square().flatten(1).mean(dim=1)
        # The Monte Carlo ELBO by hand: log p(x|z) (Gaussian, sigma^2 = kl_weight / 2) + log p(z) - log q(z|x).
        sigma2, d = cfg.loss.kl_weight / 2, images[0].numel()
        log_px = -((model.decode(z) - images).square().flatten(1).sum(1) / (2 * sigma2)
                   + 0.5 * d * math.log(2 * math.pi * sigma2))
        log_pz = -0.5 * (z.square() + math.log(2 * math.pi)).sum(1)
        log_qz = -0.5 * ((z - mean).square() / logvar.exp() + logvar + math.log(2 * math.pi)).sum(1)
        mc = -(log_px + log_pz - log_qz).mean().item()
    assert result["neg_elbo_nats"] == pytest.approx(direct, rel=1e-6)
    assert result["mc_elbo_nats"] == pytest.approx(mc, rel=1e-5)
    assert result["recon_mse"] == pytest.approx(mse.mean().item(), rel=1e-6)
    assert result["psnr"] == pytest.approx((10 * torch.log10(1 / mse)).mean().item(), rel=1e-6)
    assert result["bits_per_dim"] == pytest.approx((direct + d * math.log(256)) / (d * math.log(2)), rel=1e-6)
    assert result["iw_nats"] == result["mc_elbo_nats"]  # K = 1 is the one-sample ELBO, exactly
    assert sum(result["kl_per_dim"]) == pytest.approx(
        (0.5 * (mean.square() + logvar.exp() - 1 - logvar)).sum(1).mean().item(), rel=1e-5)


def test_the_iw_bound_with_64_samples_is_not_looser_than_with_one():
    cfg, model, batches, _ = setup(count=192, batch=64)
    one, many = evaluate(model, cfg, batches, iw=1, seed=1), evaluate(model, cfg, batches, iw=64, seed=1)
    print(f"seed {SEED}: -log p bound K=1 {one['iw_nats']:.2f} +- {one['iw_standard_error']:.2f}, "
          f"K=64 {many['iw_nats']:.2f} +- {many['iw_standard_error']:.2f}")
    assert many["iw_nats"] <= one["iw_nats"] + 3 * one["iw_standard_error"]
    assert many["iw_nats"] < one["iw_nats"]  # tighter on average: the control that K matters


def test_a_mean_head_of_zeros_has_no_active_units_and_a_spread_one_has_some():
    cfg, model, batches, _ = setup(count=32, batch=16)
    with torch.no_grad():
        model.mean_head.weight.zero_()
        model.mean_head.bias.zero_()
    assert evaluate(model, cfg, batches)["active_units"] == 0
    with torch.no_grad():
        model.mean_head.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(SEED))
    assert evaluate(model, cfg, batches)["active_units"] > 0  # control: means that vary are counted


def test_bits_per_dim_need_a_likelihood():
    cfg, model, batches, _ = setup("loss.recon=bce")
    result = evaluate(model, cfg, batches)
    assert "bits_per_dim" not in result and result["likelihood"].startswith("none:")
    cfg, model, batches, _ = setup("loss.kl_weight=0")
    result = evaluate(model, cfg, batches)
    assert "bits_per_dim" not in result and "implies no variance" in result["likelihood"]
    assert math.isnan(result["iw_nats"])
