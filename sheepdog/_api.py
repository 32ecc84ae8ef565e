"""The functions users call: map, map_async, get_results, get_errors, cancel."""

from __future__ import annotations

import atexit
import json
import logging
import shlex
import ssl
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import serialisation

# Re-exported (``name as name``): the CLI, the Executor and tests find them here too.
from ._submit import (
    _servers_by_db as _servers_by_db,
)
from ._submit import (
    _servers_lock as _servers_lock,
)
from ._submit import (
    array_size as array_size,
)
from ._submit import (
    batch_size as batch_size,
)
from ._submit import (
    delete_jobs as delete_jobs,
)
from ._submit import (
    job_name as job_name,
)
from ._submit import (
    job_sizes as job_sizes,
)
from ._submit import (
    own_server as own_server,
)
from ._submit import (
    request_settings as request_settings,
)
from ._submit import (
    server_for as server_for,
)
from ._submit import (
    stored_config as stored_config,
)
from ._submit import (
    submit_request as submit_request,
)
from .config import Config, ConfigLike, as_config
from .errors import RemoteError, SheepdogError, TaskFailedError
from .errors import TimeoutError as SheepdogTimeoutError
from .scheduler import Deletion, Scheduler, open_scheduler
from .store import OPEN_STATES, Storage, content_digest
from .watch import Watcher, wait_for_request

__all__ = [
    "cancel", "get_errors", "get_output", "get_results", "map", "map_async", "rerun",
]


logger = logging.getLogger(__name__)

#: What ``cache=`` may be: off, on, or recompute (and store for later).
CACHE_CHOICES = (False, True, "refresh")


def check_cache(cache: object) -> None:
    """Refuse a ``cache=`` value that is not one of :data:`CACHE_CHOICES`."""
    if not (cache is True or cache is False or cache == "refresh"):
        raise ValueError(f"cache must be False, True or 'refresh', got {cache!r}")


def new_cached_request(
    storage: Storage,
    payload: bytes,
    blobs: list[bytes],
    cache: bool | str,
    **options: Any,
) -> tuple[int, int]:
    """Store a request with its cache digests; with ``cache=True`` fill what the cache has.

    Returns the request id and how many tasks came from the cache.
    """
    request_id = storage.new_request(
        payload, b"", blobs, func_digest=content_digest(payload),
        args_digests=[content_digest(blob) for blob in blobs], **options,
    )
    filled = storage.fill_from_cache(request_id) if cache is True else 0
    return request_id, filled


def map_async(
    f: Callable[..., Any],
    args: Iterable[Any],
    config: ConfigLike,
    ns: Mapping[str, Any] | None = None,
    *,
    cache: bool | str = False,
) -> int:
    """Submit ``f`` with each of ``args`` on Grid Engine; return the request id at once.

    A tuple or list argument is unpacked into positional arguments, as Sheepdog
    0.2 did; any other value is passed as the single argument. Everything is
    validated and serialised before anything is submitted. With ``cache=True``
    a task whose function and argument already have a result in the database
    takes it at once; if all do, nothing is submitted. ``cache="refresh"``
    runs every task again (its results serve later cached maps).
    """
    request_id, cfg = _start(f, args, config, ns, cache=cache)
    _async_requests.append((cfg.dbfile, request_id))
    return request_id


#: What :func:`rerun` runs again unless told otherwise: every task that ended without a result.
RERUN_DEFAULT = ("failed", "lost", "cancelled")


