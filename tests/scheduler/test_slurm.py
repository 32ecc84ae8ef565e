"""Slurm (scheduler/slurm.py) against a scripted login node, and ``scheduler="auto"``.

The answers are real ones, taken from the Slurm 22.05 test cluster (docker/slurm/); those that
cluster cannot produce (OUT_OF_MEMORY without cgroups, NODE_FAIL, sacct without slurmdbd) are
written in the same format from Slurm's documentation. The commands run against a real Slurm
in tests/e2e/test_slurm_map.py.
"""
# ruff: noqa: E501 - real Slurm output is wider than our lines

from __future__ import annotations

import logging
from typing import Any

import pytest
from fake_clock import FakeClock
from fake_head import FakeHead, failed, ok

from sheepdog import sizing
from sheepdog.config import Config
from sheepdog.errors import ConfigError, SSHError, SubmitError
from sheepdog.remote import CommandResult
from sheepdog.scheduler import (
    AutoScheduler,
    GridEngine,
    Slurm,
    State,
    check_options,
    detect_scheduler,
    open_scheduler,
    scheduler_class,
)
from sheepdog.scheduler import slurm as slurm_module
from sheepdog.scheduler.slurm import (
    DEFAULT_MAX_ARRAY_SIZE,
    job_statuses,
    neutral_state,
    parse_sacct,
    parse_sbatch_output,
    parse_scontrol_config,
    parse_scontrol_jobs,
    parse_squeue,
    permanent_reason,
)

# squeue --noheader --format='%F|%K|%T|%r' --jobs=10,11 on the test cluster: job 10 can never
# run (3 nodes asked of a 2-node partition), job 11 is throttled to 2 running (%2).
SQUEUE = """\
10|1-6%2|PENDING|PartitionNodeLimit
11|3-20%2|PENDING|JobArrayTaskLimit
11|1|RUNNING|None
11|2|RUNNING|None
"""

# scontrol -o show job 2: an array job whose two tasks exited with status 3.
# (scontrol ends each record with "Power= ", a trailing space, kept out of this file.)
SCONTROL_FAILED = """\
JobId=2 ArrayJobId=2 ArrayTaskId=2 JobName=t2 UserId=sheep(1000) GroupId=sheep(1000) MCS_label=N/A Priority=4294901758 Nice=0 Account=(null) QOS=(null) JobState=FAILED Reason=NonZeroExitCode Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=3:0 RunTime=00:00:01 TimeLimit=365-00:00:00 TimeMin=N/A SubmitTime=2026-11-26T04:07:45 EligibleTime=2026-11-26T04:07:45 AccrueTime=Unknown StartTime=2026-11-26T04:07:45 EndTime=2026-11-26T04:07:46 Deadline=N/A PreemptEligibleTime=2026-11-26T04:07:45 PreemptTime=None SuspendTime=None SecsPreSuspend=0 LastSchedEval=2026-11-26T04:07:45 Scheduler=Backfill Partition=main AllocNode:Sid=controller:1107 ReqNodeList=(null) ExcNodeList=(null) NodeList=node2 BatchHost=node2 NumNodes=1 NumCPUs=1 NumTasks=1 CPUs/Task=1 ReqB:S:C:T=0:0:*:* TRES=cpu=1,mem=2G,node=1,billing=1 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=* MinCPUsNode=1 MinMemoryCPU=2G MinTmpDiskNode=0 Features=(null) DelayBoot=00:00:00 OverSubscribe=OK Contiguous=0 Licenses=(null) Network=(null) Command=(null) WorkDir=/home/sheep StdErr=/home/sheep/slurm-2_2.out StdIn=/dev/null StdOut=/home/sheep/slurm-2_2.out Power=
JobId=9 ArrayJobId=2 ArrayTaskId=1 JobName=t2 UserId=sheep(1000) GroupId=sheep(1000) MCS_label=N/A Priority=4294901758 Nice=0 Account=(null) QOS=(null) JobState=FAILED Reason=NonZeroExitCode Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=3:0 RunTime=00:00:01 TimeLimit=365-00:00:00 TimeMin=N/A SubmitTime=2026-11-26T04:07:45 EligibleTime=2026-11-26T04:07:45 AccrueTime=Unknown StartTime=2026-11-26T04:07:45 EndTime=2026-11-26T04:07:46 Deadline=N/A PreemptEligibleTime=2026-11-26T04:07:45 PreemptTime=None SuspendTime=None SecsPreSuspend=0 LastSchedEval=2026-11-26T04:07:45 Scheduler=Backfill Partition=main AllocNode:Sid=controller:1107 ReqNodeList=(null) ExcNodeList=(null) NodeList=node1 BatchHost=node1 NumNodes=1 NumCPUs=1 NumTasks=1 CPUs/Task=1 ReqB:S:C:T=0:0:*:* TRES=cpu=1,mem=2G,node=1,billing=1 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=* MinCPUsNode=1 MinMemoryCPU=2G MinTmpDiskNode=0 Features=(null) DelayBoot=00:00:00 OverSubscribe=OK Contiguous=0 Licenses=(null) Network=(null) Command=(null) WorkDir=/home/sheep StdErr=/home/sheep/slurm-2_1.out StdIn=/dev/null StdOut=/home/sheep/slurm-2_1.out Power=
"""

