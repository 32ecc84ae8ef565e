"""One object owns a map: the config, the store, the scheduler and the server of one database.

:class:`Session` is what every entry point works through (``sheepdog.map`` and
its siblings in :mod:`sheepdog.api`, the :class:`~sheepdog.Executor`, the
CLI's ``cancel``): one :class:`~sheepdog.storage.Storage` connection and one
scheduler connection, opened when the session starts and closed with it, so a
map opens its database once and resolves the job directory once. The lifecycle
follows testcontainers: constructing has no side effects, :meth:`Session.start`
(or ``with``) does the work, ``with`` cleans up when starting fails halfway,
and :meth:`Session.close` is safe to call twice.
"""

from __future__ import annotations

import logging
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NoReturn

from . import _submit, serialisation, tunnel
from ._hints import sheepdog_command
from ._submit import StoredRequest, array_size, request_settings, server_for
from .config import Config, ConfigLike, as_config
from .errors import RemoteError, SheepdogError, TaskFailedError
from .errors import TimeoutError as SheepdogTimeoutError
from .scheduler import Deletion, Scheduler, check_options, open_scheduler
from .server import Server, registry
from .store import OPEN_STATES, Storage, content_digest
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

#: What ``cache=`` may be: off, on, or recompute (and store for later).
CACHE_CHOICES = (False, True, "refresh")
#: Width that map's printed summary keeps to (a terminal's 80 columns, less one).
SUMMARY_COLUMNS = 79
#: Lines that map's summary gives the first error before it cuts it.
SUMMARY_LINES = 4


def check_cache(cache: object) -> None:
    """Refuse a ``cache=`` value that is not one of :data:`CACHE_CHOICES`."""
    if not (cache is True or cache is False or cache == "refresh"):
        raise ValueError(f"cache must be False, True or 'refresh', got {cache!r}")


def _quiet(message: str) -> None:
    logger.info("%s", message)


def _say(message: str) -> None:
    """Tell a person watching a blocking map what is happening (stderr, as the bar).

    Folded between words to the terminal's 80 columns (a local job id is 12 digits).
    """
    print(textwrap.fill(f"sheepdog: {message}", SUMMARY_COLUMNS + 1, subsequent_indent="  ",
                        break_long_words=False, break_on_hyphens=False),
          file=sys.stderr, flush=True)


def _why(exc: BaseException) -> str:
    text = str(exc).strip()
    return text or type(exc).__name__


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
    n_cancelled = sum(1 for error in errors if error.kind == "cancelled")
    n_failed = len(errors) - n_cancelled
    parts = [f"{n_failed} of {n_tasks} tasks failed"] if n_failed else []
    if n_cancelled:
        were = "was" if n_cancelled == 1 else "were"
        parts.append(f"{n_cancelled}{'' if n_failed else f' of {n_tasks} tasks'} {were} cancelled")
    first = next((e for e in errors if e.kind != "cancelled"), errors[0])
    why = first.summary + (f" ({exits})" if exits and first.kind in LOST_KINDS else "")
    head = f"sheepdog: request {request_id}: {' and '.join(parts)}; task {first.task_index}: {why}"
    lines = textwrap.wrap(head, SUMMARY_COLUMNS, subsequent_indent="  ", break_on_hyphens=False)
    if len(lines) > SUMMARY_LINES:
        lines = lines[:SUMMARY_LINES]
        lines[-1] = lines[-1][: SUMMARY_COLUMNS - 4] + " ..."
    return "\n".join([*lines, f"sheepdog: see sheepdog.get_errors({request_id}, {dbfile!r})"])


def function_name(f: Callable[..., Any]) -> str:
    """``module.qualname`` of a callable, as displays name a request's function.

    A script's own functions (module ``__main__``) go by their name alone.
    """
    name = getattr(f, "__qualname__", None) or type(f).__name__
    module = getattr(f, "__module__", None)
    return f"{module}.{name}" if module not in (None, "builtins", "__main__") else str(name)


