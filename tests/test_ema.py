"""EMA weights: the average itself, exact resume, skipped steps, and what validation reports."""

import re
from pathlib import Path

import pytest
import torch
from launching import base_args, checkpoint_at, command, kill_when, run
from safetensors.torch import load_file

from distvae.config import load_config
from distvae.ema import EMA, build_ema
from distvae.model import build_model

SEED = 20261203


def snapshots(model: torch.nn.Module, steps: int, generator: torch.Generator) -> list[list[torch.Tensor]]:
    """Random updates of the live weights; the weights after each (the EMA's inputs)."""
    taken = []
    for _ in range(steps):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
        taken.append([p.detach().clone() for p in model.parameters()])
    return taken


@pytest.mark.parametrize("warmup", [False, True])
def test_the_ema_is_the_weighted_average_of_the_live_snapshots(warmup):
    print(f"seed {SEED}")
    generator = torch.Generator().manual_seed(SEED)
    model = build_model(load_config("tiny").model)
    start = [p.detach().clone().double() for p in model.parameters()]
    ema = EMA(model, decay=0.9, warmup=warmup)
    steps = 30
    taken = snapshots(model, steps, generator)
    for index in range(steps):
        with torch.no_grad():
            for parameter, value in zip(model.parameters(), taken[index]):
                parameter.copy_(value)
        ema.update(model)
    # Direct: ema_N = prod(d) * start + sum_k (1 - d_k) * prod_{j > k} d_j * snapshot_k.
    decays = [min(0.9, (1 + n) / (10 + n)) if warmup else 0.9 for n in range(steps)]
    weights = []
    for k in range(steps):
        later = 1.0
        for j in range(k + 1, steps):
            later *= decays[j]
        weights.append((1 - decays[k]) * later)
    first = 1.0
    for decay in decays:
        first *= decay
    assert sum(weights) + first == pytest.approx(1.0)
    for index, averaged in enumerate(ema.model.parameters()):
        direct = first * start[index] + sum(w * taken[k][index].double() for k, w in enumerate(weights))
        assert torch.allclose(averaged.double(), direct, rtol=1e-5, atol=1e-6)
        # Control: the plain last snapshot and the plain mean are far from it.
        assert not torch.allclose(averaged.double(), taken[-1][index].double(), atol=1e-2)
    assert ema.updates == steps
    if warmup:  # the first update keeps only a tenth of the starting weights
        assert decays[0] == pytest.approx(0.1)


def test_buffers_are_copied_not_averaged_and_decay_0_means_no_ema():
    cfg = load_config("tiny")
    model = build_model(cfg.model)
    ema = EMA(model, decay=0.99)
    norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    norm.running_mean.fill_(3.0)
    ema.update(model)
    ema_norm = next(m for m in ema.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert torch.equal(ema_norm.running_mean, norm.running_mean)
    assert build_ema(cfg.train, model) is None  # tiny: ema_decay 0
    cfg.train.ema_decay = 0.5
    assert build_ema(cfg.train, model).decay == 0.5


# ------------------------------------------------------------------------------------------------------
# End to end.

EMA_ARGS = ["train.ema_decay=0.9"]


def ema_bytes(run_dir: Path, step: int = 24) -> bytes:
    return (run_dir / "checkpoints" / f"step-{step:08d}" / "ema.safetensors").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_sigkill_and_resume_end_with_bit_identical_ema_weights(npy32_shards, tmp_path, processes):
    launcher = "python" if processes == 1 else "accelerate"
    reference = tmp_path / "reference"
    result = run(command(base_args(npy32_shards, reference, *EMA_ARGS), processes, launcher))
    assert result.returncode == 0, result.stderr[-3000:]
    killed = tmp_path / "killed"
    killed.mkdir()
    kill_when(killed, command(base_args(npy32_shards, killed, *EMA_ARGS), processes, launcher), checkpoint_at(12), 0.1)
    result = run(command(base_args(npy32_shards, killed, *EMA_ARGS), processes, launcher))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout and "holds no EMA" not in result.stdout
    assert ema_bytes(killed) == ema_bytes(reference)
    # Control: the EMA is not the live model (they would be equal if the average were a copy).
    live = load_file(reference / "checkpoints" / "step-00000024" / "model.safetensors")
    averaged = load_file(reference / "checkpoints" / "step-00000024" / "ema.safetensors")
    assert live.keys() == averaged.keys() and any(not torch.equal(live[k], averaged[k]) for k in live)


@pytest.mark.slow
def test_a_skipped_step_leaves_the_ema_and_no_ema_is_saved_when_off(npy32_shards, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "probe").mkdir(parents=True)
    args = base_args(npy32_shards, run_dir, *EMA_ARGS, "checkpoint.every_steps=1", "checkpoint.keep_last=100",
                     "train.max_steps=8")
    result = run(command(args, probe=True), PROBE_DIR=str(run_dir / "probe"), PROBE_NAN_AT="0:5")  # step 5 skipped
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("update skipped on all ranks") == 1
    assert ema_bytes(run_dir, 5) == ema_bytes(run_dir, 4)  # the skipped step did not touch it
    assert ema_bytes(run_dir, 4) != ema_bytes(run_dir, 3) and ema_bytes(run_dir, 6) != ema_bytes(run_dir, 5)
    off = tmp_path / "off"
    result = run(command(base_args(npy32_shards, off, "train.max_steps=6")))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(off.glob("checkpoints/*/ema.safetensors")) and list(off.glob("checkpoints/*/model.safetensors"))


@pytest.mark.slow
def test_validation_reports_the_ema_beside_the_live_weights(npy32_shards, tmp_path):
    """A short run at a high lr: the figures go in the note; no threshold (the EMA lags on purpose)."""
    args = base_args(npy32_shards, tmp_path, "train.ema_decay=0.95", "train.lr=0.01", "train.max_steps=60",
                     "train.val_every_steps=60", "train.val_batches=0", "log.image_every_steps=60")
    result = run(command(args))
    assert result.returncode == 0, result.stderr[-3000:]
    live = re.search(r"step 60/60  validation: loss (\S+)", result.stdout)
    averaged = re.search(r"step 60/60  validation, EMA weights: loss (\S+)", result.stdout)
    assert live and averaged, result.stdout[-2000:]
    print(f"after 60 steps at lr 0.01: validation loss live {live.group(1)}, EMA (0.95) {averaged.group(1)}")
    assert float(live.group(1)) != float(averaged.group(1))
    assert (tmp_path / "samples" / "samples_ema-step-00000060.png").exists()
