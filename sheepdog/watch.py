"""Wait for a request to finish, and watch its Grid Engine jobs so the wait can end.

The wait polls SQLite (cheap, local). The :class:`Watcher` also asks the head
node, with a backoff, what became of the request's jobs: a job in an error
state fails its open tasks with qstat's reasons; a job that left the queue
with work still open has that work resubmitted, up to ``retries`` times, and
then failed with the reason qacct gives.
"""

from __future__ import annotations

import logging
import shlex
import time
from typing import TYPE_CHECKING

from ._progress import Progress
from .errors import SheepdogError
from .errors import TimeoutError as SheepdogTimeoutError
from .sge import (
    describe_failure,
    parse_qacct,
    parse_qstat,
    parse_qstat_j_errors,
    parse_scheduling_info,
    permanent_scheduling_problem,
)
from .storage import Storage

if TYPE_CHECKING:
    from .config import Config
    from .deployment import Deployer
    from .server import Server

__all__ = ["Watcher", "wait_for_request"]

logger = logging.getLogger(__name__)

OPEN_STATES = ("pending", "leased")
#: Added to the clock to expire every lease now, whatever its end time.
_FOREVER_S = 10 * 365 * 86400.0
#: A job waiting this long with nothing running is asked why (qstat -j).
SCHEDULABLE_CHECK_S = 10.0


def now_due(owner: object, attribute: str, every_s: float) -> bool:
    """True at most once every ``every_s`` seconds per owner and attribute (for warnings)."""
    now = time.monotonic()
    last = getattr(owner, attribute, None)
    if last is not None and now - last < every_s:
        return False
    setattr(owner, attribute, now)
    return True


