"""Rate-distortion of the plain and resnet archs at an equal training cost per step (issue 12), in one command.

    python -m distvae.bench.quality                   # 64 px, 2 archs x 3 kl_weights x 2 seeds: QUALITY.md, ~40 min
    python -m distvae.bench.quality --steps 400 --out QUALITY.md --json quality.json --jobs 1
    distvae bench quality --quick --out /tmp/q/QUALITY.md    # 32 px, tiny widths, 2 kl_weights, 1 seed: ~30 s
    python -m distvae.bench.quality --render quality.json --out QUALITY.md   # rewrite the markdown, no training

What it does, in order:
1. makes the built-in synthetic faces and packs them pre-resized (npy) once, in a temporary folder;
2. times one training step (bare_step: forward under autocast, ELBO, backward, clipping, AdamW) of the plain
   variant and of each resnet candidate, each round in a fresh process, interleaved, and keeps the resnet
   candidate whose median ms/step is closest to the plain one's;
3. for each arch x kl_weight x seed trains with the real trainer as a user types it
   (`python -m distvae.train --config ... overrides`, log.tracker=none, the same steps, batch, lr and schedule
   for every run), then scores the final checkpoint with `distvae evaluate --fid-images 0` on the test split,
   which no run trains or validates on. Runs go one per core, each with OMP_NUM_THREADS=1 (--jobs);
4. writes the markdown: every point (rate = KL in nats per image, PSNR of the decoded posterior mean), a PNG of
   PSNR against log rate, the PSNR difference of the two archs at interpolated equal rates against the seed
   spread, a verdict generated from those numbers, and reconstruction grids (`distvae reconstruct`) of the same
   test images, in docs/quality/ beside the markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from distvae.bench.rate_distortion import ARCHS, Point, analyse, held_out_loss, plot
from distvae.bench.rounds import in_process, interleaved, write_figures

COST_TOLERANCE = 1.25  # the chosen pair's step times within this factor of each other, or the report says not


@dataclass(frozen=True)
class Variant:
    """One arch at one size: a named config and the overrides that make it this variant."""

    arch: str
    config: str
    overrides: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"--config {self.config} " + " ".join(self.overrides)


@dataclass(frozen=True)
class Plan:
    """Everything the command holds fixed; the same for every training run."""

    images: int  # synthetic faces made (about 80% train, 10% val, 10% test)
    resolution: int
    steps: int  # optimizer steps of every run
    batch: int
    lr: float
    kl_weights: tuple[float, ...]  # sum reduction: 1.0 is the ELBO of a Gaussian decoder with variance 0.5
    seeds: tuple[int, ...]
    plain: Variant
    resnet_candidates: tuple[Variant, ...]
    timing_rounds: int
    timing_steps: int
    recon_images: int  # test images in each reconstruction grid
    precision: str = "bf16"  # bf16 autocast: faster than fp32 for both archs on these CPUs

    def common_overrides(self, steps: int | None = None) -> list[str]:
        """What every run shares, whatever its config file says: schedule, precision, logging."""
        steps = steps or self.steps
        return [f"model.resolution={self.resolution}", f"data.batch_size={self.batch}", f"train.max_steps={steps}",
                f"train.lr={self.lr}", f"train.warmup_steps={max(1, steps // 20)}",
                f"loss.kl_warmup_steps={steps // 4}", "loss.reduction=sum", "train.ema_decay=0",
                f"train.mixed_precision={self.precision}", "log.tracker=none", f"log.every_steps={max(1, steps // 4)}",
                "log.image_every_steps=0", f"checkpoint.every_steps={steps}", "data.val_shards="]


# 4,000 faces (3,214 train, 394 test), 1,000 steps of batch 32 (10 epochs): 12 runs fit in about 40 minutes on 2
# shared cores. The kl_weights span 100x around the ELBO's 1.0 with the sum reduction: rates from about 10 to 200
# nats per image. The resnet candidates have one block per stage and attention at 8 px; at 1 thread and bf16 their
# steps took 0.9-1.2x the plain step here, so the closest is chosen each time, on the day's measurement.
FULL = Plan(
    images=4000, resolution=64, steps=1000, batch=32, lr=1e-3, kl_weights=(0.03, 0.3, 3.0), seeds=(0, 1),
    plain=Variant("plain", "celeba64", ()),
    resnet_candidates=tuple(
        Variant("resnet", "celeba64_resnet", ("model.blocks_per_stage=1", "model.attention_resolution=8",
                                              f"model.hiddens={hiddens}", "model.latent_dim=128"))
        for hiddens in ("[8,16,32,64]", "[8,32,32,64]", "[8,16,64,128]")),
    timing_rounds=3, timing_steps=8, recon_images=8,
)
QUICK = Plan(
    images=300, resolution=32, steps=30, batch=16, lr=2e-3, kl_weights=(0.1, 1.0), seeds=(0,),
    plain=Variant("plain", "tiny", ()),
    resnet_candidates=(Variant("resnet", "celeba64_resnet", ("model.blocks_per_stage=1", "model.attention_resolution=8",
                                                             "model.hiddens=[8,16,32]", "model.latent_dim=32")),),
    timing_rounds=1, timing_steps=3, recon_images=4, precision="no",
)


# ---------------------------------------------------------------------------------------------- the runs


def _python_command(*args: str) -> list[str]:
    return [sys.executable, *args]


def _environment(threads: int) -> dict[str, str]:
    """CPU only, `threads` threads per process. With more compute threads than free cores (two runs at once, or
    another job on the machine) torch's OpenMP threads wait for each other: a 2-thread step of the tiny model took
    405 ms beside another job here, against 9 ms with one thread."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads)}


