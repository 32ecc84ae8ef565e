"""Fixtures for the end-to-end tests on a real Grid Engine."""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sheepdog import Config
from sheepdog.scheduler import open_remote
from sheepdog.server import registry


@pytest.fixture
def config(cluster: dict[str, Any], tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The cluster's sheepdog config, with a database of the test's own.

    The servers started for that database are stopped afterwards, so a long session
    does not keep one gunicorn per test.
    """
    dbfile = str(tmp_path / "sheepdog.sqlite")
    yield dict(cluster, dbfile=dbfile)
    registry.stop(dbfile)


@pytest.fixture(scope="session", autouse=True)
def no_stray_jobs(cluster: dict[str, Any], request: pytest.FixtureRequest) -> Iterator[None]:
    """Delete the test user's sheepdog jobs before and after the session, on our own clusters.

    A test that fails mid-map leaves array tasks behind that would hold the cluster's
    slots while they wait for a server that has gone; the next run must not inherit them.
    On a cluster of yours (``--cluster=ssh://...``) nothing is deleted.
    """
    ours = request.config.getoption("--cluster") in ("docker", "native")
    if ours:
        _delete_all_jobs(cluster)
    yield
    if ours:
        _delete_all_jobs(cluster)


def _delete_all_jobs(cluster: dict[str, Any]) -> None:
    config = Config.from_mapping(cluster)
    with open_remote(config) as remote:
        remote.run(
            f"qdel -u {shlex.quote(config.ssh_user)} 'sheepdog_*'", check=False, timeout_s=60
        )
