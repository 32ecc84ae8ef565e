"""Smoke tests of the Slurm test cluster itself, over SSH as sheepdog will use it.

They check what a Slurm scheduler for sheepdog relies on: an ordinary user submits an array job
with ``sbatch --parsable`` over a non-interactive SSH session, every task runs (spread over the
compute nodes), ``squeue`` and ``scontrol show job`` describe the job in forms we can parse,
``scontrol show config`` gives MaxArraySize, a job in the ``urgent`` partition preempts jobs in
``main`` (so later tests can produce PREEMPTED on purpose), and a task can call back over HTTP to
the machine that submitted it. They run only with ``--cluster=slurm``.
"""

from __future__ import annotations

import re
import shlex
import time
import uuid
from collections.abc import Iterator
from typing import Any

import paramiko
import pytest
from cluster_fixture import (
    SLURM_FINAL_STATES,
    check,
    recording_http_server,
    run,
    ssh_connect,
    task_outputs,
    task_script,
    wait_for_slurm_job,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slurm]

TASKS = 10

@pytest.fixture(scope="module")
def ssh(cluster: dict[str, Any]) -> Iterator[paramiko.SSHClient]:
    assert cluster.get("scheduler") == "slurm", f"not a Slurm cluster: {cluster}"
    client = ssh_connect(cluster)
    yield client
    client.close()


def submit(
    ssh: paramiko.SSHClient, cluster: dict[str, Any], tasks: int, args: str = ""
) -> tuple[str, str]:
    """Copy the task script to a fresh directory on the controller and sbatch it as an array job.

    Returns (job id, directory).
    """
    directory = check(ssh, "echo $HOME").strip() + f"/.sheepdog/smoke-{uuid.uuid4().hex[:8]}"
    check(ssh, f"mkdir -p {shlex.quote(directory)}")
    with ssh.open_sftp() as sftp:
        with sftp.open(f"{directory}/task.py", "w") as f:
            f.write(f"#!{cluster['shell']}\n" + task_script("SLURM_ARRAY_TASK_ID"))
    d = shlex.quote(directory)
    out = check(
        ssh,
        f"sbatch --parsable --job-name=smoke --array=1-{tasks} --chdir={d} "
        f"--output={d}/smoke.o%A.%a --error={d}/smoke.e%A.%a {d}/task.py {args}",
    )
    # --parsable prints "jobid" or "jobid;cluster".
    job_id = out.strip().split(";")[0]
    assert job_id.isdigit(), f"sbatch --parsable printed {out!r}"
    return job_id, directory


@pytest.fixture(scope="module")
def array_job(ssh: paramiko.SSHClient, cluster: dict[str, Any]) -> tuple[str, dict[int, str]]:
    """Run a 10-task array job to its end; return its id and where each task ran."""
    job_id, directory = submit(ssh, cluster, TASKS)
    wait_for_slurm_job(ssh, job_id)
    return job_id, task_outputs(ssh, directory, job_id)


def test_array_job_gives_every_output(array_job: tuple[str, dict[int, str]]) -> None:
    _, ran_on = array_job
    assert sorted(ran_on) == list(range(1, TASKS + 1))


def test_array_tasks_spread_over_compute_nodes(
    ssh: paramiko.SSHClient, array_job: tuple[str, dict[int, str]]
) -> None:
    nodes = check(ssh, "sinfo -h -N -o %N").split()
    assert len(set(nodes)) >= 2, f"this test needs two or more compute nodes; sinfo shows {nodes}"
    _, ran_on = array_job
    assert len(set(ran_on.values())) >= 2, f"all tasks ran on one node: {ran_on}"
    assert set(ran_on.values()) <= set(nodes), f"tasks ran outside the compute nodes: {ran_on}"


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


def test_a_job_in_urgent_preempts_jobs_in_main(ssh: paramiko.SSHClient) -> None:
    # %C: allocated/idle/other/total CPUs of the partition; %c: CPUs per node.
    cpus = int(check(ssh, "sinfo -h -p main -o %C").strip().split("/")[-1])
    per_node = int(check(ssh, "sinfo -h -p main -o %c").strip().rstrip("+"))
    # Fill every CPU of partition main, one CPU per job.
    hold = [
        check(ssh, "sbatch --parsable -p main -n 1 -o /dev/null --wrap 'sleep 300'").strip()
        for _ in range(cpus)
    ]
    try:
        deadline = time.monotonic() + 60
        while set(job_states(ssh, hold).values()) != {"RUNNING"}:
            assert time.monotonic() < deadline, (
                f"main jobs not all running: {job_states(ssh, hold)}"
            )
            time.sleep(0.5)
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
    deadline = time.monotonic() + 60
    while not set(job_states(ssh, hold).values()) <= SLURM_FINAL_STATES:
        assert time.monotonic() < deadline, f"main jobs not cancelled: {job_states(ssh, hold)}"
        time.sleep(0.5)


def test_task_calls_back_over_http(ssh: paramiko.SSHClient, cluster: dict[str, Any]) -> None:
    with recording_http_server() as (port, seen):
        url = f"http://{cluster['localhost']}:{port}"
        job_id, directory = submit(ssh, cluster, 3, shlex.quote(url))
        wait_for_slurm_job(ssh, job_id)
        status, errors, _ = run(ssh, f"cat {shlex.quote(directory)}/smoke.e{job_id}.*")
    assert sorted(seen) == ["/task/1", "/task/2", "/task/3"], (
        f"the server saw {seen}; task errors:\n{errors}"
    )
