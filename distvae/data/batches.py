"""Batches of one data worker: which positions it reads, how it reads them, and what replaces a bad sample.

Two readers, one batch format:
- `planned_batches` (training on local or mounted shards): the positions of every batch come from the
  global plan (plan.py) and each sample is read at its offset in its shard (shards.SeekableShards).
  Physical worker p of K makes the rank's batches j0 + p, j0 + p + K, ... counted from where the epoch
  (or the resume) starts: the order in which a DataLoader takes them from its workers. What a batch
  holds depends on its positions alone, never on K.
- `sequential_batches` (pipe: and http shards, which only read front to back; and validation): each
  rank reads a contiguous slice of the epoch's shard sequence, each logical worker a contiguous part of
  it, shuffled through a buffer whose choices are simulated on positions before any byte is read.

Each batch is a dict of plain tensors: images uint8 (B, H, W, C), cond, positions int64 (B,) in the
epoch's order, epoch, bad (replaced samples), bad_shards, readable. A sample that cannot be read or
decoded is replaced by a good sample of the same batch, chosen by a coin keyed by (seed, epoch,
position): the same on every run, topology and resume. A batch with no good sample has `readable`
False and zeros for pixels: the trainer skips that step on every rank and never trains on it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import numpy as np
import torch

from distvae.data.decode import decode_sample
from distvae.data.plan import GlobalPlan
from distvae.data.seekable import SeekableShards
from distvae.data.shards import Shard, ShardError, read_samples

REPLACE_SALT = 0x5E91ACE  # keys the choice of the good sample that stands in for a bad one
_C1, _C2, _C3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


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
    """splitmix64 over the values: a cheap per-sample coin (flips, replacements)."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return state ^ (state >> 29)


def mix64_array(*values) -> np.ndarray:
    """`batches.mix64` elementwise over uint64 arrays (scalars broadcast): the same coins, vectorised."""
    with np.errstate(over="ignore"):
        state = np.full(np.broadcast(*values).shape, _C1, dtype=np.uint64)
        for value in values:
            state = (state ^ np.asarray(value).astype(np.int64).astype(np.uint64)) * _C2
            state = (state ^ (state >> np.uint64(31))) * _C3
        return state ^ (state >> np.uint64(29))


def _report(spec, message: str) -> None:
    print(f"[distvae data] rank {spec.rank}: {message}", file=sys.stderr, flush=True)


_noticed: set[str] = set()


def _notice_once(spec, kind: str, message: str) -> None:
    """Report the first notice of each kind in this process (a folder of many sizes says it once)."""
    if kind not in _noticed:
        _noticed.add(kind)
        _report(spec, message)


# ---------------------------------------------------------------------------------------------------------
# The global plan: local shards, random access


def endless_planned_batches(spec, epoch: int, start_sample: int, start_batch: int, physical: int,
                            workers: int) -> Iterator[dict]:
    """Epoch after epoch from (epoch, start_sample, start_batch), for workers that live across epochs.

    A DataLoader takes batch g of this endless sequence from worker g % workers, so physical worker p
    makes every workers-th batch counted from p, across epoch boundaries: in each epoch it starts where
    the batches taken so far leave it."""
    taken, reader = 0, SeekableShards()  # one reader: shard indexes are kept from epoch to epoch
    try:
        while True:
            remaining = spec.rank_batches(start_sample) - start_batch
            yield from planned_batches(spec, epoch, start_sample, start_batch, (physical - taken) % workers, workers,
                                       reader)
            taken += remaining
            epoch, start_sample, start_batch = epoch + 1, 0, 0
    finally:
        reader.close()


