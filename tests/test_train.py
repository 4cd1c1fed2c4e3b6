"""The trainer end to end: real processes, real launchers, real signals, on CPU.

Each run is the command a user types (python -m distvae.train, accelerate launch, torchrun), sometimes
through tests/helpers/train_probe.py, which adds test-only instruments (hashes of data and weights,
an injected NaN, a SIGKILL in the middle of a checkpoint write) around the same train.main().
"""

import io
import json
import math
import os
import random
import signal
import subprocess
import time

import pytest
import torch
from conftest import REPO
from launching import (
    MAX_STEPS,
    base_args,
    checkpoint_at,
    command,
    environment,
    final_weights,
    kill_when,
    run,
)
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

MATRIX = [(1, 0), (1, 2), (2, 0), (2, 2)]  # (processes, data workers per process)


@pytest.fixture(scope="module")
def reference_runs(npy32_shards, tmp_path_factory):
    """An uninterrupted run per (processes, workers), shared by the resume tests."""
    runs = {}
    for processes, workers in MATRIX:
        run_dir = tmp_path_factory.mktemp(f"reference-{processes}x{workers}")
        launcher = "python" if processes == 1 else "accelerate"
        result = run(command(base_args(npy32_shards, run_dir, f"data.num_workers={workers}"), processes, launcher))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[processes, workers] = run_dir
    return runs




@pytest.mark.parametrize("processes, workers", MATRIX)
def test_sigkill_at_a_random_moment_then_rerun_is_bit_exact(processes, workers, npy32_shards, reference_runs,
                                                             tmp_path):
    launcher = "python" if processes == 1 else "accelerate"
    args = base_args(npy32_shards, tmp_path, f"data.num_workers={workers}")
    seed = os.environ.get("DISTVAE_TEST_SEED") or str(random.SystemRandom().randrange(10**9))
    print(f"random kill seed {seed} (rerun with DISTVAE_TEST_SEED={seed})")
    chance = random.Random(f"{processes}x{workers}-{seed}")
    trigger = chance.choice([6, 12])
    # The moment is a share of what the uninterrupted run took from that checkpoint to its end, so it
    # falls inside the run however fast this machine is (a fixed 0.3 s outlived the whole run once the
    # defaults got faster).
    reference = reference_runs[processes, workers] / "checkpoints"
    kept = sorted(reference.glob("step-*"))  # the retention keeps the last few
    per_step = (((kept[-1] / "COMPLETE").stat().st_mtime - (kept[0] / "COMPLETE").stat().st_mtime)
                / (int(kept[-1].name[5:]) - int(kept[0].name[5:])))
    remaining = (MAX_STEPS - trigger) * per_step
    delay = chance.uniform(0.0, 0.6) * remaining
    print(f"kill {delay:.3f} s after checkpoint {trigger}; the reference run took {remaining:.3f} s from there")
    kill_when(tmp_path, command(args, processes, launcher), checkpoint_at(trigger), delay)
    saved = [p.name for p in (tmp_path / "checkpoints").glob("step-*")]
    assert f"step-{MAX_STEPS:08d}" not in saved, f"finished before the kill ({trigger} + {delay:.3f} s, seed {seed})"
    result = run(command(args, processes, launcher))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout
    assert final_weights(tmp_path) == final_weights(reference_runs[processes, workers]), f"seed {seed}"


@pytest.mark.parametrize("processes, workers", [(1, 2), (2, 0)])
def test_sigkill_inside_a_checkpoint_write_then_rerun_is_bit_exact(processes, workers, npy32_shards,
                                                                   reference_runs, tmp_path):
    launcher = "python" if processes == 1 else "accelerate"
    args = base_args(npy32_shards, tmp_path, f"data.num_workers={workers}")
    killed = run(command(args, processes, launcher, probe=True), PROBE_KILL_IN_SAVE="12")
    assert killed.returncode != 0
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / ".tmp-step-00000012" / "model.safetensors").exists()  # killed mid-write...
    assert not (checkpoints / "step-00000012").exists()  # ...so step 12 never became a checkpoint
    result = run(command(args, processes, launcher))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {checkpoints / 'step-00000006'} at step 6" in result.stdout
    assert final_weights(tmp_path) == final_weights(reference_runs[processes, workers])


# ------------------------------------------------------------------------------------------------------
# Two processes: same weights everywhere, different data on each rank, a NaN skipped by all ranks.


