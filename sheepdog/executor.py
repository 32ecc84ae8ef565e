"""A :class:`concurrent.futures.Executor` that runs calls as Grid Engine or Slurm array tasks.

>>> from concurrent.futures import as_completed
>>> with sheepdog.Executor({"host": "headnode"}) as pool:
...     futures = [pool.submit(pow, 2, n) for n in range(10)]
...     print(sorted(f.result() for f in as_completed(futures)))

Calls are grouped: every ``submit`` of the same function that arrives while
the previous one is less than ``flush_delay_s`` old joins one request (one
``qsub``), so a loop of a thousand submits is one array job, not a thousand.
``map`` sends its calls at once. A background thread writes requests,
submits them, polls the database for finished tasks and resolves their
futures, and runs the job :class:`~sheepdog.watch.Watcher` so that dead jobs
end in errors instead of a wait.
"""

from __future__ import annotations

import builtins
import concurrent.futures
import linecache
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from . import serialisation
from .config import ConfigLike, as_config
from .errors import RemoteError, SerialisationError, SheepdogError
from .programs import program_source
from .scheduler import check_options
from .session import Session, check_cache
from .store import OPEN_STATES, Storage, TaskState
from .watch import Watcher

__all__ = ["Executor"]

logger = logging.getLogger(__name__)

#: After Ctrl-C, how long the background thread may take to cancel the requests and
#: delete their jobs (a submission under way finishes first, within its own bounds).
STOP_WAIT_S = 300.0
#: ... and after this long it says what it waits for, as a cluster that does not answer
#: would otherwise hold a Ctrl-C in silence for minutes.
STOP_NOTE_AFTER_S = 5.0

# Built by exec under a module name nothing can import, so that serialisation ships
# these appliers by value: the workers do not have sheepdog installed. The source is
# registered with linecache so that ``mode="source"`` can read it back.
_APPLIER_MODULE = "<sheepdog-applier>"
_APPLIER_SOURCE = program_source("appliers")  # sheepdog/programs/appliers.py
_applier_lock = threading.Lock()
_appliers: dict[str, Any] = {}


def _applier_factories() -> dict[str, Any]:
    with _applier_lock:
        if not _appliers:
            lines = _APPLIER_SOURCE.splitlines(keepends=True)
            linecache.cache[_APPLIER_MODULE] = (len(_APPLIER_SOURCE), None, lines, _APPLIER_MODULE)
            namespace: dict[str, Any] = {"__name__": _APPLIER_MODULE, "__builtins__": builtins}
            exec(compile(_APPLIER_SOURCE, _APPLIER_MODULE, "exec"), namespace)  # noqa: S102 - sheepdog's own applier source
            _appliers.update(namespace)
        return _appliers


def kwargs_applier(f: Callable[..., Any]) -> Callable[[tuple[Any, ...], dict[str, Any]], Any]:
    """A function ``g(args, kwargs)`` calling ``f(*args, **kwargs)`` that ships by value."""
    applier: Callable[[tuple[Any, ...], dict[str, Any]], Any]
    applier = _applier_factories()["make_kwargs_applier"](f)
    return applier


def chunk_applier(f: Callable[..., Any]) -> Callable[[list[tuple[Any, ...]]], list[Any]]:
    """A function ``g(chunk)`` returning ``[f(*args) for args in chunk]`` that ships by value."""
    applier: Callable[[list[tuple[Any, ...]]], list[Any]]
    applier = _applier_factories()["make_chunk_applier"](f)
    return applier


@dataclass
class _Group:
    """Calls of one function waiting to become one request."""

    function: Callable[..., Any]
    payload: bytes
    values: list[bytes] = field(default_factory=list)
    futures: list[Future[Any]] = field(default_factory=list)
    last_added: float = 0.0
    first_added: float = 0.0


@dataclass
class _Outstanding:
    """A submitted request whose futures are not all resolved."""

    futures: list[Future[Any]]
    watcher: Watcher | None  # None: every task came from the cache, no job was submitted
    finished_seen: int = 0
    mark: int = 0
    resolved: set[int] = field(default_factory=set)
    #: Tasks whose futures are still PENDING: cancellable until a worker leases them.
    unstarted: set[int] = field(default_factory=set)


