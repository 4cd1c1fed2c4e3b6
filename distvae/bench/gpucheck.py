"""`make gpu-check`: the GPU tests and the step benchmarks on this machine's CUDA device, one short report.

    make gpu-check                              # sets the venv up first (the pinned torch)
    make gpu-check NO_SETUP=1 PY=python3        # a machine whose python3 already has a CUDA torch
    python -m distvae.bench.gpucheck --out gpu-check    # the same; logs and JSON figures go to --out

Three parts, each in its own process with a time limit, about 5 minutes in all on one GPU:
1. `pytest -m gpu tests/test_gpu.py`: bf16, channels_last, compile, pinned copies, the device cache,
   two deterministic runs bit-identical, exact resume after SIGKILL (and SyncBatchNorm with 2 GPUs);
2. `distvae bench sync --device cuda`: what the step's wait for the device costs (64 px batch 64, 128 px
   batch 256);
3. `distvae bench step --device cuda`: bare loop vs distvae's loop vs end to end with data.cache=device,
   bf16 and channels_last at 64 px (`distvae bench step --device cuda` alone runs all eight configurations).
On an H200 the parts took about 140, 35 and 105 s.
Without a CUDA device it says so in one line and checks nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
STEP_CONFIGS = "bf16_64px_cl"  # each way is a fresh process (~12 s on an H200): one configuration fits 5 minutes
SYNC_SHAPES = ((64, 64), (128, 256))  # (resolution, batch)


def device_line() -> str:
    props = torch.cuda.get_device_properties(0)
    return (f"{torch.cuda.device_count()} x {props.name} (compute {props.major}.{props.minor}, "
            f"{props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}, python {sys.version.split()[0]}")


def run_part(name: str, cmd: list[str], out: Path, timeout: float) -> tuple[int | None, str, float]:
    """(exit code or None on timeout, the output, seconds); the output also goes to out/NAME.log."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    started = time.perf_counter()
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
        code, text = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as error:
        code = None
        text = error.stdout or ""
        text = text.decode(errors="replace") if isinstance(text, bytes) else text
        text += f"\n(stopped after {timeout:.0f} s)"
    (out / f"{name}.log").write_text(text)
    return code, text, time.perf_counter() - started


def check(out: Path, parts: set[str], test_timeout: float, bench_timeout: float) -> int:
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"gpu-check: {device_line()}"]
    print(lines[0], flush=True)
    failed = False
    if "tests" in parts:
        code, text, seconds = run_part("tests", [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py",
                                                 "-q", "-rs", "-p", "no:cacheprovider"], out, test_timeout)
        summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
        verdict = summary[-1].strip("= ") if summary else "no summary"
        if code is None:
            verdict += f" (stopped at {test_timeout:.0f} s)"
        failed |= code != 0
        lines.append(f"tests: {verdict} in {seconds:.0f} s ({'PASS' if code == 0 else 'FAIL'}; {out / 'tests.log'})")
        print(lines[-1], flush=True)
    if "sync" in parts:
        for resolution, batch in SYNC_SHAPES:
            json_path = out / f"sync-{resolution}px.json"
            code, text, seconds = run_part(f"sync-{resolution}px", [
                sys.executable, "-m", "distvae.bench.sync", "--device", "cuda", "--resolution", str(resolution),
                "--batch", str(batch), "--json", str(json_path)], out, bench_timeout / 4)
            failed |= code != 0
            lines.append(f"sync: {json.loads(json_path.read_text())['verdict']}" if code == 0 and json_path.exists()
                         else f"sync {resolution} px: FAILED (exit {code}; {out / f'sync-{resolution}px.log'})")
            print(lines[-1], flush=True)
    if "step" in parts:
        json_path = out / "step.json"
        code, text, seconds = run_part("step", [
            sys.executable, "-m", "distvae.bench.step", "--device", "cuda", "--configs", STEP_CONFIGS, "--rounds", "3",
            "--steps", "60", "--e2e-cache", "device", "--json", str(json_path)], out, bench_timeout)
        failed |= code != 0
        if code == 0 and json_path.exists():
            from distvae.bench.step import verdict_lines

            lines += [f"step: {line}" for line in verdict_lines(json.loads(json_path.read_text()))]
            lines.append(f"step: {seconds:.0f} s; the table is in {out / 'step.log'}")
        else:
            lines.append(f"step: FAILED (exit {code}; {out / 'step.log'})")
        print("\n".join(line for line in lines if line.startswith("step:")), flush=True)
    (out / "report.txt").write_text("\n".join(lines) + "\n")
    print(f"gpu-check: {'FAILED' if failed else 'all passed'}; report in {out / 'report.txt'}", flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distvae.bench.gpucheck", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-check", help="folder for the logs, JSON figures and report.txt")
    parser.add_argument("--parts", default="tests,sync,step", help="comma list of tests, sync, step")
    parser.add_argument("--test-timeout", type=float, default=300.0, help="seconds for the gpu tests")
    parser.add_argument("--bench-timeout", type=float, default=300.0, help="seconds for the step bench")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device here (torch {torch.__version__} sees none): nothing was checked", flush=True)
        return 0
    parts = {part.strip() for part in args.parts.split(",") if part.strip()}
    unknown = parts - {"tests", "sync", "step"}
    if unknown:
        print(f"gpu-check: error: --parts {','.join(sorted(unknown))}: choose from tests, sync, step", file=sys.stderr)
        return 2
    return check(Path(args.out), parts, args.test_timeout, args.bench_timeout)


if __name__ == "__main__":
    sys.exit(main())
