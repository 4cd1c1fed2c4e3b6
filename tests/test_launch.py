"""distvae.launch: SLURM's variables -> one rank per srun task (the SLURM runs themselves: test_slurm.py)."""

import os
import subprocess
import sys

import pytest
from conftest import REPO

from distvae.errors import UserError
from distvae.launch import first_host, rank_environment

# What srun 22.05 gives task 1 of `srun --nodes 2 --ntasks-per-node 1` (seen on the test cluster).
TASK = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2",
        "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_JOB_ID": "1234"}


@pytest.mark.parametrize("nodelist, first", [
    ("gpu[003-004,010],cpu7", "gpu003"),  # zero-padded range, then a plain name
    ("cpu7,gpu[003-004]", "cpu7"),
    ("node1", "node1"),
    ("node[1-2]", "node1"),
    ("n[10,2-3]", "n10"),  # the list's order, not the smallest number
    ("a[1-2]-b[5-6]", "a1-b5"),  # two ranges in one name
    ("rack1-[07-09]", "rack1-07"),
])
def test_first_host_of_a_slurm_hostlist(nodelist, first):
    assert first_host(nodelist) == first


def test_rank_environment_from_slurm_variables():
    assert rank_environment(TASK) == {"RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "node1",
                                      "MASTER_PORT": str(20000 + 1234)}
    # The step's own list and task count win over the job's; MASTER_ADDR and MASTER_PORT set by the user win.
    step = {**TASK, "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_JOB_NODELIST": "gpu[001-008]",
            "SLURM_NTASKS": "64", "SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
            "SLURM_JOB_ID": "98765", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    assert rank_environment(step) == {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "MASTER_ADDR": "gpu007",
                                      "MASTER_PORT": str(20000 + 98765 % 20000)}
    mine = rank_environment({**step, "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29500"})
    assert (mine["MASTER_ADDR"], mine["MASTER_PORT"]) == ("10.0.0.5", "29500")


@pytest.mark.parametrize("change, words", [
    ({"SLURM_STEP_ID": None}, ["run it with srun"]),  # the batch script itself, or salloc's shell
    ({"SLURM_PROCID": None}, ["run it with srun"]),
    ({"SLURM_LOCALID": None}, ["SLURM_LOCALID is not set"]),
    ({"SLURM_NTASKS": None, "SLURM_STEP_NUM_TASKS": None}, ["SLURM_STEP_NUM_TASKS or SLURM_NTASKS is not set"]),
    ({"SLURM_PROCID": "one"}, ["SLURM_PROCID='one' is not a whole number"]),
    ({"SLURM_PROCID": "2"}, ["SLURM_PROCID=2", "step of 2 task(s)"]),
    ({"SLURM_JOB_ID": None}, ["SLURM_JOB_ID is not set"]),
    ({"SLURM_STEP_NODELIST": None, "SLURM_JOB_NODELIST": None}, ["export MASTER_ADDR"]),
    ({"CUDA_VISIBLE_DEVICES": "3", "SLURM_LOCALID": "1"}, ["sees only 1 GPU(s)", "--gpus-per-node",
                                                           "--gpus-per-task"]),
])
def test_rank_environment_errors_are_one_line(change, words):
    environ = {**TASK, **{key: value for key, value in change.items() if value is not None}}
    for key in [key for key, value in change.items() if value is None]:
        del environ[key]
    with pytest.raises(UserError) as error:
        rank_environment(environ)
    message = str(error.value)
    assert "\n" not in message and all(word in message for word in words), message


def launch(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {key: value for key, value in os.environ.items()
             if not key.startswith("SLURM_") and key not in {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT"}}
    return subprocess.run([sys.executable, "-m", "distvae.launch", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env={**clean, **env})


def test_outside_srun_it_exits_2_with_one_line():
    result = launch("--config", "tiny")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("distvae launch: error: "), result.stderr
    assert "run it with srun" in result.stderr and result.stdout == ""


def test_inside_an_srun_task_it_runs_the_trainer_with_the_ranks_set():
    # One task of one: the trainer's own --print-config answers, after the launch line says which rank this is.
    result = launch("--config", "tiny", "train.max_steps=700", "--print-config",
                    **{**TASK, "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1",
                       "SLURM_STEP_NODELIST": "cpu[7-8]"})
    assert result.returncode == 0, result.stderr
    assert "distvae launch: rank 0 of 1 (local 0)" in result.stderr
    assert "rendezvous cpu7:21234" in result.stderr
    assert "max_steps: 700" in result.stdout
    # A user mistake in the trainer's arguments is the trainer's exit code 2, passed through.
    wrong = launch("--config", "tiny", "train.max_stepz=7", **{**TASK, "SLURM_PROCID": "0"})
    assert wrong.returncode == 2 and "train.max_stepz" in wrong.stderr, wrong.stderr