# scontrol -o show job 15: a job that killed itself with SIGKILL (kill -9 $$).
SCONTROL_KILLED = "JobId=15 JobName=sig UserId=sheep(1000) GroupId=sheep(1000) MCS_label=N/A Priority=4294901750 Nice=0 Account=(null) QOS=(null) JobState=FAILED Reason=JobLaunchFailure Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:9 RunTime=00:00:00 TimeLimit=UNLIMITED TimeMin=N/A SubmitTime=2026-11-26T04:13:50 EligibleTime=2026-11-26T04:13:50 AccrueTime=2026-11-26T04:13:50 StartTime=2026-11-26T04:13:51 EndTime=2026-11-26T04:13:51 Deadline=N/A PreemptEligibleTime=2026-11-26T04:13:51 PreemptTime=None SuspendTime=None SecsPreSuspend=0 LastSchedEval=2026-11-26T04:13:51 Scheduler=Main Partition=main AllocNode:Sid=controller:4330 ReqNodeList=(null) ExcNodeList=(null) NodeList=node1 BatchHost=node1 NumNodes=1 NumCPUs=1 NumTasks=1 CPUs/Task=1 ReqB:S:C:T=0:0:*:* TRES=cpu=1,mem=2G,node=1,billing=1 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=* MinCPUsNode=1 MinMemoryCPU=2G MinTmpDiskNode=0 Features=(null) DelayBoot=00:00:00 OverSubscribe=OK Contiguous=0 Licenses=(null) Network=(null) Command=(null) WorkDir=/home/sheep StdErr=/home/sheep/slurm-15.out StdIn=/dev/null StdOut=/home/sheep/slurm-15.out Power= \n"


def scontrol_line(state: str, reason: str = "None", exit_code: str = "0:0", task: int = 1) -> str:
    """A ``scontrol -o show job`` record like the real ones above, in another end state."""
    return (
        SCONTROL_FAILED.splitlines()[1]
        .replace("JobState=FAILED", f"JobState={state}")
        .replace("Reason=NonZeroExitCode", f"Reason={reason}")
        .replace("ExitCode=3:0", f"ExitCode={exit_code}")
        .replace("ArrayTaskId=1", f"ArrayTaskId={task}")
    ) + "\n"


SCONTROL_CONFIG = """\
Configuration data as of 2026-11-26T04:13:54
AccountingStorageBackupHost = (null)
AccountingStorageEnforce = none
AccountingStorageHost   = localhost
AccountingStoragePort   = 0
AccountingStorageTRES   = cpu,mem,energy,node,billing,fs/disk,vmem,pages
AccountingStorageType   = accounting_storage/none
EnforcePartLimits       = NO
MaxArraySize            = 10001
MaxJobCount             = 100000
MinJobAge               = 300 sec
"""

# sacct --noheader --parsable2 --allocations --format=JobID,State,ExitCode,Reason,NodeList,Timelimit
SACCT = """\
41_1|COMPLETED|0:0|None|node1|01:00:00
41_2|TIMEOUT|0:0|None|node2|01:00:00
41_3|CANCELLED by 1000|0:15|None|node1|01:00:00
41_4|OUT_OF_MEMORY|0:125|None|node2|01:00:00
41_[5-6]|PENDING|0:0|Priority|None assigned|01:00:00
"""


# --- sbatch ----------------------------------------------------------------------------


@pytest.mark.parametrize(("stdout", "job_id"), [("1\n", "1"), ("42;sheepdog\n", "42")])
def test_sbatch_parsable(stdout: str, job_id: str) -> None:
    assert parse_sbatch_output(stdout) == job_id


def test_sbatch_mismatch_says_what() -> None:
    with pytest.raises(ValueError, match=r"sbatch --parsable output did not match .*'Submitted batch job 4"):
        parse_sbatch_output("Submitted batch job 4\n")


