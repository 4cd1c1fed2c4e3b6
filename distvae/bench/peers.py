"""Images per CPU second: distvae's data path against mosaicml-streaming and litdata, on the same images.

    distvae bench data --peers                          # 3,000 synthetic faces, 64 px, median of 5 rounds
    distvae bench data --peers --n 1000 --json peers.json
    distvae bench all --peers                           # with the other benches (make bench PEERS=1)
    python -m distvae.bench.peers --quick               # a few hundred images, 2 rounds
    python -m distvae.bench.peers --worker JOB          # one configuration, two epochs (what each round runs)

The peers come with the optional extra: pip install -e '.[bench]'.

The synthetic faces (or --n of them) are packed by `distvae pack` twice, as original JPEG bytes and
pre-resized R x R npy, and the same images are written for each peer as its documentation shows:
MDS shards by `MDSWriter` (a `jpeg` column fed the opened files, so the original bytes are stored; an
`ndarray:uint8:R,R,3` column) and litdata chunks by `litdata.optimize` (the opened JPEG file; the numpy
array), both uncompressed, as distvae's shards are. Two more copies per peer hold the bytes as they are
(`bytes` columns: the JPEG file, the .npy payload), for the peers with distvae's decoder plugged in.

Each configuration reads shuffled epochs at batch 64 and ends with float (B, 3, R, R) batches in [0, 1]:
- distvae: `ShardStream` (crop 168); on the pre-resized shards also with `cache="host"`.
- streaming: `StreamingDataset` subclassed as its docs show (`__getitem__` transforms the sample) and a
  torch DataLoader. The `jpeg` column gives a PIL image: CenterCrop(168), Resize(R), ToTensor(), as the
  tutorial does. The array column: ToTensor().
- litdata: `StreamingDataset` subclassed as its docs show, `StreamingDataLoader`. Its JPEG serializer
  hands back a uint8 tensor decoded by torchvision: v2 CenterCrop(168), Resize(R) (antialiased),
  ToDtype(float32, scale=True). The array: ToTensor().
- peer+distvae_decoder: the peer reads the `bytes` copy and `__getitem__` calls distvae's own
  `decode_sample` (the function the stream decodes, crops and resizes with); the batch of uint8 images
  becomes float as distvae's `Batch.to` does it.

Every configuration runs in a FRESH process (`python -m distvae.bench.peers --worker`), with its imports
done before the clock starts, `torch.set_num_threads(1)` and the same number of DataLoader workers
(`workers`, 0 by default: in process, so the figure is the loader's own work, not inter-process copies).
The figure is its first epoch, from building the dataset and loader to the last batch (a peer's workers
end with the epoch; distvae's live on and are counted while alive); the second epoch of the same process
is reported beside it, without the one-off costs of a fresh process (first allocations, lazy
initialisation), which weigh on a 3,000-image epoch far more than on a CelebA-size one. CPU time is that
of the process (all its threads), of its children that have exited and been waited for (getrusage
RUSAGE_CHILDREN: the DataLoader workers) and of any child still alive (psutil). The pixel checksum that
shows all configurations read the same images is taken by the main thread and its own CPU time
(thread_time) is subtracted; no gc.collect() runs in the timed region (a full collection with torch
loaded costs about 0.1 s, half a pre-resized epoch here). The configurations run in interleaved rounds
(order rotated each round: the machine may be shared) and the median round is reported.

Verdicts (issue 10): per CPU second, what each path costs the CPU to hand training its batches, distvae
against the better peer as used out of the box; on the original JPEGs at least 1.5x, on pre-resized shards
(distvae's better of the batched gather and the host cache) at least 3x, both in the first epoch.
distvae's path ends at uint8 batches: training converts them to float on the device (`Batch.to`, after a
copy 4x smaller than float's), so its figure leaves the conversion the bench does on the CPU out. A peer's
documented path converts to float in `__getitem__`, on the CPU, and is counted as it is. distvae's figure
with the conversion on the CPU (what a CPU-only run pays in its step), the second epoch, and the peers with
distvae's decoder are printed beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

BATCH, CROP = 64, 168
KINDS = ("original_jpeg", "preresized")
LOADERS = {  # kind -> loaders measured on it, in the order printed
    "original_jpeg": ("distvae", "streaming", "litdata", "streaming+distvae_decoder", "litdata+distvae_decoder"),
    "preresized": ("distvae", "distvae_cache_host", "streaming", "litdata", "streaming+distvae_decoder",
                   "litdata+distvae_decoder"),
}
OURS = {"original_jpeg": ("distvae",), "preresized": ("distvae", "distvae_cache_host")}
PEERS = ("streaming", "litdata")  # as used out of the box: what the targets compare with
PLUGGED = ("streaming+distvae_decoder", "litdata+distvae_decoder")
TARGETS = {"original_jpeg": 1.5, "preresized": 3.0}  # distvae / the better peer, per CPU second
PEER_PACKAGES = {"streaming": "mosaicml-streaming", "litdata": "litdata"}
EPOCHS = 2  # per process: the first (cold, the loader built in it) is the figure; the second shows the warm rate
QUICK = {"n": 320, "rounds": 2}  # 5 whole batches: distvae, which yields whole batches only, reads every image


def missing_peers() -> list[str]:
    """The pip names of the peers that cannot be imported here ([] when the bench can run)."""
    import importlib.util

    return [package for module, package in PEER_PACKAGES.items() if importlib.util.find_spec(module) is None]


# ----------------------------------------------------------------------------------------------- accounting


def cpu_of(*usages) -> float:
    """User + system seconds summed over rusage-like records (ru_utime, ru_stime) or psutil cpu_times (user, system)."""
    total = 0.0
    for usage in usages:
        if hasattr(usage, "ru_utime"):
            total += usage.ru_utime + usage.ru_stime
        else:
            total += usage.user + usage.system
    return total


def process_tree_cpu() -> float:
    """CPU seconds of this process (every thread), of its children that exited and were waited for, and of
    its descendants still alive now (which getrusage does not see yet)."""
    import psutil

    alive = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):  # it may exit while we look
            alive.append(child.cpu_times())
    return cpu_of(resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN), *alive)


# ----------------------------------------------------------------------------------------------- verdicts


def verdicts(medians: dict[str, dict[str, float]], targets: dict[str, float] = TARGETS) -> dict[str, dict]:
    """Per kind: distvae's best figure against the better peer out of the box, the ratio and PASS/MISS.

    `medians[kind][loader]` is images per CPU second. The best peer with distvae's decoder plugged in is
    kept beside it (informative: the targets compare with the peers as users run them)."""
    result = {}
    for kind, target in targets.items():
        rates = medians[kind]
        ours = max(OURS[kind], key=lambda loader: rates[loader])
        peer = max(PEERS, key=lambda loader: rates[loader])
        plugged = max(PLUGGED, key=lambda loader: rates[loader])
        ratio = rates[ours] / rates[peer]
        result[kind] = {"ours": ours, "ours_rate": rates[ours], "peer": peer, "peer_rate": rates[peer],
                        "ratio": ratio, "target": target, "pass": ratio >= target, "plugged_peer": plugged,
                        "plugged_ratio": rates[ours] / rates[plugged]}
    return result


def warm_lines(verdicts_: dict[str, dict]) -> list[str]:
    """The same comparison in the second epoch of each process (informative: one-off costs gone)."""
    return [f"{kind}, second epoch of the same processes: {v['ours']} {v['ours_rate']:,.0f} vs {v['peer']} "
            f"{v['peer_rate']:,.0f} = {v['ratio']:.2f}x; vs {v['plugged_peer']} {v['plugged_ratio']:.2f}x"
            for kind, v in verdicts_.items()]


def verdict_lines(verdicts_: dict[str, dict]) -> list[str]:
    lines = []
    for kind, v in verdicts_.items():
        lines.append(f"{kind}: {v['ours']} {v['ours_rate']:,.0f} (uint8 batches, as training takes them) vs the better "
                     f"peer ({v['peer']}, float as documented) {v['peer_rate']:,.0f}"
                     f" images per CPU second = {v['ratio']:.2f}x (target >= {v['target']:g}x) "
                     f"{'PASS' if v['pass'] else 'MISS'}; against the better peer with distvae's decoder "
                     f"({v['plugged_peer']}) {v['plugged_ratio']:.2f}x")
    return lines


# ----------------------------------------------------------------------------------------------- the bench


def bench_peers(n: int = 3000, resolution: int = 64, rounds: int = 5, json_path: str | None = None,
                quick: bool = False, workers: int = 0) -> dict:
    """Prepare the images for every loader, measure each configuration in fresh processes, print, return JSON."""
    from distvae.errors import UserError

    if quick:
        n, rounds = QUICK["n"], QUICK["rounds"]
    if n < BATCH or resolution < 1 or rounds < 1 or workers < 0:
        raise UserError(f"the peer bench needs n >= {BATCH}, a positive resolution and rounds, workers >= 0")
    missing = missing_peers()
    if missing:
        raise UserError(f"distvae bench data --peers needs {' and '.join(missing)}: pip install -e '.[bench]'")
    from distvae.bench.rounds import in_process, interleaved

    with tempfile.TemporaryDirectory(prefix="distvae-peers-") as tmp:
        started = time.perf_counter()
        sources = prepare(Path(tmp), resolution, n)
        prepared = time.perf_counter() - started
        print(f"prepared {n:,} synthetic images for distvae, mosaicml-streaming and litdata ({resolution} px) in "
              f"{prepared:.1f} s", flush=True)
        job = {"sources": sources, "resolution": resolution, "workers": workers}
        ways = [f"{kind}/{loader}" for kind in KINDS for loader in LOADERS[kind]]
        env = {"LITDATA_DISABLE_VERSION_CHECK": "1", "TQDM_DISABLE": "1"}  # no PyPI query in the timed region
        runs = interleaved(ways, rounds, lambda way, round_: in_process(
            "distvae.bench.peers", {**job, "way": way}, env=env), progress="peers")
    report = summarise(runs, n, resolution, rounds, workers, prepared)
    print_report(report)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def summarise(runs: dict[str, list[dict]], n: int, resolution: int, rounds: int, workers: int,
              prepared: float) -> dict:
    from distvae.bench.rounds import median_of

    report = {"unit": "images per CPU second of the reading process and its workers, the first epoch of a fresh "
                      "process (building the loader included); _warm: the second epoch of the same process",
              "images": n, "resolution": resolution, "batch": BATCH, "crop": CROP, "rounds": rounds,
              "workers": workers, "prepare_seconds": prepared, "versions": versions()}
    medians, warm = {}, {}
    for kind in KINDS:
        report[kind], medians[kind] = {}, {}
        for loader in LOADERS[kind]:
            figures = runs[f"{kind}/{loader}"]
            entry = median_of(figures, "images_per_cpu_second")
            entry["wall_images_per_second"] = statistics.median(run["images_per_wall_second"] for run in figures)
            entry["images_per_epoch"] = figures[0]["images"]
            entry["pixel_mean"] = figures[0]["pixel_mean"]
            entry["pixel_means_per_epoch"] = [epoch["pixel_mean"] for epoch in figures[0]["epochs"]]
            entry["worker_cpu_share"] = statistics.median(
                run["children_cpu_seconds"] / sum(epoch["cpu_seconds"] for epoch in run["epochs"]) for run in figures)
            entry["setup_cpu_seconds"] = statistics.median(run["setup_cpu_seconds"] for run in figures)
            entry["warm_per_round"] = [run["images_per_cpu_second_warm"] for run in figures]
            entry["images_per_cpu_second_warm"] = statistics.median(entry["warm_per_round"])
            converted = figures[0]["conversion_cpu_seconds"] > 0  # distvae and the peers with its decoder
            entry["conversion_share"] = statistics.median(run["conversion_cpu_seconds"] / run["cpu_seconds"]
                                                          for run in figures)
            entry["images_per_cpu_second_float_on_device"] = statistics.median(
                _uint8_rate(run) for run in figures) if converted else None
            entry["images_per_cpu_second_after_setup"] = statistics.median(
                run["images"] / max(run["cpu_seconds"] - run["setup_cpu_seconds"], 1e-9) for run in figures)
            entry["images_per_cpu_second_warm_float_on_device"] = statistics.median(
                _uint8_rate(run["epochs"][-1]) for run in figures) if converted else None
            # What each path costs the CPU to hand training a batch: distvae's ends at uint8 (Batch.to converts on
            # the device, after a 4x smaller copy); a peer as documented converts to float in __getitem__.
            ours = loader in OURS[kind]
            medians[kind][loader] = entry["images_per_cpu_second_float_on_device"] if ours else \
                entry["images_per_cpu_second"]
            warm.setdefault(kind, {})[loader] = entry["images_per_cpu_second_warm_float_on_device"] if ours else \
                entry["images_per_cpu_second_warm"]
            report[kind][loader] = entry
    report["verdicts"] = verdicts(medians)
    report["verdicts_warm"] = verdicts(warm)
    report["pass"] = {kind: v["pass"] for kind, v in report["verdicts"].items()}
    return report


def _uint8_rate(epoch: dict) -> float:
    """Images per CPU second of an epoch's figures without the CPU time of the uint8-to-float conversion."""
    return epoch["images"] / max(epoch["cpu_seconds"] - epoch["conversion_cpu_seconds"], 1e-9)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "torchvision", "pillow", *PEER_PACKAGES.values()):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


