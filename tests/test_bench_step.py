"""`distvae bench step`: the in-memory stream and the configuration names (fast), the --quick run end to end (slow)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from distvae.bench.step import FULL, WAYS, MemoryStream, bench_step, memory_batches
from distvae.config import load_config
from distvae.data.shards import resolve_shards
from distvae.data.stream import ShardStream
from distvae.errors import UserError


def test_configurations_cross_precision_resolution_and_layout():
    names = [setup.name for setup in FULL]
    assert len(set(names)) == 8 and {"fp32_64px_cl", "bf16_128px_nchw"} <= set(names)
    with pytest.raises(UserError, match="fp32_64px_cl"):
        bench_step(configs="fp16_64px_cl")


def test_memory_stream_serves_the_same_batches_and_is_the_real_stream_otherwise(npy32_shards):
    cfg = load_config("tiny", [f"data.train_shards={npy32_shards}", "data.batch_size=16"])
    batches = memory_batches(cfg)
    assert len(batches) == 8
    assert all(batch.images.shape == (16, 32, 32, 3) and batch.positions is not None for batch in batches)
    real = ShardStream(resolve_shards(str(npy32_shards)), batch_size=16, resolution=32)
    stream = MemoryStream(real, batches)
    assert stream.spec is real.spec and stream.batches_per_epoch == real.batches_per_epoch
    assert stream.state_dict() == real.state_dict()
    served = iter(stream)
    assert [next(served) for _ in range(9)] == [*batches, batches[0]]  # cycles, never reads the shards


@pytest.mark.slow
def test_quick_bench_runs_every_way_and_its_ratios_are_the_figures_divided(tmp_path):
    out = tmp_path / "step.json"
    result = subprocess.run([sys.executable, "-m", "distvae.bench.step", "--quick", "--json", str(out)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert {*WAYS, "ddp", "machine"} <= set(report)
    names = set(report["bare_loop"])
    assert names and all(set(report[way]) == names for way in WAYS)
    for name in names:
        bare = report["bare_loop"][name]["images_per_second"]
        for way in WAYS:
            entry = report[way][name]
            assert math.isfinite(entry["images_per_second"]) and entry["images_per_second"] > 0
            assert len(entry["per_round"]) == report["settings"]["rounds"] == 2
            assert entry["ratio"] == pytest.approx(entry["images_per_second"] / bare)
            assert entry["peak_rss_mib"] > 0
        e2e, loop = report["distvae_e2e"][name], report["distvae_loop"][name]
        assert e2e["vs_distvae_loop"] == pytest.approx(e2e["images_per_second"] / loop["images_per_second"])
        assert f"{name}: distvae_loop {loop['ratio']:.2f}x bare_loop" in result.stdout
        assert e2e["bound"] in result.stdout
        # data.cache=auto read the small pre-resized split into host memory: the e2e target is then 0.95x
        assert e2e["data_cache"] == "host" and e2e["target"] == 0.95 and e2e["pass"] == (e2e["ratio"] >= 0.95)
        assert f"{name}: distvae_e2e (data.cache=host) {e2e['ratio']:.2f}x bare_loop" in result.stdout
    ddp = report["ddp"]
    rates = [ddp[mode]["images_per_second"] for mode in ("allreduce", "no_allreduce")]
    assert all(math.isfinite(rate) and rate > 0 for rate in rates)
    assert ddp["ratio"] == pytest.approx(rates[0] / rates[1])
    assert report["machine"]["device"] == "cpu" and report["machine"]["torch"]
    assert report["settings"]["threads"] == 1
