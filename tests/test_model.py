import hashlib
import math
import re

import pytest
import torch

from distvae.config import load_config
from distvae.info import activation_bytes_per_image, layer_table, saved_bytes_per_image
from distvae.model import ConvVAE, SelfAttention, build_model

TINY_SEED0_DIGEST = "7c293aecc3dfc4b4"  # the plain model before the family, seed 0


@pytest.mark.parametrize(
    "resolution, channels, hiddens",
    [(28, 1, [32, 64]), (64, 3, [16, 32, 64, 128, 256]), (128, 3, [16, 32, 64, 64, 128, 128]),
     (256, 3, [8, 16, 16, 32, 32, 64, 64])],
)
def test_shapes(resolution, channels, hiddens):
    model = ConvVAE(resolution=resolution, channels=channels, hiddens=hiddens, latent_dim=16)
    x = torch.rand(2, channels, resolution, resolution)
    recon, mean, logvar = model(x)
    assert recon.shape == x.shape
    assert mean.shape == logvar.shape == (2, 16)
    assert model.sample(3).shape == (3, channels, resolution, resolution)


def reference_parameter_count() -> int:
    """The layer list of the tutorial model in DESIGN.md, counted by hand."""
    conv = lambda c_in, c_out: c_in * c_out * 3 * 3 + c_out  # noqa: E731  (conv and transposed conv alike)
    bn = lambda c: 2 * c  # noqa: E731
    linear = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731
    widths = [16, 32, 64, 128, 256]
    total, previous = 0, 3
    for width in widths:  # encoder: Conv(stride 2) + BN per width
        total += conv(previous, width) + bn(width)
        previous = width
    total += 2 * linear(256 * 2 * 2, 128)  # mean and logvar heads
    total += linear(128, 256 * 2 * 2)  # decoder input
    for wide, narrow in [(256, 128), (128, 64), (64, 32), (32, 16)]:
        total += conv(wide, narrow) + bn(narrow)
    total += conv(16, 16) + bn(16) + conv(16, 3)  # last up-stage, then the RGB conv
    return total


def test_reference_model_matches_the_tutorial():
    model = build_model(load_config("reference").model)
    assert sum(p.numel() for p in model.parameters()) == reference_parameter_count() == 1_183_283
    kinds = [type(m).__name__ for m in model.decoder]
    assert kinds[-2:] == ["Conv2d", "ReLU"]  # the reference's unbounded final ReLU
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride, c.padding) for c in convs] == [
        (3, 16, (2, 2), (1, 1)), (16, 32, (2, 2), (1, 1)), (32, 64, (2, 2), (1, 1)),
        (64, 128, (2, 2), (1, 1)), (128, 256, (2, 2), (1, 1))]
    assert model.mean_head.in_features == 1024 and model.decoder_input.out_features == 1024


def test_conditional_samples_depend_on_the_condition():
    torch.manual_seed(0)
    model = ConvVAE(resolution=32, hiddens=[8, 16], latent_dim=8, cond_dim=40).eval()
    cond_a, cond_b = torch.zeros(4, 40), torch.zeros(4, 40)
    cond_b[:, 31] = 1.0  # "Smiling"
    same_noise = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    a1 = model.sample(4, cond_a, generator=same_noise())
    a2 = model.sample(4, cond_a, generator=same_noise())
    b = model.sample(4, cond_b, generator=same_noise())
    assert torch.equal(a1, a2)
    assert (a1 - b).abs().mean() > 1e-4
    recon, _, _ = model(torch.rand(4, 3, 32, 32), cond_b)
    assert recon.shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="conditional"):
        model.sample(2)


def test_output_activations():
    x = torch.rand(2, 3, 16, 16)
    sig = ConvVAE(resolution=16, hiddens=[4, 8], latent_dim=4, output="sigmoid")(x)[0]
    assert sig.min() >= 0 and sig.max() <= 1
    relu = ConvVAE(resolution=16, hiddens=[4, 8], latent_dim=4, output="relu")(x)[0]
    assert relu.min() >= 0


def test_logvar_is_clamped():
    model = ConvVAE(resolution=16, hiddens=[4, 8], latent_dim=4)
    with torch.no_grad():
        model.logvar_head.bias.fill_(1e4)
    _, _, logvar = model(torch.rand(2, 3, 16, 16))
    assert logvar.max() <= 20.0


