"""Fixtures for the end-to-end tests on a real cluster, Grid Engine or Slurm."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster_fixture import delete_all_jobs

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
    ours = request.config.getoption("--cluster") in ("docker", "native", "slurm")
    if ours:
        delete_all_jobs(cluster)
    yield
    if ours:
        delete_all_jobs(cluster)
