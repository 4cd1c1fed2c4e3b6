"""The training data stream: shards -> deterministic, equal, resumable batches on every rank.

    shards = resolve_shards("shards/celeba/manifest.json", split="train")
    stream = ShardStream(shards, batch_size=64, resolution=64, seed=0, rank=rank, world_size=world,
                         num_workers=4)
    stream.load_state_dict(saved)          # {"epoch": 3, "batch": 1200}: continue exactly there
    for batch in stream:                   # endless: epoch after epoch
        images, cond = batch.to(device)    # float (B, C, H, W) in [0, 1] on the device

How an epoch is planned (a pure function of seed, epoch, rank, world size and worker):
1. The shards are put in an order drawn from (seed, epoch) and seen as one long sequence of samples.
2. Every rank takes the same number of whole batches, floor(N / world_size / batch_size), as one
   contiguous slice of that sequence: no rank ever waits for another at the epoch end, nothing is
   repeated within an epoch, and at most world_size * batch_size samples are left out (a different
   few each epoch, as the shard order changes).
3. A rank's slice is cut into contiguous parts for its (logical) workers; worker w makes batches
   w, w + K, w + 2K, ... of the rank's epoch, which is the order the DataLoader hands them out in.
4. Each worker shuffles its part with a shuffle buffer whose choices are simulated on sample indices
   before any byte is read. The order of every sample is therefore known up front, so resuming at
   batch j reads only what is still to come, decodes nothing it skips, and yields the same bytes as
   the run that never stopped.

A sample that cannot be read (corrupt image, truncated or unreachable shard) is replaced by a good
sample of the same batch, counted in `batch.bad` and reported once on stderr with the shard and key:
every rank still yields the same number of full batches. A batch with no readable sample at all has
`batch.readable` False and the trainer skips the step on every rank: no step learns from placeholder
pixels. (Refilling it from earlier batches would make the batch depend on what the worker read
before, and a resume at that batch would differ from the run that never stopped.)
"""

from __future__ import annotations

import io
import json
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distvae.data.decode import CELEBA_CROP, CELEBA_SIZE, IMAGE_EXTS, crop_side, decode_sample
from distvae.errors import UserError
from distvae.data.shards import READ_TIMEOUT, Shard, ShardError, read_samples


