"""Process-level concerns of a training run: launch sanity, stop signals, exit codes.

Exit codes of `distvae/train.py`:
    0   finished (train.max_steps reached)
    1   failed (for example too many consecutive non-finite steps)
    2   a user mistake (bad config, missing shards), reported in one line
    75  interrupted by SIGUSR1/SIGTERM/SIGINT after saving a checkpoint: rerun the same command to resume
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

from distvae.errors import UserError

EXIT_FINISHED, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 75

# SLURM sends SIGUSR1 (with --signal) before the time limit and SIGTERM on preemption or scancel.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class TrainingFailed(Exception):
    """The run cannot go on (numbers went non-finite); the message says what to try."""


class StopFlag:
    """Set by a stop signal; the loop reads it at step boundaries, where all ranks agree on it.

    The handler only records the signal: launchers may deliver it twice and it can arrive in the
    middle of a collective. A second Ctrl-C restores the default handler, so a third one kills.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        if launched_by_launcher():
            die_with_parent(signal.SIGTERM)
            if os.getppid() == 1:  # the launcher died before prctl took effect
                self.signal_name = "SIGTERM"

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


def launched_by_launcher() -> bool:
    """True under `accelerate launch` (ACCELERATE_MIXED_PRECISION) or torchrun (TORCHELASTIC_RUN_ID)."""
    return "ACCELERATE_MIXED_PRECISION" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ


def die_with_parent(sig: signal.Signals) -> None:
    """Ask Linux to send `sig` to this process when its launcher dies.

    A single-process `accelerate launch` does not forward signals: SIGUSR1 from SLURM kills the launcher
    and the trainer would run on, orphaned, until the job is killed. With this, the trainer is told,
    saves a checkpoint and exits.
    """
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def check_launch_environment() -> None:
    """Before any process group exists: WORLD_SIZE > 1 needs a launcher that also sets MASTER_ADDR."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not os.environ.get("MASTER_ADDR"):
        raise UserError(
            f"WORLD_SIZE={world_size} is set but no launcher started this process (no MASTER_ADDR): run it with "
            f"`accelerate launch --multi_gpu --num_processes {world_size} ...` or `torchrun --nproc_per_node "
            f"{world_size} ...`, or unset WORLD_SIZE"
        )


def check_launch(num_processes: int) -> None:
    """Refuse the silent trap where a launcher starts N processes that each believe they are alone.

    `accelerate launch --multi_gpu` on a machine without GPUs (and without ACCELERATE_USE_CPU=1) starts
    two independent single-process trainings: each trains its own model on part of the data.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != num_processes:
        raise UserError(
            f"the launcher started WORLD_SIZE={world_size} processes but this one joined a group of "
            f"{num_processes}; on a machine without GPUs launch with `ACCELERATE_USE_CPU=1 accelerate launch "
            f"--multi_gpu --num_processes {world_size} ...` or `torchrun --nproc_per_node {world_size} ...`"
        )


def fail(message: str) -> int:
    print(f"distvae train: error: {message}", file=sys.stderr, flush=True)
    return EXIT_FAILED
