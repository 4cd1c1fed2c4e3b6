"""RunLock: one trainer per run directory, takeover of dead holders, heartbeat, loss detection."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from distvae.errors import UserError
from distvae.runlock import LockLost, RunLock, read_holder
from distvae.runtime import TrainingFailed

REPO = Path(__file__).resolve().parent.parent

# Tries the lock in another process: prints the outcome on one line and exits 0 (acquired) or 3 (refused).
SECOND_TRAINER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from distvae.errors import UserError
    from distvae.runlock import RunLock
    lock = RunLock(Path(sys.argv[1]))
    try:
        note = lock.acquire()
    except UserError as e:
        print("REFUSED", str(e))
        sys.exit(3)
    print("ACQUIRED", note)
    lock.release()
    """
)


@pytest.fixture(autouse=True)
def no_slurm_job(monkeypatch):
    """Under a SLURM test job every process would share SLURM_JOB_ID and take each other's locks over."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


def write_lock(
    path: Path,
    *,
    token: str = "f" * 32,
    host: str = "other-node",
    pid: int = 4242,
    slurm_job_id: str | None = None,
    heartbeat_age: float = 0.0,
) -> None:
    """Another holder's record, written the way RunLock writes it (temp file + replace)."""
    now = time.time()
    record = {
        "token": token,
        "host": host,
        "pid": pid,
        "slurm_job_id": slurm_job_id,
        "started": now - heartbeat_age,
        "heartbeat": now - heartbeat_age,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("rival.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def owns(lock: RunLock) -> bool:
    holder = read_holder(lock.path)
    return holder is not None and holder.pid == os.getpid() and holder.host == socket.gethostname()


def run_second_trainer(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SECOND_TRAINER, str(run_dir)], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_second_process_is_refused_until_release(tmp_path):
    run_dir = tmp_path / "run" / "nested"  # created by acquire
    lock = RunLock(run_dir)
    assert lock.acquire() == ""

    refused = run_second_trainer(run_dir)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    message = refused.stdout.removeprefix("REFUSED ").rstrip("\n")
    assert "\n" not in message
    assert f"pid {os.getpid()}" in message and socket.gethostname() in message
    assert "another run.dir" in message and str(lock.path) in message
    lock.check()  # still ours
    assert owns(lock)

    lock.release()
    accepted = run_second_trainer(run_dir)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert accepted.stdout.strip() == "ACQUIRED"
    assert not lock.path.exists()  # the second trainer released it too


def test_stale_heartbeat_is_taken_over_fresh_one_refused(tmp_path):
    lock = RunLock(tmp_path, stale_seconds=300)
    write_lock(lock.path, heartbeat_age=10)
    with pytest.raises(UserError, match=r"other-node, pid 4242, last heartbeat 10 s ago"):
        lock.acquire()
    assert read_holder(lock.path).host == "other-node"

    write_lock(lock.path, heartbeat_age=1000)
    note = lock.acquire()
    assert "heartbeat is stale (1000 s old" in note and "other-node" in note and "\n" not in note
    assert owns(lock)
    lock.release()


def test_same_slurm_job_is_taken_over_other_job_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    lock = RunLock(tmp_path)
    write_lock(lock.path, slurm_job_id="999")
    with pytest.raises(UserError, match=r"SLURM job 999"):
        lock.acquire()

    write_lock(lock.path, slurm_job_id="1234")
    note = lock.acquire()
    assert "this SLURM job (1234)" in note
    holder = read_holder(lock.path)
    assert owns(lock) and holder.slurm_job_id == "1234"
    lock.release()


def test_dead_pid_on_this_host_is_taken_over(tmp_path):
    lock = RunLock(tmp_path)
    write_lock(lock.path, host=socket.gethostname(), pid=os.getpid())  # alive: refused
    with pytest.raises(UserError, match="in use by another trainer"):
        lock.acquire()

    pid = dead_pid()
    write_lock(lock.path, host=socket.gethostname(), pid=pid)
    note = lock.acquire()
    assert f"pid {pid} is no longer running on this host" in note
    assert owns(lock)
    lock.release()


def test_heartbeat_moves_forward(tmp_path):
    with RunLock(tmp_path, heartbeat_seconds=0.1) as lock:
        first = read_holder(lock.path)
        time.sleep(0.5)
        later = read_holder(lock.path)
    assert later.token == first.token
    assert later.heartbeat > first.heartbeat + 0.2
    assert later.started == first.started


def test_lost_lock_is_reported_and_not_removed(tmp_path):
    lock = RunLock(tmp_path, heartbeat_seconds=0.1)
    lock.acquire()
    write_lock(lock.path, token="a" * 32, host="thief-node", pid=777, slurm_job_id="55")
    time.sleep(0.5)  # several heartbeats: none may overwrite the new holder's record
    assert read_holder(lock.path).token == "a" * 32
    with pytest.raises(LockLost, match=r"thief-node, pid 777, SLURM job 55") as lost:
        lock.check()
    assert isinstance(lost.value, TrainingFailed) and "\n" not in str(lost.value)
    with pytest.raises(LockLost):  # stays lost
        lock.check()
    lock.release()
    assert read_holder(lock.path).token == "a" * 32


def test_lost_lock_is_seen_by_the_heartbeat(tmp_path):
    """check() also reports a loss the heartbeat saw when the file changed hands again since."""
    lock = RunLock(tmp_path, heartbeat_seconds=0.1)
    lock.acquire()
    ours = lock.path.read_bytes()
    write_lock(lock.path, token="b" * 32, host="thief-node", pid=778)
    time.sleep(0.4)
    lock.path.write_bytes(ours)  # our record again (say, restored from a backup): the loss still counts
    with pytest.raises(LockLost, match="thief-node, pid 778"):
        lock.check()
    lock.release()


def test_check_reads_the_file_between_heartbeats(tmp_path):
    lock = RunLock(tmp_path)  # 30 s heartbeat: no beat happens during this test
    lock.acquire()
    lock.check()
    write_lock(lock.path, token="d" * 32, host="thief-node", pid=779)
    with pytest.raises(LockLost, match="thief-node, pid 779"):
        lock.check()
    lock.release()
    assert read_holder(lock.path).host == "thief-node"

    lock.path.unlink()
    lock.acquire()
    lock.path.unlink()
    with pytest.raises(LockLost, match="was removed while this run held it"):
        lock.check()
    lock.release()


def test_release_is_idempotent_and_context_manager_releases(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    assert lock.path.exists()
    lock.release()
    assert not lock.path.exists()
    lock.release()

    with pytest.raises(RuntimeError), RunLock(tmp_path) as held:
        assert owns(held)
        held.check()
        raise RuntimeError("the run failed")
    assert not held.path.exists()
    assert RunLock(tmp_path).acquire() == ""  # free again


def test_corrupt_lock_refused_while_fresh_taken_over_when_old(tmp_path):
    lock = RunLock(tmp_path)
    lock.path.write_text('{"token": "abc", "ho')  # a writer killed mid-write
    with pytest.raises(UserError, match="is being written by another trainer"):
        lock.acquire()
    assert lock.path.read_text() == '{"token": "abc", "ho'

    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    note = lock.acquire()
    assert "unreadable and untouched for 1000 s" in note
    assert owns(lock)
    lock.release()


def test_simultaneous_takeover_loser_names_the_winner(tmp_path):
    """Two processes take over a stale lock at once: the one whose record is in the file afterwards wins."""

    class SlowerRivalWins(RunLock):
        def _let_rivals_write(self) -> None:
            write_lock(self.path, token="c" * 32, host="rival-node", pid=999)

    lock = SlowerRivalWins(tmp_path)
    write_lock(lock.path, heartbeat_age=1000)
    with pytest.raises(UserError, match=r"at the same moment and won \(host rival-node, pid 999\)"):
        lock.acquire()
    assert read_holder(lock.path).token == "c" * 32


def test_heartbeat_must_fit_twice_in_stale_window(tmp_path):
    with pytest.raises(ValueError, match="at most half"):
        RunLock(tmp_path, stale_seconds=10, heartbeat_seconds=6)
