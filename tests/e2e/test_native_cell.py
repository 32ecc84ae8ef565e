"""The native Grid Engine cell shares its host with the Docker clusters' containers.

Grid Engine's execd kills, by group id, every process of its host that carries a finished job's
id from ``gid_range``, and on a native host it sees the containers' processes too. A range that
overlaps a group of our images (the Slurm image's ``slurm`` group is Debian's 64030) once made
every native array job kill the Slurm controller of a cluster running beside it.
"""

from __future__ import annotations

from typing import Any

import pytest
from cluster_fixture import (
    IMAGE,
    SLURM_IMAGE,
    _docker_engine,
    build_image,
    ssh_connect,
    submit_smoke_array,
    task_outputs,
    wait_for_array,
)

pytestmark = [pytest.mark.e2e, pytest.mark.native]


def _group_ids(engine: Any, image: str) -> list[int]:
    """Every group id that the image's /etc/group allocates."""
    text = engine.containers.run(image, ["cat", "/etc/group"], entrypoint=[], remove=True)
    return sorted({int(line.split(":")[2]) for line in text.decode().splitlines() if line})


def test_a_native_array_job_leaves_the_containers_processes_alone(
    cluster: dict[str, Any],
) -> None:
    engine = _docker_engine()
    build_image("--sge")
    build_image("--slurm")
    groups = sorted(set(_group_ids(engine, IMAGE)) | set(_group_ids(engine, SLURM_IMAGE)))
    assert 64030 in groups, "the Slurm image's slurm group is the one that was killed"
    # One process carrying every group id that our images allocate, as their daemons do.
    bystander = engine.containers.run(
        SLURM_IMAGE, ["sleep", "infinity"], entrypoint=[], detach=True, user="nobody",
        group_add=[str(g) for g in groups], labels={"sheepdog-test": "native-cell"},
    )
    try:
        client = ssh_connect(cluster)
        try:
            job_id, directory = submit_smoke_array(client, cluster, tasks=100)
            wait_for_array(client, cluster, job_id, timeout=300)
            assert len(task_outputs(client, directory, job_id)) == 100
        finally:
            client.close()
        bystander.reload()
        assert bystander.status == "running", (
            f"a 100-task native array job killed a container's process carrying group ids "
            f"{groups}: the native cell's gid_range overlaps them (ci/cluster, native_gid_range)"
        )
    finally:
        bystander.remove(force=True)
