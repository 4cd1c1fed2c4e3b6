"""The stream: determinism, equal work per rank, bit-exact resume, damage, and every URL kind."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import distvae.data.batches as batches_module
from distvae.data.batches import buffer_shuffle
from distvae.data.decode import decode_sample
from distvae.data.seekable import SeekableShards
from distvae.data.shards import count_samples, read_samples, resolve_shards
from distvae.data.stream import ShardStream
from distvae.errors import UserError

RES = 4


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def image_for(sample_id: int) -> np.ndarray:
    """A tiny image whose first pixel spells the sample id, so batches can be decoded back to ids."""
    image = np.full((RES, RES, 3), 7, dtype=np.uint8)
    image[0, 0] = [sample_id % 256, sample_id // 256 % 256, sample_id // 65536]
    return image


def ids_of(batch) -> list[int]:
    pixel = batch.images[:, 0, 0, :].long()
    return (pixel[:, 0] + 256 * pixel[:, 1] + 65536 * pixel[:, 2]).tolist()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, sizes: list[int], manifest: bool = True, split: str = "train") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    files, sample_id = [], 0
    for index, size in enumerate(sizes):
        path = folder / f"toy-{split}-{index:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for _ in range(size):
                key = f"{sample_id:08d}"
                add_member(tar, f"{key}.npy", npy_bytes(image_for(sample_id)))
                attrs = [(sample_id >> bit) & 1 for bit in range(4)]
                add_member(tar, f"{key}.json", json.dumps({"src": key, "attrs": attrs}).encode())
                sample_id += 1
        files.append(str(path))
    if manifest:
        shards = [{"file": Path(f).name, "samples": n, "sha256": ""} for f, n in zip(files, sizes)]
        splits = {split: {"samples": sum(sizes), "shards": shards}}
        (folder / "manifest.json").write_text(json.dumps({"splits": splits}))
    return files


def make_stream(shards, **options) -> ShardStream:
    defaults = dict(batch_size=4, resolution=RES, seed=0, shuffle_buffer=16, num_workers=0)
    return ShardStream(shards, **{**defaults, **options})


def take(stream: ShardStream, count: int) -> list:
    iterator = iter(stream)
    return [next(iterator) for _ in range(count)]


@pytest.fixture
def uneven(tmp_path):
    write_shards(tmp_path / "uneven", [37, 5, 61, 12, 29])
    return resolve_shards(str(tmp_path / "uneven" / "manifest.json"))


def test_resolution_of_specs(tmp_path):
    files = write_shards(tmp_path / "s", [3, 4, 5])
    by_manifest = resolve_shards(str(tmp_path / "s" / "manifest.json"))
    by_pattern = resolve_shards(str(tmp_path / "s" / "toy-train-{000000..000002}.tar"))
    by_list = resolve_shards(",".join(files))
    counts = lambda shards: [s.samples for s in shards]  # noqa: E731
    assert counts(by_manifest) == counts(by_pattern) == counts(by_list) == [3, 4, 5]
    (tmp_path / "s" / "manifest.json").unlink()  # no manifest: counted from the tar headers
    assert [s.samples for s in resolve_shards(str(tmp_path / "s" / "toy-train-{000000..000002}.tar"))] == [3, 4, 5]
    assert count_samples(files[2]) == 5
    with pytest.raises(UserError, match="does not exist"):
        resolve_shards(str(tmp_path / "s" / "toy-train-{000000..000009}.tar"))
    with pytest.raises(UserError, match="has no split 'val'"):
        write_shards(tmp_path / "m", [2])
        resolve_shards(str(tmp_path / "m" / "manifest.json"), split="val")


def test_same_seed_same_batches_other_seed_other_order(uneven):
    first = [ids_of(b) for b in take(make_stream(uneven), 30)]
    again = [ids_of(b) for b in take(make_stream(uneven), 30)]
    other = [ids_of(b) for b in take(make_stream(uneven, seed=1), 30)]
    assert first == again
    assert first != other


def test_shuffle_buffer_is_a_permutation():
    order = buffer_shuffle(1000, 50, np.random.default_rng(0))
    assert sorted(order) == list(range(1000)) and order != list(range(1000))


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_equal_batches_disjoint_ranks_and_coverage(uneven, world_size, num_workers):
    total = sum(s.samples for s in uneven)
    for epoch in (0, 1):
        seen, counts = [], []
        for rank in range(world_size):
            stream = make_stream(uneven, rank=rank, world_size=world_size, num_workers=num_workers)
            stream.seek(epoch)
            batches = take(stream, stream.batches_per_epoch)
            ids = [i for b in batches for i in ids_of(b)]
            assert len(ids) == len(set(ids))  # no sample twice within a rank's epoch
            assert all(len(b.images) == 4 for b in batches)
            seen += ids
            counts.append(len(batches))
        assert len(set(counts)) == 1  # every rank yields the same number of batches
        assert len(seen) == len(set(seen))  # ranks are disjoint
        assert len(seen) >= total - world_size * 4


@pytest.mark.parametrize("world_size", [1, 8, 64])
def test_coverage_of_celeba_train_on_packer_default_shards(world_size):
    from distvae.data.shards import Shard

    shards = [Shard(f"celeba-train-{i:06d}.tar", 1000) for i in range(162)] + [Shard("last.tar", 770)]
    stream = make_stream(shards, batch_size=64, world_size=world_size, rank=world_size - 1)
    assert stream.batches_per_epoch * 64 * world_size / 162_770 >= 0.95


def test_fewer_shards_than_ranks_times_workers(tmp_path):
    write_shards(tmp_path / "one", [40])
    shards = resolve_shards(str(tmp_path / "one" / "manifest.json"))
    ids = []
    for rank in range(2):
        stream = make_stream(shards, rank=rank, world_size=2, num_workers=2)
        ids += [i for b in take(stream, stream.batches_per_epoch) for i in ids_of(b)]
    assert sorted(ids) == list(range(40))


def test_too_little_data_is_a_clear_error(tmp_path):
    write_shards(tmp_path / "few", [5])
    with pytest.raises(UserError, match="lower data.batch_size"):
        make_stream(resolve_shards(str(tmp_path / "few" / "manifest.json")), batch_size=4, world_size=2)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop_at", [1, 5, 12, 36, 41])  # 36 batches per epoch: also across the boundary
def test_resume_is_bit_exact(uneven, num_workers, stop_at):
    reference = take(make_stream(uneven, num_workers=num_workers, hflip=True), 48)
    interrupted = make_stream(uneven, num_workers=num_workers, hflip=True)
    take(interrupted, stop_at)
    state = json.loads(json.dumps(interrupted.state_dict()))  # plain data
    resumed = make_stream(uneven, num_workers=num_workers, hflip=True)
    resumed.load_state_dict(state)
    rest = take(resumed, 48 - stop_at)
    for expected, actual in zip(reference[stop_at:], rest):
        assert torch.equal(expected.images, actual.images)


def test_resume_decodes_nothing_it_skips(uneven, monkeypatch):
    decoded = []  # samples decoded one by one, or gathered a batch at a time from fixed-layout npy shards
    monkeypatch.setattr(batches_module, "decode_sample", lambda sample, *a: decoded.append(1) or
                        decode_sample(sample, *a))
    gather = SeekableShards.gather_npy
    monkeypatch.setattr(SeekableShards, "gather_npy", lambda self, url, indices, *a: decoded.extend([1] * len(indices))
                        or gather(self, url, indices, *a))
    stream = make_stream(uneven)
    stream.seek(0, 30)
    take(stream, 6)  # the rest of epoch 0 (36 batches)
    assert len(decoded) == 6 * 4


def test_workers_live_across_epochs(uneven, monkeypatch):
    """One DataLoader for the whole run; with 3 workers and 28 batches an epoch, worker turns cross the boundary."""
    import distvae.data.stream as stream_module

    made = []
    original = stream_module.DataLoader
    monkeypatch.setattr(stream_module, "DataLoader", lambda *a, **k: made.append(1) or original(*a, **k))
    options = dict(batch_size=5, hflip=True)  # 144 // 5 = 28 batches an epoch
    reference = take(make_stream(uneven, **options), 3 * 28 + 2)
    assert not made
    workers = make_stream(uneven, num_workers=3, **options)
    assert [b.images.tolist() for b in take(workers, 3 * 28 + 2)] == [b.images.tolist() for b in reference]
    assert len(made) == 1
    resumed = make_stream(uneven, num_workers=3, **options)  # resumed mid-epoch, then across the boundary
    resumed.seek(0, 20)
    assert [b.images.tolist() for b in take(resumed, 40)] == [b.images.tolist() for b in reference[20:60]]


def test_condition_vectors(uneven):
    batch = take(make_stream(uneven, cond_dim=4), 1)[0]
    images, cond = batch.to("cpu")
    expected = [[(i >> bit) & 1 for bit in range(4)] for i in ids_of(batch)]
    assert cond.tolist() == expected
    assert images.shape == (4, 3, RES, RES) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    channels_last, _ = batch.to("cpu", channels_last=True)
    assert channels_last.is_contiguous(memory_format=torch.channels_last) and torch.equal(channels_last, images)


def test_corrupt_sample_is_replaced_and_reported(tmp_path, capfd):
    folder = tmp_path / "bad"
    write_shards(folder, [16])
    path = folder / "toy-train-000000.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:  # rewrite with sample 5 broken
        for sample_id in range(16):
            key = f"{sample_id:08d}"
            data = b"not an array" if sample_id == 5 else npy_bytes(image_for(sample_id))
            add_member(tar, f"{key}.npy", data)
            add_member(tar, f"{key}.json", b"{}")
    stream = make_stream(resolve_shards(str(folder / "manifest.json")), shuffle_buffer=0)
    batches = take(stream, 4)
    holds_five = [any(index == 5 for _, index in stream.locate(b.epoch, b.positions)) for b in batches]
    assert [b.bad for b in batches] == [int(flag) for flag in holds_five] and sum(holds_five) == 1
    assert 5 not in [i for b in batches for i in ids_of(b)]  # replaced by another sample of its batch
    assert "skipping sample 00000005" in capfd.readouterr().err


def test_truncated_shard_keeps_ranks_in_step(tmp_path, capfd):
    files = write_shards(tmp_path / "cut", [20, 20])
    data = Path(files[0]).read_bytes()
    Path(files[0]).write_bytes(data[: len(data) // 2 + 100])
    shards = resolve_shards(str(tmp_path / "cut" / "manifest.json"))
    counts, bad = [], 0
    for rank in range(2):
        stream = make_stream(shards, rank=rank, world_size=2)
        batches = take(stream, stream.batches_per_epoch)
        counts.append(len(batches))
        bad += sum(b.bad for b in batches)
    readable = []
    with pytest.raises(Exception, match="truncated"):
        for index, _ in read_samples(files[0]):
            readable.append(index)
    assert counts == [5, 5]
    assert 0 < len(readable) < 20 and bad == 20 - len(readable)
    assert "truncated" in capfd.readouterr().err


def test_lean_reader_matches_tarfile(tmp_path):
    files = write_shards(tmp_path / "r", [7])
    with tarfile.open(files[0]) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    got = [(f"{s['__key__']}.{ext}", data) for _, s in read_samples(files[0]) for ext, data in s.items()
           if ext != "__key__"]
    assert sorted(got) == sorted(expected)
    assert [i for i, _ in read_samples(files[0], 2, 5)] == [2, 3, 4]


def test_jpeg_decode_matches_the_reference_transform():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (22, 18, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((178, 218), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    ours = decode_sample({"jpg": buffer.getvalue()}, 64, crop=168)
    import torchvision.transforms.functional as TF

    decoded = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    reference = np.asarray(TF.resize(TF.center_crop(decoded, 168), 64))
    assert ours.shape == reference.shape == (64, 64, 3)
    # libjpeg's DCT-domain 1/2 downscale differs from full decode + filter by a few levels at most
    assert np.abs(ours.astype(int) - reference.astype(int)).mean() < 3.0


def test_conditional_stream_checks_the_attributes_up_front(uneven, tmp_path):
    with pytest.raises(UserError, match="carry 4 attributes: set model.cond_dim=4"):
        make_stream(uneven, cond_dim=40)
    folder = tmp_path / "plain"
    folder.mkdir()
    with tarfile.open(folder / "p-train-000000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample_id in range(8):
            add_member(tar, f"{sample_id:08d}.npy", npy_bytes(image_for(sample_id)))
            add_member(tar, f"{sample_id:08d}.json", b'{"src": "x.png"}')
    with pytest.raises(UserError, match="carry no attributes"):
        make_stream(resolve_shards(str(folder / "p-train-000000.tar")), cond_dim=40)


# ------------------------------------------------------------------------------------------------------
# The global plan, through the stream.


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("num_workers", [0, 1, 3])
def test_every_sample_once_per_epoch_with_real_workers(tmp_path, world_size, num_workers):
    """Measured on what ShardStream yields, DataLoader worker processes included."""
    write_shards(tmp_path / "cover", [37, 5, 61, 12, 29])
    shards = resolve_shards(str(tmp_path / "cover" / "manifest.json"))
    total, global_batch = 144, world_size * 4
    seen, counts = [], []
    for rank in range(world_size):
        stream = make_stream(shards, rank=rank, world_size=world_size, num_workers=num_workers, shuffle_block=32)
        batches = take(stream, stream.batches_per_epoch)
        counts.append(len(batches))
        assert all(b.epoch == 0 for b in batches)
        seen += [i for b in batches for i in ids_of(b)]
    assert len(set(counts)) == 1
    assert len(seen) == len(set(seen)), "a sample came twice in one epoch"
    assert total - len(seen) < global_batch and set(seen) <= set(range(total))


def test_workers_and_topology_never_change_what_a_global_batch_holds(uneven):
    """Step t's 16 samples and their flips: 1 x 16, 2 x 8, 4 x 4 and 2 x 4 with two micro-steps, 0 or 3 workers."""
    layouts = {}
    for world_size, batch_size, accum, workers in [(1, 16, 1, 0), (2, 8, 1, 3), (4, 4, 1, 0), (2, 4, 2, 3)]:
        per_step: dict[int, torch.Tensor] = {}
        for rank in range(world_size):
            stream = make_stream(uneven, rank=rank, world_size=world_size, batch_size=batch_size, accum=accum,
                                 num_workers=workers, hflip=True)
            for index, batch in enumerate(take(stream, 3 * accum)):
                rows = per_step.setdefault(index // accum, torch.zeros(16, RES, RES, 3, dtype=torch.uint8))
                rows[batch.positions - index // accum * 16] = batch.images
        layouts[world_size, batch_size, accum, workers] = per_step
    reference = layouts[1, 16, 1, 0]
    for topology, per_step in layouts.items():
        for step in range(3):
            assert torch.equal(per_step[step], reference[step]), (topology, step)


def test_a_resume_at_another_topology_with_the_same_global_batch_continues_exactly(uneven):
    whole = [ids_of(b) for b in take(make_stream(uneven, batch_size=8), 12)]  # 1 x 8: 18 steps per epoch
    ranks = [make_stream(uneven, batch_size=4, world_size=2, rank=rank) for rank in range(2)]
    state = json.loads(json.dumps(make_stream(uneven, batch_size=8).state_dict()))
    first = make_stream(uneven, batch_size=8)
    take(first, 5)
    state = first.state_dict()
    assert state["sample_in_epoch"] == 40 and state["global_batch"] == 8
    for stream in ranks:
        assert stream.load_state_dict(state) == ""  # exact: no note
    rest = [a + b for a, b in zip(*(map(ids_of, take(stream, 7)) for stream in ranks))]
    assert rest == whole[5:12]
    # Another global batch continues at the same sample and says so.
    other = make_stream(uneven, batch_size=16)
    note = other.load_state_dict(state)
    assert "global batch changed from 8 to 16" in note and "sample 40 of epoch 0" in note
    assert torch.equal(take(other, 1)[0].positions, torch.arange(40, 56))


def test_data_plan_prints_what_the_stream_yields(uneven, tmp_path):
    from distvae.config import load_config
    from distvae.data.show import plan_rows

    manifest = uneven[0].url.rsplit("/", 1)[0] + "/manifest.json"
    cfg = load_config("tiny", [f"data.train_shards={manifest}", "data.batch_size=4", "run.seed=3"])
    header, rows = plan_rows(cfg, epoch=1, step=5, world_size=2, rank=1)
    assert header.startswith("epoch 1, step 5 of 18: global batch 8 = 2 ranks x 4")
    stream = make_stream(uneven, batch_size=4, world_size=2, rank=1, seed=3, shuffle_buffer=0)
    stream.seek(1, 5)
    batch = take(stream, 1)[0]
    assert [row["position"] for row in rows] == batch.positions.tolist()
    assert [int(row["key"]) for row in rows] == ids_of(batch)  # the key spells the sample id


def test_classes_in_source_order_are_mixed_by_the_stream(tmp_path):
    """10 classes of 300 images packed with --order source into shards of 100, shuffle block 2,048 < 3,000."""
    from distvae.data.pack import pack

    src = tmp_path / "classes"
    for label in range(10):
        (src / f"class{label}").mkdir(parents=True)
        for index in range(300):
            Image.new("RGB", (8, 8), (20 * label, 0, 0)).save(src / f"class{label}" / f"{index:03d}.png")
    pack(src, tmp_path / "shards", resolution=8, shard_size=100, val_fraction=0, test_fraction=0, order="source",
         progress=False)
    shards = resolve_shards(str(tmp_path / "shards" / "manifest.json"))

    def classes_per_batch(**options) -> float:
        stream = ShardStream(shards, batch_size=64, resolution=8, seed=SEED, **options)
        found = [len(set((b.images[:, 0, 0, 0].int() // 20).tolist())) for b in take(stream, stream.batches_per_epoch)]
        return sum(found) / len(found)

    mixed = classes_per_batch(shuffle_block=2048)
    control = classes_per_batch(shuffle_block=100)  # a window of one shard cannot mix classes
    print(f"seed {SEED}: classes per batch of 64 with shuffle block 2048: {mixed:.2f}; block 100: {control:.2f}")
    assert mixed >= 8 and control <= 2.5


SEED = 20261203


def test_random_access_equals_sequential_reads_through_cache_evictions(tmp_path):
    """A shuffle block spans more shards than stay mapped: evicted maps and indexes are rebuilt exactly."""
    import random

    from distvae.data.seekable import SeekableShards

    files = write_shards(tmp_path / "many", [50] * 20)
    sequential = {(f, i): s for f in files for i, s in read_samples(f)}
    reader = SeekableShards(keep_maps=3, keep_indexes=5)
    order = list(sequential) * 2
    random.Random(SEED).shuffle(order)
    for url, index in order:
        assert reader.sample(url, index) == sequential[url, index], (url, index)
    assert len(reader.maps) == 3 and len(reader.indexes) == 5
    reader.close()


@pytest.mark.parametrize("reader", ["planned", "piped", "validation"])
def test_a_script_that_stops_mid_epoch_exits_with_its_workers_alive(uneven, tmp_path, reader):
    """Workers ignore SIGTERM; a loader left open at exit must not hang the interpreter: the endless planned
    loader, a sequential (pipe:) epoch's loader, and validation's persistent one."""
    import subprocess
    import sys

    manifest = str(tmp_path / "uneven" / "manifest.json")
    spec = ",".join(f"pipe:cat {shard.url}" for shard in uneven) if reader == "piped" else manifest
    script = tmp_path / "stop.py"
    script.write_text(
        "from distvae.data.shards import resolve_shards\nfrom distvae.data.stream import ShardStream\n"
        f"stream = ShardStream(resolve_shards({spec!r}), batch_size=4, resolution=4, num_workers=2, "
        f"train={reader != 'validation'})\nbatches = iter(stream)\nprint(len([next(batches) for _ in range(3)]))\n")
    try:
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{reader}: the script printed its batches but did not exit within 60 s")
    assert result.returncode == 0 and result.stdout.strip() == "3", result.stderr[-2000:]


def per_sample_only(monkeypatch) -> None:
    """Every batch through the per-sample decode: the path fixed-layout npy shards took before batched gathers."""
    monkeypatch.setattr(SeekableShards, "gather_npy", lambda *args: None)


@pytest.mark.parametrize("stop_at", [0, 7])
def test_gathered_npy_batches_are_the_decoded_ones_flips_damage_and_resume(tmp_path, monkeypatch, stop_at):
    folder = tmp_path / "mixed"
    write_shards(folder, [16, 24, 16])
    second = folder / "toy-train-000001.tar"  # cut short: its last samples are replaced
    second.write_bytes(second.read_bytes()[: second.stat().st_size // 2 + 100])
    shards = resolve_shards(str(folder / "manifest.json"))
    gathers = []
    gather = SeekableShards.gather_npy
    monkeypatch.setattr(SeekableShards, "gather_npy", lambda *args: gathers.append(1) or gather(*args))

    def batches() -> list:
        stream = make_stream(shards, hflip=True, num_workers=0)
        stream.seek(0, stop_at)
        return take(stream, 20 - stop_at)  # 14 batches an epoch: over the boundary

    gathered = batches()
    assert gathers, "the batched gather was never taken"
    per_sample_only(monkeypatch)
    decoded = batches()
    for index, (a, b) in enumerate(zip(decoded, gathered, strict=True)):
        assert torch.equal(a.images, b.images), index
        assert torch.equal(a.positions, b.positions) and a.epoch == b.epoch, index
        assert (a.bad, a.bad_shards, a.readable) == (b.bad, b.bad_shards, b.readable), index
    assert sum(b.bad for b in gathered) > 0  # the control: the damage was met
    flipped = [not torch.equal(b.images[i], torch.from_numpy(image_for(ids_of(b)[i]))) for b in gathered
               for i in range(len(b.images))]
    assert any(flipped) and not all(flipped)  # and so were both sides of the flip coin


def test_a_shard_of_mixed_npy_layouts_is_decoded_sample_by_sample(tmp_path):
    folder = tmp_path / "odd"
    write_shards(folder, [8])
    path = folder / "toy-train-000000.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:  # sample 3 stored as int16 (refused)
        for sample_id in range(8):
            image = image_for(sample_id).astype(np.int16 if sample_id == 3 else np.uint8)
            add_member(tar, f"{sample_id:08d}.npy", npy_bytes(image))
    reader = SeekableShards()
    out = np.zeros((8, RES, RES, 3), dtype=np.uint8)
    assert reader.gather_npy(str(path), np.arange(8), (RES, RES, 3), out, np.arange(8)) is None
    batch = take(make_stream(resolve_shards(str(folder / "manifest.json")), num_workers=0), 2)
    assert sum(b.bad for b in batch) == 1  # the int16 sample is replaced, as decode_sample refuses it
    write_shards(folder, [8])  # the control: a uniform shard is gathered
    reader = SeekableShards()
    present = reader.gather_npy(str(path), np.arange(8), (RES, RES, 3), out, np.arange(8))
    assert present is not None and present.all() and ids_of(type("B", (), {"images": torch.from_numpy(out)})) == \
        list(range(8))
