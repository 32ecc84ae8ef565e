"""The functions users call: map, map_async, get_results, get_errors, cancel."""

from __future__ import annotations

import atexit
import json
import logging
import os
import shlex
import ssl
import sys
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import serialisation
from ._tls import certificate_for, fingerprint_sha256
from .config import Config, ConfigLike, as_config
from .deployment import Deployer
from .errors import RemoteError, ServerError, SheepdogError, TaskFailedError
from .errors import TimeoutError as SheepdogTimeoutError
from .job_file import job_file, job_file_name, key_file_name
from .server import Server, get_server, listen_address
from .sge import parse_qdel
from .storage import OPEN_STATES, Storage, content_digest
from .watch import Watcher, wait_for_request

__all__ = [
    "cancel", "get_errors", "get_output", "get_results", "map", "map_async", "rerun",
]

logger = logging.getLogger(__name__)

#: Default cap on array tasks: beyond this, extra array tasks mostly wait in the queue.
DEFAULT_MAX_WORKERS = 100
#: Bytes of each task's stdout and stderr kept with its result.
CAPTURE_BYTES = 64 * 1024


def array_size(config: Config, n_tasks: int) -> int:
    """How many array tasks to submit for ``n_tasks`` tasks, over one or several jobs.

    More than the cluster's ``max_aj_tasks`` are split into several jobs by
    :func:`job_sizes`, not capped.
    """
    workers = config.workers if config.workers is not None else min(n_tasks, DEFAULT_MAX_WORKERS)
    return max(1, min(workers, n_tasks))


def job_sizes(n_workers: int, per_job: int) -> list[int]:
    """Split ``n_workers`` array tasks into jobs of at most ``per_job`` each (0: one job)."""
    if per_job <= 0 or n_workers <= per_job:
        return [n_workers]
    full, rest = divmod(n_workers, per_job)
    return [per_job] * full + ([rest] if rest else [])


