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
import importlib.util
import os
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, broadcast_object_list

from distvae.attributes import collect as collect_attributes
from distvae.backend import adamw, apply_flags, prepare_environment
from distvae.checkpoint import Checkpointer, load_train_state, write_atomic
from distvae.config import Config, add_config_arguments, config_from_args
from distvae.data.cache import choose_cache
from distvae.data.plan import check_global_batch
from distvae.data.shards import resolve_shards
from distvae.data.stream import ShardStream, describe_crop
from distvae.data.workers import auto_workers
from distvae.ema import EMA, build_ema
from distvae.errors import UserError
from distvae.evaluate import Validation, reconstruction_pairs, sample_grid, validate
from distvae.guards import BufferSnapshot, DataHealth, all_finite
from distvae.latent_health import CollapseWatch, kl_curve
from distvae.model import build_model
from distvae.resume import check_dataset, choose_checkpoint, restore
from distvae.rundir_check import check_shared_run_dir
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
from distvae.state import Schedule, TrainState, add_resume_arguments, check_resume, fingerprint
from distvae.step import StepOutput, train_step
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


def make_stream(cfg: Config, accelerator: Accelerator, spec: str, train: bool, accum: int = 1,
                saved_data: dict | None = None) -> tuple[ShardStream, str]:
    """The stream, and one line on its workers (and its cache) for the log."""
    shards = resolve_shards(spec, split="train" if train else "val")
    cache, cache_why = cfg.data.cache if train else "none", ""
    if cache == "auto":
        cache, cache_why = choose_cache(shards, cfg.model.resolution, cfg.model.channels, cfg.model.cond_dim)
    workers, why = data_workers(cfg, shards, train, saved_data, cache)
    stream = ShardStream(
        shards, batch_size=cfg.data.batch_size, resolution=cfg.model.resolution, channels=cfg.model.channels,
        crop=cfg.data.crop, hflip=cfg.data.hflip, shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.run.seed,
        rank=accelerator.process_index, world_size=accelerator.num_processes, num_workers=workers,
        train=train, cond_dim=cfg.model.cond_dim, pin_memory=accelerator.device.type == "cuda",
        read_timeout=cfg.data.read_timeout_s, accum=accum, shuffle_block=cfg.data.shuffle_block,
        cache=cache, device=accelerator.device,
    )
    line = f"data: {workers} data worker(s) per rank" + (f" (data.num_workers=auto: {why})" if why else "")
    if stream.cache is not None:
        where = "GPU" if stream.cache.images.device.type == "cuda" else "host"
        line += (f"; data.cache={cache}: {stream.spec.total:,} images ({stream.cache.nbytes / 2**20:,.0f} "
                 f"MiB) in {where} memory, read in {stream.cache.seconds:.1f} s")
    if cache_why:
        line += f" (data.cache=auto chose {cache}: {cache_why})"
    return stream, line


def data_workers(cfg: Config, shards, train: bool, saved_data: dict | None, cache: str) -> tuple[int, str]:
    if cfg.data.num_workers != "auto":
        return int(cfg.data.num_workers), ""
    if train and saved_data and saved_data.get("order") == "sequential":  # its order depends on the count
        return int(saved_data["workers"]), "the count the checkpoint read its sequential shards with"
    return auto_workers(shards, cache)


def start_processes(cfg: Config) -> Accelerator:
    """Without GPUs, DDP over gloo (cpu=True), so any launcher gives real multi-process training."""
    check_launch_environment()
    prepare_environment(cfg.train)  # before Accelerator(): no CUDA context may exist yet
    if cfg.log.tracker == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise UserError("log.tracker=tensorboard needs the tensorboard package: pip install tensorboard "
                        "(or pip install -e '.[tensorboard]'), or choose log.tracker=wandb|none")
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.train.mixed_precision,
        log_with=None if cfg.log.tracker == "none" else cfg.log.tracker,
        project_dir=cfg.run.dir,
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=True),
                         InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout_s))],
    )
    check_launch(accelerator.num_processes)
    if cfg.train.sync_bn and accelerator.device.type != "cuda":
        raise UserError("train.sync_bn=true needs GPUs (SyncBatchNorm is CUDA-only); leave it false on CPU")
    if cfg.train.mixed_precision == "fp16" and accelerator.scaler is None:
        raise UserError("train.mixed_precision=fp16 needs a GPU: on CPU Accelerate applies neither autocast nor a "
                        "GradScaler, so it would train in fp32 without saying so; use bf16 or no")
    return accelerator