def _run(command: list[str], log: Path, timeout: float, threads: int) -> float:
    """Run a command, its output into `log`; seconds it took. A failure raises with the log's tail."""
    started = time.perf_counter()
    with log.open("w") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                                env=_environment(threads))
    if result.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(command)} exited with {result.returncode}:\n{tail}")
    return time.perf_counter() - started


def train_and_score(plan: Plan, variant: Variant, kl_weight: float, seed: int, manifest: Path, work: Path,
                    threads: int, timeout: float) -> tuple[Point, list[str]]:
    """Train one run with the real trainer, then `distvae evaluate` its final checkpoint on the test split."""
    run_dir = work / run_name(variant.arch, kl_weight, seed)
    overrides = [*variant.overrides, *plan.common_overrides(), f"data.train_shards={manifest}",
                 f"loss.kl_weight={kl_weight}", f"run.seed={seed}", f"run.dir={run_dir}"]
    command = _python_command("-m", "distvae.train", "--config", variant.config, *overrides)
    train_seconds = _run(command, work / f"{run_dir.name}.train.log", timeout, threads)
    scores = work / f"{run_dir.name}.json"
    _run(_python_command("-m", "distvae", "evaluate", "--ckpt", str(run_dir), "--shards", f"{manifest}#test",
                         "--json", str(scores), "--fid-images", "0"), work / f"{run_dir.name}.evaluate.log", timeout,
         threads)
    result = json.loads(scores.read_text())
    values = 3 * plan.resolution**2
    point = Point(arch=variant.arch, kl_weight=kl_weight, seed=seed, rate=float(sum(result["kl_per_dim"])),
                  psnr=float(result["psnr"]), loss=held_out_loss(result["neg_elbo_nats"], kl_weight, values),
                  neg_elbo=float(result["neg_elbo_nats"]), active_units=int(result["active_units"]),
                  train_seconds=train_seconds, extra={"images": result["images"], "ssim": result["ssim"]})
    return point, command


def run_name(arch: str, kl_weight: float, seed: int) -> str:
    return f"{arch}-kl{kl_weight:g}-seed{seed}"


