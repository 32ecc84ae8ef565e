"""Smoke tests of the Grid Engine cluster itself, over SSH as sheepdog uses it.

They check what sheepdog relies on: an ordinary user submits an array job over a non-interactive
SSH session, every task runs (spread over the execution nodes), and a task can call back over
HTTP to the machine that submitted it.
"""

from __future__ import annotations

import shlex
import uuid
from collections.abc import Iterator
from typing import Any

import paramiko
import pytest
from cluster_fixture import (
    check,
    parse_task_outputs,
    recording_http_server,
    run,
    ssh_connect,
    task_outputs,
    task_script,
    wait_for_job,
)

pytestmark = pytest.mark.e2e

TASKS = 10

@pytest.fixture(scope="module")
def ssh(cluster: dict[str, Any]) -> Iterator[paramiko.SSHClient]:
    client = ssh_connect(cluster)
    yield client
    client.close()


def submit(
    ssh: paramiko.SSHClient, cluster: dict[str, Any], tasks: int, args: str = ""
) -> tuple[str, str]:
    """Copy the task script to a fresh directory on the head node and qsub it as an array job.

    Returns (job id, directory).
    """
    directory = check(ssh, "echo $HOME").strip() + f"/.sheepdog/smoke-{uuid.uuid4().hex[:8]}"
    check(ssh, f"mkdir -p {shlex.quote(directory)}")
    with ssh.open_sftp() as sftp:
        with sftp.open(f"{directory}/task.py", "w") as f:
            f.write(task_script("SGE_TASK_ID"))
    d = shlex.quote(directory)
    out = check(
        ssh,
        f"qsub -terse -N smoke -t 1-{tasks} -S {shlex.quote(cluster['shell'])} "
        f"-wd {d} -o {d}/ -e {d}/ {d}/task.py {args}",
    )
    job_id = out.strip().split(".")[0]
    assert job_id.isdigit(), f"qsub -terse printed {out!r}"
    return job_id, directory


def test_a_task_error_fails_the_check_even_when_other_tasks_printed() -> None:
    # Before, `assert not errors.strip() or found` let it through once any task printed.
    printed = '{"task": 1, "host": "exec1"}\n'
    with pytest.raises(AssertionError, match="tasks wrote errors"):
        parse_task_outputs(printed, "Traceback (most recent call last):\n  ...\nOSError: boom\n")
    assert parse_task_outputs(printed, "") == {1: "exec1"}


@pytest.fixture(scope="module")
def array_run(ssh: paramiko.SSHClient, cluster: dict[str, Any]) -> dict[int, str]:
    job_id, directory = submit(ssh, cluster, TASKS)
    wait_for_job(ssh, job_id)
    return task_outputs(ssh, directory, job_id)


def test_array_job_gives_every_output(array_run: dict[int, str]) -> None:
    assert sorted(array_run) == list(range(1, TASKS + 1))


def test_array_tasks_spread_over_exec_nodes(
    ssh: paramiko.SSHClient, array_run: dict[int, str]
) -> None:
    exec_hosts = check(ssh, "qconf -sel").split()
    assert len(exec_hosts) >= 2, (
        f"this test needs a cluster with two or more execution hosts; it has {exec_hosts}"
    )
    assert len(set(array_run.values())) >= 2, f"all tasks ran on one node: {array_run}"


def test_task_calls_back_over_http(ssh: paramiko.SSHClient, cluster: dict[str, Any]) -> None:
    with recording_http_server() as (port, seen):
        url = f"http://{cluster['localhost']}:{port}"
        job_id, directory = submit(ssh, cluster, 3, shlex.quote(url))
        wait_for_job(ssh, job_id)
        status, errors, _ = run(ssh, f"cat {shlex.quote(directory)}/smoke.e{job_id}.*")
    assert sorted(seen) == ["/task/1", "/task/2", "/task/3"], (
        f"the server saw {seen}; task errors:\n{errors}"
    )
