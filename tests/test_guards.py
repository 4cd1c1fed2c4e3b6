"""What keeps bad numbers and bad data out of a run: guards.py, WindowStats, the stream's refill and
timeout, write_atomic.

Every expected number here is worked out by hand in the test; each test also shows the wrong answer a
plausible mistake would give, so it can fail.
"""

import glob
import math
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import torch
from test_stream import add_member, ids_of, image_for, write_shards

import distvae.data.shards as shards_module
from distvae.checkpoint import write_atomic
from distvae.data.shards import Shard, resolve_shards
from distvae.data.stream import ShardStream
from distvae.guards import BufferSnapshot, DataHealth, StepVerdict, all_finite
from distvae.loss import LossTerms
from distvae.model import ConvVAE
from distvae.tracking import WindowStats

SEED = 1234


def tiny_model() -> ConvVAE:
    torch.manual_seed(SEED)
    return ConvVAE(resolution=16, hiddens=[8, 16], latent_dim=4)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits of a buffer: NaN == NaN and -0.0 != 0.0, unlike torch.equal on floats."""
    return tensor.view(torch.int32) if tensor.dtype == torch.float32 else tensor


# ---------------------------------------------------------------------------------------------------------
# BufferSnapshot and all_finite


def test_buffer_snapshot_restores_batchnorm_statistics_bit_for_bit():
    print(f"seed {SEED}")
    model = tiny_model().train()
    generator = torch.Generator().manual_seed(SEED)
    images = lambda: torch.rand(4, 3, 16, 16, generator=generator)  # noqa: E731
    eps = torch.zeros(4, 4)
    model(images(), eps=eps)  # statistics away from their initial values
    snapshot = BufferSnapshot(model)
    model(images(), eps=eps)  # the statistics move on after the snapshot was built: take() must copy them
    snapshot.take()
    before = [buffer.clone() for buffer in model.buffers()]
    addresses = [buffer.data_ptr() for buffer in model.buffers()]
    assert any(buffer.dtype == torch.int64 for buffer in before)  # num_batches_tracked is among them
    assert [int(b) for b in before if b.dtype == torch.int64] == [2, 2, 2, 2]  # 4 BatchNorms, 2 forwards

    model(images() * math.inf, eps=eps)  # a non-finite step: the forward already updated the statistics
    # Control: without restore() the buffers are non-finite and the counters moved on.
    floats = [buffer for buffer in model.buffers() if buffer.is_floating_point()]
    assert not all(buffer.isfinite().all() for buffer in floats)
    assert [int(b) for b in model.buffers() if b.dtype == torch.int64] == [3, 3, 3, 3]

    snapshot.restore()
    after = list(model.buffers())
    assert [buffer.data_ptr() for buffer in after] == addresses  # in place: DDP and the optimizer keep their views
    assert len(after) == len(before)
    for old, new in zip(before, after):
        assert old.dtype == new.dtype and torch.equal(bits(old), bits(new))


def test_all_finite_sees_a_nan_batchnorm_buffer_when_every_parameter_is_finite():
    model = tiny_model()
    assert all_finite(model.state_dict().values())
    state = model.state_dict()
    state["encoder.1.running_var"][3] = float("nan")  # one element of one buffer; the state_dict shares storage
    assert all(parameter.isfinite().all() for parameter in model.parameters())  # what the old save() looked at
    assert not all_finite(model.state_dict().values())
    assert not all_finite([torch.ones(3), torch.tensor([1.0, math.inf])])
    assert all_finite([torch.tensor([1, 2], dtype=torch.int64)])  # integer counters are skipped, not an error
    assert all_finite([])


# ---------------------------------------------------------------------------------------------------------
# StepVerdict


# (loss not finite, grad not finite, no data, has scaler) -> (apply, non_finite, scaler_overflow, no_data)
VERDICTS = [
    ((0, 0, 0, False), (True, False, False, False)),
    ((0, 0, 0, True), (True, False, False, False)),
    ((1, 0, 0, False), (False, True, False, False)),
    ((1, 0, 0, True), (False, True, False, False)),
    ((1, 1, 0, True), (False, True, False, False)),  # a non-finite loss is a failure even with a scaler
    ((0, 1, 0, False), (False, True, False, False)),  # without a scaler a non-finite gradient is a failure
    ((0, 1, 0, True), (False, False, True, False)),  # with one it is the scaler finding its scale
    ((0, 3, 0, True), (False, False, True, False)),  # flags are sums over ranks
    ((0, 0, 1, False), (False, False, False, True)),
    ((0, 0, 2, True), (False, False, False, True)),
    ((0, 1, 1, True), (False, False, True, True)),
    ((2, 1, 1, False), (False, True, False, True)),
]


@pytest.mark.parametrize(("flags", "expected"), VERDICTS)
def test_step_verdict_table(flags, expected):
    verdict = StepVerdict.decide(*flags)
    assert (verdict.apply, verdict.non_finite, verdict.scaler_overflow, verdict.no_data) == expected


def test_step_verdict_with_a_real_grad_scaler_overflow():
    # torch.amp.GradScaler("cpu") exists in this torch (2.3+): the same class the fp16 GPU run uses.
    torch.manual_seed(SEED)
    print(f"seed {SEED}")
    model = torch.nn.Linear(3, 1)  # fp32
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)
    weights = [parameter.detach().clone() for parameter in model.parameters()]

    loss = model(torch.full((1, 3), 1e3)).sum()
    scaler.scale(loss).backward()  # 2**120 * 1e3 > fp32 max (3.4e38): the scaled gradient overflows
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    loss_not_finite, grad_not_finite = float(not torch.isfinite(loss)), float(not torch.isfinite(grad_norm))
    assert (loss_not_finite, grad_not_finite) == (0.0, 1.0)

    verdict = StepVerdict.decide(loss_not_finite, grad_not_finite, 0.0, has_scaler=True)
    assert (verdict.apply, verdict.non_finite, verdict.scaler_overflow, verdict.no_data) == (False, False, True, False)
    scaler.step(optimizer)  # what train.py does on scaler_overflow: the scaler skips the update itself
    scaler.update()
    for old, new in zip(weights, model.parameters()):
        assert torch.equal(old, new)
    assert scaler.get_scale() == 2.0**119  # backoff_factor 0.5

    without = StepVerdict.decide(loss_not_finite, grad_not_finite, 0.0, has_scaler=False)
    assert (without.apply, without.non_finite, without.scaler_overflow) == (False, True, False)


# ---------------------------------------------------------------------------------------------------------
# DataHealth


def run_health(health: DataHealth, steps) -> list[tuple[int, int, bool]]:
    """(bad in window, samples in window, tripped) after each (bad, samples) step."""
    seen = []
    for bad, samples in steps:
        tripped = health.add(bad, samples)
        seen.append((health.bad, health.samples, tripped))
    return seen


def test_data_health_window_arithmetic():
    # window 100, fraction 0.1: more than 10 unreadable in the fewest last steps that cover >= 100 samples.
    assert run_health(DataHealth(0.1, 100), [(0, 64), (0, 64), (10, 64), (0, 64), (1, 64)]) == [
        (0, 64, False),
        (0, 128, False),
        (10, 128, False),  # step 1 drops out (128 - 64 < 100 keeps two steps); 10 is the limit, not over it
        (10, 128, False),  # the 0-bad step pushes step 2 out, step 3's 10 bad stay in the window
        (1, 128, False),  # step 3 leaves: its 10 bad no longer count
    ]
    # 10 bad, then 3 more while they are still in the window: 13 of the 128 held is over 10%; 11 is not.
    assert run_health(DataHealth(0.1, 100), [(0, 64), (0, 64), (10, 64), (3, 64)])[-1] == (13, 128, True)
    assert run_health(DataHealth(0.1, 100), [(0, 64), (0, 64), (10, 64), (1, 64)])[-1] == (11, 128, False)
    # Over only because the window keeps the last >= 100 samples: 64 alone would not cover 100, so the
    # 7 bad of the older step still count (13 of 128), although the newer step alone holds 6.
    assert run_health(DataHealth(0.1, 100), [(7, 64), (6, 64)]) == [(7, 64, False), (13, 128, True)]
    # With 50-sample steps, two steps cover exactly 100: the third step pushes the first (6 bad) out.
    assert run_health(DataHealth(0.1, 100), [(6, 50), (5, 50), (0, 50)]) == [
        (6, 50, False),
        (11, 100, True),
        (5, 100, False),
    ]
    # A step larger than the window is the window on its own, judged by its share: 10 of 200 is 5%, not over 10%.
    assert run_health(DataHealth(0.1, 100), [(50, 64), (10, 200)]) == [(50, 64, True), (10, 200, False)]
    # Large global steps (64 ranks x 64): 2.5% unreadable does not trip a 5% ceiling, 6% does.
    assert run_health(DataHealth(0.05, 2000), [(101, 4096)]) == [(101, 4096, False)]
    assert run_health(DataHealth(0.05, 2000), [(246, 4096)]) == [(246, 4096, True)]


def test_data_health_fraction_one_never_trips():
    health = DataHealth(1.0, 100)
    assert [tripped for _, _, tripped in run_health(health, [(64, 64)] * 5)] == [False] * 5
    assert (health.bad, health.samples) == (128, 128)
    # Control: just under 1.0, the same all-bad steps trip at once.
    assert run_health(DataHealth(0.99, 100), [(64, 64)]) == [(64, 64, False)]  # 64 <= 99
    assert run_health(DataHealth(0.99, 100), [(64, 64), (64, 64)])[-1] == (128, 128, True)


def test_data_health_message_names_the_most_frequent_shards():
    health = DataHealth(0.05, 200)
    for urls in (["s3/c.tar"], ["s3/a.tar", "s3/c.tar"], ["s3/b.tar", "s3/c.tar"], ["s3/a.tar", "s3/d.tar"],
                 ["s3/c.tar", "s3/b.tar"], ["s3/a.tar"]):
        health.note_shards(urls)
    run_health(health, [(30, 128), (2, 128)])
    message = health.message(0.05, rank=3)
    print(message)
    assert message.startswith("32 of the last 256 samples could not be read (data.max_bad_fraction=0.05); rank 3 ")
    # c: 4 batches, a: 3, b: 2, d: 1 -> the three most frequent, most frequent first, then a count of the rest
    assert "saw it in s3/c.tar, s3/a.tar, s3/b.tar and 1 more." in message
    assert "s3/d.tar" not in message
    assert message.endswith("rerun to resume from the checkpoint just saved")
    assert "shards read by other ranks" in DataHealth(0.05, 200).message(0.05, rank=1)


# ---------------------------------------------------------------------------------------------------------
# WindowStats


class FakeAccelerator:
    num_processes = 1

    def reduce(self, tensor, reduction="sum"):
        return tensor


def terms(total: float, recon: float, kl: float) -> LossTerms:
    return LossTerms(torch.tensor(total), torch.tensor(recon), torch.tensor(kl), kl_weight=1.0)


APPLY = StepVerdict.decide(0, 0, 0, False)
NON_FINITE = StepVerdict.decide(1, 1, 0, False)


def test_window_stats_average_applied_steps_and_count_every_image():
    nan = float("nan")
    window = WindowStats(torch.device("cpu"))
    # (micro-batch terms of the step, grad norm, seconds, verdict); two micro-batches of 8 images per step
    steps = [
        ([(3.0, 2.0, 1.0), (5.0, 4.0, 1.0)], 2.0, 0.5, APPLY),
        ([(nan, nan, nan), (1.0, 0.5, 0.5)], nan, 1.0, NON_FINITE),
        ([(7.0, 6.0, 1.0), (13.0, 12.0, 1.0)], 4.0, 0.5, APPLY),
    ]
    finite, rates = [], []
    for index, (micro, grad_norm, seconds, verdict) in enumerate(steps):
        for values in micro:
            window.add(terms(*values), 8)
        finite.append(bool(window.step_loss_finite()))
        window.step(torch.tensor(grad_norm), seconds, verdict, images=16, bad_samples=float(index))
        rates.append(window.last_images_per_second)
    window.data_seconds = 0.5
    assert finite == [True, False, True]
    assert rates == [32.0, 16.0, 32.0]  # 16 images / that step's seconds
    result = window.reduce(FakeAccelerator())
    # applied steps only: (3 + 5 + 7 + 13) * 8 / 32 images; recon (2 + 4 + 6 + 12) * 8 / 32; kl 1
    assert result["train/loss"] == 7.0
    assert result["train/recon"] == 6.0
    assert result["train/kl"] == 1.0
    assert result["train/grad_norm"] == 3.0  # (2 + 4) / 2 applied steps
    assert result["train/skipped_steps"] == 1.0
    assert result["train/scaler_skips"] == 0.0 and result["train/unreadable_batches"] == 0.0
    assert result["train/images_per_second"] == 48 / 2.0  # every image of all 3 steps, skipped one included
    assert result["train/data_wait_fraction"] == 0.25
    assert result["train/bad_samples"] == 3.0  # 0 + 1 + 2
    # Control: averaging every step, as before, makes the window NaN.
    every = [value * 8 for micro, *_ in steps for value, *_ in micro]
    assert math.isnan(sum(every) / 48)
    # reduce() starts a new window: nothing applied yet reads NaN, not 0 or the old values.
    empty = window.reduce(FakeAccelerator())
    assert math.isnan(empty["train/loss"]) and math.isnan(empty["train/grad_norm"])
    assert empty["train/skipped_steps"] == 0.0 and empty["train/images_per_second"] == 0.0


def test_window_stats_weights_micro_batches_by_images():
    window = WindowStats(torch.device("cpu"))
    window.add(terms(1.0, 1.0, 0.0), 12)
    window.add(terms(5.0, 5.0, 0.0), 4)
    window.step(torch.tensor(1.0), 1.0, APPLY, images=16, bad_samples=0.0)
    result = window.reduce(FakeAccelerator())
    assert result["train/loss"] == (1.0 * 12 + 5.0 * 4) / 16 == 2.0  # an unweighted mean would say 3.0


# ---------------------------------------------------------------------------------------------------------
# The stream: refilling an unreadable batch, and a silent pipe


def write_garbage_shard(path: Path, first_id: int, count: int) -> None:
    """Rewrite a shard so none of its npy payloads decodes (same keys and count as before)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample_id in range(first_id, first_id + count):
            add_member(tar, f"{sample_id:08d}.npy", b"garbage, not an array")
            add_member(tar, f"{sample_id:08d}.json", b"{}")


