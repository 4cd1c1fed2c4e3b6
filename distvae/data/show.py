"""`distvae data plan`: the sample keys of a global batch, or of one rank's part of it.

    distvae data plan --config celeba64 --epoch 0 --step 120                      # the whole global batch
    distvae data plan --config celeba64 --step 120 --world-size 8 --rank 3        # what rank 3 trained on
    distvae data plan --config tiny data.train_shards=shards/x/manifest.json --step 5 --json plan.json

It reads data.train_shards, data.batch_size, data.global_batch, data.shuffle_block and run.seed from
the config (with overrides), exactly as training does, and the key of each sample from its shard's
headers. What it prints is what the stream yields at that step (ShardStream.locate gives the same).
"""

from __future__ import annotations

import json
from pathlib import Path

from distvae.config import Config
from distvae.data.plan import GlobalPlan, check_global_batch
from distvae.data.seekable import SeekableShards
from distvae.data.shards import ShardError, is_seekable, resolve_shards
from distvae.errors import UserError


def plan_rows(cfg: Config, epoch: int, step: int, world_size: int, rank: int | None) -> tuple[str, list[dict]]:
    """(a header line, one dict per sample: position, rank, micro_step, shard, index, key)."""
    shards = resolve_shards(cfg.data.train_shards, split="train")
    if not all(is_seekable(shard.url) for shard in shards):
        raise UserError("pipe: and http shards are read front to back, not by the global plan: the plan of "
                        "local or mounted shards only can be shown")
    global_batch = cfg.data.global_batch or world_size * cfg.data.batch_size * cfg.train.grad_accum_steps
    try:
        accum = check_global_batch(global_batch, world_size, cfg.data.batch_size)
    except ValueError as error:
        raise UserError(f"{error}: change --world-size, data.batch_size or data.global_batch") from None
    if rank is not None and not 0 <= rank < world_size:
        raise UserError(f"--rank {rank} is not a rank of --world-size {world_size}")
    plan = GlobalPlan([shard.samples for shard in shards], cfg.run.seed, cfg.data.shuffle_block)
    steps = plan.batches_per_epoch(global_batch)
    if not 0 <= step < steps:
        raise UserError(f"--step {step} is not a step of an epoch: it holds steps 0..{steps - 1} of {global_batch}")
    reader, rows = SeekableShards(), []
    try:
        for micro_step in range(accum):
            for each in range(world_size) if rank is None else (rank,):
                positions = plan.rank_positions(step, global_batch, world_size, each, micro_step, cfg.data.batch_size)
                shard_indices, indices = plan.samples(epoch, positions)
                for position, shard_index, index in zip(positions.tolist(), shard_indices.tolist(), indices.tolist()):
                    shard = shards[shard_index]
                    try:
                        key = reader.sample(shard.url, index)["__key__"]
                    except (OSError, ShardError) as error:
                        key = f"<unreadable: {error}>"
                    rows.append({"position": position, "rank": each, "micro_step": micro_step, "shard": shard.url,
                                 "index": index, "key": key})
    finally:
        reader.close()
    who = "all ranks" if rank is None else f"rank {rank} of {world_size}"
    header = (f"epoch {epoch}, step {step} of {steps}: global batch {global_batch} = {world_size} ranks x "
              f"{cfg.data.batch_size} x {accum} micro-steps; {who}: {len(rows)} samples (seed {cfg.run.seed}, "
              f"shuffle block {cfg.data.shuffle_block or plan.total})")
    return header, rows


def show_plan(cfg: Config, epoch: int, step: int, world_size: int, rank: int | None, json_path: str | None) -> None:
    header, rows = plan_rows(cfg, epoch, step, world_size, rank)
    print(header)
    print(f"{'position':>10} {'rank':>5} {'micro':>5}  key  (shard #index)")
    for row in rows:
        print(f"{row['position']:>10} {row['rank']:>5} {row['micro_step']:>5}  {row['key']}  "
              f"({Path(row['shard']).name} #{row['index']})")
    if json_path:
        Path(json_path).write_text(json.dumps({"header": header, "samples": rows}, indent=1) + "\n")
