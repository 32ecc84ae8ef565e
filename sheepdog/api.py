"""The functions users call: map, map_async, get_results, is_finished, get_errors, cancel,
rerun.

Each is a ``with Session(...) as session: return session.…`` wrapper (as httpx's
module-level functions wrap a ``Client``): the :class:`~sheepdog.session.Session`
owns the database, the scheduler and the server for the call.
"""

from __future__ import annotations

import atexit
import logging
import sys
import textwrap
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from . import tunnel
from .config import ConfigLike
from .doctor import COLUMNS
from .errors import RemoteError, SheepdogError
from .hints import sheepdog_command
from .net import health_problem, host_port, loopback_for
from .scheduler import Scheduler
from .session import Cancellation, Session
from .store import DEFAULT_DBFILE, RERUN_CHOICES, FailureKind, Storage
from .stored_request import StoredRequest

__all__ = [
    "RERUN_DEFAULT",
    "cancel",
    "cancel_request",
    "get_errors",
    "get_output",
    "get_results",
    "is_finished",
    "map",
    "map_async",
    "map_sync",
    "rerun",
    "served",
    "stop_interrupted",
]

logger = logging.getLogger(__name__)

#: What :func:`rerun` runs again unless told otherwise: every task that ended without a result.
RERUN_DEFAULT = tuple(RERUN_CHOICES)


def map_async(
    f: Callable[..., Any],
    args: Iterable[Any],
    config: ConfigLike,
    ns: Mapping[str, Any] | None = None,
    *,
    cache: bool | str = False,
) -> int:
    """Submit ``f`` with each of ``args`` to the config's scheduler; return the request id at once.

    A tuple or list argument is unpacked into positional arguments, as Sheepdog
    0.2 did; any other value is passed as the single argument. Everything is
    validated and serialised before anything is submitted. With ``cache=True``
    a task whose function and argument already have a result in the database
    takes it at once; if all do, nothing is submitted. ``cache="refresh"``
    runs every task again (its results serve later cached maps).
    """
    with Session(config) as session:
        request_id = session.submit(f, args, ns, cache=cache)
        # Its workers reach this process through the tunnel on this connection, if one
        # runs: it stays open, as the server does, until the process exits.
        tunnel.hold_open(session.scheduler.host)
    _async_requests.append((session.dbfile, request_id))
    return request_id


def rerun(
    request_id: int,
    config: ConfigLike,
    which: Iterable[str] = RERUN_DEFAULT,
    *,
    scheduler: Scheduler | None = None,
) -> list[int]:
    """Run a request's failed, lost or cancelled tasks again; return their indices.

    ``which`` chooses among ``"failed"`` (every task that ended in an error:
    the function raised, the job was never submitted, or the task was lost),
    ``"lost"`` (only those whose worker died or whose job was killed) and
    ``"cancelled"``. They run under the same request id; tasks with a
    result are never run again; what the chosen ones ended with stays in
    their history (:meth:`Storage.get_task_history`). A new array job is submitted for them
    with the config stored with the request (``config`` names the database,
    and is used for a request stored without one). Returns at once, as
    :func:`map_async`: wait with :func:`get_results`. No task chosen: nothing
    is submitted and the list is empty.
    """
    with Session(config, scheduler=scheduler) as session:
        indices = session.resubmit(request_id, which)
    if indices:
        _async_requests.append((session.dbfile, request_id))
    return indices


