"""Run-time limits (h_rt) on the real cluster: workers stop in time, and killed work runs again."""

from __future__ import annotations

import time
from typing import Any

import pytest

import sheepdog
from sheepdog.config import as_config
from sheepdog.scheduler import open_remote
from sheepdog.scheduler.gridengine import parse_qacct
from sheepdog.storage import Storage

pytestmark = pytest.mark.e2e

#: Bound on waiting for qacct to show a finished job's records.
QACCT_WAIT_S = 60.0


def sleepy(x: int) -> int:
    import time

    time.sleep(3)
    return x * 2


def slow_the_first_time(marker: str) -> str:
    """Outlive a 20 s h_rt on the first run, as the marker in the shared home says."""
    import os
    import time

    path = os.path.expanduser(marker)
    if not os.path.exists(path):
        open(path, "w").close()
        time.sleep(60)
    return "second run"


def _accounting(config: Any, job_ids: list[str]) -> dict[str, list[Any]]:
    """qacct's records of each job, waited for until every array task has one."""
    out: dict[str, list[Any]] = {}
    deadline = time.monotonic() + QACCT_WAIT_S
    with open_remote(config) as remote:
        for job_id, size in job_ids:
            while True:
                result = remote.run(f"qacct -j {job_id}", check=False)
                records = parse_qacct(result.stdout)
                if len(records) >= size:
                    out[job_id] = records
                    break
                assert time.monotonic() < deadline, f"qacct -j {job_id}: {result}"
                time.sleep(1)
    return out


def _last_request(dbfile: str) -> int:
    with Storage(dbfile) as storage:
        return max(r["id"] for r in storage.list_requests())


def test_workers_stop_before_h_rt_and_no_task_is_lost(config: dict[str, Any]) -> None:
    cfg = as_config(dict(config, h_rt="0:0:20", workers=2, batch=2, timeout_s=400, retries=0))
    started = time.monotonic()
    results = sheepdog.map(sleepy, range(12), cfg, verbose=False)
    took_s = time.monotonic() - started
    assert results == [x * 2 for x in range(12)]
    rid = _last_request(cfg.dbfile)
    with Storage(cfg.dbfile) as storage:
        jobs = storage.get_jobs(rid)
        attempts = [storage.get_task(rid, i)["attempts"] for i in range(1, 13)]
    assert attempts == [0] * 12, "a task was leased twice: its worker was killed with it"
    # 12 tasks of 3 s on 2 workers of at most 20 s each need more than one round of jobs;
    # with retries=0 the later rounds are continuations, not retries.
    assert len(jobs) >= 2, jobs
    print(f"\n12 tasks of 3 s under h_rt=20 s: {len(jobs)} jobs, {took_s:.1f} s")
    assert all(job["info"]["continues"] for job in jobs[1:]), jobs
    for job_id, records in _accounting(cfg, [(j["job_id"], j["array_size"]) for j in jobs]).items():
        for record in records:
            # failed 0 and exit 0: the worker ended itself; h_rt would say failed 37/100.
            assert record.failed.split(":")[0].strip() == "0", (job_id, record.fields)
            assert record.exit_status == 0, (job_id, record.fields)
            assert float(record.ru_wallclock.rstrip("s")) < 20, (job_id, record.fields)


def test_a_task_killed_by_h_rt_is_leased_again_with_the_reason(config: dict[str, Any]) -> None:
    marker = f"~/.sheepdog-e2e-h_rt-{time.time_ns()}"
    cfg = as_config(dict(config, h_rt="0:0:20", workers=1, lease_s=10.0, timeout_s=400))
    try:
        assert sheepdog.map(slow_the_first_time, [marker], cfg, verbose=False) == ["second run"]
    finally:
        with open_remote(cfg) as remote:
            remote.run(f"rm -f {marker}", check=False)
    rid = _last_request(cfg.dbfile)
    with Storage(cfg.dbfile) as storage:
        jobs = storage.get_jobs(rid)
        task = storage.get_task(rid, 1)
    assert task["attempts"] == 1  # leased again once, after h_rt killed the first worker
    assert len(jobs) == 2, jobs
    # qacct's reason: "failure 37: qmaster enforced h_rt, h_cpu, or h_vmem limit".
    assert "h_rt" in jobs[1]["info"]["why"], jobs[1]["info"]
    assert "wall clock 2" in jobs[1]["info"]["why"], jobs[1]["info"]  # killed at about 20 s
    assert jobs[1]["info"]["continues"] is False  # a retry: the first job finished nothing
