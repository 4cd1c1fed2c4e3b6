"""The code paths only a CUDA device takes. Marked `gpu`: collected everywhere, skipped without CUDA.

    pytest -m gpu                # on a machine with a GPU (make gpu-check runs these and the step bench)

Each test runs what a user's GPU run runs: bf16 autocast on the convolutions, channels_last, compile,
the data cache in GPU memory, pinned non-blocking copies, the determinism flags (two identical runs
bit-identical), SyncBatchNorm over 2 processes (when 2 GPUs exist) and exact resume after SIGKILL.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from launching import MAX_STEPS, base_args, checkpoint_at, command, final_weights, kill_when, run

from distvae.config import load_config
from distvae.data.shards import resolve_shards
from distvae.data.stream import ShardStream
from distvae.loss import elbo
from distvae.model import build_model

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no CUDA device")]
GPU_ARGS = ("data.num_workers=0",)  # the GPU runs read in the main process: one process fewer to start


def tiny(*overrides: str):
    return load_config("tiny", ["log.tracker=none", *overrides])


def conv_output_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    seen: set[torch.dtype] = set()
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            module.register_forward_hook(lambda _m, _i, output: seen.add(output.dtype))
    return seen


def images_on_gpu(cfg, seed: int = 0) -> tuple[torch.Tensor, None, torch.Tensor]:
    """(images, cond, eps): the model's inputs, noise included, so two forwards see the same numbers."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(8, cfg.model.channels, cfg.model.resolution, cfg.model.resolution, generator=generator)
    return images.cuda(), None, torch.randn(8, cfg.model.latent_dim, generator=generator).cuda()


def test_bf16_autocast_runs_the_convolutions_in_bf16_and_the_loss_in_fp32():
    cfg = tiny()
    torch.manual_seed(0)
    model = build_model(cfg.model).cuda()
    dtypes = conv_output_dtypes(model)
    images, cond, eps = images_on_gpu(cfg)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        recon, mean, logvar = model(images, cond, eps)
    terms = elbo(recon, images, mean, logvar, cfg.loss, step=0)
    assert dtypes == {torch.bfloat16}
    assert terms.total.dtype == torch.float32 and torch.isfinite(terms.total)
    with torch.no_grad():  # the control: the same forward without autocast is fp32, and close to it
        recon32, mean32, logvar32 = model(images, cond, eps)
    assert dtypes == {torch.bfloat16, torch.float32}
    loss32 = elbo(recon32, images, mean32, logvar32, cfg.loss, step=0).total
    assert abs(terms.total.item() - loss32.item()) / loss32.item() < 0.05


def test_channels_last_changes_the_layout_not_the_result():
    cfg = tiny()
    torch.manual_seed(0)
    plain = build_model(cfg.model).cuda()
    last = build_model(cfg.model).cuda()
    last.load_state_dict(plain.state_dict())
    last = last.to(memory_format=torch.channels_last)
    conv = next(m for m in last.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images, cond, eps = images_on_gpu(cfg)
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # TF32 would make both differ from fp32 by more than the layout does
    try:
        out_plain = plain(images, cond, eps)[0]
        out_last = last(images.contiguous(memory_format=torch.channels_last), cond, eps)[0]
        other = plain(images.flip(-1), cond, eps)[0]
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    difference = (out_plain - out_last).abs().max().item()
    control = (out_plain - other).abs().max().item()  # another input: what a real difference looks like
    print(f"channels_last vs NCHW: {difference:.2e}; another input: {control:.2e}")
    assert difference < 1e-4 and control > 1e-2, (difference, control)


def test_pinned_uint8_batches_cross_without_blocking_and_become_float_on_the_gpu(npy32_shards):
    shards = resolve_shards(str(npy32_shards), split="train")
    stream = ShardStream(shards, batch_size=16, resolution=32, seed=0, num_workers=0, pin_memory=True, cache="none")
    batch = next(iter(stream))
    assert batch.images.dtype == torch.uint8 and batch.images.is_pinned()
    images, _ = batch.to(torch.device("cuda"), channels_last=True)
    assert images.is_cuda and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)
    # x / 255 on the GPU may round differently from the CPU (a multiply by the reciprocal): compare the bytes.
    assert torch.equal((images.cpu() * 255).round().to(torch.uint8), batch.images.permute(0, 3, 1, 2))


def test_the_device_cache_gives_the_host_caches_batches_bit_for_bit(npy32_shards):
    shards = resolve_shards(str(npy32_shards), split="train")
    options = dict(batch_size=16, resolution=32, seed=3, num_workers=0, hflip=True, shuffle_block=64)
    host = ShardStream(shards, cache="host", **options)
    device = ShardStream(shards, cache="device", device="cuda", **options)
    assert device.cache.images.is_cuda and not host.cache.images.is_cuda
    count = host.batches_per_epoch + 3  # across an epoch boundary
    for index, (a, b) in enumerate(zip(iter(host), iter(device))):
        if index == count:
            break
        assert b.images.is_cuda, index
        assert torch.equal(a.images, b.images.cpu()), index
        assert torch.equal(a.positions, b.positions) and a.epoch == b.epoch, index