def time_steps(plan: Plan, threads: int) -> dict:
    """Median ms per training step of the plain variant and of each resnet candidate, interleaved rounds, each
    measurement in a fresh process with the threads a training run gets; the candidate closest to the plain
    cost is chosen."""
    variants = {"plain": plan.plain, **{f"resnet{index}": variant for index, variant in
                                        enumerate(plan.resnet_candidates)}}

    def measure(name: str, round_: int) -> dict:
        variant = variants[name]
        job = {"config": variant.config, "overrides": [*variant.overrides, *plan.common_overrides()],
               "warmup": 2, "steps": plan.timing_steps, "seed": round_}
        return in_process("distvae.bench.quality", job, env={"OMP_NUM_THREADS": str(threads)})

    runs = interleaved(list(variants), plan.timing_rounds, measure, progress="quality: step timing")
    timing = {}
    for name, variant in variants.items():
        values = sorted(run["ms_per_step"] for run in runs[name])
        timing[name] = {"arch": variant.arch, "label": variant.label, "ms_per_step": values[len(values) // 2],
                        "per_round": [run["ms_per_step"] for run in runs[name]],
                        "parameters": runs[name][0]["parameters"]}
    plain_ms = timing["plain"]["ms_per_step"]
    chosen = min((name for name in variants if name != "plain"),
                 key=lambda name: abs(math.log(timing[name]["ms_per_step"] / plain_ms)))
    ratio = timing[chosen]["ms_per_step"] / plain_ms
    return {"variants": timing, "chosen": chosen, "ratio": ratio, "threads": threads,
            "within_tolerance": 1 / COST_TOLERANCE <= ratio <= COST_TOLERANCE}


def timing_worker(job: dict) -> None:
    """One timing process: bare_step (bench step's plain PyTorch step) on one in-memory batch."""
    import torch

    from distvae.bench.step import bare_model, bare_step
    from distvae.config import load_config

    cfg = load_config(job["config"], job["overrides"])
    model, optimizer = bare_model(cfg, torch.device("cpu"))
    model.train()
    generator = torch.Generator().manual_seed(job["seed"])
    size = cfg.model.resolution
    images = torch.rand(cfg.data.batch_size, cfg.model.channels, size, size, generator=generator)
    if cfg.train.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    for step in range(job["warmup"] + job["steps"]):
        if step == job["warmup"]:
            started = time.perf_counter()
        bare_step(model, optimizer, images, None, None, cfg, step)
    seconds = time.perf_counter() - started
    write_figures(job, {"ms_per_step": 1000 * seconds / job["steps"], "threads": torch.get_num_threads(),
                        "parameters": sum(p.numel() for p in model.parameters())})


def default_jobs() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores)


def bench_quality(quick: bool = False, steps: int | None = None, out: str = "QUALITY.md",
                  json_path: str | None = None, jobs: int | None = None, train_timeout: float = 3600) -> dict:
    """The whole comparison; writes `out`, its PNGs in docs/quality/ beside it, and returns the report."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from distvae.bench.report import machine
    from distvae.bench.rounds import synthetic_shards
    from distvae.errors import UserError

    plan = QUICK if quick else FULL
    if steps is not None:
        if steps < 4:
            raise UserError("--steps must be at least 4")
        plan = Plan(**{**plan.__dict__, "steps": steps})
    jobs = jobs or default_jobs()
    if jobs < 1:
        raise UserError("--jobs must be at least 1")
    machine_ = machine()
    threads = max(1, machine_["cores"] // jobs)
    out_path = Path(out)
    if not out_path.parent.is_dir():
        raise UserError(f"--out {out}: folder {out_path.parent} does not exist")
    figures_dir = out_path.parent / "docs" / "quality"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="distvae-bench-quality-") as tmp:
        work = Path(tmp)
        manifest = Path(synthetic_shards(work, plan.images, (plan.resolution,))[plan.resolution])
        splits = {name: split["samples"] for name, split in json.loads(manifest.read_text())["splits"].items()}
        print(f"quality: {plan.images:,} synthetic faces packed at {plan.resolution} px ({splits}) in "
              f"{time.perf_counter() - started:.0f} s; {jobs} run(s) at a time, {threads} thread(s) each", flush=True)
        timing = time_steps(plan, threads)
        for name, figures in timing["variants"].items():
            rounds = ", ".join(f"{value:.0f}" for value in figures["per_round"])
            print(f"quality: {name}: {figures['ms_per_step']:.0f} ms/step (rounds {rounds}), "
                  f"{figures['parameters']:,} parameters: {figures['label']}", flush=True)
        resnet = plan.resnet_candidates[int(timing["chosen"].removeprefix("resnet"))]
        print(f"quality: training plain and {timing['chosen']}, {timing['ratio']:.2f}x the plain step time",
              flush=True)
        variants = {"plain": plan.plain, "resnet": resnet}
        # Seeds outermost and the archs alternating: runs that share the machine at a time cost about the same.
        runs = [(arch, kl_weight, seed) for seed in plan.seeds for kl_weight in plan.kl_weights for arch in ARCHS]
        points, commands, runs_started = [], {}, time.perf_counter()
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(train_and_score, plan, variants[arch], kl_weight, seed, manifest, work, threads,
                                   train_timeout): (arch, kl_weight, seed) for arch, kl_weight, seed in runs}
            for future in as_completed(futures):
                arch, kl_weight, seed = futures[future]
                point, command = future.result()
                points.append(point)
                commands.setdefault(arch, command)
                elapsed = time.perf_counter() - runs_started
                left = elapsed / len(points) * (len(runs) - len(points))
                print(f"quality: [{len(points)}/{len(runs)}] {arch} kl_weight {kl_weight:g} seed {seed}: rate "
                      f"{point.rate:.1f} nats/image, PSNR {point.psnr:.2f} dB, loss {point.loss:.1f}, trained in "
                      f"{point.train_seconds:.0f} s; {elapsed / 60:.1f} min so far, about {left / 60:.0f} min left",
                      flush=True)
        grids = reconstruction_grids(plan, variants, manifest, work, figures_dir, threads)
        names = {"plain": "plain", "resnet": timing["chosen"]}
        plot(points, figures_dir / "rate_distortion.png",
             {arch: describe(variants[arch], timing["variants"][names[arch]]) for arch in ARCHS})
    report = summarise(plan, points, timing, variants, commands, grids, machine_, time.perf_counter() - started,
                       quick, out_path, jobs)
    write_markdown(out_path, report)
    print(f"quality: {report['verdict']}", flush=True)
    print(f"quality: wrote {out_path} and {figures_dir}/ in {report['seconds'] / 60:.1f} min", flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def describe(variant: Variant, figures: dict) -> str:
    """One line for the plot's legend: the shape of the model, its size and its measured step time."""
    from distvae.config import load_config

    model = load_config(variant.config, list(variant.overrides)).model
    shape = f"widths {model.hiddens[0]}-{model.hiddens[-1]}"
    if model.arch == "resnet":
        attention = f", attention at {model.attention_resolution} px" if model.attention_resolution else ""
        blocks = f"{model.blocks_per_stage} block{'s' if model.blocks_per_stage > 1 else ''} per stage"
        shape = f"{blocks}, {shape}{attention}"
    return f"{shape}, {figures['parameters'] / 1e6:.1f}M parameters, {figures['ms_per_step']:.0f} ms/step"


