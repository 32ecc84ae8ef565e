"""Wait for a request to finish, and watch its jobs so the wait can end.

The wait polls SQLite (cheap, local). The :class:`Watcher` also asks the
scheduler (:mod:`sheepdog.scheduler`), with a backoff, what became of the
request's jobs: a job in an error state is deleted and its work goes to the
request's other jobs or to fresh ones; when every job has left the queue with
work still open, that work is resubmitted, up to ``retries`` times, and then
failed with the reason the scheduler's accounting gives. A status query that
fails or does not answer tells nothing: nothing is expired or resubmitted on it.

Any process can watch a request: the config is stored with it. A process that
does not serve the request watches *passively* and takes over resubmission only
when the jobs have been gone for a while and nobody else acted.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import spool, submit_jobs
from .environment import mismatch_warning
from .errors import SheepdogError
from .errors import TimeoutError as SheepdogTimeoutError
from .poll import poll_until
from .progress import Progress, ended, finished_by_workers, started
from .scheduler import Deletion, Scheduler
from .sizing import array_size
from .store import OPEN_STATES, FailureKind, JobState, Storage, TaskState
from .stored_request import StoredRequest
from .watch_reach import ERR_TAIL_LINES as ERR_TAIL_LINES
from .watch_reach import WorkerReach

if TYPE_CHECKING:
    from .config import Config
    from .server import Server

__all__ = ["Watcher", "wait_for_request"]

logger = logging.getLogger(__name__)

#: A passive watcher takes over a request whose jobs have all been gone this long.
TAKEOVER_S = 60.0
#: A job waiting this long with nothing running is asked why (Grid Engine's qstat -j).
SCHEDULABLE_CHECK_S = 10.0
#: Array tasks that run this long with none calling in are reported (and ``connect="auto"``
#: moves to the tunnel): long enough for a worker's Python to start on a busy node.
SILENT_S = 30.0


class _Every:
    """Says when something is due: at most once every ``every_s`` seconds (for warnings)."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last: float | None = None

    def due(self, now: float) -> bool:
        """True if ``every_s`` have passed since it last was (or it never was); then, not."""
        if self._last is not None and now - self._last < self.every_s:
            return False
        self._last = now
        return True


