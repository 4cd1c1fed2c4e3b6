import math

import pytest
import torch

from distvae.config import LossConfig
from distvae.loss import elbo, kl_divergence, kl_weight_at


def small_batch():
    x = torch.tensor([[[[0.0, 1.0], [0.5, 0.25]]]])  # 1 image, 1 channel, 2x2
    recon = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]]]])
    mean = torch.tensor([[1.0, -2.0]])
    logvar = torch.tensor([[0.0, math.log(4.0)]])
    return recon, x, mean, logvar


def test_terms_against_hand_computed_values():
    recon, x, mean, logvar = small_batch()
    squared = [0.25, 0.25, 0.0, 0.0625]
    kl = 0.5 * (1.0 + 1.0 - 1.0 - 0.0) + 0.5 * (4.0 + 4.0 - 1.0 - math.log(4.0))
    terms = elbo(recon, x, mean, logvar, LossConfig(reduction="sum", kl_weight=0.5))
    assert terms.recon.item() == pytest.approx(sum(squared))
    assert terms.kl.item() == pytest.approx(kl)
    assert terms.total.item() == pytest.approx(sum(squared) + 0.5 * kl)
    terms = elbo(recon, x, mean, logvar, LossConfig(reduction="mean", kl_weight=0.5))
    assert terms.recon.item() == pytest.approx(sum(squared) / 4)
    assert terms.kl.item() == pytest.approx(kl)


def test_bce_against_hand_computed_values():
    recon, x, mean, logvar = small_batch()
    p, t = recon.flatten().tolist(), x.flatten().tolist()
    bce = sum(-(ti * math.log(pi) + (1 - ti) * math.log(1 - pi)) for pi, ti in zip(p, t))
    terms = elbo(recon, x, mean, logvar, LossConfig(recon="bce", reduction="sum", kl_weight=0.0))
    assert terms.recon.item() == pytest.approx(bce, rel=1e-6)
    assert terms.total.item() == pytest.approx(bce, rel=1e-6)


def test_sum_and_mean_reductions_agree_when_kl_weight_is_scaled():
    torch.manual_seed(0)
    recon, x = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    mean, logvar = torch.randn(4, 6), torch.randn(4, 6)
    pixels = 3 * 8 * 8
    total_sum = elbo(recon, x, mean, logvar, LossConfig(reduction="sum", kl_weight=2.0)).total
    total_mean = elbo(recon, x, mean, logvar, LossConfig(reduction="mean", kl_weight=2.0 / pixels)).total
    assert total_sum.item() == pytest.approx(total_mean.item() * pixels, rel=1e-5)


def test_kl_warmup_is_linear():
    cfg = LossConfig(kl_weight=2.0, kl_warmup_steps=100)
    assert [kl_weight_at(cfg, s) for s in (0, 50, 100, 1000)] == [0.0, 1.0, 2.0, 2.0]


def test_extreme_values_stay_finite_under_bf16_autocast():
    recon = torch.rand(2, 3, 4, 4, dtype=torch.bfloat16)
    x = torch.rand(2, 3, 4, 4)
    mean = torch.full((2, 8), 1e3, dtype=torch.bfloat16)
    logvar = torch.tensor([[1e4] * 4 + [-1e4] * 4] * 2, dtype=torch.bfloat16)
    naive = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(dim=1)
    assert not torch.isfinite(naive).all()  # what an unclamped bf16 KL does
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = elbo(recon, x, mean, logvar, LossConfig(kl_weight=1.0))
    assert terms.total.dtype == torch.float32
    assert torch.isfinite(terms.total) and torch.isfinite(terms.kl)
    expected_kl_per_image = 0.5 * 4 * (1e6 + math.exp(20) - 1 - 20) + 0.5 * 4 * (1e6 + math.exp(-30) - 1 + 30)
    assert terms.kl.item() == pytest.approx(expected_kl_per_image, rel=1e-3)


def test_kl_is_computed_in_fp32():
    mean = torch.randn(3, 5, dtype=torch.bfloat16)
    logvar = torch.randn(3, 5, dtype=torch.bfloat16)
    assert kl_divergence(mean, logvar).dtype == torch.float32


def test_gradients_flow_through_both_terms():
    recon = torch.rand(2, 3, 4, 4, requires_grad=True)
    mean = torch.randn(2, 4, requires_grad=True)
    logvar = torch.randn(2, 4, requires_grad=True)
    elbo(recon, torch.rand(2, 3, 4, 4), mean, logvar, LossConfig()).total.backward()
    assert recon.grad.abs().sum() > 0 and mean.grad.abs().sum() > 0 and logvar.grad.abs().sum() > 0


def test_free_bits_floors_each_dimensions_batch_mean_kl_in_the_objective_only():
    """Two images, three dimensions, logvar 0 so KL_j = mean_j^2 / 2. Batch means of KL per dimension:
    dim 0: (2 + 0) / 2 = 1.0, dim 1: (0.125 + 0.125) / 2 = 0.125, dim 2: 0. With a floor of 0.25 nats the
    objective's KL is 1.0 + 0.25 + 0.25 = 1.5; the reported KL stays 1.125."""
    x = torch.zeros(2, 1, 2, 2)
    recon = torch.full((2, 1, 2, 2), 0.5)  # squared error 4 * 0.25 = 1 per image
    mean = torch.tensor([[2.0, 0.5, 0.0], [0.0, -0.5, 0.0]], requires_grad=True)
    logvar = torch.zeros(2, 3)
    plain = elbo(recon, x, mean, logvar, LossConfig(reduction="sum", kl_weight=2.0))
    floored = elbo(recon, x, mean, logvar, LossConfig(reduction="sum", kl_weight=2.0, free_bits=0.25))
    assert plain.kl.item() == pytest.approx(1.125) and floored.kl.item() == pytest.approx(1.125)
    assert plain.total.item() == pytest.approx(1.0 + 2.0 * 1.125)
    assert floored.total.item() == pytest.approx(1.0 + 2.0 * 1.5)
    # Under the floor a dimension gets no KL gradient; above it, the plain one: d/dmean of w * mean^2 / (2 * 2).
    (grad,) = torch.autograd.grad(floored.total, mean)
    assert torch.allclose(grad, torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    (grad,) = torch.autograd.grad(plain.total, mean)
    assert torch.allclose(grad, torch.tensor([[2.0, 0.5, 0.0], [0.0, -0.5, 0.0]]))  # the control: floors bite


def test_free_bits_must_not_be_negative():
    with pytest.raises(ValueError, match="loss.free_bits"):
        LossConfig(free_bits=-0.1)