def test_compile_trains_on_the_gpu(npy32_shards, tmp_path):
    args = base_args(npy32_shards, tmp_path, *GPU_ARGS, "train.compile=true", "train.max_steps=6",
                     "checkpoint.every_steps=6", "train.val_every_steps=0", "log.every_steps=3")
    result = run(command(args), timeout=600, TORCH_LOGS="graph_breaks")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on cuda" in result.stdout, result.stdout[-2000:]
    assert "Graph break" not in result.stderr, result.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "step-00000006" / "COMPLETE").exists()


def test_the_device_cache_trains_end_to_end(npy32_shards, tmp_path):
    args = base_args(npy32_shards, tmp_path, "data.cache=device", "train.max_steps=12", "checkpoint.every_steps=12",
                     "train.mixed_precision=bf16")
    result = run(command(args))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "in GPU memory" in result.stdout, result.stdout[-2000:]


@pytest.fixture(scope="module")
def deterministic_reference(npy32_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gpu-deterministic")
    result = run(command(base_args(npy32_shards, run_dir, *GPU_ARGS, "train.deterministic=true",
                                   "train.mixed_precision=bf16")))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no TF32, no cudnn.benchmark" in result.stdout, result.stdout[-2000:]
    return run_dir


def test_two_deterministic_runs_are_bit_identical(npy32_shards, deterministic_reference, tmp_path):
    result = run(command(base_args(npy32_shards, tmp_path, *GPU_ARGS, "train.deterministic=true",
                                   "train.mixed_precision=bf16")))
    assert result.returncode == 0, result.stderr[-3000:]
    assert final_weights(tmp_path) == final_weights(deterministic_reference)
    other = tmp_path / "other-seed"  # the control: a change that must show does show
    result = run(command(base_args(npy32_shards, other, *GPU_ARGS, "train.deterministic=true",
                                   "train.mixed_precision=bf16", "run.seed=1")))
    assert result.returncode == 0, result.stderr[-3000:]
    assert final_weights(other) != final_weights(deterministic_reference)


def test_sigkill_on_one_gpu_then_rerun_is_bit_exact(npy32_shards, deterministic_reference, tmp_path):
    args = base_args(npy32_shards, tmp_path, *GPU_ARGS, "train.deterministic=true", "train.mixed_precision=bf16")
    seed = os.environ.get("DISTVAE_TEST_SEED") or str(random.SystemRandom().randrange(10**9))
    print(f"random kill seed {seed} (rerun with DISTVAE_TEST_SEED={seed})")
    chance = random.Random(seed)
    trigger = chance.choice([6, 12])
    kept = sorted((deterministic_reference / "checkpoints").glob("step-*"))
    per_step = (((kept[-1] / "COMPLETE").stat().st_mtime - (kept[0] / "COMPLETE").stat().st_mtime)
                / (int(kept[-1].name[5:]) - int(kept[0].name[5:])))
    delay = chance.uniform(0.0, 0.6) * (MAX_STEPS - trigger) * per_step
    kill_when(tmp_path, command(args), checkpoint_at(trigger), delay)
    assert not (tmp_path / "checkpoints" / f"step-{MAX_STEPS:08d}").exists(), f"finished before the kill ({seed})"
    result = run(command(args))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout
    assert final_weights(tmp_path) == final_weights(deterministic_reference), f"seed {seed}"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBatchNorm over 2 processes needs 2 GPUs")
def test_sync_batchnorm_over_two_gpus_trains_and_the_ranks_agree(npy32_shards, tmp_path):
    args = base_args(npy32_shards, tmp_path, *GPU_ARGS, "train.sync_bn=true", "train.max_steps=12",
                     "checkpoint.every_steps=12")
    result = run(command(args, 2, "torchrun"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "step-00000012" / "COMPLETE").exists()


def test_the_training_step_waits_for_the_device_once(npy32_shards):
    """The step's one wait is the .tolist() of its flags: pinned batches and pinned host flags cross without one.
    CUDA's sync debug mode warns at every operation that makes the host wait for the device."""
    import warnings

    from test_step import GO, OneProcess

    from distvae.backend import adamw
    from distvae.guards import BufferSnapshot
    from distvae.step import train_step

    cfg = tiny("data.batch_size=16")
    torch.manual_seed(0)
    model = build_model(cfg.model).cuda().to(memory_format=torch.channels_last)
    optimizer = adamw(model.parameters(), cfg.train)
    accelerator = OneProcess()
    accelerator.device = torch.device("cuda")
    stream = ShardStream(resolve_shards(str(npy32_shards), split="train"), batch_size=16, resolution=32, seed=0,
                         num_workers=0, pin_memory=True)
    batches, buffers = iter(stream), BufferSnapshot(model)

    def steps(count: int, first: int) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for step in range(first, first + count):
                    out = train_step(model, optimizer, accelerator, batches, buffers, cfg, step, 1, GO, False)
                    assert out.verdict.apply, step
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return [str(w.message) for w in caught if "synchroniz" in str(w.message)]

    steps(2, 0)  # first calls: cuDNN's choices, the allocator
    waits = steps(4, 2)
    print("\n".join(waits))
    assert len(waits) == 4, waits
    assert len(steps(1, 6)) == 1
    known = torch.tensor([1.0, 2.0])
    with warnings.catch_warnings(record=True) as caught:  # the control: a pageable copy is a wait, and is seen
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            known.to("cuda")
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert any("synchroniz" in str(w.message) for w in caught)