def test_submit_runs_in_the_job_directory_and_names_the_output_files_as_grid_engine() -> None:
    login = FakeHead({"cd ": ok("7\n")})
    job_id = Slurm(login).submit(
        "/home/sheep/.sheepdog/job.py", name="job.py", array_size=4,
        workdir="/home/sheep/.sheepdog/", max_running=2,
    )
    assert job_id == "7"
    (command,) = login.commands
    assert command == (
        "cd /home/sheep/.sheepdog && sbatch --parsable --job-name=job.py "
        "--chdir=/home/sheep/.sheepdog/ --output=/home/sheep/.sheepdog/job.py.o%A.%a "
        "--error=/home/sheep/.sheepdog/job.py.e%A.%a /home/sheep/.sheepdog/job.py"
    )


def test_a_split_submit_gives_its_own_array_with_the_throttle_and_percent_is_escaped() -> None:
    login = FakeHead({"cd ": ok("8;cluster\n")})
    Slurm(login).submit("/h/100% sure/job.py", name="job.py", array_size=3,
                        workdir="/h/100% sure", split=True, max_running=2)
    (command,) = login.commands
    assert "'--output=/h/100%% sure/job.py.o%A.%a'" in command
    assert "'--chdir=/h/100% sure'" in command  # not a pattern: no escaping
    assert command.endswith("--array=1-3%2 '/h/100% sure/job.py'")


def test_a_refused_submit_raises_with_sbatchs_words() -> None:
    refused = CommandResult(
        "", 1, "", "sbatch: error: invalid partition specified: nope\n"
        "sbatch: error: Batch job submission failed: Invalid partition name specified\n",
    )

    class Refusing(FakeHead):
        def run(self, command: str, **kwargs: Any) -> CommandResult:
            self.commands.append(command)
            raise kwargs["error"](command, 1, "", refused.stderr, host=self.host)

    with pytest.raises(SubmitError, match="Invalid partition name specified"):
        Slurm(Refusing()).submit("/j/job.py", name="job.py", array_size=1)


# --- squeue ----------------------------------------------------------------------------


def test_squeue_rows_and_jobs_from_the_real_answer() -> None:
    rows = parse_squeue(SQUEUE)
    assert [(r.job_id, r.task, r.state, r.reason) for r in rows][:2] == [
        ("10", "1-6%2", "PENDING", "PartitionNodeLimit"),
        ("11", "3-20%2", "PENDING", "JobArrayTaskLimit"),
    ]
    jobs = job_statuses(rows)
    assert jobs["10"].states == {State.QUEUED} and jobs["10"].queued
    assert jobs["11"].states == {State.QUEUED, State.RUNNING} and jobs["11"].running
    assert jobs["11"].native == {"PENDING", "RUNNING"}
    assert jobs["11"].lines == SQUEUE.splitlines()[1:]


def test_a_squeue_line_that_does_not_match_says_which_and_why() -> None:
    with pytest.raises(ValueError, match=r"did not match the pattern .*'slurm_load_jobs: oops'"):
        parse_squeue("10|1|RUNNING|None\nslurm_load_jobs: oops\n")


@pytest.mark.parametrize(
    ("native", "neutral"),
    [("PENDING", State.QUEUED), ("REQUEUE_HOLD", State.QUEUED), ("REQUEUED", State.QUEUED),
     ("RUNNING", State.RUNNING), ("CONFIGURING", State.RUNNING), ("COMPLETING", State.RUNNING),
     ("SPECIAL_EXIT", State.ERROR), ("SUSPENDED", State.UNKNOWN), ("STOPPED", State.UNKNOWN),
     ("SOMETHING_NEW", State.UNKNOWN), ("COMPLETED", State.DONE), ("FAILED", State.DONE),
     ("TIMEOUT", State.DONE), ("PREEMPTED", State.DONE), ("NODE_FAIL", State.DONE),
     ("OUT_OF_MEMORY", State.DONE), ("CANCELLED", State.DONE)],
)
def test_slurm_states_in_neutral_words(native: str, neutral: State) -> None:
    assert neutral_state(native) is neutral


def test_status_asks_by_job_id_never_by_user() -> None:
    login = FakeHead({"squeue": ok(SQUEUE)})
    listing = Slurm(login).status(["11", "10", "12"])
    assert listing is not None and set(listing) == {"10", "11"}
    (command,) = login.commands
    assert command == "squeue --noheader --format='%F|%K|%T|%r' --jobs=11,10,12"
    assert "--user" not in command and "-u " not in command