def print_report(report: dict) -> None:
    v = report["versions"]
    print(f"{report['images']:,} images, R={report['resolution']}, crop {CROP}, batch {BATCH}, "
          f"{report['workers']} DataLoader workers; {EPOCHS} epochs per fresh process, median of {report['rounds']} "
          f"interleaved rounds; mosaicml-streaming {v.get('mosaicml-streaming')}, litdata {v.get('litdata')}, "
          f"torch {v.get('torch')}")
    header = ("data", "loader", "1st epoch", "spread", "vs distvae", "2nd epoch", "vs distvae", "setup CPU s",
              "uint8 out", "images/wall s", "peak MiB")
    rows = []
    for kind in KINDS:
        ours = max(report[kind][loader]["images_per_cpu_second"] for loader in OURS[kind])
        ours_warm = max(report[kind][loader]["images_per_cpu_second_warm"] for loader in OURS[kind])
        for loader in LOADERS[kind]:
            entry = report[kind][loader]
            rate, warm = entry["images_per_cpu_second"], entry["images_per_cpu_second_warm"]
            uint8 = entry["images_per_cpu_second_float_on_device"]
            rows.append((kind, loader, f"{rate:,.0f}", f"{entry['spread']:.0%}", f"{rate / ours:.2f}x", f"{warm:,.0f}",
                         f"{warm / ours_warm:.2f}x", f"{entry['setup_cpu_seconds']:.2f}",
                         "-" if uint8 is None else f"{uint8:,.0f}", f"{entry['wall_images_per_second']:,.0f}",
                         f"{entry['peak_rss_mib']:,.0f}"))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    print("images per CPU second, every batch float (B, 3, R, R) in [0, 1] on the CPU. 1st epoch: a fresh process, "
          "building the loader included (setup CPU s; the host cache is read there); 2nd epoch: the same process "
          "again; uint8 out: the 1st epoch without the uint8-to-float conversion, which training does on the device "
          "(distvae and the peers with its decoder)")
    for line in verdict_lines(report["verdicts"]) + warm_lines(report["verdicts_warm"]):
        print(line)
    for kind in KINDS:
        v = report["verdicts"][kind]
        ours, peer = report[kind][v["ours"]], report[kind][v["peer"]]
        print(f"{kind}: with the float conversion on the CPU as well ({ours['conversion_share']:.0%} of its CPU time; "
              f"a CPU-only run pays it in the step) {v['ours']} gives {ours['images_per_cpu_second']:,.0f} images per "
              f"CPU second = {ours['images_per_cpu_second'] / peer['images_per_cpu_second']:.2f}x {v['peer']}")


