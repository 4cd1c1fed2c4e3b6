"""`distvae bench data`: the JSON and the bound-by lines (fast), the speed targets and the CLI (slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from distvae.bench.data import PATHS, bench_data
from distvae.errors import UserError


def test_bench_writes_json_and_says_what_bounds_each_path(tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "bench.json"
    bench_data(resolution=32, seconds=1.5, json_path=str(out), n=300, rounds=3)
    assert torch.get_num_threads() == threads  # the one-core setting does not leak
    report = json.loads(out.read_text())
    for path in PATHS:
        assert isinstance(report[path], float) and report[path] > 0
        assert len(report["per_round"][path]) == 3
    assert report["resolution"] == 32 and report["images"] == 300
    assert report["pass"] is None  # the targets are defined at R=64
    assert report["ratios"]["reference"] == 1.0
    printed = capsys.readouterr().out
    for path in ("original_jpeg", "preresized"):
        assert f"{path}: bound by " in printed
        assert report["bound_by"][path] in printed
        assert sum(report["part_fractions"][path].values()) == pytest.approx(1.0)
    assert "data wait" in printed
    assert "images/s per core" in printed


def test_bench_rejects_a_source_that_is_not_celeba_layout(tmp_path):
    with pytest.raises(UserError, match="CelebA-layout"):
        bench_data(source=str(tmp_path), seconds=1)


@pytest.mark.slow
def test_bench_cli_meets_the_targets_at_64px(tmp_path):
    """The real measurement, through the CLI: 3,000 synthetic faces, R=64, 5 interleaved rounds."""
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "distvae", "bench", "data", "--resolution", "64", "--seconds", "5",
               "--json", str(out)]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    summary = ", ".join(f"{path} {report[path]:,.0f}/s ({report['ratios'][path]:.2f}x)" for path in PATHS)
    assert report["resolution"] == 64 and report["images"] == 3000
    assert report["ratios"]["original_jpeg"] >= 1.5, summary
    assert report["ratios"]["preresized"] >= 8, summary
    assert result.stdout.count("PASS") == 2 and "preresized: bound by" in result.stdout, result.stdout


def test_bench_pack_reports_both_worker_counts_and_their_ratio(tmp_path, capsys):
    """The pack speedup is a benchmark figure, not a test threshold: here only that it is measured and reported."""
    from distvae.bench.pack import bench_pack

    report = bench_pack(n=60, workers=2, resolution=16, rounds=1, json_path=str(tmp_path / "pack.json"))
    assert json.loads((tmp_path / "pack.json").read_text()) == json.loads(json.dumps(report))
    rates = report["images_per_second"]
    assert rates["1"] > 0 and rates["2"] > 0
    assert report["speedup"] == pytest.approx(rates["2"] / rates["1"])
    assert "speedup with 2 workers:" in capsys.readouterr().out
    with pytest.raises(UserError, match="--workers at least 2"):
        bench_pack(workers=1)


def test_bench_data_reports_batch_diversity_and_random_access(tmp_path, capsys):
    from distvae.bench.order import batch_diversity

    out = tmp_path / "bench.json"
    bench_data(resolution=32, seconds=1.0, json_path=str(out), n=300, rounds=2)
    order = json.loads(out.read_text())["order"]
    diversity, access = order["diversity"], order["access"]
    print(diversity, {k: v for k, v in access.items() if k != "per_round"})
    assert diversity["samples"] == 162_770 and diversity["shards"] == 163
    assert diversity["planned"] > 0.95 * diversity["ideal"]  # ideal: 52.5 distinct shards of 163 in 64 draws
    assert diversity["sequential_buffer"] < 10  # control: a 1,000-sample buffer spans the last few shards read
    assert access["random_access"] > 0 and access["sequential"] > 0 and access["ratio"] > 0
    printed = capsys.readouterr().out
    assert "distinct shards per batch with the global plan" in printed and "random access:" in printed
    smaller = batch_diversity(shuffle_block=2000)  # a block of two shards mixes two shards, not 52
    assert smaller["planned"] < 3


def test_peak_memory_is_the_workers_own_not_its_parents():
    """ru_maxrss carries a parent's peak into a fresh child; VmHWM is the child's own."""
    import subprocess
    import sys

    ballast = bytearray(400 * 2**20)  # this process: over 400 MiB resident
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])
    code = "import sys; from distvae.bench.rounds import peak_rss_mib; b = bytearray({} * 2**20); " \
           "b[::4096] = b'x' * len(b[::4096]); print(peak_rss_mib())"
    small, large = (float(subprocess.run([sys.executable, "-c", code.format(size)], capture_output=True, text=True,
                                         check=True).stdout) for size in (0, 300))
    print(f"child peaks: {small:.0f} MiB idle, {large:.0f} MiB with 300 MiB allocated; parent holds 400 MiB")
    assert small < 200 and 300 < large < 500
    del ballast