@dataclass
class Parts:
    """What a step trains: the (wrapped) model, its unwrapped module, optimizer, schedule, EMA."""

    model: torch.nn.Module  # DDP-wrapped (and compiled) for the step
    raw_model: torch.nn.Module  # the module itself: saved, validated, EMA'd
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    schedule: Schedule
    ema: EMA | None
    scaler: object | None  # fp16 GradScaler


def build_parts(cfg: Config, accelerator: Accelerator, anchor: dict | None) -> Parts:
    torch.manual_seed(cfg.run.seed)  # the same seed on every rank gives the same initial weights
    model = build_model(cfg.model)
    model.checkpoint_stages = cfg.train.activation_checkpointing
    if cfg.train.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = adamw(model.parameters(), cfg.train)
    schedule = Schedule(cfg, anchor)
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
    return Parts(model, raw_model, optimizer, scheduler, schedule, ema, accelerator.scaler)


def train(cfg: Config, reset_data: bool = False) -> int:
    accelerator = start_processes(cfg)
    kernels = apply_flags(cfg.train, accelerator.device)
    stop = StopFlag()
    stop.install()
    world = accelerator.num_processes

    # Run directory (held by one run at a time), the checkpoint to resume from, logs and trackers.
    run_dir = Path(cfg.run.dir)
    check_shared_run_dir(run_dir, accelerator.process_index, world)  # a node-local run.dir stops here, before the lock
    lock, lock_note = hold_run_dir(run_dir, cfg, accelerator)
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.every_steps, cfg.checkpoint.keep_last,
                                accelerator.process_index, accelerator.wait_for_everyone)
    latest = choose_checkpoint(checkpointer, accelerator)
    resumed, notes = TrainState.from_json(load_train_state(latest)) if latest else (None, [])
    if resumed:
        notes += check_resume(resumed.config, cfg, reset_data)
    log = RunLog(accelerator, run_dir, cfg.train.max_steps, cfg.log.tracker)
    if lock_note:
        log.info(lock_note)
    if accelerator.is_main_process:
        write_atomic(run_dir / "config.yaml", cfg.to_yaml())
    accelerator.wait_for_everyone()
    run_id = resumed.tracker_run_id if resumed and resumed.tracker_run_id else new_run_id()
    log.start_tracker(cfg.log.project, cfg.run.name or run_dir.name, run_id, cfg.to_dict())

    # Data: each rank reads its own part of the global plan; the loader is not passed through prepare().
    accum = accumulation_steps(cfg, world)
    stream, data_line = make_stream(cfg, accelerator, cfg.data.train_shards, train=True, accum=accum,
                                    saved_data=resumed.data if resumed else None)
    log.info(describe_crop(list(stream.spec.shards), cfg.data.crop, cfg.model.resolution))
    log.info(data_line)
    if cfg.model.cond_dim and accelerator.is_main_process:  # real attribute rows, for sampling after training
        checkpointer.attributes = collect_attributes(cfg.data.train_shards, list(stream.spec.shards),
                                                     cfg.model.cond_dim)
    state = TrainState(tracker_run_id=run_id, dataset=fingerprint(list(stream.spec.shards)),
                       global_batch=stream.spec.global_batch, config=cfg.to_dict())
    if resumed:
        notes += check_dataset(resumed.dataset, state.dataset, reset_data)
    val_stream = make_stream(cfg, accelerator, cfg.data.val_shards, train=False)[0] if cfg.data.val_shards else None

    # Model, optimizer, schedule, EMA; then what the checkpoint holds of them.
    parts = build_parts(cfg, accelerator, resumed.schedule if resumed else None)
    if resumed:
        notes += restore(latest, resumed, parts, stream, cfg, accelerator.process_index, reset_data, notes)
        state.step, state.samples_seen, state.bad_steps = resumed.step, resumed.samples_seen, resumed.bad_steps
        log.info(f"resuming from {latest} at step {state.step}")
        for note in filter(None, notes):
            log.info(f"resume: {note}")
    else:
        log.info(f"starting a new run in {run_dir}: {world} process(es) on {accelerator.device.type}, global batch "
                 f"{stream.spec.global_batch} ({world} x {cfg.data.batch_size} x {accum} micro-batches), "
                 f"{stream.batches_per_epoch // accum} steps per epoch")
    log.info(f"kernels: {kernels}")
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", cfg.train.mixed_precision)
    if launcher_precision != cfg.train.mixed_precision:
        log.info(f"the launcher asks for mixed precision {launcher_precision}; the config's "
                 f"train.mixed_precision={cfg.train.mixed_precision} wins (override it to change)")
    write_status(run_dir, accelerator, "running", state.step)

    # The loop: one train_step, then its bookkeeping and the end-of-step work, until an exit code.
    ending = EndOfStep(cfg, accelerator, log, checkpointer, state, parts, stream, val_stream, stop, lock, run_dir)
    batches, buffers = iter(stream), BufferSnapshot(parts.raw_model)
    log.start_progress(state.step)
    parts.model.train()
    try:
        code = None if state.step < cfg.train.max_steps else ending.finish()
        while code is None:
            started = time.perf_counter()
            out = train_step(parts.model, parts.optimizer, accelerator, batches, buffers, cfg, state.step, accum,
                             stop, bool(ending.lock_problem))
            ending.account(out, time.perf_counter() - started)
            code = ending.after(out)
        return code
    except LockLost:
        raise  # RUN_DIR belongs to another process now: its status is not ours to write
    except TrainingFailed:
        write_status(run_dir, accelerator, "failed", state.step)
        raise
    except RuntimeError as error:
        if not (world > 1 and is_collective_failure(error)):
            raise
        write_status(run_dir, accelerator, "failed", state.step)
        first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise TrainingFailed(f"a collective failed at step {state.step + 1} on rank {accelerator.process_index}: "
                             f"another rank died or waited longer than train.collective_timeout_s="
                             f"{cfg.train.collective_timeout_s:g} s ({first_line}); rerun to resume from the last "
                             f"checkpoint") from None
    finally:
        log.close()
        if lock is not None:
            lock.release()


