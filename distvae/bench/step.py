"""Training images/s of one model, batch and precision, three ways, each run in a fresh Python process.

    distvae bench step                                  # 8 configurations x 3 ways + DDP, 5 rounds (~25 min on 2 cores)
    distvae bench step --configs fp32_64px_cl,bf16_128px_cl --rounds 7 --json step.json
    distvae bench step --device cuda --steps 50
    distvae bench step --quick --json out.json          # seconds: the tiny model at 32 px, for the test suite
    distvae bench step --quick

- bare_loop: plain PyTorch. build_model, fused AdamW, forward under autocast, elbo, backward, clip_grad_norm_,
  step, zero_grad, on uint8 batches already in memory, converted to float on the device as Batch.to does.
- distvae_loop: distvae.train.train(cfg) itself (Accelerate, the step's guards and collective, logging every
  LOG_EVERY steps, the checkpoint interval CHECKPOINT_EVERY, no validation), fed the same in-memory batches:
  in its process distvae.train.make_stream is replaced by one whose stream serves them.
- distvae_e2e: distvae.train.train(cfg) with the config's data defaults, on pre-resized npy shards packed once
  from a synthetic set: the real stream, its workers (data.num_workers=auto) and all.
- bare_train (not timed; tests/test_parity.py, issue 10's quality parity): the bare loop's step trained on the
  trainer's own batches, noise and lr schedule for train.max_steps steps, then validated as the trainer validates.

The model is the reference (tutorial) config at model.resolution 64 or 128; configurations cross fp32/bf16,
64/128 px and channels_last on/off (names like bf16_128px_cl). The distvae ways are timed by wrapping
distvae.train.train_step: from the end of step WARMUP to the end of the last step, so imports, model build,
the first steps and the final save are outside. Every way gets the same torch.set_num_threads (OMP_NUM_THREADS
too); the machine may be shared, so the ways run in interleaved rounds (order rotated each round) and the median
is reported. Peak memory is each training process's own (VmHWM; rounds.peak_rss_mib).

DDP: the first configuration in 2 processes (torchrun, gloo on CPU), against the same 2 processes with every step
under DDP's no_sync(): the gradient all-reduce is off, while the step's flag all-reduce and the BatchNorm
broadcast stay, so the ratio is the cost of gradient communication.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

WAYS = ("bare_loop", "distvae_loop", "distvae_e2e")
TARGETS = {"distvae_loop": 0.95, "distvae_e2e": 0.85, "ddp": 0.85}  # x bare_loop; ddp: x the run without all-reduce
HOST_CACHE_TARGET = 0.95  # distvae_e2e x bare_loop when its stream read the shards into host memory (data.cache=host)
DATA_BOUND = 0.95  # e2e under this share of the in-memory loop's rate: reading the data costs the difference
WARMUP, QUICK_WARMUP = 3, 2  # untimed first steps: allocator, autocast caches, first log line
LOG_EVERY, CHECKPOINT_EVERY = 10, 1000
MEMORY_BATCHES = 8  # distinct batches the in-memory ways cycle through
PRECISIONS = {"no": None, "bf16": torch.bfloat16}  # train.mixed_precision -> autocast dtype of the bare loop


@dataclass(frozen=True)
class Setup:
    """One configuration: the same model, batch and precision for every way."""

    config: str
    resolution: int
    precision: str  # train.mixed_precision: no | bf16
    channels_last: bool

    @property
    def name(self) -> str:
        return f"{'fp32' if self.precision == 'no' else self.precision}_{self.resolution}px_" \
               f"{'cl' if self.channels_last else 'nchw'}"

    def overrides(self) -> list[str]:
        return [f"model.resolution={self.resolution}", f"train.mixed_precision={self.precision}",
                f"train.channels_last={self.channels_last}"]


FULL = [Setup("reference", res, precision, cl) for res in (64, 128) for precision in ("no", "bf16")
        for cl in (True, False)]
QUICK = [Setup("tiny", 32, "no", True)]


def bench_step(device: str = "cpu", rounds: int | None = None, steps: int | None = None, quick: bool = False,
               json_path: str | None = None, configs: str | None = None, threads: int = 1,
               batch: int | None = None, e2e_cache: str | None = None) -> dict:
    """Measure, print a table and a verdict per configuration, optionally write JSON; returns the JSON object."""
    from distvae.errors import UserError

    setups = _choose(configs, quick)
    rounds, steps, batch = rounds or (2 if quick else 5), steps or (4 if quick else 20), batch or (16 if quick else 64)
    if rounds < 1 or steps < 1 or threads < 1 or batch < 1:
        raise UserError("--rounds, --steps, --threads and --batch must be at least 1")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no GPU here; use --device cpu")
    warmup = QUICK_WARMUP if quick else WARMUP
    ddp_why = "" if device == "cpu" or torch.cuda.device_count() >= 2 else "DDP on cuda needs 2 GPUs"
    figures = {way: {setup.name: [] for setup in setups} for way in WAYS}
    ddp_figures = {"allreduce": [], "no_allreduce": []}
    with tempfile.TemporaryDirectory(prefix="distvae-bench-step-") as tmp:
        started = time.perf_counter()
        manifests = _pack(Path(tmp), sorted({setup.resolution for setup in setups}), 320 if quick else 1600)
        print(f"packed synthetic faces at {', '.join(f'{r} px' for r in manifests)} in "
              f"{time.perf_counter() - started:.1f} s; {len(setups)} configuration(s), batch {batch}, {steps} timed "
              f"steps after {warmup}, {rounds} round(s), {threads} thread(s) per process, device {device}", flush=True)
        for round_ in range(rounds):
            for setup in setups:
                for way in WAYS[round_ % 3:] + WAYS[:round_ % 3]:
                    job = _job(setup, way, manifests[setup.resolution], Path(tmp), round_, steps, warmup, batch,
                               threads, device, e2e_cache=e2e_cache)
                    figures[way][setup.name].append(_launch(job, 1, Path(tmp), device)[0])
            if not ddp_why:
                modes = list(ddp_figures) if round_ % 2 == 0 else list(ddp_figures)[::-1]
                for mode in modes:
                    job = _job(setups[0], "distvae_loop", manifests[setups[0].resolution], Path(tmp), round_, steps,
                               warmup, batch, threads, device, ddp=mode)
                    ddp_figures[mode].append(_launch(job, 2, Path(tmp), device))
            print(f"round {round_ + 1}/{rounds} done at {time.perf_counter() - started:.0f} s", flush=True)
    report = _summarise(figures, ddp_figures, setups, ddp_why, dict(device=device, rounds=rounds, steps=steps,
                        warmup=warmup, batch=batch, threads=threads, quick=quick,
                        e2e_cache=e2e_cache or "the config's (auto)"))
    _print_report(report)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _choose(configs: str | None, quick: bool) -> list[Setup]:
    from distvae.errors import UserError

    known = QUICK if quick else FULL
    if not configs or configs == "all":
        return known
    names = {setup.name: setup for setup in known}
    wanted = [name.strip() for name in configs.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise UserError(f"--configs {','.join(unknown)}: choose from {', '.join(names)} (or all)")
    return [names[name] for name in wanted]


# ----------------------------------------------------------------------------------------------- the parent


def _pack(tmp: Path, resolutions: list[int], images: int) -> dict[int, str]:
    from distvae.data.pack import pack
    from distvae.data.synth import make_synthetic_celeba

    with contextlib.redirect_stdout(io.StringIO()):  # our one line replaces theirs
        root = make_synthetic_celeba(tmp / "celeba", images, progress=False)
        for resolution in resolutions:
            pack(root, tmp / f"npy{resolution}", name="synth", resolution=resolution, shard_size=200, progress=False)
    return {resolution: str(tmp / f"npy{resolution}" / "manifest.json") for resolution in resolutions}


def _job(setup: Setup, way: str, manifest: str, tmp: Path, round_: int, steps: int, warmup: int, batch: int,
         threads: int, device: str, ddp: str = "", e2e_cache: str | None = None) -> dict:
    tag = f"{setup.name}-{way}-{ddp or 'single'}-{round_}"
    overrides = [*setup.overrides(), f"data.batch_size={batch}", f"data.train_shards={manifest}", "data.val_shards=",
                 f"run.dir={tmp / 'runs' / tag}", "log.tracker=none", f"log.every_steps={LOG_EVERY}",
                 "log.image_every_steps=0", f"checkpoint.every_steps={CHECKPOINT_EVERY}",
                 f"train.max_steps={warmup + steps}", "train.warmup_steps=0", "train.val_every_steps=0"]
    if way == "distvae_e2e" and e2e_cache:
        overrides.append(f"data.cache={e2e_cache}")
    return {"way": way, "config": setup.config, "overrides": overrides, "warmup": warmup, "steps": steps,
            "threads": threads, "device": device, "ddp": ddp, "out": str(tmp / "results" / tag)}


def _launch(job: dict, processes: int, tmp: Path, device: str) -> list[dict]:
    """Run one job in fresh processes; each rank's figures."""
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the trainer picks a GPU whenever it sees one
    worker = ["-m", "distvae.bench.step", "--worker", json.dumps(job)]
    if processes > 1:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        worker = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(port),
                  *worker]
    result = subprocess.run([sys.executable, *worker], capture_output=True, text=True, env=env, timeout=1800)
    out = Path(job["out"])
    if result.returncode != 0 or len(list(out.glob("rank-*.json"))) != processes:
        raise RuntimeError(f"bench worker {job['way']} {job['ddp']} exited with {result.returncode}:\n"
                           f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    shutil.rmtree(tmp / "runs", ignore_errors=True)  # checkpoints of a finished job
    return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in range(processes)]


