import pytest
import torch

from distvae.config import load_config
from distvae.info import activation_bytes_per_image, layer_table
from distvae.model import ConvVAE, build_model


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
