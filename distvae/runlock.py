"""A lock on a run directory, held by rank 0 for the whole run: two trainers on one RUN_DIR would delete
each other's temporary checkpoint folders.

The lock is the file RUN_DIR/lock, a small JSON record of its holder (token, host, pid, SLURM job id,
start and heartbeat times). It relies on:

- an O_CREAT | O_EXCL create to take a free lock: atomic on local filesystems and on NFSv3 and later;
- os.replace within RUN_DIR to take over or refresh it: a rename on one filesystem is atomic;
- a heartbeat thread that rewrites the holder's record every `heartbeat_seconds`. Its timestamps come
  from the holder's clock, so the nodes' clocks must agree to well within `stale_seconds` (NTP does).

It does not use flock/fcntl locks: they are unreliable on NFS and Lustre.

An existing lock may be taken over when
    (a) it carries our SLURM job id: the same job, requeued or restarted after a node crash;
    (b) it was written on this host by a pid that is no longer running;
    (c) its heartbeat is older than `stale_seconds`.
A lock file that cannot be parsed (a writer killed mid-write) is taken over only when its mtime is older
than `stale_seconds`. After a takeover the file is read again after a short pause: of two processes taking
over at once, the one whose record is there wins and the other refuses. A takeover that lands later still
is caught by the heartbeat: the process that lost the file gets LockLost from `check()`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

from distvae.errors import UserError
from distvae.runtime import TrainingFailed

LOCK_NAME = "lock"
_CREATE_ATTEMPTS = 3


class LockLost(TrainingFailed):
    """Another process took over RUN_DIR/lock while this run was holding it."""


@dataclass(frozen=True)
class Holder:
    token: str
    host: str
    pid: int
    slurm_job_id: str | None
    started: float
    heartbeat: float

    def describe(self) -> str:
        slurm = f", SLURM job {self.slurm_job_id}" if self.slurm_job_id is not None else ""
        return f"host {self.host}, pid {self.pid}{slurm}"


def read_holder(path: Path) -> Holder | None:
    """The lock's holder; None when the file is not a complete lock record. FileNotFoundError if absent."""
    try:
        data = json.loads(path.read_bytes())
        holder = Holder(
            token=data["token"],
            host=data["host"],
            pid=data["pid"],
            slurm_job_id=data["slurm_job_id"],
            started=float(data["started"]),
            heartbeat=float(data["heartbeat"]),
        )
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(holder.token, str) or not isinstance(holder.host, str):
        return None
    if not isinstance(holder.pid, int) or holder.pid <= 0:  # os.kill(pid <= 0) would address process groups
        return None
    return holder


def describe(holder: Holder | None) -> str:
    return holder.describe() if holder is not None else "an unreadable lock file"