class Executor(concurrent.futures.Executor):
    """Runs calls on the cluster and returns :class:`concurrent.futures.Future` objects.

    ``config`` is a :class:`~sheepdog.Config`, the original's dict or a JSON
    file path; ``ns`` is shipped with every function, as ``map``'s namespace.
    A failed call's future raises :class:`~sheepdog.errors.RemoteError`
    showing the remote traceback. Leaving the ``with`` block (or
    ``shutdown(wait=True)``) waits for every future; results also stay in the
    config's database, one request per group of calls. ``cache`` is as
    :func:`sheepdog.map_async`'s: with ``True`` a call whose function and
    arguments have a result in the database resolves without running.

    A future is running once a worker has leased its task; until then
    ``future.cancel()`` cancels the task. Ctrl-C in the ``with`` block does
    what it does in :func:`sheepdog.map`: the open tasks are cancelled, the
    jobs deleted, and one line per request says so.
    """

    def __init__(
        self,
        config: ConfigLike,
        *,
        ns: Mapping[str, Any] | None = None,
        flush_delay_s: float = 0.1,
        max_hold_s: float = 2.0,
        poll_s: float = 0.2,
        cache: bool | str = False,
    ) -> None:
        check_cache(cache)
        self.cache = cache
        self.config = as_config(config)
        check_options(self.config)  # at once, not in the thread that opens the scheduler
        self.ns = dict(ns) if ns is not None else None
        self.flush_delay_s = flush_delay_s
        self.max_hold_s = max_hold_s
        self.poll_s = poll_s
        self._cond = threading.Condition()
        self._groups: dict[tuple[str, Any], _Group] = {}
        self._flush_now = False
        self._outstanding: dict[int, _Outstanding] = {}
        self._shutdown = False
        self._thread: threading.Thread | None = None
        self._payloads: dict[tuple[str, int], tuple[Callable[..., Any], Callable[..., Any], bytes]]
        self._payloads = {}
        self._broken: BaseException | None = None
        self._interrupted = False
        self._stopped: list[str] = []
        self.request_ids: list[int] = []
        """The ids of the requests this executor submitted, oldest first."""

    # -- concurrent.futures.Executor -----------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Schedule ``fn(*args, **kwargs)`` on the cluster; return its future.

        The function and arguments are serialised here, so an unpicklable
        value raises :class:`~sheepdog.errors.SerialisationError` at once.
        """
        if kwargs:
            return self._add("kwargs", fn, (args, kwargs))
        return self._add("plain", fn, args)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """Like the builtin ``map``, run on the cluster; results come back in order.

        All calls are sent at once. ``chunksize`` > 1 runs that many calls per
        task (fewer, bigger tasks for tiny calls). ``timeout`` bounds the whole
        iteration: :class:`concurrent.futures.TimeoutError` when it runs out.
        """
        if chunksize < 1:
            raise ValueError(f"chunksize must be at least 1, got {chunksize!r}")
        end = None if timeout is None else time.monotonic() + timeout
        calls = list(zip(*iterables))
        if chunksize == 1:
            futures = [self._add("plain", fn, args) for args in calls]
        else:
            chunks = [calls[i : i + chunksize] for i in range(0, len(calls), chunksize)]
            futures = [self._add("chunks", fn, (chunk,)) for chunk in chunks]
        self._flush()
        return self._results(futures, end, chunked=chunksize > 1)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking calls; send what is waiting, and with ``wait`` wait for every future.

        ``cancel_futures`` cancels the calls not yet sent to the cluster. Calls
        already running are not cancelled (use :func:`sheepdog.cancel` with the
        ids in :attr:`request_ids`).
        """
        with self._cond:
            self._shutdown = True
            if cancel_futures:
                for group in self._groups.values():
                    for future in group.futures:
                        future.cancel()
            self._flush_now = True
            self._cond.notify_all()
            thread = self._thread
        if wait and thread is not None:
            thread.join()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Wait for every future; on Ctrl-C, cancel the open tasks and delete the jobs."""
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self._interrupt()
            return
        try:
            self.shutdown(wait=True)
        except KeyboardInterrupt:  # Ctrl-C while leaving the block waits for the futures
            self._interrupt()
            raise

    def _interrupt(self) -> list[str]:
        """Stop as ``map`` does on Ctrl-C: cancel, delete the jobs, one line per request.

        Returns those lines (each printed once, on stderr, when its request stopped).
        """
        with self._cond:
            self._shutdown = self._interrupted = True
            waiting = [f for g in self._groups.values() for f in g.futures]
            self._groups.clear()
            self._cond.notify_all()
            thread = self._thread
        for future in waiting:
            future.cancel()
        if thread is not None:
            thread.join(STOP_NOTE_AFTER_S)
            if thread.is_alive():
                print(f"sheepdog: interrupted: cancelling the open tasks and deleting their "
                      f"jobs; waiting up to {STOP_WAIT_S - STOP_NOTE_AFTER_S:g} s more for the "
                      "cluster to answer", file=sys.stderr, flush=True)
                thread.join(STOP_WAIT_S - STOP_NOTE_AFTER_S)
            if thread.is_alive():
                logger.error("the sheepdog Executor did not stop within %g s", STOP_WAIT_S)
        return self._stopped

    # -- adding calls ---------------------------------------------------------------

    def _add(self, kind: str, fn: Callable[..., Any], value: tuple[Any, ...]) -> Future[Any]:
        if not callable(fn):
            raise TypeError(f"sheepdog.Executor needs a callable, got {type(fn).__name__}")
        blob = serialisation.serialise_value(value, what="the arguments")
        key = (kind, fn)
        with self._cond:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._broken is not None:
                raise SheepdogError(f"this Executor stopped working: {self._broken}")
            group = self._groups.get(key)
            now = time.monotonic()
            if group is None:
                target, payload = self._payload(kind, fn)
                group = self._groups[key] = _Group(target, payload, first_added=now)
            future: Future[Any] = Future()
            group.values.append(blob)
            group.futures.append(future)
            group.last_added = now
            self._ensure_thread()
            self._cond.notify_all()
        return future

    def _payload(self, kind: str, fn: Callable[..., Any]) -> tuple[Callable[..., Any], bytes]:
        cached = self._payloads.get((kind, id(fn)))
        if cached is not None and cached[0] is fn:
            return cached[1], cached[2]
        if kind == "kwargs":
            target: Callable[..., Any] = kwargs_applier(fn)
        elif kind == "chunks":
            target = chunk_applier(fn)
        else:
            target = fn
        payload = serialisation.serialise_function(target, self.ns, mode=self.config.mode)
        self._payloads[(kind, id(fn))] = (fn, target, payload)
        return target, payload

    def _flush(self) -> None:
        with self._cond:
            self._flush_now = True
            self._cond.notify_all()

    def _results(
        self, futures: list[Future[Any]], end: float | None, *, chunked: bool
    ) -> Iterator[Any]:
        # A generator: the futures exist before the first next(), as the stdlib's map.
        try:
            futures.reverse()
            while futures:
                future = futures[-1]
                left = None if end is None else end - time.monotonic()
                try:
                    value = future.result(left)
                except KeyboardInterrupt:
                    # As map does: the whole request, not only these calls; one line.
                    raise KeyboardInterrupt("; ".join(self._interrupt())) from None
                futures.pop()
                if chunked:
                    yield from value
                else:
                    yield value
        finally:
            for future in futures:
                future.cancel()

    # -- the background thread ------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="sheepdog-executor", daemon=True
            )
            self._thread.start()

    def _due_groups(self) -> list[_Group]:
        now = time.monotonic()
        due = []
        for key, group in list(self._groups.items()):
            if (
                self._flush_now
                or now - group.last_added >= self.flush_delay_s
                or now - group.first_added >= self.max_hold_s
            ):
                due.append(group)
                del self._groups[key]
        self._flush_now = False
        return due

    def _run(self) -> None:
        try:
            # One session for the executor's life: one database connection, one scheduler.
            with Session(self.config) as session:
                while True:
                    if self._interrupted:
                        self._stop_all(session)
                        return
                    with self._cond:
                        due = self._due_groups()
                        if not due:
                            if self._shutdown and not self._groups and not self._outstanding:
                                return
                            self._cond.wait(
                                self.flush_delay_s / 2 if self._groups else self.poll_s
                            )
                            due = self._due_groups()
                    for group in due:
                        self._launch(session, group)
                    self._poll(session)
        except BaseException as exc:  # every future must learn why
            logger.exception("the sheepdog Executor's thread failed")
            self._fail_everything(exc)

    def _stop_all(self, session: Session) -> None:
        """Stop every request with open tasks (Ctrl-C); its unfinished futures fail."""
        with self._cond:
            outstanding = list(self._outstanding.items())
            self._outstanding.clear()
        for request_id, out in outstanding:
            if out.watcher is None or not session.storage.open_task_indices(request_id):
                continue
            line = f"request {request_id}: " + session.stop(request_id, "cancelled by Ctrl-C")
            print(f"sheepdog: interrupted: {line}", file=sys.stderr, flush=True)
            self._stopped.append(line)
            for future in out.futures:
                if not future.cancel():
                    _settle(future, False, SheepdogError(line))

    def _fail_everything(self, exc: BaseException) -> None:
        error = SheepdogError(f"the sheepdog Executor's background thread failed: {exc!r}")
        error.__cause__ = exc
        with self._cond:
            self._broken = exc
            futures = [f for g in self._groups.values() for f in g.futures]
            futures += [f for o in self._outstanding.values() for f in o.futures]
            self._groups.clear()
            self._outstanding.clear()
        for future in futures:
            if not future.done():
                future.set_exception(error)

    def _launch(self, session: Session, group: _Group) -> None:
        """Store and submit one group's calls as a request; fail their futures if that fails."""
        # A future stays PENDING (cancellable) until a worker leases its task (_start).
        keep = [i for i, f in enumerate(group.futures) if not f.cancelled()]
        if not keep:
            return
        futures = [group.futures[i] for i in keep]
        values = [group.values[i] for i in keep]
        try:
            request_id, cached = session.store(
                group.payload, values, cache=self.cache, label="Executor"
            )
            self.request_ids.append(request_id)
            if cached == len(values):
                logger.info("request %d: all %d calls from the cache", request_id, cached)
                with self._cond:
                    self._outstanding[request_id] = _Outstanding(futures, None)
                return
            # A failed submission fails the request's tasks there and is raised again here.
            session.launch(request_id, len(values) - cached)
        except Exception as exc:  # noqa: BLE001 - every future must learn why
            logger.error("could not submit %d calls: %s", len(values), exc)
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            return
        logger.info("request %d: submitted %d calls", request_id, len(values))
        watcher = session.watcher(request_id)
        with self._cond:
            self._outstanding[request_id] = _Outstanding(
                futures, watcher, unstarted=set(range(1, len(futures) + 1)))

    def _poll(self, session: Session) -> None:
        """Resolve the futures of finished tasks; let the watchers check the jobs."""
        storage = session.storage
        with self._cond:
            outstanding = list(self._outstanding.items())
        for request_id, out in outstanding:
            if out.unstarted:
                self._start(storage, request_id, out)
            counts = storage.task_counts(request_id)
            finished = sum(n for state, n in counts.items() if state not in OPEN_STATES)
            if finished != out.finished_seen:
                self._resolve(session, request_id, out)
                out.finished_seen = finished
            if finished < len(out.futures):
                if out.watcher is not None:
                    out.watcher.poll(storage)
            elif len(out.resolved) >= len(out.futures):
                with self._cond:
                    del self._outstanding[request_id]
                if out.watcher is not None:
                    out.watcher.finish(storage)

    def _start(self, storage: Storage, request_id: int, out: _Outstanding) -> None:
        """Mark the futures of leased tasks running; cancel the tasks of cancelled futures."""
        states = storage.task_states(request_id)
        cancelled = []
        for index in sorted(out.unstarted):
            future = out.futures[index - 1]
            if future.cancelled():
                cancelled.append(index)
            elif states[index - 1] == TaskState.PENDING:
                continue
            elif not future.set_running_or_notify_cancel():
                cancelled.append(index)
            out.unstarted.discard(index)
        if cancelled:
            storage.cancel_tasks(request_id, cancelled, "cancelled by Future.cancel()")

    def _resolve(self, session: Session, request_id: int, out: _Outstanding) -> None:
        # Only what finished since the last look: each result is read once per request.
        out.mark, rows = session.storage.finished_since(request_id, out.mark)
        settle: list[tuple[Future[Any], bool, Any]] = []
        for index, _, result, error in rows:
            if index in out.resolved:
                continue
            out.resolved.add(index)
            future = out.futures[index - 1]
            out.unstarted.discard(index)
            if future.cancelled():
                continue
            if error is not None:
                remote = RemoteError.from_dict(error, request_id=request_id, task_index=index)
                settle.append((future, False, remote))
                continue
            try:
                settle.append((future, True, serialisation.deserialise_value(result or b"")))
            except Exception as exc:  # noqa: BLE001 - any unpickling error belongs to the future
                error_ = SerialisationError(
                    f"request {request_id} task {index}: cannot unpickle the result: {exc!r}"
                )
                settle.append((future, False, error_))
        # Outside any lock: done-callbacks run here and may call submit().
        for future, ok, value in settle:
            _settle(future, ok, value)


def _settle(future: Future[Any], ok: bool, value: Any) -> None:
    """Give a future its result or exception, unless it was cancelled or settled meanwhile.

    The caller's thread (Ctrl-C, ``Future.cancel``) may cancel a pending future between any
    check here and the setting: that is no error, and must not stop the background thread,
    which still has to stop the requests.
    """
    try:
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
    except InvalidStateError:
        pass
