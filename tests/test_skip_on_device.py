"""The non-finite guard decided on the device (guards.step_unless + BufferSnapshot.restore_where) skips the same
steps as the host decision the trainer uses, leaving weights, optimizer state and BatchNorm buffers bit-identical.

`distvae bench sync` times the two; the trainer keeps the host decision because on the reference model it
was the faster one on an H200 (BENCHMARKS.md). These tests keep the measured alternative honest.
"""

import copy

import pytest
import torch
from test_step import snapshot

from distvae.config import load_config
from distvae.guards import BufferSnapshot, step_unless
from distvae.loss import elbo
from distvae.model import build_model

SEED = 20261204
FAULTS = {2, 5, 6}  # steps whose first BatchNorm input overflows: an activation fault where it really arises


def train(decision: str, steps: int = 9, restore_buffers: bool = True):
    """`steps` steps of the tiny model with FAULTS injected; returns (model, optimizer, skipped steps)."""
    cfg = load_config("tiny", ["log.tracker=none"])
    torch.manual_seed(SEED)
    model = build_model(cfg.model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    buffers = BufferSnapshot(model)
    batchnorm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    state = {"step": 0}
    batchnorm.register_forward_pre_hook(
        lambda _m, args: (args[0] * float("inf"),) if state["step"] in FAULTS else None)
    generator = torch.Generator().manual_seed(SEED)
    skipped = []
    for step in range(steps):
        state["step"] = step
        images = torch.rand(8, 3, cfg.model.resolution, cfg.model.resolution, generator=generator)
        eps = torch.randn(8, cfg.model.latent_dim, generator=generator)
        buffers.take()
        recon, mean, logvar = model(images, None, eps)
        loss = elbo(recon, images, mean, logvar, cfg.loss, step).total
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        bad = (~torch.isfinite(loss) | ~torch.isfinite(norm)).float()
        if decision == "host":
            if bad.item():
                buffers.restore()
            else:
                optimizer.step()
        else:
            step_unless(optimizer, bad)
            if restore_buffers:
                buffers.restore_where(bad)
        if bad.item():
            skipped.append(step)
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer, skipped


def test_the_device_decision_skips_the_same_steps_and_leaves_the_same_state():
    print(f"seed {SEED}, faults at steps {sorted(FAULTS)}")
    host_model, host_optimizer, host_skipped = train("host")
    device_model, device_optimizer, device_skipped = train("device")
    assert host_skipped == device_skipped == sorted(FAULTS)
    host, device = snapshot(host_model, host_optimizer), snapshot(device_model, device_optimizer)
    assert len(host) == len(device)
    assert all(torch.equal(a, b) for a, b in zip(host, device))
    steps = {float(s["step"]) for s in device_optimizer.state.values()}
    assert steps == {9.0 - len(FAULTS)}  # skipped updates are not counted: Adam's bias correction is right


def test_the_control_without_the_masked_restore_differs_in_the_buffers():
    host_model, _, _ = train("host")
    mutant_model, _, _ = train("device", restore_buffers=False)
    differs = [not torch.equal(a, b) for a, b in zip(host_model.buffers(), mutant_model.buffers())]
    assert any(differs)  # the check above would catch a missing restore


def test_a_non_fused_optimizer_is_refused():
    parameter = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="needs a fused optimizer"):
        step_unless(torch.optim.AdamW([parameter], foreach=True), torch.tensor(0.0))


def test_restore_where_keeps_the_new_values_when_the_step_is_good():
    module = torch.nn.BatchNorm1d(3)
    snapshot = BufferSnapshot(module)
    snapshot.take()
    before = copy.deepcopy(module.state_dict())
    module(torch.randn(4, 3))
    after = copy.deepcopy(module.state_dict())
    snapshot.restore_where(torch.tensor(0.0))
    assert all(torch.equal(after[k], v) for k, v in module.state_dict().items())
    snapshot.restore_where(torch.tensor(1.0))
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