# ----------------------------------------------------------------------------------------------- preparing


def prepare(tmp: Path, resolution: int, n: int) -> dict:
    """Pack the images for distvae and write the same images for each peer; returns the folders by name."""
    from PIL import Image

    from distvae.bench.data import _prepare
    from distvae.data.decode import decode_sample
    from distvae.data.shards import read_samples

    files, shards = _prepare(None, tmp, resolution, n)
    npy_payloads = [sample["npy"] for shard in shards["preresized"] for _, sample in read_samples(shard.url)]
    sources = {"distvae/original_jpeg": str(tmp / "original_jpeg" / "manifest.json"),
               "distvae/preresized": str(tmp / "preresized" / "manifest.json")}

    from streaming import MDSWriter

    def write_mds(name: str, columns: dict, samples) -> None:
        sources[f"streaming/{name}"] = str(tmp / "mds" / name)
        with MDSWriter(out=sources[f"streaming/{name}"], columns=columns) as writer:
            for sample in samples:
                writer.write(sample)

    def opened_jpegs():
        for file in files:
            with Image.open(file) as image:  # an opened JPEG file: MDS stores its original bytes
                yield {"image": image}

    write_mds("original_jpeg", {"image": "jpeg"}, opened_jpegs())
    write_mds("original_jpeg_bytes", {"jpg": "bytes"}, ({"jpg": file.read_bytes()} for file in files))
    write_mds("preresized", {"image": f"ndarray:uint8:{resolution},{resolution},3"},
              ({"image": decode_sample({"npy": payload}, resolution, 0)} for payload in npy_payloads))
    write_mds("preresized_bytes", {"npy": "bytes"}, ({"npy": payload} for payload in npy_payloads))

    import litdata

    lit = {"original_jpeg": (_lit_jpeg_image, [str(file) for file in files]),
           "original_jpeg_bytes": (_lit_jpeg_bytes, [str(file) for file in files]),
           "preresized": (_lit_npy_array, npy_payloads), "preresized_bytes": (_lit_npy_bytes, npy_payloads)}
    for name, (fn, inputs) in lit.items():
        sources[f"litdata/{name}"] = str(tmp / "litdata" / name)
        with contextlib.redirect_stdout(io.StringIO()):
            litdata.optimize(fn=fn, inputs=inputs, output_dir=sources[f"litdata/{name}"], chunk_bytes="64MB",
                             num_workers=min(2, os.cpu_count() or 1), start_method="fork", verbose=False)
    for folder in tmp.rglob("*"):  # page cache: every configuration then reads from memory
        if folder.is_file():
            folder.read_bytes()
    return sources