@pytest.fixture(scope="module")
def probed_two_process_run(npy32_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("probed")
    probe_dir = run_dir / "probe"
    probe_dir.mkdir()
    # Two micro-batches per step: the DDP all-reduce is skipped on the first and must still leave equal weights.
    result = run(command(base_args(npy32_shards, run_dir, "train.grad_accum_steps=2"), 2, "torchrun", probe=True),
                 PROBE_DIR=str(probe_dir), PROBE_NAN_AT="1:5")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, probe_dir, result


def test_two_ranks_hold_identical_weights(probed_two_process_run):
    _, probe_dir, _ = probed_two_process_run
    for step in (6, 12, 18, 24):
        rank0 = (probe_dir / f"params-rank0-step{step}.txt").read_text()
        assert rank0 == (probe_dir / f"params-rank1-step{step}.txt").read_text()


def test_two_ranks_read_different_data(probed_two_process_run):
    _, probe_dir, _ = probed_two_process_run
    rank0 = (probe_dir / "data-rank0.txt").read_text().split()
    rank1 = (probe_dir / "data-rank1.txt").read_text().split()
    assert len(rank0) == len(rank1) == 2 * MAX_STEPS
    assert not set(rank0) & set(rank1)


def test_overflow_before_batchnorm_on_one_rank_skips_the_step_and_leaves_weights_and_buffers(
        probed_two_process_run):
    """Rank 1's first BatchNorm sees inf in forward 5 (step 3 of 2 micro-batches): every rank skips the step,
    and the step after it starts from exactly the weights and BatchNorm statistics the skipped one started from."""
    run_dir, probe_dir, result = probed_two_process_run
    assert result.stdout.count("update skipped on all ranks") == 1  # logged once, by rank 0, for rank 1's overflow
    state = json.loads((run_dir / "checkpoints" / f"step-{MAX_STEPS:08d}" / "train_state.json").read_text())
    assert state["bad_steps"] == 1
    for rank in (0, 1):
        at_call = dict(line.split() for line in (probe_dir / f"state-rank{rank}.txt").read_text().splitlines())
        assert at_call["5"] == at_call["7"], f"rank {rank}: the skipped step changed weights or buffers"
        assert at_call["3"] != at_call["5"] != at_call["9"]  # control: applied steps do change them
    for checkpoint in (run_dir / "checkpoints").glob("step-*"):
        tensors = load_file(checkpoint / "model.safetensors")
        assert any("running_var" in name for name in tensors)
        assert all(torch.isfinite(tensor).all() for tensor in tensors.values() if tensor.is_floating_point())


def test_too_many_bad_steps_stop_the_run_with_a_clear_message(npy32_shards, tmp_path):
    args = base_args(npy32_shards, tmp_path, "train.max_bad_steps=3")
    result = run(command(args, probe=True), PROBE_NAN_AT="0:8:100")
    assert result.returncode == 1
    assert "3 consecutive non-finite steps" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "status").read_text().split()[0] == "failed"


def test_non_finite_weights_are_never_saved(npy32_shards, tmp_path):
    result = run(command(base_args(npy32_shards, tmp_path), probe=True), PROBE_POISON_AT="8")
    assert result.returncode == 1
    assert "weights or BatchNorm statistics are not finite at step 12; nothing was saved" in result.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000006"]
    assert (tmp_path / "status").read_text().split() == ["failed", "12"]  # was left at "running"


def test_a_huge_learning_rate_fails_cleanly_and_saves_nothing_non_finite(npy32_shards, tmp_path):
    """The reproduction from the review: lr=1e12 without clipping used to end with exit 0 and NaN BatchNorm buffers."""
    args = base_args(npy32_shards, tmp_path, "train.lr=1e12", "train.grad_clip=0", "train.max_bad_steps=10",
                     "train.warmup_steps=0", "train.max_steps=40", "data.num_workers=0")
    result = run(command(args))
    assert result.returncode == 1, result.stdout[-2000:]
    assert "10 consecutive non-finite steps (train.max_bad_steps)" in result.stderr
    assert (tmp_path / "status").read_text().split()[0] == "failed"
    checkpoints = sorted((tmp_path / "checkpoints").glob("step-*"))
    assert checkpoints
    for checkpoint in checkpoints:
        tensors = load_file(checkpoint / "model.safetensors")
        floats = [tensor for tensor in tensors.values() if tensor.is_floating_point()]
        assert all(torch.isfinite(tensor).all() for tensor in floats), checkpoint


