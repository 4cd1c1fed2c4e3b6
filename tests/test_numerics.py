"""Numbers the model and the loss must get right: the fp32 bottleneck under bf16 autocast, given noise,
a graph without breaks for torch.compile, the ELBO by hand, and the config's number checks."""

import math

import pytest
import torch

from distvae.config import ConfigError, LossConfig, load_config
from distvae.loss import elbo, negative_elbo
from distvae.model import ConvVAE

SEED = 20240607


def tiny_model(cond_dim: int = 0) -> ConvVAE:
    torch.manual_seed(SEED)
    return ConvVAE(resolution=16, hiddens=[8, 16], latent_dim=4, cond_dim=cond_dim)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference.double()).norm() / reference.double().norm())


# ---------------------------------------------------------------------------------------------------------
# The fp32 latent bottleneck under bf16 autocast


def test_reparameterize_keeps_a_small_std_next_to_a_large_mean_under_bf16():
    print(f"seed {SEED}")
    generator = torch.Generator().manual_seed(SEED)
    sign = torch.randint(0, 2, (8, 16), generator=generator) * 2 - 1
    mean = sign * (900.0 + 100.0 * torch.rand(8, 16, generator=generator))  # |mean| in [900, 1000)
    std = 1e-3 * mean.abs()
    logvar = 2.0 * torch.log(std)
    eps = torch.randn(8, 16, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = ConvVAE.reparameterize(mean, logvar, eps)
    assert z.dtype == torch.float32
    fp32_error = relative_error(z - mean, std * eps)
    # Control: the same sum in bf16 (8 bits of mantissa, a step of 4 near 1000) loses std * eps.
    bf16_error = relative_error(mean.bfloat16().float() + (std * eps).bfloat16().float() - mean, std * eps)
    print(f"relative error of z - mean: fp32 {fp32_error:.2e}, bf16 {bf16_error:.2e}")
    assert fp32_error < 1e-4
    assert bf16_error > 1e-2


def dtypes_seen(modules: dict[str, torch.nn.Module], run) -> tuple[dict[str, torch.dtype], object]:
    """The output dtype of each module while `run()` runs under bf16 autocast, and what `run()` returned."""
    seen, hooks = {}, []
    for name, module in modules.items():
        hooks.append(module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.dtype)))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            result = run()
    finally:
        for hook in hooks:
            hook.remove()
    return seen, result


def test_decode_runs_the_first_linear_layer_in_fp32_and_the_convolutions_in_bf16():
    model = tiny_model()
    z = torch.randn(2, 4, generator=torch.Generator().manual_seed(SEED))
    seen, recon = dtypes_seen({"decoder_input": model.decoder_input, "first_deconv": model.decoder[0]},
                              lambda: model.decode(z))
    assert isinstance(model.decoder[0], torch.nn.ConvTranspose2d)
    assert seen == {"decoder_input": torch.float32, "first_deconv": torch.bfloat16}
    assert recon.shape == (2, 3, 16, 16)


def test_encode_returns_fp32_heads_while_the_first_convolution_runs_in_bf16():
    model = tiny_model()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(SEED))
    modules = {"first_conv": model.encoder[0], "mean_head": model.mean_head, "logvar_head": model.logvar_head}
    seen, (mean, logvar) = dtypes_seen(modules, lambda: model.encode(x))
    assert isinstance(model.encoder[0], torch.nn.Conv2d)
    assert seen == {"first_conv": torch.bfloat16, "mean_head": torch.float32, "logvar_head": torch.float32}
    assert (mean.dtype, logvar.dtype) == (torch.float32, torch.float32)


# ---------------------------------------------------------------------------------------------------------
# The noise is an argument


def test_forward_with_eps_is_deterministic_and_without_eps_uses_the_global_generator():
    model = tiny_model().train()
    generator = torch.Generator().manual_seed(SEED)
    x = torch.rand(3, 3, 16, 16, generator=generator)
    eps = torch.randn(3, 4, generator=generator)
    first, again = model(x, eps=eps), model(x, eps=eps)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    other = model(x, eps=torch.randn(3, 4, generator=generator))  # control: the noise does reach the output
    assert not torch.equal(first[0], other[0]) and torch.equal(first[1], other[1])
    # The given eps is the noise: decode(mean + std * eps) is the reconstruction.
    z = ConvVAE.reparameterize(first[1], first[2], eps)
    assert torch.equal(model.decode(z), first[0])

    torch.manual_seed(7)
    drawn = model(x)
    state_after = torch.get_rng_state()
    torch.manual_seed(7)
    assert all(torch.equal(a, b) for a, b in zip(drawn, model(x)))
    torch.manual_seed(7)
    expected_eps = torch.randn(3, 4)  # randn_like(mean): the first draw from the global generator
    assert torch.equal(drawn[0], model(x, eps=expected_eps)[0])
    torch.manual_seed(7)
    assert not torch.equal(state_after, torch.get_rng_state())  # the forward did draw from it
    torch.manual_seed(8)
    assert not torch.equal(drawn[0], model(x)[0])  # control: another seed, other noise


