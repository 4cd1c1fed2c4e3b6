"""Seconds to resume late in an epoch, against reading the skipped data once: does a restart cost a re-read?

    distvae bench resume                      # a 24,100-sample epoch, resumed at 90% of it, 5 rounds
    distvae bench resume --quick --json r.json

Each measurement is a fresh process timing, from building the stream to its first batch:
- resume: ShardStream(...).seek(epoch 0, batch B) then one batch, as a restarted run does;
- read_through: the same stream from the start, B + 1 batches: what a loader without positions pays.
The epoch is the 2,410 training faces of 3,000 synthetic ones, 10 times over (--copies), so it is as
long as a real dataset's: a short epoch would measure process start-up. B is --at (default 0.9) of its
batches, batch 64 at 64 px, data workers as data.num_workers=auto chooses. Three shard kinds: pre-resized
npy and original JPEG (local, random access: the skipped part is never touched; each shard's offsets come
from the index pack writes beside it), and JPEG read through `pipe:cat .../manifest.json` (front to back
only: the shards before the position are not opened, the samples of a shard before it are read past, not
decoded). The target is a resume at least 10x faster than reading through.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from distvae.bench.rounds import in_process, interleaved, median_of, synthetic_shards, write_figures
from distvae.data.seekable import INDEX_SUFFIX

KINDS = ("npy", "jpeg", "jpeg_pipe")
WAYS = ("resume", "read_through")
TARGET = 10.0  # read_through seconds / resume seconds
BATCH, RESOLUTION = 64, 64


def bench_resume(images: int = 3000, copies: int = 10, at: float = 0.9, rounds: int = 5, quick: bool = False,
                 json_path: str | None = None, kinds: tuple[str, ...] = KINDS) -> dict:
    from distvae.errors import UserError

    if quick:
        images, copies, rounds = 400, 2, 2
    if not 0.0 < at < 1.0 or rounds < 1 or copies < 1:
        raise UserError("--at must be between 0 and 1 (a share of the epoch), --rounds and --copies at least 1")
    if not kinds or set(kinds) - set(KINDS):
        raise UserError(f"--kinds {','.join(kinds)}: choose among {','.join(KINDS)}")
    with tempfile.TemporaryDirectory(prefix="distvae-bench-resume-") as tmp:
        made = synthetic_shards(Path(tmp), images, (RESOLUTION,), jpeg=True)
        npy, jpeg = (_replicated(Path(made[key]), copies) for key in (RESOLUTION, "jpeg"))
        sources = {"npy": str(npy), "jpeg": str(jpeg), "jpeg_pipe": _piped(jpeg)}
        epoch = json.loads(npy.read_text())["splits"]["train"]["samples"]
        print(f"resume: an epoch of {epoch:,} samples ({copies} copies of the {epoch // copies:,} training faces), "
              f"batch {BATCH}, resumed at {at:.0%}", flush=True)
        report = {"settings": {"images": images, "copies": copies, "epoch_samples": epoch, "at": at,
                               "rounds": rounds, "batch": BATCH, "resolution": RESOLUTION,
                               "unit": "seconds from building the stream to the batch"}}
        for kind in kinds:
            job = {"shards": sources[kind], "at": at}
            runs = interleaved(list(WAYS), rounds, lambda way, _, job=job: in_process("distvae.bench.resume",
                                                                                      {**job, "way": way}),
                               progress=f"resume {kind}")
            entry = {way: median_of(runs[way], "seconds") for way in WAYS}
            entry["batch_index"] = runs["resume"][0]["batch_index"]
            firsts = {run["first_position"] for way in WAYS for run in runs[way]}
            if len(firsts) != 1:  # a fast resume to the wrong batch would be no resume at all
                raise RuntimeError(f"resume {kind}: the resumed batch is not the one reading through gives: {firsts}")
            entry["speedup"] = entry["read_through"]["seconds"] / entry["resume"]["seconds"]
            entry["target"], entry["pass"] = TARGET, entry["speedup"] >= TARGET
            report[kind] = entry
    for line in verdict_lines(report):
        print(line)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _replicated(manifest: Path, copies: int) -> Path:
    """The training split `copies` times over (symbolic links with names of their own): an epoch as long as
    a real dataset's without packing one. Each link is a shard of its own to the reader, indexed and mapped
    on its own; the bytes come from the page cache as a real dataset's would on a warm node."""
    data = json.loads(manifest.read_text())
    folder = manifest.parent / f"x{copies}"
    folder.mkdir()
    shards = []
    for copy in range(copies):
        for shard in data["splits"]["train"]["shards"]:
            name = f"copy{copy:03d}-{shard['file']}"
            (folder / name).symlink_to(manifest.parent / shard["file"])
            index = manifest.parent / (shard["file"] + INDEX_SUFFIX)
            if index.exists():  # pack's index of the shard: a random-access open reads it instead of the headers
                (folder / (name + INDEX_SUFFIX)).symlink_to(index)
            shards.append({**shard, "file": name})
    data["splits"] = {"train": {"samples": sum(shard["samples"] for shard in shards), "shards": shards}}
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder / "manifest.json"


def _piped(manifest: Path) -> str:
    """The same shards through `pipe:cat`: a stream that can only read front to back. The command names the
    manifest, as the README recommends, so the counts come from it and no shard is streamed to count it."""
    return f"pipe:cat {manifest}"


def verdict_lines(report: dict) -> list[str]:
    lines = []
    for kind in (kind for kind in KINDS if kind in report):
        entry = report[kind]
        resume, through = entry["resume"]["seconds"], entry["read_through"]["seconds"]
        lines.append(f"resume {kind}: batch {entry['batch_index']} of the epoch in {resume:.3f} s, against "
                     f"{through:.3f} s reading up to it: {entry['speedup']:.1f}x; target >= {TARGET:g}x: "
                     f"{'PASS' if entry['pass'] else 'MISS'}")
    return lines


def worker(job: dict) -> None:
    import torch

    from distvae.data.shards import resolve_shards
    from distvae.data.stream import ShardStream
    from distvae.data.workers import auto_workers

    torch.set_num_threads(1)
    started = time.perf_counter()
    shards = resolve_shards(job["shards"], split="train")
    stream = ShardStream(shards, batch_size=BATCH, resolution=RESOLUTION, seed=0, hflip=True,
                         num_workers=auto_workers(shards, "none")[0])
    target = int(job["at"] * stream.batches_per_epoch)
    if job["way"] == "resume":
        stream.seek(0, target)
        batch = next(iter(stream))
    else:
        batches = iter(stream)
        for _ in range(target + 1):
            batch = next(batches)
    seconds = time.perf_counter() - started
    assert batch.images.shape[0] == BATCH
    write_figures(job, {"seconds": seconds, "batch_index": target, "first_position": int(batch.positions[0])})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=3000, help="synthetic faces to pack")
    parser.add_argument("--copies", type=int, default=10, help="the training split this many times over: one long "
                        "epoch (10 x 2,410 = 24,100 samples)")
    parser.add_argument("--at", type=float, default=0.9, help="where to resume, as a share of the epoch")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds, the median reported")
    parser.add_argument("--kinds", default=",".join(KINDS), help="shard kinds to measure, a comma list of "
                        + ", ".join(KINDS))
    parser.add_argument("--quick", action="store_true", help="400 images twice over, 2 rounds: for the tests")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(json.loads(argv[1]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m distvae.bench.resume", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    bench_resume(args.images, args.copies, args.at, args.rounds, args.quick, args.json,
                 tuple(kind.strip() for kind in args.kinds.split(",") if kind.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