def rerun(
    request_id: int,
    config: ConfigLike,
    which: Iterable[str] = RERUN_DEFAULT,
    *,
    scheduler: Scheduler | None = None,
) -> list[int]:
    """Run a request's failed, lost or cancelled tasks again; return their indices.

    ``which`` chooses among ``"failed"`` (the function raised, or the job
    was never submitted), ``"lost"`` (the worker died or its job was killed)
    and ``"cancelled"``. They run under the same request id; tasks with a
    result are never run again; what the chosen ones ended with stays in
    their history (:meth:`Storage.get_task_history`). A new array job is submitted for them
    with the config stored with the request (``config`` names the database,
    and is used for a request stored without one). Returns at once, as
    :func:`map_async`: wait with :func:`get_results`. No task chosen: nothing
    is submitted and the list is empty.
    """
    cfg = as_config(config)
    with Storage(cfg.dbfile) as storage:
        cfg = stored_config(storage, request_id) or cfg
        indices = storage.rerun_tasks(request_id, which)
        if not indices:
            return []
        own = scheduler is None
        dep = scheduler if scheduler is not None else open_scheduler(cfg)
        try:
            submit_request(storage, cfg, request_id, dep,
                           n_workers=array_size(cfg, len(indices)))
        except BaseException as exc:
            line = _submission_failed(storage, dep, request_id, exc)
            if isinstance(exc, KeyboardInterrupt):
                raise KeyboardInterrupt(line) from None
            raise
        finally:
            if own:
                dep.close()
    _async_requests.append((cfg.dbfile, request_id))
    return indices


def _start(
    f: Callable[..., Any],
    args: Iterable[Any],
    config: ConfigLike,
    ns: Mapping[str, Any] | None,
    scheduler: Scheduler | None = None,
    say: Callable[[str], None] = lambda message: None,
    *,
    cache: bool | str = False,
) -> tuple[int, Config]:
    cfg = as_config(config)
    check_cache(cache)
    if not callable(f):
        raise TypeError(f"sheepdog.map needs a callable, got {type(f).__name__}")
    arg_list = list(args)
    payload = serialisation.serialise_function(f, dict(ns) if ns is not None else None,
                                               mode=cfg.mode)
    blobs = serialisation.serialise_args(arg_list)
    own = scheduler is None
    # Before anything is stored: a bad ssh_keyfile is refused here, not by a failed request.
    dep = scheduler if scheduler is not None else open_scheduler(cfg)
    try:
        with Storage(cfg.dbfile) as storage:
            request_id, cached = new_cached_request(
                storage, payload, blobs, cache, settings=request_settings(cfg, len(arg_list))
            )
            to_run = len(arg_list) - cached
            if cached:
                say(f"request {request_id}: {cached} of {len(arg_list)} tasks from the cache")
            if not to_run:
                return request_id, cfg
            n_workers = array_size(cfg, to_run)
            try:
                if cfg.scheduler != "local":
                    say(f"connecting to {cfg.ssh_user}@{cfg.host}:{cfg.ssh_port}")
                job_id = submit_request(storage, cfg, request_id, dep, n_workers=n_workers)
                jobs = "jobs" if "," in job_id else "job"
                say(f"submitted {jobs} {job_id} for request {request_id} ({to_run} "
                    "tasks); waiting for workers")
            except BaseException as exc:
                line = _submission_failed(storage, dep, request_id, exc)
                if isinstance(exc, KeyboardInterrupt):
                    raise KeyboardInterrupt(line) from None
                raise
        return request_id, cfg
    finally:
        if own:
            dep.close()


def _why(exc: BaseException) -> str:
    text = str(exc).strip()
    return text or type(exc).__name__


def _submission_failed(
    storage: Storage, scheduler: Scheduler, request_id: int, exc: BaseException
) -> str:
    """Fail the tasks of a request whose submission failed, after deleting any job it made.

    An interruption (Ctrl-C) or a dropped connection can come after qsub/sbatch went through
    but before its answer arrived: the job is then found by its unique name and deleted,
    since nothing would ever serve it.
    """
    interrupted = isinstance(exc, KeyboardInterrupt)
    recorded = storage.get_jobs(request_id)
    deleted = (
        Deletion([], None) if recorded and not interrupted
        else delete_jobs(scheduler, storage.dbfile, request_id)
    )
    if deleted.job_ids:
        message = (
            f"the submission was interrupted ({_why(exc)}) after it had created "
            f"{scheduler.label} job {', '.join(deleted.job_ids)}, which was deleted"
        )
    elif interrupted:
        message = "the job was never submitted: the submission was interrupted (Ctrl-C)"
        if deleted.error:
            message += (f"; whether {scheduler.label} had made a job of it is unknown "
                        f"({deleted.error})")
    else:
        message = f"the job was never submitted: {_why(exc)}"
    storage.fail_tasks(
        request_id, storage.open_task_indices(request_id), "submit", message
    )
    line = f"request {request_id}: {message}"
    if interrupted:
        print(f"sheepdog: interrupted: {line}", file=sys.stderr, flush=True)
    return line