class EndOfStep:
    """Everything after a step's update: counters, EMA, failure rules, then log, validate, images, save, and
    stop, fail or finish, in that order. A step due for validation validates even when a stop signal came,
    and a stop at the last step is a finished run."""

    def __init__(self, cfg: Config, accelerator: Accelerator, log: RunLog, checkpointer: Checkpointer,
                 state: TrainState, parts: Parts, stream: ShardStream, val_stream: ShardStream | None,
                 stop: StopFlag, lock: RunLock | None, run_dir: Path):
        self.cfg, self.accelerator, self.log, self.checkpointer = cfg, accelerator, log, checkpointer
        self.state, self.parts, self.stream, self.val_stream = state, parts, stream, val_stream
        self.stop, self.lock, self.run_dir = stop, lock, run_dir
        self.window, self.health = WindowStats(accelerator.device), DataHealth(cfg.data.max_bad_fraction,
                                                                               cfg.data.bad_window)
        self.consecutive_bad, self.data_failed, self.lock_problem = 0, False, ""
        self.collapse = CollapseWatch(cfg.log.collapse_share, cfg.log.collapse_validations, cfg.model.latent_size,
                                      from_step=max(cfg.loss.kl_warmup_steps, cfg.train.warmup_steps))
        show = val_stream is not None and accelerator.is_main_process
        self.fixed_val_batch = next(iter(val_stream), None) if show else None  # the same images in every grid

    def account(self, out: StepOutput, seconds: float) -> None:
        """The step's counters and the rules that end a run at once (non-finite steps, a lost lock)."""
        cfg, state, verdict = self.cfg, self.state, out.verdict
        if verdict.non_finite:
            self.consecutive_bad, state.bad_steps = self.consecutive_bad + 1, state.bad_steps + 1
            self.log.info(f"step {state.step + 1}: non-finite loss or gradient on some rank; update skipped on all "
                          f"ranks")
            if self.consecutive_bad >= cfg.train.max_bad_steps:
                raise TrainingFailed(f"{self.consecutive_bad} consecutive non-finite steps (train.max_bad_steps); "
                                     f"lower train.lr or set train.grad_clip, then rerun to resume from the last "
                                     f"checkpoint")
        elif verdict.apply:
            self.consecutive_bad = 0
        if verdict.no_data:
            self.log.info(f"step {state.step + 1}: a batch with no readable sample on some rank; update skipped on "
                          f"all ranks")
        if out.lock_lost:
            raise LockLost(self.lock_problem or f"rank 0 lost {self.run_dir / 'lock'} to another process; "
                                                f"stopping without saving")
        self.parts.scheduler.step()
        state.step += 1
        ema = self.parts.ema
        if ema is not None and verdict.apply and ema.due(state.step):
            ema.update(self.parts.raw_model)  # a skipped step leaves the average as it was
        world = self.accelerator.num_processes
        state.samples_seen += out.images * world
        self.window.add_step(out, seconds)
        self.log.step(state.step, out.terms, self.window.last_images_per_second * world)
        self.health.note_shards(out.bad_shards)
        self.data_failed = self.health.add(out.bad_samples, out.images * world)

    def after(self, out: StepOutput) -> int | None:
        """The end-of-step work in its order; an exit code when the run ends here."""
        cfg, step, parts = self.cfg, self.state.step, self.parts
        last = step == cfg.train.max_steps
        if step % cfg.log.every_steps == 0 or last:
            self.log_window(out)
        if self.val_stream is not None and (cfg.train.val_every_steps and step % cfg.train.val_every_steps == 0
                                            or last):
            self.validate()
        if self.accelerator.is_main_process and cfg.log.image_every_steps and (
                step % cfg.log.image_every_steps == 0 or last):
            # Grids come from the EMA when there is one; their names say which weights drew them.
            weights = parts.raw_model if parts.ema is None else parts.ema.model
            self.log.images(step, image_grids(weights, cfg, self.fixed_val_batch, self.accelerator.device,
                                              suffix="" if parts.ema is None else "_ema",
                                              attributes=self.checkpointer.attributes))
        if self.checkpointer.due(step) or last or out.stop or self.data_failed:
            path = self.save()
            self.log.info(f"saved {path}")
        if self.data_failed:
            raise TrainingFailed(self.health.message(cfg.data.max_bad_fraction, self.accelerator.process_index))
        if last:
            return self.finish()
        if out.stop:
            self.log.info(f"stop signal ({self.stop.signal_name or 'on another rank'}): saved {path}; exiting with "
                          f"code {EXIT_INTERRUPTED}, rerun the same command to resume")
            write_status(self.run_dir, self.accelerator, "interrupted", step)
            return EXIT_INTERRUPTED
        if self.lock is not None and step % cfg.log.every_steps == 0:
            self.lock_problem = self.lock_problem or lock_taken_over(self.lock)
        return None

    def finish(self) -> int:
        write_status(self.run_dir, self.accelerator, "finished", self.state.step)
        self.log.info(f"finished {self.state.step} steps; checkpoints in {self.run_dir / 'checkpoints'}, samples in "
                      f"{self.run_dir / 'samples'}")
        return EXIT_FINISHED

    def log_window(self, out: StepOutput) -> None:
        scalars = self.window.reduce(self.accelerator)
        scalars.update({"train/lr": self.parts.scheduler.get_last_lr()[0], "train/kl_weight": out.terms.kl_weight,
                        "train/samples_seen": self.state.samples_seen, "train/epoch": self.stream.epoch,
                        "train/bad_steps_total": self.state.bad_steps})
        self.log.scalars(self.state.step, scalars)

    def validate(self) -> None:
        parts, world, step = self.parts, self.accelerator.num_processes, self.state.step
        broadcast_buffers(parts.raw_model, world)
        live = validate(parts.raw_model, self.val_stream, self.cfg, self.accelerator, step)
        self.show(live)
        warning = self.collapse.add(step, live.scalars["val/active_units"], live.scalars["val/kl"])
        if warning:
            self.log.alert(step, "posterior collapse", warning)
        if parts.ema is not None:
            parts.ema.copy_buffers(parts.raw_model)
            self.show(validate(parts.ema.model, self.val_stream, self.cfg, self.accelerator, step, prefix="val_ema"))

    def show(self, result: Validation) -> None:
        step, suffix = self.state.step, result.prefix.removeprefix("val")
        self.log.scalars(step, result.scalars)
        self.log.histogram(step, f"{result.prefix}/kl_per_dim", result.kl_per_dim)
        self.log.images(step, {f"kl_per_dim_sorted{suffix}": kl_curve(result.kl_per_dim)})

    def save(self) -> Path:
        """A checkpoint of this step from the TrainState and the parts; nothing non-finite is ever written."""
        parts, state = self.parts, self.state
        broadcast_buffers(parts.raw_model, self.accelerator.num_processes)
        weights = parts.raw_model.state_dict()
        if parts.ema is not None:
            parts.ema.copy_buffers(parts.raw_model)  # rank 0's statistics, as in model.safetensors
        ema_state = parts.ema.state_dict() if parts.ema is not None else None
        if not all_finite([*weights.values(), *(ema_state or {}).values()]):  # parameters, buffers, the EMA
            raise TrainingFailed(f"the weights or BatchNorm statistics are not finite at step {state.step}; nothing "
                                 f"was saved. Lower train.lr and rerun to resume from the last checkpoint")
        state.data, state.schedule = self.stream.state_dict(), parts.schedule.anchor
        state.ema_updates = parts.ema.updates if parts.ema is not None else 0
        scaler = parts.scaler.state_dict() if parts.scaler is not None else None
        return self.checkpointer.save(state.step, weights, parts.optimizer.state_dict(), parts.scheduler.state_dict(),
                                      state.to_json(), scaler, ema_state)


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


