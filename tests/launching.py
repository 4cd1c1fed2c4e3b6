"""Running the trainer as users do, for the end-to-end tests: commands, launchers, and killing it.

Each run is the command a user types (python distvae/train.py, accelerate launch, torchrun), sometimes
through tests/helpers/train_probe.py, which adds test-only instruments around the same train.main().
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO

PROBE = str(REPO / "tests" / "helpers" / "train_probe.py")
MAX_STEPS = 24


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_args(manifest: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "--config", "tiny", f"data.train_shards={manifest}", f"data.val_shards={manifest}", f"run.dir={run_dir}",
        "log.tracker=none", f"train.max_steps={MAX_STEPS}", "checkpoint.every_steps=6", "data.batch_size=16",
        "log.every_steps=6", "train.val_every_steps=12", "train.val_batches=2", "log.image_every_steps=0",
        "data.shuffle_buffer=64", "train.warmup_steps=5",
        # The stream and its data workers, which these tests vary; data.cache=auto would hold these small npy
        # shards in memory and use no workers. test_cache.py runs the cache, and the default, end to end.
        "data.cache=none", *extra,
    ]


def command(args: list[str], processes: int = 1, launcher: str = "python", probe: bool = False) -> list[str]:
    script = PROBE if probe else str(REPO / "distvae" / "train.py")
    venv_bin = Path(sys.executable).parent
    if launcher == "python":
        assert processes == 1
        return [sys.executable, script, *args]
    if launcher == "accelerate":
        spread = ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1"]
        return [str(venv_bin / "accelerate"), "launch", *spread, "--main_process_port", str(free_port()),
                "--mixed_precision", "no", "--dynamo_backend", "no", "--num_machines", "1", script, *args]
    if launcher == "torchrun":
        return [str(venv_bin / "torchrun"), "--nproc_per_node", str(processes), "--master_port", str(free_port()),
                script, *args]
    raise ValueError(launcher)


def environment(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "PROBE_"))}
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra})
    return env


def run(cmd: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run to the end; a run still going after `timeout` s fails the test with every process's Python stacks."""
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=environment(PYTHONFAULTHANDLER="1", **env), cwd=REPO, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for target in [*descendants(process.pid)[::-1], process.pid]:  # trainers sit in sessions of their own
            try:
                os.kill(target, signal.SIGABRT)  # faulthandler prints each process's threads, then it dies
            except ProcessLookupError:
                pass
        try:
            stdout, stderr = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
        raise AssertionError(f"still running after {timeout} s: {' '.join(cmd)}\n--- stdout\n{stdout[-3000:]}\n"
                             f"--- stderr (stacks)\n{stderr[-12000:]}") from None
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def final_weights(run_dir: Path, step: int = MAX_STEPS) -> bytes:
    return (run_dir / "checkpoints" / f"step-{step:08d}" / "model.safetensors").read_bytes()


def kill_when(run_dir: Path, cmd: list[str], ready, delay: float, **env: str) -> None:
    """Start cmd, wait until ready(run_dir) is true, wait `delay` more seconds, SIGKILL the whole process group."""
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment(**env),
                               cwd=REPO, start_new_session=True)
    deadline = time.time() + 240
    try:
        while not ready(run_dir):
            assert process.poll() is None, "the run ended before the moment it was meant to be killed"
            assert time.time() < deadline
            time.sleep(0.02)
        time.sleep(delay)
    finally:
        kill_tree(process.pid)
        process.wait()


def descendants(pid: int) -> list[int]:
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        found += [int(child) for child in children]
        queue += [int(child) for child in children]
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it at one moment, as a node failure would.

    torch's elastic agent starts each trainer in a session of its own, so killing the launcher's process
    group alone leaves the trainers running (they then save on their own, which is not a crash). Every
    process is stopped first, so none can react to another's death, then all are killed.
    """
    tree = [pid, *descendants(pid)]
    for target in tree:
        try:
            os.kill(target, signal.SIGSTOP)
        except ProcessLookupError:
            pass
    for target in {*tree, *descendants(pid)}:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------------------------------------------
# Bit-exact resume: killed at a random moment (or inside a checkpoint write), rerun, same final weights.


def checkpoint_at(step: int):
    return lambda run_dir: (run_dir / "checkpoints" / f"step-{step:08d}" / "COMPLETE").exists()
