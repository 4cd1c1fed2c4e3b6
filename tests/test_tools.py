"""After training: sample, reconstruct, interpolate and export from a checkpoint of a 2-process bf16 run."""

import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_train import base_args, command, run

from distvae import ConvVAE
from distvae.tools import load_checkpoint, slerp

pytestmark = pytest.mark.slow
RES = 32  # the tiny config


@pytest.fixture(scope="module")
def trained(npy32_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tools") / "run"
    args = base_args(npy32_shards, run_dir, "train.mixed_precision=bf16", "train.ema_decay=0.9", "train.max_steps=12")
    result = run(command(args, 2, "accelerate"))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, npy32_shards


def distvae(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distvae", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def grid_size(count: int, columns: int) -> tuple[int, int]:
    rows = -(-count // columns)
    return columns * (RES + 2) + 2, rows * (RES + 2) + 2  # make_grid's padding of 2


def test_each_tool_writes_a_png_of_the_expected_size_and_is_reproducible(trained, tmp_path):
    run_dir, shards = trained
    latest = run_dir / "checkpoints" / "step-00000012"
    commands = {
        "sample.png": (["sample", "--n", 16, "--seed", 3], grid_size(16, 4)),
        "recon.png": (["reconstruct", "--shards", shards, "--n", 8], grid_size(16, 16)),
        "interp.png": (["interpolate", "--shards", shards, "--pairs", 2, "--steps", 6, "--slerp"], grid_size(16, 8)),
    }
    for name, (args, size) in commands.items():
        first = distvae(*args, "--ckpt", run_dir, "--out", tmp_path / name, cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        assert "(EMA weights)" in first.stdout and str(latest) in first.stdout
        assert Image.open(tmp_path / name).size == size
        again = distvae(*args, "--ckpt", latest, "--out", tmp_path / f"again-{name}", cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert (tmp_path / name).read_bytes() == (tmp_path / f"again-{name}").read_bytes()
    other_seed = distvae("sample", "--n", 16, "--seed", 4, "--ckpt", run_dir, "--out", tmp_path / "s4.png",
                         cwd=tmp_path)
    assert other_seed.returncode == 0 and (tmp_path / "s4.png").read_bytes() != (tmp_path / "sample.png").read_bytes()
    raw = distvae("sample", "--n", 16, "--seed", 3, "--raw", "--ckpt", run_dir, "--out", tmp_path / "raw.png",
                  cwd=tmp_path)
    assert raw.returncode == 0 and "live weights (--raw)" in raw.stdout
    assert (tmp_path / "raw.png").read_bytes() != (tmp_path / "sample.png").read_bytes()


def test_evaluate_through_the_cli_writes_its_figures(trained, tmp_path):
    import json

    run_dir, shards = trained
    result = distvae("evaluate", "--ckpt", run_dir, "--shards", shards, "--iw", 4, "--json", tmp_path / "s.json",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.strip().splitlines()
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["images"] > 0 and scores["iw_samples"] == 4 and "EMA weights" in scores["checkpoint"]
    assert f"{scores['neg_elbo_nats']:.2f} nats/image" in line and "bits/dim" in line
    assert 0 <= scores["active_units"] <= scores["latent_dim"] == len(scores["kl_per_dim"])


def test_export_then_from_pretrained_decodes_like_the_checkpoint(trained, tmp_path):
    run_dir, _ = trained
    result = distvae("export", "--ckpt", run_dir, "--out", tmp_path / "exported", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    vae = ConvVAE.from_pretrained(tmp_path / "exported")
    model, _, which = load_checkpoint(str(run_dir))
    assert "EMA" in which
    ema = load_file(run_dir / "checkpoints" / "step-00000012" / "ema.safetensors")
    assert all(torch.equal(vae.state_dict()[name], tensor) for name, tensor in ema.items())
    z = torch.randn(4, vae.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(vae.decode(z), model.decode(z))
        images = torch.rand(4, 3, RES, RES, generator=torch.Generator().manual_seed(1))
        assert torch.equal(vae.encode(images)[0], model.encode(images)[0])


def test_tool_errors_are_one_line(trained, tmp_path):
    run_dir, shards = trained
    cases = [
        (["sample", "--ckpt", tmp_path / "nowhere", "--out", tmp_path / "x.png"], "not a complete checkpoint"),
        (["sample", "--ckpt", run_dir, "--n", 0, "--out", tmp_path / "x.png"], "--n must be at least 1"),
        (["reconstruct", "--ckpt", run_dir, "--shards", tmp_path / "none.tar", "--out", tmp_path / "x.png"],
         "does not exist"),
        (["sample", "--ckpt", run_dir, "--out", tmp_path / "no" / "x.png"], "does not exist"),
        (["reconstruct", "--ckpt", run_dir, "--shards", shards, "--n", 100000, "--out", tmp_path / "x.png"],
         "fewer than the 100000"),
    ]
    for args, message in cases:
        result = distvae(*args, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert message in line and "Traceback" not in result.stderr


def test_slerp_keeps_the_norm_between_orthogonal_unit_vectors():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    middle = slerp(a, b, 0.5)
    assert torch.allclose(middle.norm(dim=-1), torch.ones(1)) and torch.allclose(middle, torch.full((1, 2), 0.5**0.5))
    assert torch.equal(slerp(a, a, 0.3), a)  # parallel: linear
    assert torch.lerp(a, b, 0.5).norm() < 0.8  # control: the linear midpoint shrinks
