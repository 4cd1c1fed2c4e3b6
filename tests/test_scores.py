"""distvae evaluate's figures against direct computations, on a tiny random model (no checkpoint needed)."""

import math

import pytest
import torch

from distvae.config import load_config
from distvae.loss import LOGVAR_MAX, LOGVAR_MIN, negative_elbo
from distvae.model import build_model
from distvae.noise import sample_noise
from distvae.scores import evaluate

SEED = 20261203


def setup(*overrides: str, count: int = 8, batch: int = 8):
    cfg = load_config("tiny", list(overrides))
    torch.manual_seed(SEED)
    model = build_model(cfg.model).eval()
    images = torch.rand(count, 3, 32, 32, generator=torch.Generator().manual_seed(SEED + 1))
    return cfg, model, batches_of(images, batch), images


def batches_of(images, batch, cond=None):
    """(images, cond, global positions) in batches, as `distvae evaluate` feeds them."""
    positions = torch.arange(len(images))
    return [(images[i : i + batch], None if cond is None else cond[i : i + batch], positions[i : i + batch])
            for i in range(0, len(images), batch)]


def test_elbo_mse_and_psnr_equal_a_direct_computation():
    print(f"seed {SEED}")
    cfg, model, batches, images = setup()
    result = evaluate(model, cfg, batches, iw=1, seed=5)
    with torch.no_grad():
        mean, logvar = model.encode(images)
        logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        eps = sample_noise(5, 0, torch.arange(len(images)), model.latent_dim)  # draw 0 of each image
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


def test_figures_do_not_depend_on_how_the_split_is_cut_into_batches_or_processes():
    """Each image's noise is keyed by its position: 2 ranks' halves summed equal one pass (float rounding)."""
    cfg, model, _, images = setup(count=48)
    one = evaluate(model, cfg, batches_of(images, 48), iw=4, seed=2)
    small = evaluate(model, cfg, batches_of(images, 5), iw=4, seed=2)
    # Two "ranks": each evaluates its contiguous half; the reduction adds the other rank's sums.
    halves = [batches_of(images, 16)[:1] + batches_of(images, 16)[1:2], batches_of(images, 16)[2:]]
    sums = []
    evaluate(model, cfg, halves[1], iw=4, seed=2, reduce=lambda flat: sums.append(flat) or flat)
    two = evaluate(model, cfg, halves[0], iw=4, seed=2, reduce=lambda flat: flat + sums[0])
    other_seed = evaluate(model, cfg, batches_of(images, 48), iw=4, seed=3)
    for key in ("neg_elbo_nats", "mc_elbo_nats", "iw_nats", "recon_mse", "psnr", "ssim", "active_units"):
        assert small[key] == pytest.approx(one[key], rel=1e-6) and two[key] == pytest.approx(one[key], rel=1e-6), key
    assert two["images"] == 48 and two["kl_per_dim"] == pytest.approx(one["kl_per_dim"], rel=1e-6)
    # Control: another seed moves the sampled bound by 10x the tolerance or more.
    assert abs(other_seed["mc_elbo_nats"] - one["mc_elbo_nats"]) > 1e-5 * abs(one["mc_elbo_nats"])
    print(f"seed {SEED}: mc elbo {one['mc_elbo_nats']:.6f} (seed 3: {other_seed['mc_elbo_nats']:.6f})")


def test_a_conditional_model_is_scored_with_each_images_attributes():
    cfg, model, _, images = setup("model.cond_dim=4", count=16)
    cond = torch.randint(0, 2, (16, 4), generator=torch.Generator().manual_seed(SEED)).float()
    result = evaluate(model, cfg, batches_of(images, 8, cond), seed=1)
    with torch.no_grad():
        mean, _ = model.encode(images, cond)
        mse = (model.decode(mean, cond) - images).square().flatten(1).mean(dim=1).mean().item()
        other = (model.decode(mean, 1 - cond) - images).square().flatten(1).mean(dim=1).mean().item()
    assert result["recon_mse"] == pytest.approx(mse, rel=1e-6)
    assert abs(other - mse) > 1e-6 * mse  # control: the attributes change the reconstruction


def test_fid_takes_the_first_fid_images_inputs_their_reconstructions_and_prior_samples():
    from test_quality import stand_in

    from distvae.quality import FID

    cfg, model, _, images = setup(count=40)
    result = evaluate(model, cfg, batches_of(images, 16), fid=FID(feature=stand_in()), fid_images=24)
    direct = FID(feature=stand_in())
    with torch.no_grad():
        mean, _ = model.encode(images[:24])
        direct.update(images[:24], model.decode(mean).clamp(0, 1))
        direct.update_samples(model.decode(sample_noise(0, 1 << 20, torch.arange(24), model.latent_dim)))
    expected = direct.compute()
    print(f"seed {SEED}: FID recon {result['fid_recon']:.4f}, samples {result['fid_samples']:.4f}")
    assert result["fid_recon"] == pytest.approx(expected["fid_recon"], rel=1e-5)
    assert result["fid_samples"] == pytest.approx(expected["fid_samples"], rel=1e-5)
    assert result["fid_samples"] != pytest.approx(result["fid_recon"], rel=1e-3)