class Session:
    """Owns one database's store, scheduler and server; submits, watches, cancels requests.

    ``config`` is a :class:`~sheepdog.Config`, the original's dict or a JSON
    file path. Without one (``dbfile=`` only) the session reads and waits, but
    submits nothing. ``scheduler`` is one already open (the caller closes it);
    without it the session opens the config's, which connects on its first
    command, so reading results never connects to the cluster.
    ``create=False`` refuses a database that does not exist instead of
    creating it.
    """

    def __init__(
        self,
        config: ConfigLike | None = None,
        *,
        dbfile: str | None = None,
        scheduler: Scheduler | None = None,
        create: bool = True,
    ) -> None:
        self._config = None if config is None else as_config(config)
        if dbfile is None:
            if self._config is None:
                raise ValueError("a Session needs a config or a dbfile")
            dbfile = self._config.dbfile
        self.dbfile = dbfile
        self._create = create
        self._given = scheduler
        self._scheduler: Scheduler | None = None
        self._storage: Storage | None = None
        self._server: Server | None = None
        self._jobdir: str | None = None
        self._state = "new"

    def __repr__(self) -> str:
        return f"<Session dbfile={self.dbfile!r} {self._state}>"

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> Session:
        """Open the scheduler (it connects on first use), then the database; return self."""
        if self._state == "closed":
            raise RuntimeError(f"{self!r} was closed; make a new Session")
        if self._state == "new":
            if self._config is not None and self._scheduler is None:
                # First: a bad ssh_keyfile is refused before the database is even created.
                # Opening connects to nothing yet; that waits for the first command.
                if self._given is not None:
                    # Opened elsewhere (rerun's, a test's): its option rules hold all the same.
                    check_options(self._config)
                self._scheduler = self._given or open_scheduler(self._config)
            self._storage = Storage(self.dbfile, create=self._create)
            self._state = "open"
        return self

    def close(self) -> None:
        """Close the database and the scheduler this session opened; safe to call twice.

        The server keeps running for this database's other maps (it stops at exit).
        """
        self._state = "closed"
        storage, self._storage = self._storage, None
        scheduler, self._scheduler = self._scheduler, None
        try:
            if storage is not None:
                storage.close()
        finally:
            # A connection held open for map_async's tunnel stays open until the process exits.
            if (scheduler is not None and scheduler is not self._given
                    and not tunnel.is_held(scheduler.host)):
                scheduler.close()

    def __enter__(self) -> Session:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- what it owns ---------------------------------------------------------------

    @property
    def config(self) -> Config:
        """The config maps are submitted with (a reading session has none)."""
        if self._config is None:
            raise RuntimeError(f"{self!r} was opened with a dbfile only: it cannot submit")
        return self._config

    @property
    def storage(self) -> Storage:
        """The session's one database connection."""
        if self._storage is None:
            raise RuntimeError(f"{self!r} is not started: use it in a with block")
        return self._storage

    @property
    def scheduler(self) -> Scheduler:
        """The config's scheduler (for Grid Engine, an SSH connection made on first use)."""
        if self._scheduler is None:
            if self._storage is None:
                raise RuntimeError(f"{self!r} is not started: use it in a with block")
            self._scheduler = self._given or open_scheduler(self.config)
        return self._scheduler

    @property
    def server(self) -> Server:
        """The running server the workers call back to (started again if it died)."""
        if self._server is None:
            self._server = server_for(self.config)
        else:
            self._server.ensure_running()
        return self._server

    def serve_again(self, request_id: int) -> Server:
        """The server for a request's job files: on the port they call back to, if it can be.

        This process's own server on that port if it runs one; else one started again
        there, where the last one listened, which the session serves from then on. If that
        port is taken (another process serves it, or something else took it), or the
        config fixes a port, the config's server: jobs resubmitted from here call that one.
        """
        cfg, request = self.config, self.request(request_id)
        own = request.own_server()
        if own is not None:
            self._server = own
            return own
        latest = request.latest_job()
        port = None if latest is None else latest.port
        address = None if latest is None else latest.listen_address
        if port and address and cfg.port is None:
            options = _submit.server_options(cfg, host=address)
            try:
                server = Server(port, None, cfg.dbfile, **options)
            except SheepdogError as exc:
                logger.warning(
                    "request %d: cannot serve again on port %s (%s); its running array tasks "
                    "cannot report here, resubmitted ones will", request_id, port, exc,
                )
            else:
                # submit_request finds it there: resubmitted jobs call this same server.
                registry.adopt(_submit.server_key(cfg), server)
                self._server = server
                return server
        return self.server

    def request(self, request_id: int) -> StoredRequest:
        """The stored request ``request_id`` in this session's database."""
        return StoredRequest(self.storage, request_id)

    @property
    def jobdir(self) -> str:
        """``ssh_dir`` made absolute on the scheduler's host: resolved once per session."""
        if self._jobdir is None:
            self._jobdir = self.scheduler.host.absolute(self.config.ssh_dir)
        return self._jobdir

    # -- submitting -----------------------------------------------------------------

    def submit(
        self,
        f: Callable[..., Any],
        args: Iterable[Any],
        ns: Mapping[str, Any] | None = None,
        *,
        cache: bool | str = False,
        say: Callable[[str], None] = _quiet,
    ) -> int:
        """Serialise ``f`` and each of ``args``, store them and submit the job; return the id."""
        cfg = self.config
        check_cache(cache)
        if not callable(f):
            raise TypeError(f"sheepdog.map needs a callable, got {type(f).__name__}")
        arg_list = list(args)
        payload = serialisation.serialise_function(f, dict(ns) if ns is not None else None,
                                                   mode=cfg.mode)
        blobs = serialisation.serialise_args(arg_list)
        request_id, cached = self.store(payload, blobs, cache=cache, function=function_name(f))
        if cached:
            say(f"request {request_id}: {cached} of {len(blobs)} tasks from the cache")
        if len(blobs) > cached:
            self.launch(request_id, len(blobs) - cached, say=say)
        return request_id

    def store(
        self, payload: bytes, blobs: list[bytes], *, cache: bool | str = False,
        label: str | None = None, function: str | None = None,
    ) -> tuple[int, int]:
        """Store a serialised request; return its id and how many tasks the cache filled.

        With ``cache=True`` the tasks whose function and argument have a result
        take it at once. ``function`` names the function for displays (the
        dashboard), which cannot unpickle its payload to find out.
        """
        storage = self.storage
        options: dict[str, Any] = {} if label is None else {"label": label}
        settings = request_settings(self.config, len(blobs))
        if function is not None:
            settings["function"] = function
        request_id = storage.new_request(
            payload, b"", blobs, func_digest=content_digest(payload),
            args_digests=[content_digest(blob) for blob in blobs],
            settings=settings, **options,
        )
        cached = storage.fill_from_cache(request_id) if cache is True else 0
        return request_id, cached

    def launch(
        self, request_id: int, n_tasks: int, *, say: Callable[[str], None] = _quiet
    ) -> str:
        """Submit the job for ``n_tasks`` open tasks of a stored request; return the job ids.

        If the submission fails, the request's open tasks fail with the reason, a
        job it made before failing is deleted, and the error is raised again.
        """
        scheduler = self.scheduler
        try:
            if self.config.scheduler != "local":
                cfg = self.config
                say(f"connecting to {cfg.ssh_user}@{cfg.host}:{cfg.ssh_port}")
            job_id = self._submit_stored(request_id, array_size(self.config, n_tasks))
        except BaseException as exc:  # noqa: BLE001 - recorded, then raised again
            self._submission_failed(scheduler, request_id, exc)
        jobs = "jobs" if "," in job_id else "job"
        say(f"submitted {jobs} {job_id} for request {request_id} ({n_tasks} "
            "tasks); waiting for workers")
        return job_id

    def resubmit(self, request_id: int, which: Iterable[str]) -> list[int]:
        """Run a request's chosen unfinished tasks again as a new job; return their indices.

        The request runs with the config stored with it (this session's config is
        for a request stored without one).
        """
        storage = self.storage
        self.use_stored_config(request_id)
        indices = storage.rerun_tasks(request_id, which)
        if not indices:
            return []
        self.launch(request_id, len(indices))
        return indices

    def use_stored_config(self, request_id: int) -> Config:
        """Work with the config stored with the request from now on, if it has one.

        Its scheduler, server and job directory follow; the config is returned.
        """
        stored = self.request(request_id).stored_config()
        if stored is not None and stored != self._config:
            self._adopt(stored)
        return self.config

    def _adopt(self, config: Config) -> None:
        if self._scheduler is not None and self._scheduler is not self._given:
            self._scheduler.close()
            self._scheduler = None
        self._config, self._server, self._jobdir = config, None, None

    def _submit_stored(self, request_id: int, n_workers: int, **options: Any) -> str:
        scheduler, jobdir = self.scheduler, self.jobdir  # the head node first, then the server
        jobs = _submit.RequestJobs(self.request(request_id), self.config, scheduler, self.server)
        # Looked up on the module at each call: a test may stand in for it.
        return _submit.submit_request(jobs, n_workers=n_workers, jobdir=jobdir, **options)

    def _submission_failed(
        self, scheduler: Scheduler, request_id: int, exc: BaseException
    ) -> NoReturn:
        """Fail the tasks of a request whose submission failed, after deleting any job it made.

        An interruption (Ctrl-C) or a dropped connection can come after the submission
        went through but before its answer arrived: the job is then found by its unique
        name and deleted, since nothing would ever serve it. Re-raises ``exc`` (a
        KeyboardInterrupt with one line saying what was done).
        """
        storage = self.storage
        label = scheduler.label
        interrupted = isinstance(exc, KeyboardInterrupt)
        recorded = storage.get_jobs(request_id)
        deleted = (
            Deletion([], None) if recorded and not interrupted
            else self._delete(scheduler, request_id)
        )
        if deleted.job_ids:
            message = (
                f"the submission was interrupted ({_why(exc)}) after it had created "
                f"{label} job {', '.join(deleted.job_ids)}, which was deleted"
            )
        elif interrupted:
            message = "the job was never submitted: the submission was interrupted (Ctrl-C)"
            if deleted.error:
                message += f"; whether {label} had made a job of it is unknown ({deleted.error})"
        else:
            message = f"the job was never submitted: {_why(exc)}"
        storage.fail_tasks(request_id, storage.open_task_indices(request_id), "submit", message)
        line = f"request {request_id}: {message}"
        if interrupted:
            print(f"sheepdog: interrupted: {line}", file=sys.stderr, flush=True)
            raise KeyboardInterrupt(line) from None
        raise exc

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
        if errors not in ("none", "raise"):
            raise ValueError(f"errors must be 'none' or 'raise', got {errors!r}")
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
        results = self.results(request_id)
        failed = self.errors(request_id)
        if failed and errors == "raise":
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
        return [result for _, result in results]

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

    def _delete(self, scheduler: Scheduler, request_id: int) -> Deletion:
        return self.request(request_id).delete_jobs(scheduler)

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