# ---------------------------------------------------------------------------------------------------------
# torch.compile friendliness


def noise_from_a_generator(x, generator):
    y = x * 2
    return y + torch.randn(x.shape, generator=generator)


def noise_from_a_generator_first(x, generator):
    return x + torch.randn(x.shape, generator=generator)


def test_forward_is_one_graph_for_dynamo():
    torch._dynamo.reset()
    model = tiny_model(cond_dim=2).train()
    generator = torch.Generator().manual_seed(SEED)
    x, cond = torch.rand(2, 3, 16, 16, generator=generator), torch.rand(2, 2, generator=generator)
    eps = torch.randn(2, 4, generator=generator)
    try:
        explained = torch._dynamo.explain(model)(x, cond, eps)
        # explain() misses a break at the very start of a frame (see the control below); fullgraph=True
        # raises on any break. The eager backend traces with dynamo and runs the graph as is (no inductor).
        compiled = torch.compile(model, fullgraph=True, backend="eager")(x, cond, eps)
    finally:
        torch._dynamo.reset()
    reasons = [str(reason) for reason in explained.break_reasons]
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), reasons
    for a, b in zip(compiled, model(x, cond, eps)):
        assert torch.equal(a, b)

    # Control: a torch.Generator inside the traced code does break the graph (why eps is an argument).
    try:
        broken = torch._dynamo.explain(noise_from_a_generator)(torch.zeros(3), torch.Generator().manual_seed(0))
        print(f"control: {broken.graph_break_count} break(s): {[str(r.reason)[:60] for r in broken.break_reasons]}")
        assert broken.graph_break_count > 0
        # With nothing traced before it, explain() reports 0 breaks in torch 2.14; fullgraph still refuses it.
        with pytest.raises(torch._dynamo.exc.Unsupported):
            torch.compile(noise_from_a_generator_first, fullgraph=True, backend="eager")(
                torch.zeros(3), torch.Generator().manual_seed(0))
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------------
# negative_elbo by hand

# 2 images of 1x2x2 (D = 4), latent 2
RECON = [[0.2, 0.7, 0.5, 0.9], [0.1, 0.4, 0.6, 0.3]]
TARGET = [[0.0, 1.0, 0.25, 1.0], [0.5, 0.5, 1.0, 0.0]]
MEAN = [[0.5, -1.0], [2.0, 0.0]]
LOGVAR = [[0.0, -2.0], [1.0, 0.5]]
D, LATENT = 4, 2


def tensors():
    shape = (2, 1, 2, 2)
    return (torch.tensor(RECON).view(shape), torch.tensor(TARGET).view(shape), torch.tensor(MEAN),
            torch.tensor(LOGVAR))


def kl_by_hand(i: int, minus_one: bool = True) -> float:
    return sum(0.5 * (MEAN[i][j] ** 2 + math.exp(LOGVAR[i][j]) - (1.0 if minus_one else 0.0) - LOGVAR[i][j])
               for j in range(LATENT))


def sse_by_hand(i: int) -> float:
    return sum((RECON[i][k] - TARGET[i][k]) ** 2 for k in range(D))


def bce_by_hand(i: int) -> float:
    return sum(-(TARGET[i][k] * math.log(RECON[i][k]) + (1 - TARGET[i][k]) * math.log(1 - RECON[i][k]))
               for k in range(D))


def gaussian_by_hand(i: int, variance: float) -> float:
    return sse_by_hand(i) / (2 * variance) + D / 2 * math.log(2 * math.pi * variance) + kl_by_hand(i)


TOLERANCE = 1e-5  # relative, fp32 against Python doubles


def assert_close(values, expected: list[float], mistakes: list[list[float]]) -> None:
    got = values.tolist()
    print(f"got {got}, expected {expected}")
    for value, want in zip(got, expected, strict=True):
        assert abs(value - want) <= TOLERANCE * abs(want)
    for wrong in mistakes:  # control: each plausible mistake is far outside the tolerance
        assert max(abs(w - e) / abs(e) for w, e in zip(wrong, expected)) > 100 * TOLERANCE


@pytest.mark.parametrize(("reduction", "kl_weight", "variance"), [("sum", 2.0, 1.0), ("sum", 0.5, 0.25),
                                                                 ("mean", 0.125, 0.25), ("mean", 0.5, 1.0)])
def test_negative_elbo_gaussian_by_hand(reduction, kl_weight, variance):
    # sum: sigma^2 = w / 2; mean: sigma^2 = w * D / 2 (D = 4 values per image)
    cfg = LossConfig(recon="mse", reduction=reduction, kl_weight=kl_weight)
    expected = [gaussian_by_hand(i, variance) for i in range(2)]
    mistakes = [
        [gaussian_by_hand(i, 2 * variance) for i in range(2)],  # sigma^2 = w (or w * D)
        [gaussian_by_hand(i, variance) + 0.5 * LATENT for i in range(2)],  # KL without the -1
        [gaussian_by_hand(i, variance) - D / 2 * math.log(2 * math.pi * variance) for i in range(2)],  # no constant
    ]
    if reduction == "mean":
        mistakes.append([gaussian_by_hand(i, variance / D) for i in range(2)])  # the pixel count forgotten
    assert_close(negative_elbo(*tensors(), cfg), expected, mistakes)


