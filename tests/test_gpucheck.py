"""`make gpu-check` and `distvae bench sync` on a machine without a GPU: one line, and a sync bench that runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from distvae.bench.sync import VARIANTS, bench_sync


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: make gpu-check runs for real")
def test_gpu_check_says_in_one_line_that_there_is_no_cuda_device(tmp_path):
    result = subprocess.run([sys.executable, "-m", "distvae.bench.gpucheck", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120, cwd=REPO,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [result.stdout.strip()] and "no CUDA device" in result.stdout
    assert "nothing was checked" in result.stdout and not result.stderr.strip()
    assert not (tmp_path / "out").exists()  # nothing was run, nothing was written


def test_the_gpu_tests_are_collected_and_skipped_without_cuda():
    result = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-rs",
                             "-p", "no:cacheprovider"], capture_output=True, text=True, timeout=120, cwd=REPO,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stdout[-3000:]
    skipped = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) >= 9 and all("CUDA" in line or "GPUs" in line for line in skipped), result.stdout[-3000:]
    assert " passed" not in result.stdout.splitlines()[-1]


def test_quick_sync_bench_times_three_variants_and_its_ratios_are_the_figures_divided(tmp_path):
    report = bench_sync(quick=True, json_path=str(tmp_path / "sync.json"))
    assert json.loads((tmp_path / "sync.json").read_text()) == report
    bare = report["bare"]["ms_per_step"]
    for variant in VARIANTS:
        entry = report[variant]
        assert math.isfinite(entry["ms_per_step"]) and entry["ms_per_step"] > 0
        assert len(entry["per_round"]) == report["settings"]["rounds"] == 2
    for variant in VARIANTS[1:]:
        assert report[variant]["x_bare_time"] == pytest.approx(report[variant]["ms_per_step"] / bare)
    assert report["skipped_steps"] == 0  # finite steps: neither decision skips
    assert report["verdict"].startswith("cpu tiny 32 px")
