"""Run-time limits (h_rt) on the real cluster: workers stop in time, and killed work runs again.

On Slurm, h_rt is ``--time``, whose unit is the minute: there the limit is one minute, and
the tasks' lengths scale with it.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from cluster_fixture import SLURM_FINAL_STATES, is_slurm

import sheepdog
from sheepdog.config import as_config
from sheepdog.poll import poll_until
from sheepdog.scheduler import open_remote
from sheepdog.scheduler.gridengine import parse_qacct
from sheepdog.storage import Storage

pytestmark = pytest.mark.e2e

#: Bound on waiting for qacct to show a finished job's records.
QACCT_WAIT_S = 60.0


def run_limit_s(config: dict[str, Any]) -> int:
    """The run-time limit these tests ask for: 20 s, or Slurm's smallest, one minute."""
    return 60 if is_slurm(config) else 20


def as_h_rt(seconds: int) -> str:
    return f"0:{seconds // 60}:{seconds % 60:02d}"


def sleepy(x: int, seconds: float) -> int:
    import time

    time.sleep(seconds)
    return x * 2


def slow_the_first_time(marker: str, seconds: float) -> str:
    """Outlive the h_rt on the first run, as the marker in the shared home says."""
    import os
    import time

    path = os.path.expanduser(marker)
    if not os.path.exists(path):
        open(path, "w").close()
        time.sleep(seconds)
    return "second run"


def _slurm_records(config: Any, job_ids: list[tuple[str, int]]) -> dict[str, list[dict[str, str]]]:
    """``sacct``'s record of each array task of each job, waited for until each has ended.

    Not ``scontrol show job``: the test cluster keeps accounting and, as real sites do,
    slurmctld forgets a job a few seconds (MinJobAge) after it ends.
    """
    fields = ("JobID", "State", "ExitCode", "ElapsedRaw")
    out: dict[str, list[dict[str, str]]] = {}
    last = ""
    with open_remote(config) as remote:
        def all_recorded() -> bool:
            nonlocal last
            for job_id, size in job_ids:
                if job_id in out:
                    continue
                last = remote.run(f"sacct -n -P -X -j {job_id} --format={','.join(fields)}",
                                  check=False).stdout
                records = [dict(zip(fields, line.split("|"))) for line in last.splitlines()
                           if line.strip()]
                if len(records) != size or not all(
                    r["State"].split()[0] in SLURM_FINAL_STATES for r in records
                ):
                    return False
                out[job_id] = records
            return True

        assert poll_until(all_recorded, timeout_s=120, interval_s=1), last
    return out


def _accounting(config: Any, job_ids: list[tuple[str, int]]) -> dict[str, list[Any]]:
    """qacct's records of each job, waited for until every array task has one."""
    out: dict[str, list[Any]] = {}
    missing: list[str] = []  # the last answer that lacked records
    with open_remote(config) as remote:
        def all_accounted() -> bool:
            # One job at a time, in order; the bound is for all of them together.
            for job_id, size in job_ids:
                if job_id in out:
                    continue
                result = remote.run(f"qacct -j {job_id}", check=False)
                records = parse_qacct(result.stdout)
                if len(records) < size:
                    missing[:] = [f"qacct -j {job_id}: {result}"]
                    return False
                out[job_id] = records
            return True

        assert poll_until(all_accounted, timeout_s=QACCT_WAIT_S, interval_s=1), "".join(missing)
    return out


def _last_request(dbfile: str) -> int:
    with Storage(dbfile) as storage:
        return max(r["id"] for r in storage.list_requests())


def test_workers_stop_before_h_rt_and_no_task_is_lost(config: dict[str, Any]) -> None:
    limit_s = run_limit_s(config)
    cfg = as_config(dict(config, h_rt=as_h_rt(limit_s), workers=2, batch=2, timeout_s=600,
                         retries=0))
    started = time.monotonic()
    # Each worker has more to do than fits in one limit: 12 x 3 s / 2 > 20 s (12 x 12 s on
    # Slurm, whose limit is 60 s).
    task_s = 12.0 if is_slurm(config) else 3.0
    results = sheepdog.map(sleepy, [(x, task_s) for x in range(12)], cfg, verbose=False)
    took_s = time.monotonic() - started
    assert results == [x * 2 for x in range(12)]
    rid = _last_request(cfg.dbfile)
    with Storage(cfg.dbfile) as storage:
        jobs = storage.get_jobs(rid)
        attempts = [storage.get_task(rid, i)["attempts"] for i in range(1, 13)]
    assert attempts == [0] * 12, "a task was leased twice: its worker was killed with it"
    # So they need more than one round of jobs; with retries=0 the later rounds are
    # continuations, not retries.
    assert len(jobs) >= 2, jobs
    print(f"\n12 tasks of {task_s:g} s under h_rt={limit_s} s: {len(jobs)} jobs, {took_s:.1f} s")
    assert all(job.continues for job in jobs[1:]), jobs
    sizes = [(j.job_id, j.array_size) for j in jobs]
    if is_slurm(config):
        for job_id, tasks in _slurm_records(cfg, sizes).items():
            for task in tasks:
                # COMPLETED with 0:0: the worker ended itself; --time would say TIMEOUT.
                assert task["State"] == "COMPLETED", (job_id, task)
                assert task["ExitCode"] == "0:0", (job_id, task)
                assert int(task["ElapsedRaw"]) < limit_s, (job_id, task)
        return
    for job_id, records in _accounting(cfg, sizes).items():
        for record in records:
            # failed 0 and exit 0: the worker ended itself; h_rt would say failed 37/100.
            assert record.failed.split(":")[0].strip() == "0", (job_id, record.fields)
            assert record.exit_status == 0, (job_id, record.fields)
            assert float(record.ru_wallclock.rstrip("s")) < limit_s, (job_id, record.fields)


def test_a_task_killed_by_h_rt_is_leased_again_with_the_reason(config: dict[str, Any]) -> None:
    marker = f"~/.sheepdog-e2e-h_rt-{time.time_ns()}"
    limit_s = run_limit_s(config)
    cfg = as_config(dict(config, h_rt=as_h_rt(limit_s), workers=1, lease_s=10.0,
                         timeout_s=600))
    try:
        done = sheepdog.map(slow_the_first_time, [(marker, 3 * limit_s)], cfg, verbose=False)
        assert done == ["second run"]
    finally:
        with open_remote(cfg) as remote:
            remote.run(f"rm -f {marker}", check=False)
    rid = _last_request(cfg.dbfile)
    with Storage(cfg.dbfile) as storage:
        jobs = storage.get_jobs(rid)
        task = storage.get_task(rid, 1)
    assert task["attempts"] == 1  # leased again once, after h_rt killed the first worker
    assert len(jobs) == 2, jobs
    if is_slurm(config):
        # Slurm's own word for a job killed at its --time.
        assert "TIMEOUT" in jobs[1].why, jobs[1].info
    else:
        # qacct's reason: "failure 37: qmaster enforced h_rt, h_cpu, or h_vmem limit".
        assert "h_rt" in jobs[1].why, jobs[1].info
        assert "wall clock 2" in jobs[1].why, jobs[1].info  # killed at about 20 s
    assert jobs[1].continues is False  # a retry: the first job finished nothing