def batch_size(config: Config, n_tasks: int, workers: int) -> int:
    """How many tasks an array task leases at once.

    Enough that tiny tasks do not pay a round trip each, small enough that
    every array task gets a share and a lost worker loses little.
    """
    if config.batch is not None:
        return config.batch
    return max(1, min(64, n_tasks // (workers * 4)))


def request_settings(config: Config, n_tasks: int) -> dict[str, Any]:
    """The settings stored with a request: what the server hands to every worker, and more.

    ``config`` (the config, which holds no secret) lets any process watch the
    request's jobs.
    """
    workers = array_size(config, n_tasks)
    return {
        "config": config.as_dict(),
        "lease_s": float(config.lease_s),
        "heartbeat_s": max(0.5, config.lease_s / 4),
        "task_timeout_s": config.task_timeout_s,
        "batch": batch_size(config, n_tasks, workers),
        "capture_bytes": config.capture_bytes,
        "max_attempts": config.retries + 1,
        "tasks_per_worker": config.tasks_per_worker,
        "workers": workers,
    }


def open_deployer(config: Config) -> Deployer:
    """A Deployer for the config's head node (not yet connected)."""
    return Deployer(
        config.host,
        config.ssh_port,
        config.ssh_user,
        config.ssh_keyfile,
        known_hosts=config.known_hosts,
        ssh_config=config.ssh_config,
        timeout_s=config.ssh_timeout_s,
    )


def job_name(storage: Storage, request_id: int) -> str:
    """The Grid Engine job name (``qsub -N``) of the request's jobs: its job file's name.

    That is Grid Engine's own default, so output files keep their usual names; given
    explicitly, it names jobs that a request submitted from another script too. Unique per
    request and database (see :func:`~sheepdog.job_file.job_stem`) and known before qsub
    runs, so the jobs can be found and deleted even when qsub's answer (the job id) never
    arrived.
    """
    return job_file_name(request_id, storage.get_secret(request_id))


def stored_config(storage: Storage, request_id: int) -> Config | None:
    """The config the request was submitted with (for its database), or None if not stored."""
    mapping = storage.get_settings(request_id).get("config")
    if not isinstance(mapping, dict):
        return None
    return Config.from_mapping({**mapping, "dbfile": storage.dbfile})


_servers_by_db: dict[str, Server] = {}
_servers_lock = threading.Lock()


def server_for(config: Config) -> Server:
    """The running server for the config: its fixed port, or one random-port server per dbfile.

    The original's ``get_server(None, ...)`` keeps one server for every
    ``port=None`` call and refuses another database; maps with different
    dbfiles in one process must just work, so each database gets its own.
    """
    options: dict[str, Any] = {}
    if config.tls:
        files = certificate_for(config.dbfile)
        options = {"certfile": files.certfile, "keyfile": files.keyfile}
    options["host"] = config.listen_address or listen_address(config.localhost)
    if config.port is not None:
        fixed = get_server(config.port, None, config.dbfile, **options)
        if (fixed.scheme == "https") != config.tls:
            raise ServerError(
                f"the server on port {config.port} serves {fixed.scheme}, but this config has "
                f"tls={config.tls}; use another port or the same tls setting"
            )
        return fixed
    # HTTP and HTTPS servers on one database may run side by side.
    key = os.path.abspath(config.dbfile) + (" (tls)" if config.tls else "")
    with _servers_lock:
        server = _servers_by_db.get(key)
        if server is None or server.stopped:
            server = _servers_by_db[key] = Server(None, None, config.dbfile, **options)
        elif not server.alive:
            server.restart()
        return server


def submit_request(
    storage: Storage,
    config: Config,
    request_id: int,
    deployer: Deployer,
    *,
    n_workers: int,
    why: str | None = None,
    continues: bool = False,
) -> str:
    """Render, copy and qsub the job file for a stored request; record and return the job ids.

    ``n_workers`` array tasks go into as many jobs as the cluster's ``max_aj_tasks`` and
    ``max_aj_instances`` need (read once per connection); the ids come back comma-separated.
    A resubmission records ``why`` with its jobs, and whether it ``continues`` work that
    the last jobs left open after making progress (workers that stopped before their
    run-time limit), which does not count against ``retries``.
    """
    sizes = job_sizes(n_workers, deployer.array_limits().per_job)
    server = server_for(config)
    url = server.url_for(config.localhost) + "/"
    fingerprint = None
    if server.certfile is not None:
        with open(server.certfile, encoding="ascii") as cert:
            fingerprint = fingerprint_sha256(cert.read())
    secret = storage.get_secret(request_id)
    ge_opts = list(config.ge_opts or ()) + config.resource_directives()
    # The job file names the key file beside it; the secret itself never goes into a job
    # script, which Grid Engine copies world-readable onto the execution nodes.
    jobdir = deployer.absolute(config.ssh_dir) + "/"
    text = job_file(
        url, jobdir + key_file_name(request_id, secret), request_id,
        storage.count_tasks(request_id), config.shell, ge_opts,
        array_size=sizes[0], tls_fingerprint=fingerprint, prologue=config.prologue,
    )
    deployer.deploy(text, request_id, config.ssh_dir, secret=secret)
    qsub_args: list[str] = []
    if config.ge_opts is None:
        # The original's defaults, resolved on the head node and quoted on the command
        # line so that a home directory with spaces cannot break a #$ line.
        qsub_args = ["-wd", jobdir, "-o", jobdir, "-e", jobdir]
    qsub_args += ["-N", job_name(storage, request_id)]
    counts = storage.task_counts(request_id)
    info: dict[str, Any] = {
        "url": url, "port": server.port, "listen_address": server.host,
        # Tasks finished before these jobs: the watcher sees whether they made progress.
        "finished_before": counts.get("done", 0) + counts.get("error", 0),
        "parts": len(sizes),
    }
    if why is not None:
        info.update(why=why, continues=continues)
    job_ids: list[str] = []
    for part, size in enumerate(sizes, 1):
        # qsub's own -t wins over the job file's #$ -t: the last job may be smaller.
        extra = [] if len(sizes) == 1 else ["-t", f"1-{size}"]
        job_id = deployer.submit(
            request_id, config.ssh_dir, secret=secret, qsub_args=qsub_args + extra
        )
        # `sheepdog serve` restarts the server on this port: the job file holds this URL.
        storage.add_job(request_id, job_id, size, info=dict(info, part=part))
        job_ids.append(job_id)
    return ", ".join(job_ids)


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
    deployer: Deployer | None = None,
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
        own = deployer is None
        dep = deployer if deployer is not None else open_deployer(cfg)
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
    deployer: Deployer | None = None,
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
    own = deployer is None
    # Before anything is stored: a bad ssh_keyfile is refused here, not by a failed request.
    dep = deployer if deployer is not None else open_deployer(cfg)
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
    storage: Storage, deployer: Deployer, request_id: int, exc: BaseException
) -> str:
    """Fail the tasks of a request whose submission failed, after deleting any job it made.

    An interruption (Ctrl-C) or a dropped connection can come after qsub went through
    but before its answer arrived: the job is then found by its unique name and deleted,
    since nothing would ever serve it.
    """
    interrupted = isinstance(exc, KeyboardInterrupt)
    recorded = storage.get_jobs(request_id)
    deleted = (
        Deletion([], None) if recorded and not interrupted
        else delete_jobs(deployer, storage.dbfile, request_id)
    )
    if deleted.job_ids:
        message = (
            f"the submission was interrupted ({_why(exc)}) after qsub had created "
            f"Grid Engine job {', '.join(deleted.job_ids)}, which was deleted"
        )
    elif interrupted:
        message = "the job was never submitted: the submission was interrupted (Ctrl-C)"
        if deleted.error:
            message += f"; whether qsub had created a job is unknown ({deleted.error})"
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
    deployer = open_deployer(cfg)
    try:
        request_id, cfg = _start(f, arg_list, cfg, ns, deployer, say=_say if verbose else _quiet,
                                 cache=cache)
        if not arg_list:
            return []
        with Storage(cfg.dbfile) as storage:
            submitted = bool(storage.get_jobs(request_id))
        bound = timeout_s if timeout_s is not None else cfg.timeout_s
        # Every task from the cache: no job, so no server to start or watch.
        server = server_for(cfg) if submitted else None
        watcher = Watcher(cfg, request_id, deployer, server=server)
        try:
            wait_for_request(cfg.dbfile, request_id, verbose=verbose, timeout_s=bound,
                             watcher=watcher)
        except KeyboardInterrupt:
            line = f"request {request_id}: " + _stop_on_interrupt(
                deployer, cfg, request_id, "cancelled by Ctrl-C"
            )
            print(f"sheepdog: interrupted: {line}", file=sys.stderr, flush=True)
            raise KeyboardInterrupt(line) from None
        except SheepdogTimeoutError:
            assert bound is not None
            done = len(arg_list) - _count_open(cfg.dbfile, request_id)
            line = _stop_on_interrupt(
                deployer, cfg, request_id, f"cancelled: timeout_s={bound:g} ran out"
            )
            raise SheepdogTimeoutError(
                f"request {request_id}: {done} of {len(arg_list)} tasks finished within "
                f"{bound:g} s; {line}"
            ) from None
        # Array tasks still queued would start, find nothing to do and exit; deleting
        # them frees their slots now (and never leaves them waiting on a stopped server).
        if submitted:
            delete_jobs(deployer, cfg.dbfile, request_id)
        results = get_results(request_id, cfg.dbfile, block=False)
        failed = get_errors(request_id, cfg.dbfile)
    finally:
        deployer.close()
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
    """Delete the request's jobs with qdel and mark its open tasks cancelled; return how many."""
    return cancel_request(request_id, config).n_tasks


@dataclass(frozen=True)
class Deletion:
    """What qdel did to a request's jobs."""

    #: The jobs Grid Engine said it deleted (or will delete).
    job_ids: list[str]
    #: Why the jobs may still be there (qdel failed or did not answer); None if it answered.
    error: str | None

    def describe(self) -> str:
        """Say in words what was deleted, truthfully."""
        if self.error is not None:
            return f"could not delete its Grid Engine jobs ({self.error})"
        if not self.job_ids:
            return "no job of it was left on the cluster"
        return f"deleted Grid Engine job {', '.join(self.job_ids)}"


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
    with open_deployer(cfg) as deployer:
        return _cancel_with(deployer, cfg.dbfile, request_id, "cancelled by sheepdog.cancel")


def _cancel_with(deployer: Deployer, dbfile: str, request_id: int, reason: str) -> Cancellation:
    with Storage(dbfile) as storage:
        n = storage.cancel(request_id, reason)
    return Cancellation(request_id, n, delete_jobs(deployer, dbfile, request_id))


def _count_open(dbfile: str, request_id: int) -> int:
    with Storage(dbfile) as storage:
        counts = storage.task_counts(request_id)
    return sum(counts.get(state, 0) for state in OPEN_STATES)


def _stop_on_interrupt(deployer: Deployer, cfg: Config, request_id: int, reason: str) -> str:
    """Cancel the request unless ``keep_jobs_on_interrupt``; say the state it is left in."""
    if not cfg.keep_jobs_on_interrupt:
        return _cancel_with(deployer, cfg.dbfile, request_id, reason).what()
    with Storage(cfg.dbfile) as storage:
        job_ids = [str(job["job_id"]) for job in storage.get_jobs(request_id)]
    n_open = _count_open(cfg.dbfile, request_id)
    return (
        f"{n_open} tasks are still open and Grid Engine job "
        f"{', '.join(job_ids) or '(none recorded)'} is left running (keep_jobs_on_interrupt); "
        f"nothing serves it once this process exits: run `sheepdog serve --dbfile "
        f"{shlex.quote(cfg.dbfile)}` or cancel it with `sheepdog cancel {request_id} "
        f"--config FILE --dbfile {shlex.quote(cfg.dbfile)}`"
    )


def delete_jobs(deployer: Deployer, dbfile: str, request_id: int) -> Deletion:
    """qdel the request's jobs, by the ids recorded and by its job name; say what went.

    Jobs that already ended are fine. The name finds a job whose id was never
    recorded (qsub's answer lost to Ctrl-C or a dropped connection).
    """
    with Storage(dbfile) as storage:
        targets = [str(job["job_id"]) for job in storage.get_jobs(request_id)]
        targets.append(job_name(storage, request_id))
    command = f"qdel {' '.join(shlex.quote(t) for t in targets)}"
    try:
        result = deployer.run(command, check=False, timeout_s=30)
    except SheepdogError as exc:
        logger.warning("%s failed: %s", command, exc)
        return Deletion([], str(exc))
    deleted, other = parse_qdel(result.stdout + "\n" + result.stderr)
    if other and result.exit_status != 0:
        return Deletion(deleted, f"{command} exited with status {result.exit_status}: "
                        + "; ".join(other))
    return Deletion(deleted, None)


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


def own_server(storage: Storage, request_id: int) -> Server | None:
    """This process's running server for the request's latest job, if it has one."""
    jobs = storage.get_jobs(request_id)
    port = jobs[-1]["info"].get("port") if jobs else None
    with _servers_lock:
        servers = list(_servers_by_db.values())
    return next((s for s in servers if s.alive and s.port == port), None)


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