def _spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values)


def _figures(runs: list[dict]) -> dict:
    rates = [run["images_per_second"] for run in runs]
    merged = {"images_per_second": statistics.median(rates), "per_round": rates, "spread": _spread(rates),
              "peak_rss_mib": max(run["peak_rss_mib"] for run in runs)}
    for key in ("ms_per_step", "ms_in_train_step", "ms_between_steps", "data_wait_share", "end_seconds"):
        if key in runs[0]:
            merged[key] = statistics.median(run[key] for run in runs)
    if "data_cache" in runs[0]:
        merged["data_cache"] = runs[0]["data_cache"]
    return merged


def _summarise(figures, ddp_figures, setups, ddp_why, settings) -> dict:
    report = {way: {name: _figures(runs) for name, runs in figures[way].items()} for way in WAYS}
    for setup in setups:
        bare = report["bare_loop"][setup.name]["images_per_second"]
        for way in WAYS:
            entry = report[way][setup.name]
            entry["ratio"] = entry["images_per_second"] / bare
            if way in TARGETS:
                target = HOST_CACHE_TARGET if entry.get("data_cache") == "host" and way == "distvae_e2e" else \
                    TARGETS[way]
                entry["target"], entry["pass"] = target, entry["ratio"] >= target
        e2e, loop = report["distvae_e2e"][setup.name], report["distvae_loop"][setup.name]
        e2e["vs_distvae_loop"] = e2e["images_per_second"] / loop["images_per_second"]
        e2e["bound"] = "data-bound" if e2e["vs_distvae_loop"] < DATA_BOUND else "compute-bound"
    if ddp_why:
        report["ddp"] = {"skipped": ddp_why}
    else:
        ddp = {mode: _figures([{**ranks[0], "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks)}
                               for ranks in runs]) for mode, runs in ddp_figures.items()}
        ratio = ddp["allreduce"]["images_per_second"] / ddp["no_allreduce"]["images_per_second"]
        report["ddp"] = {"config": setups[0].name, "processes": 2, "backend": "gloo" if settings["device"] == "cpu"
                         else "nccl", **ddp, "ratio": ratio, "target": TARGETS["ddp"], "pass": ratio >= TARGETS["ddp"]}
    report["machine"] = {"cpu_count": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0))
                         if hasattr(os, "sched_getaffinity") else os.cpu_count(), "torch": torch.__version__,
                         "python": platform.python_version(), "device": settings["device"],
                         "gpu": torch.cuda.get_device_name(0) if settings["device"] == "cuda" else None}
    report["settings"] = {**settings, "unit": "training images per wall-clock second, all processes together",
                          "log_every_steps": LOG_EVERY, "checkpoint_every_steps": CHECKPOINT_EVERY,
                          "targets": TARGETS}
    return report