def plain_stream(shards, **options) -> ShardStream:
    return ShardStream(shards, batch_size=4, resolution=4, seed=0, shuffle_buffer=0, num_workers=0, **options)


def shards_in_epoch_order(folder: Path, sizes_in_order: list[int], garbage: set[int]):
    """Shard files whose epoch-0 order holds `sizes_in_order`; the positions in `garbage` are unreadable.

    Returns (shards, the first sample id of each position in the order, the url of each position)."""
    count = len(sizes_in_order)
    order = plain_stream([Shard(f"x{i}", 8) for i in range(count)]).spec.shard_order(0)  # a function of seed and count
    print(f"epoch 0 shard order for seed 0: {order}")
    sizes = [0] * count
    for position, index in enumerate(order):
        sizes[index] = sizes_in_order[position]
    files = write_shards(folder, sizes)
    first_ids = [sum(sizes[:index]) for index in order]
    for position in garbage:
        write_garbage_shard(Path(files[order[position]]), first_ids[position], sizes_in_order[position])
    # Read through pipe: so the stream takes its sequential path, whose order these tests spell out.
    shards = [Shard(f"pipe:cat {shard.url}", shard.samples) for shard in resolve_shards(str(folder / "manifest.json"))]
    assert plain_stream(shards).spec.shard_order(0) == order and not plain_stream(shards).spec.planned
    return shards, first_ids, [shards[index].url for index in order]