def test_a_job_whose_tasks_all_ended_has_left_the_queue() -> None:
    ended = "12|1|COMPLETED|None\n12|2|FAILED|NonZeroExitCode\n"
    assert Slurm(FakeHead({"squeue": ok(ended)})).status(["12"]) == {}


def test_a_job_in_a_state_nobody_knows_is_still_there() -> None:
    listing = Slurm(FakeHead({"squeue": ok("12|1|SOMETHING_NEW|None\n")})).status(["12"])
    assert listing is not None and listing["12"].states == {State.UNKNOWN}


def test_invalid_job_id_for_the_one_job_asked_means_gone() -> None:
    gone = failed(1, "slurm_load_jobs error: Invalid job id specified\n")
    assert Slurm(FakeHead({"squeue": gone})).status(["99999"]) == {}


@pytest.mark.parametrize(
    "answer",
    [
        failed(1, "slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n"),
        # Not exactly the answer for a job that left: a wrapper's words, or another error too.
        failed(1, "squeue: wrapper failed; slurm_load_jobs error: Invalid job id specified\n"),
        failed(1, "Invalid job id specified\nslurm_load_jobs error: Socket timed out\n"),
        failed(255, ""),
        ok("Welcome to the cluster!\n12|1|RUNNING|None\n"),  # a banner: the answer is not squeue's
    ],
)
def test_a_squeue_that_does_not_answer_is_unknown_not_gone(
    answer: CommandResult, caplog: pytest.LogCaptureFixture
) -> None:
    assert Slurm(FakeHead({"squeue": answer})).status(["12"]) is None
    assert "nothing is expired or resubmitted" in caplog.text


# --- why a job waits -----------------------------------------------------------------------


def test_a_partition_that_can_never_hold_the_job_is_permanent() -> None:
    login = FakeHead({"squeue": ok("10|1-6%2|PENDING|PartitionNodeLimit\n")})
    waiting = Slurm(login).why_waiting("10")
    assert waiting.reasons == ["PartitionNodeLimit"]
    assert waiting.permanent == "PartitionNodeLimit"
    assert login.commands == ["squeue --noheader --format='%F|%K|%T|%r' --jobs=10 --states=PENDING"]


@pytest.mark.parametrize(
    "reason", ["Priority", "Resources", "JobArrayTaskLimit", "JobHeldUser", "PartitionDown",
               "BeginTime", "Dependency", "ReqNodeNotAvail, UnavailableNodes:node[1-2]"],
)
def test_reasons_that_pass_are_not_permanent(reason: str) -> None:
    waiting = Slurm(FakeHead({"squeue": ok(f"11|3-20|PENDING|{reason}\n")})).why_waiting("11")
    assert waiting.reasons == [reason] and waiting.permanent is None


def test_one_task_that_can_start_means_the_job_can() -> None:
    assert permanent_reason(["PartitionNodeLimit", "Priority"]) is None
    assert permanent_reason(["DependencyNeverSatisfied"]) == "DependencyNeverSatisfied"
    assert permanent_reason([]) is None