class Watcher:
    """Checks a request's Grid Engine jobs now and then, and acts on what it finds."""

    def __init__(
        self,
        config: Config,
        request_id: int,
        deployer: Deployer,
        *,
        first_interval_s: float = 2.0,
        max_interval_s: float = 15.0,
        server: Server | None = None,
    ) -> None:
        self.config = config
        self.request_id = request_id
        self.deployer = deployer
        self.interval_s = first_interval_s
        self.max_interval_s = max_interval_s
        self._next_check = time.monotonic() + first_interval_s
        #: Pending work that nobody leases for this long, with no array task queued, gets
        #: fresh array tasks (the node running them may be dead).
        self.stall_s = max(30.0, 2 * config.lease_s)
        self._progress: tuple[int, int] | None = None
        self._progress_at = time.monotonic()
        self.server = server

    def poll(self, storage: Storage) -> None:
        """Check the jobs if it is time to; fail or resubmit work whose jobs are gone."""
        if self.server is not None and not self.server.alive and not self.server.stopped:
            # Workers retry for minutes, so a server that died (OOM killer, kill -9) is
            # simply started again on its port and the map goes on.
            logger.warning("the server for request %d died; restarting it", self.request_id)
            try:
                self.server.restart()
            except SheepdogError as exc:
                logger.error("could not restart the server: %s", exc)
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.interval_s
        self.interval_s = min(self.max_interval_s, self.interval_s * 1.5)
        try:
            self._check(storage)
        except SheepdogError as exc:
            # The head node being briefly unreachable must not end a long map.
            logger.warning("could not check the jobs of request %d: %s", self.request_id, exc)

    def _check(self, storage: Storage) -> None:
        rid = self.request_id
        storage.expire_leases(rid)
        counts = storage.task_counts(rid)
        pending, leased = counts.get("pending", 0), counts.get("leased", 0)
        if not pending and not leased:
            return
        jobs = [str(job["job_id"]) for job in storage.get_jobs(rid)]
        if not jobs:
            return
        user = shlex.quote(self.config.ssh_user)
        listing = parse_qstat(self.deployer.run(f"qstat -u {user}", check=False).stdout)
        live = [job for job in jobs if job in listing]
        for job in live:
            if listing[job].in_error:
                self._fail_job_in_error(storage, job)
        now = time.monotonic()
        progress = (counts.get("done", 0) + counts.get("error", 0), leased)
        if progress != self._progress:
            self._progress, self._progress_at = progress, now
        if live:
            # A job still listed as running may be on a node that died: Grid Engine can take
            # minutes to notice, while the dead workers' leases have long expired. Work that
            # nobody leases while no array task waits in the queue gets fresh array tasks.
            queued = any("q" in state for job in live for state in listing[job].states)
            stalled_s = now - self._progress_at
            running = any("r" in state for job in live for state in listing[job].states)
            if queued and not running and stalled_s > SCHEDULABLE_CHECK_S:
                self._check_schedulable(storage, live[-1], stalled_s)
            if pending and not leased and not queued and stalled_s > self.stall_s:
                self._resubmit(
                    storage, jobs, pending,
                    f"no worker has leased its {pending} pending tasks for {stalled_s:.0f} s",
                )
            return
        # Every job has left the queue, so no worker is left to renew a lease: the
        # leases still open belong to dead workers and their tasks go back to pending.
        storage.expire_leases(rid, now=time.time() + _FOREVER_S)
        open_tasks = storage.open_task_indices(rid)
        if open_tasks:
            reason = self._accounting_reason(jobs[-1])
            self._resubmit(
                storage, jobs, len(open_tasks),
                f"job {jobs[-1]} left the queue" + (f" ({reason})" if reason else ""),
                reason=reason,
            )

    def _resubmit(
        self, storage: Storage, jobs: list[str], n_open: int, why: str, *, reason: str = ""
    ) -> None:
        """Submit fresh array tasks for the open work, or fail it once retries are used up."""
        rid = self.request_id
        resubmits = len(jobs) - 1
        if resubmits < self.config.retries:
            logger.warning(
                "request %d: %s with %d tasks undone; resubmitting (%d of %d)",
                rid, why, n_open, resubmits + 1, self.config.retries,
            )
            from ._api import array_size, submit_request

            submit_request(
                storage, self.config, rid, self.deployer,
                n_workers=array_size(self.config, n_open),
            )
            self.interval_s = 2.0
            self._progress_at = time.monotonic()
            return
        message = (
            f"Grid Engine job {jobs[-1]} did not run this task: {why}, "
            f"after {resubmits} resubmission(s)"
        )
        if reason and reason not in why:
            message += f": {reason}"
        storage.fail_tasks(rid, storage.open_task_indices(rid), "job_lost", message)

    def _check_schedulable(self, storage: Storage, job: str, waited_s: float) -> None:
        """Fail the work of a job the scheduler can never start; say why one is waiting."""
        details = self.deployer.run(f"qstat -j {job}", check=False)
        reasons = parse_scheduling_info(details.stdout)
        problem = permanent_scheduling_problem(reasons)
        if problem is not None:
            message = f"Grid Engine can never start job {job}: {problem}"
            logger.error("request %d: %s", self.request_id, message)
            self.deployer.run(f"qdel {job}", check=False)
            storage.fail_tasks(
                self.request_id, storage.open_task_indices(self.request_id),
                "unschedulable", message,
            )
        elif now_due(self, "_warned_at", 60.0):
            logger.warning(
                "request %d: job %s still waits in the queue after %.0f s: %s",
                self.request_id, job, waited_s, "; ".join(reasons[:3]) or "no reason given",
            )

    def _fail_job_in_error(self, storage: Storage, job: str) -> None:
        details = self.deployer.run(f"qstat -j {job}", check=False)
        reasons = parse_qstat_j_errors(details.stdout + details.stderr)
        why = "; ".join(reasons) or "qstat shows the job in an error state (Eqw)"
        message = f"Grid Engine job {job} is in an error state: {why}"
        logger.error("request %d: %s", self.request_id, message)
        self.deployer.run(f"qdel {job}", check=False)
        storage.fail_tasks(
            self.request_id, storage.open_task_indices(self.request_id), "job_error", message
        )

    def _accounting_reason(self, job: str) -> str:
        result = self.deployer.run(f"qacct -j {job}", check=False, timeout_s=30)
        if result.exit_status != 0:
            return ""
        reasons = []
        for record in parse_qacct(result.stdout):
            why = describe_failure(record)
            if why and why not in reasons:
                reasons.append(why)
        return "; ".join(reasons[:3])


def wait_for_request(
    dbfile: str,
    request_id: int,
    *,
    verbose: bool = False,
    timeout_s: float | None = None,
    watcher: Watcher | None = None,
    poll_s: float = 0.2,
    max_poll_s: float = 2.0,
) -> dict[str, int]:
    """Block until every task of the request is done, failed or cancelled; return the counts.

    Raises :class:`sheepdog.errors.TimeoutError` after ``timeout_s`` seconds.
    """
    start = time.monotonic()
    deadline = None if timeout_s is None else start + timeout_s
    interval = poll_s
    with Storage(dbfile) as storage:
        total = storage.count_tasks(request_id)
        progress = Progress(total, verbose=verbose, label=f"sheepdog request {request_id}")
        try:
            while True:
                counts = storage.task_counts(request_id)
                progress.update(counts)
                if not any(counts.get(s, 0) for s in OPEN_STATES):
                    return counts
                if watcher is not None:
                    watcher.poll(storage)
                if deadline is not None and time.monotonic() >= deadline:
                    done = total - sum(counts.get(s, 0) for s in OPEN_STATES)
                    raise SheepdogTimeoutError(
                        f"request {request_id}: {done} of {total} tasks finished within "
                        f"{timeout_s:g} s; the rest are still running. Fetch them later with "
                        f"sheepdog.get_results({request_id}, {dbfile!r})"
                    )
                time.sleep(interval)
                interval = min(max_poll_s, interval * 1.5)
        finally:
            progress.close()