def test_all_unreadable_batch_is_never_refilled_and_resume_there_is_exact(tmp_path):
    # Epoch order: a good shard of 6, then a garbage shard of 10.
    # Batches: good 0-3 | good 4, 5 + 2 bad (filled from 4, 5) | 4 bad | 4 bad
    shards, first_ids, urls = shards_in_epoch_order(tmp_path / "refill", [6, 10], garbage={1})
    g = first_ids[0]
    iterator = iter(plain_stream(shards))
    batches = [next(iterator) for _ in range(4)]
    assert ids_of(batches[0]) == [g, g + 1, g + 2, g + 3]
    assert ids_of(batches[1])[:2] == [g + 4, g + 5] and set(ids_of(batches[1])[2:]) <= {g + 4, g + 5}
    assert [b.bad for b in batches] == [0, 2, 4, 4]
    assert [b.readable for b in batches] == [True, True, False, False]  # the trainer skips those steps
    assert [b.bad_shards for b in batches] == [(), (urls[1],), (urls[1],), (urls[1],)]
    for batch in batches[2:]:  # zeros that no step learns from, not copies of earlier images
        assert int(batch.images.abs().sum()) == 0
    assert torch.equal(batches[1].images[1], torch.from_numpy(image_for(g + 5)))
    # Resuming at the unreadable batch gives what the run that never stopped got there.
    resumed = plain_stream(shards)
    resumed.seek(0, 2)
    again = next(iter(resumed))
    assert torch.equal(again.images, batches[2].images) and again.readable == batches[2].readable


