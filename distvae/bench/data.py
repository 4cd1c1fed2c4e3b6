"""Images per second per core: the reference loader against our shard stream, side by side.

    distvae bench data                                      # 3,000 synthetic faces, R=64, 5 s per path
    distvae bench data --resolution 64 --seconds 10 --json bench.json
    distvae bench data --source data/celeba --resolution 128   # a real CelebA root (packing it takes minutes)
    python -m distvae bench data --seconds 2 --json out.json

In a temporary folder the images (a synthetic CelebA-layout set made on the spot unless --source is given)
are packed twice: original JPEG bytes and pre-resized R x R npy. Three paths then read the same images:

- reference: a folder Dataset doing PIL open + convert("RGB"), torchvision CenterCrop(168), Resize(R),
  ToTensor(), through DataLoader(batch_size=64, shuffle=True, num_workers=0);
- original_jpeg: ShardStream over the original-JPEG shards (crop 168, resolution R, batch 64, default shuffle
  buffer, num_workers=0) plus batch.to("cpu"), so both ends are float (B, C, H, W) tensors in [0, 1];
- preresized: the same over the pre-resized npy shards.

Everything runs in this one process with torch.set_num_threads(1), and rates are images per CPU second of
the process (time.process_time), i.e. per core; wall-clock rates are kept in the JSON. The machine may be
shared, so the paths are measured in interleaved rounds (order rotated each round) after a warm-up, and
the median round is reported. Each stream path is also taken apart in the same rounds (tar reading alone,
decoding in-memory samples alone, batch assembly + float conversion alone) to say what bounds it; what
the stream spends beyond those parts is reported as "stream bookkeeping" (planning, per-sample Python,
and whatever cache effects the parts measured alone do not see).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distvae.bench.order import access_rates, batch_diversity, order_lines
from distvae.config import DataConfig
from distvae.data.decode import decode_sample
from distvae.data.shards import Shard, read_samples, resolve_shards
from distvae.data.stream import Batch, ShardStream
from distvae.errors import UserError

PATHS = ("reference", "original_jpeg", "preresized")
OURS = PATHS[1:]
BATCH, CROP = 64, 168
TARGET_RESOLUTION = 64
TARGETS = {"original_jpeg": 1.5, "preresized": 8.0}  # x reference, at R = TARGET_RESOLUTION
REST = "stream bookkeeping"  # the remainder: the stream's time per image minus the parts measured alone
PART_NAMES = {  # (part, label) in the order they are printed
    "original_jpeg": (("read", "tar reading"), ("decode", "JPEG decode + crop/resize"),
                      ("batch", "batching + float conversion"), ("other", REST)),
    "preresized": (("read", "tar reading"), ("decode", "npy parsing"), ("batch", "batching + float conversion"),
                   ("other", REST)),
}


class FolderDataset(torch.utils.data.Dataset):
    """The reference loader's dataset: one image file per item, PIL + torchvision transforms."""

    def __init__(self, files: list[Path], resolution: int):
        from torchvision import transforms

        self.files = files
        self.transform = transforms.Compose([transforms.CenterCrop(CROP), transforms.Resize(resolution),
                                             transforms.ToTensor()])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(Image.open(self.files[index]).convert("RGB"))


def bench_data(source: str | None = None, resolution: int = 64, seconds: float = 5.0, json_path: str | None = None,
               *, n: int = 3000, rounds: int = 5) -> dict:
    """Measure, print a table and the bound-by lines, optionally write JSON; returns the JSON object."""
    if resolution < 1 or seconds <= 0 or n < 1 or rounds < 1:
        raise UserError("--resolution, --seconds, n and rounds must be positive")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # every path gets one core
    try:
        with tempfile.TemporaryDirectory(prefix="distvae-bench-") as tmp:
            started = time.perf_counter()
            files, shards = _prepare(source, Path(tmp), resolution, n)
            print(f"prepared {len(files):,} images ({'synthetic' if source is None else source}), packed as original "
                  f"JPEGs and {resolution} px npy in {time.perf_counter() - started:.1f} s", flush=True)
            rates, walls, parts = _measure(files, shards, resolution, seconds, rounds)
            access = access_rates(shards["preresized"], seconds, rounds)
    finally:
        torch.set_num_threads(threads)
    report = _summarise(rates, walls, parts, resolution, len(files), source, seconds, rounds)
    report["order"] = {"diversity": batch_diversity(), "access": access}
    _print_report(report)
    for line in order_lines(report["order"]["diversity"], access):
        print(line)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


