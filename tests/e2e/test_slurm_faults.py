"""What only Slurm does to a running map: a job PREEMPTED by a job of a higher partition.

The test cluster's partition ``urgent`` preempts ``main`` (PreemptMode=CANCEL, see
docker/slurm/slurm-setup and test_slurm_cluster.py): the preempted array tasks end in state
PREEMPTED, and sheepdog must run their tasks again and say why the job ended. (TIMEOUT, a job
killed at its ``--time``, is tested on either scheduler in test_run_limit_e2e.py.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import paramiko
import pytest
from cluster_fixture import check, ssh_connect, wait_for_slurm_job

import sheepdog

pytestmark = [pytest.mark.e2e, pytest.mark.slurm]


@pytest.fixture
def ssh(cluster: dict[str, Any]) -> Iterator[paramiko.SSHClient]:
    client = ssh_connect(cluster)
    yield client
    client.close()


def sleepy(x: int) -> int:
    import time

    time.sleep(20)
    return x * 3


def _leased(dbfile: str) -> int:
    import os

    if not os.path.exists(dbfile):
        return 0
    with sheepdog.Storage(dbfile) as storage:
        if not storage.list_requests():
            return 0
        return storage.task_counts(1).get("leased", 0)


def test_a_preempted_job_is_run_again_with_the_reason(
    config: dict[str, Any], ssh: paramiko.SSHClient
) -> None:
    cfg = dict(config, queue="main", workers=2, batch=1, lease_s=5.0, timeout_s=400)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["results"] = sheepdog.map(sleepy, range(2), cfg, verbose=False)
        except BaseException as exc:  # the test reports it
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    try:
        deadline = time.monotonic() + 180
        while _leased(cfg["dbfile"]) < 2:
            assert thread.is_alive(), outcome
            assert time.monotonic() < deadline, "the map's two tasks never ran"
            time.sleep(0.5)
        # Every CPU of every node, in the partition that preempts main: the map's job goes.
        nodes = len(check(ssh, "sinfo -h -N -p urgent -o %N").split())
        per_node = int(check(ssh, "sinfo -h -p urgent -o %c").strip().rstrip("+"))
        urgent = check(
            ssh,
            f"sbatch --parsable -p urgent -N {nodes} --ntasks-per-node=1 -c {per_node} "
            "-o /dev/null --wrap 'sleep 2'",
        ).strip()
        wait_for_slurm_job(ssh, urgent, timeout=120)
        thread.join(timeout=420)
        assert not thread.is_alive(), "map did not return after its job was preempted"
    finally:
        thread.join(timeout=420)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["results"] == [0, 3]
    with sheepdog.Storage(cfg["dbfile"]) as storage:
        jobs = storage.get_jobs(1)
        attempts = [storage.get_task(1, i)["attempts"] for i in (1, 2)]
    assert len(jobs) >= 2, jobs  # the preempted job, then the one that ran the tasks again
    assert any(a >= 1 for a in attempts), attempts
    reasons = [job["info"].get("why", "") for job in jobs[1:]]
    assert any("preempted by Slurm" in why for why in reasons), [j["info"] for j in jobs]