def _lit_jpeg_image(path: str) -> dict:
    from PIL import Image

    return {"image": Image.open(path)}  # litdata stores an opened JPEG file's own bytes


def _lit_jpeg_bytes(path: str) -> dict:
    return {"jpg": Path(path).read_bytes()}


def _lit_npy_array(payload: bytes) -> dict:
    import numpy as np

    return {"image": np.load(io.BytesIO(payload))}  # the pre-resized uint8 (R, R, 3) array


def _lit_npy_bytes(payload: bytes) -> dict:
    return {"npy": payload}


# ----------------------------------------------------------------------------------------------- one epoch


def _distvae_loader(job: dict, kind: str, cache: str):
    """distvae's stream, built (with cache="host" the shards are read into memory here): (epoch, close)."""
    from distvae.data.shards import resolve_shards
    from distvae.data.stream import ShardStream

    manifest = job["sources"][f"distvae/{kind}"]
    splits = json.loads(Path(manifest).read_text())["splits"]
    shards = [shard for split, info in splits.items() if info["shards"] for shard in resolve_shards(manifest, split)]
    stream = ShardStream(shards, batch_size=BATCH, resolution=job["resolution"], crop=CROP,
                         num_workers=job["workers"], cache=cache)
    batches = iter(stream)  # endless, epoch after epoch (its workers live across epochs)

    def epoch() -> Iterator:
        for _ in range(stream.batches_per_epoch):
            yield _to_float(next(batches))

    return epoch, batches.close  # close shuts the workers down, so they are waited for and counted