def test_req_node_not_avail_becomes_permanent_after_its_patience(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(slurm_module.time, "monotonic", lambda: now[0])
    reason = "ReqNodeNotAvail, UnavailableNodes:node[1-2]"
    scheduler = Slurm(FakeHead({"squeue": ok(f"11|1-2|PENDING|{reason}\n")}))
    assert scheduler.why_waiting("11").permanent is None
    now[0] += slurm_module.REQ_NODE_NOT_AVAIL_PATIENCE_S - 1
    assert scheduler.why_waiting("11").permanent is None
    now[0] += 1
    assert scheduler.why_waiting("11").permanent == reason


def test_a_squeue_failure_while_asking_why_is_not_permanent() -> None:
    waiting = Slurm(FakeHead({"squeue": failed(1, "Unable to contact slurm controller")})).why_waiting("3")
    assert waiting.permanent is None and "Unable to contact" in waiting.reasons[0]


def test_error_reasons_of_a_task_held_after_failing() -> None:
    text = scontrol_line("SPECIAL_EXIT", "JobHeldAdmin") + scontrol_line("RUNNING", task=2)
    login = FakeHead({"scontrol -o show job": ok(text)})
    assert Slurm(login).error_reasons("2") == ["SPECIAL_EXIT (JobHeldAdmin)"]


# --- accounting ------------------------------------------------------------------------------


def test_scontrol_records_of_a_real_failed_array() -> None:
    records = parse_scontrol_jobs(SCONTROL_FAILED)
    assert [(r.job_id, r.task_id, r.state, r.exit_status, r.signal, r.host) for r in records] == [
        ("2", "2", "FAILED", 3, 0, "node2"), ("2", "1", "FAILED", 3, 0, "node1"),
    ]


def test_a_scontrol_line_without_job_fields_says_what_did_not_match() -> None:
    with pytest.raises(ValueError, match="no JobId= or JobState=.*'slurm_load_jobs error'"):
        parse_scontrol_jobs("slurm_load_jobs error\n")


def config_answer(accounting: str = "accounting_storage/none") -> CommandResult:
    return ok(SCONTROL_CONFIG.replace("accounting_storage/none", accounting))


def test_accounting_without_slurmdbd_reads_scontrol_and_describes_the_exit() -> None:
    login = FakeHead({"scontrol show config": config_answer(),
                       "scontrol -o show job": ok(SCONTROL_FAILED)})
    reason = Slurm(login).accounting("2")
    # The stub's exit status 3: it could not talk to the server.
    assert reason.startswith("the worker exited with status 3 on node2: it could not talk to the server")
    assert "on node1" in reason
    assert login.commands[-1] == "scontrol -o show job 2"


def test_a_task_killed_by_a_signal_is_described_with_slurms_reason() -> None:
    login = FakeHead({"scontrol show config": config_answer(),
                       "scontrol -o show job": ok(SCONTROL_KILLED)})
    reason = Slurm(login).accounting("15")
    assert reason.startswith("the array task died with signal SIGKILL")
    assert "on node1" in reason and "JobLaunchFailure" in reason


@pytest.mark.parametrize(
    ("state", "exit_code", "words"),
    [
        ("TIMEOUT", "0:15", "killed by Slurm for exceeding its run time limit (TIMEOUT --time 365-00:00:00) on node1"),
        ("OUT_OF_MEMORY", "0:125", "killed by Slurm for exceeding its memory limit (--mem or --mem-per-cpu; OUT_OF_MEMORY) on node1"),
        ("NODE_FAIL", "0:0", "Slurm lost its node on node1 (NODE_FAIL)"),
        ("PREEMPTED", "0:15", "preempted by Slurm: a job of higher priority took its resources on node1"),
        ("CANCELLED", "0:15", "cancelled (scancel, or an administrator) on node1"),
    ],
)
def test_end_states_are_described_in_words(state: str, exit_code: str, words: str) -> None:
    login = FakeHead({"scontrol show config": config_answer(),
                       "scontrol -o show job": ok(scontrol_line(state, exit_code=exit_code))})
    assert Slurm(login).accounting("2") == words


def test_completed_tasks_give_no_reason_and_a_gone_job_gives_none() -> None:
    login = FakeHead({"scontrol show config": config_answer(),
                       "scontrol -o show job": ok(scontrol_line("COMPLETED"))})
    assert Slurm(login).accounting("2") == ""
    gone = FakeHead({"scontrol show config": config_answer(),
                      "scontrol -o show job": failed(1, "slurm_load_jobs error: Invalid job id specified")})
    assert Slurm(gone).accounting("2") == ""


def test_accounting_with_slurmdbd_reads_sacct() -> None:
    # Tasks 5-6 are still queued: squeue lists the job, so sacct's PENDING is its last word.
    login = FakeHead({"scontrol show config": config_answer("accounting_storage/slurmdbd"),
                       "sacct": ok(SACCT), "squeue": ok("41|5-6|PENDING|Priority\n")})
    reason = Slurm(login).accounting("41")
    assert [c for c in login.commands if c.startswith("sacct")] == [
        "sacct --noheader --parsable2 --allocations "
        "--format=JobID,State,ExitCode,Reason,NodeList,Timelimit --jobs=41"
    ]
    assert reason == (
        "killed by Slurm for exceeding its run time limit (TIMEOUT --time 01:00:00) on node2; "
        "cancelled (scancel, or an administrator) on node1; "
        "killed by Slurm for exceeding its memory limit (--mem or --mem-per-cpu; OUT_OF_MEMORY) on node2"
    )


class SlowSlurmdbd(FakeHead):
    """sacct shows a task RUNNING for the first ``lag`` calls, then its end; squeue lists none."""

    def __init__(self, lag: int) -> None:
        super().__init__({"scontrol show config": config_answer("accounting_storage/slurmdbd")})
        self.lag = lag

    def run(self, command: str, **kwargs: Any) -> CommandResult:
        if command.startswith("sacct"):
            self.commands.append(command)
            state = "RUNNING" if self.lag > 0 else "NODE_FAIL"
            self.lag -= 1
            return ok(f"42_1|COMPLETED|0:0|None|node1|01:00:00\n42_2|{state}|0:0|None|node2|"
                      "01:00:00\n")
        return super().run(command, **kwargs)


def test_sacct_that_has_not_heard_of_the_end_yet_is_asked_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(slurm_module, "time", FakeClock())
    login = SlowSlurmdbd(lag=3)
    assert Slurm(login).accounting("42") == "Slurm lost its node on node2 (NODE_FAIL)"
    assert sum(c.startswith("sacct") for c in login.commands) == 4
    assert sum(c.startswith("squeue") for c in login.commands) == 3


def test_sacct_is_asked_again_for_a_bounded_time_only(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(slurm_module, "time", clock)
    login = SlowSlurmdbd(lag=10_000)
    assert Slurm(login).accounting("42") == ""
    assert clock.now - 1000.0 <= slurm_module.SACCT_SETTLE_S + 1.0


def test_sacct_is_not_asked_again_about_a_job_squeue_still_lists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(slurm_module, "time", FakeClock())
    login = SlowSlurmdbd(lag=10_000)
    login.answers["squeue"] = ok("42|2|RUNNING|None\n")
    assert Slurm(login).accounting("42") == ""
    assert sum(c.startswith("sacct") for c in login.commands) == 1


def test_sacct_records_and_a_line_that_does_not_match() -> None:
    records = parse_sacct(SACCT)
    assert [(r.task_id, r.state, r.host) for r in records][-2:] == [
        ("4", "OUT_OF_MEMORY", "node2"), ("[5-6]", "PENDING", ""),
    ]
    with pytest.raises(ValueError, match="sacct line did not match.*'sacct: error"):
        parse_sacct("sacct: error: Problem talking to the database\n")


# --- limits and config -------------------------------------------------------------------------


def test_max_array_size_is_read_once_and_leaves_index_zero_unused() -> None:
    login = FakeHead({"scontrol show config": config_answer()})
    scheduler = Slurm(login)
    assert scheduler.array_limits().max_tasks == 10_000
    assert scheduler.array_limits().per_job == 10_000
    assert login.commands == ["scontrol show config"]
    assert parse_scontrol_config(SCONTROL_CONFIG).accounting is False


def test_a_config_without_max_array_size_says_what_did_not_match() -> None:
    with pytest.raises(ValueError, match="MaxArraySize: 'MaxArraySize = lots"):
        parse_scontrol_config("MaxArraySize = lots\n")


def test_an_unreadable_config_warns_and_assumes_slurms_default(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Failing(FakeHead):
        def run(self, command: str, **kwargs: Any) -> CommandResult:
            from sheepdog.errors import RemoteCommandError

            self.commands.append(command)
            raise RemoteCommandError(command, 1, "", "scontrol: error: denied", host=self.host)

    scheduler = Slurm(Failing())
    assert scheduler.array_limits().max_tasks == DEFAULT_MAX_ARRAY_SIZE - 1
    assert "denied" in caplog.text and "MaxArraySize" in caplog.text


# --- cancel --------------------------------------------------------------------------------------


def test_delete_by_id_and_by_name_reports_the_jobs_that_were_there() -> None:
    login = FakeHead({
        "squeue --noheader --format='%F|%K|%T|%r' --jobs=": ok("16|1-4%2|PENDING|PartitionNodeLimit\n"),
        "squeue --noheader --format='%F|%K|%T|%r' --user=": ok("17|1-2|PENDING|JobHeldUser\n"),
    })
    deletion = Slurm(login).delete(["16", "15", "sheepdog_001_abc.py"])
    assert deletion.job_ids == ["16", "17"] and deletion.error is None
    assert deletion.describe() == "deleted Slurm job 16, 17"
    assert login.commands[1] == (
        "squeue --noheader --format='%F|%K|%T|%r' --user=\"$(id -un)\" --name=sheepdog_001_abc.py"
    )
    assert login.commands[2] == (
        "scancel 16 15 && scancel --user=\"$(id -un)\" --name=sheepdog_001_abc.py"
    )


def test_delete_of_jobs_already_gone_is_fine() -> None:
    gone = failed(1, "slurm_load_jobs error: Invalid job id specified\n")
    deletion = Slurm(FakeHead({"squeue": gone})).delete(["15"])
    assert deletion.job_ids == [] and deletion.error is None
    assert deletion.describe() == "no job of it was left on the cluster"


def test_a_failed_scancel_is_reported_not_raised() -> None:
    login = FakeHead({"squeue": ok("16|1|RUNNING|None\n"),
                       "scancel": failed(1, "scancel: error: Unable to contact slurm controller\n")})
    deletion = Slurm(login).delete(["16"])
    assert deletion.error is not None and "Unable to contact slurm controller" in deletion.error
    assert deletion.describe().startswith("could not delete its Slurm jobs")


def test_a_dropped_connection_while_deleting_is_reported_not_raised() -> None:
    class Dropped(FakeHead):
        def run(self, command: str, **kwargs: Any) -> CommandResult:
            raise SSHError("connection lost", host=self.host)

    deletion = Slurm(Dropped()).delete(["16"])
    assert deletion.error is not None and "connection lost" in deletion.error


# --- typed resources, raw options ---------------------------------------------------------------


def test_typed_resources_map_to_sbatch_options() -> None:
    config = Config(host="h", scheduler="slurm", mem_gb=2, h_rt="3600", queue="main",
                    pe=("smp", 4), max_running=5, mem_resource="mem_free")
    assert Slurm.resource_options(config) == [
        "--mem=2G", "--time=1:00:00", "--partition=main", "--cpus-per-task=4",
    ]
    assert Slurm.resource_options(Config(host="h", mem_gb=0.5)) == ["--mem=512M"]
    assert Slurm.directives("/usr/bin/python3", 10, ["--mem=2G"], max_running=5) == [
        "#SBATCH --array=1-10%5", "#SBATCH --mem=2G",
    ]


@pytest.mark.parametrize(
    "opt", ["--array=1-5", "-a 1-5", "-a1-5", "--job-name=x", "--job-name x", "-J x",
            "--qos=long --parsable"],
)
def test_options_that_sheepdog_sets_on_slurm_are_refused(opt: str) -> None:
    config = Config(host="h", scheduler="slurm", scheduler_opts=(opt,))
    # The scheduler's own rule: refused when it is opened, before anything is stored.
    for check in (check_options, open_scheduler):
        with pytest.raises(ConfigError, match=r"entry 0 .* sets -.*remove .* from scheduler_opts") as info:
            check(config)
        assert info.value.key == "scheduler_opts"


@pytest.mark.parametrize("opt", ["-A myaccount", "--qos=long", "--time=10", "--output=/tmp/x",
                                 "--mem-per-cpu=1G", "--exclusive"])
def test_other_sbatch_options_are_allowed(opt: str) -> None:
    config = Config(host="h", scheduler="slurm", scheduler_opts=(opt,))
    check_options(config)
    assert config.raw_options == (opt,)


def test_raw_options_have_one_neutral_name_and_ge_opts_is_grid_engines() -> None:
    with pytest.raises(ConfigError, match="'scheduler_opts': and 'ge_opts' are both set") as info:
        Config(host="h", ge_opts=("-r y",), scheduler_opts=("-r y",))
    assert info.value.key == "scheduler_opts"
    with pytest.raises(ConfigError, match="'ge_opts': holds Grid Engine .* scheduler_opts"):
        check_options(Config(host="h", scheduler="slurm", ge_opts=("-l h_vmem=1G",)))
    # Grid Engine takes either name, by the same rules.
    for key in ("ge_opts", "scheduler_opts"):
        config = Config.from_mapping({"host": "h", "scheduler": "gridengine", key: ["-r y"]})
        check_options(config)
        assert config.raw_options == ("-r y",) and config.raw_options_key == key
        with pytest.raises(ConfigError, match=f"remove -t from {key}"):
            check_options(
                Config.from_mapping({"host": "h", "scheduler": "gridengine", key: ["-t 1-3"]}))
    # Under "auto", ge_opts are checked as Grid Engine's at once.
    with pytest.raises(ConfigError, match="remove -t from ge_opts"):
        check_options(Config(host="h", ge_opts=("-t 1-3",)))
    with pytest.raises(ConfigError, match="entry 0 is not an option"):
        Config(host="h", scheduler_opts=("mem=2G",))


# --- auto ----------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _forget_detections(monkeypatch: pytest.MonkeyPatch) -> None:
    from sheepdog.scheduler import auto

    monkeypatch.setattr(auto, "_detected", {})


@pytest.mark.parametrize(
    ("found", "chosen"),
    [("qsub\n", GridEngine), ("sbatch\n", Slurm), ("qsub\nsbatch\n", GridEngine)],
)
def test_auto_takes_what_the_head_node_offers_grid_engine_first(
    found: str, chosen: type, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sheepdog.scheduler")
    login = FakeHead({"": ok(found)})
    config = Config(host="login")
    assert detect_scheduler(config, login) is chosen
    assert detect_scheduler(config, login) is chosen
    assert len(login.commands) == 1  # asked once per login, and said once
    assert caplog.text.count("scheduler 'auto'") == 1
    assert "command -v" in login.commands[0]


def test_auto_with_neither_says_what_to_do() -> None:
    with pytest.raises(ConfigError, match="neither qsub nor sbatch on login.*set scheduler to") as info:
        detect_scheduler(Config(host="login"), FakeHead({"": ok("")}))
    assert info.value.key == "scheduler"


def test_a_failed_detection_raises_and_is_not_remembered() -> None:
    class Down(FakeHead):
        def run(self, command: str, **kwargs: Any) -> CommandResult:
            self.commands.append(command)
            raise SSHError("cannot connect", host=self.host)

    config = Config(host="login")
    with pytest.raises(SSHError):
        detect_scheduler(config, Down())
    login = FakeHead({"": ok("sbatch\n")})
    assert detect_scheduler(config, login) is Slurm


def test_auto_asks_on_first_use_and_then_acts_as_what_it_found(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    login = FakeHead({"squeue": ok("12|1|RUNNING|None\n"), "": ok("sbatch\n")})
    monkeypatch.setattr("sheepdog.scheduler.open_remote", lambda config, scheduler: login)
    scheduler = open_scheduler(Config(host="login"))
    assert isinstance(scheduler, AutoScheduler) and login.commands == []  # nothing asked yet
    assert scheduler.kind is Slurm and scheduler.label == "Slurm" and scheduler.name == "slurm"
    assert scheduler.array_index_var == "SLURM_ARRAY_TASK_ID"
    assert login.preamble == Slurm.preamble  # Slurm's environment before each command
    listing = scheduler.status(["12"])
    assert listing is not None and listing["12"].running
    assert len([c for c in login.commands if "command -v" in c]) == 1


def test_auto_refuses_grid_engine_options_on_slurm_when_it_finds_slurm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    login = FakeHead({"": ok("sbatch\n")})
    monkeypatch.setattr("sheepdog.scheduler.open_remote", lambda config, scheduler: login)
    scheduler = open_scheduler(Config(host="login", ge_opts=("-l h_vmem=1G",)))
    with pytest.raises(ConfigError, match="found by scheduler='auto' on login.*scheduler_opts"):
        scheduler.submit("/j/job.py", name="job.py", array_size=1)
    assert not any(c.startswith("cd ") for c in login.commands)  # nothing submitted


def test_an_unreachable_head_node_under_auto_fails_on_use_and_delete_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Down(FakeHead):
        def run(self, command: str, **kwargs: Any) -> CommandResult:
            raise SSHError("cannot connect to login", host=self.host)

    monkeypatch.setattr("sheepdog.scheduler.open_remote", lambda config, scheduler: Down())
    scheduler = open_scheduler(Config(host="login"))  # does not connect
    with pytest.raises(SSHError):
        scheduler.status(["1"])
    deletion = scheduler.delete(["1", "sheepdog_001_abc.py"])
    assert deletion.error is not None and "cannot connect to login" in deletion.error


def test_auto_sizes_arrays_like_the_cluster_schedulers() -> None:
    assert scheduler_class("auto").default_max_workers == Slurm.default_max_workers
    assert sizing.array_size(Config(host="h"), 1000) == 100


def test_raw_options_keep_the_output_options_they_do_not_set() -> None:
    login = FakeHead({"cd ": ok("9\n")})
    Slurm(login).submit("/h/job.py", name="job.py", array_size=2, workdir="/h/",
                        raw_options=("--qos=long", "--output=/x/o.%a"))
    (command,) = login.commands
    assert "--chdir=/h/" in command and "--error=/h/job.py.e%A.%a" in command
    assert "--output" not in command  # the job file's #SBATCH line says where


def test_the_output_options_go_with_ge_opts_too() -> None:
    # With ge_opts set, -wd/-o/-e still go with qsub (the output stays in ssh_dir, 0600 by
    # the stub's umask there), except the ones that ge_opts set.
    login = FakeHead({"cd ": ok("5\n")})
    GridEngine(login).submit("/h/job.py", name="job.py", array_size=2, workdir="/h/",
                             raw_options=("-l h_vmem=2G", "-e /elsewhere"))
    (command,) = login.commands
    assert "-wd /h/ -o /h/ -N" in command and "-e " not in command