class Watcher(WorkerReach):
    """Checks a request's jobs now and then, and acts on what it finds."""

    def __init__(
        self,
        config: Config,
        request_id: int,
        scheduler: Scheduler,
        *,
        first_interval_s: float = 2.0,
        max_interval_s: float = 15.0,
        server: Server | None = None,
        passive: bool = False,
        takeover_s: float = TAKEOVER_S,
        clock: Callable[[], float] = time.monotonic,
        notify: Callable[[str], None] | None = None,
        silent_s: float | None = None,
    ) -> None:
        self.config = config
        #: Seconds from a fixed point (``time.monotonic``); a test passes a fake clock.
        self.clock = clock
        self.request_id = request_id
        self.scheduler = scheduler
        self.interval_s = first_interval_s
        self.max_interval_s = max_interval_s
        self._next_check = clock() + first_interval_s
        #: Pending work that nobody leases for this long, with no array task queued, gets
        #: fresh array tasks (the node running them may be dead).
        self.stall_s = max(30.0, 2 * config.lease_s)
        self._progress: tuple[int, int] | None = None
        self._progress_at = clock()
        self.server = server
        #: True in a process that does not serve the request: it leaves resubmission to
        #: the process that does, unless the jobs stay gone for ``takeover_s``.
        self.passive = passive
        self.takeover_s = takeover_s
        self._gone: tuple[tuple[str, ...], float] | None = None
        #: Tells a person watching (map's stderr) what they must know, besides the log.
        self.notify = notify
        self.silent_s = SILENT_S if silent_s is None else silent_s
        self._env_told = False  # whether the workers' module versions were looked at
        self._waiting_warning = _Every(60.0)  # a job that waits in the queue, said this often

    @classmethod
    def for_request(
        cls,
        request: StoredRequest,
        config: Config,
        scheduler: Scheduler,
        server: Server | None,
        *,
        notify: Callable[[str], None] | None = None,
    ) -> Watcher:
        """The watcher of a stored request, as every caller in the library makes it.

        ``server`` is this process's server for the request's jobs, which it keeps
        running; without one the watcher is passive (this process does not serve the
        jobs), and leaves resubmission to the process that does unless they stay gone
        for ``takeover_s``. The constructor's other keywords are for tests.
        """
        return cls(config, request.request_id, scheduler, server=server,
                   passive=server is None, notify=notify)

    def poll(self, storage: Storage) -> None:
        """Check the jobs if it is time to; fail or resubmit work whose jobs are gone."""
        if self.server is not None:
            try:
                if self.server.ensure_running():
                    logger.warning("the server for request %d had died; restarted it",
                                   self.request_id)
            except SheepdogError as exc:
                logger.error("could not restart the server: %s", exc)
        now = self.clock()
        if now < self._next_check:
            return
        self._next_check = now + self.interval_s
        self.interval_s = min(self.max_interval_s, self.interval_s * 1.5)
        self._check_environment(storage)
        try:
            self._check(storage)
        except SheepdogError as exc:
            # The head node being briefly unreachable must not end a long map.
            logger.warning(
                "the cluster did not answer: could not check the jobs of request %d (%s); "
                "nothing is expired or resubmitted until it answers", self.request_id, exc,
            )

    def _check_environment(self, storage: Storage) -> None:
        """Once the first workers have reported, warn once if their modules differ."""
        if self._env_told:
            return
        reports = storage.worker_environments(self.request_id)
        if not reports:
            return
        self._env_told = True
        warning = mismatch_warning(self.request_id, reports)
        if warning is not None:
            self._tell(warning)

    def _check(self, storage: Storage) -> None:
        rid = self.request_id
        storage.expire_leases(rid)
        counts = storage.task_counts(rid)
        pending, leased = counts.get(TaskState.PENDING, 0), counts.get(TaskState.LEASED, 0)
        if not pending and not leased:
            return
        records = storage.get_jobs(rid)
        jobs = [job.job_id for job in records]
        if not jobs:
            return
        listing = self.scheduler.status(jobs)
        if listing is None:
            return  # the scheduler did not answer: the jobs' state is unknown, not gone
        live = []
        for job in jobs:
            if job not in listing:
                continue
            if listing[job].in_error:
                self._delete_job_in_error(storage, job)
            else:
                live.append(job)
        now = self.clock()
        progress = (finished_by_workers(counts), leased)
        if progress != self._progress:
            self._progress, self._progress_at = progress, now
        if live:
            self._gone = None
            self._check_called_in(storage, records, [listing[job] for job in live], counts)
            # A job still listed as running may be on a node that died: Grid Engine can take
            # minutes to notice, while the dead workers' leases have long expired. Work that
            # nobody leases while no array task waits in the queue gets fresh array tasks.
            queued = any(listing[job].queued for job in live)
            stalled_s = now - self._progress_at
            running = any(listing[job].running for job in live)
            if queued and not running and stalled_s > SCHEDULABLE_CHECK_S:
                self._check_schedulable(storage, live[-1], stalled_s)
            if (
                not self.passive and pending and not leased and not queued
                and stalled_s > self.stall_s
            ):
                self._resubmit(
                    storage, jobs, pending,
                    f"no worker has leased its {pending} pending tasks for {stalled_s:.0f} s",
                )
            return
        if self.passive and not self._take_over(tuple(jobs), now):
            return
        # Workers that could not reach the server (a laptop asleep) spooled what they
        # finished before they exited: stored first, it is not run again.
        self.collect_spool(storage)
        # Every job has left the queue, so no worker is left to renew a lease: the
        # leases still open belong to dead workers and their tasks go back to pending.
        storage.expire_leases(rid, every_lease=True)
        open_tasks = storage.open_task_indices(rid)
        if not open_tasks:
            return
        last = storage.latest_job(rid)
        if last is not None and last.state is JobState.ERROR:
            why = last.reason or f"job {last.job_id} was in an error state"
            self._resubmit(
                storage, jobs, len(open_tasks), why, reason=why, kind=FailureKind.JOB_ERROR
            )
            return
        reason = self.scheduler.accounting(jobs[-1])
        self._resubmit(
            storage, jobs, len(open_tasks),
            f"job {jobs[-1]} left the queue" + (f" ({reason})" if reason else ""),
            reason=reason,
        )

    def finish(self, storage: Storage) -> Deletion | None:
        """Delete the finished request's jobs still on the cluster; say what went.

        See :meth:`sheepdog.stored_request.StoredRequest.delete_leftovers`; None when the request
        never had a job.
        """
        self._check_environment(storage)  # a short map may end before the first check
        return StoredRequest(storage, self.request_id).delete_leftovers(self.scheduler)

    def collect_spool(self, storage: Storage) -> spool.Collection:
        """Store the results the request's workers spooled (see :mod:`sheepdog.spool`)."""
        return spool.collect_request_spool(
            storage, self.config, self.scheduler.host, self.request_id
        )

    def _take_over(self, jobs: tuple[str, ...], now: float) -> bool:
        """In a passive watcher: True once the jobs have been gone for ``takeover_s``.

        The process that serves the request resubmits within seconds; if the job list
        has not changed for this long, that process is gone and this one acts.
        """
        if self._gone is None or self._gone[0] != jobs:
            self._gone = (jobs, now)
            return False
        if now - self._gone[1] < self.takeover_s:
            return False
        logger.warning(
            "request %d: its %s jobs left the queue with work open %.0f s ago and "
            "no other process acted; this process takes over", self.request_id,
            self.scheduler.label, now - self._gone[1],
        )
        self.passive = False
        return True

    def _resubmit(
        self,
        storage: Storage,
        jobs: list[str],
        n_open: int,
        why: str,
        *,
        reason: str = "",
        kind: str = FailureKind.JOB_LOST,
    ) -> None:
        """Submit fresh array tasks for the open work, or fail it once retries are used up."""
        rid = self.request_id
        records = storage.get_jobs(rid)
        counts = storage.task_counts(rid)
        finished = finished_by_workers(counts)
        before = records[-1].finished_before if records else None
        # Jobs that finished tasks and left work open (workers that stopped before their
        # run-time limit, tasks_per_worker) are continued, not counted as failures.
        progressed = before is not None and finished > before
        # One submission may be several jobs (a request split at max_aj_tasks): count the
        # first part of each; jobs recorded before the split each count as one. A rerun
        # starts the count afresh: the jobs before it had their own retries.
        resubmits = sum(
            1 for job in records if job.part == 1 and not job.continues and not job.before_rerun
        ) - 1
        if progressed or resubmits < self.config.retries:
            if progressed:
                logger.info(
                    "request %d: %s after finishing %d tasks, with %d undone; continuing",
                    rid, why, finished - int(before or 0), n_open,
                )
            else:
                logger.warning(
                    "request %d: %s with %d tasks undone; resubmitting (%d of %d)",
                    rid, why, n_open, resubmits + 1, self.config.retries,
                )
            # To the config's server (server_for: the one the session registered for it).
            # Looked up on the module at each call: a test may stand in for it.
            submit_jobs.submit_request(
                self._jobs(storage, None),
                n_workers=array_size(self.config, n_open), why=why, continues=progressed,
            )
            self.interval_s = 2.0
            self._progress_at = self.clock()
            return
        message = (
            f"{self.scheduler.label} job {jobs[-1]} did not run this task: {why}, "
            f"after {resubmits} resubmission(s)"
        )
        if reason and reason not in why:
            message += f": {reason}"
        storage.fail_tasks(rid, storage.open_task_indices(rid), kind, message)

    def _check_schedulable(self, storage: Storage, job: str, waited_s: float) -> None:
        """Fail the work of a job the scheduler can never start; say why one is waiting."""
        waiting = self.scheduler.why_waiting(job)
        reasons, problem = waiting.reasons, waiting.permanent
        if problem is not None:
            message = f"{self.scheduler.label} can never start job {job}: {problem}"
            logger.error("request %d: %s", self.request_id, message)
            self.scheduler.delete([job])
            storage.fail_tasks(
                self.request_id, storage.open_task_indices(self.request_id),
                "unschedulable", message,
            )
        elif self._waiting_warning.due(self.clock()):
            logger.warning(
                "request %d: job %s still waits in the queue after %.0f s: %s",
                self.request_id, job, waited_s, "; ".join(reasons[:3]) or "no reason given",
            )

    def _delete_job_in_error(self, storage: Storage, job: str) -> None:
        """Delete one job in an error state (Grid Engine's Eqw) and record why; others go on.

        Its tasks are not failed: those it leased return to pending when their
        leases run out, for the request's other jobs or a resubmission to run.
        """
        label = self.scheduler.label
        reasons = self.scheduler.error_reasons(job)
        why = "; ".join(reasons) or f"{label} lists the job in an error state"
        message = f"{label} job {job} is in an error state: {why}"
        logger.warning("request %d: %s; deleting it", self.request_id, message)
        self.scheduler.delete([job])
        found = next((j for j in storage.get_jobs(self.request_id) if j.job_id == job), None)
        info = {} if found is None else found.with_info()
        storage.set_job_state(self.request_id, job, JobState.ERROR, {**info, "reason": message})

