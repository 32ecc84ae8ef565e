"""A request that needs more array tasks than the cluster's max_aj_tasks runs as several jobs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from cluster_fixture import DOCKER_NODES

import sheepdog
from sheepdog.config import as_config
from sheepdog.scheduler import GridEngine, open_remote
from sheepdog.storage import Storage

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.gridengine(
        "lowers Grid Engine's max_aj_tasks with qconf as its admin; the Slurm test cluster's "
        "MaxArraySize is checked in test_slurm_cluster.py"
    ),
]

#: The low limit set on the test cluster for this test.
MAX_AJ_TASKS = 2

#: Grid Engine's environment for root in the head container (see docker/sge-setup).
_SGE_ENV = (
    "export SGE_ROOT=/var/lib/gridengine SGE_CELL=default; "
    ". $SGE_ROOT/$SGE_CELL/common/settings.sh; "
)


def _as_admin(script: str) -> str:
    """Run a shell script as root (the SGE admin) on the Docker cluster's head node."""
    head = DOCKER_NODES.get("head")
    assert head is not None, (
        "this test changes the cluster's global configuration as the Grid Engine admin: "
        "run it with --cluster=docker"
    )
    done = head.get_wrapped_container().exec_run(["bash", "-c", _SGE_ENV + script], user="root")
    output = done.output.decode(errors="replace")
    assert done.exit_code == 0, f"{script}\nexited {done.exit_code}: {output}"
    return str(output)


def _set_max_aj_tasks(value: str) -> None:
    _as_admin(
        "d=$(mktemp -d) && qconf -sconf global"
        f" | sed -e 's/^max_aj_tasks .*/max_aj_tasks                 {value}/' >$d/global"
        " && qconf -Mconf $d/global >/dev/null && rm -rf $d"
    )


@pytest.fixture
def low_max_aj_tasks(cluster: dict[str, Any]) -> Iterator[str]:
    """max_aj_tasks set to MAX_AJ_TASKS for the test; the old value restored afterwards."""
    before = _as_admin("qconf -sconf global | sed -n 's/^max_aj_tasks *//p'").strip()
    assert before.isdigit(), before
    _set_max_aj_tasks(str(MAX_AJ_TASKS))
    try:
        yield before
    finally:
        _set_max_aj_tasks(before)
        after = _as_admin("qconf -sconf global | sed -n 's/^max_aj_tasks *//p'").strip()
        assert after == before


def plus_one(x: int) -> int:
    return x + 1


def test_more_workers_than_max_aj_tasks_run_as_several_jobs(
    config: dict[str, Any], low_max_aj_tasks: str
) -> None:
    cfg = as_config(dict(config, workers=5, batch=1, timeout_s=300))
    with open_remote(cfg) as remote:
        assert GridEngine(remote).array_limits().max_tasks == MAX_AJ_TASKS
        # The limit is real: one job of five array tasks is refused.
        refused = remote.run("echo true | qsub -terse -t 1-5", check=False)
        assert refused.exit_status != 0, refused
    results = sheepdog.map(plus_one, range(12), cfg, verbose=False)
    assert results == [x + 1 for x in range(12)]
    with Storage(cfg.dbfile) as storage:
        rid = max(r["id"] for r in storage.list_requests())
        jobs = storage.get_jobs(rid)
        counts = storage.task_counts(rid)
    assert counts["done"] == 12
    assert sum(counts.values()) == 12  # nothing pending, leased, failed or cancelled
    assert [job.array_size for job in jobs] == [2, 2, 1]
    assert [job.part for job in jobs] == [1, 2, 3]
    assert len({job.job_id for job in jobs}) == 3
