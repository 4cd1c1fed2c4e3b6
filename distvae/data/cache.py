"""`data.cache=host|device`: the training split decoded once into memory, each batch one gather by the plan.

    cache = SampleCache.build(spec, torch.device("cuda"))   # uint8 (N, R, R, C), on the GPU
    for batch in cached_batches(spec, cache, epoch, start_sample, start_batch): ...   # endless

Pre-resized CelebA is small (2.4 GB at 64 px, 9.8 GB at 128), and a GPU trains on 64 px images far
faster than a dozen cores decode them. Read once, a batch costs one `index_select` of its rows, and
the horizontal flip runs where the pixels are (on the GPU with `device`). No data worker is needed.

The batches are the stream's, bit for bit: the same plan positions (plan.py), the same decode
(`batches.decode_one`), the same flip coin and the same rule for a sample that cannot be read (a good
sample of its batch, chosen by a coin keyed by seed, epoch and position). Resume, coverage and the
global-batch rules are the stream's, since only where the pixels come from changes. Samples that cannot
be read are reported once, while the cache is built, and still counted in every batch that meets them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import numpy as np
import torch

from distvae.data.batches import decode_one, finish_gathered, index_on
from distvae.data.plan import GlobalPlan
from distvae.data.seekable import SeekableShards
from distvae.data.shards import ShardError, read_samples
from distvae.errors import UserError

HEADROOM = 0.8  # the share of free memory a cache may take; the rest is the model's and the system's
AUTO_SHARE = 0.25  # data.cache=auto takes no more than this share, leaving room for workers, pinned copies, peers


def choose_cache(shards, resolution: int, channels: int, cond_dim: int) -> tuple[str, str]:
    """data.cache=auto: (host or none, why). Host when the shards are local pre-resized npy (read once, almost
    for free) and every local rank's copy together takes at most AUTO_SHARE of the free host memory."""
    from distvae.data.shards import is_seekable
    from distvae.data.workers import is_preresized

    if not all(is_seekable(shard.url) for shard in shards):
        return "none", "pipe: or http shards are read front to back"
    if not is_preresized(shards):
        return "none", "the shards hold images decoded in training, not pre-resized npy"
    needed = sum(shard.samples for shard in shards) * (resolution * resolution * channels + 4 * cond_dim)
    needed *= local_ranks()
    free = available_bytes(torch.device("cpu"))
    if needed > AUTO_SHARE * free:
        return "none", (f"the split would take {needed / 2**30:.1f} GiB of the {free / 2**30:.1f} GiB free "
                        f"(more than {AUTO_SHARE:.0%})")
    return "host", f"local pre-resized shards, {needed / 2**30:.2f} GiB of {free / 2**30:.1f} GiB free"


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as info:
        fields = dict(line.split(":", 1) for line in info)
    return int(fields["MemAvailable"].split()[0]) * 1024


