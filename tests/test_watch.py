"""The Watcher: what it decides on each answer a scheduler can give, and what it does then.

Most tests give it a scripted :class:`~sheepdog.scheduler.base.Scheduler` that answers
``status``, ``accounting``, ``why_waiting`` and ``error_reasons`` and records every
``delete`` and ``submit``, over a real Storage; the watcher's clock is a number the test
moves, so the backoff, the stall and the takeover are checked without waiting. The
resubmission runs the real :func:`sheepdog.submit_jobs.submit_request` (the job file, the job
sizes, the jobs recorded) against the fake scheduler; only the server it would start is
stood in for.

The tests of Grid Engine's answers run the real GridEngine scheduler class on a fake head
node instead (a scripted host), so that qstat's own output goes through its parsers under
the same watcher. tests/e2e/test_faults.py runs the same situations on a real cluster.
"""

from __future__ import annotations

import base64
import logging
import os
import pickle
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
from fake_clock import FakeClock
from fake_head import FakeHead, ok

import sheepdog.stored_request
import sheepdog.submit_jobs
import sheepdog.worker_address
from sheepdog import cli
from sheepdog.api import served
from sheepdog.client import stub
from sheepdog.config import Config
from sheepdog.errors import RemoteCommandError, SSHError, StorageError
from sheepdog.errors import TimeoutError as SheepdogTimeoutError
from sheepdog.remote import CommandResult
from sheepdog.scheduler.base import Deletion, JobStatus, Scheduler, State, Waiting
from sheepdog.scheduler.gridengine import QSTAT_COMMAND, GridEngine
from sheepdog.scheduler.local import LocalHost
from sheepdog.server import Server
from sheepdog.sizing import request_settings
from sheepdog.spool import spool_directory
from sheepdog.storage import Storage
from sheepdog.stored_request import StoredRequest
from sheepdog.watch import SCHEDULABLE_CHECK_S, Watcher, wait_for_request

N_TASKS = 3


class FakeScheduler(Scheduler):
    """A scheduler that answers from a script and records what was asked of it."""

    name: ClassVar[str] = "fake"
    label: ClassVar[str] = "Fake"
    array_index_var: ClassVar[str] = GridEngine.array_index_var

    def __init__(self) -> None:
        # Any command it runs reads the tail of a worker's .e file, where a worker that
        # cannot reach the server says so.
        head = FakeHead({"": ok("sheepdog: cannot reach the server at x:9\n")})
        super().__init__(head)  # type: ignore[arg-type]
        #: What ``status`` answers: job id -> states; None: the scheduler did not answer.
        self.listing: dict[str, set[State]] | None = {}
        self.accounting_reason = ""
        self.reasons: dict[str, list[str]] = {}
        self.waiting = Waiting(["queue instance all.q@exec1 is full"])
        self.status_error: Exception | None = None
        self.calls: list[tuple[str, Any]] = []
        self.submitted: list[tuple[str, int]] = []
        self._next_id = 50

    @classmethod
    def directives(
        cls, shell: str, array_size: int, options: Sequence[str], *, max_running: int | None = None
    ) -> list[str]:
        return GridEngine.directives(shell, array_size, options, max_running=max_running)

    def submit(
        self, job_path: str, *, name: str, array_size: int, workdir: str | None = None,
        split: bool = False, max_running: int | None = None, raw_options: Sequence[str] = (),
    ) -> str:
        job_id = str(self._next_id)
        self._next_id += 1
        self.calls.append(("submit", job_id))
        self.submitted.append((job_id, array_size))
        return job_id

    def delete(self, targets: Sequence[str]) -> Deletion:
        self.calls.append(("delete", list(targets)))
        return Deletion(list(targets), None, self.label)

    def status(self, job_ids: Sequence[str]) -> dict[str, JobStatus] | None:
        self.calls.append(("status", list(job_ids)))
        if self.status_error is not None:
            raise self.status_error
        if self.listing is None:
            return None
        return {
            job: JobStatus(job, set(states))
            for job, states in self.listing.items() if job in job_ids
        }

    def accounting(self, job_id: str) -> str:
        self.calls.append(("accounting", job_id))
        return self.accounting_reason

    def why_waiting(self, job_id: str) -> Waiting:
        self.calls.append(("why_waiting", job_id))
        return self.waiting

    def error_reasons(self, job_id: str) -> list[str]:
        self.calls.append(("error_reasons", job_id))
        return self.reasons.get(job_id, [])

    def asked(self, *kinds: str) -> list[tuple[str, Any]]:
        """The calls of these kinds, in order."""
        return [call for call in self.calls if call[0] in kinds]


class FakeServer:
    """What submit_request reads from the server its workers call back to."""

    port = 9
    host = "127.0.0.1"
    certfile = None

    def url_for(self, localhost: str | None) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ensure_running(self) -> bool:
        return False  # it runs: nothing was restarted