def test_info_activation_memory_counts_every_layer_output():
    cfg = load_config("tiny").model
    rows = layer_table(cfg)
    assert rows[0].output_shape == (16, 16, 16)  # first conv of the 32 px tiny model
    assert sum(r.params for r in rows) == sum(p.numel() for p in build_model(cfg).parameters())
    # first stage alone: conv + BN + ReLU outputs of 16x16x16 floats
    assert activation_bytes_per_image(rows[:3], 4) == 3 * 16 * 16 * 16 * 4


# ------------------------------------------------------------------------------------------------------
# The family: arch plain | resnet, attention, latent vector | spatial (issue 12)

VARIANTS = {  # name: ConvVAE keyword arguments beyond resolution and hiddens
    "plain_vector": dict(),
    "plain_spatial": dict(latent="spatial", latent_channels=4),
    "resnet_vector": dict(arch="resnet", norm="group", blocks_per_stage=1),
    "resnet_attention_spatial": dict(arch="resnet", norm="group", blocks_per_stage=1, latent="spatial",
                                     latent_channels=3, attention="bottom"),
}
SIZES = {32: [8, 16], 64: [8, 16, 16], 128: [8, 16, 16], 256: [8, 8, 16, 16]}


def variant(name: str, resolution: int, **extra) -> ConvVAE:
    options = dict(VARIANTS[name])
    hiddens = SIZES[resolution]
    if options.pop("attention", None):
        options["attention_resolution"] = resolution // 2 ** len(hiddens)
    return ConvVAE(resolution=resolution, hiddens=hiddens, latent_dim=16, **options, **extra)


@pytest.mark.parametrize("resolution", sorted(SIZES))
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_at_every_resolution_encodes_decodes_and_samples(name, resolution):
    torch.manual_seed(0)
    model = variant(name, resolution)
    bottom = resolution // 2 ** len(SIZES[resolution])
    expected = (16,) if "vector" in name else (VARIANTS[name]["latent_channels"], bottom, bottom)
    assert model.latent_shape == expected and model.latent_dim == math.prod(expected)
    x = torch.rand(2, 3, resolution, resolution)
    recon, mean, logvar = model(x)
    assert recon.shape == x.shape and mean.shape == logvar.shape == (2, math.prod(expected))
    assert 0 <= recon.min() and recon.max() <= 1  # the sigmoid head
    assert model.sample(3).shape == (3, 3, resolution, resolution)
    count = sum(p.numel() for p in model.parameters())
    assert sum(row.params for row in layer_table(config_of(name, resolution))) == count
    print(f"{name} {resolution} px: {count:,} parameters, latent {expected}")


def config_of(name: str, resolution: int):
    options = dict(VARIANTS[name])
    hiddens = SIZES[resolution]
    if options.pop("attention", None):
        options["attention_resolution"] = resolution // 2 ** len(hiddens)
    overrides = [f"model.resolution={resolution}", f"model.hiddens={hiddens}".replace(" ", ""), "model.latent_dim=16"]
    overrides += [f"model.{key}={value}" for key, value in options.items()]
    return load_config("tiny", overrides).model


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_is_conditional_on_request(name):
    torch.manual_seed(0)
    model = variant(name, 32, cond_dim=5).eval()
    cond_a, cond_b = torch.zeros(2, 5), torch.zeros(2, 5)
    cond_b[:, 3] = 1.0
    a = model.sample(2, cond_a, generator=torch.Generator().manual_seed(1))
    b = model.sample(2, cond_b, generator=torch.Generator().manual_seed(1))
    assert (a - b).abs().mean() > 1e-4
    mean_a, _ = model.encode(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)), cond_a)
    mean_b, _ = model.encode(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)), cond_b)
    assert not torch.equal(mean_a, mean_b)  # the encoder sees the condition too
    with pytest.raises(ValueError, match="conditional"):
        model.sample(2)


def test_a_resnet_parameter_count_derived_by_hand():
    """resnet, 32 px, hiddens [8, 16], one block per stage, attention at 8 px, a vector latent of 4."""
    conv = lambda c_in, c_out, k=3: c_in * c_out * k * k + c_out  # noqa: E731
    group_norm = lambda c: 2 * c  # noqa: E731
    linear = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731
    block = lambda c_in, c_out: (group_norm(c_in) + conv(c_in, c_out) + group_norm(c_out) + conv(c_out, c_out)  # noqa: E731
                                 + (conv(c_in, c_out, 1) if c_in != c_out else 0))
    attention = lambda c: group_norm(c) + conv(c, 3 * c, 1) + conv(c, c, 1)  # noqa: E731
    encoder = conv(3, 8)  # conv in
    encoder += block(8, 8) + conv(8, 8)  # stage 1: 32 -> 16
    encoder += block(8, 16) + conv(16, 16) + attention(16)  # stage 2: 16 -> 8, attention at 8 px
    encoder += group_norm(16)
    heads = 2 * linear(16 * 8 * 8, 4) + linear(4, 16 * 8 * 8)
    decoder = attention(16) + block(16, 16) + conv(16, 16, 4)  # 8 -> 16 (transposed 4x4)
    decoder += block(16, 8) + conv(8, 8, 4)  # 16 -> 32
    decoder += group_norm(8) + conv(8, 3)
    model = ConvVAE(resolution=32, hiddens=[8, 16], latent_dim=4, arch="resnet", norm="group", blocks_per_stage=1,
                    attention_resolution=8)
    assert sum(p.numel() for p in model.parameters()) == encoder + heads + decoder == 35_611
    assert sum(isinstance(m, SelfAttention) for m in model.modules()) == 2