def image_grids(model, cfg: Config, val_batch, device, suffix: str = "", attributes=None) -> dict:
    # A conditional model's samples take real attribute rows (the same ones in every grid of the run).
    cond = None if attributes is None else \
        attributes.draw({}, 64, torch.Generator().manual_seed(cfg.run.seed))[0].to(device)
    grids = {f"samples{suffix}": sample_grid(model, cfg.run.seed, count=64, cond=cond)}
    if val_batch is not None:
        images, cond = val_batch.to(device, cfg.train.channels_last)
        grids[f"reconstructions{suffix}"] = reconstruction_pairs(model, images[:8], None if cond is None else cond[:8])
    return grids


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
        code = run(cfg, args.reset_data)
    except UserError as error:
        print(f"distvae train: error: {error}", file=sys.stderr, flush=True)
        code = EXIT_USAGE
    close_process_group(code)
    return code


def close_process_group(code: int) -> None:
    """Destroy the process group while the interpreter is still whole: left to interpreter exit, gloo's threads
    can abort the process ("terminate called without an active exception", pytorch/pytorch#190489; seen once
    on the two-node test cluster, exit 134 instead of 2). Not after a failure (exit 1), which may be one rank's
    alone: destroying a group whose peers are gone or busy can hang (torchtitan destroys it on success only)."""
    if code != 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