class World:
    """A request of three tasks, job 41 submitted for it, and a watcher on a fake clock."""

    def __init__(self, tmp_path: Path, *, retries: int, passive: bool = False) -> None:
        self.config = Config(host="head", retries=retries, lease_s=60.0,
                             dbfile=str(tmp_path / "db.sqlite"))
        self.storage = Storage(self.config.dbfile)
        settings = {**request_settings(self.config, N_TASKS), "max_attempts": 5}
        self.rid = self.storage.new_request(
            b"f", None, [b"a", b"b", b"c"][:N_TASKS], settings=settings
        )
        self.storage.add_job(self.rid, "41", N_TASKS, info={"finished_before": 0, "part": 1})
        self.scheduler = FakeScheduler()
        self.clock = FakeClock()
        self.watcher = Watcher(self.config, self.rid, self.scheduler, passive=passive,
                               clock=self.clock)

    def lease(self, n: int, *, expired: bool = False) -> None:
        """Lease ``n`` tasks to a worker; ``expired``: the lease ran out long ago."""
        now = time.time() - (3600 if expired else 0)
        self.storage.lease(self.rid, worker="w", host="exec1", max_tasks=n, lease_s=600,
                           now=now)

    def check(self) -> None:
        """One check, as poll makes when it is due."""
        self.clock.advance(self.watcher.interval_s)
        self.watcher.poll(self.storage)

    def counts(self) -> dict[str, int]:
        return {k: v for k, v in self.storage.task_counts(self.rid).items() if v}

    def job_ids(self) -> list[str]:
        return [job.job_id for job in self.storage.get_jobs(self.rid)]


