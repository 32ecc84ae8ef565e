"""The laptop sleeps, on a real Grid Engine: workers spool, then ``attach`` brings it all back.

The server is stopped mid-map for longer than the workers' retry time (set
short here), as when a laptop's lid closes: every worker gives up, writes what
it finished to the spool beside the job file on the cluster's shared
``ssh_dir``, and exits 8. Then ``attach`` (as a new process would) serves
again, collects the spool over SFTP, resubmits the open work and waits.
"""

from __future__ import annotations

from typing import Any

import pytest

import sheepdog
from sheepdog import Config
from sheepdog.poll import poll_until
from sheepdog.scheduler import open_scheduler
from sheepdog.spool import spool_directory
from sheepdog.storage import Storage
from sheepdog.stored_request import StoredRequest

pytestmark = pytest.mark.e2e

WAIT_S = 300.0


def slow_square(x: int) -> int:
    import time

    time.sleep(1.0)
    return x * x


def test_the_laptop_sleeps_and_attach_brings_every_result_back(config: dict[str, Any]) -> None:
    n = 12
    cfg = Config.from_mapping(dict(config, workers=2, batch=2, worker_retry_s=5, lease_s=10))
    rid = sheepdog.map_async(slow_square, list(range(1, n + 1)), cfg)
    with Storage(cfg.dbfile) as storage, open_scheduler(cfg) as scheduler:
        assert poll_until(lambda: storage.count_results(rid) >= 2, timeout_s=WAIT_S), (
            "no result came in"
        )
        server = StoredRequest(storage, rid).own_server()
        assert server is not None
        server.stop()  # the lid closes: no server, no watcher
        job_ids = [job.job_id for job in storage.get_jobs(rid)]

        def gone() -> bool:
            listing = scheduler.status(job_ids)
            return listing is not None and not any(job in listing for job in job_ids)

        assert poll_until(gone, timeout_s=WAIT_S, interval_s=1.0, max_interval_s=5.0), (
            "the workers did not give up"
        )
        directory = spool_directory(storage, cfg, scheduler.host, rid)
        spooled = [name for name in scheduler.host.list_dir(directory) or []
                   if name.endswith(".json")]
        assert spooled, f"no worker spooled a result in {directory}"
        before = storage.count_results(rid)
    # The request's own stored config is enough: only the database is named here.
    results = sheepdog.attach(rid, {"dbfile": cfg.dbfile, "host": cfg.host}, verbose=False,
                              timeout_s=WAIT_S)
    assert results == [(x, x * x) for x in range(1, n + 1)]
    with Storage(cfg.dbfile) as storage, open_scheduler(cfg) as scheduler:
        counts = {k: v for k, v in storage.task_counts(rid).items() if v}
        assert counts == {"done": n}
        assert scheduler.host.list_dir(directory) == []  # collected, then deleted
    assert before + len(spooled) <= n