# ------------------------------------------------------------------------------------------------------
# Signals: SIGUSR1 -> checkpoint -> exit 75 -> rerun resumes.


def wait_for_line(process: subprocess.Popen, text: str, lines: list[str]) -> None:
    for line in process.stdout:
        lines.append(line)
        if text in line:
            return
    raise AssertionError(f"never saw {text!r}; output:\n{''.join(lines)}")


def test_sigusr1_saves_and_exits_75_then_rerun_resumes(npy32_shards, reference_runs, tmp_path):
    args = base_args(npy32_shards, tmp_path, "data.num_workers=0")
    process = subprocess.Popen(command(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=environment(), cwd=REPO)
    lines: list[str] = []
    wait_for_line(process, "step 6/", lines)
    process.send_signal(signal.SIGUSR1)
    lines += process.stdout.readlines()
    assert process.wait(timeout=120) == 75
    status, step = (tmp_path / "status").read_text().split()
    assert status == "interrupted" and 6 <= int(step) < MAX_STEPS
    assert (tmp_path / "checkpoints" / f"step-{int(step):08d}" / "COMPLETE").exists()
    assert any("stop signal (SIGUSR1)" in line for line in lines)
    result = run(command(args))
    assert result.returncode == 0
    assert f"at step {step}" in result.stdout
    assert final_weights(tmp_path) == final_weights(reference_runs[1, 0])


def test_sigusr1_to_accelerate_launch_with_two_processes(npy32_shards, reference_runs, tmp_path):
    """The launcher forwards SIGUSR1 (PET_SIGNALS_TO_HANDLE), both ranks save together and exit 75."""
    args = base_args(npy32_shards, tmp_path, "data.num_workers=0")
    signals = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    process = subprocess.Popen(command(args, 2, "accelerate"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=environment(PET_SIGNALS_TO_HANDLE=signals), cwd=REPO)
    lines: list[str] = []
    wait_for_line(process, "step 6/", lines)
    process.send_signal(signal.SIGUSR1)
    lines += process.stdout.readlines()
    process.wait(timeout=120)
    # torch's elastic launcher re-raises the signal after its workers exit, so `accelerate launch` itself
    # exits 1; the workers' own exit code 75 is what the trainer controls, and RUN_DIR/status records it.
    status, step = (tmp_path / "status").read_text().split()
    assert status == "interrupted"
    assert any("exiting with code 75" in line for line in lines)
    assert (tmp_path / "checkpoints" / f"step-{int(step):08d}" / "COMPLETE").exists()
    result = run(command(args, 2, "accelerate"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {step}" in result.stdout
    assert final_weights(tmp_path) == final_weights(reference_runs[2, 0])


def test_sigterm_to_the_whole_process_group_with_data_workers_saves(npy32_shards, tmp_path):
    """scancel and preemption send SIGTERM to every process of the job, data workers included."""
    args = base_args(npy32_shards, tmp_path, "data.num_workers=2", "train.max_steps=100000")
    process = subprocess.Popen(command(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=environment(), cwd=REPO, start_new_session=True)
    lines: list[str] = []
    wait_for_line(process, "step 6/", lines)
    os.killpg(process.pid, signal.SIGTERM)
    lines += process.stdout.readlines()
    assert process.wait(timeout=60) == 75, "".join(lines)[-3000:]
    status, step = (tmp_path / "status").read_text().split()
    assert status == "interrupted"
    assert (tmp_path / "checkpoints" / f"step-{int(step):08d}" / "COMPLETE").exists()
    assert not any("DataLoader worker" in line for line in lines)


def test_single_process_accelerate_launch_killed_by_sigusr1_still_saves(npy32_shards, tmp_path):
    """`accelerate launch` with one process dies of SIGUSR1 without forwarding it; the trainer notices."""
    args = base_args(npy32_shards, tmp_path, "data.num_workers=0", "train.max_steps=100000")
    process = subprocess.Popen(command(args, 1, "accelerate"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=environment(), cwd=REPO)
    lines: list[str] = []
    wait_for_line(process, "step 6/", lines)
    process.send_signal(signal.SIGUSR1)
    assert process.wait(timeout=60) == -signal.SIGUSR1
    deadline = time.time() + 60
    while not (tmp_path / "status").read_text().startswith("interrupted"):
        assert time.time() < deadline, "the orphaned trainer never saved"
        time.sleep(0.1)
    status, step = (tmp_path / "status").read_text().split()
    assert status == "interrupted"
    assert (tmp_path / "checkpoints" / f"step-{int(step):08d}" / "COMPLETE").exists()


# ------------------------------------------------------------------------------------------------------
# Data damage, precision, trackers.


def test_corrupt_sample_in_a_shard_is_skipped_and_reported(jpeg_shards, tmp_path):
    import shutil
    import tarfile

    shards = tmp_path / "shards"
    shutil.copytree(jpeg_shards.parent, shards)
    victim = shards / "synth-train-000000.tar"
    with tarfile.open(victim) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    broken = [m.name for m, _ in members if m.name.endswith(".jpg")][3]  # pack shuffles: whichever is 4th
    with tarfile.open(victim, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if member.name == broken:
                data = data[:200]  # a truncated JPEG
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    # 40 steps of 16 are more than the epoch: every training sample is read once.
    args = base_args(shards / "manifest.json", tmp_path / "run", "train.max_steps=40", "checkpoint.every_steps=40",
                     "data.num_workers=1")
    result = run(command(args))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipping sample {broken.removesuffix('.jpg')}" in result.stderr


def test_bf16_runs_the_convolutions_in_bf16_and_reaches_the_fp32_loss(npy32_shards, tmp_path):
    losses, dtypes = {}, {}
    for precision in ("no", "bf16"):
        run_dir = tmp_path / precision
        (run_dir / "probe").mkdir(parents=True)
        args = base_args(npy32_shards, run_dir, f"train.mixed_precision={precision}", "train.max_steps=150",
                         "checkpoint.every_steps=150", "log.every_steps=150", "train.val_every_steps=150",
                         "train.val_batches=0", "data.num_workers=0")
        result = run(command(args, probe=True), PROBE_DIR=str(run_dir / "probe"))
        assert result.returncode == 0, result.stderr[-3000:]
        line = next(line for line in result.stdout.splitlines() if "validation: loss" in line)
        losses[precision] = float(line.split("loss ")[1].split()[0])
        dtypes[precision] = (run_dir / "probe" / "conv-dtype-rank0.txt").read_text()
    assert dtypes == {"no": "torch.float32", "bf16": "torch.bfloat16"}  # mixed precision was really applied
    assert math.isfinite(losses["bf16"])
    assert abs(losses["bf16"] - losses["no"]) / losses["no"] < 0.05, losses


def test_wandb_offline_run_holds_scalars_and_images_and_resumes_the_same_id(npy32_shards, tmp_path):
    args = base_args(npy32_shards, tmp_path, "log.tracker=wandb", "train.max_steps=12", "log.image_every_steps=6")
    result = run(command(args), HOME=str(tmp_path))  # no ~/.netrc, no WANDB_API_KEY: offline by itself
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wandb: no API key configured, logging offline" in result.stdout
    (first,) = (tmp_path / "wandb").glob("offline-run-*")
    run_id = next(first.glob("run-*.wandb")).stem.removeprefix("run-")
    records = next(first.glob("run-*.wandb")).read_bytes()
    for key in (b"train/loss", b"train/kl", b"train/grad_norm", b"train/images_per_second", b"val/psnr",
                b"val/active_units", b"val/posterior_std", b"val/decoder_min", b"val/decoder_max", b"val/kl_per_dim"):
        assert key in records, key
    assert b"histogram" in records  # val/kl_per_dim as a wandb.Histogram
    images = list((first / "files" / "media" / "images").glob("*.png"))
    for name in ("samples", "reconstructions", "kl_per_dim_sorted"):  # at steps 6 and 12; the KL curve at 12
        assert any(image.name.startswith(f"{name}_") for image in images), (name, images)
    assert (tmp_path / "samples" / "samples-step-00000012.png").exists()
    args = [a if not a.startswith("train.max_steps") else "train.max_steps=18" for a in args]
    result = run(command(args), HOME=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and (runs[-1] / f"run-{run_id}.wandb").exists()


def test_conditional_model_trains_on_celeba_attributes(npy32_shards, tmp_path):
    args = base_args(npy32_shards, tmp_path, "model.cond_dim=40", "train.max_steps=12", "log.image_every_steps=12")
    result = run(command(args))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "samples" / "samples-step-00000012.png").exists()
    weights = load_file(tmp_path / "checkpoints" / "step-00000012" / "model.safetensors")
    assert weights["decoder_input.weight"].shape[1] == 32 + 40  # z and the 40 attributes
    # The attributes reached the model: the weights that read them moved from their initial values. An
    # all-zero condition gives them zero gradients, and Adam leaves a weight with zero gradient where it was.
    from distvae.config import load_config
    from distvae.model import build_model

    torch.manual_seed(0)  # run.seed: the trainer builds its model right after seeding
    initial = build_model(load_config("tiny", ["model.cond_dim=40"]).model).state_dict()
    for name, first_cond_column in (("decoder_input.weight", 32), ("mean_head.weight", 64 * 4 * 4)):
        moved = (weights[name][:, first_cond_column:] - initial[name][:, first_cond_column:]).abs().amax(dim=0)
        assert (moved > 0).sum() >= 30, f"{name}: only {(moved > 0).sum()} of 40 attribute columns were trained"


def test_sync_bn_on_cpu_is_a_clear_error(npy32_shards, tmp_path):
    result = run(command(base_args(npy32_shards, tmp_path, "train.sync_bn=true")))
    assert result.returncode == 2
    assert result.stderr.strip() == ("distvae train: error: train.sync_bn=true needs GPUs (SyncBatchNorm is "
                                     "CUDA-only); leave it false on CPU")


def test_launch_trap_without_a_group_is_refused(npy32_shards, tmp_path):
    """WORLD_SIZE=2 in a process that is alone: refuse before training instead of training a private model."""
    result = run(command(base_args(npy32_shards, tmp_path)), WORLD_SIZE="2", RANK="0")
    assert result.returncode == 2
    assert "WORLD_SIZE=2" in result.stderr and "accelerate launch" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_make_train_end_to_end(tmp_path):
    """What a new user types first: synthetic faces -> shards -> training, with every output where promised."""
    overrides = ("train.max_steps=30 train.warmup_steps=10 checkpoint.every_steps=15 log.image_every_steps=15 "
                 "train.val_every_steps=15")
    result = subprocess.run(
        ["make", "--no-print-directory", "train", f"SYNTH_DIR={tmp_path}/synth", "SYNTH_N=300",
         f"SHARDS_DIR={tmp_path}/shards", f"RUN_DIR={tmp_path}/run", f"TRAIN_ARGS={overrides}"],
        capture_output=True, text=True, timeout=600, env=environment(HOME=str(tmp_path)), cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    run_dir = tmp_path / "run"
    assert (tmp_path / "synth" / "list_eval_partition.txt").exists()
    assert (tmp_path / "shards" / "manifest.json").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000015", "step-00000030"]
    assert (run_dir / "samples" / "samples-step-00000030.png").exists()
    assert (run_dir / "samples" / "reconstructions-step-00000030.png").exists()
    assert list((run_dir / "wandb").glob("offline-run-*/files/media/images/*.png"))
    assert f"finished 30 steps; checkpoints in {run_dir / 'checkpoints'}" in result.stdout
    assert (run_dir / "status").read_text().split() == ["finished", "30"]


def test_progress_bar_on_a_terminal(npy32_shards, tmp_path):
    """On a terminal rank 0 draws a rich bar. (Speed is measured by `distvae bench`; here only a loose sanity bound.)"""
    import pty

    controller, terminal = pty.openpty()
    args = base_args(npy32_shards, tmp_path, "train.max_steps=100", "checkpoint.every_steps=100",
                     "train.val_every_steps=100", "log.every_steps=100", "data.num_workers=1")
    started = time.perf_counter()
    process = subprocess.Popen(command(args), stdout=terminal, stderr=terminal, env=environment(COLUMNS="120"),
                               cwd=REPO)
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closed: the process is gone
            break
        if not chunk:
            break
        output += chunk
    assert process.wait(timeout=240) == 0
    elapsed = time.perf_counter() - started
    text = output.decode(errors="replace")
    assert "━" in text and "img/s" in text and "100/100" in text
    assert elapsed < 200, f"100 tiny steps took {elapsed:.1f} s with start-up (about 15 s on an idle machine)"


# ------------------------------------------------------------------------------------------------------
# The order of end-of-step work, unreadable data, one run per directory, compile.


def test_a_stop_at_a_validation_step_validates_first_and_a_stop_at_the_last_step_finishes(npy32_shards, tmp_path):
    args = base_args(npy32_shards, tmp_path / "mid", "data.num_workers=0")
    result = run(command(args, probe=True), PROBE_STOP_AT="12")  # step 12 is due for validation
    assert result.returncode == 75, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    validated = next(i for i, line in enumerate(lines) if "step 12/24  validation:" in line)
    stopped = next(i for i, line in enumerate(lines) if "stop signal (SIGUSR1)" in line)
    assert validated < stopped
    assert (tmp_path / "mid" / "status").read_text().split() == ["interrupted", "12"]
    result = run(command(base_args(npy32_shards, tmp_path / "end", "data.num_workers=0"), probe=True),
                 PROBE_STOP_AT=str(MAX_STEPS))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 24/24  validation:" in result.stdout
    assert (tmp_path / "end" / "status").read_text().split() == ["finished", "24"]


def test_unreadable_shards_stop_the_run_after_saving_with_exit_1(npy32_shards, tmp_path):
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(npy32_shards.parent, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    dead = [entry["file"] for entry in manifest["splits"]["train"]["shards"][1:4]]
    for name in dead:  # an unreachable bucket looks like this from the stream: every read fails
        (shards / name).write_bytes(b"")
    args = base_args(shards / "manifest.json", tmp_path / "run", "data.bad_window=160", "data.max_bad_fraction=0.2",
                     "train.max_steps=200", "data.num_workers=0", "data.shuffle_buffer=0")
    result = run(command(args))
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("distvae train: error:")]
    assert len(error) == 1 and "could not be read (data.max_bad_fraction=0.2)" in error[0]
    assert any(name in error[0] for name in dead) and "Traceback" not in result.stderr
    status, step = (tmp_path / "run" / "status").read_text().split()
    assert status == "failed" and int(step) < 200
    assert (tmp_path / "run" / "checkpoints" / f"step-{int(step):08d}" / "COMPLETE").exists()
    # Control: the same damage with the ceiling off (1 = never) trains to the end: the ceiling is what stopped it.
    args = [a for a in args if not a.startswith(("data.max_bad_fraction", "train.max_steps", "run.dir"))]
    result = run(command([*args, "data.max_bad_fraction=1", "train.max_steps=24", f"run.dir={tmp_path / 'c'}"]))
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_second_trainer_on_the_same_run_dir_is_refused(npy32_shards, tmp_path):
    args = base_args(npy32_shards, tmp_path, "data.num_workers=0", "train.max_steps=100000")
    first = subprocess.Popen(command(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=environment(), cwd=REPO)
    try:
        wait_for_line(first, "step 6/", [])
        second = run(command(args), timeout=120)
        assert second.returncode == 2
        assert second.stderr.count("\n") == 1 and "in use by another trainer" in second.stderr
        assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGUSR1)
        first.communicate(timeout=120)
    assert first.returncode == 75
    assert not (tmp_path / "lock").exists()  # released on the way out


def test_compile_runs_end_to_end_without_graph_breaks(npy32_shards, tmp_path):
    args = base_args(npy32_shards, tmp_path, "train.compile=true", "train.max_steps=6", "data.num_workers=0",
                     "train.val_every_steps=0", "checkpoint.every_steps=6", "log.every_steps=3")
    result = run(command(args), timeout=600, TORCH_LOGS="graph_breaks")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Graph break" not in result.stderr, result.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "step-00000006" / "COMPLETE").exists()


def test_a_hung_rank_fails_the_run_after_the_collective_timeout(npy32_shards, tmp_path):
    """Rank 1 stops answering in forward 8 for 40 s; with train.collective_timeout_s=5 rank 0 gives up."""
    args = base_args(npy32_shards, tmp_path, "data.num_workers=0", "train.collective_timeout_s=5")
    started = time.perf_counter()
    result = run(command(args, 2, "torchrun", probe=True), timeout=200, PROBE_HANG_AT="1:8:40")
    elapsed = time.perf_counter() - started
    assert result.returncode != 0
    assert "a collective failed at step 8 on rank 0" in result.stderr, result.stderr[-3000:]
    assert "train.collective_timeout_s=5 s" in result.stderr
    assert (tmp_path / "status").read_text().split() == ["failed", "7"]
    assert elapsed < 120, f"{elapsed:.0f} s: the timeout did not cut the wait short"