def map(  # shadows the builtin: the original's name, kept on purpose
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
    """Run ``f`` with each of ``args`` on the config's scheduler; return the results in order.

    A task that failed gives ``None`` in its place (call :func:`get_errors`
    for the remote traceback), or, with ``errors="raise"``, a
    :class:`~sheepdog.errors.TaskFailedError` carrying every
    :class:`~sheepdog.errors.RemoteError`. ``cache`` as :func:`map_async`.
    """
    with Session(config) as session:
        return session.map(f, args, ns, verbose=verbose, errors=errors, timeout_s=timeout_s,
                           cache=cache)


#: The name Sheepdog 0.2's quickstart still used for :func:`map`.
map_sync = map


def get_results(
    request_id: int,
    dbfile: str = DEFAULT_DBFILE,
    block: bool = True,
    verbose: bool = False,
    *,
    timeout_s: float | None = None,
) -> list[tuple[Any, Any]]:
    """Fetch ``[(arg, result)]`` for a request; with ``block``, wait until all are in.

    Where a task failed or has no result yet, its result is ``None``. The wait
    is bounded by ``timeout_s`` (None: until every task is finished); a wait
    that sees the request finish deletes its array tasks still on the cluster.
    """
    with Session(dbfile=dbfile, create=False) as session:  # a read never creates a database
        if block:
            session.watch(request_id, verbose=verbose, timeout_s=timeout_s, passive=True)
        return session.results(request_id)


def is_finished(request_id: int, dbfile: str = DEFAULT_DBFILE) -> bool:
    """Whether every task of the request has finished: done, failed, lost or cancelled.

    A read of the database, cheap enough to poll after :func:`map_async`: a task
    that failed counts as finished (its result is ``None``; :func:`get_errors`
    says why), so a loop ``while not is_finished(...)`` ends when the request
    does. Workers that die are marked lost by a wait (``get_results(block=True)``,
    ``sheepdog status ID --wait``), which a poll of the database does not do.
    """
    with Session(dbfile=dbfile, create=False) as session:
        return not session.storage.open_task_indices(request_id)


def get_errors(request_id: int, dbfile: str = DEFAULT_DBFILE) -> list[tuple[Any, RemoteError]]:
    """Fetch ``[(arg, error)]`` for every failed task; each error holds the remote traceback.

    A lost task (its worker died or its job went away) is a failed task, whose
    error's ``kind`` says so; a cancelled task did not fail and is not listed.
    """
    with Session(dbfile=dbfile, create=False) as session:
        return [(arg, error) for arg, error in session.errors(request_id)
                if error.kind != FailureKind.CANCELLED]


def get_output(
    request_id: int, index: int, dbfile: str = DEFAULT_DBFILE
) -> tuple[str, str]:
    """Return the captured ``(stdout, stderr)`` of task ``index`` (from 1) of a request.

    Each is cut to the request's ``capture_bytes``; both are empty for a task
    that has not finished.
    """
    with Session(dbfile=dbfile, create=False) as session:
        return session.output(request_id, index)


def cancel(request_id: int, config: ConfigLike) -> int:
    """Delete the request's jobs and mark its open tasks cancelled; return how many tasks."""
    return cancel_request(request_id, config).n_tasks


def cancel_request(request_id: int, config: ConfigLike) -> Cancellation:
    """Cancel the request's open tasks and delete its jobs; say what was done."""
    with Session(config) as session:
        return session.cancel(request_id, "cancelled by sheepdog.cancel")


def stop_interrupted(request_id: int, config: ConfigLike) -> str:
    """Stop a request whose wait a person interrupted, as ``map`` does; one line says how."""
    with Session(config) as session:
        return f"request {request_id}: {session.stop(request_id, 'cancelled by Ctrl-C')}"


def server_answers(url: str, *, timeout_s: float = 2.0) -> bool:
    """True if a sheepdog server answers its health check at the job's callback ``url``."""
    return health_problem(url, timeout_s=timeout_s) is None


def served(storage: Storage, request_id: int) -> bool | None:
    """Whether a server answers for the request on this machine (None: no job recorded)."""
    latest = storage.latest_job(request_id)
    url = None if latest is None else latest.url
    if latest is None or not url:
        return None
    # The callback URL names this machine as the workers see it (host.docker.internal, a
    # name only the cluster resolves): ask where the server listens instead.
    port, host = latest.port, latest.listen_address
    if not port or not host:
        return server_answers(url)
    scheme = urllib.parse.urlsplit(url).scheme or "http"
    return server_answers(f"{scheme}://{host_port(loopback_for(host), port)}")


#: Requests that map_async submitted from this process, to warn about at exit.
_async_requests: list[tuple[str, int]] = []


def _warn_unserved_at_exit() -> None:
    """At exit, say which map_async requests lose their only server with this process."""
    for dbfile, request_id in _async_requests:
        try:
            with Storage(dbfile) as storage:
                n_open = len(storage.open_task_indices(request_id))
                mine = StoredRequest(storage, request_id).own_server() is not None
        except SheepdogError:
            continue
        if not n_open or not mine:
            continue
        print(textwrap.fill(
            f"sheepdog: request {request_id} still has {n_open} open tasks, and this process "
            "was its only server: its array tasks wait for a server until they give up. "
            f"Serve them with `{sheepdog_command('serve', dbfile=dbfile)}`, or cancel them "
            f"with `{sheepdog_command('cancel', request_id, '--config', 'FILE', dbfile=dbfile)}`.",
            COLUMNS, break_long_words=False, break_on_hyphens=False,
        ), file=sys.stderr, flush=True)


# Registered after server.py's own handler, so it runs first, while the servers still run.
atexit.register(_warn_unserved_at_exit)
