"""The global plan at cluster scale, simulated (no data needed): time and peak memory for one rank.

    distvae bench plan                                          # 10^8 samples, 10^5 shards, 1,024 ranks x 64
    distvae bench plan --samples 162770 --shards 163 --world-size 8 --json plan.json

It plans, for the last rank, its first micro-batch and then every micro-batch of one whole epoch,
exactly as the stream asks the plan for them, and measures wall time and the peak of Python/NumPy
allocations (tracemalloc) while doing so. It also counts distinct shards per batch against what an
ideal uniform shuffle would give, and checks that the rank's samples in the epoch are all different.
"""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import numpy as np

from distvae.data.plan import GlobalPlan
from distvae.errors import UserError


def bench_plan(samples: int = 10**8, shards: int = 10**5, world_size: int = 1024, batch_size: int = 64,
               shuffle_block: int = 2**18, seed: int = 0, json_path: str | None = None) -> dict:
    if min(samples, shards, world_size, batch_size) < 1 or shuffle_block < 0 or shards > samples:
        raise UserError("--samples, --shards, --world-size and --batch-size must be positive, shards <= samples")
    base, extra = divmod(samples, shards)
    counts = [base + (index < extra) for index in range(shards)]
    global_batch = world_size * batch_size
    rank = world_size - 1
    tracemalloc.start()
    started = time.perf_counter()
    plan = GlobalPlan(counts, seed=seed, shuffle_block=shuffle_block)
    steps = plan.batches_per_epoch(global_batch)
    if steps == 0:
        raise UserError(f"{samples:,} samples hold no global batch of {world_size} x {batch_size}")
    first_shards, _ = plan.rank_samples(0, 0, global_batch, world_size, rank, 0, batch_size)
    first_batch = time.perf_counter() - started
    _, first_peak = tracemalloc.get_traced_memory()
    seen, distinct = [], []
    for step in range(steps):
        shard_index, index = plan.rank_samples(0, step, global_batch, world_size, rank, 0, batch_size)
        seen.append(shard_index.astype(np.int64) * (base + 1) + index)  # a unique id per sample
        distinct.append(len(np.unique(shard_index)))
    epoch = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rank_ids = np.concatenate(seen)
    ideal = shards * (1 - (1 - 1 / shards) ** batch_size)  # expected distinct shards of a uniform draw
    report = {
        "samples": samples, "shards": shards, "world_size": world_size, "batch_size": batch_size,
        "shuffle_block": shuffle_block, "steps_per_epoch": steps, "rank": rank,
        "first_batch_seconds": first_batch, "first_batch_peak_mib": first_peak / 2**20,
        "epoch_seconds": epoch, "epoch_peak_mib": peak / 2**20,
        "rank_samples_in_epoch": int(rank_ids.size), "rank_samples_distinct": int(np.unique(rank_ids).size),
        "distinct_shards_per_batch": float(np.mean(distinct)), "ideal_distinct_shards_per_batch": ideal,
        "first_batch_shards": int(len(np.unique(first_shards))),
    }
    print(f"plan: {samples:,} samples in {shards:,} shards, {world_size:,} ranks x batch {batch_size} "
          f"({steps:,} global batches per epoch), shuffle block {shuffle_block or samples:,}")
    all_distinct = report["rank_samples_distinct"] == rank_ids.size
    print(f"rank {rank}: first batch planned in {first_batch * 1e3:.1f} ms, peak {first_peak / 2**20:.1f} MiB; "
          f"its whole epoch ({rank_ids.size:,} samples, all distinct: {all_distinct}) in {epoch:.2f} s, "
          f"peak {peak / 2**20:.1f} MiB")
    print(f"distinct shards per batch of {batch_size}: {report['distinct_shards_per_batch']:.1f} "
          f"(an ideal uniform shuffle: {ideal:.1f})")
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report