def test_the_plain_arch_keeps_its_state_dict_keys_and_its_initial_weights():
    """Checkpoints written before the family existed load as they are: the keys of the reference model, and
    (built in the same order) the same initial weights for a seed, here pinned by a digest."""
    model = build_model(load_config("reference").model)
    keys = list(model.state_dict())
    assert len(keys) == 78 and hashlib.sha256(" ".join(keys).encode()).hexdigest()[:16] == "d97143c71f85b8c1"
    torch.manual_seed(0)
    weights = build_model(load_config("tiny").model).state_dict()
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in weights.values())).hexdigest()[:16]
    assert digest == TINY_SEED0_DIGEST, digest


@pytest.mark.parametrize("overrides, message", [
    (["model.arch=resnet"], "model.arch=resnet normalises with GroupNorm: set model.norm=group"),
    (["model.attention_resolution=8"], "needs model.arch=resnet"),
    (["model.arch=resnet", "model.norm=group", "model.attention_resolution=6"], "choose one of 16, 8, 4"),
    (["model.arch=resnet", "model.norm=group", "model.blocks_per_stage=0"], "model.blocks_per_stage=0 must be >= 1"),
    (["model.latent=grid"], "model.latent='grid' is not allowed"),
    (["model.arch=unet"], "model.arch='unet' is not allowed"),
])
def test_family_config_errors_name_the_key(overrides, message):
    from distvae.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("tiny", overrides)


def test_a_spatial_latent_size_is_channels_times_the_bottom_squared():
    cfg = load_config("tiny", ["model.latent=spatial", "model.latent_channels=4"]).model
    assert cfg.latent_size == 4 * (32 // 8) ** 2 == build_model(cfg).latent_dim
    assert load_config("tiny").model.latent_size == 32


def test_info_counts_what_autograd_saves_as_a_real_forward_does():
    for name in ("plain_vector", "resnet_attention_spatial"):
        cfg = config_of(name, 32)
        on_meta, on_cpu = saved_bytes_per_image(cfg), saved_bytes_per_image(cfg, device="cpu")
        print(f"{name}: {on_meta:,} bytes saved per image on meta, {on_cpu:,} on CPU")
        assert on_meta == on_cpu > 0
    assert saved_bytes_per_image(config_of("resnet_vector", 32)) > saved_bytes_per_image(config_of("plain_vector", 32))


def test_activation_checkpointing_gives_bitwise_equal_gradients_and_is_refused_for_the_plain_arch():
    from distvae.config import ConfigError

    torch.manual_seed(0)
    model = ConvVAE(resolution=32, hiddens=[8, 16], latent_dim=8, arch="resnet", norm="group", blocks_per_stage=1,
                    attention_resolution=8, latent="spatial", latent_channels=2, cond_dim=3)
    generator = torch.Generator().manual_seed(1)
    images, cond = torch.rand(4, 3, 32, 32, generator=generator), torch.rand(4, 3, generator=generator)
    eps = torch.randn(4, model.latent_dim, generator=generator)

    def gradients(checkpointed: bool) -> list[torch.Tensor]:
        model.zero_grad()
        model.checkpoint_stages = checkpointed
        recon, mean, logvar = model(images, cond, eps)
        (recon.square().sum() + mean.square().sum() + logvar.exp().sum()).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain, checkpointed = gradients(False), gradients(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, checkpointed))
    assert not list(model.buffers())  # GroupNorm keeps no running statistics to update twice
    model.checkpoint_stages = False
    other = gradients(False)
    images.mul_(0.5)  # the control: another input gives other gradients, so equality above means something
    assert not all(torch.equal(a, b) for a, b in zip(other, gradients(False)))
    with pytest.raises(ConfigError, match="needs model.arch=resnet"):
        load_config("tiny", ["train.activation_checkpointing=true"])
