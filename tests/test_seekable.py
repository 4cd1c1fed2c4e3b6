"""Random access to local shards: the index pack writes beside each shard, and when it must not be used."""

import io
import json
import tarfile

import numpy as np
import pytest
from test_stream import RES, add_member, ids_of, image_for, npy_bytes, write_shards

import distvae.data.seekable as seekable
from distvae.data.decode import decode_sample
from distvae.data.seekable import INDEX_SUFFIX, SeekableShards, load_index, scan_index, write_index
from distvae.data.shards import map_file, read_samples, resolve_shards
from distvae.data.stream import ShardStream

SEED = 20261208


def all_samples(files: list[str]) -> dict:
    return {(url, index): sample for url in files for index, sample in read_samples(url)}


def read_everything(files: list[str], reader: SeekableShards) -> tuple[dict, np.ndarray]:
    """Every sample by index, and every sample's pixels gathered in a shuffled order (seeded)."""
    samples = {(url, index): reader.sample(url, index) for url in files for index in range(len(all_samples([url])))}
    rng = np.random.default_rng(SEED)
    out = np.zeros((len(samples), RES, RES, 3), dtype=np.uint8)
    slots = rng.permutation(len(samples))
    taken = 0
    for url in files:
        count = sum(1 for key in samples if key[0] == url)
        indices = rng.permutation(count)
        present = reader.gather_npy(url, indices, (RES, RES, 3), out, slots[taken : taken + count])
        assert present is not None and present.all()
        taken += count
    return samples, out


def forbid_header_scans(monkeypatch) -> None:
    def scan(data):
        raise AssertionError("the shard's headers were read although its index was there")

    monkeypatch.setattr(seekable, "scan_index", scan)


def test_an_index_gives_exactly_what_the_headers_give_without_reading_them(tmp_path, monkeypatch):
    files = write_shards(tmp_path / "s", [7, 13, 1])
    expected, expected_pixels = read_everything(files, SeekableShards())
    assert expected == all_samples(files)
    for url in files:
        assert write_index(url) == url + INDEX_SUFFIX
        data = map_file(url)
        loaded, scanned = load_index(url, data), scan_index(data)
        for field in ("starts", "ends", "npy"):
            np.testing.assert_array_equal(getattr(loaded, field), getattr(scanned, field))
        data.close()
    forbid_header_scans(monkeypatch)
    samples, pixels = read_everything(files, SeekableShards())
    assert samples == expected
    np.testing.assert_array_equal(pixels, expected_pixels)


def test_the_stream_over_indexed_shards_gives_the_same_batches(tmp_path, monkeypatch):
    write_shards(tmp_path / "s", [37, 5, 61, 12, 29])
    shards = resolve_shards(str(tmp_path / "s" / "manifest.json"))

    def batches(start: int) -> list[list[int]]:
        stream = ShardStream(shards, batch_size=4, resolution=RES, seed=SEED, hflip=True)
        stream.seek(1, start)
        taken = iter(stream)
        return [ids_of(next(taken)) for _ in range(6)]

    before = batches(0), batches(29)
    for shard in shards:
        write_index(shard.url)
    forbid_header_scans(monkeypatch)
    assert (batches(0), batches(29)) == before


def shifted(rows: np.ndarray) -> np.ndarray:
    rows = rows.copy()
    rows[:, :3] += 512  # every offset one header off: the size of the file is unchanged
    return rows


@pytest.mark.parametrize("damage", ["shard_truncated", "shard_repacked_longer", "offsets_wrong", "index_truncated",
                                    "not_an_index"])
