"""Before training, every rank must see the one run directory: a node-local run.dir is a common mistake.

On a cluster, run.dir=/tmp/run or /scratch/run names a folder on each node's own disk. Rank 0 would then
write checkpoints that the other nodes never see, and a requeued job would resume from whatever each node
happens to hold. So rank 0 creates RUN_DIR and chooses a nonce for this start, each rank writes a file
named after the nonce and its rank into RUN_DIR, and rank 0 checks that it can read all of them back. A
rank that sees no RUN_DIR at all (rank 0 made it on its own node) writes nothing, and is reported the same
way. One line names the nodes whose files rank 0 cannot see, and every rank stops with it (exit 2). The
files are removed again once rank 0 has looked.

On NFS a name never looked up before is looked up on the server (no cached entry exists for it), so the
fresh nonce keeps attribute caching out of the way; short waits cover a RUN_DIR that another node sees a
little late and filesystems that publish new files with some delay. The check costs two collectives when
all is well; the waits only come into play when something is missing.
"""

from __future__ import annotations

import secrets
import socket
import time
from pathlib import Path

import torch.distributed as dist

from distvae.errors import UserError

VISIBLE_WITHIN_S = 3.0  # how long a rank waits for RUN_DIR, and rank 0 for the other ranks' files, to appear
SHOWN_NODES = 4  # nodes named in the error line; the rest are counted


def check_shared_run_dir(run_dir: Path, rank: int, world: int, wait_s: float = VISIBLE_WITHIN_S) -> None:
    """Every rank calls this at the same point (before any rank writes into RUN_DIR); UserError on every rank
    when rank 0 cannot create RUN_DIR or misses some rank's file."""
    if world < 2:
        return
    start = [None, ""]  # the nonce, or why rank 0 could not make RUN_DIR
    if rank == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            start[0] = secrets.token_hex(8)
        except OSError as error:
            start[1] = f"cannot create run.dir={run_dir} on {socket.gethostname()}: {error.strerror or error}"
    dist.broadcast_object_list(start)
    nonce, problem = start
    if problem:
        raise UserError(problem)
    host = socket.gethostname()
    mine = rank_file(run_dir, nonce, rank)
    wrote = appears(run_dir.is_dir, wait_s)
    if wrote:
        try:
            mine.write_text(f"{rank} {host}\n")
        except OSError:  # a read-only or full node-local disk: rank 0 reports it as missing
            wrote = False
    hosts: list[str | None] = [None] * world
    dist.all_gather_object(hosts, host)  # also the barrier: every rank that could has written its file
    verdict = [missing_message(run_dir, nonce, hosts, wait_s) if rank == 0 else ""]
    dist.broadcast_object_list(verdict)
    if wrote:
        mine.unlink(missing_ok=True)
    if verdict[0]:
        raise UserError(verdict[0])


def appears(condition, wait_s: float) -> bool:
    """condition() now or within wait_s seconds."""
    deadline = time.monotonic() + wait_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def rank_file(run_dir: Path, nonce: str, rank: int) -> Path:
    return run_dir / f".shared-check-{nonce}-rank{rank}"


def missing_message(run_dir: Path, nonce: str, hosts: list[str], wait_s: float) -> str:
    """Rank 0: "" when every rank's file is there with the right content, else the one-line error."""
    missing: list[int] = []

    def all_seen() -> bool:
        missing[:] = unseen(run_dir, nonce, hosts)
        return not missing

    if appears(all_seen, wait_s):
        return ""
    by_host: dict[str, list[int]] = {}
    for rank in missing:
        by_host.setdefault(hosts[rank], []).append(rank)
    named = [f"{host} ({'rank' if len(ranks) == 1 else 'ranks'} {', '.join(map(str, ranks))})"
             for host, ranks in list(by_host.items())[:SHOWN_NODES]]
    if len(by_host) > SHOWN_NODES:
        named.append(f"{len(by_host) - SHOWN_NODES} more node(s)")
    return (f"run.dir={run_dir} is not the same folder on every node: rank 0 on {hosts[0]} cannot see the check "
            f"files from {', '.join(named)} in it; run.dir must be on a filesystem that every node shares (NFS, "
            f"Lustre, GPFS), not a node-local disk such as /tmp or /scratch")


def unseen(run_dir: Path, nonce: str, hosts: list[str]) -> list[int]:
    """The ranks whose file rank 0 cannot read back as written."""
    missing = []
    for rank, host in enumerate(hosts):
        try:
            seen = rank_file(run_dir, nonce, rank).read_text()
        except OSError:
            seen = ""
        if seen != f"{rank} {host}\n":
            missing.append(rank)
    return missing