@pytest.mark.parametrize("num_workers", [0, 2])
def test_planned_batches_replace_within_the_batch_and_never_train_on_an_unreadable_one(tmp_path, num_workers):
    """The global plan mixes a good shard of 4 with a garbage shard of 12 over the whole epoch."""
    files = write_shards(tmp_path / "mixed", [4, 12])
    write_garbage_shard(Path(files[1]), 4, 12)
    shards = resolve_shards(str(tmp_path / "mixed" / "manifest.json"))
    stream = ShardStream(shards, batch_size=4, resolution=4, seed=SEED, shuffle_block=0, num_workers=num_workers)
    assert stream.spec.planned
    iterator = iter(stream)
    batches = [next(iterator) for _ in range(4)]  # the whole epoch
    print(f"seed {SEED}: bad per batch {[b.bad for b in batches]}")
    for batch in batches:
        refs = stream.locate(batch.epoch, batch.positions)
        good = [index for shard, index in refs if shard.url == files[0]]
        assert batch.bad == 4 - len(good) and batch.readable == bool(good)
        if good:
            assert set(ids_of(batch)) == set(good)  # replaced rows are good rows of this very batch
        else:
            assert int(batch.images.abs().sum()) == 0
    assert sorted(sum((ids_of(b) for b in batches if b.readable), [])) != [] and sum(b.bad for b in batches) == 12
    for index, expected in enumerate(batches):  # a resume at any batch gives the same batch
        resumed = ShardStream(shards, batch_size=4, resolution=4, seed=SEED, shuffle_block=0)
        resumed.seek(0, index)
        again = next(iter(resumed))
        assert torch.equal(again.images, expected.images) and torch.equal(again.positions, expected.positions)


