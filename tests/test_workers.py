"""data.num_workers=auto: the count from this rank's cores and the shard format; a resume of sequential shards
keeps the count its order depends on."""

import os

import pytest
from test_stream import write_shards

from distvae.config import ConfigError, load_config
from distvae.data.shards import Shard, resolve_shards
from distvae.data.workers import auto_workers, rank_cores
from distvae.train import data_workers

CORES = len(os.sched_getaffinity(0))


def test_cores_are_capped_by_slurm_and_shared_among_local_ranks():
    assert rank_cores({}) == CORES
    assert rank_cores({"SLURM_CPUS_PER_TASK": "1"}) == 1
    assert rank_cores({"LOCAL_WORLD_SIZE": str(CORES)}) == 1
    assert rank_cores({"LOCAL_WORLD_SIZE": str(4 * CORES)}) == 1  # never 0


@pytest.fixture
def npy_shards(tmp_path):
    write_shards(tmp_path / "npy", [10])
    return resolve_shards(str(tmp_path / "npy" / "manifest.json"))


def test_preresized_shards_get_no_worker_below_4_cores_and_one_above(npy_shards, monkeypatch):
    import distvae.data.workers as workers

    for cores, expected in [(1, 0), (2, 0), (3, 0), (4, 1), (64, 1)]:
        monkeypatch.setattr(workers, "rank_cores", lambda environ, c=cores: c)
        count, why = auto_workers(npy_shards, "none")
        assert count == expected and f"{cores} cores for this rank, pre-resized npy" in why
    assert auto_workers(npy_shards, "host") == (0, "data.cache=host")


def test_images_that_need_decoding_get_a_worker_per_spare_core(jpeg_shards, monkeypatch):
    import distvae.data.workers as workers

    shards = resolve_shards(str(jpeg_shards))
    for cores, expected in [(1, 0), (2, 1), (5, 4), (64, 8)]:
        monkeypatch.setattr(workers, "rank_cores", lambda environ, c=cores: c)
        assert auto_workers(shards, "none")[0] == expected


def test_a_resumed_run_on_sequential_shards_keeps_the_checkpoints_count(npy_shards):
    cfg = load_config("tiny", [])
    assert cfg.data.num_workers == "auto"
    saved = {"order": "sequential", "epoch": 0, "batch": 3, "world_size": 1, "batch_size": 4, "workers": 3}
    assert data_workers(cfg, [Shard("pipe:cat x", 10)], True, saved, "none") == (3, "the count the checkpoint read its "
                                                                            "sequential shards with")
    planned = {**saved, "order": "global"}
    assert data_workers(cfg, npy_shards, True, planned, "none")[0] in (0, 1)  # the planned order does not depend on it
    assert data_workers(load_config("tiny", ["data.num_workers=5"]), npy_shards, True, saved, "none") == (5, "")


def test_num_workers_is_auto_or_a_count():
    with pytest.raises(ConfigError, match="data.num_workers='some' must be auto or a number of processes"):
        load_config("tiny", ["data.num_workers=some"])
    with pytest.raises(ConfigError, match="data.cache='disk' is not allowed; choose one of auto, none, host, device"):
        load_config("tiny", ["data.cache=disk"])
