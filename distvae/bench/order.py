"""What the global plan buys and costs, for `distvae bench data`: batch diversity and random-access reads.

- Diversity (simulated, no data): distinct shards per batch of 64 over one epoch of a CelebA-size
  training split (162,770 samples in 163 shards of 1,000), for the global plan at the default shuffle
  block, for the sequential shard-plus-buffer reader that pipe:/http shards keep (one rank, a
  1,000-sample buffer), and for an ideal uniform shuffle (the expectation of distinct shards in 64 draws).
- Access: samples per CPU second read by the random-access path (SeekableShards, at the plan's random
  positions) against a sequential read of the same shards (read_samples), in interleaved rounds, from
  the page cache. Both return raw member bytes; decoding is measured by the main table.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from distvae.config import DataConfig
from distvae.data.batches import buffer_shuffle
from distvae.data.plan import GlobalPlan
from distvae.data.seekable import SeekableShards
from distvae.data.shards import Shard, read_samples

CELEBA_COUNTS = [1000] * 162 + [770]
BATCH = 64


def batch_diversity(counts: list[int] = CELEBA_COUNTS, shuffle_block: int | None = None, seed: int = 0) -> dict:
    shuffle_block = DataConfig().shuffle_block if shuffle_block is None else shuffle_block
    plan = GlobalPlan(counts, seed, shuffle_block)
    steps = plan.batches_per_epoch(BATCH)
    planned = [len(np.unique(plan.samples(0, np.arange(t * BATCH, (t + 1) * BATCH))[0])) for t in range(steps)]
    # The sequential reader: shards in a seeded order, read front to back through a buffer of 1,000 samples.
    order, starts = plan.shard_order(0)
    emitted = np.asarray(buffer_shuffle(steps * BATCH, DataConfig().shuffle_buffer, np.random.default_rng(seed)))
    shard_of = order[np.searchsorted(starts, emitted, side="right") - 1]
    sequential = [len(np.unique(shard_of[t * BATCH : (t + 1) * BATCH])) for t in range(steps)]
    shards = len(counts)
    return {
        "samples": int(sum(counts)), "shards": shards, "batch": BATCH, "shuffle_block": shuffle_block,
        "planned": float(np.mean(planned)), "sequential_buffer": float(np.mean(sequential)),
        "ideal": shards * (1 - (1 - 1 / shards) ** BATCH),
    }


def access_rates(shards: list[Shard], seconds: float, rounds: int, seed: int = 0) -> dict:
    """Samples per CPU second: random access at planned positions vs a sequential read, interleaved."""
    plan = GlobalPlan([shard.samples for shard in shards], seed, 0)
    shard_index, index = plan.samples(0, np.arange(plan.total))
    targets = [(shards[s].url, int(i)) for s, i in zip(shard_index.tolist(), index.tolist())]
    reader = SeekableShards()

    def random_access(limit: float) -> float:
        done, cpu0, wall0 = 0, time.process_time(), time.perf_counter()
        while time.perf_counter() - wall0 < limit:
            url, i = targets[done % len(targets)]
            reader.sample(url, i)
            done += 1
        return done / max(time.process_time() - cpu0, 1e-9)

    def sequential(limit: float) -> float:
        done, cpu0, wall0 = 0, time.process_time(), time.perf_counter()
        while time.perf_counter() - wall0 < limit:
            for shard in shards:
                done += sum(1 for _ in read_samples(shard.url))
                if time.perf_counter() - wall0 >= limit:
                    break
        return done / max(time.process_time() - cpu0, 1e-9)

    random_access(0.2), sequential(0.2)  # warm-up: the shard indexes, the page cache
    rates = {"random_access": [], "sequential": []}
    for round_ in range(rounds):
        pair = (("random_access", random_access), ("sequential", sequential))
        for name, measure in pair if round_ % 2 == 0 else pair[::-1]:
            rates[name].append(measure(seconds / rounds / 2))
    reader.close()
    median = {name: statistics.median(values) for name, values in rates.items()}
    return {**median, "ratio": median["random_access"] / median["sequential"], "per_round": rates}


def order_lines(diversity: dict, access: dict) -> list[str]:
    return [
        f"batch diversity ({diversity['samples']:,} samples in {diversity['shards']} shards, "
        f"batch {diversity['batch']}): "
        f"{diversity['planned']:.1f} distinct shards per batch with the global plan (shuffle block "
        f"{diversity['shuffle_block']:,}), {diversity['sequential_buffer']:.1f} with the sequential reader "
        f"(pipe:/http; 1,000-sample buffer); an ideal shuffle gives {diversity['ideal']:.1f}",
        f"random access: {access['random_access']:,.0f} samples/s per core against {access['sequential']:,.0f} "
        f"read sequentially ({access['ratio']:.2f}x), raw bytes from the page cache",
    ]