def test_negative_elbo_bernoulli_by_hand():
    cfg = LossConfig(recon="bce", reduction="sum", kl_weight=3.0)  # kl_weight does not enter the real ELBO
    expected = [bce_by_hand(i) + kl_by_hand(i) for i in range(2)]
    mistakes = [[bce_by_hand(i) + 3.0 * kl_by_hand(i) for i in range(2)], [bce_by_hand(i) / D + kl_by_hand(i)
                                                                          for i in range(2)]]
    assert_close(negative_elbo(*tensors(), cfg), expected, mistakes)
    mean_cfg = LossConfig(recon="bce", reduction="mean", kl_weight=0.01)  # the reduction does not either
    assert_close(negative_elbo(*tensors(), mean_cfg), expected, mistakes)


def test_negative_elbo_is_none_without_an_implied_variance():
    assert negative_elbo(*tensors(), LossConfig(recon="mse", reduction="sum", kl_weight=0.0)) is None
    assert negative_elbo(*tensors(), LossConfig(recon="mse", reduction="mean", kl_weight=0.0)) is None
    assert negative_elbo(*tensors(), LossConfig(recon="bce", reduction="sum", kl_weight=0.0)) is not None


@pytest.mark.parametrize(("reduction", "kl_weight"), [("sum", 2.0), ("sum", 0.5), ("sum", 3.07), ("mean", 0.25)])
def test_negative_elbo_is_the_training_loss_up_to_scale_and_constant(reduction, kl_weight):
    # sum: loss = mean_i(SSE_i) + w * mean_i(KL_i), sigma^2 = w / 2, so
    #   mean_i(-ELBO_i) = mean_i(SSE_i / w + KL_i) + (D / 2) log(2 pi w / 2) = loss / w + (D / 2) log(pi w).
    # mean: loss = mean_i(SSE_i) / D + w * mean_i(KL_i), sigma^2 = w D / 2: the same with w D in the log.
    cfg = LossConfig(recon="mse", reduction=reduction, kl_weight=kl_weight, kl_warmup_steps=0)
    loss = elbo(*tensors(), cfg, step=0).total.item()
    scale = kl_weight * (D if reduction == "mean" else 1)
    predicted = loss / kl_weight + D / 2 * math.log(math.pi * scale)
    got = negative_elbo(*tensors(), cfg).mean().item()
    print(f"loss {loss}, mean -ELBO {got}, predicted {predicted}")
    assert abs(got - predicted) <= TOLERANCE * abs(predicted)
    assert abs(loss / kl_weight - got) > 100 * TOLERANCE * abs(predicted)  # control: the constant matters


# ---------------------------------------------------------------------------------------------------------
# Config number checks


@pytest.mark.parametrize(("override", "key"), [
    ("train.lr=nan", "train.lr"),
    ("train.lr=inf", "train.lr"),
    ("train.lr=-inf", "train.lr"),
    ("train.min_lr_ratio=1.5", "train.min_lr_ratio"),
    ("train.min_lr_ratio=nan", "train.min_lr_ratio"),
    ("train.beta2=1.2", "train.beta2"),
    ("train.beta1=-0.1", "train.beta1"),
    ("data.max_bad_fraction=2", "data.max_bad_fraction"),
    ("data.max_bad_fraction=nan", "data.max_bad_fraction"),
    ("data.crop=-3", "data.crop"),
    ("data.crop=12px", "data.crop"),
    ("data.bad_window=0", "data.bad_window"),
    ("data.read_timeout_s=0", "data.read_timeout_s"),
    ("data.read_timeout_s=inf", "data.read_timeout_s"),
    ("train.collective_timeout_s=0.5", "train.collective_timeout_s"),
    ("run.lock_stale_s=5", "run.lock_stale_s"),
    ("loss.kl_weight=nan", "loss.kl_weight"),
])
def test_config_rejects_impossible_numbers(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as caught:
        load_config("tiny", [override])
    assert len(str(caught.value).splitlines()) == 1


def test_config_rejects_a_warmup_longer_than_the_run():
    with pytest.raises(ConfigError, match=r"train\.warmup_steps=100 is more than train\.max_steps=50"):
        load_config("tiny", ["train.warmup_steps=100", "train.max_steps=50"])


def test_config_accepts_the_boundaries():
    # control: the same keys at their allowed edges load, so each rejection above is the value's doing
    cfg = load_config("tiny", ["train.lr=0", "train.min_lr_ratio=1", "train.beta2=0", "train.beta1=1",
                               "data.max_bad_fraction=1", "data.max_bad_fraction=0", "data.crop=0", "data.crop=168",
                               "train.warmup_steps=50", "train.max_steps=50", "data.bad_window=1",
                               "data.read_timeout_s=0.1", "train.collective_timeout_s=1", "run.lock_stale_s=10"])
    assert (cfg.train.warmup_steps, cfg.train.max_steps, cfg.data.crop, cfg.data.max_bad_fraction) == (50, 50, "168", 0)