# ----------------------------------------------------------------------------------------------- setup


def _prepare(source: str | None, tmp: Path, resolution: int, n: int) -> tuple[list[Path], dict[str, list[Shard]]]:
    from distvae.data.pack import pack
    from distvae.data.synth import make_synthetic_celeba

    quiet = contextlib.redirect_stdout(io.StringIO())  # our own one-line summary replaces theirs
    if source is None:
        root = tmp / "images"
        with quiet:
            make_synthetic_celeba(root, n, progress=False)
    else:
        root = Path(source).expanduser()
        if not (root / "img_align_celeba").is_dir() or not (root / "list_eval_partition.txt").is_file():
            raise UserError(f"--source {source}: expected a CelebA-layout folder (img_align_celeba/ and "
                            "list_eval_partition.txt)")
    shards, skipped = {}, set()
    for path, packed_resolution in (("original_jpeg", 0), ("preresized", resolution)):
        with quiet:
            manifest = pack(root, tmp / path, resolution=packed_resolution, workers=os.cpu_count() or 1,
                            progress=False)
        skipped |= {entry["file"] for entry in manifest["skipped"]}
        shards[path] = [shard for split, info in manifest["splits"].items() if info["shards"]
                        for shard in resolve_shards(str(tmp / path / "manifest.json"), split)]
    rows = (root / "list_eval_partition.txt").read_text().split("\n")
    files = [root / "img_align_celeba" / row.split()[0] for row in rows if row.strip()]
    return [file for file in files if file.name not in skipped], shards


def _reference_batches(files: list[Path], resolution: int):
    loader = torch.utils.data.DataLoader(FolderDataset(files, resolution), batch_size=BATCH, shuffle=True,
                                         num_workers=0)
    while True:
        yield from loader


def _stream_batches(shards: list[Shard], resolution: int):
    stream = ShardStream(shards, batch_size=BATCH, resolution=resolution, crop=CROP, num_workers=0,
                         shuffle_buffer=DataConfig().shuffle_buffer)
    for batch in stream:
        yield batch.to("cpu")[0]


# ----------------------------------------------------------------------------------------------- measuring


def _timed(step, seconds: float) -> tuple[float, float]:
    """Call step() (returns images done) until `seconds` of wall time pass: (images per CPU s, per wall s)."""
    images, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while True:
        images += step()
        if time.perf_counter() - wall0 >= seconds:
            break
    return images / max(time.process_time() - cpu0, 1e-9), images / (time.perf_counter() - wall0)


