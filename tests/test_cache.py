"""data.cache=host: the same batches as the stream, bit for bit, from memory; and a clear error when it cannot be."""

import json
import random
import tarfile

import numpy as np
import pytest
import torch
from test_stream import RES, add_member, ids_of, image_for, make_stream, npy_bytes, take, write_shards

import distvae.data.cache as cache_module
from distvae.data.batches import REPLACE_SALT, mix64, mix64_array
from distvae.data.shards import resolve_shards
from distvae.errors import UserError


def same_batches(expected, actual) -> None:
    assert len(expected) == len(actual)
    for index, (a, b) in enumerate(zip(expected, actual)):
        assert torch.equal(a.images, b.images), index
        assert torch.equal(a.positions, b.positions) and a.epoch == b.epoch, index
        assert (a.bad, a.bad_shards, a.readable) == (b.bad, b.bad_shards, b.readable), index
        assert (a.cond is None and b.cond is None) or torch.equal(a.cond, b.cond), index


def test_mix64_array_is_mix64():
    seed = random.randrange(2**32)
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    positions = rng.integers(0, 2**40, 1000)
    coins = mix64_array(7, 3, positions, REPLACE_SALT)
    assert coins.tolist() == [mix64(7, 3, int(p), REPLACE_SALT) for p in positions]
    assert len(set((coins & np.uint64(1)).tolist())) == 2  # the control: the coins are not constant


@pytest.fixture
def uneven(tmp_path):
    write_shards(tmp_path / "uneven", [37, 5, 61, 12, 29])
    return resolve_shards(str(tmp_path / "uneven" / "manifest.json"))


@pytest.mark.parametrize("world_size,rank,accum", [(1, 0, 1), (2, 1, 1), (2, 0, 3)])
def test_cached_batches_are_the_streams_over_epochs_flips_and_attributes(uneven, world_size, rank, accum):
    options = dict(hflip=True, cond_dim=4, world_size=world_size, rank=rank, accum=accum, shuffle_block=32)
    streamed = make_stream(uneven, **options)
    count = 2 * streamed.batches_per_epoch + 3  # across two epoch boundaries
    reference = take(streamed, count)
    cached = make_stream(uneven, cache="host", **options)
    same_batches(reference, take(cached, count))
    assert cached.state_dict() == streamed.state_dict()
    flipped = [a for a, b in zip(reference, take(make_stream(uneven, **{**options, "hflip": False}), count))
               if not torch.equal(a.images, b.images)]
    assert flipped  # the control: flips happen, so a wrong coin would show


@pytest.mark.parametrize("stop_at", [1, 13, 36, 40])  # 36 batches per epoch
def test_a_cached_stream_resumes_exactly_where_the_plain_one_would(uneven, stop_at):
    reference = take(make_stream(uneven, hflip=True), 48)
    interrupted = make_stream(uneven, hflip=True, cache="host")
    take(interrupted, stop_at)
    resumed = make_stream(uneven, hflip=True, cache="host")
    assert resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict()))) == ""
    same_batches(reference[stop_at:], take(resumed, 48 - stop_at))


