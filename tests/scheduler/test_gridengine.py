"""Parsing Grid Engine's answers (scheduler/gridengine.py): qsub -terse, qstat, qstat -j, qacct."""
# ruff: noqa: E501 - real Grid Engine output is wider than our lines

from __future__ import annotations

import re

import pytest

from sheepdog.job_file import job_file_name
from sheepdog.scheduler.gridengine import (
    describe_failure,
    parse_qacct,
    parse_qstat,
    parse_qstat_j_errors,
    parse_qsub_output,
)

QSTAT = """\
job-ID  prior   name       user         state submit/start at     queue                          slots ja-task-ID
-----------------------------------------------------------------------------------------------------------------
     12 0.55500 sheepdog_0 sheep        r     11/25/2026 08:10:01 all.q@exec1                        1 1
     12 0.55500 sheepdog_0 sheep        qw    11/25/2026 08:10:00                                    1 2-10:1
     13 0.00000 sheepdog_0 sheep        Eqw   11/25/2026 08:10:00                                    1 1-3:1
"""

QSTAT_J = """\
==============================================================
job_number:                 13
exec_file:                  job_scripts/13
owner:                      sheep
error reason          1:      11/25/2026 08:10:02 [1000:123]: error: can't chdir to /nope: No such file or directory
error reason          2:      11/25/2026 08:10:02 [1000:123]: error: can't chdir to /nope: No such file or directory
scheduling info:            (Collecting of scheduler job information is turned off)
"""

QACCT = """\
==============================================================
qname        all.q
hostname     exec1
jobname      sheepdog_001.py
jobnumber    12
taskid       1
failed       0
exit_status  0
maxvmem      10.1M
==============================================================
qname        all.q
hostname     exec2
jobname      sheepdog_001.py
jobnumber    12
taskid       2
failed       37  : qmaster enforced h_rt, h_cpu, or h_vmem limit
exit_status  137                  (Killed)
maxvmem      1.0G
==============================================================
qname        all.q
hostname     exec1
jobnumber    12
taskid       3
failed       0
exit_status  137                  (Killed)
maxvmem      5.0M
"""


@pytest.mark.parametrize(
    ("stdout", "job_id"),
    [("42\n", "42"), ("42.1-10:1\n", "42"), ("Your job 7 has been submitted\n7\n", "7")],
)
def test_qsub_terse(stdout: str, job_id: str) -> None:
    assert parse_qsub_output(stdout) == job_id


def test_qsub_terse_mismatch_says_what() -> None:
    with pytest.raises(ValueError, match="did not match the pattern") as info:
        parse_qsub_output("Unable to run job: denied\n")
    assert "Unable to run job" in str(info.value)


def test_qstat() -> None:
    jobs = parse_qstat(QSTAT)
    assert set(jobs) == {"12", "13"}
    assert jobs["12"].states == {"r", "qw"}
    assert not jobs["12"].in_error
    assert jobs["13"].in_error
    assert parse_qstat("") == {}


def test_qstat_j_errors() -> None:
    reasons = parse_qstat_j_errors(QSTAT_J)
    assert len(reasons) == 1
    assert "can't chdir to /nope" in reasons[0]


def test_qacct_and_reasons() -> None:
    records = parse_qacct(QACCT)
    assert [r.task_id for r in records] == [1, 2, 3]
    assert describe_failure(records[0]) is None
    second = describe_failure(records[1])
    assert second == (
        "Grid Engine reports failure 37: qmaster enforced h_rt, h_cpu, or h_vmem limit "
        "(maxvmem 1.0G, wall clock ? s) on exec2"
    )
    third = describe_failure(records[2])
    assert third is not None and "SIGKILL" in third and "exec1" in third


def test_a_worker_that_cannot_read_its_secret_file_is_described() -> None:
    (record,) = parse_qacct(QACCT.split("=" * 62)[1].replace("exit_status  0", "exit_status  7"))
    reason = describe_failure(record)
    assert reason is not None
    assert reason.startswith("the worker exited with status 7 on exec1: it cannot read the "
                             "request's secret file")
    assert "the execution nodes must see ssh_dir" in reason


def test_job_file_name() -> None:
    # Named like the original's sheepdog_032.py, plus a tag per database (see job_stem).
    assert re.fullmatch(r"sheepdog_032_[0-9a-f]{12}\.py", job_file_name(32, "ab" * 32))
    assert re.fullmatch(r"sheepdog_1234_[0-9a-f]{12}\.py", job_file_name(1234, "ab" * 32))


QSTAT_J_WAITING = """\
job_number:                 11
job-array tasks:            1-2:1
scheduling info:            (-l mem_grab=300M) cannot run in queue "all.q@exec1" because job requests unknown resource (mem_grab)
                            (-l mem_grab=300M) cannot run in queue "all.q@exec2" because job requests unknown resource (mem_grab)
"""

QSTAT_J_FULL = """\
job_number:                 12
scheduling info:            queue instance "all.q@exec1" dropped because it is full
                            (-l mem_free=4G) cannot run in queue "all.q@exec2" because it offers only hc:mem_free=1.000G
"""


def test_scheduling_info_and_permanent_problems() -> None:
    from sheepdog.scheduler.gridengine import parse_scheduling_info, permanent_scheduling_problem

    reasons = parse_scheduling_info(QSTAT_J_WAITING)
    assert len(reasons) == 2 and "unknown resource (mem_grab)" in reasons[0]
    problem = permanent_scheduling_problem(reasons)
    assert problem is not None and "mem_grab" in problem
    waiting = parse_scheduling_info(QSTAT_J_FULL)
    assert len(waiting) == 2
    assert permanent_scheduling_problem(waiting) is None  # a consumable frees up later
    fixed = ['(-l mem_grab=2T) cannot run in queue "all.q@exec1" because it offers only '
             "qf:mem_grab=1.000T"]
    assert permanent_scheduling_problem(fixed) is not None
    assert permanent_scheduling_problem([]) is None
    queue_level = ['(-l mem_grab=2T) cannot run in queue "all.q" because of cluster queue']
    assert permanent_scheduling_problem(queue_level) is not None
