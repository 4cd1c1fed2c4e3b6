"""How torch computes on this run's device: TF32, cuDNN autotuning, determinism, the fused optimizer.

    prepare_environment(cfg.train)          # before Accelerator(): no CUDA context may exist yet
    line = apply_flags(cfg.train, device)   # after it: the flags, set both ways on every run

The fast choice is the default: on a GPU, TF32 matmuls and convolutions (a 10-bit mantissa inside the
product, fp32 everywhere else) and cudnn.benchmark (the fastest kernel for each input shape, picked by
timing). Both can change the last bits of a result from one run to another. `train.deterministic=true`
turns them off and asks torch for deterministic kernels only (an operation without one raises instead
of running), which exact resume on a GPU needs. cuBLAS reads CUBLAS_WORKSPACE_CONFIG when its first
handle is made, so the variable is set here before any CUDA context exists, or the run is refused.
On CPU the kernels torch picks are deterministic already and TF32 does not exist; the determinism
switch is still applied, so a CPU test runs the same code path.

AdamW is fused (one kernel over all parameters, on CPU too since torch 2.4): about 3.5x faster than the
default for-each update on the reference model here; the same update up to rounding (7e-9 apart after 5 steps).
"""

from __future__ import annotations

import os

import torch

from distvae.errors import UserError

CUBLAS_SETTINGS = (":4096:8", ":16:8")  # the two values the CUDA documentation gives for deterministic cuBLAS


def prepare_environment(train_cfg) -> None:
    """Set CUBLAS_WORKSPACE_CONFIG for a deterministic run, or refuse in one line when it is too late."""
    if not train_cfg.deterministic:
        return
    current = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if current in CUBLAS_SETTINGS:
        return
    if current:
        raise UserError(f"train.deterministic=true: CUBLAS_WORKSPACE_CONFIG={current} does not make cuBLAS "
                        f"deterministic: unset it or set it to {CUBLAS_SETTINGS[0]}")
    if torch.cuda.is_initialized():
        raise UserError("train.deterministic=true needs CUBLAS_WORKSPACE_CONFIG before CUDA starts, and CUDA has "
                        f"started in this process: export CUBLAS_WORKSPACE_CONFIG={CUBLAS_SETTINGS[0]} first")
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_SETTINGS[0]


def apply_flags(train_cfg, device: torch.device) -> str:
    """Set torch's determinism and TF32 flags for this run (both ways: an earlier run in the process may have
    changed them); returns a one-line summary for the log."""
    deterministic, cuda = bool(train_cfg.deterministic), device.type == "cuda"
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = cuda and not deterministic
    if cuda:  # on CPU these would reach oneDNN's own precision settings: left alone
        torch.backends.cuda.matmul.allow_tf32 = not deterministic
        torch.backends.cudnn.allow_tf32 = not deterministic
    if deterministic:
        cublas = f", CUBLAS_WORKSPACE_CONFIG={os.environ.get('CUBLAS_WORKSPACE_CONFIG')}"
        return "deterministic kernels" + (f", no TF32, no cudnn.benchmark{cublas}" if cuda else "")
    return "TF32 matmuls and convolutions, cudnn.benchmark" if cuda else "default CPU kernels"


def adamw(parameters, train_cfg) -> torch.optim.AdamW:
    """The run's optimizer: fused AdamW with the config's hyper-parameters."""
    return torch.optim.AdamW(parameters, lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2),
                             weight_decay=train_cfg.weight_decay, fused=True)
