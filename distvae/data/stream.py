"""The training data stream: shards -> deterministic, equal, resumable batches on every rank.

    shards = resolve_shards("shards/celeba/manifest.json", split="train")
    stream = ShardStream(shards, batch_size=64, resolution=64, seed=0, rank=rank, world_size=world,
                         accum=2, num_workers=4)
    note = stream.load_state_dict(saved)   # continue where a checkpoint left off ("" when exactly)
    ShardStream(..., cache="host")         # the split decoded once into memory (cache.py): same batches
    for batch in stream:                   # endless: epoch after epoch
        images, cond = batch.to(device)    # float (B, C, H, W) in [0, 1] on the device
        batch.positions, batch.epoch       # each sample's place in the epoch's global order

Training on seekable shards (local or mounted files) follows the global plan (`plan.py`): global batch
t of an epoch is always the same samples in the same places, and in micro-step m rank r takes its
slice [(m * world_size + r) * batch_size, + batch_size) of it. Only the global batch
(world_size x batch_size x accum) decides what is trained on: the number of data workers never does,
and a resume with another world size and per-rank batch at the same global batch continues exactly.
The position is the sample where the epoch's next global batch starts (`sample_in_epoch`).

Training on pipe: or http shards (which can only be read front to back) keeps the per-rank order:
each rank reads a contiguous slice of the epoch's shard sequence, shuffled through a buffer. It is
exact on resume only with the same world size, batch size and worker count; otherwise the data
continues at the next epoch and `load_state_dict` says so. Validation reads every sample once, in order.

Either way data workers live across epochs: one DataLoader serves the whole run, so an epoch boundary
starts no process.

Every rank yields the same number of whole batches per epoch. A sample that cannot be read is
replaced by a good sample of its batch and reported; a batch with no readable sample has
`readable` False and is not trained on (see batches.py).
"""

from __future__ import annotations

import atexit
import dataclasses
import io
import json
import signal
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distvae.data.batches import endless_planned_batches, sequential_batches
from distvae.data.cache import SampleCache, cached_batches
from distvae.data.decode import CELEBA_CROP, CELEBA_SIZE, IMAGE_EXTS, crop_side
from distvae.data.plan import GlobalPlan, check_global_batch
from distvae.data.shards import READ_TIMEOUT, Shard, ShardError, is_seekable, read_samples
from distvae.errors import UserError


@dataclass
class Batch:
    images: torch.Tensor  # uint8 (B, H, W, C), as decoded
    cond: torch.Tensor | None  # float (B, cond_dim) of 0/1 attributes, when asked for
    bad: int  # samples in this batch that could not be read and were replaced by readable ones
    bad_shards: tuple[str, ...] = ()  # the shards those samples came from
    readable: bool = True  # False: no sample of this batch could be read (its pixels are zeros: do not train on it)
    positions: torch.Tensor | None = None  # int64 (B,): each sample's position in the epoch's order
    epoch: int = 0

    def pin_memory(self) -> Batch:
        """The CPU tensors in page-locked memory, so their copies to a GPU do not make the host wait (the
        DataLoader calls this with pin_memory=True; the stream itself when it reads in the main process)."""
        def pin(tensor):
            if tensor is None or tensor.device.type != "cpu" or tensor.is_pinned():
                return tensor
            return tensor.pin_memory()

        return dataclasses.replace(self, images=pin(self.images), cond=pin(self.cond), positions=pin(self.positions))

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
    accum: int = 1  # micro-batches per optimizer step: global batch = world_size x batch_size x accum
    shuffle_block: int = 2**18  # global plan: samples per shuffle block; 0 = the whole epoch
    planned: bool = False  # True: the global plan (training, seekable shards); False: sequential reading

    @property
    def total(self) -> int:
        return sum(shard.samples for shard in self.shards)

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size * self.accum

    def rank_batches(self, start_sample: int = 0) -> int:
        """Batches each rank yields in an epoch (planned: from position start_sample on)."""
        if self.planned:
            return (self.total - start_sample) // self.global_batch * self.accum
        return self.total // self.world_size // self.batch_size

    def shard_order(self, epoch: int) -> list[int]:
        if not self.train:
            return list(range(len(self.shards)))
        counts = tuple(shard.samples for shard in self.shards)  # the plan's shard order: one formula for both readers
        return GlobalPlan(counts, self.seed, self.shuffle_block).shard_order(epoch)[0].tolist()

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


class _EndlessDataset(IterableDataset):
    """Planned training batches epoch after epoch, for a DataLoader whose workers live across epochs."""

    def __init__(self, spec: StreamSpec, epoch: int, start_sample: int, start_batch: int):
        self.spec, self.epoch, self.start_sample, self.start_batch = spec, epoch, start_sample, start_batch

    def __iter__(self):
        info = get_worker_info()
        physical, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        yield from endless_planned_batches(self.spec, self.epoch, self.start_sample, self.start_batch, physical,
                                           workers)