def _say(message: str) -> None:
    """Tell a person watching a blocking map what is happening (stderr, as the bar)."""
    print(f"sheepdog: {message}", file=sys.stderr, flush=True)


def _quiet(message: str) -> None:
    logger.info("%s", message)


def map(  # noqa: A001 - the original's name, kept on purpose
    f: Callable[..., Any],
    args: Iterable[Any],
    config: ConfigLike,
    ns: Mapping[str, Any] | None = None,
    verbose: bool = True,
    *,
    errors: str = "none",
    timeout_s: float | None = None,
    cache: bool | str = False,
) -> list[Any]:
    """Run ``f`` with each of ``args`` on Grid Engine and return the results in order.

    A task that failed gives ``None`` in its place (call :func:`get_errors`
    for the remote traceback), or, with ``errors="raise"``, a
    :class:`~sheepdog.errors.TaskFailedError` carrying every
    :class:`~sheepdog.errors.RemoteError`. ``cache`` as :func:`map_async`.
    """
    if errors not in ("none", "raise"):
        raise ValueError(f"errors must be 'none' or 'raise', got {errors!r}")
    cfg = as_config(config)
    arg_list = list(args)
    scheduler = open_scheduler(cfg)
    try:
        request_id, cfg = _start(f, arg_list, cfg, ns, scheduler, say=_say if verbose else _quiet,
                                 cache=cache)
        if not arg_list:
            return []
        with Storage(cfg.dbfile) as storage:
            submitted = bool(storage.get_jobs(request_id))
        bound = timeout_s if timeout_s is not None else cfg.timeout_s
        # Every task from the cache: no job, so no server to start or watch.
        server = server_for(cfg) if submitted else None
        watcher = Watcher(cfg, request_id, scheduler, server=server)
        try:
            wait_for_request(cfg.dbfile, request_id, verbose=verbose, timeout_s=bound,
                             watcher=watcher)
        except KeyboardInterrupt:
            line = f"request {request_id}: " + _stop_on_interrupt(
                scheduler, cfg, request_id, "cancelled by Ctrl-C"
            )
            print(f"sheepdog: interrupted: {line}", file=sys.stderr, flush=True)
            raise KeyboardInterrupt(line) from None
        except SheepdogTimeoutError:
            assert bound is not None
            done = len(arg_list) - _count_open(cfg.dbfile, request_id)
            line = _stop_on_interrupt(
                scheduler, cfg, request_id, f"cancelled: timeout_s={bound:g} ran out"
            )
            raise SheepdogTimeoutError(
                f"request {request_id}: {done} of {len(arg_list)} tasks finished within "
                f"{bound:g} s; {line}"
            ) from None
        # Array tasks still queued would start, find nothing to do and exit; deleting
        # them frees their slots now (and never leaves them waiting on a stopped server).
        if submitted:
            delete_jobs(scheduler, cfg.dbfile, request_id)
        results = get_results(request_id, cfg.dbfile, block=False)
        failed = get_errors(request_id, cfg.dbfile)
    finally:
        scheduler.close()
    if failed and errors == "raise":
        raise TaskFailedError(
            f"{len(failed)} of {len(arg_list)} tasks of request {request_id} failed; "
            f"the first: {failed[0][1]}",
            [err for _, err in failed],
        )
    if failed and verbose:
        print(failure_summary(failed, len(arg_list), request_id, cfg.dbfile), flush=True)
    return [result for _, result in results]