@dataclass
class Batch:
    images: torch.Tensor  # uint8 (B, H, W, C), as decoded
    cond: torch.Tensor | None  # float (B, cond_dim) of 0/1 attributes, when asked for
    bad: int  # samples in this batch that could not be read and were replaced by readable ones
    bad_shards: tuple[str, ...] = ()  # the shards those samples came from
    readable: bool = True  # False: no sample of this batch could be read (its pixels are zeros: do not train on it)

    def to(self, device: torch.device | str, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Float images (B, C, H, W) in [0, 1] on the device; uint8 crosses the bus, 4x less than float."""
        images = self.images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        # (B, H, W, C) permuted is already channels_last in memory; make it NCHW-contiguous otherwise.
        images = images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        cond = self.cond.to(device, non_blocking=True) if self.cond is not None else None
        return images, cond


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs to produce its batches (picklable, no open files)."""

    shards: tuple[Shard, ...]
    batch_size: int
    resolution: int
    channels: int
    crop: int | str  # "auto" or a side in pixels (decode.crop_side); shards cropped at pack time are not cropped
    hflip: bool
    shuffle_buffer: int
    seed: int
    rank: int
    world_size: int
    workers: int  # logical workers: max(1, num_workers)
    train: bool  # True: shuffled, equal whole batches per rank; False: every sample once, in order
    cond_dim: int
    read_timeout: float = READ_TIMEOUT  # seconds a pipe: or http shard may stay silent

    @property
    def total(self) -> int:
        return sum(shard.samples for shard in self.shards)

    def rank_batches(self) -> int:
        return self.total // self.world_size // self.batch_size

    def shard_order(self, epoch: int) -> list[int]:
        if not self.train:
            return list(range(len(self.shards)))
        return np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(len(self.shards)).tolist()

    def worker_range(self, worker: int) -> tuple[int, int, int]:
        """(first position, end position, batches) of a logical worker in the epoch's sample sequence."""
        if self.train:
            batches = self.rank_batches()
            rank_begin = self.rank * batches * self.batch_size
            per_worker = [batches // self.workers + (w < batches % self.workers) for w in range(self.workers)]
            begin = rank_begin + sum(per_worker[:worker]) * self.batch_size
            return begin, begin + per_worker[worker] * self.batch_size, per_worker[worker]
        rank_begin = self.rank * self.total // self.world_size
        rank_end = (self.rank + 1) * self.total // self.world_size
        size = rank_end - rank_begin
        begin = rank_begin + worker * size // self.workers
        end = rank_begin + (worker + 1) * size // self.workers
        return begin, end, -(-(end - begin) // self.batch_size)


def buffer_shuffle(length: int, buffer: int, rng: np.random.Generator) -> list[int]:
    """The order in which a shuffle buffer of this size emits positions 0..length-1 read in order."""
    if buffer <= 1 or length <= 1:
        return list(range(length))
    draws = rng.random(length)
    held, order = [], []
    for position in range(length):
        held.append(position)
        if len(held) >= buffer:
            pick = int(draws[position] * len(held))
            held[pick], held[-1] = held[-1], held[pick]
            order.append(held.pop())
    rng.shuffle(held)
    return order + held


def mix64(*values: int) -> int:
    """splitmix64 over the values: a cheap, order-independent per-sample coin."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return state ^ (state >> 29)


def _report(spec: StreamSpec, message: str) -> None:
    print(f"[distvae data] rank {spec.rank}: {message}", file=sys.stderr, flush=True)


def _segments(spec: StreamSpec, order: list[int], begin: int, end: int) -> list[tuple[Shard, int, int, int]]:
    """Cut positions [begin, end) of the epoch sequence into (shard, first index, end index, position)."""
    segments, offset = [], 0
    for shard_index in order:
        shard = spec.shards[shard_index]
        low, high = max(begin, offset), min(end, offset + shard.samples)
        if low < high:
            segments.append((shard, low - offset, high - offset, low))
        offset += shard.samples
    return segments


def _read_positions(spec, segments, needed: set[int]) -> Iterator[tuple[int, dict | None, Shard]]:
    """Yield (position, sample or None when unreadable, its shard) for every needed position, in read order."""
    for shard, first, end, position0 in segments:
        missing = set(range(position0, position0 + end - first)) & needed
        if not missing:
            continue
        try:
            wanted = lambda index, p0=position0, f=first: p0 + index - f in needed  # noqa: E731
            for index, sample in read_samples(shard.url, first, end, wanted, spec.read_timeout):
                position = position0 + index - first
                missing.discard(position)
                yield position, sample, shard
        except (OSError, ShardError, ValueError) as error:
            _report(spec, f"shard {shard.url} {error}; {len(missing)} samples after the damage are replaced")
        else:
            if missing:
                _report(spec, f"shard {shard.url} holds fewer samples than its manifest says; {len(missing)} replaced")
        for position in sorted(missing):
            yield position, None, shard


def worker_batches(spec: StreamSpec, epoch: int, worker: int, skip: int = 0) -> Iterator[dict]:
    """The batches of one logical worker in one epoch, after skipping its first `skip` batches."""
    begin, end, batches = spec.worker_range(worker)
    length = batches * spec.batch_size if spec.train else end - begin
    if spec.train and spec.shuffle_buffer > 1:
        rng = np.random.default_rng([spec.seed, epoch, spec.rank, spec.world_size, worker, spec.workers])
        order = buffer_shuffle(length, spec.shuffle_buffer, rng)
    else:
        order = list(range(length))
    remaining = [begin + offset for offset in order[skip * spec.batch_size :]]
    if not remaining:
        return
    reader = _read_positions(spec, _segments(spec, spec.shard_order(epoch), begin, end), set(remaining))
    pending: dict[int, tuple[dict | None, Shard]] = {}
    for batch_start in range(0, len(remaining), spec.batch_size):
        targets = remaining[batch_start : batch_start + spec.batch_size]
        images = np.empty((len(targets), spec.resolution, spec.resolution, spec.channels), dtype=np.uint8)
        cond = np.zeros((len(targets), spec.cond_dim), dtype=np.float32) if spec.cond_dim else None
        good, bad_shards = [], set()
        for slot, position in enumerate(targets):
            while position not in pending:
                read_position, sample, shard = next(reader)
                pending[read_position] = sample, shard
            sample, shard = pending.pop(position)
            if sample is not None and _fill(spec, epoch, position, sample, shard, images, cond, slot):
                good.append(slot)
            else:
                bad_shards.add(shard.url)
        for slot in sorted(set(range(len(targets))) - set(good)):  # replace with good samples of this batch
            source = good[slot % len(good)] if good else None
            images[slot] = images[source] if good else 0  # no good sample: `readable` False, the step is skipped
            if cond is not None:
                cond[slot] = cond[source] if good else 0
        yield {"images": torch.from_numpy(images), "cond": None if cond is None else torch.from_numpy(cond),
               "bad": len(targets) - len(good), "bad_shards": sorted(bad_shards), "readable": bool(good)}


_noticed: set[str] = set()


def _notice_once(spec: StreamSpec, kind: str, message: str) -> None:
    """Report the first notice of each kind in this process (a folder of many sizes says it once)."""
    if kind not in _noticed:
        _noticed.add(kind)
        _report(spec, message)


def _fill(spec: StreamSpec, epoch: int, position: int, sample: dict, shard: Shard, images, cond, slot: int) -> bool:
    try:
        crop = 0 if shard.cropped else spec.crop  # 0 on a square image: the whole image
        notice = lambda text: _notice_once(spec, "crop", text)  # noqa: E731
        image = decode_sample(sample, spec.resolution, crop, spec.channels, notice)
        if cond is not None:
            attrs = json.loads(sample["json"])["attrs"]
            if len(attrs) != spec.cond_dim:
                raise ValueError(f"has {len(attrs)} attributes, model.cond_dim is {spec.cond_dim}")
            cond[slot] = attrs
    except Exception as error:  # any undecodable sample is replaced, never fatal
        _report(spec, f"skipping sample {sample.get('__key__')} (epoch {epoch}): {type(error).__name__}: {error}")
        return False
    if spec.hflip and spec.train and mix64(spec.seed, epoch, position) & 1:
        image = image[:, ::-1]
    images[slot] = image
    return True


class _EpochDataset(IterableDataset):
    def __init__(self, spec: StreamSpec, epoch: int, start_batch: int):
        self.spec, self.epoch, self.start_batch = spec, epoch, start_batch

    def __iter__(self):
        info = get_worker_info()
        workers = self.spec.workers
        physical = info.id if info is not None else 0
        if info is None and workers > 1:
            raise RuntimeError("a multi-worker stream must run under a DataLoader with num_workers workers")
        # The DataLoader always starts with physical worker 0; after a resume at batch j, worker 0 must
        # play the logical worker that made batch j, so the interleaving continues unchanged.
        worker = (physical + self.start_batch) % workers
        skip = max(0, -(-(self.start_batch - worker) // workers))
        yield from worker_batches(self.spec, self.epoch, worker, skip)


def check_attributes(shard: Shard, cond_dim: int) -> None:
    """A conditional model needs shards whose samples carry cond_dim attributes: say so before training."""
    try:
        first = next(read_samples(shard.url, 0, 1), (0, {}))[1]
        attrs = json.loads(first.get("json", b"{}")).get("attrs")
    except (OSError, ShardError, ValueError) as error:
        raise UserError(f"cannot read the first sample of {shard.url}: {error}") from None
    if attrs is None:
        raise UserError(f"model.cond_dim={cond_dim} but the samples of {shard.url} carry no attributes "
                        f"(pack a CelebA root with list_attr_celeba.txt, or set model.cond_dim=0)")
    if len(attrs) != cond_dim:
        raise UserError(f"model.cond_dim={cond_dim} but the samples of {shard.url} carry {len(attrs)} attributes: "
                        f"set model.cond_dim={len(attrs)}")


def describe_crop(shards: list[Shard], crop: int | str, resolution: int) -> str:
    """One line saying what the stream does to the images, from the first sample of the first shard."""
    shard = shards[0]
    try:
        sample = next(read_samples(shard.url, 0, 1), (0, {}))[1]
    except (OSError, ShardError, ValueError):
        sample = {}
    if shard.cropped:
        return (f"data: {shard.url} was cropped at pack time ({shard.cropped}): no crop in training, "
                f"resized to {resolution} px (data.crop={crop} does not apply)")
    if "npy" in sample:
        return f"data: pre-resized npy samples: resized to {resolution} px, no crop (data.crop={crop} does not apply)"
    ext = next((ext for ext in IMAGE_EXTS[1:] if ext in sample), None)
    if ext is None:
        return f"data: the first sample of {shard.url} holds no image; data.crop={crop}, {resolution} px"
    try:
        width, height = Image.open(io.BytesIO(sample[ext])).size
    except Exception:  # reported by the stream itself when it meets the sample
        return f"data: the first image of {shard.url} cannot be read; data.crop={crop}, {resolution} px"
    side = crop_side(width, height, crop)
    rule = ("CelebA's aligned layout: centre crop 168" if crop == "auto" and side == CELEBA_CROP and
            (width, height) == CELEBA_SIZE else f"centre {side}x{side} square")
    larger = f"; data.crop={crop} is larger than the image" if crop != "auto" and int(crop) > min(width, height) else ""
    return (f"data: original images (the first is {width}x{height}): {rule}, then resized to {resolution} px "
            f"(data.crop={crop}{larger})")


def _ignore_stop_signals(worker_id: int) -> None:
    """Data workers leave SIGTERM/SIGINT to the training process, which saves a checkpoint first.

    SLURM (scancel, preemption) signals every process of the job. torch's workers die of a SIGTERM
    that does not come from their parent, and the training process would then crash mid-step with
    "DataLoader worker is killed" instead of saving. Workers still exit when the training process
    ends: the DataLoader shuts them down, and their watchdog notices a dead parent.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ShardStream:
    def __init__(
        self,
        shards: list[Shard],
        *,
        batch_size: int,
        resolution: int,
        channels: int = 3,
        crop: int | str = "auto",
        hflip: bool = False,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        train: bool = True,
        cond_dim: int = 0,
        pin_memory: bool = False,
        read_timeout: float = READ_TIMEOUT,
    ):
        self.spec = StreamSpec(
            tuple(shards), batch_size, resolution, channels, crop, hflip, shuffle_buffer, seed, rank,
            world_size, max(1, num_workers), train, cond_dim, read_timeout,
        )
        self.num_workers, self.pin_memory = num_workers, pin_memory
        if cond_dim:
            check_attributes(shards[0], cond_dim)
        if train and self.spec.rank_batches() == 0:
            raise UserError(
                f"the training shards hold {self.spec.total} samples, fewer than world_size x batch_size = "
                f"{world_size} x {batch_size}: lower data.batch_size or add data"
            )
        self.epoch, self.batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        """Batches every rank yields per training epoch (the same on all ranks)."""
        return self.spec.rank_batches()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def _epoch(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        dataset = _EpochDataset(self.spec, epoch, start_batch)
        if self.num_workers == 0:
            batches = iter(dataset)
        else:
            batches = iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                      pin_memory=self.pin_memory, prefetch_factor=4,
                                      worker_init_fn=_ignore_stop_signals))
        for item in batches:
            yield Batch(item["images"], item["cond"], item["bad"], tuple(item["bad_shards"]), item["readable"])

    def __iter__(self) -> Iterator[Batch]:
        """Endless training batches from the current position; the position advances as batches are taken."""
        if not self.spec.train:
            yield from self._epoch(0, 0)
            return
        while True:
            if self.batch >= self.batches_per_epoch:
                self.epoch, self.batch = self.epoch + 1, 0
            for batch in self._epoch(self.epoch, self.batch):
                self.batch += 1
                yield batch
            if self.batch < self.batches_per_epoch:
                raise RuntimeError(f"epoch {self.epoch} ended after {self.batch} of {self.batches_per_epoch} batches")
