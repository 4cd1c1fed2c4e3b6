"""backend.py: the determinism and TF32 flags, set in the right order and both ways, and the fused optimizer."""

from __future__ import annotations

import os

import pytest
import torch

import distvae.train as trainer
from distvae import backend
from distvae.config import load_config
from distvae.errors import UserError


@pytest.fixture(autouse=True)
def restore_flags():
    """Each test leaves torch's global flags as it found them."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.use_deterministic_algorithms(saved[0])
    (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
     torch.backends.cudnn.allow_tf32) = saved[1:]


def train_cfg(deterministic: bool):
    return load_config("tiny", [f"train.deterministic={str(deterministic).lower()}"]).train


def test_the_cublas_variable_is_in_the_environment_before_the_accelerator_exists(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = []

    class Stop(Exception):
        pass

    def accelerator(*args, **kwargs):  # stands in for Accelerator(): what it would see of the environment
        seen.append(os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        raise Stop

    monkeypatch.setattr(trainer, "Accelerator", accelerator)
    with pytest.raises(Stop):
        trainer.start_processes(load_config("tiny", ["train.deterministic=true", "log.tracker=none"]))
    assert seen == [":4096:8"]
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    with pytest.raises(Stop):  # the control: a run that is not deterministic leaves the environment alone
        trainer.start_processes(load_config("tiny", ["log.tracker=none"]))
    assert seen == [":4096:8", None]


def test_too_late_or_a_wrong_value_is_a_one_line_error(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(UserError, match=r"CUDA has started in this process: export CUBLAS_WORKSPACE_CONFIG=:4096:8"):
        backend.prepare_environment(train_cfg(True))
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # set by the user beforehand: accepted even then
    backend.prepare_environment(train_cfg(True))
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    with pytest.raises(UserError, match=r"CUBLAS_WORKSPACE_CONFIG=:0:0 does not make cuBLAS deterministic"):
        backend.prepare_environment(train_cfg(True))


@pytest.mark.parametrize("device", ["cpu", "cuda"])  # flags only: no CUDA device is needed to set them
def test_the_flags_are_set_both_ways(device):
    line = backend.apply_flags(train_cfg(True), torch.device(device))
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark
    if device == "cuda":
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert "no TF32" in line
    line = backend.apply_flags(train_cfg(False), torch.device(device))  # a later run in the same process
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    assert torch.backends.cudnn.benchmark == (device == "cuda")
    if device == "cuda":
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert line == "TF32 matmuls and convolutions, cudnn.benchmark"


def test_the_optimizer_is_fused_adamw_with_the_configs_settings():
    cfg = load_config("tiny", ["train.lr=0.002", "train.beta2=0.99", "train.weight_decay=0.01"]).train
    optimizer = backend.adamw([torch.nn.Parameter(torch.zeros(3))], cfg)
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.AdamW) and group["fused"] is True
    assert (group["lr"], group["betas"], group["weight_decay"]) == (0.002, (0.9, 0.99), 0.01)


@pytest.mark.slow
def test_a_deterministic_run_trains_on_cpu_and_says_so(npy32_shards, tmp_path):
    from launching import base_args, command, run

    result = run(command(base_args(npy32_shards, tmp_path, "train.deterministic=true", "train.max_steps=6")))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kernels: deterministic kernels" in result.stdout
