"""One object owns a map: the config, the store, the scheduler and the server of one database.

:class:`Session` is what every entry point works through (``sheepdog.map`` and
its siblings in :mod:`sheepdog.api`, the :class:`~sheepdog.Executor`, the
CLI's ``cancel``): one :class:`~sheepdog.storage.Storage` connection and one
scheduler connection, opened when the session starts and closed with it, so a
map opens its database once and resolves the job directory once. The lifecycle
follows testcontainers: constructing has no side effects, :meth:`Session.start`
(or ``with``) does the work, ``with`` cleans up when starting fails halfway,
and :meth:`Session.close` is safe to call twice.

:class:`Session` is made of one class a concern: :mod:`._session_resources`
(its lifecycle, and the store, scheduler, server and job directory it owns),
:mod:`._session_submit` (storing a request and submitting its job), and here,
watching it, reading its results and stopping it.
"""

from __future__ import annotations

import logging
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import serialisation
from .error_policy import ErrorPolicy
from .errors import RemoteError, SheepdogError, TaskFailedError
from .errors import TimeoutError as SheepdogTimeoutError
from .hints import sheepdog_command
from .scheduler import Deletion
from .session_submit import CACHE_CHOICES, Submitting, _quiet, check_cache
from .session_submit import function_name as function_name
from .store import OPEN_STATES, FailureKind
from .store.queue import LOST_KINDS
from .watch import Watcher, wait_for_request

__all__ = [
    "CACHE_CHOICES",
    "Cancellation",
    "Session",
    "check_cache",
    "failure_summary",
]

logger = logging.getLogger(__name__)

#: Width that map's printed summary keeps to (a terminal's 80 columns, less one).
SUMMARY_COLUMNS = 79
#: Lines that map's summary gives the first error before it cuts it.
SUMMARY_LINES = 4


