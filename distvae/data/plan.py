"""The global plan: which sample sits at each position of an epoch, for any number of ranks and workers.

    plan = GlobalPlan([shard.samples for shard in shards], seed=0, shuffle_block=2**18)
    shard, index = plan.samples(epoch, positions)                       # any positions, O(1) each
    shard, index = plan.rank_samples(epoch, step, global_batch, world_size, rank, micro_step, batch_size)

An epoch is one order of all N samples, a pure function of (seed, epoch, the shards' sizes):
1. The shards are put in an order drawn from (seed, epoch) and seen as one sequence of N samples.
2. The sequence is cut into blocks of `shuffle_block` samples (0 = one block, the whole epoch); inside a
   block, positions are permuted by a keyed Feistel network (`permute`), so the image of a position is
   computed on its own and no permutation is ever held in memory: the plan costs O(shards), not O(N).
3. Global batch t of the epoch is positions [t * G, (t + 1) * G) for a global batch of G samples. Rank r
   takes, in micro-step m, positions [t * G + (m * world_size + r) * b, + b) of it.

So the samples of a global batch, and the place of each inside it, depend on G alone: 1 x 32, 2 x 16,
4 x 8 or 2 x 8 with two micro-steps train step t on the same 32 samples. A batch draws uniformly from a
window of `shuffle_block` samples spread over the shards that window covers: at the default 2^18 and
1,000 samples per shard, about 260 shards, so shards written in source order (by identity, class or
date) still give well-mixed batches. At most G - 1 samples of an epoch are left out (the tail past the
last whole global batch): different ones each epoch, as the order changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ROUNDS = 4  # Feistel rounds; 4 make a pseudo-random permutation of the block (Luby-Rackoff)


def _splitmix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (arithmetic wraps modulo 2^64)."""
    values = values.astype(np.uint64, copy=True)
    values ^= values >> np.uint64(30)
    values *= np.uint64(0xBF58476D1CE4E5B9)
    values ^= values >> np.uint64(27)
    values *= np.uint64(0x94D049BB133111EB)
    values ^= values >> np.uint64(31)
    return values


def mix_key(*parts: int) -> int:
    """One 64-bit key from several integers (seed, epoch, block, ...)."""
    state = np.array([0x9E3779B97F4A7C15], dtype=np.uint64)
    for part in parts:
        state = _splitmix(state ^ np.uint64(int(part) & 0xFFFFFFFFFFFFFFFF))
    return int(state[0])