def planned_batches(spec, epoch: int, start_sample: int, start_batch: int, physical: int,
                    workers: int, reader: SeekableShards | None = None) -> Iterator[dict]:
    """Physical worker `physical` of `workers`: the rank's batches start_batch + physical + k * workers."""
    plan = GlobalPlan(tuple(shard.samples for shard in spec.shards), spec.seed, spec.shuffle_block)
    owned, reader = reader is None, reader or SeekableShards()
    try:
        mine = range(start_batch + physical, spec.rank_batches(start_sample), workers)
        for _, positions, shard_indices, indices in plan.planned(epoch, mine, spec.global_batch, spec.world_size,
                                                                 spec.rank, spec.accum, spec.batch_size, start_sample):
            gathered = None if spec.cond_dim else _gather_npy(spec, reader, epoch, positions, shard_indices, indices)
            if gathered is None:
                samples = [_read_at(spec, reader, spec.shards[shard], int(index))
                           for shard, index in zip(shard_indices.tolist(), indices.tolist())]
                gathered = _assemble(spec, epoch, positions, samples)
            yield gathered
    finally:
        if owned:
            reader.close()


def _gather_npy(spec, reader: SeekableShards, epoch: int, positions: np.ndarray, shard_indices: np.ndarray,
                indices: np.ndarray) -> dict | None:
    """The batch by one slice a sample when all its shards hold fixed-layout npy pixels, else None.

    The same bytes as decoding each sample (decode._from_array returns such a payload as it is), the
    same flip coins and the same replacements: only the per-sample tar and npy parsing is gone. A
    conditional model needs each sample's attributes (JSON), so it takes the per-sample path."""
    count, shape = len(positions), (spec.resolution, spec.resolution, spec.channels)
    images, good = np.empty((count, *shape), dtype=np.uint8), np.zeros(count, dtype=bool)
    for shard in sorted(set(shard_indices.tolist())):  # not np.unique: its first call imports numpy.ma (15 ms)
        slots = np.flatnonzero(shard_indices == shard)
        try:
            present = reader.gather_npy(spec.shards[shard].url, indices[slots], shape, images, slots)
        except ShardError:
            present = np.zeros(len(slots), dtype=bool)
        if present is None:
            return None
        if not present.all():  # the per-sample reader names the damage, once
            _read_at(spec, reader, spec.shards[shard], int(indices[slots[~present][0]]))
        good[slots] = present
    return finish_gathered(spec, epoch, np.asarray(positions, dtype=np.int64), shard_indices,
                           torch.from_numpy(images), None, good)


def index_on(device: torch.device, rows: np.ndarray) -> torch.Tensor:
    """int64 rows as a tensor on `device`; to a GPU through page-locked memory, so the host does not wait for it
    (a copy from pageable memory does)."""
    index = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
    if device.type != "cuda":
        return index
    return index.pin_memory().to(device, non_blocking=True)


def finish_gathered(spec, epoch: int, positions: np.ndarray, shard_indices: np.ndarray, images: torch.Tensor,
                    cond: torch.Tensor | None, good: np.ndarray) -> dict:
    """A gathered batch (pixels as read, `good` where a sample was read) made a batch dict as _assemble makes:
    good samples flipped by _fill's coin, then each bad slot a copy of a good sample chosen by the same coin."""
    if spec.hflip and spec.train:
        flip = (mix64_array(spec.seed, epoch, positions) & np.uint64(1)).astype(bool) & good
        if images.device.type == "cpu":  # one image at a time: about 4x one batched index-flip-scatter on CPU
            for slot in np.flatnonzero(flip).tolist():
                images[slot] = images[slot].flip(1)
        elif flip.any():
            where = index_on(images.device, np.flatnonzero(flip))
            images[where] = images[where].flip(2)
    bad_shards: list[str] = []
    if not good.all():
        slots = np.flatnonzero(good).tolist()
        bad_shards = sorted({spec.shards[shard].url for shard in shard_indices[~good].tolist()})
        for slot in np.flatnonzero(~good).tolist():
            if not slots:  # `readable` False: the step is skipped, these zeros are never trained on
                images[slot] = 0
                continue
            source = slots[mix64(spec.seed, epoch, int(positions[slot]), REPLACE_SALT) % len(slots)]
            images[slot] = images[source]
            if cond is not None:
                cond[slot] = cond[source]
    return {"images": images, "cond": cond, "bad": int((~good).sum()), "bad_shards": bad_shards,
            "readable": bool(good.any()), "positions": torch.from_numpy(positions), "epoch": epoch}


