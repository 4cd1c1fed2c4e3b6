"""One trainer per SLURM task, no launcher in between: the task's exit code is the trainer's.

    srun python -m distvae.launch --config celeba256 [key=value ...]     # in an allocation: one task per GPU
    sbatch launch/slurm/train_multinode.sbatch celeba256                # the batch script that does this

Each task `srun` starts becomes one rank: RANK from SLURM_PROCID, LOCAL_RANK from SLURM_LOCALID,
WORLD_SIZE from the step's task count (SLURM_STEP_NUM_TASKS, else SLURM_NTASKS), MASTER_ADDR the first
node of the step (where srun puts task 0), MASTER_PORT 20000 + SLURM_JOB_ID % 20000. MASTER_ADDR and
MASTER_PORT already in the environment win. Then distvae/train.py's main() runs in this process, so the
exit code is the trainer's (0 finished, 1 failed, 2 a user mistake, 75 saved after a stop signal), and
srun returns the highest of its tasks'. srun passes the signals it gets (SIGUSR1 from the batch script)
to every task; no elastic agent re-raises them.

Every task sees all of its node's GPUs (submit with --gpus-per-node) and takes cuda:LOCAL_RANK.
LOCAL_WORLD_SIZE is left unset: SLURM_CPUS_PER_TASK are already this task's own cores, and
distvae.data.workers would divide them among the local ranks again.
"""

from __future__ import annotations

import os
import re
import socket
import sys

from distvae.errors import UserError
from distvae.runtime import EXIT_USAGE


def first_host(nodelist: str) -> str:
    """The first name of a SLURM hostlist: "gpu[003-004,010],cpu7" -> "gpu003", "a[1-2]-b[5-6]" -> "a1-b5"."""
    depth, end = 0, len(nodelist)
    for index, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = index
            break
    return re.sub(r"\[([^\]]*)\]", lambda group: re.split(r"[,-]", group.group(1))[0], nodelist[:end]).strip()


def rank_environment(environ: dict[str, str]) -> dict[str, str]:
    """RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT for this task, from SLURM's variables.

    UserError (one line) outside an srun task or when SLURM's variables do not add up."""
    if "SLURM_STEP_ID" not in environ or "SLURM_PROCID" not in environ:
        raise UserError("python -m distvae.launch starts one rank per SLURM task: run it with srun (inside sbatch or "
                        "salloc), or run distvae/train.py directly outside SLURM")

    def number(*names: str) -> int:
        for name in names:
            if environ.get(name, "").strip():
                try:
                    return int(environ[name])
                except ValueError:
                    raise UserError(f"{name}={environ[name]!r} is not a whole number; srun sets it, so do not set "
                                    f"it yourself") from None
        raise UserError(f"{' or '.join(names)} is not set inside this srun task: is this SLURM too old or "
                        f"the variable removed by a wrapper?")

    rank, local_rank = number("SLURM_PROCID"), number("SLURM_LOCALID")
    world = number("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    if not 0 <= rank < world or local_rank < 0:
        raise UserError(f"SLURM_PROCID={rank}, SLURM_LOCALID={local_rank} do not fit a step of {world} task(s)")
    devices = [name for name in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if name]
    if devices and local_rank >= len(devices):
        raise UserError(f"task {rank} (LOCAL_RANK={local_rank}) sees only {len(devices)} GPU(s) "
                        f"(CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']}): every task needs all of its node's "
                        f"GPUs, so submit with --gpus-per-node, without --gpus-per-task or --gpu-bind")
    master_addr = environ.get("MASTER_ADDR") or first_host(
        environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", ""))
    if not master_addr:
        raise UserError("neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST names a node: export MASTER_ADDR (the "
                        "node of task 0) before srun")
    master_port = environ.get("MASTER_PORT") or str(20000 + number("SLURM_JOB_ID") % 20000)
    return {"RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world),
            "MASTER_ADDR": master_addr, "MASTER_PORT": master_port}


def main(argv: list[str] | None = None) -> int:
    try:
        ranks = rank_environment(dict(os.environ))
    except UserError as error:
        print(f"distvae launch: error: {error}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    os.environ.update(ranks)
    print(f"distvae launch: rank {ranks['RANK']} of {ranks['WORLD_SIZE']} (local {ranks['LOCAL_RANK']}) on "
          f"{socket.gethostname()}, rendezvous {ranks['MASTER_ADDR']}:{ranks['MASTER_PORT']}", file=sys.stderr,
          flush=True)
    from distvae.train import main as train_main  # after the variables: nothing may read them earlier

    return train_main(argv)  # which destroys the process group before it returns (train.close_process_group)


if __name__ == "__main__":
    sys.exit(main())