_conversion_cpu = [0.0]  # CPU seconds the main thread spent in Batch.to: uint8 (B, H, W, C) -> float (B, C, H, W)


def _to_float(batch):
    """distvae's conversion of a uint8 batch to float in [0, 1], on the CPU here; its CPU time is kept aside,
    since in training it runs on the device the batch goes to (uint8 crosses the bus)."""
    started = time.thread_time()
    images = batch.to("cpu")[0]
    _conversion_cpu[0] += time.thread_time() - started
    return images


def _sample_transform(kind: str, plugged: bool, resolution: int):
    """What the peer's __getitem__ does to the sample it read: distvae's decoder (uint8 (R, R, 3)) or the
    transforms its users write (float (3, R, R) in [0, 1])."""
    import torch
    from torchvision import transforms
    from torchvision.transforms import v2

    from distvae.data.decode import decode_sample

    pil = transforms.Compose([transforms.CenterCrop(CROP), transforms.Resize(resolution), transforms.ToTensor()])
    tensor = v2.Compose([v2.CenterCrop(CROP), v2.Resize(resolution, antialias=True),
                         v2.ToDtype(torch.float32, scale=True)])
    to_tensor = transforms.ToTensor()

    def transform(sample: dict):
        if plugged:
            if kind == "original_jpeg":
                return decode_sample({"jpg": sample["jpg"]}, resolution, CROP)
            return decode_sample({"npy": sample["npy"]}, resolution, 0)
        image = sample["image"]
        if kind == "preresized":  # a uint8 (R, R, 3) array
            return to_tensor(image)
        if isinstance(image, torch.Tensor):  # litdata's JPEG serializer decodes with torchvision: uint8 (3, H, W)
            return tensor(image)
        return pil(image.convert("RGB"))  # streaming's jpeg column: a PIL image, the tutorial's transforms

    return transform