def pid_is_running(pid: int) -> bool:
    """On this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def _write_fsync(fd: int, payload: bytes) -> None:
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)


class RunLock:
    """`acquire()` / `check()` / `release()`, or `with RunLock(run_dir) as lock:` (the note is `lock.note`)."""

    confirm_seconds = 0.2  # how long rival takeovers get to land before we read the file back

    def __init__(self, run_dir: Path, stale_seconds: float = 300.0, heartbeat_seconds: float = 30.0) -> None:
        if not 0 < heartbeat_seconds <= stale_seconds / 2:
            raise ValueError(
                f"heartbeat_seconds={heartbeat_seconds} must be positive and at most half of "
                f"stale_seconds={stale_seconds}, or a live holder could look stale"
            )
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.stale_seconds = stale_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.note = ""
        self._held = False
        self._token = ""
        self._started = 0.0
        self._owner_pid = -1
        self._lost_message: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- acquire ---------------------------------------------------------------------------------------

    def acquire(self) -> str:
        """Empty when the lock was free, a one-line note when it took one over; UserError when it is held."""
        if self._held:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._token = secrets.token_hex(16)
        self._started = time.time()
        try:
            self.note = self._take()
        except BaseException:
            with contextlib.suppress(OSError):  # interrupted after a takeover landed: leave no unrefreshed lock
                self._remove_if_ours()
            raise
        self._held = True
        self._owner_pid = os.getpid()
        self._lost_message = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat_loop, name="distvae-runlock", daemon=True)
        self._thread.start()
        return self.note

    def _take(self) -> str:
        for _ in range(_CREATE_ATTEMPTS):
            if self._create_exclusive():
                return ""
            try:
                holder = read_holder(self.path)
                reason = self._takeover_reason(holder)
            except FileNotFoundError:  # released between our create and our read
                continue
            self._take_over()
            return f"took over {self.path} from {describe(holder)}: {reason}"
        raise UserError(f"{self.path} keeps appearing and disappearing: another trainer is starting; retry")

    def _create_exclusive(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        _write_fsync(fd, self._record())
        return True

    def _takeover_reason(self, holder: Holder | None) -> str:
        """Why the existing lock may be taken over; UserError when it may not."""
        if holder is None:
            return self._corrupt_takeover_reason()
        our_job = os.environ.get("SLURM_JOB_ID")
        if holder.slurm_job_id is not None and holder.slurm_job_id == our_job:
            return f"it belongs to this SLURM job ({our_job}), requeued or restarted"
        if holder.host == socket.gethostname() and not pid_is_running(holder.pid):
            return f"pid {holder.pid} is no longer running on this host"
        age = time.time() - holder.heartbeat
        if age > self.stale_seconds:
            return f"its heartbeat is stale ({age:.0f} s old, limit {self.stale_seconds:.0f} s)"
        raise UserError(
            f"run directory {self.run_dir} is in use by another trainer ({holder.describe()}, last heartbeat "
            f"{age:.0f} s ago); wait for it to finish, stop it, or use another run.dir; if you are sure it is "
            f"dead, remove {self.path} (it counts as stale after {self.stale_seconds:.0f} s without a heartbeat)"
        )

    def _corrupt_takeover_reason(self) -> str:
        age = time.time() - self.path.stat().st_mtime
        if age > self.stale_seconds:
            return f"it was unreadable and untouched for {age:.0f} s"
        raise UserError(
            f"{self.path} is being written by another trainer (unreadable, modified {age:.1f} s ago); retry in a "
            f"moment; if it stays so and no trainer is running, remove it (it counts as stale after "
            f"{self.stale_seconds:.0f} s)"
        )

    def _take_over(self) -> None:
        self._replace()
        self._let_rivals_write()
        holder = self._read_or_none()
        if holder is None or holder.token != self._token:
            winner = holder.describe() if holder is not None else "a process that has already released it"
            raise UserError(
                f"another trainer took over {self.path} at the same moment and won ({winner}); "
                f"stop one of them or use another run.dir"
            )

    def _let_rivals_write(self) -> None:
        time.sleep(self.confirm_seconds)

    # --- our record ------------------------------------------------------------------------------------

    def _record(self) -> bytes:
        holder = Holder(
            token=self._token,
            host=socket.gethostname(),
            pid=os.getpid(),
            slurm_job_id=os.environ.get("SLURM_JOB_ID"),
            started=self._started,
            heartbeat=time.time(),
        )
        return json.dumps(asdict(holder)).encode()

    def _replace(self) -> None:
        """Temp file in RUN_DIR then os.replace: readers see the old record or the new one, never half."""
        tmp = self.run_dir / f".{LOCK_NAME}-{self._token}.tmp"
        try:
            _write_fsync(os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644), self._record())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _read_or_none(self) -> Holder | None:
        try:
            return read_holder(self.path)
        except FileNotFoundError:
            return None

    def _remove_if_ours(self) -> None:
        holder = self._read_or_none()
        if holder is not None and holder.token == self._token:
            self.path.unlink(missing_ok=True)

    # --- heartbeat and check ---------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            if not self._beat():
                return

    def _beat(self) -> bool:
        """Refresh our record; False once the lock is someone else's. Read/write errors retry next beat."""
        try:
            holder = read_holder(self.path)
        except FileNotFoundError:
            self._lost_message = self._lost_message or self._removed()
            return False
        except OSError:
            return True
        if holder is None:  # not a whole record, so not ours (we only replace whole files): retry next beat
            return True
        if holder.token != self._token:
            self._lost_message = self._lost_message or self._taken_by(holder)
            return False
        try:
            self._replace()
        except OSError:
            pass
        return True

    def check(self) -> None:
        """LockLost if another process has taken the lock over. Reads the small lock file."""
        if not self._held:
            raise RuntimeError(f"RunLock.check() on {self.path} without acquire()")
        if self._lost_message is None:
            self._lost_message = self._loss_in_file()
        if self._lost_message is not None:
            raise LockLost(self._lost_message)

    def _loss_in_file(self) -> str | None:
        try:
            holder = read_holder(self.path)
        except FileNotFoundError:
            return self._removed()
        except OSError:  # transient (NFS): the heartbeat or the next check decides
            return None
        if holder is not None and holder.token != self._token:
            return self._taken_by(holder)
        return None

    def _taken_by(self, holder: Holder) -> str:
        return (
            f"another trainer took over {self.path} ({holder.describe()}); this run stops so that the two do "
            f"not delete each other's checkpoints: stop one of them or give each its own run.dir"
        )

    def _removed(self) -> str:
        return f"{self.path} was removed while this run held it; stop the other trainer if one is running"

    # --- release ---------------------------------------------------------------------------------------

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours. Idempotent."""
        if not self._held or self._owner_pid != os.getpid():  # a forked child (DataLoader worker) inherits us
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._remove_if_ours()
        self._held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
