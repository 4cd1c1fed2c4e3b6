"""`distvae bench all` (`make bench`): every bench in one run, its figures in BENCHMARKS.md and one JSON.

    distvae bench all                                 # data, step, resume, e2e; about 15 minutes on 2 cores
    distvae bench all --peers --json bench.json       # and the peer loaders (pip install -e '.[bench]')

Each bench prints its table and verdict lines as it finishes. The same text, with the machine, the
versions and the exact command of each bench, replaces the part of BENCHMARKS.md between the two
markers below; the sections after them are measurements recorded by hand and stay as they are.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

BEGIN = "<!-- distvae bench all: begin (written by `make bench`; edits here are overwritten) -->"
END = "<!-- distvae bench all: end -->"
STEP_CONFIGS = "fp32_64px_cl,bf16_64px_cl"  # the 15-minute budget's share; `distvae bench step` runs all eight
E2E_IMAGES = 1800  # 1,450 training faces: the two loops' 10 epochs x 5 rounds take about 5.5 minutes of the 15
# Local JPEG shards resume by the random access npy shards use (48x in `distvae bench resume`): make bench
# keeps npy and the front-to-back pipe: kind, and the 15 minutes.
RESUME_KINDS = ("npy", "jpeg_pipe")


class _Tee(io.TextIOBase):
    """Print as usual and keep a copy: the bench's own table and verdicts go into BENCHMARKS.md as printed."""

    def __init__(self, stream):
        self.stream, self.kept = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.kept.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def machine() -> dict:
    import accelerate
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": model, "cores": cores, "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__,
            "accelerate": accelerate.__version__, "platform": platform.platform()}


def bench_all(peers: bool = False, quick: bool = False, json_path: str | None = None,
              markdown: str | None = "BENCHMARKS.md", step_configs: str = STEP_CONFIGS) -> dict:
    from distvae.bench.data import bench_data
    from distvae.bench.e2e import bench_e2e
    from distvae.bench.resume import bench_resume
    from distvae.bench.step import bench_step

    flag = " --quick" if quick else ""
    benches = [
        ("data", "distvae bench data" + (" --seconds 0.5 --n 300" if quick else ""),
         lambda: bench_data(seconds=0.5, n=300, rounds=2) if quick else bench_data()),
        ("step", f"distvae bench step{flag}" + ("" if quick else f" --configs {step_configs}"),
         lambda: bench_step(quick=quick, configs=None if quick else step_configs)),
        ("resume", f"distvae bench resume{flag} --kinds {','.join(RESUME_KINDS)}",
         lambda: bench_resume(quick=quick, kinds=RESUME_KINDS)),
        ("e2e", f"distvae bench e2e{flag or f' --images {E2E_IMAGES}'}",
         lambda: bench_e2e(images=E2E_IMAGES, quick=quick)),
    ]
    if peers:
        from distvae.bench.peers import bench_peers

        benches.append(("peers", f"distvae bench data --peers{flag}",
                        lambda: bench_peers(n=3000, resolution=64, rounds=5, json_path=None, quick=quick)))
    results, texts, started = {"machine": machine()}, {}, time.perf_counter()
    for name, command, run in benches:
        print(f"\n== {command}", flush=True)
        tee, begun = _Tee(sys.stdout), time.perf_counter()
        with contextlib.redirect_stdout(tee):
            results[name] = run()
        texts[name] = (command, tee.kept.getvalue(), time.perf_counter() - begun)
    results["seconds"] = time.perf_counter() - started
    print(f"\nall benches in {results['seconds'] / 60:.1f} minutes", flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2, default=str) + "\n")
    if markdown:
        write_markdown(Path(markdown), results["machine"], texts, results["seconds"])
    return results


def _kept_lines(text: str) -> str:
    """The bench's tables and verdicts, without its progress lines."""
    return "\n".join(line for line in text.splitlines() if line.strip() and " round " not in line
                     and not line.startswith("round ") and "done at" not in line)


def write_markdown(path: Path, machine_: dict, texts: dict, seconds: float) -> None:
    today = datetime.date.today().isoformat()
    lines = [BEGIN, "", f"## `make bench` ({today}, {seconds / 60:.1f} minutes)", "",
             f"Machine: {machine_['cores']} cores ({machine_['cpu'] or 'unknown CPU'}), GPU: {machine_['gpu']}; "
             f"Python {machine_['python']}, torch {machine_['torch']}, accelerate {machine_['accelerate']}. "
             "Every figure below was measured on CPU in this one run, side by side, by the command above it.", ""]
    for name, (command, text, took) in texts.items():
        lines += [f"### {name}: `{command}` ({took:.0f} s)", "", "```", _kept_lines(text), "```", ""]
    lines.append(END)
    section = "\n".join(lines)
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + section + rest.split(END, 1)[1]
    else:  # first time: after the title and its opening paragraph
        title, _, body = old.partition("\n## ")
        new = title.rstrip() + "\n\n" + section + ("\n\n## " + body if body else "\n")
    path.write_text(new)