def test_unreadable_samples_are_replaced_as_the_stream_replaces_them(tmp_path, capfd):
    folder = tmp_path / "bad"
    write_shards(folder, [16, 16])
    path = folder / "toy-train-000000.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:  # samples 5 and 6 broken
        for sample_id in range(16):
            key = f"{sample_id:08d}"
            data = b"not an array" if sample_id in (5, 6) else npy_bytes(image_for(sample_id))
            add_member(tar, f"{key}.npy", data)
            add_member(tar, f"{key}.json", b"{}")
    second = folder / "toy-train-000001.tar"  # and the second shard cut short
    second.write_bytes(second.read_bytes()[: second.stat().st_size // 2 + 100])
    shards = resolve_shards(str(folder / "manifest.json"))
    reference = take(make_stream(shards, hflip=True), 16)
    cached = take(make_stream(shards, hflip=True, cache="host"), 16)
    same_batches(reference, cached)
    assert sum(b.bad for b in cached) > 2  # the control: both kinds of damage were met
    err = capfd.readouterr().err
    assert "skipping sample 00000005 (while filling data.cache)" in err


def test_pipe_shards_with_a_cache_are_a_clear_error(tmp_path):
    files = write_shards(tmp_path / "p", [20])
    from distvae.data.shards import Shard

    with pytest.raises(UserError, match="data.cache=host needs local"):
        make_stream([Shard(f"pipe:cat {files[0]}", 20)], cache="host")


def test_a_cache_larger_than_memory_is_refused_with_the_size_needed(uneven, monkeypatch):
    monkeypatch.setattr(cache_module, "available_bytes", lambda device: 10_000)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(UserError) as error:
        make_stream(uneven, cache="host")
    message = str(error.value)
    print(message)
    assert "data.cache=host needs 0.0 GiB of host memory for 144 images of 4x4x3 (8 processes on this machine" in \
        message and "use data.cache=none" in message
    monkeypatch.setattr(cache_module, "available_bytes", lambda device: 10**9)
    make_stream(uneven, cache="host")  # the control: enough memory, no error


def test_shard_offsets_put_every_sample_in_its_row(uneven):
    stream = make_stream(uneven, cache="host")
    assert ids_of(stream.cache) == list(range(144))  # rows in shard order: sample ids 0..143
    assert stream.cache.good.all()



@pytest.mark.slow
def test_a_run_with_the_host_cache_trains_the_weights_of_a_run_without_it_and_resumes_exactly(npy32_shards,
                                                                                               tmp_path):
    """Batch 64 over 514 images: 8 steps an epoch, so the 24 steps cross two epoch boundaries."""
    from launching import base_args, checkpoint_at, command, final_weights, kill_when, run

    weights = {}
    for cache in ("none", "host", "auto"):  # auto, the default: these local npy shards fit, so host
        run_dir = tmp_path / cache
        result = run(command(base_args(npy32_shards, run_dir, f"data.cache={cache}", "data.batch_size=64")))
        assert result.returncode == 0, result.stderr[-3000:]
        weights[cache] = final_weights(run_dir)
        if cache != "none":
            assert "data.cache=host: 514 images" in result.stdout and "0 data worker(s) per rank" in result.stdout
    assert "data.cache=auto chose host: local pre-resized shards" in result.stdout
    assert weights["host"] == weights["none"] == weights["auto"]
    killed = tmp_path / "killed"
    kill_when(killed, command(base_args(npy32_shards, killed, "data.cache=host", "data.batch_size=64")),
              checkpoint_at(12), 0.05)
    result = run(command(base_args(npy32_shards, killed, "data.cache=host", "data.batch_size=64")))
    assert result.returncode == 0 and "resuming from" in result.stdout, result.stderr[-3000:]
    assert final_weights(killed) == weights["none"]


def test_auto_caches_local_preresized_shards_that_fit_and_nothing_else(uneven, tmp_path, monkeypatch):
    from distvae.data.cache import choose_cache
    from distvae.data.shards import Shard

    monkeypatch.setattr(cache_module, "available_bytes", lambda device: 10**9)
    assert choose_cache(uneven, RES, 3, 0)[0] == "host"
    needed = 144 * (RES * RES * 3 + 4 * 4)  # 144 samples, 4x4x3 pixels and 4 float attributes
    monkeypatch.setattr(cache_module, "available_bytes", lambda device: needed * 4)  # exactly the share allowed
    assert choose_cache(uneven, RES, 3, 4)[0] == "host"
    monkeypatch.setattr(cache_module, "available_bytes", lambda device: needed * 4 - 1)
    mode, why = choose_cache(uneven, RES, 3, 4)
    assert mode == "none" and "more than 25%" in why
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on this machine: two copies
    monkeypatch.setattr(cache_module, "available_bytes", lambda device: needed * 4)
    assert choose_cache(uneven, RES, 3, 4)[0] == "none"
    monkeypatch.setattr(cache_module, "available_bytes", lambda device: 10**9)
    assert choose_cache([Shard(f"pipe:cat {uneven[0].url}", uneven[0].samples)], RES, 3, 0)[0] == "none"
    jpeg = tmp_path / "jpeg.tar"
    with tarfile.open(jpeg, "w", format=tarfile.USTAR_FORMAT) as tar:
        add_member(tar, "00000000.jpg", b"\xff\xd8 not decoded here")
    assert choose_cache([Shard(str(jpeg), 1)], RES, 3, 0) == \
        ("none", "the shards hold images decoded in training, not pre-resized npy")