def test_an_index_that_does_not_fit_its_shard_is_not_used(tmp_path, damage):
    files = write_shards(tmp_path / "s", [9, 9])
    url = files[0]
    write_index(url)
    index_path = url + INDEX_SUFFIX
    raw = np.fromfile(index_path, dtype="<i8")
    if damage == "shard_truncated":  # cut inside sample 6
        data = open(url, "rb").read()
        cut = int(raw[4:].reshape(-1, 4)[6, 0]) + 700
        open(url, "wb").write(data[:cut])
    elif damage == "shard_repacked_longer":  # the same first 9 samples, then 3 more: the old offsets still land
        longer = write_shards(tmp_path / "longer", [12])[0]
        open(url, "wb").write(open(longer, "rb").read())
    elif damage == "offsets_wrong":
        np.concatenate([raw[:4], shifted(raw[4:].reshape(-1, 4)).ravel()]).astype("<i8").tofile(index_path)
    elif damage == "index_truncated":
        raw[:-2].tofile(index_path)
    else:
        open(index_path, "wb").write(b"not an index at all, but long enough to look like one............")
    expected = dict(read_samples(url, 0, None)) if damage != "shard_truncated" else None
    reader = SeekableShards()
    data, index = reader._shard(url)
    scanned = scan_index(data)
    np.testing.assert_array_equal(index.starts, scanned.starts)  # the headers were read instead
    if damage == "shard_truncated":
        whole = len(scanned.starts)  # the scan keeps only the samples it is sure of
        assert 4 <= whole < 9 and "truncated" in index.damage
        assert reader.gather_npy(url, np.arange(9), (RES, RES, 3), np.zeros((9, RES, RES, 3), np.uint8),
                                 np.arange(9)).tolist() == [True] * whole + [False] * (9 - whole)
    else:
        assert {i: reader.sample(url, i) for i in range(len(expected))} == expected
    reader.close()


def test_a_shard_whose_npy_headers_differ_is_never_gathered_with_or_without_its_index(tmp_path):
    """Sample 3 is stored in Fortran order: the same size, another header, its pixels in another order."""
    path = str(tmp_path / "odd.tar")
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample_id in range(8):
            image, buffer = image_for(sample_id), io.BytesIO()
            image[1, 2] = [sample_id, 99, 3]  # not symmetric: Fortran order moves these bytes
            np.lib.format.write_array(buffer, np.asfortranarray(image) if sample_id == 3 else image)
            add_member(tar, f"{sample_id:08d}.npy", buffer.getvalue())
    sizes = {len(sample["npy"]) for _, sample in read_samples(path)}
    assert len(sizes) == 1, sizes  # the size alone cannot tell sample 3 apart

    def gathered():
        out = np.zeros((8, RES, RES, 3), dtype=np.uint8)
        return SeekableShards().gather_npy(path, np.arange(8), (RES, RES, 3), out, np.arange(8))

    assert gathered() is None
    write_index(path)
    assert np.fromfile(path + INDEX_SUFFIX, dtype="<i8")[3] == 0  # the index says: not one header
    assert gathered() is None


@pytest.mark.parametrize("long_metadata", [False, True])
def test_gathers_copy_the_pixels_decoding_gives_at_one_stride_or_not(tmp_path, long_metadata):
    """Pack's samples lie at one stride (their JSON fits a tar block): one strided copy gathers a shard's
    samples. A sample with long metadata breaks the stride: each sample is then copied from its offset."""
    path = str(tmp_path / "shard.tar")
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample_id in range(12):
            add_member(tar, f"{sample_id:08d}.npy", npy_bytes(image_for(sample_id) + np.uint8(sample_id)))
            notes = "x" * (900 if long_metadata and sample_id == 4 else 10)
            add_member(tar, f"{sample_id:08d}.json", json.dumps({"notes": notes}).encode())
    decoded = np.stack([decode_sample(sample, RES) for _, sample in read_samples(path)])
    indices = np.random.default_rng(SEED).permutation(12)[:9]
    out, reader = np.zeros((9, RES, RES, 3), dtype=np.uint8), SeekableShards()
    present = reader.gather_npy(path, indices, (RES, RES, 3), out, np.arange(9))
    assert present.all()
    np.testing.assert_array_equal(out, decoded[indices])
    assert (reader.rows[path] is None) == long_metadata
    wider = np.zeros((9, RES, RES, 6), dtype=np.uint8)  # a view that is not contiguous: reshape would copy it
    assert reader.gather_npy(path, indices, (RES, RES, 3), wider[..., :3], np.arange(9)).all()
    np.testing.assert_array_equal(wider[..., :3], decoded[indices])
    reader.close()