#: Width that map's printed summary keeps to (a terminal's 80 columns, less one).
SUMMARY_COLUMNS = 79


def failure_summary(
    failed: list[tuple[Any, RemoteError]], n_tasks: int, request_id: int, dbfile: str
) -> str:
    """What map prints when tasks failed: how many, the first one's error, where to look."""
    errors = [error for _, error in failed]
    n_cancelled = sum(1 for error in errors if error.kind == "cancelled")
    n_failed = len(errors) - n_cancelled
    parts = [f"{n_failed} of {n_tasks} tasks failed"] if n_failed else []
    if n_cancelled:
        were = "was" if n_cancelled == 1 else "were"
        parts.append(f"{n_cancelled}{'' if n_failed else f' of {n_tasks} tasks'} {were} cancelled")
    first = next((e for e in errors if e.kind != "cancelled"), errors[0])
    head = f"sheepdog: {' and '.join(parts)}; task {first.task_index}: {first.summary}"
    if len(head) > SUMMARY_COLUMNS:
        head = head[: SUMMARY_COLUMNS - 3] + "..."
    return f"{head}\nsheepdog: see sheepdog.get_errors({request_id}, {dbfile!r})"


def get_results(
    request_id: int,
    dbfile: str = "./sheepdog.sqlite",
    block: bool = True,
    verbose: bool = False,
    *,
    timeout_s: float | None = None,
) -> list[tuple[Any, Any]]:
    """Fetch ``[(arg, result)]`` for a request; with ``block``, wait until all are in.

    Where a task failed or has no result yet, its result is ``None``. The wait
    is bounded by ``timeout_s`` (None: until every task is finished).
    """
    with Storage(dbfile, create=False) as storage:  # a read never creates a database
        if block:
            wait_for_request(dbfile, request_id, verbose=verbose, timeout_s=timeout_s)
        rows = storage.get_tasks_with_stored_results(request_id)

        def load(stored: bytes | str) -> Any:
            # From the blob's file when large: no second copy of the value as a pickle.
            with storage.open_value(stored) as f:
                return serialisation.deserialise_file(f)

        return [(load(arg), None if result is None else load(result)) for arg, result in rows]


def get_errors(request_id: int, dbfile: str = "./sheepdog.sqlite") -> list[tuple[Any, RemoteError]]:
    """Fetch ``[(arg, error)]`` for every failed task; each error holds the remote traceback."""
    with Storage(dbfile, create=False) as storage:
        rows = storage.get_task_errors(request_id)
    return [
        (
            serialisation.deserialise_value(arg),
            RemoteError.from_dict(error, request_id=request_id, task_index=index),
        )
        for index, arg, error in rows
    ]


def get_output(
    request_id: int, index: int, dbfile: str = "./sheepdog.sqlite"
) -> tuple[str, str]:
    """Return the captured ``(stdout, stderr)`` of task ``index`` (from 1) of a request.

    Each is cut to the request's ``capture_bytes``; both are empty for a task
    that has not finished.
    """
    with Storage(dbfile, create=False) as storage:
        task = storage.get_task(request_id, index)
    return task.get("stdout") or "", task.get("stderr") or ""


def cancel(request_id: int, config: ConfigLike) -> int:
    """Delete the request's jobs (qdel) and mark its open tasks cancelled; return how many."""
    return cancel_request(request_id, config).n_tasks


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


def cancel_request(request_id: int, config: ConfigLike) -> Cancellation:
    """Cancel the request's open tasks and delete its jobs; say what was done."""
    cfg = as_config(config)
    with open_scheduler(cfg) as scheduler:
        return _cancel_with(scheduler, cfg.dbfile, request_id, "cancelled by sheepdog.cancel")


def _cancel_with(scheduler: Scheduler, dbfile: str, request_id: int, reason: str) -> Cancellation:
    with Storage(dbfile) as storage:
        n = storage.cancel(request_id, reason)
    return Cancellation(request_id, n, delete_jobs(scheduler, dbfile, request_id))