def _peer_loader(job: dict, kind: str, loader: str):
    """A peer's dataset and loader, built as its documentation shows (or with distvae's decoder in
    __getitem__): (epoch, close)."""
    from distvae.data.stream import Batch

    library, _, plugged = loader.partition("+")
    source = job["sources"][f"{library}/{kind}{'_bytes' if plugged else ''}"]
    transform = _sample_transform(kind, bool(plugged), job["resolution"])
    if library == "streaming":
        from streaming import StreamingDataset
        from torch.utils.data import DataLoader

        class Dataset(StreamingDataset):
            def __getitem__(self, index):
                return transform(super().__getitem__(index))

        batches = DataLoader(Dataset(local=source, shuffle=True, batch_size=BATCH), batch_size=BATCH,
                             num_workers=job["workers"])
    else:
        from litdata import StreamingDataLoader, StreamingDataset

        class Dataset(StreamingDataset):
            def __getitem__(self, index):
                return transform(super().__getitem__(index))

        batches = StreamingDataLoader(Dataset(source, shuffle=True), batch_size=BATCH, num_workers=job["workers"])

    def epoch() -> Iterator:  # each pass over the loader is an epoch; its workers end with it (the default)
        for batch in batches:
            yield _to_float(Batch(batch, None, 0)) if plugged else batch

    return epoch, lambda: None


