"""An exponential moving average of the weights, kept in fp32 on every rank.

    ema = EMA(raw_model, decay=0.999, warmup=True, every=1)   # None-like when decay is 0: see build_ema
    ema.update(raw_model)        # after each applied optimizer step (never after a skipped one)
    validate(ema.model, ...)     # validation, sample grids and export use ema.model

After an update with decay d: ema <- d * ema + (1 - d) * live, for every parameter (a lerp, in fp32).
With warm-up, the n-th update (n = 1, 2, ...) uses d_n = min(d, n / (n + 9)) (the usual
min(decay, (1 + t) / (10 + t)) rule with t = n - 1 updates done before), so early weights, far from
trained, fade out fast instead of dominating the average for 1 / (1 - d) steps. Buffers (BatchNorm
running statistics, counters) are copied from the live model, not averaged: they are statistics of
the live weights' activations, and an average of them would describe no model. With DDP every rank
holds the same live weights, so every rank's EMA is the same; rank 0 saves it (ema.safetensors).
"""

from __future__ import annotations

import copy

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True, every: int = 1):
        self.decay, self.warmup, self.every = float(decay), bool(warmup), int(every)
        self.updates = 0
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    def decay_now(self) -> float:
        """The decay of the next update."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, live: torch.nn.Module) -> None:
        weight = 1.0 - self.decay_now()
        averaged = list(self.model.parameters())
        torch._foreach_lerp_(averaged, [p.detach().float() for p in live.parameters()], weight)
        self.copy_buffers(live)
        self.updates += 1

    @torch.no_grad()
    def copy_buffers(self, live: torch.nn.Module) -> None:
        for mine, theirs in zip(self.model.buffers(), live.buffers()):
            mine.copy_(theirs)

    def due(self, step: int) -> bool:
        """Update after optimizer step `step` (1-based) when it is a multiple of train.ema_every_steps."""
        return step % self.every == 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach() for name, tensor in self.model.state_dict().items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        self.model.load_state_dict(tensors)
        self.updates = int(updates)


def build_ema(cfg_train, model: torch.nn.Module) -> EMA | None:
    if cfg_train.ema_decay <= 0:
        return None
    return EMA(model, cfg_train.ema_decay, cfg_train.ema_warmup, cfg_train.ema_every_steps)
