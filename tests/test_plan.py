"""The global plan: a bijection per block, every sample once per epoch, the same global batch for every
topology, a shuffle that mixes shards written in source order, and memory that does not grow with N."""

import tracemalloc

import numpy as np
import pytest

from distvae.bench.plan import bench_plan
from distvae.data.plan import GlobalPlan, check_global_batch, permute

SEED = 20261203


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 17, 255, 256, 257, 1000, 4097, 2**18])
def test_permute_is_a_bijection_of_its_range(size):
    image = permute(np.arange(size), size, key=SEED)
    assert image.min() >= 0 and image.max() < size
    assert np.array_equal(np.sort(image), np.arange(size))
    if size >= 256:  # a real shuffle: few fixed points, and another key gives another order
        assert (image == np.arange(size)).mean() < 0.05
        assert not np.array_equal(image, permute(np.arange(size), size, key=SEED + 1))


def test_permute_of_a_subset_agrees_with_the_whole():
    whole = permute(np.arange(10_000), 10_000, key=7)
    picks = np.random.default_rng(SEED).choice(10_000, 500, replace=False)
    print(f"seed {SEED}")
    assert np.array_equal(permute(picks, 10_000, key=7), whole[picks])  # O(1) per position, no state


def ids(plan: GlobalPlan, shard: np.ndarray, index: np.ndarray) -> np.ndarray:
    starts = np.concatenate([[0], np.cumsum(plan.counts)])
    return starts[shard] + index  # a sample's position in the listed shards: unique


@pytest.mark.parametrize("block", [0, 64, 1000])
def test_an_epoch_holds_every_sample_once(block):
    counts = [37, 5, 61, 12, 29, 100, 1]
    plan = GlobalPlan(counts, seed=SEED, shuffle_block=block)
    for epoch in (0, 1):
        order = ids(plan, *plan.samples(epoch, np.arange(plan.total)))
        assert np.array_equal(np.sort(order), np.arange(plan.total))
    assert not np.array_equal(ids(plan, *plan.samples(0, np.arange(plan.total))),
                              ids(plan, *plan.samples(1, np.arange(plan.total))))
    # Every global batch of an epoch: no sample twice, at most global_batch - 1 samples left for later.
    global_batch = 32
    used = np.concatenate([ids(plan, *plan.samples(0, np.arange(step * 32, step * 32 + 32)))
                           for step in range(plan.batches_per_epoch(global_batch))])
    assert len(np.unique(used)) == len(used) and plan.total - len(used) < global_batch


TOPOLOGIES = [(1, 32, 1), (2, 16, 1), (4, 8, 1), (1, 16, 2), (2, 8, 2), (8, 1, 4)]  # (ranks, batch, accum)


def test_a_global_batch_is_the_same_samples_in_the_same_places_for_every_topology():
    plan = GlobalPlan([100] * 10 + [57], seed=SEED, shuffle_block=256)
    global_batch = 32
    for step in (0, 5, plan.batches_per_epoch(global_batch) - 1):
        seen = {}
        for world, batch, accum in TOPOLOGIES:
            assert check_global_batch(global_batch, world, batch) == accum
            layout = np.empty(global_batch, dtype=np.int64)
            for micro in range(accum):
                for rank in range(world):
                    positions = plan.rank_positions(step, global_batch, world, rank, micro, batch)
                    layout[positions - step * global_batch] = ids(
                        plan, *plan.rank_samples(0, step, global_batch, world, rank, micro, batch))
            seen[world, batch, accum] = layout
        reference = seen[TOPOLOGIES[0]]
        assert len(np.unique(reference)) == global_batch
        for topology, layout in seen.items():
            assert np.array_equal(layout, reference), topology


def test_the_plan_is_a_function_of_seed_epoch_and_counts_only():
    counts = [50] * 20
    first = ids(GlobalPlan(counts, seed=3), *GlobalPlan(counts, seed=3).samples(2, np.arange(1000)))
    again = GlobalPlan(counts, seed=3)
    assert np.array_equal(first, ids(again, *again.samples(2, np.arange(1000))))
    other = GlobalPlan(counts, seed=4)
    assert not np.array_equal(first, ids(other, *other.samples(2, np.arange(1000))))


def test_classes_written_in_source_order_are_mixed_into_every_batch():
    """10 classes of 1,000 images, packed in class order into shards of 100, a shuffle block of 2,048."""
    classes, per_class, shard_size = 10, 1000, 100
    counts = [shard_size] * (classes * per_class // shard_size)

    def classes_per_batch(block: int) -> float:
        plan = GlobalPlan(counts, seed=SEED, shuffle_block=block)
        found = []
        for step in range(plan.batches_per_epoch(64)):
            shard, _ = plan.samples(0, np.arange(step * 64, step * 64 + 64))
            found.append(len(np.unique(shard * shard_size // per_class)))  # a shard holds one class
        return float(np.mean(found))

    mixed, control = classes_per_batch(2048), classes_per_batch(shard_size)
    print(f"classes per batch of 64: block 2048 -> {mixed:.2f}, block = one shard -> {control:.2f}")
    assert mixed >= 8.0
    assert control <= 2.0  # a block no larger than a shard cannot mix classes: the window is what matters


def test_memory_holds_the_shard_order_not_the_epoch():
    peaks = {}
    for samples in (10**6, 10**7):
        counts = [samples // 10**4] * 10**4
        tracemalloc.start()
        plan = GlobalPlan(counts, seed=SEED)
        plan.rank_samples(0, 3, 64 * 64, 64, 63, 0, 64)
        peaks[samples] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    print(f"peak MiB by epoch size: {peaks}")
    assert max(peaks.values()) < 8  # an epoch's permutation of 10^7 int64 alone would be 76 MiB
    assert peaks[10**7] < 2 * peaks[10**6]


def test_a_global_batch_that_the_topology_does_not_divide_is_refused():
    with pytest.raises(ValueError, match="a global batch of 48 is not a multiple of world_size x data.batch_size = "
                                         "2 x 16"):
        check_global_batch(48, 2, 16)
    plan = GlobalPlan([10] * 4, seed=0)
    with pytest.raises(IndexError, match="past its end"):
        plan.rank_samples(0, 2, 16, 1, 0, 0, 16)


def test_bench_plan_small(capsys):
    report = bench_plan(samples=200_000, shards=200, world_size=16, batch_size=32)
    assert report["rank_samples_distinct"] == report["rank_samples_in_epoch"] == report["steps_per_epoch"] * 32
    assert report["distinct_shards_per_batch"] > 0.8 * report["ideal_distinct_shards_per_batch"]
    assert "all distinct: True" in capsys.readouterr().out
