"""End to end: the tutorial's own loop against `distvae train --config reference`, 10 epochs, pack included.

    distvae bench e2e                        # 3,000 synthetic faces, batch 64, 10 epochs, 5 rounds
    distvae bench e2e --quick --json e.json

Both train the reference model (the tutorial's architecture) at batch 64 on the same training images,
each round in fresh processes, timed by the wall clock from the first command to the last:
- tutorial: the loop as the tutorial wrote it. A folder Dataset (PIL open, CenterCrop(168), Resize(64),
  ToTensor), DataLoader(shuffle=True, num_workers=1), Adam at lr 0.005, fp32, loss = MSE (mean) +
  0.00025 * KL (mean over the batch), 10 epochs;
- distvae: the README's recipe as a user types it. `distvae pack --resolution 64` (pre-resized npy
  shards, the one-off pack timed), then `distvae train --config reference data.batch_size=64` with every
  other setting at its default, for the steps of 10 epochs, no validation split, checkpoints as configured.
The rate is training images per second over the whole command(s); the target is distvae >= 1.5x.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distvae.bench.rounds import in_process, interleaved, median_of, write_figures

WAYS = ("tutorial", "distvae")
TARGET = 1.5
BATCH, EPOCHS = 64, 10


def bench_e2e(images: int = 3000, epochs: int = EPOCHS, rounds: int = 5, quick: bool = False,
              json_path: str | None = None) -> dict:
    from distvae.data.synth import make_synthetic_celeba
    from distvae.errors import UserError

    if quick:
        images, epochs, rounds = 200, 1, 2
    if images < 100 or epochs < 1 or rounds < 1:
        raise UserError("--images must be at least 100, --epochs and --rounds at least 1")
    with tempfile.TemporaryDirectory(prefix="distvae-bench-e2e-") as tmp:
        root = make_synthetic_celeba(Path(tmp) / "celeba", images, progress=False)
        train_files = _train_files(root)
        print(f"e2e: {len(train_files):,} training faces of {images:,}, batch {BATCH}, {epochs} epochs, "
              f"{rounds} rounds", flush=True)
        job = {"root": str(root), "epochs": epochs, "tmp": tmp}
        runs = interleaved(list(WAYS), rounds, lambda way, round_: in_process(
            "distvae.bench.e2e", {**job, "way": way, "round": round_}), progress="e2e")
    report = {way: median_of(runs[way], "images_per_second") for way in WAYS}
    for way in WAYS:
        report[way]["seconds"] = sorted(run["seconds"] for run in runs[way])[len(runs[way]) // 2]
    report["distvae"]["pack_seconds"] = sorted(run["pack_seconds"] for run in runs["distvae"])[rounds // 2]
    ratio = report["distvae"]["images_per_second"] / report["tutorial"]["images_per_second"]
    report["ratio"], report["target"], report["pass"] = ratio, TARGET, ratio >= TARGET
    report["settings"] = {"images": images, "train_images": len(train_files), "epochs": epochs, "rounds": rounds,
                          "batch": BATCH, "unit": "training images per wall-clock second, whole commands"}
    for line in verdict_lines(report):
        print(line)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _train_files(root: Path) -> list[Path]:
    """The training partition of a CelebA-layout root, as the tutorial's folder dataset lists it."""
    rows = (line.split() for line in (root / "list_eval_partition.txt").read_text().splitlines() if line.strip())
    return [root / "img_align_celeba" / name for name, split in rows if split == "0"]


def verdict_lines(report: dict) -> list[str]:
    tutorial, ours = report["tutorial"], report["distvae"]
    return [f"e2e: distvae {ours['images_per_second']:,.0f} images/s ({ours['seconds']:.1f} s, pack "
            f"{ours['pack_seconds']:.1f} s of it) against the tutorial loop's {tutorial['images_per_second']:,.0f} "
            f"({tutorial['seconds']:.1f} s): {report['ratio']:.2f}x; target >= {report['target']:g}x: "
            f"{'PASS' if report['pass'] else 'MISS'}"]


def tutorial(root: Path, epochs: int) -> int:
    """The tutorial's loop; returns the images it trained on."""
    import torch
    import torch.nn.functional as F

    from distvae.bench.data import CROP, FolderDataset
    from distvae.config import load_config
    from distvae.model import build_model

    dataset = FolderDataset(_train_files(root), 64)
    assert CROP == 168
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=1)
    model = build_model(load_config("reference", []).model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.005)
    seen = 0
    model.train()
    for _ in range(epochs):
        for images in loader:
            recon, mean, logvar = model(images)
            kl = torch.mean(-0.5 * torch.sum(1 + logvar - mean**2 - logvar.exp(), dim=1))
            loss = F.mse_loss(recon, images) + 0.00025 * kl
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += images.shape[0]
    return seen


def distvae(root: Path, epochs: int, work: Path) -> tuple[int, float]:
    """`distvae pack` then `distvae train`, as commands; (images trained on, pack seconds)."""
    shards, run_dir = work / "shards", work / "run"
    started = time.perf_counter()
    command = [sys.executable, "-m", "distvae"]
    subprocess.run([*command, "pack", "--src", str(root), "--out", str(shards), "--resolution", "64"], check=True,
                   capture_output=True)
    pack_seconds = time.perf_counter() - started
    manifest = json.loads((shards / "manifest.json").read_text())
    steps = epochs * (manifest["splits"]["train"]["samples"] // BATCH)  # whole batches, as the stream makes them
    subprocess.run([*command, "train", "--config", "reference", f"data.batch_size={BATCH}",
                    f"data.train_shards={shards / 'manifest.json'}", "data.val_shards=", f"train.max_steps={steps}",
                    "log.tracker=none", f"run.dir={run_dir}"], check=True, capture_output=True)
    return steps * BATCH, pack_seconds


def worker(job: dict) -> None:
    root, started = Path(job["root"]), time.perf_counter()
    if job["way"] == "tutorial":
        seen, pack_seconds = tutorial(root, job["epochs"]), 0.0
    else:
        work = Path(job["tmp"]) / f"distvae-{job['round']}"
        seen, pack_seconds = distvae(root, job["epochs"], work)
    seconds = time.perf_counter() - started
    if not math.isfinite(seconds) or seen <= 0:
        raise RuntimeError(f"{job['way']}: {seen} images in {seconds} s")
    write_figures(job, {"images_per_second": seen / seconds, "seconds": seconds, "images": seen,
                        "pack_seconds": pack_seconds})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=3000, help="synthetic faces (80%% of them train)")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds, the median reported")
    parser.add_argument("--quick", action="store_true", help="200 images, 1 epoch, 2 rounds: for the tests")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(json.loads(argv[1]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m distvae.bench.e2e", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    bench_e2e(args.images, args.epochs, args.rounds, args.quick, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
