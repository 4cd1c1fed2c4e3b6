"""The SLURM batch scripts on a real SLURM: preemption warning -> checkpoint -> requeue -> resume -> done.

A one-node cluster (Debian's slurmctld, slurmd, slurm-client and munge, installed with apt-get when
missing; needs root) runs on 127.0.0.1 with its state in a temporary folder: tests/slurm/start_cluster.sh
and stop_cluster.sh. The node has no GPUs and no GRES, so jobs are submitted as on any CPU-only
cluster: `sbatch --gpus-per-node=0`, with PROCS_PER_NODE choosing the number of CPU processes.

SIGUSR1 goes to the batch shell only (`scancel --signal=USR1 --batch`), as SLURM's own time-limit
warning does (`#SBATCH --signal=B:USR1@180`).
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

HARNESS = REPO / "tests" / "slurm"
SCRIPTS = REPO / "launch" / "slurm"
MAX_STEPS = 400  # 15-20 s of tiny training on 2 shared cores; the signal comes at step 20
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError as error:
        return f"({error})"


class Cluster:
    def __init__(self, state: Path):
        self.state = state
        self.conf = state / "etc" / "slurm.conf"

    def env(self, **extra: str) -> dict:
        """The submitter's environment; sbatch passes it on to the job (--export=ALL)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "WANDB_"))}
        env.update({"SLURM_CONF": str(self.conf), "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1",
                    "OMP_NUM_THREADS": "1", **extra})
        return env

    def run(self, *cmd: str, **extra: str) -> str:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=self.env(**extra), cwd=REPO)
        assert result.returncode == 0, f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr}"
        return result.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); the record lasts MinJobAge."""
        line = self.run("scontrol", "show", "job", "--oneliner", job_id)
        return dict(field.split("=", 1) for field in line.split() if "=" in field)

    def diagnostics(self, job_id: str | None = None) -> str:
        parts = []
        if job_id:
            shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                                   env=self.env(), timeout=30)
            parts.append(f"scontrol show job {job_id}:\n{shown.stdout}{shown.stderr}")
        for name in ("slurmctld.log", "slurmd.log"):
            parts.append(f"{name} (last lines):\n{tail(self.state / 'logs' / name, 15)}")
        return "\n".join(parts)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Not under pytest's tmp folder: munged wants every folder above its socket to be o+x, pytest's are 0700.
    state = Path(tempfile.mkdtemp(prefix="distvae-slurm-"))
    kept_logs = tmp_path_factory.mktemp("slurm-logs")

    def stop() -> None:
        subprocess.run([str(HARNESS / "stop_cluster.sh"), str(state)], capture_output=True, timeout=120)
        if (state / "logs").is_dir():
            shutil.copytree(state / "logs", kept_logs, dirs_exist_ok=True)  # pytest keeps its last few tmp folders
        shutil.rmtree(state, ignore_errors=True)

    ports = {free_port()}
    while len(ports) < 2:
        ports.add(free_port())
    # Free ports, so that another cluster on this machine (a concurrent test run) does not get in the way.
    env = {**os.environ, **dict(zip(("LOCAL_SLURM_CTLD_PORT", "LOCAL_SLURM_SLURMD_PORT"), map(str, ports))),
           "LOCAL_SLURM_REQUEUE_DELAY": "5"}
    try:
        started = subprocess.run([str(HARNESS / "start_cluster.sh"), str(state)], capture_output=True, text=True,
                                 timeout=600, env=env)
    except subprocess.TimeoutExpired as error:
        started = subprocess.CompletedProcess(error.cmd, -1, "", f"timed out after {error.timeout} s\n")
    if started.returncode != 0:
        stop()
        pytest.fail(f"could not start a local SLURM cluster (tests/slurm/start_cluster.sh, root and apt-get "
                    f"needed; daemon logs kept in {kept_logs}):\n{started.stderr[-4000:]}", pytrace=False)
    yield Cluster(state)
    stop()


def wait_for(what: str, condition, timeout: float, explain) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{explain()}", pytrace=False)
        time.sleep(0.3)


@pytest.mark.parametrize("script, processes", [
    ("train_single_node.sbatch", 1),  # the trainer alone, signalled by the script
    ("train_single_node.sbatch", 2),  # accelerate launch --multi_gpu, which passes SIGUSR1 to both workers
    ("train_multinode.sbatch", 2),  # srun -> accelerate launch per node (here one node) -> workers
])
def test_usr1_checkpoints_requeues_and_the_rerun_finishes(script, processes, cluster, npy32_shards, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    overrides = [f"data.train_shards={npy32_shards}", f"data.val_shards={npy32_shards}", f"run.dir={run_dir}",
                 "log.tracker=none", f"train.max_steps={MAX_STEPS}", "checkpoint.every_steps=50",
                 "log.every_steps=10", "log.image_every_steps=0", "train.val_every_steps=0", "data.num_workers=1"]
    job_id = cluster.run(
        "sbatch", "--parsable", "--job-name=distvae-test", "--nodes=1", "--gpus-per-node=0",
        f"--cpus-per-task={processes}", "--mem=2G", "--time=00:10:00", f"--output={log}", str(SCRIPTS / script),
        "tiny", *overrides,
        PROCS_PER_NODE=str(processes),
    ).strip().split(";")[0]

    def explain() -> str:
        return f"job log {log}:\n{tail(log, 40)}\n{cluster.diagnostics(job_id)}"

    def log_text() -> str:
        return log.read_text(errors="replace") if log.exists() else ""

    try:
        wait_for("training steps in the job log", lambda: "step 20/" in log_text(), 240, explain)
        cluster.run("scancel", "--signal=USR1", "--batch", job_id)
        states = []

        def over() -> bool:
            job = cluster.job(job_id)
            states.append(f"{job.get('JobState')}/{job.get('Restarts')}")
            return job.get("JobState") in FINAL_STATES

        wait_for("the job to be requeued and to finish", over, 300, explain)
    finally:
        subprocess.run(["scancel", job_id], env=cluster.env(), capture_output=True, timeout=60)

    job, text = cluster.job(job_id), log_text()
    details = f"states seen: {' '.join(dict.fromkeys(states))}\n{explain()}"
    # First run: the trap passed SIGUSR1 on, the trainer saved at the next step boundary, the job requeued.
    stopped = re.search(r"stop signal \(SIGUSR1\): saved \S+/step-(\d{8}); exiting with code 75", text)
    assert stopped, details
    step = int(stopped.group(1))
    assert 20 <= step < MAX_STEPS, details
    assert f"distvae: interrupted at step {step}, requeueing job {job_id}" in text, details
    # Second run: SLURM started the same job again, which resumed from that checkpoint and finished.
    headers = re.findall(rf"distvae: job {job_id} \(restart (\d+)\) on .*?(\d+) process", text)
    assert headers == [("0", str(processes)), ("1", str(processes))], details
    assert f"resuming from {run_dir / 'checkpoints' / f'step-{step:08d}'} at step {step}" in text, details
    assert f"finished {MAX_STEPS} steps" in text, details
    assert (run_dir / "status").read_text().split() == ["finished", str(MAX_STEPS)], details
    assert (job["JobState"], job["Restarts"], job["ExitCode"]) == ("COMPLETED", "1", "0:0"), details
    if processes > 1:  # the elastic launcher, not the trainer, got the signal and passed it to both workers
        assert text.count("closing signal SIGUSR1") == processes, details


def test_harness_is_idempotent_and_the_node_takes_jobs(cluster):
    again = subprocess.run([str(HARNESS / "start_cluster.sh"), str(cluster.state)], capture_output=True, text=True,
                           timeout=120, env=os.environ)
    assert again.returncode == 0 and "already running" in again.stderr, again.stderr
    assert shutil.which("sbatch") and cluster.run("sinfo", "-h", "-o", "%T").strip() in {"idle", "mixed"}
