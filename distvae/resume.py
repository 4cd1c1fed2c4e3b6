"""Resuming: which checkpoint, whether its data is ours, and loading everything a run continues from.

    latest = choose_checkpoint(checkpointer, accelerator)          # rank 0 decides, every rank agrees
    notes = check_dataset(resumed.dataset, fingerprint, reset_data)
    notes = restore(latest, resumed, parts, stream, cfg, reset_data) # weights, optimizer, schedule, EMA, data

What may change on resume and what each change does is in state.py; this file applies it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list

from distvae.checkpoint import (
    Checkpointer,
    is_complete,
    load_ema_state,
    load_model_state,
    load_tensors,
    step_dir_name,
)
from distvae.config import Config, config_from_dict
from distvae.errors import UserError
from distvae.state import SCHEDULE, Schedule, TrainState, same_dataset


def choose_checkpoint(checkpointer: Checkpointer, accelerator) -> Path | None:
    """Rank 0 picks the latest complete checkpoint and every rank loads that one, or says it cannot see it.

    On a shared filesystem with stale caches, ranks listing the folder each would pick different steps.
    """
    step = None
    if accelerator.is_main_process:
        latest = checkpointer.latest()
        step = None if latest is None else int(latest.name.split("-")[1])
    if accelerator.num_processes > 1:
        step = broadcast_object_list([step])[0]
    folder = None if step is None else checkpointer.root / step_dir_name(step)
    problem = "" if folder is None or is_complete(folder) else \
        f"rank {accelerator.process_index} cannot see {folder}, the checkpoint rank 0 resumes from"
    if accelerator.num_processes > 1:
        problems = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(problems, problem)
        problem = next((text for text in problems if text), "")
    if problem:
        raise UserError(f"{problem}: RUN_DIR must be on a filesystem every node shares")
    return folder


def check_dataset(saved: str, current: str, reset_data: bool) -> list[str]:
    same, notice = same_dataset(saved, current)
    if not same and not reset_data:
        raise UserError(f"the training shards hold other data than the checkpoint's ({saved} vs {current}): point "
                        f"data.train_shards at the same shards, or pass --reset-data to continue the weights on "
                        f"these from the next epoch")
    return ([notice] if notice else []) + ([] if same else ["other training data (--reset-data)"])


def restore(folder: Path, resumed: TrainState, parts, stream, cfg: Config, rank: int, reset_data: bool,
            notes: list[str]) -> list[str]:
    """Load weights, optimizer, schedule, scaler, RNG, EMA and the data position; returns more notes."""
    parts.raw_model.load_state_dict(load_model_state(folder))
    parts.optimizer.load_state_dict(load_tensors(folder / "optimizer.pt"))
    parts.scheduler.load_state_dict(load_tensors(folder / "scheduler.pt"))
    if parts.scaler is not None and (folder / "scaler.pt").exists():
        parts.scaler.load_state_dict(load_tensors(folder / "scaler.pt"))
    restore_rng(folder, rank)
    added = [restore_ema(parts.ema, folder, resumed.ema_updates)]
    apply_resumed_config(cfg, config_from_dict(resumed.config), parts.schedule, parts.optimizer, parts.scheduler,
                         resumed.step)
    if reset_data and any("(--reset-data)" in note for note in notes):
        stream.seek(int(resumed.data.get("epoch", 0)) + 1)
        added.append(f"the data starts at epoch {stream.epoch} of the new plan")
    else:
        added.append(stream.load_state_dict(resumed.data))
    return added


def apply_resumed_config(cfg: Config, saved: Config, schedule: Schedule, optimizer, scheduler, step: int) -> None:
    """The config of this run wins over what the checkpoint's optimizer and scheduler hold, from the next step.

    LambdaLR would keep the saved base lr; the optimizer, the saved betas and weight decay. A changed
    schedule is anchored at the factor the run had reached, so the lr continues without a jump.
    """
    if any(getattr(saved.train, key.split(".")[1]) != getattr(cfg.train, key.split(".")[1]) for key in SCHEDULE):
        schedule.anchor = {"step": step, "factor": Schedule(saved, schedule.anchor)(step)}
    scheduler.base_lrs = [cfg.train.lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group.update(lr=cfg.train.lr * schedule(step), betas=(cfg.train.beta1, cfg.train.beta2),
                     weight_decay=cfg.train.weight_decay)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def restore_rng(folder: Path, rank: int) -> None:
    path = folder / f"rng-rank{rank:05d}.pt"
    if path.exists():
        states = load_tensors(path)
        torch.set_rng_state(states["cpu"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state(states["cuda"])


def restore_ema(ema, folder: Path, updates: int) -> str:
    """Load the checkpoint's EMA; "" when it did, else one line on what the EMA starts from."""
    saved = load_ema_state(folder)
    if ema is None:
        return "" if saved is None else "train.ema_decay=0: the checkpoint's EMA is not used and no EMA is kept"
    if saved is None:
        return f"{folder.name} holds no EMA: the EMA starts from the current weights"
    ema.load_state_dict(saved, updates)
    return ""