def reconstruction_grids(plan: Plan, variants: dict[str, Variant], manifest: Path, work: Path,
                         figures_dir: Path, threads: int) -> dict[str, str]:
    """`distvae reconstruct` of the same first test images, at the middle kl_weight and the first seed."""
    figures_dir.mkdir(parents=True, exist_ok=True)
    kl_weight, seed = plan.kl_weights[len(plan.kl_weights) // 2], plan.seeds[0]
    grids = {}
    for arch in variants:
        name = f"recon_{arch}_kl{kl_weight:g}.png"
        _run(_python_command("-m", "distvae", "reconstruct", "--ckpt", str(work / run_name(arch, kl_weight, seed)),
                             "--shards", f"{manifest}#test", "--n", str(plan.recon_images),
                             "--out", str(figures_dir / name)), work / f"{name}.log", 600, threads)
        grids[arch] = name
    return grids


def summarise(plan: Plan, points: list[Point], timing: dict, variants: dict[str, Variant], commands: dict,
              grids: dict, machine_: dict, seconds: float, quick: bool, out_path: Path, jobs: int) -> dict:
    command = "python -m distvae.bench.quality" + (" --quick" if quick else "") + \
        ("" if plan.steps == (QUICK if quick else FULL).steps else f" --steps {plan.steps}") + f" --out {out_path}"
    return {"plan": {key: value for key, value in plan.__dict__.items() if key not in ("plain", "resnet_candidates")},
            "command": command, "machine": machine_, "seconds": seconds, "timing": timing, "jobs": jobs,
            "variants": {arch: variant.label for arch, variant in variants.items()},
            "train_commands": {arch: " ".join(_shorten(part) for part in command_) for arch, command_ in
                               commands.items()},
            "points": [point.__dict__ for point in points], **analyse(points), "grids": grids,
            "date": time.strftime("%Y-%m-%d")}


def _shorten(part: str) -> str:
    """Temporary paths in a command line, written the way a reader would type them."""
    if part == sys.executable:
        return "python"
    key, _, value = part.partition("=")
    if value.startswith(tempfile.gettempdir()):
        return f"{key}={'shards/synth64/manifest.json' if value.endswith('manifest.json') else 'runs/ARCH-klK-seedS'}"
    return part


# ---------------------------------------------------------------------------------------------- the report


def write_markdown(path: Path, report: dict) -> None:
    plan, timing, machine_ = report["plan"], report["timing"], report["machine"]
    points = [Point(**point) for point in report["points"]]
    lines = [
        "# Rate-distortion: plain against resnet at an equal cost per step (issue 12)",
        "",
        f"Written by `{report['command']}` on {report['date']}, in {report['seconds'] / 60:.1f} minutes. "
        f"**CPU only, synthetic data**: {plan['images']:,} built-in synthetic faces (`distvae.data.synth`), packed "
        f"pre-resized to {plan['resolution']} px; every run trained {plan['steps']:,} steps at batch {plan['batch']} "
        f"({plan['steps'] * plan['batch']:,} images seen), then scored on the test split, which no run trained or "
        f"validated on. These are short runs on simple pictures: the numbers rank the archs under this budget, "
        f"they do not predict CelebA quality.",
        "",
        f"Machine: {machine_['cores']} cores ({machine_['cpu'] or 'unknown CPU'}), GPU: {machine_['gpu']}, shared "
        f"with other jobs; Python {machine_['python']}, torch {machine_['torch']}, accelerate "
        f"{machine_['accelerate']}, {machine_['platform']}.",
        "",
        "## The two variants and their cost per step",
        "",
        f"Each step timed in a fresh process (`bare_step` of `distvae bench step`: forward under "
        f"{'bf16 autocast' if plan['precision'] == 'bf16' else 'fp32'}, ELBO, backward, clipping, AdamW) at batch "
        f"{plan['batch']}, {plan['timing_rounds']} interleaved rounds, the median kept; the resnet candidate closest "
        f"to the plain step time trains.",
        "",
        "| variant | config and overrides | parameters | ms/step (median) | per round | x plain |",
        "|---|---|---|---|---|---|",
    ]
    plain_ms = timing["variants"]["plain"]["ms_per_step"]
    for name, figures in timing["variants"].items():
        chosen = " (trained)" if name in ("plain", timing["chosen"]) else ""
        lines.append(f"| {name}{chosen} | `{figures['label'].strip()}` | {figures['parameters']:,} | "
                     f"{figures['ms_per_step']:.0f} | {', '.join(f'{v:.0f}' for v in figures['per_round'])} | "
                     f"{figures['ms_per_step'] / plain_ms:.2f} |")
    mean_train = {arch: _mean([p.train_seconds for p in points if p.arch == arch]) for arch in ARCHS}
    within = "within" if timing["within_tolerance"] else "**outside**"
    lines += [
        "",
        f"The trained pair: resnet {timing['ratio']:.2f}x the plain step time, {within} the {COST_TOLERANCE:g}x "
        f"the comparison asks for. Whole training commands (start-up and the final save included) took "
        f"{mean_train['plain']:.0f} s (plain) and {mean_train['resnet']:.0f} s (resnet) on average, "
        f"{report['jobs']} at a time with OMP_NUM_THREADS={timing['threads']} each (timed with the same threads): "
        f"more compute threads than free cores make torch's threads wait for each other, and the machine is "
        f"shared.",
        "",
        "Every run is the trainer as a user types it; the settings that differ from the config files are the same "
        "for every run (same steps, batch, lr, warm-ups, precision, no EMA):",
        "",
        "```",
        *[report["train_commands"][arch] for arch in ARCHS],
        "python -m distvae evaluate --ckpt runs/ARCH-klK-seedS --shards shards/synth64/manifest.json#test "
        "--json scores.json --fid-images 0",
        "```",
        "",
        "## Every point",
        "",
        "Rate: KL(q(z|x) || N(0, I)) in nats per image, summed over the latent dimensions (evaluate's `kl_per_dim`). "
        "PSNR: the decoded posterior mean against the input, dB, averaged over images. Loss: the training objective "
        "on the test split (squared error summed over pixels + kl_weight x KL, per image), from evaluate's -ELBO.",
        "",
        "| arch | kl_weight | seed | rate (nats/image) | PSNR (dB) | held-out loss | active units | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for point in sorted(points, key=lambda p: (ARCHS.index(p.arch), p.kl_weight, p.seed)):
        lines.append(f"| {point.arch} | {point.kl_weight:g} | {point.seed} | {point.rate:.2f} | {point.psnr:.2f} | "
                     f"{point.loss:.2f} | {point.active_units} | {point.train_seconds:.0f} |")
    lines += ["", "![PSNR against rate](docs/quality/rate_distortion.png)", "", "## At equal rate", ""]
    comparison = report["comparison"]
    if comparison:
        lines += [
            "Each arch's seed-mean curve (mean PSNR against the geometric mean rate of each kl_weight), interpolated "
            "linearly in log rate, at rates evenly spaced over the range both reach:",
            "",
            "| rate (nats/image) | PSNR plain (dB) | PSNR resnet (dB) | resnet - plain (dB) | seed spread there (dB) |",
            "|---|---|---|---|---|",
            *[f"| {rate:.2f} | {plain:.2f} | {resnet:.2f} | {resnet - plain:+.2f} | "
              f"{'n/a' if spread is None else f'{spread:.2f}'} |" for rate, plain, resnet, spread in comparison],
            "",
            "The seed spread there is the largest PSNR gap between the two seeds of the runs the row is interpolated "
            "from (either arch, the kl_weights whose rates bracket it).",
        ]
    else:
        lines.append("The two archs reach no common rate: no equal-rate comparison.")
    lines += ["", "Seed spread: the PSNR gap between the seeds of one arch and kl_weight.", ""]
    if report["seed_spreads"]:
        lines += ["| arch | kl_weight | PSNR spread over seeds (dB) |", "|---|---|---|",
                  *[f"| {arch} | {kl:g} | {spread:.2f} |" for arch, kl, spread in report["seed_spreads"]]]
    else:
        lines.append("One seed per point: the spread is not measured.")
    lines += ["", "## Verdict", "", report["verdict"], "", "## What a GPU run on real CelebA needs to confirm it", "",
              GPU_CONFIRMATION, "", "## Reconstructions", "",
              f"The first {plan['recon_images']} test images (each input beside its reconstruction, the posterior mean "
              f"decoded) from the seed-{plan['seeds'][0]} run at kl_weight "
              f"{plan['kl_weights'][len(plan['kl_weights']) // 2]:g} of each arch (`distvae reconstruct`):", ""]
    for arch, name in report["grids"].items():
        lines += [f"{arch}:", "", f"![{arch} reconstructions](docs/quality/{name})", ""]
    path.write_text("\n".join(lines).rstrip() + "\n")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


GPU_CONFIRMATION = (
    "- **Real faces, trained to the end.** CelebA's 162,770 training images at 64 px and the named configs' 50,000 "
    "steps at batch 64 (about 20 epochs), not about 1,000 steps on synthetic shapes. Runs this short rank how "
    "fast each arch learns under an equal step budget; the ranking at convergence may differ.\n"
    "- **The sizes users would pick.** `celeba64` against `celeba64_resnet` (two blocks per stage, widths 64-256, "
    "18.3M parameters), besides a cost-matched pair like this one, whose resnet is small (widths from 8) so "
    "that its step costs what the plain one does on a CPU thread. On a GPU the cost per step must be measured "
    "again: there a step of the reference model is bound by launching kernels, not by arithmetic (README, \"On a "
    "GPU\"), so a match measured on CPU cores does not carry over. Compare at equal steps and at equal GPU "
    "time.\n"
    "- **Each arch at its own best lr** (a short sweep each; here both share lr 1e-3 and one schedule), with the "
    "EMA the resnet config recommends, 3 or more seeds and 4-5 kl_weights over the same rates, so every "
    "equal-rate difference has an error bar from more than one pair of seeds.\n"
    "- **CelebA's 19,962 test images** for the scores: PSNR and rate as here, plus SSIM and FID "
    "(`distvae evaluate` with Inception weights on the machine), since PSNR alone rewards blur.\n"
    "- **The cost:** 2 archs x 5 kl_weights x 3 seeds x 50,000 steps is 1.5 million steps: about 4 hours of one "
    "H200 at the 10 ms a bare bf16 step of the reference model took there, and more for the larger resnet, "
    "whose GPU step time is not measured yet."
)


# ---------------------------------------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="32 px, tiny widths, 2 kl_weights, 1 seed, 30 steps: "
                        "for the tests")
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps of every run (default {FULL.steps}, "
                        f"--quick {QUICK.steps})")
    parser.add_argument("--out", default="QUALITY.md", help="markdown to write; PNGs go to docs/quality/ beside it")
    parser.add_argument("--json", default=None, help="also write every figure as JSON here")
    parser.add_argument("--jobs", type=int, default=None, help="runs at a time (default: one per core, one thread "
                        "each)")
    parser.add_argument("--render", default=None, metavar="JSON", help="only rewrite --out (not the PNGs) from the "
                        "--json of an earlier run: no training")


def run_args(args: argparse.Namespace) -> None:
    """`distvae bench quality` and `python -m distvae.bench.quality`, from their parsed arguments."""
    if args.render:
        report = json.loads(Path(args.render).read_text())
        write_markdown(Path(args.out), {**report, **analyse([Point(**point) for point in report["points"]])})
    else:
        bench_quality(args.quick, args.steps, args.out, args.json, args.jobs)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        timing_worker(json.loads(argv[1]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m distvae.bench.quality", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run_args(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
