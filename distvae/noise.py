"""The reparameterisation noise of each training sample, keyed by (seed, epoch, global position).

    eps = sample_noise(seed, epoch, batch.positions, latent_dim, device)   # float32 (B, latent_dim)

A sample's noise is a pure function of its place in the epoch's global order, so it is the same
whatever rank, micro-step or worker handles it: 1 x 32 and 2 x 16 processes draw the same eps for the
same image. It is counter-based: splitmix64 of (key, position, coordinate) gives two 24-bit uniforms
per value and Box-Muller turns them into a standard normal, in int64 and float32 tensor ops on the
device, with no torch.Generator and nothing to save or restore. (int64 multiplication wraps like uint64,
and logical right shifts are masked arithmetic ones.)
"""

from __future__ import annotations

import math

import torch

_U64 = 1 << 64


def _signed(value: int) -> int:
    return value - _U64 if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = (_signed(v) for v in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shift_right(values: torch.Tensor, bits: int) -> torch.Tensor:
    return (values >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix(values: torch.Tensor) -> torch.Tensor:
    values = (values ^ _shift_right(values, 30)) * _MIX1
    values = (values ^ _shift_right(values, 27)) * _MIX2
    return values ^ _shift_right(values, 31)


def _key(seed: int, epoch: int) -> int:
    state = torch.tensor([_GOLDEN], dtype=torch.int64)
    for part in (seed, epoch, 0x4E015E):
        state = _splitmix(state ^ _signed(part % _U64))
    return int(state[0])


def sample_noise(seed: int, epoch: int, positions: torch.Tensor, dim: int,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Standard normal (len(positions), dim) float32 on `device`, one row per global position."""
    positions = positions.to(device=device, dtype=torch.int64, non_blocking=True)  # pinned: no wait
    rows = _splitmix(positions * _GOLDEN + _key(seed, epoch))  # one stream per sample
    counters = torch.arange(2 * dim, device=positions.device, dtype=torch.int64) * _GOLDEN
    bits = _splitmix(rows[:, None] ^ counters[None, :])
    uniform = _shift_right(bits, 40).to(torch.float32) * (1.0 / (1 << 24))  # 24 bits: exact in float32
    radius = torch.sqrt(-2.0 * torch.log1p(-uniform[:, :dim]))  # 1 - u in (0, 1]: finite
    return radius * torch.cos((2.0 * math.pi) * uniform[:, dim:])