def _count_open(dbfile: str, request_id: int) -> int:
    with Storage(dbfile) as storage:
        counts = storage.task_counts(request_id)
    return sum(counts.get(state, 0) for state in OPEN_STATES)


def _stop_on_interrupt(scheduler: Scheduler, cfg: Config, request_id: int, reason: str) -> str:
    """Cancel the request unless ``keep_jobs_on_interrupt``; say the state it is left in."""
    if not cfg.keep_jobs_on_interrupt:
        return _cancel_with(scheduler, cfg.dbfile, request_id, reason).what()
    with Storage(cfg.dbfile) as storage:
        job_ids = [str(job["job_id"]) for job in storage.get_jobs(request_id)]
    n_open = _count_open(cfg.dbfile, request_id)
    return (
        f"{n_open} tasks are still open and {scheduler.label} job "
        f"{', '.join(job_ids) or '(none recorded)'} is left running (keep_jobs_on_interrupt); "
        f"nothing serves it once this process exits: run `sheepdog serve --dbfile "
        f"{shlex.quote(cfg.dbfile)}` or cancel it with `sheepdog cancel {request_id} "
        f"--config FILE --dbfile {shlex.quote(cfg.dbfile)}`"
    )


def stop_interrupted(request_id: int, config: ConfigLike) -> str:
    """Stop a request whose wait a person interrupted, as ``map`` does; one line says how."""
    cfg = as_config(config)
    with open_scheduler(cfg) as scheduler:
        line = _stop_on_interrupt(scheduler, cfg, request_id, "cancelled by Ctrl-C")
    return f"request {request_id}: {line}"


def server_answers(url: str, *, timeout_s: float = 2.0) -> bool:
    """True if a sheepdog server answers its health check at the job's callback ``url``."""
    context = ssl.create_default_context()
    # Only a liveness probe that sends nothing: the workers pin the certificate.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(  # noqa: S310 - the URL is our own server's
            url.rstrip("/") + "/api/v1/health", timeout=timeout_s, context=context
        ) as response:
            return bool(json.loads(response.read(4096)).get("ok"))
    except (OSError, ValueError):
        return False


def served(storage: Storage, request_id: int) -> bool | None:
    """Whether a server answers for the request on this machine (None: no job recorded)."""
    jobs = storage.get_jobs(request_id)
    info = jobs[-1]["info"] if jobs else {}
    url, port = info.get("url"), info.get("port")
    if not url:
        return None
    # The callback URL names this machine as the workers see it (host.docker.internal, a
    # name only the cluster resolves): ask where the server listens instead.
    host = str(info.get("listen_address") or "")
    if not port or not host:
        return server_answers(str(url))
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    scheme = urllib.parse.urlsplit(str(url)).scheme or "http"
    return server_answers(f"{scheme}://{f'[{host}]' if ':' in host else host}:{int(port)}")


#: Requests that map_async submitted from this process, to warn about at exit.
_async_requests: list[tuple[str, int]] = []


def _warn_unserved_at_exit() -> None:
    """At exit, say which map_async requests lose their only server with this process."""
    for dbfile, request_id in _async_requests:
        try:
            with Storage(dbfile) as storage:
                n_open = len(storage.open_task_indices(request_id))
                mine = own_server(storage, request_id) is not None
        except SheepdogError:
            continue
        if not n_open or not mine:
            continue
        print(
            f"sheepdog: request {request_id} still has {n_open} open tasks, and this process "
            "was its only server: its array tasks wait for a server until they give up. "
            f"Serve them with `sheepdog serve --dbfile {shlex.quote(dbfile)}`, or cancel "
            f"them with `sheepdog cancel {request_id} --config FILE --dbfile "
            f"{shlex.quote(dbfile)}`.",
            file=sys.stderr, flush=True,
        )


# Registered after server.py's own handler, so it runs first, while the servers still run.
atexit.register(_warn_unserved_at_exit)
