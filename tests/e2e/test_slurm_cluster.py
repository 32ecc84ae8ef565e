"""Smoke tests of what only the Slurm test cluster has, over SSH as sheepdog uses it.

test_smoke.py checks on either scheduler that an array job runs every task, spread over the
nodes, and that tasks call back over HTTP. Here: ``squeue`` and ``scontrol show job`` describe an
array job (``sbatch --parsable --array``) in forms we can parse, ``scontrol show config`` gives
MaxArraySize, and a job in the ``urgent`` partition preempts jobs in ``main`` (so later tests can
produce PREEMPTED on purpose). They run only with ``--cluster=slurm``, on a second Slurm cluster
without accounting (scontrol keeps a finished job for 300 s), as some sites run Slurm; the last
test checks that on the suite's own cluster, which keeps accounting, ``sacct`` describes a job
slurmctld has already forgotten, as most sites answer long before a long map ends.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import paramiko
import pytest
from cluster_fixture import (
    DOCKER_NODES,
    SLURM_FINAL_STATES,
    check,
    delete_all_jobs,
    open_cluster_scheduler,
    run,
    ssh_connect,
    submit_smoke_array,
    task_outputs,
    wait_for_slurm_job,
)

from sheepdog.poll import poll_until
from sheepdog.scheduler.slurm import INVALID_JOB_ID

pytestmark = [pytest.mark.e2e, pytest.mark.slurm]

TASKS = 10

@pytest.fixture(scope="module")
def plain(slurm_without_accounting: dict[str, Any]) -> dict[str, Any]:
    """The Slurm cluster without accounting: scontrol keeps finished jobs for 300 s."""
    return slurm_without_accounting


@pytest.fixture(scope="module")
def ssh(plain: dict[str, Any]) -> Iterator[paramiko.SSHClient]:
    assert plain.get("scheduler") == "slurm", f"not a Slurm cluster: {plain}"
    client = ssh_connect(plain)
    yield client
    client.close()


@pytest.fixture(scope="module")
def array_job(ssh: paramiko.SSHClient, plain: dict[str, Any]) -> tuple[str, dict[int, str]]:
    """Run a 10-task array job to its end; return its id and where each task ran."""
    job_id, directory = submit_smoke_array(ssh, plain, TASKS)
    wait_for_slurm_job(ssh, job_id)
    return job_id, task_outputs(ssh, directory, job_id)


def test_squeue_describes_the_job_by_id(
    ssh: paramiko.SSHClient, array_job: tuple[str, dict[int, str]]
) -> None:
    job_id, _ = array_job
    # %i: "<array job id>_<task>", %F: the array job id, %K: the task index, %T: the state.
    out = check(ssh, f"squeue -h -t all -j {job_id} -o '%i|%F|%K|%T'")
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    assert sorted(int(task) for _, _, task, _ in rows) == list(range(1, TASKS + 1)), out
    assert {name for name, _, _, _ in rows} == {f"{job_id}_{task}" for task in range(1, 11)}, out
    assert {array_id for _, array_id, _, _ in rows} == {job_id}, out
    assert {state for *_, state in rows} == {"COMPLETED"}, out


def test_scontrol_show_job_gives_state_and_exit_code(
    ssh: paramiko.SSHClient, array_job: tuple[str, dict[int, str]]
) -> None:
    job_id, ran_on = array_job
    # One record per array task, blank-line separated; -o puts each on one line of Key=Value.
    out = check(ssh, f"scontrol -o show job {job_id}")
    records = []
    for line in out.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if fields:
            records.append(fields)
    assert {int(r["ArrayTaskId"]) for r in records} == set(range(1, TASKS + 1)), out
    for r in records:
        assert r["ArrayJobId"] == job_id, r
        assert r["JobState"] == "COMPLETED", r
        assert r["ExitCode"] == "0:0", r
        assert r["BatchHost"] == ran_on[int(r["ArrayTaskId"])], r


def test_scontrol_show_config_gives_max_array_size(ssh: paramiko.SSHClient) -> None:
    out = check(ssh, "scontrol show config")
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)\s*$", out, re.MULTILINE)
    assert match, f"no MaxArraySize in scontrol show config:\n{out}"
    # The cluster is configured for the 10,000-tiny-tasks benchmark (indices 1..10000).
    assert int(match.group(1)) == 10001


def job_states(ssh: paramiko.SSHClient, job_ids: list[str]) -> dict[str, str]:
    """Map each job id to its state, from one squeue call (all states, by job id)."""
    out = check(ssh, f"squeue -h -t all -j {','.join(job_ids)} -o '%i %T'")
    return dict(line.split() for line in out.splitlines() if line.strip())


def test_a_job_in_urgent_preempts_jobs_in_main(
    ssh: paramiko.SSHClient, plain: dict[str, Any]
) -> None:
    # The test fills every CPU itself: no job of earlier tests (a worker still waiting for a
    # server that has gone) may hold one.
    delete_all_jobs(plain)
    left = ""

    def no_jobs_left() -> bool:
        nonlocal left
        left = check(ssh, 'squeue -h -u "$(id -un)" -o "%i %T"').strip()
        return not left

    assert poll_until(no_jobs_left, timeout_s=60, interval_s=0.5), (
        f"earlier jobs still there:\n{left}"
    )
    # %C: allocated/idle/other/total CPUs of the partition; %c: CPUs per node.
    cpus = int(check(ssh, "sinfo -h -p main -o %C").strip().split("/")[-1])
    per_node = int(check(ssh, "sinfo -h -p main -o %c").strip().rstrip("+"))
    # Fill every CPU of partition main, one CPU per job.
    hold = [
        check(ssh, "sbatch --parsable -p main -n 1 -o /dev/null --wrap 'sleep 300'").strip()
        for _ in range(cpus)
    ]
    try:
        assert poll_until(lambda: set(job_states(ssh, hold).values()) == {"RUNNING"},
                          timeout_s=60, interval_s=0.5), (
            f"main jobs not all running: {job_states(ssh, hold)}"
        )
        urgent = check(
            ssh, f"sbatch --parsable -p urgent -N 1 -c {per_node} -o /dev/null --wrap 'sleep 1'"
        ).strip()
        wait_for_slurm_job(ssh, urgent, timeout=60)
        assert job_states(ssh, [urgent]) == {urgent: "COMPLETED"}
        states = job_states(ssh, hold)
        preempted = [job for job, state in states.items() if state == "PREEMPTED"]
        # One node's worth of main jobs gave up their CPUs; the rest kept running.
        assert len(preempted) == per_node, states
        assert set(states.values()) == {"PREEMPTED", "RUNNING"}, states
        record = check(ssh, f"scontrol -o show job {preempted[0]}")
        assert "JobState=PREEMPTED" in record, record
    finally:
        run(ssh, f"scancel {' '.join(hold)}")
    assert poll_until(lambda: set(job_states(ssh, hold).values()) <= SLURM_FINAL_STATES,
                      timeout_s=60, interval_s=0.5), (
        f"main jobs not cancelled: {job_states(ssh, hold)}"
    )


def test_sacct_tells_why_a_task_failed_after_slurmctld_forgot_the_job(
    cluster: dict[str, Any],
) -> None:
    client = ssh_connect(cluster)
    try:
        # Task 1 ends well, task 2 exits with status 3.
        job_id = check(
            client, "sbatch --parsable --array=1-2 -o /dev/null "
            "--wrap 'exit $((SLURM_ARRAY_TASK_ID == 2 ? 3 : 0))'",
        ).strip().split(";")[0]
        wait_for_slurm_job(client, job_id)
        said = ""

        def forgotten() -> bool:
            nonlocal said
            status, out, err = run(client, f"squeue -h -j {job_id}")
            said = f"squeue exited with {status}: {out}{err}"
            return status != 0 and INVALID_JOB_ID.match(err.strip()) is not None

        # MinJobAge=5 s on this cluster; slurmctld purges old jobs every few seconds more.
        assert poll_until(forgotten, timeout_s=120, interval_s=1), said
    finally:
        client.close()
    with open_cluster_scheduler(cluster) as scheduler:
        assert scheduler.slurm_config().accounting
        why = scheduler.accounting(job_id)
    assert "status 3" in why, why


def test_the_second_cluster_leaves_the_session_clusters_nodes_their_names(
    plain: dict[str, Any], cluster: dict[str, Any],
) -> None:
    # The tests after this module freeze, reconfigure and read nodes by name (DOCKER_NODES):
    # with the second cluster up, those names must still be the session cluster's.
    login = DOCKER_NODES["controller"]
    assert int(login.get_exposed_port(22)) == int(cluster["ssh_port"]) != int(plain["ssh_port"])
