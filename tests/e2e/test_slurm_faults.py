"""What only Slurm does to a running map: a job PREEMPTED, a job whose node fails (NODE_FAIL).

The test cluster's partition ``urgent`` preempts ``main`` (PreemptMode=CANCEL, see
docker/slurm/slurm-setup and test_slurm_cluster.py): the preempted array tasks end in state
PREEMPTED, and sheepdog must run their tasks again and say why the job ended. A node that fails
is a compute node's container frozen with ``docker pause`` (its slurmd and workers stop) and set
DOWN with ``scontrol`` at once, as slurmctld itself would after SlurmdTimeout: its array tasks
end NODE_FAIL. (TIMEOUT, a job killed at its ``--time``, is tested on either scheduler in
test_run_limit_e2e.py.)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import paramiko
import pytest
from cluster_fixture import (
    DOCKER_NODES,
    check,
    map_in_thread,
    ssh_connect,
    wait_for_slurm_job,
)

import sheepdog
from sheepdog.poll import poll_until

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


def _assert_run_again(cfg: dict[str, Any], outcome: dict[str, Any], reason: str) -> None:
    """The map returned every result, and its work ran again in a later job, for ``reason``."""
    assert "error" not in outcome, outcome.get("error")
    assert outcome["results"] == [0, 3]
    with sheepdog.Storage(cfg["dbfile"]) as storage:
        jobs = storage.get_jobs(1)
        attempts = [storage.get_task(1, i)["attempts"] for i in (1, 2)]
    assert len(jobs) >= 2, jobs  # the job that was lost, then the one that ran it again
    assert any(a >= 1 for a in attempts), attempts
    reasons = [(job.why or "") for job in jobs[1:]]
    assert any(reason in why for why in reasons), [j.info for j in jobs]


def test_a_preempted_job_is_run_again_with_the_reason(
    config: dict[str, Any], ssh: paramiko.SSHClient
) -> None:
    cfg = dict(config, queue="main", workers=2, batch=1, lease_s=5.0, timeout_s=400)
    thread, outcome = map_in_thread(sleepy, range(2), cfg)
    try:
        def both_leased() -> bool:
            if _leased(cfg["dbfile"]) >= 2:
                return True
            # A map that ended will lease nothing more: fail now, with what it returned.
            assert thread.is_alive(), outcome
            return False

        assert poll_until(both_leased, timeout_s=180, interval_s=0.5), (
            "the map's two tasks never ran"
        )
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
    _assert_run_again(cfg, outcome, "preempted by Slurm")


def _usable(ssh: paramiko.SSHClient, node: str) -> bool:
    """Whether Slurm would start jobs on ``node`` now (responding, not down or drained)."""
    state = check(ssh, f"sinfo -h -N -n {node} -o %t").split()
    return bool(state) and state[0] in ("idle", "mix", "alloc")


def _scontrol(*args: str) -> None:
    """Run ``scontrol`` as root on the controller: node states are an administrator's."""
    done = DOCKER_NODES["controller"].get_wrapped_container().exec_run(
        ["scontrol", *args], user="root"
    )
    assert done.exit_code == 0, done.output


def _fail(node: str) -> None:
    """Freeze ``node``'s container and have Slurm declare the node down.

    slurmctld would declare a silent node down itself after SlurmdTimeout (30 s here), later
    than sheepdog moves on from workers that stopped calling in; setting it DOWN now makes
    NODE_FAIL, and not that, the reason the job ends.
    """
    DOCKER_NODES[node].get_wrapped_container().pause()
    _scontrol("update", f"NodeName={node}", "State=DOWN", "Reason=sheepdog test: node frozen")


def _restore(ssh: paramiko.SSHClient, node: str) -> None:
    """Thaw ``node`` and wait until Slurm runs jobs on it again, for the tests after this one."""
    container = DOCKER_NODES[node].get_wrapped_container()
    container.reload()
    if container.status == "paused":
        container.unpause()
    # ReturnToService=2 takes the node back when it answers; RESUME if it has not.
    if not poll_until(lambda: _usable(ssh, node), timeout_s=30, interval_s=1.0):
        _scontrol("update", f"NodeName={node}", "State=RESUME")
    assert poll_until(lambda: _usable(ssh, node), timeout_s=90, interval_s=1.0), (
        f"{node} did not come back: " + check(ssh, f"sinfo -h -N -n {node} -o '%t %E'")
    )


def test_a_job_whose_node_fails_is_run_again_with_the_reason(
    config: dict[str, Any], ssh: paramiko.SSHClient
) -> None:
    # --no-requeue: else Slurm requeues the array task itself (JobRequeue=1, its default), and
    # the job never leaves the queue; here it must end NODE_FAIL and sheepdog run it again.
    # tasks_per_worker=1: the other node's worker ends after its own task, so the job leaves
    # the queue and is run again; else it may take the lost task over once its lease expires
    # (the map still returns everything, but nothing is run again for the test to see).
    cfg = dict(config, queue="main", workers=2, batch=1, lease_s=5.0, timeout_s=400,
               tasks_per_worker=1, scheduler_opts=["--no-requeue"])
    thread, outcome = map_in_thread(sleepy, range(2), cfg)
    failed: str | None = None
    try:
        assert poll_until(lambda: _leased(cfg["dbfile"]) == 2 or not thread.is_alive(),
                          timeout_s=180, interval_s=0.5), "the map's two tasks never ran"
        assert thread.is_alive(), outcome
        with sheepdog.Storage(cfg["dbfile"]) as storage:
            (job,) = storage.get_jobs(1)
        nodes = check(ssh, f"squeue -h -j {job.job_id} -t RUNNING -o %N").split()
        assert nodes, f"job {job.job_id} runs nowhere while its tasks are leased"
        failed = nodes[0]
        _fail(failed)
        thread.join(timeout=420)
        assert not thread.is_alive(), "map did not return after its job's node failed"
    finally:
        if failed is not None:
            _restore(ssh, failed)
        thread.join(timeout=420)
    _assert_run_again(cfg, outcome, f"Slurm lost its node on {failed} (NODE_FAIL)")