def test_first_batch_of_a_worker_all_unreadable_is_marked_unreadable(tmp_path):
    shards, first_ids, urls = shards_in_epoch_order(tmp_path / "first", [4, 4], garbage={0})
    iterator = iter(plain_stream(shards))
    first, second = next(iterator), next(iterator)
    assert (first.bad, first.readable, first.bad_shards) == (4, False, (urls[0],))
    assert first.images.shape == (4, 4, 4, 3) and int(first.images.abs().sum()) == 0  # all zero, and skipped
    g = first_ids[1]
    assert (second.bad, second.readable, ids_of(second)) == (0, True, [g, g + 1, g + 2, g + 3])


def process_group_members(group: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) == group:  # state, ppid, pgrp
                members.append(int(entry.name))
    return members


def group_gone(group: int, within: float = 2.0) -> bool:
    """True once no live process is left in the group (SIGKILL reaches a forked child a moment later)."""
    deadline = time.monotonic() + within
    while process_group_members(group):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_silent_pipe_shard_times_out_and_its_command_is_killed(monkeypatch):
    # Control for the process check: a live command in its own group is seen.
    probe = subprocess.Popen("sleep 30", shell=True, start_new_session=True)
    try:
        assert process_group_members(probe.pid)
    finally:
        os.killpg(probe.pid, signal.SIGKILL)
        probe.wait()
    assert group_gone(probe.pid)

    started = []

    class RecordingPopen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(shards_module.subprocess, "Popen", RecordingPopen)
    stream = plain_stream([Shard("pipe:sleep 30", 8)], read_timeout=1.0)
    begin = time.monotonic()
    iterator = iter(stream)
    first = next(iterator)
    elapsed = time.monotonic() - begin
    print(f"first batch after {elapsed:.2f} s")
    assert 0.9 <= elapsed < 5.0  # the 1 s timeout ended the wait: not at once, not after the 30 s of sleep
    assert (first.bad, first.readable, first.bad_shards) == (4, False, ("pipe:sleep 30",))
    assert int(first.images.abs().sum()) == 0
    second = next(iterator)  # the rest of the shard is already known to be unreadable: no second wait
    assert time.monotonic() - begin < 5.0
    assert (second.bad, second.readable) == (4, False)
    assert len(started) == 1
    command = started[0]
    assert command.returncode == -signal.SIGKILL  # killed and reaped, not left to finish
    assert group_gone(command.pid)  # nothing of `sleep 30` is left


# ---------------------------------------------------------------------------------------------------------
# write_atomic


def test_write_atomic_keeps_the_old_text_when_the_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "status"
    write_atomic(target, "running 10\n")
    assert target.read_text() == "running 10\n"
    assert [p.name for p in tmp_path.iterdir()] == ["status"]  # the temporary file was renamed, not left

    def crash(source, destination):
        raise OSError("simulated crash between writing and renaming")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        write_atomic(target, "finished 20\n")
    assert target.read_text() == "running 10\n"
    # What was written went to a hidden file: a shell glob for the target (`status*`, `*`) sees only the old file.
    assert glob.glob(str(tmp_path / "status*")) == glob.glob(str(tmp_path / "*")) == [str(target)]
    assert all(p.name.startswith(".") for p in tmp_path.iterdir() if p != target)
    monkeypatch.undo()

    write_atomic(target, "finished 20\n")
    assert target.read_text() == "finished 20\n"
    assert target.stat().st_size == len("finished 20\n")
