"""One optimizer step: micro-batches, forward under autocast, loss, backward, clip, the one collective,
apply or skip. No I/O: it returns what the loop logs and decides on.

    out = train_step(model, optimizer, accelerator, batches, buffers, cfg, step, accum, stop, lock_lost)
    out.verdict.apply      # False: skipped on every rank, weights and BatchNorm statistics as they were

The collective is one all-reduce of six numbers built on the device (any rank's non-finite loss or
gradient, an unreadable batch, a stop signal, a lost run lock, unreadable samples); its .tolist() is
the step's only wait for the device.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from distvae.config import Config
from distvae.guards import BufferSnapshot, StepVerdict
from distvae.loss import LossTerms, elbo
from distvae.noise import sample_noise


@dataclass
class StepOutput:
    sums: torch.Tensor  # float64 (4,) on the device: loss, recon, kl (each x images), images; this rank
    terms: LossTerms  # the last micro-batch's (the progress bar reads it, the logs its kl_weight)
    grad_norm: torch.Tensor
    verdict: StepVerdict
    stop: bool  # some rank got a stop signal
    lock_lost: bool  # rank 0 no longer holds RUN_DIR/lock
    bad_samples: int  # unreadable samples in this step, all ranks
    bad_shards: set[str]  # the shards this rank's unreadable samples came from
    images: int  # this rank's images in the step
    data_seconds: float  # time this rank waited for batches


def train_step(model, optimizer, accelerator, batches: Iterator, buffers: BufferSnapshot, cfg: Config, step: int,
               accum: int, stop, lock_lost: bool) -> StepOutput:
    """`stop.requested` is read at the collective, after the forwards: a signal during them counts for this step."""
    device = accelerator.device
    buffers.take()  # BatchNorm statistics before this step's forwards: a skipped step puts them back
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    bad_samples, unreadable, bad_shards, images_done, data_seconds = 0, False, set(), 0, 0.0
    for micro_step in range(accum):
        waited = time.perf_counter()
        batch = next(batches)
        data_seconds += time.perf_counter() - waited
        images, cond = batch.to(device, cfg.train.channels_last)
        # Keyed by each sample's place in the epoch: the same noise for any topology and worker count.
        eps = sample_noise(cfg.run.seed, batch.epoch, batch.positions, cfg.model.latent_size, device)
        with contextlib.nullcontext() if micro_step == accum - 1 else accelerator.no_sync(model):
            with accelerator.autocast():  # the only autocast of the step: the loss leaves it for fp32
                recon, mean, logvar = model(images, cond, eps)
            terms = elbo(recon, images, mean, logvar, cfg.loss, step)
            accelerator.backward(terms.total / accum)
        count = images.shape[0]
        sums[:3] += torch.stack([terms.total.detach(), terms.recon.detach(), terms.kl.detach()]).double() * count
        sums[3] += count
        images_done += count
        bad_samples, unreadable = bad_samples + batch.bad, unreadable or not batch.readable
        bad_shards.update(batch.bad_shards)
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip or float("inf"))

    # What the host knows crosses in one copy from page-locked memory: a copy from pageable memory (such as
    # torch.tensor(x, device="cuda")) makes the host wait for the device each time.
    known = torch.tensor([float(unreadable), float(stop.requested), float(lock_lost), float(bad_samples)])
    if device.type == "cuda":
        known = known.pin_memory()
    flags = torch.cat([torch.stack([(~torch.isfinite(sums[0])).float(), (~torch.isfinite(grad_norm)).float()]),
                       known.to(device, non_blocking=True)])
    loss_bad, grad_bad, no_data, any_stop, any_lock_lost, all_bad_samples = \
        accelerator.reduce(flags, reduction="sum").tolist()
    verdict = StepVerdict.decide(loss_bad, grad_bad, no_data, accelerator.scaler is not None)
    if verdict.apply:
        optimizer.step()
    else:
        buffers.restore()
        if accelerator.scaler is not None:
            # clip_grad_norm_ has unscaled the gradients: update() lowers the scale after an overflow and
            # lets the next step unscale again (without it, that unscale_ raises).
            accelerator.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return StepOutput(sums, terms, grad_norm, verdict, bool(any_stop),
                      bool(any_lock_lost), int(all_bad_samples), bad_shards, images_done, data_seconds)