def local_ranks() -> int:
    """Processes of this run on this machine: each holds its own host cache."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")).split("(")[0])


class SampleCache:
    def __init__(self, images: torch.Tensor, cond: torch.Tensor | None, good: np.ndarray, offsets: np.ndarray,
                 seconds: float):
        self.images, self.cond, self.good, self.offsets, self.seconds = images, cond, good, offsets, seconds
        self.pinned: list[torch.Tensor] = []  # rotating pinned buffers: a copy in flight never sees its buffer reused

    @property
    def nbytes(self) -> int:
        return self.images.numel() + (self.cond.numel() * 4 if self.cond is not None else 0)

    @staticmethod
    def check_fits(spec, device: torch.device, mode: str) -> None:
        per_image = spec.resolution * spec.resolution * spec.channels + 4 * spec.cond_dim
        copies = 1 if device.type == "cuda" else local_ranks()
        needed, free = spec.total * per_image * copies, available_bytes(device)
        if needed > HEADROOM * free:
            where = "GPU memory" if device.type == "cuda" else "host memory"
            each = f" ({copies} processes on this machine, one copy each)" if copies > 1 else ""
            raise UserError(f"data.cache={mode} needs {needed / 2**30:.1f} GiB of {where} for {spec.total:,} images "
                            f"of {spec.resolution}x{spec.resolution}x{spec.channels}{each}, and "
                            f"{free / 2**30:.1f} GiB is free: use data.cache=none"
                            + (" or device" if mode == "host" and torch.cuda.is_available() else ""))

    @classmethod
    def build(cls, spec, device: torch.device, mode: str = "host") -> SampleCache:
        """Every sample of spec.shards decoded once, in shard order; the shards are read front to back."""
        cls.check_fits(spec, device, mode)
        started = time.perf_counter()
        counts = [shard.samples for shard in spec.shards]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        images = np.zeros((spec.total, spec.resolution, spec.resolution, spec.channels), dtype=np.uint8)
        cond = np.zeros((spec.total, spec.cond_dim), dtype=np.float32) if spec.cond_dim else None
        good = np.zeros(spec.total, dtype=bool)
        reader = SeekableShards(keep_maps=1, keep_indexes=1)
        for number, shard in enumerate(spec.shards):
            if cond is None and _gathered_whole(spec, reader, shard, images, good, int(offsets[number])):
                continue
            try:
                for index, sample in read_samples(shard.url, 0, shard.samples):
                    decoded = decode_one(spec, sample, shard, "while filling data.cache")
                    if decoded is not None:
                        row = offsets[number] + index
                        images[row], good[row] = decoded[0], True
                        if cond is not None:
                            cond[row] = decoded[1]
            except (OSError, ShardError, ValueError) as error:
                print(f"[distvae data] rank {spec.rank}: shard {shard.url} {error}; its samples after the damage "
                      f"are replaced by good samples of their batches", flush=True)
        reader.close()
        pixels = torch.from_numpy(images)
        attributes = None if cond is None else torch.from_numpy(cond)
        if device.type == "cuda":
            pixels = pixels.to(device)
            attributes = None if attributes is None else attributes.to(device)
        return cls(pixels, attributes, good, offsets, time.perf_counter() - started)

    def gather(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        index = index_on(self.images.device, rows)
        if self.images.device.type != "cpu" or not torch.cuda.is_available():
            images = self.images.index_select(0, index)
        else:  # host cache for a GPU: gather straight into pinned memory for a non-blocking copy
            shape = (len(rows), *self.images.shape[1:])
            if not self.pinned or self.pinned[0].shape != shape:
                self.pinned = [torch.empty(shape, dtype=torch.uint8).pin_memory() for _ in range(4)]
            self.pinned.append(self.pinned.pop(0))
            images = torch.index_select(self.images, 0, index, out=self.pinned[-1])
        return images, None if self.cond is None else self.cond.index_select(0, index)


def _gathered_whole(spec, reader: SeekableShards, shard, images: np.ndarray, good: np.ndarray, first: int) -> bool:
    """A fixed-layout npy shard's pixels into images[first:], one copy for the shard (the per-sample decode
    cost 20 us a sample); False when the shard must be decoded sample by sample."""
    rows = np.arange(shard.samples)
    try:
        present = reader.gather_npy(shard.url, rows, images.shape[1:], images[first : first + shard.samples], rows)
    except ShardError:
        return False  # the per-sample reader names the damage
    if present is None or not present.all():
        return False
    good[first : first + shard.samples] = True
    return True


def cached_batches(spec, cache: SampleCache, epoch: int, start_sample: int, start_batch: int) -> Iterator[dict]:
    """The stream's batches from (epoch, start_sample, start_batch) on, epoch after epoch, as batch dicts."""
    plan = GlobalPlan(tuple(shard.samples for shard in spec.shards), spec.seed, spec.shuffle_block)
    while True:
        mine = range(start_batch, spec.rank_batches(start_sample))
        for _, positions, shard_indices, indices in plan.planned(epoch, mine, spec.global_batch, spec.world_size,
                                                                 spec.rank, spec.accum, spec.batch_size, start_sample):
            rows = cache.offsets[shard_indices] + indices
            yield _gathered(spec, cache, epoch, np.asarray(positions, dtype=np.int64), shard_indices, rows)
        epoch, start_sample, start_batch = epoch + 1, 0, 0


def _gathered(spec, cache: SampleCache, epoch: int, positions: np.ndarray, shard_indices: np.ndarray,
              rows: np.ndarray) -> dict:
    images, cond = cache.gather(rows)
    return finish_gathered(spec, epoch, positions, shard_indices, images, cond, cache.good[rows])
