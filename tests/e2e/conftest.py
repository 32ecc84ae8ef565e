"""Fixtures for the end-to-end tests on a real cluster, Grid Engine or Slurm.

The ``cluster`` fixture starts or finds the cluster that ``--cluster`` names (cluster_fixture.py
does the work; the option and which tests each choice runs are in tests/conftest.py). Only
the end-to-end tests import cluster_fixture: this directory is on ``sys.path`` only once
pytest collects something in it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster_fixture import (
    FIREWALLED_NODES,
    delete_all_jobs,
    delete_test_jobs,
    docker_cluster,
    native_cluster,
    slurm_cluster,
    ssh_connect,
    ssh_url_cluster,
    wait_until_usable,
)

from sheepdog.poll import poll_until
from sheepdog.server import registry


@pytest.fixture(scope="session")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """Connection details of a running cluster, in sheepdog's config keys.

    It fails (never skips) when the cluster cannot be started or reached.
    """
    choice = request.config.getoption("--cluster")
    if choice == "docker":
        with docker_cluster(tmp_path_factory.mktemp("cluster")) as details:
            yield details
    elif choice == "slurm":
        with slurm_cluster(tmp_path_factory.mktemp("cluster")) as details:
            yield details
    elif choice == "native":
        details = native_cluster()
        wait_until_usable(details)
        yield details
    elif choice.startswith("ssh://"):
        details = ssh_url_cluster(
            choice,
            {
                key: request.config.getoption(f"--cluster-{key.replace('_', '-')}")
                for key in ("keyfile", "known_hosts", "localhost", "shell")
            },
        )
        wait_until_usable(details, timeout=60)
        yield details
    else:
        raise pytest.UsageError(
            f"--cluster={choice}: expected docker, native, slurm or ssh://user@host:port"
        )


@pytest.fixture(scope="session")
def firewalled_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A Docker Grid Engine cluster from which no node can reach this machine.

    Execution nodes reach the head node; this machine reaches the head node's SSH; nothing
    on the cluster reaches this machine (see docker_cluster).
    """
    with docker_cluster(tmp_path_factory.mktemp("firewalled"), firewalled=True) as details:
        yield details


@pytest.fixture
def config(cluster: dict[str, Any], tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The cluster's sheepdog config, with a database of the test's own.

    The servers started for that database are stopped afterwards, so a long session
    does not keep one gunicorn per test.
    """
    dbfile = str(tmp_path / "sheepdog.sqlite")
    yield dict(cluster, dbfile=dbfile)
    delete_test_jobs(cluster, dbfile)
    registry.stop(dbfile)


@pytest.fixture(scope="session")
def slurm_without_accounting(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """A second Slurm cluster, without slurmdbd, as some sites run Slurm.

    scontrol knows a finished job for MinJobAge=300 s and sacct does not answer. The ``cluster``
    of ``--cluster=slurm`` keeps accounting and forgets a finished job after 5 s.
    """
    choice = request.config.getoption("--cluster")
    assert choice == "slurm", f"a Slurm-only fixture used with --cluster={choice}"
    with slurm_cluster(tmp_path_factory.mktemp("slurm-plain"), accounting=False,
                       primary=False) as details:
        yield details


@pytest.fixture(scope="session", autouse=True)
def no_stray_jobs(cluster: dict[str, Any], request: pytest.FixtureRequest) -> Iterator[None]:
    """Delete the test user's sheepdog jobs before and after the session, on our own clusters.

    A test that fails mid-map leaves array tasks behind that would hold the cluster's
    slots while they wait for a server that has gone; the next run must not inherit them.
    On a cluster of yours (``--cluster=ssh://...``) nothing is deleted.
    """
    ours = request.config.getoption("--cluster") in ("docker", "native", "slurm")
    if ours:
        delete_all_jobs(cluster)
    yield
    if ours:
        delete_all_jobs(cluster)


@pytest.fixture
def walled(firewalled_cluster: dict[str, Any], tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The firewalled cluster's config with a database of the test's own; servers stopped after."""
    dbfile = str(tmp_path / "sheepdog.sqlite")
    yield dict(firewalled_cluster, dbfile=dbfile)
    delete_test_jobs(firewalled_cluster, dbfile)
    registry.stop(dbfile)


def _head_as_root(command: str) -> None:
    head = FIREWALLED_NODES["head"].get_wrapped_container()
    done = head.exec_run(["sh", "-c", command], user="root")
    assert done.exit_code == 0, done.output.decode(errors="replace")


def _logs_in(cluster: dict[str, Any]) -> bool:
    try:
        ssh_connect(cluster, timeout=5).close()
    except Exception:  # noqa: BLE001 - sshd restarting: refused, reset or no banner yet
        return False
    return True


def _close_master(cluster: dict[str, Any]) -> None:
    """Close sheepdog's OpenSSH master to ``cluster`` (SHEEPDOG_TEST_SSH_CLIENT=openssh): an
    sshd setting holds for new connections only, and a master opened before keeps the old."""
    from sheepdog import Config
    from sheepdog.openssh import OpenSSHRemote
    from sheepdog.scheduler import Scheduler, open_remote

    if cluster.get("ssh_client") == "openssh":
        remote = open_remote(Config.from_mapping(cluster), Scheduler)
        assert isinstance(remote, OpenSSHRemote)
        remote.logout()


@pytest.fixture
def no_forwarding(firewalled_cluster: dict[str, Any]) -> Iterator[None]:
    """The firewalled head node's sshd refuses port forwarding (new connections); undone after."""
    conf = "/etc/ssh/sshd_config.d/zz-sheepdog-test-no-forwarding.conf"
    reload = "kill -HUP $(cat /run/sshd-sheepdog-22.pid)"
    _head_as_root(f"echo 'AllowTcpForwarding no' > {conf} && {reload}")
    _close_master(firewalled_cluster)
    try:
        # sshd re-executes itself on SIGHUP: wait until it takes logins again.
        assert poll_until(lambda: _logs_in(firewalled_cluster), timeout_s=30, interval_s=0.2)
        yield
    finally:
        _head_as_root(f"rm -f {conf} && {reload}")
        _close_master(firewalled_cluster)
        assert poll_until(lambda: _logs_in(firewalled_cluster), timeout_s=30, interval_s=0.2)
