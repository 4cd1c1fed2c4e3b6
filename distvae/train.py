"""Train a convolutional VAE.

    distvae train --config tiny                                    # one process (CPU or one GPU)
    python -m distvae.train --config tiny train.max_steps=200
    accelerate launch distvae/train.py --config celeba128 data.train_shards='shards/celeba/manifest.json'
    accelerate launch --config_file launch/accelerate/multi_gpu_bf16.yaml distvae/train.py --config celeba256
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 distvae/train.py --config tiny
    torchrun --nproc_per_node 8 distvae/train.py --config celeba128

Rerunning the same command with the same run.dir resumes from the latest complete checkpoint.
SIGUSR1, SIGTERM or Ctrl-C: every rank stops at the next step boundary, a checkpoint is saved and the
process exits with 75; rerun to continue. Under `accelerate launch` / torchrun the launcher forwards
SIGUSR1 only with PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 (our launch files set it).

BatchNorm across ranks: each rank normalises with its own batch statistics, and DDP broadcasts rank 0's
running statistics to every rank at each forward (broadcast_buffers), so all ranks hold the same
buffers and the saved model is rank-independent. train.sync_bn=true uses SyncBatchNorm instead (GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, broadcast_object_list

from distvae.checkpoint import (
    Checkpointer,
    is_complete,
    load_ema_state,
    load_model_state,
    load_tensors,
    load_train_state,
    step_dir_name,
    write_atomic,
)
from distvae.config import Config, add_config_arguments, config_from_args, config_from_dict
from distvae.data.plan import check_global_batch
from distvae.data.shards import resolve_shards
from distvae.data.stream import ShardStream, describe_crop
from distvae.ema import build_ema
from distvae.errors import UserError
from distvae.evaluate import reconstruction_pairs, sample_grid, validate
from distvae.guards import BufferSnapshot, DataHealth, StepVerdict, all_finite
from distvae.loss import elbo
from distvae.model import build_model
from distvae.noise import sample_noise
from distvae.runlock import LockLost, RunLock
from distvae.runtime import (
    EXIT_FINISHED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    StopFlag,
    TrainingFailed,
    check_launch,
    check_launch_environment,
    fail,
)
from distvae.state import (
    SCHEDULE,
    Schedule,
    TrainState,
    add_resume_arguments,
    check_resume,
    fingerprint,
    same_dataset,
)
from distvae.tracking import RunLog, WindowStats, new_run_id


def lr_factor(cfg: Config, step: int) -> float:
    """Linear warm-up to train.lr, then constant or cosine down to lr * min_lr_ratio at max_steps."""
    return Schedule(cfg)(step)


def accumulation_steps(cfg: Config, world: int) -> int:
    """Micro-batches per optimizer step: from data.global_batch when it is set, else train.grad_accum_steps."""
    if not cfg.data.global_batch:
        return cfg.train.grad_accum_steps
    try:
        return check_global_batch(cfg.data.global_batch, world, cfg.data.batch_size)
    except ValueError:
        raise UserError(f"data.global_batch={cfg.data.global_batch} is not a multiple of {world} processes x "
                        f"data.batch_size={cfg.data.batch_size}: change data.global_batch or data.batch_size") from None


def make_stream(cfg: Config, accelerator: Accelerator, spec: str, train: bool, accum: int = 1) -> ShardStream:
    return ShardStream(
        resolve_shards(spec, split="train" if train else "val"),
        batch_size=cfg.data.batch_size, resolution=cfg.model.resolution, channels=cfg.model.channels,
        crop=cfg.data.crop, hflip=cfg.data.hflip, shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.run.seed,
        rank=accelerator.process_index, world_size=accelerator.num_processes, num_workers=cfg.data.num_workers,
        train=train, cond_dim=cfg.model.cond_dim, pin_memory=accelerator.device.type == "cuda",
        read_timeout=cfg.data.read_timeout_s, accum=accum, shuffle_block=cfg.data.shuffle_block,
    )


def train(cfg: Config, reset_data: bool = False) -> int:
    # Processes: without GPUs, run DDP over gloo (cpu=True) so any launcher gives real multi-process training.
    check_launch_environment()
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.train.mixed_precision,
        log_with="wandb" if cfg.log.tracker == "wandb" else None,
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=True),
                         InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout_s))],
    )
    check_launch(accelerator.num_processes)
    if cfg.train.sync_bn and accelerator.device.type != "cuda":
        raise UserError("train.sync_bn=true needs GPUs (SyncBatchNorm is CUDA-only); leave it false on CPU")
    if cfg.train.mixed_precision == "fp16" and accelerator.scaler is None:
        raise UserError("train.mixed_precision=fp16 needs a GPU: on CPU Accelerate applies neither autocast nor a "
                        "GradScaler, so it would train in fp32 without saying so; use bf16 or no")
    stop = StopFlag()
    stop.install()
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes

    # Run directory (held by one run at a time), checkpoints, logs.
    run_dir = Path(cfg.run.dir)
    lock, lock_note = hold_run_dir(run_dir, cfg, accelerator)
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.every_steps, cfg.checkpoint.keep_last,
                                rank, accelerator.wait_for_everyone)
    latest = choose_checkpoint(checkpointer, accelerator)
    resumed, resume_notes = TrainState.from_json(load_train_state(latest)) if latest else (None, [])
    if resumed:
        resume_notes += check_resume(resumed.config, cfg, reset_data)
    log = RunLog(accelerator, run_dir, cfg.train.max_steps, cfg.log.tracker)
    if lock_note:
        log.info(lock_note)
    if accelerator.is_main_process:
        write_atomic(run_dir / "config.yaml", cfg.to_yaml())
    accelerator.wait_for_everyone()
    run_id = resumed.tracker_run_id if resumed and resumed.tracker_run_id else new_run_id()
    log.start_tracker(cfg.log.project, cfg.run.name or run_dir.name, run_id, cfg.to_dict())

    # Data: each rank reads its own part; the loader is not passed through accelerator.prepare().
    accum = accumulation_steps(cfg, world)
    stream = make_stream(cfg, accelerator, cfg.data.train_shards, train=True, accum=accum)
    log.info(describe_crop(list(stream.spec.shards), cfg.data.crop, cfg.model.resolution))
    dataset = fingerprint(list(stream.spec.shards))
    if resumed:
        same, notice = same_dataset(resumed.dataset, dataset)
        if not same and not reset_data:
            raise UserError(f"the training shards hold other data than the checkpoint's ({resumed.dataset} vs "
                            f"{dataset}): point data.train_shards at the same shards, or pass --reset-data to "
                            f"continue the weights on these from the next epoch")
        resume_notes += [notice] if notice else []
        resume_notes += [] if same else ["other training data (--reset-data)"]
    val_stream = make_stream(cfg, accelerator, cfg.data.val_shards, train=False) if cfg.data.val_shards else None

    # Model, optimizer, schedule. The same seed on every rank gives the same initial weights.
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model)
    if cfg.train.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2),
                                  weight_decay=cfg.train.weight_decay)
    schedule = Schedule(cfg, resumed.schedule if resumed else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step))  # a lambda: never saved
    # The schedule follows steps, applied or skipped; torch warns when the first step was a skipped one.
    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
    raw_model = model
    model, optimizer = accelerator.prepare(model, optimizer)
    # prepare() also wraps forward in autocast; the step and validation enter autocast themselves, visibly.
    for name in ("forward", "_original_forward"):
        raw_model.__dict__.pop(name, None)
    if cfg.train.compile:
        model = torch.compile(model)
    ema = build_ema(cfg.train, raw_model)  # fp32, on the device, every rank the same

    # Resume: weights, optimizer, schedule, RNG, data position, counters.
    step, samples_seen, bad_steps_total = 0, 0, 0
    if resumed:
        raw_model.load_state_dict(load_model_state(latest))
        optimizer.load_state_dict(load_tensors(latest / "optimizer.pt"))
        scheduler.load_state_dict(load_tensors(latest / "scheduler.pt"))
        if accelerator.scaler is not None and (latest / "scaler.pt").exists():
            accelerator.scaler.load_state_dict(load_tensors(latest / "scaler.pt"))
        restore_rng(latest, rank)
        resume_notes.append(restore_ema(ema, latest, resumed.ema_updates))
        step, samples_seen, bad_steps_total = resumed.step, resumed.samples_seen, resumed.bad_steps
        apply_resumed_config(cfg, config_from_dict(resumed.config), schedule, optimizer, scheduler, step)
        if reset_data and any("(--reset-data)" in note for note in resume_notes):
            stream.seek(int(resumed.data.get("epoch", 0)) + 1)
            resume_notes.append(f"the data starts at epoch {stream.epoch} of the new plan")
        else:
            resume_notes.append(stream.load_state_dict(resumed.data))
        log.info(f"resuming from {latest} at step {step}")
        for note in filter(None, resume_notes):
            log.info(f"resume: {note}")
    else:
        log.info(f"starting a new run in {run_dir}: {world} process(es) on {device.type}, global batch "
                 f"{stream.spec.global_batch} ({world} x {cfg.data.batch_size} x {accum} micro-batches), "
                 f"{stream.batches_per_epoch // accum} steps per epoch")
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", cfg.train.mixed_precision)
    if launcher_precision != cfg.train.mixed_precision:
        log.info(f"the launcher asks for mixed precision {launcher_precision}; the config's "
                 f"train.mixed_precision={cfg.train.mixed_precision} wins (override it to change)")
    write_status(run_dir, accelerator, "running", step)

    def save() -> Path:
        broadcast_buffers(raw_model, world)
        state_dict = raw_model.state_dict()
        if ema is not None:
            ema.copy_buffers(raw_model)  # rank 0's statistics, as in model.safetensors
        ema_state = ema.state_dict() if ema is not None else None
        if not all_finite([*state_dict.values(), *(ema_state or {}).values()]):  # parameters, buffers, the EMA
            raise TrainingFailed(f"the weights or BatchNorm statistics are not finite at step {step}; nothing was "
                                 f"saved. Lower train.lr and rerun to resume from the last checkpoint")
        state = TrainState(step, samples_seen, bad_steps_total, stream.state_dict(), run_id, dataset,
                           stream.spec.global_batch, schedule.anchor, cfg.to_dict(),
                           ema_updates=ema.updates if ema is not None else 0)
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        return checkpointer.save(step, state_dict, optimizer.state_dict(), scheduler.state_dict(), state.to_json(),
                                 scaler, ema_state)

    # The loop. One optimizer step = grad_accum_steps micro-batches.
    fixed_val_batch = next(iter(val_stream), None) if val_stream is not None and accelerator.is_main_process else None
    batches = iter(stream)
    consecutive_bad, window = 0, WindowStats(device)
    health = DataHealth(cfg.data.max_bad_fraction, cfg.data.bad_window)
    buffers = BufferSnapshot(raw_model)
    lock_problem = ""  # rank 0: set when another process has taken RUN_DIR/lock over
    log.start_progress(step)
    model.train()
    try:
        while step < cfg.train.max_steps:
            started = time.perf_counter()
            buffers.take()  # BatchNorm statistics before this step's forwards: a skipped step puts them back
            bad_samples, unreadable = 0, False
            for micro_step in range(accum):
                waited = time.perf_counter()
                batch = next(batches)
                window.data_seconds += time.perf_counter() - waited
                images, cond = batch.to(device, cfg.train.channels_last)
                # Keyed by each sample's place in the epoch: the same noise for any topology and worker count.
                eps = sample_noise(cfg.run.seed, batch.epoch, batch.positions, cfg.model.latent_dim, device)
                sync = micro_step == accum - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    with accelerator.autocast():  # the only autocast of the step: the loss leaves it for fp32
                        recon, mean, logvar = model(images, cond, eps)
                    terms = elbo(recon, images, mean, logvar, cfg.loss, step)
                    accelerator.backward(terms.total / accum)
                window.add(terms, images.shape[0])
                bad_samples, unreadable = bad_samples + batch.bad, unreadable or not batch.readable
                health.note_shards(batch.bad_shards)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip or float("inf"))

            # One collective per step, built on the device: the only wait for it is the .tolist() below.
            flags = torch.stack([
                (~window.step_loss_finite()).float(), (~torch.isfinite(grad_norm)).float(),
                torch.tensor(float(unreadable), device=device), torch.tensor(float(stop.requested), device=device),
                torch.tensor(float(bool(lock_problem)), device=device),
                torch.tensor(float(bad_samples), device=device),
            ])
            loss_bad, grad_bad, no_data, any_stop, lock_lost, step_bad_samples = \
                accelerator.reduce(flags, reduction="sum").tolist()
            verdict = StepVerdict.decide(loss_bad, grad_bad, no_data, accelerator.scaler is not None)
            if verdict.apply:
                optimizer.step()
            else:
                buffers.restore()
                if accelerator.scaler is not None:
                    # clip_grad_norm_ has unscaled the gradients: update() lowers the scale after an overflow and
                    # lets the next step unscale again (without it, that unscale_ raises).
                    accelerator.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if verdict.non_finite:
                consecutive_bad, bad_steps_total = consecutive_bad + 1, bad_steps_total + 1
                log.info(f"step {step + 1}: non-finite loss or gradient on some rank; update skipped on all ranks")
                if consecutive_bad >= cfg.train.max_bad_steps:
                    raise TrainingFailed(f"{consecutive_bad} consecutive non-finite steps (train.max_bad_steps); lower "
                                         f"train.lr or set train.grad_clip, then rerun to resume from the last "
                                         f"checkpoint")
            elif verdict.apply:
                consecutive_bad = 0
            if verdict.no_data:
                log.info(f"step {step + 1}: a batch with no readable sample on some rank; update skipped on all ranks")
            if lock_lost:
                raise LockLost(lock_problem or f"rank 0 lost {run_dir / 'lock'} to another process; stopping "
                                               f"without saving")
            scheduler.step()
            step += 1
            if ema is not None and verdict.apply and ema.due(step):
                ema.update(raw_model)  # a skipped step leaves the average as it was
            step_images = accum * cfg.data.batch_size  # per rank: every batch is full
            samples_seen += step_images * world
            window.step(grad_norm, time.perf_counter() - started, verdict, step_images, step_bad_samples)
            log.step(step, terms, window.last_images_per_second * world)
            data_failed = health.add(int(step_bad_samples), step_images * world)

            # End of step, in this order: log, validate, images, save; then stop, fail or finish.
            # A step due for validation validates even when a stop signal came, and a stop at the
            # last step is a finished run.
            last = step == cfg.train.max_steps
            if step % cfg.log.every_steps == 0 or last:
                scalars = window.reduce(accelerator)
                scalars.update({"train/lr": scheduler.get_last_lr()[0], "train/kl_weight": terms.kl_weight,
                                "train/samples_seen": samples_seen, "train/epoch": stream.epoch,
                                "train/bad_steps_total": bad_steps_total})
                log.scalars(step, scalars)
            if val_stream is not None and (cfg.train.val_every_steps and step % cfg.train.val_every_steps == 0
                                           or last):
                broadcast_buffers(raw_model, world)
                log.scalars(step, validate(raw_model, val_stream, cfg, accelerator, step))
                if ema is not None:
                    ema.copy_buffers(raw_model)
                    log.scalars(step, validate(ema.model, val_stream, cfg, accelerator, step, prefix="val_ema"))
            if accelerator.is_main_process and cfg.log.image_every_steps and (
                    step % cfg.log.image_every_steps == 0 or last):
                # Grids come from the EMA when there is one; their names say which weights drew them.
                log.images(step, image_grids(raw_model if ema is None else ema.model, cfg, fixed_val_batch, device,
                                             suffix="" if ema is None else "_ema"))
            if checkpointer.due(step) or last or any_stop or data_failed:
                path = save()
                log.info(f"saved {path}")
            if data_failed:
                raise TrainingFailed(health.message(cfg.data.max_bad_fraction, rank))
            if any_stop and not last:
                log.info(f"stop signal ({stop.signal_name or 'on another rank'}): saved {path}; exiting with code "
                         f"{EXIT_INTERRUPTED}, rerun the same command to resume")
                write_status(run_dir, accelerator, "interrupted", step)
                return EXIT_INTERRUPTED
            if lock is not None and step % cfg.log.every_steps == 0:
                lock_problem = lock_problem or lock_taken_over(lock)
        write_status(run_dir, accelerator, "finished", step)
        log.info(f"finished {step} steps; checkpoints in {run_dir / 'checkpoints'}, samples in {run_dir / 'samples'}")
        return EXIT_FINISHED
    except LockLost:
        raise  # RUN_DIR belongs to another process now: its status is not ours to write
    except TrainingFailed:
        write_status(run_dir, accelerator, "failed", step)
        raise
    except RuntimeError as error:
        if not (world > 1 and is_collective_failure(error)):
            raise
        write_status(run_dir, accelerator, "failed", step)
        first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise TrainingFailed(f"a collective failed at step {step + 1} on rank {rank}: another rank died or waited "
                             f"longer than train.collective_timeout_s={cfg.train.collective_timeout_s:g} s "
                             f"({first_line}); rerun to resume from the last checkpoint") from None
    finally:
        log.close()
        if lock is not None:
            lock.release()


def is_collective_failure(error: BaseException) -> bool:
    """A rank died or hung past train.collective_timeout_s. Gloo reports it as a plain RuntimeError (from
    DDP's backward, too), so the backends' own words are matched as well as torch's DistError."""
    markers = ("gloo", "NCCL", "ProcessGroup", "Timed out", "timed out", "Connection closed by peer",
               "Connection reset by peer")
    return isinstance(error, torch.distributed.DistError) or any(marker in str(error) for marker in markers)


def hold_run_dir(run_dir: Path, cfg: Config, accelerator: Accelerator) -> tuple[RunLock | None, str]:
    """Rank 0 locks RUN_DIR for the whole run; every rank learns whether it could (a one-line error if not)."""
    lock, note, problem = None, "", ""
    if accelerator.is_main_process:
        stale = cfg.run.lock_stale_s
        lock = RunLock(run_dir, stale_seconds=stale, heartbeat_seconds=min(30.0, stale / 4))
        try:
            note = lock.acquire()
        except UserError as error:
            lock, problem = None, str(error)
    if accelerator.num_processes > 1:
        problem = broadcast_object_list([problem])[0]
    if problem:
        raise UserError(problem)
    return lock, note


def lock_taken_over(lock: RunLock) -> str:
    """The reason another process now holds the lock, or "" while it is still ours."""
    try:
        lock.check()
    except LockLost as error:
        return str(error)
    return ""


def broadcast_buffers(model: torch.nn.Module, world: int) -> None:
    """Give every rank rank 0's BatchNorm statistics, as DDP does at the start of each forward.

    Each rank updates its running statistics from its own batch during the forward, so between two
    forwards they differ; checkpoints and validation use the same statistics on every rank.
    """
    if world > 1:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


def image_grids(model, cfg: Config, val_batch, device, suffix: str = "") -> dict:
    grids = {f"samples{suffix}": sample_grid(model, cfg.run.seed, count=64)}
    if val_batch is not None:
        images, cond = val_batch.to(device, cfg.train.channels_last)
        grids[f"reconstructions{suffix}"] = reconstruction_pairs(model, images[:8], None if cond is None else cond[:8])
    return grids


def restore_ema(ema, folder: Path, updates: int) -> str:
    """Load the checkpoint's EMA; "" when it did, else one line on what the EMA starts from."""
    saved = load_ema_state(folder)
    if ema is None:
        return "" if saved is None else "train.ema_decay=0: the checkpoint's EMA is not used and no EMA is kept"
    if saved is None:
        return f"{folder.name} holds no EMA: the EMA starts from the current weights"
    ema.load_state_dict(saved, updates)
    return ""


def choose_checkpoint(checkpointer: Checkpointer, accelerator: Accelerator) -> Path | None:
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


def write_status(run_dir: Path, accelerator: Accelerator, state: str, step: int) -> None:
    """RUN_DIR/status: one word and the step, for batch scripts deciding whether to requeue."""
    if accelerator.is_main_process:
        write_atomic(run_dir / "status", f"{state} {step}\n")


def run(cfg: Config, reset_data: bool = False) -> int:
    """train() with its failures turned into an exit code and one line on stderr."""
    try:
        return train(cfg, reset_data)
    except TrainingFailed as error:
        return fail(str(error))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distvae/train.py", description="Train a convolutional VAE.")
    add_config_arguments(parser)
    add_resume_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        return run(cfg, args.reset_data)
    except UserError as error:
        print(f"distvae train: error: {error}", file=sys.stderr, flush=True)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
