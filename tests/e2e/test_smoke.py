"""Smoke tests of the cluster itself (Grid Engine or Slurm), over SSH as sheepdog uses it.

They check what sheepdog relies on: an ordinary user submits an array job over a non-interactive
SSH session (``qsub -t`` or ``sbatch --array``), every task runs (spread over the execution
nodes), and a task can call back over HTTP to the machine that submitted it. What only Slurm's
commands show is checked in test_slurm_cluster.py.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from typing import Any

import paramiko
import pytest
from cluster_fixture import (
    compute_nodes,
    parse_task_outputs,
    recording_http_server,
    run,
    ssh_connect,
    submit_smoke_array,
    task_outputs,
    wait_for_array,
)

pytestmark = pytest.mark.e2e

TASKS = 10

@pytest.fixture(scope="module")
def ssh(cluster: dict[str, Any]) -> Iterator[paramiko.SSHClient]:
    client = ssh_connect(cluster)
    yield client
    client.close()


def test_a_task_error_fails_the_check_even_when_other_tasks_printed() -> None:
    # Before, `assert not errors.strip() or found` let it through once any task printed.
    printed = '{"task": 1, "host": "exec1"}\n'
    with pytest.raises(AssertionError, match="tasks wrote errors"):
        parse_task_outputs(printed, "Traceback (most recent call last):\n  ...\nOSError: boom\n")
    assert parse_task_outputs(printed, "") == {1: "exec1"}


@pytest.fixture(scope="module")
def array_run(ssh: paramiko.SSHClient, cluster: dict[str, Any]) -> dict[int, str]:
    job_id, directory = submit_smoke_array(ssh, cluster, TASKS)
    wait_for_array(ssh, cluster, job_id)
    return task_outputs(ssh, directory, job_id)


def test_array_job_gives_every_output(array_run: dict[int, str]) -> None:
    assert sorted(array_run) == list(range(1, TASKS + 1))


def test_array_tasks_spread_over_exec_nodes(
    ssh: paramiko.SSHClient, cluster: dict[str, Any], array_run: dict[int, str]
) -> None:
    exec_hosts = compute_nodes(ssh, cluster)
    assert len(exec_hosts) >= 2, (
        f"this test needs a cluster with two or more execution hosts; it has {exec_hosts}"
    )
    assert len(set(array_run.values())) >= 2, f"all tasks ran on one node: {array_run}"


def test_task_calls_back_over_http(ssh: paramiko.SSHClient, cluster: dict[str, Any]) -> None:
    with recording_http_server() as (port, seen):
        url = f"http://{cluster['localhost']}:{port}"
        job_id, directory = submit_smoke_array(ssh, cluster, 3, shlex.quote(url))
        wait_for_array(ssh, cluster, job_id)
        status, errors, _ = run(ssh, f"cat {shlex.quote(directory)}/smoke.e{job_id}.*")
    assert sorted(seen) == ["/task/1", "/task/2", "/task/3"], (
        f"the server saw {seen}; task errors:\n{errors}"
    )