def permute(positions, size: int, key) -> np.ndarray:
    """The image of each position under a keyed permutation of range(size).

    A balanced Feistel network on the smallest even number of bits that holds size - 1 is a bijection
    of [0, 2^bits); cycle walking (apply it again while the value is >= size) restricts it to a bijection
    of [0, size), with fewer than 4 applications on average since 2^bits < 4 * size. `key` may be one
    integer or one per position.
    """
    values = np.asarray(positions, dtype=np.uint64).copy()
    if size <= 1:
        return np.zeros(values.shape, dtype=np.int64)
    half = max(1, ((int(size) - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = np.broadcast_to(np.asarray(key, dtype=np.uint64) if np.ndim(key) else
                           np.uint64(int(key) & 0xFFFFFFFFFFFFFFFF), values.shape).reshape(-1)
    round_keys = [_splitmix(keys ^ np.uint64(0xA5A5A5A5 * (r + 1))) for r in range(ROUNDS)]

    def once(x: np.ndarray, which: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for round_key in round_keys:
            left, right = right, left ^ (_splitmix(right ^ round_key[which]) & mask)
        return (left << np.uint64(half)) | right

    everything = np.arange(values.size)
    flat = values.reshape(-1)
    flat[:] = once(flat, everything)
    outside = np.flatnonzero(flat >= size)
    while outside.size:  # cycle walking
        flat[outside] = once(flat[outside], outside)
        outside = outside[flat[outside] >= size]
    return flat.reshape(values.shape).astype(np.int64)


def check_global_batch(global_batch: int, world_size: int, batch_size: int) -> int:
    """Micro-steps per optimizer step for this topology; ValueError when it does not divide the global batch."""
    per_micro_step = world_size * batch_size
    if global_batch < 1 or global_batch % per_micro_step:
        raise ValueError(f"a global batch of {global_batch} is not a multiple of world_size x data.batch_size = "
                         f"{world_size} x {batch_size}")
    return global_batch // per_micro_step


class GlobalPlan:
    def __init__(self, counts: Sequence[int], seed: int, shuffle_block: int = 2**18):
        self.counts = np.asarray(counts, dtype=np.int64)
        if self.counts.ndim != 1 or not len(self.counts) or (self.counts < 0).any():
            raise ValueError("a plan needs the sample count of at least one shard")
        self.total = int(self.counts.sum())
        self.seed = int(seed)
        self.block = int(shuffle_block) if 0 < shuffle_block < self.total else self.total
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None  # (epoch, shard order, its starts)

    def batches_per_epoch(self, global_batch: int) -> int:
        return self.total // global_batch

    def shard_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's shard order and where each of those shards starts in the epoch's sequence."""
        if self._epoch is None or self._epoch[0] != epoch:
            order = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(len(self.counts))
            starts = np.concatenate([[0], np.cumsum(self.counts[order])])
            self._epoch = (epoch, order, starts)
        return self._epoch[1], self._epoch[2]

    def samples(self, epoch: int, positions) -> tuple[np.ndarray, np.ndarray]:
        """(shard, index in that shard) of the sample at each position of the epoch's order."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.total):
            raise IndexError(f"positions {positions.min()}..{positions.max()} run past its end: the epoch holds "
                             f"{self.total} samples")
        blocks, offsets = np.divmod(positions, self.block)
        sizes = np.minimum(self.block, self.total - blocks * self.block)
        keys = _splitmix(np.uint64(mix_key(self.seed, epoch, 0xB10C)) ^ blocks.astype(np.uint64))
        sequence = np.empty_like(positions)
        for size in sorted(set(sizes.tolist())):  # every block has `block` samples but the last (np.unique's
            # first call imports numpy.ma: 15 ms of a resume)
            chosen = sizes == size
            sequence[chosen] = blocks[chosen] * self.block + permute(offsets[chosen], int(size), keys[chosen])
        order, starts = self.shard_order(epoch)
        slots = np.searchsorted(starts, sequence, side="right") - 1
        return order[slots], sequence - starts[slots]

    @staticmethod
    def rank_positions(step: int, global_batch: int, world_size: int, rank: int, micro_step: int,
                       batch_size: int, start: int = 0) -> np.ndarray:
        """Positions of rank `rank`'s micro-batch `micro_step` of global batch `step` (counted from `start`)."""
        first = start + step * global_batch + (micro_step * world_size + rank) * batch_size
        return np.arange(first, first + batch_size, dtype=np.int64)

    def planned(self, epoch: int, batches, global_batch: int, world_size: int, rank: int, accum: int,
                batch_size: int, start: int = 0, ahead: int = 32):
        """(batch, positions, shards, indices) of each of this rank's micro-batches `batches` (numbered from
        `start`, `accum` micro-batches a step). The samples of `ahead` batches are computed in one call: on a
        micro-batch of 64 the permutation's NumPy calls cost more than their arithmetic (0.4 ms a batch)."""
        batches = list(batches)
        for first in range(0, len(batches), ahead):
            chunk = batches[first : first + ahead]
            positions = [self.rank_positions(batch // accum, global_batch, world_size, rank, batch % accum,
                                             batch_size, start) for batch in chunk]
            shards, indices = self.samples(epoch, np.concatenate(positions))
            for number, (batch, where) in enumerate(zip(chunk, positions)):
                cut = slice(number * batch_size, (number + 1) * batch_size)
                yield batch, where, shards[cut], indices[cut]

    def rank_samples(self, epoch: int, step: int, global_batch: int, world_size: int, rank: int, micro_step: int,
                     batch_size: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        return self.samples(epoch, self.rank_positions(step, global_batch, world_size, rank, micro_step,
                                                       batch_size, start))
