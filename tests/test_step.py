"""train_step alone, on a tiny model: what it returns, and what a non-finite step leaves unchanged."""

import contextlib
from types import SimpleNamespace

import torch

from distvae.config import load_config
from distvae.data.stream import Batch
from distvae.guards import BufferSnapshot
from distvae.model import build_model
from distvae.step import train_step

SEED = 20261203
GO, STOP = SimpleNamespace(requested=False), SimpleNamespace(requested=True)  # a StopFlag's one field


class OneProcess:
    """What train_step asks of an Accelerator, for one CPU process (no DDP, no autocast, no scaler)."""

    device, scaler = torch.device("cpu"), None

    def no_sync(self, model):
        return contextlib.nullcontext()

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm_(self, parameters, limit):
        return torch.nn.utils.clip_grad_norm_(parameters, limit)

    def reduce(self, tensor, reduction="sum"):
        return tensor


def batches(cfg, generator):
    epoch_position = 0
    while True:
        images = torch.randint(0, 256, (4, cfg.model.resolution, cfg.model.resolution, 3), dtype=torch.uint8,
                               generator=generator)
        yield Batch(images, None, 0, positions=torch.arange(epoch_position, epoch_position + 4), epoch=0)
        epoch_position += 4


def snapshot(model, optimizer) -> list[torch.Tensor]:
    state = [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]
    for per_param in optimizer.state.values():
        state += [v.clone() for v in per_param.values() if torch.is_tensor(v)]
    return state


def test_two_steps_one_applied_one_skipped_with_a_non_finite_gradient():
    print(f"seed {SEED}")
    cfg = load_config("tiny", ["data.batch_size=4"])
    torch.manual_seed(SEED)
    model = build_model(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    accelerator, buffers = OneProcess(), BufferSnapshot(model)
    stream = batches(cfg, torch.Generator().manual_seed(SEED))
    model.train()

    before = snapshot(model, optimizer)
    first = train_step(model, optimizer, accelerator, stream, buffers, cfg, 0, 2, GO, False)
    assert first.verdict.apply and not first.verdict.non_finite
    assert first.images == 8 and float(first.sums[3]) == 8 and torch.isfinite(first.sums).all()
    assert float(first.sums[0]) / 8 > 0 and torch.isfinite(first.grad_norm)
    assert (first.stop, first.lock_lost, first.bad_samples, first.bad_shards) == (False, False, 0, set())
    after_first = snapshot(model, optimizer)
    assert len(after_first) > len(before)  # Adam state now exists
    assert any(not torch.equal(a, b) for a, b in zip(before, after_first))  # control: an applied step moves weights
    assert all(p.grad is None for p in model.parameters())

    # Step 2: the decoder's last layer gets an inf gradient; the forward has already moved the BatchNorm statistics.
    last = [p for p in model.parameters() if p.dim() > 1][-1]
    hook = last.register_hook(lambda grad: grad * float("inf"))
    second = train_step(model, optimizer, accelerator, stream, buffers, cfg, 1, 1, STOP, False)
    hook.remove()
    assert not second.verdict.apply and second.verdict.non_finite and not torch.isfinite(second.grad_norm)
    assert second.stop and second.images == 4
    after_second = snapshot(model, optimizer)
    assert len(after_second) == len(after_first)
    assert all(torch.equal(a, b) for a, b in zip(after_first, after_second)), "a skipped step changed something"
    assert all(p.grad is None for p in model.parameters())


def test_a_stop_signal_during_the_forwards_counts_for_this_step():
    """SIGUSR1 lands while the step computes; the step must see it at its collective, not the next step."""
    cfg = load_config("tiny", ["data.batch_size=4"])
    torch.manual_seed(SEED)
    model = build_model(cfg.model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    flag = SimpleNamespace(requested=False)
    model.register_forward_hook(lambda *args: setattr(flag, "requested", True))  # the signal handler's effect
    out = train_step(model, optimizer, OneProcess(), batches(cfg, torch.Generator().manual_seed(SEED)),
                     BufferSnapshot(model), cfg, 0, 1, flag, False)
    assert out.stop and out.verdict.apply