def _imports(loader: str) -> None:
    """Everything a configuration imports, loaded before the clock starts."""
    import torch  # noqa: F401
    import torchvision.transforms  # noqa: F401
    from torchvision.transforms import v2  # noqa: F401

    import distvae.data.stream  # noqa: F401

    if loader.startswith("streaming"):
        import streaming  # noqa: F401
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
    elif loader.startswith("litdata"):
        import litdata  # noqa: F401


def worker(job: dict) -> None:
    """One configuration in this fresh process: build it, read EPOCHS epochs; write each epoch's images, CPU
    seconds and pixel checksum to job["out"]. The first epoch's figures include building the loader."""
    kind, loader = job["way"].split("/")
    _imports(loader)
    import torch

    torch.set_num_threads(1)
    resolution = job["resolution"]
    gc.collect()
    cpu0, wall0, children0 = process_tree_cpu(), time.perf_counter(), _children_cpu()
    if loader.startswith("distvae"):
        epoch, close = _distvae_loader(job, kind, "host" if loader == "distvae_cache_host" else "none")
    else:
        epoch, close = _peer_loader(job, kind, loader)
    setup_cpu = process_tree_cpu() - cpu0
    epochs, start_cpu, start_wall = [], cpu0, wall0
    for index in range(EPOCHS):
        images, pixel_sum, check_cpu, conversion0 = 0, 0.0, 0.0, _conversion_cpu[0]
        for batch in epoch():
            check0 = time.thread_time()
            if batch.dtype != torch.float32 or tuple(batch.shape[1:]) != (3, resolution, resolution):
                raise RuntimeError(f"{job['way']} gave a {batch.dtype} batch of shape {tuple(batch.shape)}")
            images += batch.shape[0]
            pixel_sum += float(torch.sum(batch, dtype=torch.float64))
            check_cpu += time.thread_time() - check0
        del batch
        if index == EPOCHS - 1:
            close()
        cpu, wall = process_tree_cpu() - start_cpu - check_cpu, time.perf_counter() - start_wall - check_cpu
        epochs.append({"images": images, "cpu_seconds": cpu, "wall_seconds": wall,
                       "conversion_cpu_seconds": _conversion_cpu[0] - conversion0,
                       "pixel_mean": pixel_sum / (images * 3 * resolution * resolution)})
        start_cpu, start_wall = process_tree_cpu(), time.perf_counter()  # the measuring itself is not counted
    first, second = epochs[0], epochs[-1]
    figures = {"images": first["images"], "cpu_seconds": first["cpu_seconds"], "setup_cpu_seconds": setup_cpu,
               "conversion_cpu_seconds": first["conversion_cpu_seconds"], "pixel_mean": first["pixel_mean"],
               "images_per_cpu_second": first["images"] / first["cpu_seconds"],
               "images_per_wall_second": first["images"] / first["wall_seconds"],
               "images_per_cpu_second_warm": second["images"] / second["cpu_seconds"],
               "children_cpu_seconds": _children_cpu() - children0, "epochs": epochs, "peak_rss_mib": _peak_rss_mib()}
    Path(job["out"]).write_text(json.dumps(figures))


def _peak_rss_mib() -> float:
    from distvae.bench.rounds import peak_rss_mib

    return peak_rss_mib()


def _children_cpu() -> float:
    return cpu_of(resource.getrusage(resource.RUSAGE_CHILDREN))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(json.loads(argv[1]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m distvae.bench.peers", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="synthetic images")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds, the median reported")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers, the same for every loader")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK['n']} images, {QUICK['rounds']} rounds")
    parser.add_argument("--json", default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    bench_peers(args.n, args.resolution, args.rounds, args.json, args.quick, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