class _SequentialDataset(IterableDataset):
    """Sequential batches (pipe: and http shards) from (epoch, start_batch) on: epoch after epoch for training,
    for a DataLoader whose workers live across epochs; one pass for validation."""

    def __init__(self, spec: StreamSpec, epoch: int, start_batch: int):
        self.spec, self.epoch, self.start_batch = spec, epoch, start_batch

    def __iter__(self):
        info = get_worker_info()
        workers = self.spec.workers
        physical = info.id if info is not None else 0
        if info is None and workers > 1:
            raise RuntimeError("a multi-worker stream must run under a DataLoader with num_workers workers")
        # Logical worker w makes batches w, w + workers, ... of an epoch, and a DataLoader takes its batches from
        # the physical workers in turn. So after `taken` batches (a resume at batch j counts as -j), physical
        # worker p plays logical worker (p - taken) % workers: the interleaving goes on unchanged across a resume
        # and across epoch boundaries, whatever an epoch's batch count.
        epoch, taken = self.epoch, -self.start_batch
        while True:
            worker = (physical - taken) % workers
            skip = max(0, -(-(-taken - worker) // workers)) if epoch == self.epoch else 0
            yield from sequential_batches(self.spec, epoch, worker, skip)
            if not self.spec.train:
                return
            taken += self.spec.rank_batches()
            epoch += 1


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
        accum: int = 1,
        shuffle_block: int = 2**18,
        cache: str = "none",
        device: torch.device | str = "cpu",
    ):
        planned = train and all(is_seekable(shard.url) for shard in shards)
        self.spec = StreamSpec(
            tuple(shards), batch_size, resolution, channels, crop, hflip, shuffle_buffer, seed, rank,
            world_size, max(1, num_workers), train, cond_dim, read_timeout, accum, shuffle_block, planned,
        )
        check_global_batch(self.spec.global_batch, world_size, batch_size)
        self.num_workers, self.pin_memory = num_workers, pin_memory
        if cond_dim:
            check_attributes(shards[0], cond_dim)
        if train and self.spec.rank_batches() == 0:
            what = "the global batch (world_size x batch_size x accumulation)" if planned else \
                "world_size x batch_size"
            raise UserError(f"the training shards hold {self.spec.total} samples, fewer than {what} = "
                            f"{self.spec.global_batch if planned else world_size * batch_size}: lower "
                            f"data.batch_size or add data")
        self.epoch = 0
        self.start_sample = 0  # planned: where this epoch's first global batch (of this size) started
        self.batch = 0  # batches taken since start_sample
        self.cache, self._validation_loader = None, None
        if cache != "none" and train:
            if not planned:
                raise UserError(f"data.cache={cache} needs local (seekable) training shards; pipe: and http shards "
                                f"are read front to back: copy them to local disk, or use data.cache=none")
            self.cache = SampleCache.build(self.spec, torch.device(device) if cache == "device" else
                                           torch.device("cpu"), cache)

    @property
    def batches_per_epoch(self) -> int:
        """Batches every rank yields per training epoch (the same on all ranks)."""
        return self.spec.rank_batches()

    def state_dict(self) -> dict:
        """The position, as plain data."""
        if self.spec.planned:
            step, micro_step = divmod(self.batch, self.spec.accum)
            return {"order": "global", "epoch": self.epoch, "sample_in_epoch": self.start_sample
                    + step * self.spec.global_batch, "micro_batch": micro_step, "global_batch": self.spec.global_batch}
        return {"order": "sequential", "epoch": self.epoch, "batch": self.batch, "world_size": self.spec.world_size,
                "batch_size": self.spec.batch_size, "workers": self.spec.workers}

    def load_state_dict(self, state: dict) -> str:
        """Continue from a saved position; returns "" when exactly, else one line saying where the data goes on."""
        epoch = int(state["epoch"])
        order = state.get("order")
        if order is None:
            return self._next_epoch(epoch, "the checkpoint's data position predates the global data order")
        if order != ("global" if self.spec.planned else "sequential"):
            return self._next_epoch(epoch, f"the checkpoint read the data in {order} order, this run reads it in "
                                           f"{'global' if self.spec.planned else 'sequential'} order")
        if not self.spec.planned:
            same = (state["world_size"], state["batch_size"], state["workers"]) == (
                self.spec.world_size, self.spec.batch_size, self.spec.workers)
            if not same:
                return self._next_epoch(epoch, f"sequential shards (pipe: or http) were read by {state['world_size']} "
                                               f"ranks x batch {state['batch_size']} x {state['workers']} workers, now "
                                               f"{self.spec.world_size} x {self.spec.batch_size} x {self.spec.workers}")
            self.epoch, self.start_sample, self.batch = epoch, 0, int(state["batch"])
            return ""
        sample, saved_batch = int(state["sample_in_epoch"]), int(state["global_batch"])
        self.epoch, self.start_sample = epoch, sample
        if saved_batch == self.spec.global_batch:
            self.batch = int(state["micro_batch"])
            return ""
        self.batch = 0
        if self.spec.rank_batches(sample) == 0:
            return self._next_epoch(epoch, f"the global batch changed from {saved_batch} to {self.spec.global_batch} "
                                           f"with fewer than {self.spec.global_batch} samples left in epoch {epoch}")
        return (f"the global batch changed from {saved_batch} to {self.spec.global_batch}: the data continues at "
                f"sample {sample:,} of epoch {epoch}, the same place; the steps from here on hold other samples")

    def locate(self, epoch: int, positions) -> list[tuple[Shard, int]]:
        """(shard, index in the shard) of the sample at each position of the epoch: what a batch's rows are."""
        positions = np.asarray(positions, dtype=np.int64)
        if self.spec.planned:
            counts = tuple(shard.samples for shard in self.spec.shards)
            plan = GlobalPlan(counts, self.spec.seed, self.spec.shuffle_block)
            shard_indices, indices = plan.samples(epoch, positions)
        else:  # sequential: positions run through the epoch's shard order, shard after shard
            order = np.asarray(self.spec.shard_order(epoch))
            starts = np.concatenate([[0], np.cumsum([self.spec.shards[i].samples for i in order])])
            slots = np.searchsorted(starts, positions, side="right") - 1
            shard_indices, indices = order[slots], positions - starts[slots]
        return [(self.spec.shards[shard], int(index)) for shard, index in zip(shard_indices.tolist(), indices.tolist())]

    def seek(self, epoch: int, batch: int = 0) -> None:
        """Put the stream at this rank's batch `batch` of epoch `epoch` (for tools and tests)."""
        self.epoch, self.start_sample, self.batch = epoch, 0, batch

    def _next_epoch(self, epoch: int, why: str) -> str:
        self.epoch, self.start_sample, self.batch = epoch + 1, 0, 0
        return f"{why}: the data continues at the start of epoch {epoch + 1}"

    def _validation_pass(self) -> Iterator[Batch]:
        """Every sample once, in order (validation runs many times: its workers stay, each pass restarts them)."""
        dataset = _SequentialDataset(self.spec, 0, 0)
        if self.num_workers == 0:
            items = iter(dataset)
        else:
            if self._validation_loader is None:
                self._validation_loader = self._loader(dataset, persistent=True)
            items = iter(self._validation_loader)
            _live_loaders.add(items)
        yield from map(self._to_batch, items)

    def _endless(self) -> Iterator[Batch]:
        """Training batches from the current position on, epoch after epoch, from one source: the plan's (local
        shards), the cache's, or the sequential reader's (pipe: and http)."""
        if self.cache is not None:
            items = cached_batches(self.spec, self.cache, self.epoch, self.start_sample, self.batch)
        else:
            dataset = _EndlessDataset(self.spec, self.epoch, self.start_sample, self.batch) if self.spec.planned \
                else _SequentialDataset(self.spec, self.epoch, self.batch)
            items = iter(dataset) if self.num_workers == 0 else iter(self._loader(dataset))
        if self.num_workers and self.cache is None:
            _live_loaders.add(items)
        yield from map(self._to_batch, items)

    def _to_batch(self, item: dict) -> Batch:
        batch = _to_batch(item)
        return batch.pin_memory() if self.pin_memory else batch  # a DataLoader has pinned it already: kept as is

    def _loader(self, dataset, persistent: bool = False) -> DataLoader:
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                          prefetch_factor=4, worker_init_fn=_ignore_stop_signals, persistent_workers=persistent)

    def __iter__(self) -> Iterator[Batch]:
        """Endless training batches from the current position; the position advances as batches are taken."""
        if not self.spec.train:
            yield from self._validation_pass()
            return
        if self.batch >= self.spec.rank_batches(self.start_sample):
            self.epoch, self.start_sample, self.batch = self.epoch + 1, 0, 0
        for batch in self._endless():
            if batch.epoch != self.epoch:
                if self.batch != self.spec.rank_batches(self.start_sample):
                    raise RuntimeError(f"epoch {self.epoch} ended after {self.batch} of "
                                       f"{self.spec.rank_batches(self.start_sample)} batches")
                self.epoch, self.start_sample, self.batch = batch.epoch, 0, 0
            self.batch += 1
            yield batch


# Workers ignore SIGTERM (see _ignore_stop_signals), so multiprocessing's exit handler, which terminates
# and joins them, would wait forever for any loader still open at interpreter exit (a script that stops
# iterating mid-epoch: the endless loader, a sequential epoch's, validation's persistent one). Registered
# after multiprocessing's handler, this one runs first.
_live_loaders: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_live_loaders() -> None:
    for items in list(_live_loaders):
        items._shutdown_workers()


def _to_batch(item: dict) -> Batch:
    return Batch(item["images"], item["cond"], item["bad"], tuple(item["bad_shards"]), item["readable"],
                 item["positions"], item["epoch"])