@pytest.fixture(autouse=True)
def no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resubmission renders and submits for real, to a server that is not started."""
    monkeypatch.setattr(sheepdog.stored_request, "server_for", lambda config: FakeServer())


def world(tmp_path: Path, **kwargs: Any) -> World:
    return World(tmp_path, **kwargs)


# --- the clock: when the watcher asks at all ----------------------------------------


def test_poll_asks_the_scheduler_only_when_due_and_backs_off(tmp_path: Path) -> None:
    w = world(tmp_path, retries=1)
    w.scheduler.listing = {"41": {State.RUNNING}}
    w.lease(2)
    asked_at = []
    while w.clock.now < 1060.0:
        w.clock.advance(0.125)  # a binary fraction: the sums are exact
        before = len(w.scheduler.asked("status"))
        w.watcher.poll(w.storage)
        if len(w.scheduler.asked("status")) > before:
            asked_at.append(w.clock.now - 1000.0)
    # first_interval_s, then x1.5 each time up to max_interval_s
    assert asked_at == [2.0, 4.0, 7.0, 11.5, 18.25, 28.375, 43.375, 58.375]
    assert w.counts() == {"leased": 2, "pending": 1}


def test_a_finished_request_asks_the_scheduler_nothing(tmp_path: Path) -> None:
    w = world(tmp_path, retries=0)
    for idx in range(1, N_TASKS + 1):
        assert w.storage.store_result(w.rid, idx, b"r")
    w.check()
    assert w.scheduler.calls == []


def test_a_wait_that_sees_the_request_finish_deletes_its_jobs_left(tmp_path: Path) -> None:
    # Array tasks still queued (or starting) would find nothing to do, and wait for
    # the workers' retry time on a server that stops with the process (CI, ci-15).
    w = world(tmp_path, retries=0)
    w.scheduler.listing = {"41": {State.RUNNING}}
    for idx in range(1, N_TASKS + 1):
        assert w.storage.store_result(w.rid, idx, b"r")
    counts = wait_for_request(w.config.dbfile, w.rid, watcher=w.watcher, storage=w.storage)
    assert counts["done"] == N_TASKS
    name = StoredRequest(w.storage, w.rid).job_name()
    assert w.scheduler.asked("delete") == [("delete", ["41", name])]


def test_a_wait_on_a_request_without_jobs_deletes_nothing(tmp_path: Path) -> None:
    w = world(tmp_path, retries=0)
    rid = w.storage.new_request(b"f", None, [b"a"], settings=request_settings(w.config, 1))
    assert w.storage.store_result(rid, 1, b"r")  # as a task from the cache: no job
    watcher = Watcher(w.config, rid, w.scheduler, clock=w.clock)
    counts = wait_for_request(w.config.dbfile, rid, watcher=watcher, storage=w.storage)
    assert counts["done"] == 1
    assert w.scheduler.calls == []


def test_a_wait_that_times_out_deletes_nothing(tmp_path: Path) -> None:
    w = world(tmp_path, retries=0)
    w.scheduler.listing = {"41": {State.RUNNING}}
    with pytest.raises(SheepdogTimeoutError):
        wait_for_request(w.config.dbfile, w.rid, watcher=w.watcher, storage=w.storage,
                         timeout_s=0)
    assert w.scheduler.asked("delete") == []


# --- job gone: it left the queue with work open -------------------------------------


def test_a_job_gone_with_work_open_is_resubmitted_with_the_accounting_reason(
    tmp_path: Path,
) -> None:
    w = world(tmp_path, retries=1)
    w.lease(2)  # the leases have not run out: the workers died with the job
    w.scheduler.listing = {}
    w.scheduler.accounting_reason = "the array task died with signal SIGKILL"
    w.check()
    assert w.scheduler.asked("accounting") == [("accounting", "41")]
    assert w.scheduler.submitted == [("50", N_TASKS)]
    assert w.counts() == {"pending": N_TASKS}, "leases of a gone job are given back"
    new = w.storage.get_jobs(w.rid)[-1]
    assert new.job_id == "50"
    assert new.why == (
        "job 41 left the queue (the array task died with signal SIGKILL)"
    )
    assert new.continues is False
    assert w.scheduler.host.files, "the job file was put on the host"  # type: ignore[attr-defined]
    assert w.watcher.interval_s == 2.0, "the new job is checked soon"


def test_a_job_gone_when_retries_are_used_up_fails_the_work_with_the_reason(
    tmp_path: Path,
) -> None:
    w = world(tmp_path, retries=0)
    w.lease(2)
    w.scheduler.listing = {}
    w.scheduler.accounting_reason = "exit status 137 on exec1"
    w.check()
    assert w.scheduler.submitted == []
    errors = w.storage.get_task_errors(w.rid)
    assert [idx for idx, _, _ in errors] == [1, 2, 3]
    for _, _, error in errors:
        assert error["kind"] == "job_lost"
        assert error["message"] == (
            "Fake job 41 did not run this task: job 41 left the queue "
            "(exit status 137 on exec1), after 0 resubmission(s)"
        )


def test_resubmissions_stop_at_retries(tmp_path: Path) -> None:
    w = world(tmp_path, retries=2)
    w.scheduler.listing = {}  # every job leaves the queue at once, having done nothing
    for expected in (["41", "50"], ["41", "50", "51"]):
        w.check()
        assert w.job_ids() == expected
        assert w.counts() == {"pending": N_TASKS}
    w.check()
    assert len(w.scheduler.submitted) == 2
    assert w.counts() == {"error": N_TASKS}
    (_, _, error), *_ = w.storage.get_task_errors(w.rid)
    assert error["message"].startswith("Fake job 51 did not run this task: job 51 left")
    assert error["message"].endswith("after 2 resubmission(s)")


def test_a_gone_job_that_made_progress_is_continued_without_using_a_retry(
    tmp_path: Path,
) -> None:
    w = world(tmp_path, retries=0)
    w.lease(1)
    assert w.storage.store_result(w.rid, 1, b"r")
    w.scheduler.listing = {}
    w.check()
    assert w.scheduler.submitted == [("50", 2)], "two tasks left: two array tasks"
    assert w.storage.get_jobs(w.rid)[-1].continues is True
    assert w.counts() == {"done": 1, "pending": 2}


def test_a_passive_watcher_leaves_a_gone_job_to_the_serving_process_then_takes_over(
    tmp_path: Path,
) -> None:
    w = world(tmp_path, retries=1, passive=True)
    w.watcher.takeover_s = 60.0
    w.scheduler.listing = {}
    w.check()
    w.clock.advance(59.0 - w.watcher.interval_s)
    w.check()
    assert w.scheduler.submitted == [] and w.scheduler.asked("accounting") == []
    w.clock.advance(1.0)
    w.check()
    assert w.watcher.passive is False
    assert w.scheduler.submitted == [("50", N_TASKS)]


# --- job in error (Grid Engine's Eqw) ----------------------------------------------


def test_one_job_in_error_is_deleted_with_its_reason_and_the_others_go_on(
    tmp_path: Path,
) -> None:
    w = world(tmp_path, retries=0)
    w.storage.add_job(w.rid, "42", N_TASKS, info={"part": 1})
    w.lease(2)
    w.scheduler.listing = {"41": {State.RUNNING}, "42": {State.ERROR}}
    w.scheduler.reasons = {"42": ["can't chdir to /nowhere"]}
    w.check()
    assert w.scheduler.asked("delete", "error_reasons") == [
        ("error_reasons", "42"), ("delete", ["42"])
    ]
    job42 = w.storage.get_jobs(w.rid)[-1]
    assert job42.state == "error"
    assert job42.info == {
        "part": 1, "reason": "Fake job 42 is in an error state: can't chdir to /nowhere"
    }
    assert w.counts() == {"leased": 2, "pending": 1}, "its work is not failed"
    assert w.scheduler.submitted == []


def test_the_last_job_in_error_fails_the_work_with_its_reason(tmp_path: Path) -> None:
    w = world(tmp_path, retries=0)
    w.lease(2)
    w.scheduler.listing = {"41": {State.ERROR, State.QUEUED}}
    w.check()
    assert ("delete", ["41"]) in w.scheduler.calls
    assert w.scheduler.asked("accounting") == [], "the error reason says why, not qacct"
    errors = w.storage.get_task_errors(w.rid)
    assert len(errors) == N_TASKS
    for _, _, error in errors:
        assert error["kind"] == "job_error"
        # No reason from the scheduler: the message says so rather than nothing.
        assert "Fake job 41 is in an error state: Fake lists the job in an error state" in (
            error["message"]
        )


def test_the_last_job_in_error_is_resubmitted_while_retries_remain(tmp_path: Path) -> None:
    w = world(tmp_path, retries=1)
    w.scheduler.listing = {"41": {State.ERROR}}
    w.scheduler.reasons = {"41": ["no such file: /shared/venv/bin/python"]}
    w.check()
    assert w.scheduler.submitted == [("50", N_TASKS)]
    why = w.storage.get_jobs(w.rid)[-1].why
    assert why == "Fake job 41 is in an error state: no such file: /shared/venv/bin/python"
    assert w.counts() == {"pending": N_TASKS}


# --- stalled work: the job is listed, nobody leases ----------------------------------


def test_expired_leases_go_back_to_pending_while_the_job_runs(tmp_path: Path) -> None:
    w = world(tmp_path, retries=0)
    w.lease(2, expired=True)
    w.scheduler.listing = {"41": {State.RUNNING}}
    w.check()
    assert w.counts() == {"pending": N_TASKS}
    assert [w.storage.get_task(w.rid, idx)["attempts"] for idx in (1, 2, 3)] == [1, 1, 0]
    assert w.scheduler.asked("submit", "delete", "accounting") == []


def test_stalled_pending_work_gets_fresh_array_tasks_after_stall_s(tmp_path: Path) -> None:
    w = world(tmp_path, retries=1)
    w.lease(2, expired=True)  # the node that ran them died; the job is still listed
    w.scheduler.listing = {"41": {State.RUNNING}}
    assert w.watcher.stall_s == 120.0  # 2 * lease_s
    w.check()
    while w.clock.now + w.watcher.interval_s < 1000.0 + w.watcher.stall_s:
        w.check()
    assert w.scheduler.submitted == [], "resubmitted before stall_s"
    w.clock.advance(w.watcher.stall_s)
    w.check()
    assert w.scheduler.submitted == [("50", N_TASKS)]
    why = w.storage.get_jobs(w.rid)[-1].why
    assert why.startswith(f"no worker has leased its {N_TASKS} pending tasks for ")
    assert w.scheduler.asked("delete", "accounting") == [], "the listed job is left alone"
    assert w.storage.get_task_errors(w.rid) == []


def test_progress_restarts_the_stall_clock(tmp_path: Path) -> None:
    w = world(tmp_path, retries=1)
    w.scheduler.listing = {"41": {State.RUNNING}}
    w.check()
    w.clock.advance(w.watcher.stall_s - 20)
    w.lease(1)  # a worker of job 41 finishes a task: progress
    assert w.storage.store_result(w.rid, 1, b"r")
    w.check()
    w.clock.advance(w.watcher.stall_s - 20)
    w.check()
    assert w.scheduler.submitted == [], "stalled counted from before the progress"
    w.clock.advance(20)
    w.check()
    assert w.scheduler.submitted == [("50", 2)]


def test_stalled_work_is_not_resubmitted_while_an_array_task_waits_in_the_queue(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    w = world(tmp_path, retries=1)
    w.scheduler.listing = {"41": {State.QUEUED}}
    with caplog.at_level(logging.WARNING, logger="sheepdog.watch"):
        w.check()
        assert w.scheduler.asked("why_waiting") == [], "asked before it waited long"
        w.clock.advance(w.watcher.stall_s * 10)
        w.check()
    assert w.scheduler.asked("why_waiting") == [("why_waiting", "41")]
    assert "job 41 still waits in the queue" in caplog.text
    assert "queue instance all.q@exec1 is full" in caplog.text
    assert w.scheduler.asked("submit", "delete") == []
    assert w.counts() == {"pending": N_TASKS}


def test_a_job_that_can_never_start_is_deleted_and_its_work_failed(tmp_path: Path) -> None:
    w = world(tmp_path, retries=3)
    w.scheduler.listing = {"41": {State.QUEUED}}
    w.scheduler.waiting = Waiting(["no queue fits"], permanent="unknown resource 'gpu'")
    w.check()
    w.clock.advance(SCHEDULABLE_CHECK_S)
    w.check()
    assert ("delete", ["41"]) in w.scheduler.calls
    assert w.scheduler.submitted == [], "retrying cannot help: it is not resubmitted"
    errors = w.storage.get_task_errors(w.rid)
    assert len(errors) == N_TASKS
    assert {e["kind"] for _, _, e in errors} == {"unschedulable"}
    assert errors[0][2]["message"] == "Fake can never start job 41: unknown resource 'gpu'"


def test_a_passive_watcher_does_not_resubmit_stalled_work(tmp_path: Path) -> None:
    w = world(tmp_path, retries=1, passive=True)
    w.scheduler.listing = {"41": {State.RUNNING}}
    w.check()
    w.clock.advance(w.watcher.stall_s * 10)
    w.check()
    assert w.scheduler.submitted == []


# --- unknown: the scheduler did not answer, or lists a state nobody knows ------------


@pytest.mark.parametrize("failure", ["no answer", "command failed"])
def test_an_unanswered_status_is_unknown_not_gone(tmp_path: Path, failure: str) -> None:
    w = world(tmp_path, retries=0)  # a job taken for gone would fail the work at once
    w.lease(2)
    if failure == "no answer":
        w.scheduler.listing = None
    else:
        w.scheduler.status_error = RemoteCommandError(
            "qstat -u '*'", 255, "", "ssh: connect to host head port 22: Connection refused"
        )
    for _ in range(10):  # long past stall_s and takeover_s
        w.clock.advance(w.watcher.stall_s)
        w.check()
    assert len(w.scheduler.asked("status")) == 10
    assert w.scheduler.asked("accounting", "delete", "submit", "error_reasons") == []
    assert w.counts() == {"leased": 2, "pending": 1}
    assert w.storage.get_task_errors(w.rid) == []
    assert w.job_ids() == ["41"]


def test_a_job_in_an_unknown_state_is_not_gone(tmp_path: Path) -> None:
    w = world(tmp_path, retries=0)
    w.lease(N_TASKS)  # its workers hold every task (a suspended job: Grid Engine's s)
    w.scheduler.listing = {"41": {State.UNKNOWN}}
    for _ in range(10):
        w.clock.advance(w.watcher.stall_s)
        w.check()
    assert w.scheduler.asked("accounting", "delete", "submit", "error_reasons") == []
    assert w.counts() == {"leased": N_TASKS}
    assert w.storage.get_task_errors(w.rid) == []


def test_unknown_then_gone_acts_only_once_the_scheduler_answers(tmp_path: Path) -> None:
    w = world(tmp_path, retries=1)
    w.lease(2)
    w.scheduler.listing = None
    w.check()
    assert w.scheduler.submitted == []
    w.scheduler.listing = {}
    w.check()
    assert w.scheduler.submitted == [("50", N_TASKS)]


# --- never a silent 0 %: workers that do not call in ----------------------------------


def silent_world(tmp_path: Path) -> tuple[World, list[str]]:
    """Job 41 submitted direct for a server on port 9, running; what the watcher tells."""
    w = world(tmp_path, retries=2)
    told: list[str] = []
    w.storage.add_job(w.rid, "42", N_TASKS, info={"finished_before": 0, "part": 1,
                                                  "connect": "direct", "url": "http://x:9/"})
    w.watcher = Watcher(w.config.replace(connect="direct"), w.rid, w.scheduler,
                        server=FakeServer(), clock=w.clock, notify=told.append,  # type: ignore[arg-type]
                        silent_s=30.0)
    w.scheduler.listing = {"41": set(), "42": {State.RUNNING}}
    return w, told


def test_running_array_tasks_that_never_call_in_are_told_with_a_workers_words(
    tmp_path: Path,
) -> None:
    w, told = silent_world(tmp_path)
    for _ in range(12):  # well past silent_s on the fake clock
        w.check()
    assert len(told) == 1, told
    assert "none has called in at http://x:9/ (connect=direct)" in told[0], told
    assert "sheepdog doctor" in told[0] and "cannot reach the server at x:9" in told[0], told


def test_workers_that_called_in_and_then_went_quiet_are_not_told_as_unreachable(
    tmp_path: Path,
) -> None:
    # A worker leased a task, then its node froze: the lease expires, nothing is leased,
    # no result came; the way back to the server worked, so this is a stall, not silence.
    w, told = silent_world(tmp_path)
    w.lease(1)
    w.check()
    assert w.storage.expire_leases(w.rid, now=time.time() + 3600) == 1
    for _ in range(12):
        w.check()
    assert w.counts().get("leased", 0) == 0
    assert not any("none has called in" in message for message in told), told


# --- the tunnel ------------------------------------------------------------------------


def test_a_tunnel_that_cannot_start_is_said_once_until_it_starts_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    w = world(tmp_path, retries=1)
    w.watcher.server = FakeServer()  # type: ignore[assignment]
    answers: list[Any] = [SSHError("the SSH master connection is not open", host="head")] * 3
    answers += [("head", 4100), None, SSHError("down again", host="head")]

    def ensure_tunnel(*args: Any) -> Any:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(sheepdog.worker_address, "ensure_tunnel", ensure_tunnel)
    caplog.set_level(logging.DEBUG, logger="sheepdog.watch")
    for _ in range(6):
        w.watcher._keep_tunnel(w.storage)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 3, said
    assert "could not start again: the SSH master connection is not open" in said[0]
    assert "started again; workers find the relay at head:4100" in said[1]
    assert "could not start again: down again" in said[2]


# --- Grid Engine's answers: the real GridEngine class on a fake head node -----------


HEADER = (
    "job-ID  prior   name       user         state submit/start at     queue"
    "                          slots ja-task-ID\n" + "-" * 100 + "\n"
)


def qstat_line(job: str, state: str, user: str = "sheep") -> str:
    return (
        f"{job:>7} 0.50000 sheepdog_1 {user:<12} {state:<5} 11/25/2026 20:43:18 "
        "all.q@exec1  1 1\n"
    )


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Storage, Config, int]:
    # The config's ssh_user is not who the SSH session logs in as (~/.ssh/config's User).
    config = Config(host="head", ssh_user="not-the-login-user", retries=0,
                    dbfile=str(tmp_path / "db.sqlite"))
    storage = Storage(config.dbfile)
    # Leases may expire twice more; retries=0: no resubmission.
    settings = {**request_settings(config, 3), "max_attempts": 3}
    rid = storage.new_request(b"f", None, [b"a", b"b", b"c"], settings=settings)
    storage.add_job(rid, "41", 3)
    storage.lease(rid, worker="w", host="exec1", max_tasks=2, lease_s=600)
    return storage, config, rid


def test_jobs_running_as_the_login_user_are_not_lost(setup: Any) -> None:
    storage, config, rid = setup
    head = FakeHead({"qstat -u": ok(HEADER + qstat_line("41", "r", user="sheep"))})
    Watcher(config, rid, GridEngine(head))._check(storage)  # type: ignore[arg-type]
    assert head.commands[0] == QSTAT_COMMAND
    assert "not-the-login-user" not in " ".join(head.commands)
    assert storage.task_counts(rid)["leased"] == 2
    assert storage.task_counts(rid)["error"] == 0


@pytest.mark.parametrize(
    "answer",
    [
        CommandResult("", 1, "", "error: unable to contact qmaster using port 6444 on host head"),
        CommandResult("", 2, HEADER, ""),
    ],
)
def test_a_failed_qstat_is_unknown_not_gone(
    setup: Any, answer: CommandResult, caplog: pytest.LogCaptureFixture
) -> None:
    storage, config, rid = setup
    head = FakeHead({"qstat -u": answer})
    with caplog.at_level(logging.WARNING, logger="sheepdog.watch"):
        Watcher(config, rid, GridEngine(head))._check(storage)  # type: ignore[arg-type]
    assert storage.task_counts(rid) == {**storage.task_counts(rid), "leased": 2, "error": 0}
    assert head.commands == [QSTAT_COMMAND]  # no qacct, no qdel, no qsub
    assert "the cluster did not answer" in caplog.text


def test_one_job_in_eqw_is_deleted_alone(setup: Any) -> None:
    storage, config, rid = setup
    storage.add_job(rid, "42", 3)
    head = FakeHead({
        "qstat -u": ok(HEADER + qstat_line("41", "r") + qstat_line("42", "Eqw")),
        "qstat -j 42": ok("error reason    1:   can't chdir to /nowhere\n"),
    })
    Watcher(config, rid, GridEngine(head))._check(storage)  # type: ignore[arg-type]
    assert "qdel 42" in head.commands
    assert not any(c.startswith("qdel") and "41" in c for c in head.commands)
    counts = storage.task_counts(rid)
    assert counts["leased"] == 2 and counts["pending"] == 1 and counts["error"] == 0
    (job,) = [j for j in storage.get_jobs(rid) if j.job_id == "42"]
    assert job.state == "error"
    assert "can't chdir to /nowhere" in (job.reason or "")


def test_the_last_job_in_eqw_fails_the_work_with_its_reason(setup: Any) -> None:
    storage, config, rid = setup
    head = FakeHead({
        "qstat -u": ok(HEADER + qstat_line("41", "Eqw")),
        "qstat -j 41": ok("error reason    1:   can't chdir to /nowhere\n"),
    })
    Watcher(config, rid, GridEngine(head))._check(storage)  # type: ignore[arg-type]  # retries=0
    errors = storage.get_task_errors(rid)
    assert len(errors) == 3
    assert all(e["kind"] == "job_error" and "/nowhere" in e["message"] for _, _, e in errors)


def test_tasks_lost_with_their_jobs_finish_now_not_in_ten_years(setup: Any) -> None:
    storage, config, rid = setup
    storage.conn.execute(  # the tasks are on their last attempt
        "UPDATE requests SET settings = json_set(settings, '$.max_attempts', 1)"
    )
    head = FakeHead({"qstat -u": ok(HEADER), "qacct": CommandResult("", 1, "", "")})
    before = time.time()
    Watcher(config, rid, GridEngine(head))._check(storage)  # type: ignore[arg-type]
    finished = storage.conn.execute(
        "SELECT finished FROM tasks WHERE request_id = ? AND state = 'error'", (rid,)
    ).fetchall()
    assert len(finished) == 3
    assert all(before - 1 <= f <= time.time() + 1 for (f,) in finished)


def test_a_passive_watcher_waits_for_the_serving_process_then_takes_over(setup: Any) -> None:
    storage, config, rid = setup
    head = FakeHead({"qstat -u": ok(HEADER), "qacct": CommandResult("", 1, "", "")})
    watcher = Watcher(config, rid, GridEngine(head), passive=True,  # type: ignore[arg-type]
                      takeover_s=0.0)
    watcher._check(storage)
    assert storage.task_counts(rid)["error"] == 0, "acted before giving the server its chance"
    watcher._check(storage)
    errors = storage.get_task_errors(rid)
    assert len(errors) == 3 and all(e["kind"] == "job_lost" for _, _, e in errors)


def _gone_after(storage: Storage, rid: int, finished_before: int) -> None:
    """Job 41 was submitted when ``finished_before`` tasks were done; now it has left."""
    storage.conn.execute(
        "UPDATE jobs SET info = json_object('finished_before', ?) WHERE job_id = '41'",
        (finished_before,),
    )


def test_jobs_that_made_progress_are_continued_not_counted_as_retries(
    setup: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, config, rid = setup  # retries=0
    storage.conn.execute(  # one task done by job 41's workers
        "UPDATE tasks SET state = 'done', lease = NULL WHERE request_id = ? AND idx = 1",
        (rid,),
    )
    _gone_after(storage, rid, 0)
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(
        sheepdog.submit_jobs, "submit_request", lambda *_, **kwargs: calls.append(kwargs) or "43"
    )
    head = FakeHead({"qstat -u": ok(HEADER), "qacct": CommandResult("", 1, "", "")})
    Watcher(config, rid, GridEngine(head))._check(storage)  # type: ignore[arg-type]
    assert len(calls) == 1
    assert calls[0]["continues"] is True
    assert "job 41 left the queue" in calls[0]["why"]
    assert storage.task_counts(rid)["error"] == 0


def test_jobs_that_made_no_progress_count_against_retries(
    setup: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, config, rid = setup  # retries=0
    _gone_after(storage, rid, 0)
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(
        sheepdog.submit_jobs, "submit_request", lambda *_, **kwargs: calls.append(kwargs) or "43"
    )
    head = FakeHead({"qstat -u": ok(HEADER), "qacct": CommandResult("", 1, "", "")})
    Watcher(config, rid, GridEngine(head))._check(storage)  # type: ignore[arg-type]
    assert calls == []
    assert storage.task_counts(rid)["error"] == 3


def test_a_rerun_gets_its_own_resubmissions(
    setup: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, config, rid = setup
    config = config.replace(retries=1)
    storage.add_job(rid, "42", 3)  # request's one resubmission is used up
    storage.conn.execute(
        "UPDATE tasks SET state = 'error', lease = NULL, error = '{\"kind\": \"job_lost\"}'"
        " WHERE request_id = ?", (rid,)
    )
    assert storage.rerun_tasks(rid, ["lost"]) == [1, 2, 3]
    storage.add_job(rid, "43", 3)  # the rerun's job, which then leaves the queue
    resubmitted: list[int] = []
    monkeypatch.setattr(sheepdog.submit_jobs, "submit_request",
                        lambda jobs, **_: resubmitted.append(jobs.request_id))
    head = FakeHead({"qstat -u": ok(HEADER), "qacct": CommandResult("", 1, "", "")})
    Watcher(config, rid, GridEngine(head))._check(storage)  # type: ignore[arg-type]
    assert resubmitted == [rid]
    assert storage.task_states(rid) == ["pending"] * 3


def test_a_job_in_a_state_the_module_does_not_know_is_not_gone(setup: Any) -> None:
    storage, config, rid = setup  # retries=0: a job taken for gone would fail the work
    head = FakeHead({"qstat -u": ok(HEADER + qstat_line("41", "t")), "qacct": ok("")})
    Watcher(config, rid, GridEngine(head))._check(storage)  # type: ignore[arg-type]
    assert storage.task_counts(rid)["leased"] == 2
    assert storage.task_counts(rid)["error"] == 0
    assert not any(c.startswith(("qacct", "qdel", "qsub")) for c in head.commands)


class SpoolingHead(FakeHead):
    """A head node whose files are this machine's (in a test's directory): it has a spool."""

    def list_dir(self, directory: str) -> list[str] | None:
        self.commands.append(f"list {directory}")
        return LocalHost().list_dir(directory)

    def read_bytes(self, path: str, max_bytes: int | None = None) -> bytes:
        return LocalHost().read_bytes(path, max_bytes)

    def remove(self, path: str) -> None:
        LocalHost().remove(path)

    def rename(self, source: str, target: str) -> None:
        LocalHost().rename(source, target)


def test_the_watcher_collects_the_spool_before_it_resubmits(
    setup: Any, tmp_path: Path
) -> None:
    """The laptop woke up: the jobs are gone, and what the workers spooled is stored first."""
    storage, config, rid = setup
    config = config.replace(ssh_dir=str(tmp_path / "jobs"))
    head = SpoolingHead({"qstat -u": ok(HEADER), "qacct": CommandResult("", 1, "", "")})
    directory = spool_directory(storage, config, head, rid)
    value = base64.b64encode(pickle.dumps("spooled")).decode()
    stub.spool_results(directory, storage.get_secret(rid), rid, [
        {"index": 2, "lease": "L", "ok": True, "value": value, "stdout": "", "stderr": "",
         "duration_s": 0.1},
    ], {})
    Watcher(config, rid, GridEngine(head))._check(storage)
    assert f"list {directory}" in head.commands
    assert storage.get_task(rid, 2)["state"] == "done"
    assert pickle.loads(storage.get_results(rid)[0][1]) == "spooled"
    assert os.listdir(directory) == []
    # retries=0: the rest is failed, not resubmitted; the spooled task is not among them.
    assert sorted(index for index, _, _ in storage.get_task_errors(rid)) == [1, 3]


# --- waiting on a request, and what a request keeps -----------------------------------


def test_a_wait_ends_when_the_server_commits_the_last_result_not_at_its_next_poll(
    tmp_path: Path,
) -> None:
    # The whole check comes once an hour here: only the quick check (has the server
    # committed? is any task still open?) can end this wait within the join's bound.
    dbfile = str(tmp_path / "db.sqlite")
    with Storage(dbfile) as server_side, Storage(dbfile, create=False) as waiting_side:
        rid = server_side.new_request(b"F", b"", [b"a1", b"a2"])
        whole_checks: list[float] = []
        first_check = threading.Event()
        counts_of = waiting_side.task_counts

        def task_counts(request_id: int) -> dict[str, int]:
            whole_checks.append(time.monotonic())
            first_check.set()
            return counts_of(request_id)

        waiting_side.task_counts = task_counts  # type: ignore[method-assign]
        some_open = threading.Event()
        open_of = waiting_side.has_open_tasks

        def has_open_tasks(request_id: int) -> bool:
            found = open_of(request_id)
            if found:
                some_open.set()
            return found

        waiting_side.has_open_tasks = has_open_tasks  # type: ignore[method-assign]
        answer: list[dict[str, int]] = []
        waiter = threading.Thread(target=lambda: answer.append(wait_for_request(
            dbfile, rid, storage=waiting_side, watch=False, poll_s=3600, max_poll_s=3600)),
            daemon=True)  # a wait that misses the result must not hold the test run
        waiter.start()
        assert first_check.wait(30)
        leases = server_side.lease(rid, worker="w", host="h", max_tasks=2, lease_s=60)
        server_side.complete(rid, [{"index": lease.index, "ok": True, "value": b"R",
                                    "lease": lease.lease} for lease in leases[:1]])
        assert some_open.wait(30)  # the quick check saw that commit, one task still open
        assert waiter.is_alive() and len(whole_checks) == 1
        server_side.complete(rid, [{"index": lease.index, "ok": True, "value": b"R",
                                    "lease": lease.lease} for lease in leases[1:]])
        waiter.join(30)
        assert not waiter.is_alive(), "the wait missed the last result"
    assert answer == [{"pending": 0, "leased": 0, "done": 2, "error": 0, "cancelled": 0}]
    assert len(whole_checks) == 2


def test_waiting_on_a_missing_database_does_not_create_it(tmp_path: Path) -> None:
    missing = tmp_path / "typo.sqlite"
    with pytest.raises(StorageError, match="no sheepdog database at"):
        wait_for_request(str(missing), 1, timeout_s=1)
    assert list(tmp_path.iterdir()) == []


def test_the_request_stores_its_config_without_secrets(setup: Any) -> None:
    storage, config, rid = setup
    request = StoredRequest(storage, rid)
    assert request.stored_config() == config
    name = request.job_name()
    assert name.startswith(f"sheepdog_{rid:03d}_") and name.endswith(".py")
    assert storage.get_secret(rid) not in str(storage.get_settings(rid))


def test_status_wait_on_a_mistyped_dbfile_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "typo.sqlite"
    with pytest.raises(SystemExit) as info:
        cli.main(["status", "1", "--wait", "--dbfile", str(missing)])
    assert info.value.code == 1
    assert f"no sheepdog database at {missing}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_served_asks_where_the_server_listens_not_the_workers_name(tmp_path: Path) -> None:
    """The callback URL's host may resolve only on the cluster (host.docker.internal)."""
    dbfile = str(tmp_path / "db.sqlite")
    with Storage(dbfile) as storage:
        rid = storage.new_request(b"F", None, [b"x"], settings={"lease_s": 30.0})
        with Server(None, None, dbfile, host="127.0.0.1", workers=1, threads=2) as server:
            storage.add_job(rid, "1", 1, info={
                "url": f"http://cluster-only-name.invalid:{server.port}/",
                "port": server.port, "listen_address": "127.0.0.1"})
            assert served(storage, rid) is True
        assert served(storage, rid) is False