def _part_steps(shards: dict[str, list[Shard]], resolution: int) -> dict[tuple[str, str], object]:
    """One step function per (path, part), each doing a slice of what the stream does."""
    steps = {}
    for path in OURS:
        urls = itertools.cycle([shard.url for shard in shards[path]])
        per_shard = -(-512 // len(shards[path]))  # up to 512 in-memory samples, spread over the shards
        samples = [sample for shard in shards[path] for _, sample in read_samples(shard.url, 0, per_shard)]
        steps[path, "read"] = lambda urls=urls: sum(1 for _ in read_samples(next(urls)))  # one whole shard
        steps[path, "decode"] = lambda samples=samples: len([decode_sample(s, resolution, CROP) for s in samples])
    first = [sample for _, sample in read_samples(shards["preresized"][0].url, 0, BATCH)]
    decoded = [decode_sample(first[slot % len(first)], resolution, CROP) for slot in range(BATCH)]

    def assemble() -> int:  # what the stream does with decoded images: fill a batch, then Batch.to
        images = np.empty((BATCH, resolution, resolution, 3), dtype=np.uint8)
        for slot, image in enumerate(decoded):
            images[slot] = image
        Batch(torch.from_numpy(images), None, 0).to("cpu")
        return BATCH

    steps["batch"] = assemble
    return steps


def _measure(files, shards, resolution: int, seconds: float, rounds: int):
    for file in files:  # page cache: every path then reads from memory
        file.read_bytes()
    for shard in shards["original_jpeg"] + shards["preresized"]:
        Path(shard.url).read_bytes()
    batches = {"reference": _reference_batches(files, resolution),
               **{path: _stream_batches(shards[path], resolution) for path in OURS}}
    steps = {path: (lambda it=it: len(next(it))) for path, it in batches.items()}
    part_steps = _part_steps(shards, resolution)
    for step in [*steps.values(), *part_steps.values()]:  # warm-up: imports, first epochs, caches
        _timed(step, min(0.5, seconds / rounds))
    rates = {name: [] for name in [*steps, *part_steps]}
    walls = {path: [] for path in PATHS}
    share = seconds / rounds
    for round_ in range(rounds):
        order = PATHS[round_ % 3:] + PATHS[:round_ % 3]
        for path in order:
            per_cpu, per_wall = _timed(steps[path], share)
            rates[path].append(per_cpu)
            walls[path].append(per_wall)
        for name, step in part_steps.items():  # the parts get a quarter of a path's time each
            rates[name].append(_timed(step, share / 4)[0])
    parts = {}
    for path in OURS:
        costs = {part: 1e6 / statistics.median(rates[path, part]) for part in ("read", "decode")}
        costs["batch"] = 1e6 / statistics.median(rates["batch"])
        costs["other"] = max(0.0, 1e6 / statistics.median(rates[path]) - sum(costs.values()))
        parts[path] = costs  # microseconds (CPU) per image
    return {path: rates[path] for path in PATHS}, walls, parts


# ----------------------------------------------------------------------------------------------- reporting


def _summarise(rates, walls, parts, resolution, n, source, seconds, rounds) -> dict:
    median = {path: statistics.median(rates[path]) for path in PATHS}
    ratios = {path: median[path] / median["reference"] for path in PATHS}
    at_target = resolution == TARGET_RESOLUTION
    fractions, bound_by = {}, {}
    for path in OURS:
        total = sum(parts[path].values())
        fractions[path] = {part: cost / total for part, cost in parts[path].items()}
        bound_by[path] = dict(PART_NAMES[path])[max(fractions[path], key=fractions[path].get)]
    return {
        **median,
        "unit": "images per CPU second (one process, torch.set_num_threads(1)): images/s per core",
        "ratios": ratios,
        "targets": TARGETS,
        "target_resolution": TARGET_RESOLUTION,
        "pass": {path: ratios[path] >= TARGETS[path] for path in OURS} if at_target else None,
        "resolution": resolution,
        "images": n,
        "source": source or "synthetic",
        "rounds": rounds,
        "seconds_per_path": seconds,
        "per_round": rates,
        "wall_images_per_second": {path: statistics.median(walls[path]) for path in PATHS},
        "parts_us_per_image": parts,
        "part_fractions": fractions,
        "part_labels": {path: dict(PART_NAMES[path]) for path in OURS},
        "bound_by": bound_by,
    }


def bound_lines(report: dict) -> list[str]:
    lines = []
    for path in OURS:
        names, fractions = PART_NAMES[path], report["part_fractions"][path]
        top = max(fractions, key=fractions.get)
        rest = ", ".join(f"{label} {fractions[part]:.0%}" for part, label in names if part != top)
        lines.append(f"{path}: bound by {dict(names)[top]} ({fractions[top]:.0%} of the time); {rest}")
    lines.append("A training run is bound by whichever is slower, this stream or the model step: the trainer logs "
                 "`data wait` (the share of each step spent waiting for data) to show which.")
    return lines


def _print_report(report: dict) -> None:
    resolution = report["resolution"]
    rows = []
    for path in PATHS:
        target = TARGETS.get(path)
        if target is None:
            check = ""
        elif report["pass"] is None:
            check = f"{f'>= {target:g}x':<8}n/a at R={resolution}"
        else:
            check = f"{f'>= {target:g}x':<8}{'PASS' if report['pass'][path] else 'MISS'}"
        rows.append((path, f"{report[path]:,.0f}", f"{report['ratios'][path]:.2f}x", check))
    header = ("path", "images/s per core", "vs reference", f"target (R={TARGET_RESOLUTION})")
    title = (f"{report['images']:,} images ({report['source']}), R={resolution}, crop {CROP}, batch {BATCH}; median of "
             f"{report['rounds']} interleaved rounds, {report['seconds_per_path']:g} s per path")
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for index, name in enumerate(header):
            table.add_column(name, justify="right" if 0 < index < 3 else "left")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
    else:
        widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(4)]
        print(title)
        for row in (header, *rows):
            print("  ".join(cell.rjust(w) if 0 < i < 3 else cell.ljust(w) for i, (cell, w) in
                            enumerate(zip(row, widths))).rstrip())
    for line in bound_lines(report):
        print(line)
