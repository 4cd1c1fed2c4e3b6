"""`data.num_workers=auto`: how many decoding processes a rank gets, from its cores and the shard format.

- Cores: the CPUs this process may run on (`os.sched_getaffinity`), capped by SLURM's
  `SLURM_CPUS_PER_TASK` when it is set, and divided among the ranks a launcher started on this
  machine that share them (`LOCAL_WORLD_SIZE`, set by torchrun and accelerate launch).
- Pre-resized npy shards decode almost for free: a worker costs more in moving batches between
  processes than it saves (on 2 cores one worker halved the rate), so 0 below 4 cores and 1 above,
  which overlaps the reads with the step.
- Original JPEG (or PNG) bytes need decoding: every core but the training process's, up to 8.
- `data.cache=host|device` reads everything once up front: no workers.

The planned order (local shards) does not depend on the worker count, so auto may pick another count
after a requeue on another machine and the run still resumes exactly. Sequential shards (pipe:,
http) do depend on it: a resumed run keeps the count its checkpoint was read with.
"""

from __future__ import annotations

import os

from distvae.data.shards import Shard, ShardError, read_samples

MAX_WORKERS = 8


def rank_cores(environ=os.environ) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        cores = min(cores, int(environ["SLURM_CPUS_PER_TASK"]))
    sharing = int(environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(1, sharing))


def is_preresized(shards: list[Shard]) -> bool:
    try:
        sample = next(read_samples(shards[0].url, 0, 1), (0, {}))[1]
    except (OSError, ShardError, ValueError):
        return False
    return "npy" in sample


def auto_workers(shards: list[Shard], cache: str, environ=os.environ) -> tuple[int, str]:
    """(workers, the reason in words) for this rank."""
    if cache != "none":
        return 0, f"data.cache={cache}"
    cores = rank_cores(environ)
    if is_preresized(shards):
        return (0 if cores < 4 else 1), f"{cores} cores for this rank, pre-resized npy shards"
    return min(MAX_WORKERS, max(0, cores - 1)), f"{cores} cores for this rank, images decoded in training"
