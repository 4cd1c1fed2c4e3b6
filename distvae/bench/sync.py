"""What the step's wait for the device costs: the same training step three ways, in one process.

    distvae bench sync --device cuda                   # the reference model, 64 px, bf16, channels_last
    distvae bench sync --device cuda --resolution 128 --batch 256 --json sync.json
    distvae bench sync --quick                         # seconds, on CPU, for the test suite

- bare: forward, backward, clip, optimizer step, zero_grad. Nothing reads the device: the host queues
  step after step while the GPU works (an upper bound; no guard at all).
- host_decision: the guards as a host decision. The non-finite flags are stacked on the device and read
  with .tolist() each step (distvae's step reads its all-reduced flags this way), then the update is applied
  or skipped in Python. The host waits for the GPU to finish the step before it can queue the next one.
- device_decision: the same guards decided on the device. Fused AdamW skips its own update when
  found_inf is 1 (guards.step_unless), BatchNorm statistics are put back with a masked copy
  (BufferSnapshot.restore_where), and the flags reach the host through a pinned buffer one step later.

The three run in interleaved rounds (order rotated each round) on one model and optimizer, so the
machine's noise falls on all of them alike; the median per variant is reported. On CPU every operation
finishes before the host goes on, so the three differ only by the guards' own work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

VARIANTS = ("bare", "host_decision", "device_decision")


def bench_sync(device: str = "cpu", resolution: int = 64, batch: int = 64, precision: str = "bf16",
               channels_last: bool = True, steps: int = 100, rounds: int = 5, quick: bool = False,
               json_path: str | None = None) -> dict:
    from distvae.config import load_config
    from distvae.errors import UserError
    from distvae.guards import BufferSnapshot, step_unless
    from distvae.loss import elbo
    from distvae.model import build_model

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no GPU here; use --device cpu")
    if quick:
        config, resolution, batch, steps, rounds = "tiny", 32, 8, 4, 2
    else:
        config = "reference"
    cfg = load_config(config, [f"model.resolution={resolution}", "log.tracker=none"])
    target = torch.device(device)
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(cfg.model).to(device=target, memory_format=layout).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    buffers = BufferSnapshot(model)
    host = torch.randint(0, 256, (4, batch, resolution, resolution, cfg.model.channels), dtype=torch.uint8)
    if target.type == "cuda":
        host = host.pin_memory()
    dtype = torch.bfloat16 if precision == "bf16" else None
    state = {"pending": None, "pinned": torch.zeros(2).pin_memory() if target.type == "cuda" else torch.zeros(2),
             "skipped": 0}

    def forward_backward(index: int) -> torch.Tensor:
        images = host[index % len(host)].to(target, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        images = images.contiguous(memory_format=layout)
        with torch.autocast(target.type, dtype=dtype, enabled=dtype is not None):
            recon, mean, logvar = model(images)
        loss = elbo(recon, images, mean, logvar, cfg.loss).total
        loss.backward()
        return loss

    def bare(index: int) -> None:
        forward_backward(index)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def host_decision(index: int) -> None:
        buffers.take()
        loss = forward_backward(index)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        loss_bad, grad_bad = torch.stack([(~torch.isfinite(loss)).float(), (~torch.isfinite(norm)).float()]).tolist()
        if loss_bad or grad_bad:
            buffers.restore()
            state["skipped"] += 1
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def device_decision(index: int) -> None:
        buffers.take()
        loss = forward_backward(index)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        flags = torch.stack([(~torch.isfinite(loss)).float(), (~torch.isfinite(norm)).float()])
        bad = (flags.sum() > 0).float()
        step_unless(optimizer, bad)
        buffers.restore_where(bad)
        optimizer.zero_grad(set_to_none=True)
        if state["pending"] is not None:  # the previous step's flags: long since computed
            state["pending"].synchronize()
            state["skipped"] += int(state["pinned"].sum().item() > 0)
        state["pinned"].copy_(flags, non_blocking=True)
        if target.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            state["pending"] = event

    def finish() -> None:
        if target.type == "cuda":
            torch.cuda.synchronize(target)
        state["pending"] = None

    runs = {"bare": bare, "host_decision": host_decision, "device_decision": device_decision}
    for index in range(3):  # allocator, cuDNN autotuning, the first fused-optimizer call
        for variant in VARIANTS:
            runs[variant](index)
    finish()
    figures: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    started_all = time.perf_counter()
    for round_ in range(rounds):
        order = VARIANTS[round_ % 3:] + VARIANTS[:round_ % 3]
        for variant in order:
            finish()
            started = time.perf_counter()
            for index in range(steps):
                runs[variant](index)
            finish()
            figures[variant].append(1000 * (time.perf_counter() - started) / steps)
    report = {
        "settings": {"device": device, "gpu": torch.cuda.get_device_name(0) if target.type == "cuda" else None,
                     "torch": torch.__version__, "config": config, "resolution": resolution, "batch": batch,
                     "precision": precision, "channels_last": channels_last, "steps": steps, "rounds": rounds,
                     "seconds": time.perf_counter() - started_all, "unit": "ms per step, median of the rounds"},
        "skipped_steps": state["skipped"],
    }
    for variant in VARIANTS:
        values = figures[variant]
        report[variant] = {"ms_per_step": statistics.median(values), "per_round": values,
                           "images_per_second": 1000 * batch / statistics.median(values)}
    bare_ms = report["bare"]["ms_per_step"]
    for variant in VARIANTS[1:]:
        report[variant]["x_bare_time"] = report[variant]["ms_per_step"] / bare_ms
    wait = report["host_decision"]["ms_per_step"] - report["device_decision"]["ms_per_step"]
    report["verdict"] = (f"{device} {config} {resolution} px batch {batch} {precision}: bare {bare_ms:.2f} ms/step; "
                         f"guards decided on the host {report['host_decision']['ms_per_step']:.2f} ms "
                         f"({report['host_decision']['x_bare_time']:.2f}x), on the device "
                         f"{report['device_decision']['ms_per_step']:.2f} ms "
                         f"({report['device_decision']['x_bare_time']:.2f}x): the wait for the device costs "
                         f"{wait:+.2f} ms per step ({wait / report['host_decision']['ms_per_step']:+.0%})")
    print(report["verdict"], flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--resolution", type=int, default=64, choices=(32, 64, 128, 256))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", default="bf16", choices=("no", "bf16"), help="train.mixed_precision")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="the tiny model, 2 rounds of 4 steps: for tests")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distvae.bench.sync", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    bench_sync(args.device, args.resolution, args.batch, args.precision, True, args.steps, args.rounds, args.quick,
               args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