def _read_at(spec, reader: SeekableShards, shard: Shard, index: int) -> tuple[dict | None, Shard]:
    try:
        return reader.sample(shard.url, index), shard
    except (OSError, ShardError, ValueError) as error:
        _notice_once(spec, f"shard {shard.url}", f"shard {shard.url} {error}; the samples it cannot give are "
                                                 f"replaced by good samples of their batches")
        return None, shard


# ---------------------------------------------------------------------------------------------------------
# Sequential reading: pipe: and http shards, validation


def sequential_batches(spec, epoch: int, worker: int, skip: int = 0) -> Iterator[dict]:
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
        for position in targets:
            while position not in pending:
                read_position, sample, shard = next(reader)
                pending[read_position] = sample, shard
        samples = [pending.pop(position) for position in targets]
        yield _assemble(spec, epoch, np.asarray(targets, dtype=np.int64), samples)


def _segments(spec, order: list[int], begin: int, end: int) -> list[tuple[Shard, int, int, int]]:
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


# ---------------------------------------------------------------------------------------------------------
# One batch from its samples


def _assemble(spec, epoch: int, positions: np.ndarray, samples: list[tuple[dict | None, Shard]]) -> dict:
    count = len(samples)
    images = np.empty((count, spec.resolution, spec.resolution, spec.channels), dtype=np.uint8)
    cond = np.zeros((count, spec.cond_dim), dtype=np.float32) if spec.cond_dim else None
    good, bad_shards = [], set()
    for slot, ((sample, shard), position) in enumerate(zip(samples, positions.tolist())):
        if sample is not None and _fill(spec, epoch, position, sample, shard, images, cond, slot):
            good.append(slot)
        else:
            bad_shards.add(shard.url)
    if len(good) < count:
        for slot in sorted(set(range(count)) - set(good)):
            if not good:  # `readable` False: the step is skipped, these zeros are never trained on
                images[slot] = 0
                continue
            source = good[mix64(spec.seed, epoch, int(positions[slot]), REPLACE_SALT) % len(good)]
            images[slot] = images[source]
            if cond is not None:
                cond[slot] = cond[source]
    return {"images": torch.from_numpy(images), "cond": None if cond is None else torch.from_numpy(cond),
            "bad": count - len(good), "bad_shards": sorted(bad_shards), "readable": bool(good),
            "positions": torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64)), "epoch": epoch}


def _fill(spec, epoch: int, position: int, sample: dict, shard: Shard, images, cond, slot: int) -> bool:
    decoded = decode_one(spec, sample, shard, f"epoch {epoch}")
    if decoded is None:
        return False
    image, attrs = decoded
    if cond is not None:
        cond[slot] = attrs
    if spec.hflip and spec.train and mix64(spec.seed, epoch, position) & 1:
        image = image[:, ::-1]
    images[slot] = image
    return True


def decode_one(spec, sample: dict, shard: Shard, where: str) -> tuple[np.ndarray, list | None] | None:
    """(uint8 image, attributes or None) of one sample, or None (reported) when it cannot be decoded."""
    try:
        crop = 0 if shard.cropped else spec.crop  # 0 on a square image: the whole image
        notice = lambda text: _notice_once(spec, "crop", text)  # noqa: E731
        image = decode_sample(sample, spec.resolution, crop, spec.channels, notice)
        attrs = None
        if spec.cond_dim:
            attrs = json.loads(sample["json"])["attrs"]
            if len(attrs) != spec.cond_dim:
                raise ValueError(f"has {len(attrs)} attributes, model.cond_dim is {spec.cond_dim}")
    except Exception as error:  # any undecodable sample is replaced, never fatal
        _report(spec, f"skipping sample {sample.get('__key__')} ({where}): {type(error).__name__}: {error}")
        return None
    return image, attrs