def advice(report: dict, name: str) -> str:
    """The one change that would help this configuration most, from the figures of this run."""
    if report["distvae_e2e"][name]["bound"] == "data-bound":
        return "data.cache=host (pre-resized shards read once into memory: no reading in the step)"
    bare = report["bare_loop"]
    for old, new, change in (("_nchw", "_cl", "train.channels_last=true"), ("fp32_", "bf16_",
                                                                            "train.mixed_precision=bf16")):
        twin = name.replace(old, new, 1)
        if twin != name and twin in bare:
            speedup = bare[twin]["images_per_second"] / bare[name]["images_per_second"]
            if speedup > 1.05:
                return f"{change} ({speedup:.2f}x this step in this run)"
    if report.get("machine", {}).get("device") == "cuda":  # measured on an H200: 64 and 128 px took the same time
        return ("a larger data.batch_size or train.compile=true: a step of a model this small on a GPU is bound by "
                "the host launching its kernels")
    return "more compute (a GPU) or a smaller model: the model step itself is the bound"


def verdict_lines(report: dict) -> list[str]:
    lines = []
    for name, loop in report["distvae_loop"].items():
        bare, e2e = report["bare_loop"][name], report["distvae_e2e"][name]
        cost = f"the loop costs {1 - loop['ratio']:.0%}" if loop["ratio"] < 1 else "the loop costs nothing measurable"
        lines.append(f"{name}: distvae_loop {loop['ratio']:.2f}x bare_loop: {cost} ({loop['ms_in_train_step']:.1f} ms "
                     f"in train_step + {loop['ms_between_steps']:.1f} ms between steps, bare {bare['ms_per_step']:.1f} "
                     f"ms per step); target >= {loop['target']:g}x: {'PASS' if loop['pass'] else 'MISS'}")
        lines.append(f"{name}: distvae_e2e (data.cache={e2e.get('data_cache', '?')}) {e2e['ratio']:.2f}x bare_loop, "
                     f"{e2e['vs_distvae_loop']:.2f}x distvae_loop: "
                     f"{e2e['bound']} (data wait {e2e['data_wait_share']:.0%} of the step time); target >= "
                     f"{e2e['target']:g}x: {'PASS' if e2e['pass'] else 'MISS'}; what would help most: "
                     f"{advice(report, name)}")
    ddp = report["ddp"]
    if "skipped" in ddp:
        lines.append(f"ddp: skipped ({ddp['skipped']})")
    else:
        lines.append(f"ddp ({ddp['config']}, {ddp['processes']} processes, {ddp['backend']}): "
                     f"{ddp['allreduce']['images_per_second']:,.0f} images/s, {ddp['ratio']:.2f}x the same processes "
                     f"without the gradient all-reduce ({ddp['no_allreduce']['images_per_second']:,.0f}): "
                     f"communication costs {max(0.0, 1 - ddp['ratio']):.0%}; target >= {ddp['target']:g}x: "
                     f"{'PASS' if ddp['pass'] else 'MISS'}")
    return lines


