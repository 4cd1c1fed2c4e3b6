"""distvae.rundir_check: every rank must see the one run.dir (two nodes for real: test_slurm.py)."""

import json
import socket
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from distvae.errors import UserError
from distvae.rundir_check import check_shared_run_dir, missing_message, rank_file


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_as_rank(rank: int, port: int, run_dirs: list[str], out: str, wait_s: float) -> None:
    """One of two gloo processes: check its own run dir, write what happened to out/rank{rank}.json."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(run_dirs))
    try:
        check_shared_run_dir(Path(run_dirs[rank]), rank, len(run_dirs), wait_s=wait_s)
        result = {"error": None}
    except UserError as error:
        result = {"error": str(error)}
    dist.destroy_process_group()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))


def two_ranks(run_dirs: list[Path], tmp_path: Path, wait_s: float = 0.5) -> list[str | None]:
    out = tmp_path / "results"
    out.mkdir()
    mp.spawn(check_as_rank, args=(free_port(), [str(path) for path in run_dirs], str(out), wait_s), nprocs=2,
             join=True)  # spawn, not fork: no OpenMP state of this process in the children
    return [json.loads((out / f"rank{rank}.json").read_text())["error"] for rank in range(2)]


def test_a_shared_run_dir_passes_and_leaves_no_files(tmp_path):
    run_dir = tmp_path / "run" / "nested"  # rank 0 creates it, parents included
    assert two_ranks([run_dir, run_dir], tmp_path) == [None, None]
    assert run_dir.is_dir() and list(run_dir.iterdir()) == []


def test_a_run_dir_that_differs_between_ranks_stops_every_rank_with_one_line(tmp_path):
    # Two nodes with run.dir on their own disks look like this: each rank writes into its own folder.
    node0, node1 = tmp_path / "node0" / "run", tmp_path / "node1" / "run"
    node1.mkdir(parents=True)
    errors = two_ranks([node0, node1], tmp_path)
    host = socket.gethostname()
    assert errors[0] == errors[1], errors  # every rank stops with the same line
    assert errors[0] is not None and "\n" not in errors[0], errors
    assert errors[0].startswith(f"run.dir={node0} is not the same folder on every node: rank 0 on {host} cannot "
                                f"see the check files from {host} (rank 1) in it;"), errors[0]
    assert "not a node-local disk" in errors[0]
    assert list(node0.iterdir()) == [] and list(node1.iterdir()) == []  # each rank removed its own file


def test_a_rank_that_does_not_see_run_dir_at_all_is_named_too(tmp_path):
    # Rank 0 makes run.dir on its node; on rank 1's node the folder does not exist and nothing is written there.
    errors = two_ranks([tmp_path / "node0" / "run", tmp_path / "node1" / "run"], tmp_path)
    assert errors[0] == errors[1] and f"from {socket.gethostname()} (rank 1)" in errors[0], errors
    assert not (tmp_path / "node1" / "run").exists()


def test_a_run_dir_rank_0_cannot_create_stops_every_rank_instead_of_hanging(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    errors = two_ranks([tmp_path / "file" / "run"] * 2, tmp_path)
    assert errors[0] == errors[1] and errors[0].startswith(f"cannot create run.dir={tmp_path / 'file' / 'run'} on "), \
        errors


def test_one_process_checks_nothing(tmp_path):
    check_shared_run_dir(tmp_path / "run", rank=0, world=1)  # no process group needed, nothing written
    assert not (tmp_path / "run").exists()


def test_the_line_names_a_few_nodes_and_counts_the_rest(tmp_path):
    hosts = ["n0", "n0", "n1", "n1", "n2", "n3", "n4", "n5", "n6"]
    for rank in (0, 1, 3):  # these three are seen; rank 2 (on n1) and every rank from 4 on are not
        rank_file(tmp_path, "abc", rank).write_text(f"{rank} {hosts[rank]}\n")
    rank_file(tmp_path, "abc", 4).write_text("4 another-host\n")  # a file from another start: not ours
    message = missing_message(tmp_path, "abc", hosts, wait_s=0)
    assert ("rank 0 on n0 cannot see the check files from n1 (rank 2), n2 (rank 4), n3 (rank 5), n4 (rank 6), "
            "2 more node(s) in it;") in message, message
    for rank in range(len(hosts)):
        rank_file(tmp_path, "abc", rank).write_text(f"{rank} {hosts[rank]}\n")
    assert missing_message(tmp_path, "abc", hosts, wait_s=0) == ""
