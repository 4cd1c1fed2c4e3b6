"""`distvae bench data --peers`: CPU accounting, verdicts, the peers' transforms and the CLI (fast); the quick
bench end to end and DataLoader workers counted (slow, skipped without `pip install -e '.[bench]'`)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from distvae.bench import peers
from distvae.errors import UserError

BURN = 0.4  # CPU seconds a helper process burns
BUSY = f"import time\nwhile time.process_time() < {BURN}: pass\n"
needs_peers = pytest.mark.skipif(bool(peers.missing_peers()), reason=f"the peers are not installed "
                                 f"({', '.join(peers.missing_peers())}): pip install -e '.[bench]'")


def test_cpu_of_adds_user_and_system_time_of_rusage_and_psutil_records():
    usage = SimpleNamespace(ru_utime=1.5, ru_stime=0.25)
    times = SimpleNamespace(user=2.0, system=0.5)
    assert peers.cpu_of(usage, times) == pytest.approx(4.25)
    assert peers.cpu_of() == 0.0


def test_process_tree_cpu_counts_a_child_that_exited_and_was_waited_for():
    before, thread_before = peers.process_tree_cpu(), time.thread_time()
    subprocess.run([sys.executable, "-c", BUSY], check=True)  # waited for: its time is in RUSAGE_CHILDREN
    own = time.thread_time() - thread_before
    assert peers.process_tree_cpu() - before - own >= BURN * 0.9


def test_process_tree_cpu_counts_a_child_still_running():
    child = subprocess.Popen([sys.executable, "-c", BUSY + "print('burnt', flush=True)\ntime.sleep(60)\n"],
                             stdout=subprocess.PIPE, text=True)
    try:
        before_child = peers.cpu_of(*map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))
        assert child.stdout.readline().strip() == "burnt"
        alive = peers.process_tree_cpu()  # the child has not exited: getrusage cannot see it yet
        assert alive - before_child >= BURN * 0.9
    finally:
        child.kill()
        child.wait()


MEDIANS = {  # images per CPU second, hand-made
    "original_jpeg": {"distvae": 3000.0, "streaming": 1000.0, "litdata": 2000.0,
                      "streaming+distvae_decoder": 1500.0, "litdata+distvae_decoder": 3750.0},
    "preresized": {"distvae": 20000.0, "distvae_cache_host": 36000.0, "streaming": 5000.0, "litdata": 12000.0,
                   "streaming+distvae_decoder": 6000.0, "litdata+distvae_decoder": 18000.0},
}


def test_verdicts_compare_distvae_best_with_the_better_peer_out_of_the_box():
    result = peers.verdicts(MEDIANS)
    jpeg, npy = result["original_jpeg"], result["preresized"]
    assert (jpeg["ours"], jpeg["peer"], jpeg["plugged_peer"]) == ("distvae", "litdata", "litdata+distvae_decoder")
    assert jpeg["ratio"] == pytest.approx(1.5) and jpeg["pass"]  # exactly on the target passes
    assert jpeg["plugged_ratio"] == pytest.approx(0.8)  # informative only: the plugged peer is faster here
    assert (npy["ours"], npy["peer"]) == ("distvae_cache_host", "litdata")
    assert npy["ratio"] == pytest.approx(3.0) and npy["pass"] and npy["target"] == 3.0
    lines = peers.verdict_lines(result)
    assert len(lines) == 2 and all(line.count("PASS") == 1 for line in lines)
    assert "1.50x (target >= 1.5x) PASS" in lines[0] and "3.00x (target >= 3x) PASS" in lines[1]


def test_verdicts_miss_just_below_the_target_and_follow_the_better_peer():
    medians = json.loads(json.dumps(MEDIANS))
    medians["original_jpeg"]["streaming"] = 2001.0  # now the better peer, and distvae is under 1.5x it
    medians["preresized"]["distvae_cache_host"] = 11000.0  # the batched gather is distvae's better figure
    result = peers.verdicts(medians)
    assert result["original_jpeg"]["peer"] == "streaming" and not result["original_jpeg"]["pass"]
    assert result["original_jpeg"]["ratio"] == pytest.approx(3000 / 2001)
    assert result["preresized"]["ours"] == "distvae" and result["preresized"]["ratio"] == pytest.approx(20000 / 12000)
    assert not result["preresized"]["pass"]
    assert all(line.endswith("x") and " MISS; " in line for line in peers.verdict_lines(result))


def test_the_peers_transforms_give_the_images_distvae_and_the_tutorial_give(synth_root):
    from PIL import Image

    from distvae.bench.data import FolderDataset
    from distvae.data.decode import decode_sample

    file = sorted((synth_root / "img_align_celeba").iterdir())[0]
    data = file.read_bytes()
    plugged = peers._sample_transform("original_jpeg", True, 64)({"jpg": data})
    assert plugged.dtype == np.uint8 and np.array_equal(plugged, decode_sample({"jpg": data}, 64, 168))
    reference = FolderDataset([file], 64)[0]  # the tutorial's PIL + CenterCrop + Resize + ToTensor
    as_streaming = peers._sample_transform("original_jpeg", False, 64)({"image": Image.open(file)})
    assert torch.equal(as_streaming, reference)
    from torchvision.io import decode_jpeg

    as_litdata = peers._sample_transform("original_jpeg", False, 64)({"image": decode_jpeg(torch.frombuffer(
        bytearray(data), dtype=torch.uint8))})
    assert as_litdata.shape == (3, 64, 64) and as_litdata.dtype == torch.float32
    assert (as_litdata - reference).abs().mean() < 0.01  # another decoder and resize, the same picture
    distvae = torch.from_numpy(plugged).permute(2, 0, 1).float() / 255
    assert (distvae - reference).abs().mean() < 0.01  # draft decoding: close to the tutorial's pixels, not equal
    array = np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)
    as_tensor = peers._sample_transform("preresized", False, 64)({"image": array})
    assert torch.equal(as_tensor, torch.from_numpy(array).permute(2, 0, 1).float() / 255)


def test_cli_bench_data_peers_runs_the_peer_bench_with_n_resolution_and_json(monkeypatch, tmp_path):
    from distvae import cli

    calls = []
    monkeypatch.setattr(peers, "bench_peers", lambda **kwargs: calls.append(kwargs))
    out = str(tmp_path / "peers.json")
    assert cli.main(["bench", "data", "--peers", "--n", "500", "--resolution", "32", "--json", out]) == 0
    assert calls == [{"n": 500, "resolution": 32, "json_path": out}]
    assert cli.main(["bench", "data", "--peers", "--source", str(tmp_path)]) == 2  # synthetic faces only
    assert len(calls) == 1


def test_bench_peers_names_the_missing_extra(monkeypatch):
    monkeypatch.setattr(peers, "missing_peers", lambda: ["litdata"])
    with pytest.raises(UserError, match=r"needs litdata: pip install -e '\.\[bench\]'"):
        peers.bench_peers(quick=True)


@pytest.mark.slow
@needs_peers
def test_quick_peer_bench_reads_the_same_images_through_every_loader(tmp_path, capsys):
    out = tmp_path / "peers.json"
    report = peers.bench_peers(quick=True, json_path=str(out))
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    n = peers.QUICK["n"]
    assert report["images"] == n and report["rounds"] == peers.QUICK["rounds"] and report["workers"] == 0
    for kind in peers.KINDS:
        entries = report[kind]
        assert list(entries) == list(peers.LOADERS[kind])
        for loader, entry in entries.items():
            assert entry["images_per_epoch"] == n, loader  # one whole epoch, every image once
            assert len(entry["per_round"]) == 2 and min(entry["per_round"]) > 0
            assert entry["images_per_cpu_second"] == pytest.approx(sorted(entry["per_round"])[0] / 2
                                                                   + sorted(entry["per_round"])[1] / 2)
            assert 0 < entry["peak_rss_mib"] < 8192
            assert len(entry["warm_per_round"]) == 2 and entry["images_per_cpu_second_warm"] > 0
        means = [mean for entry in entries.values() for mean in entry["pixel_means_per_epoch"]]  # both epochs
        # the same images: pre-resized pixels are identical; JPEG decoders and resizes differ by about 1/255
        assert max(means) - min(means) < (1e-9 if kind == "preresized" else 2e-3), means
        verdict = report["verdicts"][kind]
        ours = entries[verdict["ours"]]  # as training takes its batches: uint8, the float conversion on the device
        assert ours["images_per_cpu_second_float_on_device"] > ours["images_per_cpu_second"]
        assert verdict["ratio"] == pytest.approx(ours["images_per_cpu_second_float_on_device"]
                                                 / entries[verdict["peer"]]["images_per_cpu_second"])
        assert verdict["pass"] == (verdict["ratio"] >= peers.TARGETS[kind]) == report["pass"][kind]
    # the host cache is read while the stream is built, the batched gather reads as it goes
    assert report["preresized"]["distvae_cache_host"]["setup_cpu_seconds"] > \
        report["preresized"]["distvae"]["setup_cpu_seconds"]
    printed = capsys.readouterr().out
    assert "1st epoch" in printed and "2nd epoch" in printed and "litdata+distvae_decoder" in printed
    assert sum(printed.count(word) for word in (" PASS;", " MISS;")) == 2


@pytest.mark.slow
@needs_peers
def test_data_loader_workers_cpu_time_is_counted(tmp_path):
    """With one DataLoader worker the decoding moves to the worker process: the epoch's CPU time must still hold
    it (the worker's share counted), or the rate would look several times higher than with no worker."""
    from distvae.bench.rounds import in_process

    images = 640
    sources = peers.prepare(Path(tmp_path), 64, images)
    for way in ("original_jpeg/distvae", "original_jpeg/streaming", "original_jpeg/litdata"):
        job = {"sources": sources, "resolution": 64, "way": way}
        alone, with_worker = (in_process("distvae.bench.peers", {**job, "workers": workers}) for workers in (0, 1))
        assert alone["images"] == with_worker["images"] == images, way
        assert alone["children_cpu_seconds"] < 0.05 * alone["cpu_seconds"], (way, alone)
        assert with_worker["children_cpu_seconds"] > 0.3 * with_worker["cpu_seconds"], (way, with_worker)
        assert with_worker["cpu_seconds"] > 0.8 * alone["cpu_seconds"], (way, alone, with_worker)
        assert with_worker["images_per_cpu_second"] == pytest.approx(images / with_worker["cpu_seconds"])