def _print_report(report: dict) -> None:
    settings = report["settings"]
    header = ("configuration", "way", "images/s", "spread", "peak RSS MiB", "x bare_loop")
    rows = [(name, way, f"{entry['images_per_second']:,.1f}", f"{entry['spread']:.0%}",
             f"{entry['peak_rss_mib']:,.0f}", f"{entry['ratio']:.2f}x")
            for name in report["bare_loop"] for way in WAYS for entry in [report[way][name]]]
    if "skipped" not in report["ddp"]:
        ddp = report["ddp"]
        rows += [(f"ddp {ddp['config']}", mode, f"{ddp[mode]['images_per_second']:,.1f}", f"{ddp[mode]['spread']:.0%}",
                  f"{ddp[mode]['peak_rss_mib']:,.0f}", "") for mode in ("no_allreduce", "allreduce")]
    print(f"median of {settings['rounds']} interleaved rounds, batch {settings['batch']} per process, "
          f"{settings['steps']} timed steps, {settings['threads']} thread(s) per process, device {settings['device']}")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.rjust(width) if index > 1 else cell.ljust(width)
                        for index, (cell, width) in enumerate(zip(row, widths))).rstrip())
    for line in verdict_lines(report):
        print(line)


# ----------------------------------------------------------------------------------------------- the worker


def trainer_stream(cfg, spec: str, train: bool = True, rank: int = 0, world: int = 1, pin: bool = False):
    """A ShardStream as distvae.train.make_stream builds it (same shards, split, batch, crop, flips, seed and
    shuffle), read in this process with no data cache: the planned order depends on neither, so it yields the
    trainer's batches in the trainer's order (validation: every sample once, in order)."""
    from distvae.data.shards import resolve_shards
    from distvae.data.stream import ShardStream

    return ShardStream(resolve_shards(spec, split="train" if train else "val"), batch_size=cfg.data.batch_size,
                       resolution=cfg.model.resolution, channels=cfg.model.channels, crop=cfg.data.crop,
                       hflip=cfg.data.hflip, shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.run.seed, rank=rank,
                       world_size=world, num_workers=0, train=train, cond_dim=cfg.model.cond_dim, pin_memory=pin,
                       shuffle_block=cfg.data.shuffle_block)


