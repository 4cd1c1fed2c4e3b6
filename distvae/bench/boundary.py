"""The stall at an epoch boundary: the wait for each epoch's first batch against the steady wait per batch.

    python -m distvae.bench.boundary SHARDS_MANIFEST RESOLUTION WORKERS

Reads three epochs of the training split at batch 64 with no model (the stream alone, as fast as it
goes) and prints the first batch's wait, the median wait per batch, and the waits at the two
boundaries. Before data workers lived across epochs, each boundary started new worker processes.
"""

from __future__ import annotations

import statistics
import sys
import time

from distvae.data.shards import resolve_shards
from distvae.data.stream import ShardStream


def main(argv: list[str]) -> None:
    spec, resolution, workers = argv[0], int(argv[1]), int(argv[2])
    stream = ShardStream(resolve_shards(spec, split="train"), batch_size=64, resolution=resolution,
                         num_workers=workers, shuffle_block=0)
    gaps, epochs = [], []
    batches, last = iter(stream), time.perf_counter()
    for _ in range(3 * stream.batches_per_epoch):
        batch = next(batches)
        now = time.perf_counter()
        gaps.append(now - last)
        epochs.append(batch.epoch)
        last = now
    boundary = [gaps[i] for i in range(1, len(gaps)) if epochs[i] != epochs[i - 1]]
    print(f"{workers} workers: first batch {gaps[0] * 1e3:.0f} ms, steady {statistics.median(gaps[5:]) * 1e3:.1f} "
          f"ms/batch, epoch-boundary batches {', '.join(f'{g * 1e3:.0f}' for g in boundary)} ms")


if __name__ == "__main__":
    main(sys.argv[1:])
