"""What keeps bad numbers and bad data out of a run: the trainer asks, these decide.

- `BufferSnapshot`: a forward updates BatchNorm's running statistics before anyone knows whether the
  step is finite. The buffers are copied before the step's first forward and put back when the step
  is skipped (for any reason, fp16 overflow included), so a skipped step leaves the model as it was.
- `StepVerdict`: after the step's one collective, whether to apply it, skip it as non-finite (counts
  toward train.max_bad_steps), or let fp16's GradScaler skip it (an overflow of the scaled gradients is
  its normal way to find the scale: counted apart, never a failure), or skip it for want of data.
- `DataHealth`: more than data.max_bad_fraction of the last data.bad_window samples unreadable stops
  the run (after saving, exit 1, status `failed`): an unreachable bucket must not train on copies of
  a few good images, or requeue forever.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

import torch


class BufferSnapshot:
    """A copy of a module's buffers (BatchNorm running statistics and counters), restorable in place."""

    def __init__(self, module: torch.nn.Module):
        self.buffers = list(module.buffers())
        self.saved = [buffer.detach().clone() for buffer in self.buffers]

    def take(self) -> None:
        for saved, buffer in zip(self.saved, self.buffers):
            saved.copy_(buffer)

    def restore(self) -> None:
        with torch.no_grad():
            for saved, buffer in zip(self.saved, self.buffers):
                buffer.copy_(saved)

    def restore_where(self, bad: torch.Tensor) -> None:
        """restore() when the 0-d tensor `bad` is nonzero, decided on the device: no wait for it."""
        keep_saved = bad.bool()
        with torch.no_grad():
            for saved, buffer in zip(self.saved, self.buffers):
                buffer.copy_(torch.where(keep_saved, saved, buffer))


def step_unless(optimizer, bad: torch.Tensor) -> None:
    """optimizer.step(), skipped on the device when the float32 0-d tensor `bad` is 1.0.

    Fused AdamW reads it as the `found_inf` that GradScaler hands fused optimizers: at 1.0 the kernel
    leaves parameters and moments untouched and the step counts are put back, with no wait for the device.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the torch optimizer
    if not all(group.get("fused") for group in inner.param_groups):
        raise ValueError("step_unless needs a fused optimizer (backend.adamw): only fused kernels read found_inf")
    inner.found_inf = bad
    try:
        optimizer.step()
    finally:
        del inner.found_inf


def all_finite(tensors) -> bool:
    """True when every floating-point tensor holds only finite values (one wait for the device)."""
    checks = [tensor.isfinite().all() for tensor in tensors if tensor.is_floating_point()]
    return bool(torch.stack(checks).all()) if checks else True


@dataclass(frozen=True)
class StepVerdict:
    apply: bool  # run the optimizer update
    non_finite: bool  # a real failure: the loss (or, without a GradScaler, the gradient) is not finite
    scaler_overflow: bool  # fp16: finite loss, overflowing scaled gradients; the GradScaler skips and lowers its scale
    no_data: bool  # some rank's batch held no readable sample: nothing to learn from

    @classmethod
    def decide(cls, loss_not_finite: float, grad_not_finite: float, no_data: float, has_scaler: bool) -> StepVerdict:
        """From the all-reduced flags (sums over ranks) of one step."""
        non_finite = loss_not_finite > 0 or (grad_not_finite > 0 and not has_scaler)
        overflow = has_scaler and not non_finite and grad_not_finite > 0
        starved = no_data > 0
        return cls(not (non_finite or overflow or starved), non_finite, overflow, starved)


class DataHealth:
    """Unreadable samples over a sliding window of the last `window` samples (all ranks together)."""

    def __init__(self, max_bad_fraction: float, window: int):
        self.fraction, self.window = max_bad_fraction, window
        self.steps: deque[tuple[int, int]] = deque()  # (bad, samples) of recent steps
        self.bad = self.samples = 0
        self.shards: Counter[str] = Counter()  # this rank's shards with unreadable samples, by count

    def note_shards(self, shard_urls) -> None:
        self.shards.update(shard_urls)

    def add(self, bad: int, samples: int) -> bool:
        """Record one step; True when the window holds more unreadable samples than allowed.

        The window is the fewest recent steps that hold at least `window` samples. Until it is full, the
        limit is max_bad_fraction x window samples (a dead bucket stops a run within a few steps); after
        that, the share of the samples held (a step larger than the window is judged by its share).
        """
        self.steps.append((bad, samples))
        self.bad, self.samples = self.bad + bad, self.samples + samples
        while self.steps and self.samples - self.steps[0][1] >= self.window:
            old_bad, old_samples = self.steps.popleft()
            self.bad, self.samples = self.bad - old_bad, self.samples - old_samples
        return self.fraction < 1.0 and self.bad > self.fraction * max(self.window, self.samples)

    def message(self, max_bad_fraction: float, rank: int) -> str:
        where = ", ".join(url for url, _ in self.shards.most_common(3)) or "shards read by other ranks"
        more = f" and {len(self.shards) - 3} more" if len(self.shards) > 3 else ""
        return (f"{self.bad} of the last {self.samples} samples could not be read (data.max_bad_fraction="
                f"{max_bad_fraction}); rank {rank} saw it in {where}{more}. Fix or remove those shards (or raise "
                f"data.max_bad_fraction), then rerun to resume from the checkpoint just saved")
