"""What every timed bench shares: one fresh process per measurement, interleaved rounds, the median.

    figures = interleaved(["a", "b"], rounds=5, measure=lambda way, round_: in_process("distvae.bench.x", job))

The machine may be shared: the ways run in turn inside each round, with the order rotated from round to
round, so a slow spell falls on all of them; the median round is reported with the spread.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


def interleaved(ways: list[str], rounds: int, measure: Callable[[str, int], dict], progress: str = "") -> dict:
    """{way: [figures of each round]}: measure(way, round) for every way, rounds times, order rotated."""
    runs: dict[str, list[dict]] = {way: [] for way in ways}
    for round_ in range(rounds):
        shift = round_ % len(ways)
        for way in ways[shift:] + ways[:shift]:
            runs[way].append(measure(way, round_))
        if progress:
            print(f"{progress}: round {round_ + 1}/{rounds} done", flush=True)
    return runs


def median_of(runs: list[dict], key: str) -> dict:
    """The median and spread of one figure over rounds, with the largest peak memory."""
    values = [run[key] for run in runs]
    middle = statistics.median(values)
    return {key: middle, "per_round": values, "spread": (max(values) - min(values)) / middle if middle else 0.0,
            "peak_rss_mib": max(run.get("peak_rss_mib", 0.0) for run in runs)}


def in_process(module: str, job: dict, timeout: float = 1800, env: dict | None = None) -> dict:
    """Run `python -m module --worker JOB` in a fresh process and return the JSON it writes."""
    with tempfile.TemporaryDirectory(prefix="distvae-bench-") as tmp:
        out = Path(tmp) / "figures.json"
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
        result = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps({**job, "out": str(out)})],
                                capture_output=True, text=True, env=environment, timeout=timeout)
        if result.returncode != 0 or not out.exists():
            raise RuntimeError(f"{module} worker {job} exited with {result.returncode}:\n{result.stdout[-2000:]}\n"
                               f"{result.stderr[-4000:]}")
        return json.loads(out.read_text())


def write_figures(job: dict, figures: dict) -> None:
    """The worker's side of in_process: its figures plus its own peak memory."""
    Path(job["out"]).write_text(json.dumps({**figures, "peak_rss_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """Peak resident memory of this process, or of its largest waited-for child (data workers), in MiB. VmHWM,
    not ru_maxrss: the latter carries the parent's peak across fork and exec (a fresh child of a 600 MiB parent
    reported 631 MiB, its own peak being 11 MiB)."""
    status = Path("/proc/self/status")
    text = status.read_text() if status.exists() else ""
    own = next((int(line.split()[1]) for line in text.splitlines() if line.startswith("VmHWM:")), 0)
    return max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024


def synthetic_shards(tmp: Path, images: int, resolutions: tuple[int, ...] = (64,), jpeg: bool = False) -> dict:
    """The built-in synthetic faces, packed once: {"root": folder, R: npy manifest, "jpeg": original-JPEG manifest}."""
    import contextlib
    import io

    from distvae.data.pack import pack
    from distvae.data.synth import make_synthetic_celeba

    made = {}
    with contextlib.redirect_stdout(io.StringIO()):  # the bench prints its own one line
        made["root"] = str(make_synthetic_celeba(tmp / "celeba", images, progress=False))
        for resolution in resolutions:
            pack(made["root"], tmp / f"npy{resolution}", name="synth", resolution=resolution, shard_size=200,
                 progress=False)
            made[resolution] = str(tmp / f"npy{resolution}" / "manifest.json")
        if jpeg:
            pack(made["root"], tmp / "jpeg", name="synth", shard_size=200, progress=False)
            made["jpeg"] = str(tmp / "jpeg" / "manifest.json")
    return made