#: How soon a wait notices that its request's last task finished: this often it reads
#: SQLite's counter of other connections' commits and, after one, whether any task is
#: still open (one index probe), rather than waiting for its next whole check.
FINISH_CHECK_S = 0.1


def wait_for_request(
    dbfile: str,
    request_id: int,
    *,
    verbose: bool = False,
    timeout_s: float | None = None,
    watcher: Watcher | None = None,
    watch: bool = True,
    poll_s: float = 0.2,
    max_poll_s: float = 2.0,
    storage: Storage | None = None,
) -> dict[str, int]:
    """Block until every task of the request is done, failed or cancelled; return the counts.

    A wait with a watcher ends by deleting the request's jobs still on the cluster
    (:meth:`Watcher.finish`). Without a ``watcher``, and with ``watch``, a passive
    one is made from the config stored with the request, so that a wait in any
    process ends when the jobs die. Raises :class:`sheepdog.errors.TimeoutError`
    after ``timeout_s`` seconds, and StorageError if ``dbfile`` does not exist (it
    is never created).
    A :class:`~sheepdog.session.Session` passes its open ``storage``.
    """
    start = time.monotonic()
    own: Watcher | None = None
    context: contextlib.AbstractContextManager[Storage] = (
        Storage(dbfile, create=False) if storage is None else contextlib.nullcontext(storage)
    )
    with context as storage:
        total = storage.count_tasks(request_id)
        if watcher is None and watch:
            watcher = own = _passive_watcher(storage, request_id)
        cached = storage.count_cached(request_id)
        label = f"request {request_id}" + (f" ({cached} cached)" if cached else "")
        progress = Progress(total, verbose=verbose, label=label)
        counts: dict[str, int] = {}

        def finished() -> bool:
            nonlocal counts
            counts = storage.task_counts(request_id)
            progress.update(started(counts, len(storage.running_indices(request_id))))
            if not any(counts.get(s, 0) for s in OPEN_STATES):
                if watcher is not None:
                    watcher.finish(storage)
                return True
            if watcher is not None:
                watcher.poll(storage)
            return False

        left_s = None if timeout_s is None else timeout_s - (time.monotonic() - start)
        deadline = None if left_s is None else time.monotonic() + left_s
        seen, due, interval_s = storage.changes_elsewhere(), time.monotonic(), poll_s

        def checked() -> bool:
            # The whole check (counts, progress, the watcher) at intervals growing from
            # poll_s to max_poll_s; in between, after each commit of the server's, only
            # whether a task is still open, so that the wait ends as soon as the last one
            # is not. The last call before the deadline is always a whole check.
            nonlocal seen, due, interval_s
            now, version = time.monotonic(), storage.changes_elsewhere()
            last_done = version != seen and not storage.has_open_tasks(request_id)
            seen = version
            if last_done or now >= due or (deadline is not None and now >= deadline):
                due, interval_s = now + interval_s, min(max_poll_s, interval_s * 1.5)
                return finished()
            return False

        try:
            if poll_until(checked, timeout_s=left_s, interval_s=min(poll_s, FINISH_CHECK_S)):
                return counts
            done = ended(counts)
            raise SheepdogTimeoutError(
                f"request {request_id}: {done} of {total} tasks finished within "
                f"{timeout_s:g} s; the rest are still running. Fetch them later with "
                f"sheepdog.get_results({request_id}, {dbfile!r})"
            )
        finally:
            progress.close()
            if own is not None:
                own.scheduler.close()


def _passive_watcher(storage: Storage, request_id: int) -> Watcher | None:
    """A watcher for a request from its stored config: active if this process serves it."""
    if not storage.open_task_indices(request_id):
        return None
    request = StoredRequest(storage, request_id)
    found = request.stored_scheduler()
    if found is None:
        logger.info("request %d has no stored config: its jobs are not watched", request_id)
        return None
    # map_async then get_results(block=True) in one process: that process is the server
    # and the only one to act, at once, as map would.
    config, scheduler = found
    return Watcher.for_request(request, config, scheduler, request.own_server())