def _say(message: str) -> None:
    """Tell a person watching a blocking map what is happening (stderr, as the bar).

    Folded between words to the terminal's 80 columns (a local job id is 12 digits).
    """
    print(textwrap.fill(f"sheepdog: {message}", SUMMARY_COLUMNS + 1, subsequent_indent="  ",
                        break_long_words=False, break_on_hyphens=False),
          file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Cancellation:
    """What cancelling a request did: tasks cancelled here, jobs deleted there."""

    request_id: int
    n_tasks: int
    jobs: Deletion = field(default_factory=lambda: Deletion([], None))

    def what(self) -> str:
        """What was cancelled and deleted, without naming the request."""
        return f"cancelled {self.n_tasks} open tasks; {self.jobs.describe()}"

    def describe(self) -> str:
        """One line: the request, what was cancelled and what was deleted."""
        return f"request {self.request_id}: {self.what()}"


def failure_summary(
    failed: list[tuple[Any, RemoteError]], n_tasks: int, request_id: int, dbfile: str,
    *, exits: str = "",
) -> str:
    """What map prints when tasks failed: the request, how many, the first error, where to look.

    The first error is folded to 80 columns, not cut, up to ``SUMMARY_LINES`` lines:
    its end names what is missing (a module) or where the task was lost. ``exits``
    is how the request's array tasks exited (the scheduler's accounting), added to a
    lost task's error, which has no exception of its own.
    """
    errors = [error for _, error in failed]
    n_cancelled = sum(1 for error in errors if error.kind == FailureKind.CANCELLED)
    n_failed = len(errors) - n_cancelled
    parts = [f"{n_failed} of {n_tasks} tasks failed"] if n_failed else []
    if n_cancelled:
        were = "was" if n_cancelled == 1 else "were"
        parts.append(f"{n_cancelled}{'' if n_failed else f' of {n_tasks} tasks'} {were} cancelled")
    first = next((e for e in errors if e.kind != FailureKind.CANCELLED), errors[0])
    why = first.summary + (f" ({exits})" if exits and first.kind in LOST_KINDS else "")
    head = f"sheepdog: request {request_id}: {' and '.join(parts)}; task {first.task_index}: {why}"
    lines = textwrap.wrap(head, SUMMARY_COLUMNS, subsequent_indent="  ", break_on_hyphens=False)
    if len(lines) > SUMMARY_LINES:
        lines = lines[:SUMMARY_LINES]
        lines[-1] = lines[-1][: SUMMARY_COLUMNS - 4] + " ..."
    return "\n".join([*lines, f"sheepdog: see sheepdog.get_errors({request_id}, {dbfile!r})"])


class Session(Submitting):
    """Owns one database's store, scheduler and server; submits, watches, cancels requests.

    ``config`` is a :class:`~sheepdog.Config`, the original's dict or a JSON
    file path. Without one (``dbfile=`` only) the session reads and waits, but
    submits nothing. ``scheduler`` is one already open (the caller closes it);
    without it the session opens the config's, which connects on its first
    command, so reading results never connects to the cluster.
    ``create=False`` refuses a database that does not exist instead of
    creating it.
    """

    # -- watching -------------------------------------------------------------------

    def watcher(self, request_id: int, notify: Callable[[str], None] | None = None) -> Watcher:
        """The watcher of a request this session submitted, or serves again (``attach``).

        It keeps the session's server running, unless the request has no job (every
        task from the cache): then there is no server to start, and nothing to act on.
        ``notify`` tells a person watching what they must know (no worker calls in).
        """
        request = self.request(request_id)
        server = self.server if request.latest_job() is not None else None
        return Watcher.for_request(request, self.config, self.scheduler, server, notify=notify)

    def watch(
        self,
        request_id: int,
        *,
        timeout_s: float | None = None,
        verbose: bool = False,
        watcher: Watcher | None = None,
        passive: bool = False,
    ) -> dict[str, int]:
        """Wait until every task of the request is finished; return the counts.

        With ``passive``, the request's stored config watches its jobs (any process
        may wait on any request); else ``watcher``, by default this session's
        (:meth:`watcher`), so the jobs are watched (resubmitted, failed) while it waits.
        """
        if watcher is None and not passive:
            watcher = self.watcher(request_id)
        return wait_for_request(
            self.dbfile, request_id, verbose=verbose, timeout_s=timeout_s,
            watcher=None if passive else watcher, watch=passive, storage=self.storage,
        )

    def map(
        self,
        f: Callable[..., Any],
        args: Iterable[Any],
        ns: Mapping[str, Any] | None = None,
        *,
        verbose: bool = True,
        errors: str = "none",
        timeout_s: float | None = None,
        cache: bool | str = False,
    ) -> list[Any]:
        """Submit, wait and return the results in order (see :func:`sheepdog.map`)."""
        policy = ErrorPolicy.parse(errors)
        cfg = self.config
        arg_list = list(args)
        if not arg_list:  # nothing to run: no request, no job
            return []
        request_id = self.submit(f, arg_list, ns, cache=cache, say=_say if verbose else _quiet)
        bound = timeout_s if timeout_s is not None else cfg.timeout_s
        watcher = self.watcher(request_id, notify=_say if verbose else None)
        try:
            self.watch(request_id, timeout_s=bound, verbose=verbose, watcher=watcher)
        except KeyboardInterrupt:
            line = f"request {request_id}: " + self.stop(request_id, "cancelled by Ctrl-C")
            print(f"sheepdog: interrupted: {line}", file=sys.stderr, flush=True)
            raise KeyboardInterrupt(line) from None
        except SheepdogTimeoutError:
            assert bound is not None
            done = len(arg_list) - self._count_open(request_id)
            line = self.stop(request_id, f"cancelled: timeout_s={bound:g} ran out")
            raise SheepdogTimeoutError(
                f"request {request_id}: {done} of {len(arg_list)} tasks finished within "
                f"{bound:g} s; {line}"
            ) from None
        values = self.values(request_id)
        failed = self.errors(request_id)
        if failed and policy is ErrorPolicy.RAISE:
            raise TaskFailedError(
                f"{len(failed)} of {len(arg_list)} tasks of request {request_id} failed; "
                f"the first: {failed[0][1]}",
                [err for _, err in failed],
            )
        if failed and verbose:
            lost = any(error.kind in LOST_KINDS for _, error in failed)
            exits = self.exit_reasons(request_id) if lost else ""
            print(failure_summary(failed, len(arg_list), request_id, self.dbfile, exits=exits),
                  flush=True)
        return values

    # -- reading --------------------------------------------------------------------

    def exit_reasons(self, request_id: int) -> str:
        """How the request's array tasks ended badly (exit status, signal), or ""."""
        reasons: list[str] = []
        for job in self.storage.get_jobs(request_id)[-3:]:
            try:
                why = self.scheduler.accounting(job.job_id)
            except SheepdogError as exc:  # the accounting is a hint: never fail a map on it
                logger.info("no accounting for job %s: %s", job.job_id, exc)
                continue
            if why and why not in reasons:
                reasons.append(why)
        return "; ".join(reasons)

    def results(self, request_id: int) -> list[tuple[Any, Any]]:
        """``[(arg, result)]`` of every task, in order; None where there is no result."""
        storage = self.storage
        rows = storage.get_tasks_with_stored_results(request_id)

        def load(stored: bytes | str) -> Any:
            # From the blob's file when large: no second copy of the value as a pickle.
            with storage.open_value(stored) as f:
                return serialisation.deserialise_file(f)

        return [(load(arg), None if result is None else load(result)) for arg, result in rows]

    def values(self, request_id: int) -> list[Any]:
        """The result of every task, in order, None where there is none: what ``map`` returns.

        The arguments are not read back: for large ones that would cost as much as
        sending them.
        """
        storage = self.storage

        def load(stored: bytes | str) -> Any:
            with storage.open_value(stored) as f:
                return serialisation.deserialise_file(f)

        return [None if result is None else load(result)
                for _, result in storage.get_tasks_with_stored_results(request_id)]

    def errors(self, request_id: int) -> list[tuple[Any, RemoteError]]:
        """``[(arg, error)]`` of every failed task; each error holds the remote traceback."""
        return [
            (
                serialisation.deserialise_value(arg),
                RemoteError.from_dict(error, request_id=request_id, task_index=index),
            )
            for index, arg, error in self.storage.get_task_errors(request_id)
        ]

    def output(self, request_id: int, index: int) -> tuple[str, str]:
        """The captured ``(stdout, stderr)`` of one task (empty until it finished)."""
        task = self.storage.get_task(request_id, index)
        return task.get("stdout") or "", task.get("stderr") or ""

    def _count_open(self, request_id: int) -> int:
        counts = self.storage.task_counts(request_id)
        return sum(counts.get(state, 0) for state in OPEN_STATES)

    # -- stopping -------------------------------------------------------------------

    def delete_jobs(self, request_id: int) -> Deletion:
        """Delete the request's jobs (by the ids recorded and by its job name); say what went."""
        return self._delete(self.scheduler, request_id)

    def cancel(self, request_id: int, reason: str = "cancelled by sheepdog.cancel") -> Cancellation:
        """Mark the request's open tasks cancelled and delete its jobs; say what was done."""
        n = self.storage.cancel(request_id, reason)
        return Cancellation(request_id, n, self.delete_jobs(request_id))

    def stop(self, request_id: int, reason: str) -> str:
        """Stop a request whose wait ended early (Ctrl-C, a timeout); say how, without its id.

        The one rule: cancel it, unless ``keep_jobs_on_interrupt``, which leaves
        its jobs running and says how to serve or cancel them later.
        """
        if not self.config.keep_jobs_on_interrupt:
            return self.cancel(request_id, reason).what()
        job_ids = [job.job_id for job in self.storage.get_jobs(request_id)]
        serve = sheepdog_command("serve", dbfile=self.dbfile)
        cancel = sheepdog_command("cancel", request_id, "--config", "FILE", dbfile=self.dbfile)
        return (
            f"{self._count_open(request_id)} tasks are still open and "
            f"{self.scheduler.label} job {', '.join(job_ids) or '(none recorded)'} is left "
            "running (keep_jobs_on_interrupt); nothing serves it once this process exits: run "
            f"`{serve}` or cancel it with `{cancel}`"
        )

    def job_name(self, request_id: int) -> str:
        """The name of the request's jobs (known before they are submitted)."""
        return self.request(request_id).job_name()
