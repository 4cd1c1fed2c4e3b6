"""A test that fails while a two-node job runs, so that test_slurm.py can check what the fixture's teardown
leaves behind. Not collected on its own (the name does not match test_*.py); test_slurm.py runs it as

    DISTVAE_HARNESS_RECORD=FILE python -m pytest tests/slurm/fail_with_a_job_running.py

and it writes FILE (JSON: the cluster's state folder, namespaces, daemon pids and the job's processes).
"""

import json
import os
import subprocess
import time
from pathlib import Path

from test_slurm import two_nodes  # noqa: F401  (the fixture whose teardown is under test)


def namespace_pids(name: str) -> list[int]:
    listed = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30).stdout
    return [int(pid) for pid in listed.split()]


def test_fails_while_a_two_node_job_runs(two_nodes):  # noqa: F811
    state = two_nodes.state
    job_id = two_nodes.run("sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--output=/dev/null",
                           "--wrap", "srun sleep 600").strip().split(";")[0]
    namespaces = (state / "netns").read_text().split()
    nodes = [name for name in namespaces if not name.endswith("-hub")]
    sleeping: list[int] = []
    deadline = time.monotonic() + 60
    while len(sleeping) < 2:  # one `sleep` per node: the job step runs on both
        assert time.monotonic() < deadline, f"job {job_id} did not start on both nodes: {two_nodes.job(job_id)}"
        time.sleep(0.3)
        sleeping = [pid for name in nodes for pid in namespace_pids(name)
                    if Path(f"/proc/{pid}/comm").exists() and Path(f"/proc/{pid}/comm").read_text().strip() == "sleep"]
    record = {
        "state": str(state),
        "namespaces": namespaces,
        "daemons": [int(path.read_text()) for path in (state / "pids").glob("*.pid")],
        "job_processes": sorted({pid for name in nodes for pid in namespace_pids(name)}),  # slurmstepd, sh, srun...
    }
    Path(os.environ["DISTVAE_HARNESS_RECORD"]).write_text(json.dumps(record))
    raise AssertionError(f"fails deliberately while job {job_id} runs on {two_nodes.job(job_id).get('NodeList')}")
