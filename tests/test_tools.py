"""After training: sample, reconstruct, interpolate, evaluate and export from a checkpoint of a 2-process bf16
run, and conditional sampling from a conditional run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import base_args, command, free_port, run
from PIL import Image
from safetensors.torch import load_file

from distvae import ConvVAE
from distvae.tools import conditions, load_checkpoint, slerp

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
    run_dir, shards = trained
    result = distvae("evaluate", "--ckpt", run_dir, "--shards", shards, "--iw", 4, "--json", tmp_path / "s.json",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.strip().splitlines()
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["images"] > 0 and scores["iw_samples"] == 4 and "EMA weights" in scores["checkpoint"]
    assert f"{scores['neg_elbo_nats']:.2f} nats/image" in line and "bits/dim" in line and "ssim" in line
    assert "FID skipped: no Inception weights" in result.stderr or "FID over" in line  # never a download
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


def test_evaluate_under_two_processes_with_workers_gives_the_figures_of_one(trained, tmp_path):
    run_dir, shards = trained
    args = ["evaluate", "--ckpt", run_dir, "--shards", shards, "--iw", 3, "--batch-size", 24, "--fid-images", 0]
    one = distvae(*args, "--json", tmp_path / "one.json", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    accelerate = str(Path(sys.executable).parent / "accelerate")
    two = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
                          str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no", "--num_machines", "1",
                          "-m", "distvae", *map(str, args), "--workers", "2", "--json", str(tmp_path / "two.json")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=180,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    assert len(two.stdout.strip().splitlines()) == 1  # rank 0 reports, rank 1 prints nothing
    a, b = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert (a["processes"], b["processes"]) == (1, 2) and a["images"] == b["images"] > 0
    print({key: (a[key], b[key]) for key in ("neg_elbo_nats", "iw_nats", "psnr", "ssim")})
    # Seen: 1e-9 relative (the sums' order). A seed moves the bound by 1e-6 (the control below). SSIM's windows
    # and the standard error (a difference of two large sums) agree less closely.
    for key in ("neg_elbo_nats", "mc_elbo_nats", "iw_nats", "recon_mse", "psnr", "bits_per_dim"):
        assert b[key] == pytest.approx(a[key], rel=1e-7), key
    assert b["ssim"] == pytest.approx(a["ssim"], rel=1e-6)
    assert b["iw_standard_error"] == pytest.approx(a["iw_standard_error"], rel=1e-3)
    assert b["active_units"] == a["active_units"] and b["kl_per_dim"] == pytest.approx(a["kl_per_dim"], rel=1e-6)
    other = distvae(*args, "--seed", 1, "--json", tmp_path / "other.json", cwd=tmp_path)
    seeded = json.loads((tmp_path / "other.json").read_text())
    assert other.returncode == 0 and abs(seeded["iw_nats"] - a["iw_nats"]) > 1e-6 * abs(a["iw_nats"])  # control


@pytest.fixture(scope="module")
def conditional(npy32_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cond") / "run"
    args = base_args(npy32_shards, run_dir, "model.cond_dim=40", "train.max_steps=300", "checkpoint.every_steps=300",
                     "train.val_every_steps=0", "data.batch_size=32", "data.num_workers=0")
    result = run(command(args))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, npy32_shards


def hair_lightness(model, run_dir, attr: str, seed: int) -> float:
    """Mean over 64 samples for the same z of the top of the head (rows 6-12, columns 8-24 at 32 px), where the
    synthetic faces' hair is."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(64, model.latent_dim, generator=torch.Generator().manual_seed(0))
    cond, _ = conditions(model, str(run_dir), [attr], 64, generator)
    with torch.no_grad():
        return model.decode(z, cond)[:, :, 3 * RES // 16 : 3 * RES // 8, RES // 4 : 3 * RES // 4].mean().item()


def test_conditional_samples_follow_the_hair_colour_asked_for(conditional, tmp_path):
    run_dir, shards = conditional
    assert (run_dir / "checkpoints" / "step-00000300" / "attributes.safetensors").is_file()
    model, _, _ = load_checkpoint(str(run_dir))
    blond, black = hair_lightness(model, run_dir, "Blond_Hair=1", 1), hair_lightness(model, run_dir, "Black_Hair=1", 1)
    again = hair_lightness(model, run_dir, "Blond_Hair=1", 2)  # control: other rows for the attributes not given
    print(f"hair region mean, same z: Blond_Hair=1 {blond:.3f}, Black_Hair=1 {black:.3f} (blond, other rows "
          f"{again:.3f})")
    assert blond - black > 0.1 and abs(again - blond) < (blond - black) / 3
    for name, args in {"smiling.png": ["sample", "--attr", "Smiling=1", "--attr", "Eyeglasses=0", "--n", 16],
                       "recon.png": ["reconstruct", "--shards", shards, "--n", 8],
                       "interp.png": ["interpolate", "--shards", shards, "--pairs", 2, "--steps", 4]}.items():
        result = distvae(*args, "--ckpt", run_dir, "--out", tmp_path / name, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert Image.open(tmp_path / name).size[0] > RES
    assert "with Smiling=1 Eyeglasses=0 (the other attributes from" in \
        distvae("sample", "--attr", "Smiling=1", "--attr", "Eyeglasses=0", "--ckpt", run_dir, "--out",
                tmp_path / "s.png", cwd=tmp_path).stdout
    scored = distvae("evaluate", "--ckpt", run_dir, "--shards", shards, "--fid-images", 0, cwd=tmp_path)
    assert scored.returncode == 0 and "nats/image" in scored.stdout, scored.stderr


def test_conditional_errors_are_one_line(conditional, trained, tmp_path):
    cases = [
        (["sample", "--ckpt", conditional[0], "--attr", "Blnd_Hair=1"], "unknown attribute 'Blnd_Hair'; this model "
                                                                         "knows 5_o_Clock_Shadow, Arched_Eyebrows"),
        (["sample", "--ckpt", conditional[0], "--attr", "Blond_Hair=1", "--attr", "Black_Hair=1"],
         "this combination was not seen in training"),
        (["sample", "--ckpt", trained[0], "--attr", "Smiling=1"], "this checkpoint's model is unconditional"),
    ]
    for args, message in cases:
        result = distvae(*args, "--out", tmp_path / "x.png", cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert message in line and "Traceback" not in result.stderr


def test_shards_of_another_size_are_resized_with_a_notice_and_another_channel_count_is_refused(trained, synth_root,
                                                                                                tmp_path):
    import io
    import tarfile

    import numpy as np

    from distvae.data.pack import pack

    run_dir, _ = trained
    pack(synth_root, tmp_path / "s16", name="s16", resolution=16, shard_size=100, progress=False)
    result = distvae("reconstruct", "--ckpt", run_dir, "--shards", tmp_path / "s16" / "manifest.json", "--n", 4,
                     "--out", tmp_path / "r.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "holds 16x16 images and the model takes 32x32: they are resized as in training" in result.stderr
    assert Image.open(tmp_path / "r.png").size == grid_size(8, 8)
    with tarfile.open(tmp_path / "gray.tar", "w") as tar:  # pre-resized one-channel samples
        for key in range(4):
            buffer = io.BytesIO()
            np.save(buffer, np.full((32, 32, 1), 40 * key, dtype=np.uint8))
            for ext, payload in (("npy", buffer.getvalue()), ("json", b'{"split": "val"}')):
                info = tarfile.TarInfo(f"{key:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    refused = distvae("reconstruct", "--ckpt", run_dir, "--shards", tmp_path / "gray.tar", "--n", 2,
                      "--out", tmp_path / "g.png", cwd=tmp_path)
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert "holds 1-channel images and this model takes 3 (model.channels)" in line