def memory_batches(cfg, rank: int = 0, world: int = 1, pin: bool = False) -> list:
    """MEMORY_BATCHES of this rank's training batches, decoded once: uint8 in host memory (page-locked with pin,
    as the trainer's stream hands them to a GPU)."""
    return list(itertools.islice(iter(trainer_stream(cfg, cfg.data.train_shards, True, rank, world, pin)),
                                 MEMORY_BATCHES))


class MemoryStream:
    """The trainer's own stream, except that iterating it serves batches from memory: everything else the
    trainer asks of a stream (spec, positions, state_dict...) is the real one's."""

    def __init__(self, stream, batches: list):
        self.stream, self.batches = stream, batches

    def __getattr__(self, name: str):
        return getattr(self.stream, name)

    def __iter__(self):
        return itertools.cycle(self.batches)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_model(cfg, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model as the trainer builds it (seeded, then its layout) and fused AdamW (as backend.adamw)."""
    from distvae.model import build_model

    torch.manual_seed(cfg.run.seed)
    layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = build_model(cfg.model).to(device=device, memory_format=layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2),
                                  weight_decay=cfg.train.weight_decay, fused=True)
    return model, optimizer


def bare_step(model, optimizer, images: torch.Tensor, cond, eps, cfg, step: int) -> None:
    """One plain PyTorch step: forward under autocast, elbo, backward, clip_grad_norm_, step, zero_grad.
    eps None: the model draws the reparameterisation noise from torch's global generator."""
    from distvae.loss import elbo

    dtype = PRECISIONS[cfg.train.mixed_precision]
    with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
        recon, mean, logvar = model(images, cond, eps)
    elbo(recon, images, mean, logvar, cfg.loss, step).total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bare_loop(cfg, job: dict) -> dict:
    device = torch.device(job["device"])
    batches = memory_batches(cfg, pin=device.type == "cuda")
    model, optimizer = bare_model(cfg, device)
    model.train()
    for step in range(job["warmup"] + job["steps"]):
        if step == job["warmup"]:
            _sync(device)
            started = time.perf_counter()
        images, cond = batches[step % len(batches)].to(device, cfg.train.channels_last)
        bare_step(model, optimizer, images, cond, None, cfg, step)
    _sync(device)
    seconds = time.perf_counter() - started
    return {"images_per_second": job["steps"] * cfg.data.batch_size / seconds,
            "ms_per_step": 1000 * seconds / job["steps"]}


class OneProcess:
    """What evaluate.validate asks of an Accelerator, for one plain process: the device, autocast, reduce."""

    process_index, num_processes = 0, 1

    def __init__(self, device: torch.device, mixed_precision: str):
        self.device, self.dtype = device, PRECISIONS[mixed_precision]

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor


def bare_train(cfg, device: str = "cpu") -> tuple[dict[str, float], torch.nn.Module]:
    """The bare loop trained as distvae/train.py trains cfg, for the quality-parity check (tests/test_parity.py).

    The same batches in the same order (the trainer's stream over the training split, with the run's seed), the
    same reparameterisation noise (sample_noise keyed by seed, epoch and position), the same lr at every step
    (state.Schedule: warm-up, then constant or cosine), train.max_steps steps; then the trainer's validation
    (evaluate.validate) of the final weights over the validation split. One process and one micro-batch per
    step; no skip guard, no EMA, no checkpoints. Returns the validation metrics (val/loss, ...) and the model.
    """
    from distvae.evaluate import validate
    from distvae.noise import sample_noise
    from distvae.state import Schedule

    if cfg.train.grad_accum_steps != 1 or cfg.data.global_batch not in (0, cfg.data.batch_size):
        raise ValueError("bare_train runs one micro-batch per step: set train.grad_accum_steps=1, data.global_batch=0")
    device = torch.device(device)
    model, optimizer = bare_model(cfg, device)
    schedule = Schedule(cfg)
    batches = iter(trainer_stream(cfg, cfg.data.train_shards, pin=device.type == "cuda"))
    model.train()
    for step in range(cfg.train.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.train.lr * schedule(step)  # what the trainer's LambdaLR sets
        batch = next(batches)
        images, cond = batch.to(device, cfg.train.channels_last)
        eps = sample_noise(cfg.run.seed, batch.epoch, batch.positions, cfg.model.latent_size, device)
        bare_step(model, optimizer, images, cond, eps, cfg, step)
    val_stream = trainer_stream(cfg, cfg.data.val_shards, train=False)
    host = OneProcess(device, cfg.train.mixed_precision)
    return validate(model, val_stream, cfg, host, cfg.train.max_steps).scalars, model


def distvae_loop(cfg, job: dict) -> dict:
    """train(cfg) as `distvae train` runs it, timed at the end of each train_step."""
    import distvae.train as trainer

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    spans = []  # (start, end, data wait) of each step
    real_step, real_stream = trainer.train_step, trainer.make_stream

    def timed_step(model, *args, **kwargs):
        started = time.perf_counter()
        with model.no_sync() if job["ddp"] == "no_allreduce" else contextlib.nullcontext():
            out = real_step(model, *args, **kwargs)
        spans.append((started, time.perf_counter(), out.data_seconds))
        return out

    def memory_stream(*args, **kwargs):
        made = real_stream(*args, **kwargs)
        if isinstance(made, tuple):
            return MemoryStream(made[0], batches), *made[1:]
        return MemoryStream(made, batches)

    caches = []  # what the training stream read from: data.cache as auto resolved it

    def recorded_stream(*args, **kwargs):
        made = real_stream(*args, **kwargs)
        stream = made[0] if isinstance(made, tuple) else made
        if stream.spec.train:
            caches.append("none" if stream.cache is None else "host" if stream.cache.images.device.type == "cpu"
                          else "device")
        return made

    trainer.train_step = timed_step
    if job["way"] == "distvae_loop":
        batches = memory_batches(cfg, rank, world, pin=job["device"] == "cuda")
        trainer.make_stream = memory_stream
    else:
        trainer.make_stream = recorded_stream
    code = trainer.train(cfg)
    ended = time.perf_counter()
    if code != 0 or len(spans) != job["warmup"] + job["steps"]:
        raise RuntimeError(f"train() returned {code} after {len(spans)} steps")
    timed = spans[job["warmup"]:]
    seconds = timed[-1][1] - spans[job["warmup"] - 1][1]
    inside = sum(end - start for start, end, _ in timed)
    return {"images_per_second": job["steps"] * cfg.data.batch_size * world / seconds,
            "ms_in_train_step": 1000 * inside / job["steps"],
            "ms_between_steps": 1000 * (seconds - inside) / job["steps"],
            "data_wait_share": sum(wait for _, _, wait in timed) / seconds, "end_seconds": ended - spans[-1][1],
            "data_cache": caches[0] if caches else "memory"}


def worker(job: dict) -> None:
    from distvae.config import load_config

    torch.set_num_threads(job["threads"])
    cfg = load_config(job["config"], job["overrides"])
    if job["way"] == "bare_train":  # the quality-parity run: validation metrics and final weights, not speed
        figures, model = bare_train(cfg, job["device"])
        _save_weights(model, Path(job["out"]) / "model.safetensors")
    else:
        figures = (bare_loop if job["way"] == "bare_loop" else distvae_loop)(cfg, job)
    from distvae.bench.rounds import peak_rss_mib

    figures["peak_rss_mib"] = peak_rss_mib()
    figures["threads"] = torch.get_num_threads()
    if not all(math.isfinite(value) for value in figures.values() if not isinstance(value, str)):
        raise RuntimeError(f"non-finite figures: {figures}")
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(figures))


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    """As the trainer's checkpoints store them (checkpoint.py): contiguous CPU tensors in safetensors."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds, the median reported (default 5, "
                        "--quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 20; --quick 4)")
    parser.add_argument("--configs", default=None, help="comma list such as fp32_64px_cl,bf16_128px_nchw, or all")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every training process")
    parser.add_argument("--batch", type=int, default=None, help="images per process and step (default 64; --quick 16)")
    parser.add_argument("--e2e-cache", default=None, choices=("auto", "none", "host", "device"),
                        help="data.cache of distvae_e2e (default: the config's, auto)")
    parser.add_argument("--quick", action="store_true", help="the tiny model at 32 px, 2 rounds: seconds, for tests")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(json.loads(argv[1]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m distvae.bench.step", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    bench_step(args.device, args.rounds, args.steps, args.quick, args.json, args.configs, args.threads, args.batch,
               args.e2e_cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
