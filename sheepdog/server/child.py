"""Child-process entry point that runs the worker API under gunicorn.

``Server`` (:mod:`.process`) runs ``python -m sheepdog.server.child --fd N ...``
with an already bound, listening socket as file descriptor N. Not for direct use.
"""

from __future__ import annotations

import argparse
import contextvars
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import gevent
from gevent import monkey
from gevent import socket as gsocket
from gunicorn import util as gunicorn_util
from gunicorn.app.base import BaseApplication
from gunicorn.workers.ggevent import GeventWorker

from ..store.db import WouldWait, without_waiting
from .app import create_app
from .body import TRANSFER_ENCODING_KEY
from .process import DEFAULT_WORKERS
from .protocol import CLOSE_KEY

T = TypeVar("T")

__all__ = ["main"]

logger = logging.getLogger(__name__)


def _watch_parent(parent_pid: int) -> None:
    """SIGTERM ourselves (the gunicorn master) once the process that started us is gone."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    logger.warning("parent process %d is gone; stopping the server", parent_pid)
    os.kill(os.getpid(), signal.SIGTERM)


#: How long a connection closed with its body unread stays open for the client to read the answer.
LINGER_S = 1.0
#: gunicorn's ``keepalive``: the total time a connection has to send a request's headers
#: (and for a kept-alive one, to start its next request) before it is closed.
HEADERS_WITHIN_S = 30
#: Connections one gunicorn worker holds at once; each costs a file descriptor and a
#: greenlet (a few KiB), never a thread. More wait in the listen queue.
WORKER_CONNECTIONS = 4096


class Worker(GeventWorker):  # type: ignore[misc]
    """gunicorn's gevent worker: every connection a greenlet, SQLite in a few threads.

    A connection that is idle, or sends its headers or a body slowly, holds a
    file descriptor and a greenlet, never a thread: the 2 x 4 threads of the
    gthread worker that 0.3.0 used could all be held by 8 strangers (see
    docs/security.rst). The headers of a request must arrive within
    ``HEADERS_WITHIN_S`` in all (gunicorn's ``keepalive`` timeout, a
    ``gevent.Timeout`` around the whole parse); a body within its own deadline
    (``sheepdog.server.body``). A body that is not read is never drained: the
    app says ``Connection: close`` (``_closing_app``) and gunicorn closes the
    connection after the answer.

    Only sockets are made cooperative: threads, locks and ``time.sleep`` stay
    real, because every fsync, and every SQLite call that would wait for a lock,
    runs in the hub's thread pool (``_in_threadpool``), where a real lock is
    what a writer must wait on. An SQLite call that need not wait runs in the
    event loop (``_here_unless_waiting``).
    """

    def patch(self) -> None:
        monkey.patch_all(thread=False, time=False, subprocess=False, signal=False)
        listening: list[Any] = self.sockets  # type: ignore[has-type]
        self.sockets = [
            gsocket.socket(s.FAMILY, socket.SOCK_STREAM, fileno=s.sock.detach())
            for s in listening
        ]

    def init_process(self) -> None:
        _raise_open_files_limit()
        _date_once_a_second()
        _settle_settings(self.cfg)
        super().init_process()

    def run(self) -> None:
        gevent.get_hub().threadpool.maxsize = _threadpool_size
        super().run()


#: Threads per worker that carry out SQLite calls and fsyncs (``--threads``).
_threadpool_size = 4
_hub_thread = threading.get_ident()


def _raise_open_files_limit() -> None:
    """Let this worker hold as many connections as the hard limit of open files allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = WORKER_CONNECTIONS + 256
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the open files limit to %d: %s", want, exc)


def _date_once_a_second() -> None:
    """Make gunicorn format its answers' ``Date`` header once a second, not for every answer.

    The header has one-second resolution, and formatting it (``email.utils``,
    about 3 µs) showed in every profile of a round trip. gunicorn's ``Response``
    calls ``gunicorn.util.http_date()`` by that name, so this worker's copy is
    replaced with one that reuses the text within the second.
    """
    format_date: Callable[..., str] = gunicorn_util.http_date
    if getattr(format_date, "cached", False):
        return
    last: tuple[int, str] = (-1, "")

    def http_date(timestamp: float | None = None) -> str:
        nonlocal last
        if timestamp is not None:
            return format_date(timestamp)
        second = int(time.time())
        if last[0] != second:
            last = (second, format_date(second))
        return last[1]

    http_date.cached = True  # type: ignore[attr-defined]
    gunicorn_util.http_date = http_date


def _settle_settings(cfg: Any) -> None:
    """Make reading this worker's gunicorn settings a plain attribute look-up.

    gunicorn's ``Config`` looks every setting up through ``__getattr__`` and the
    setting's ``get()`` (0.7 µs a read against 0.05 µs for an attribute), and it
    reads dozens per request. A worker's settings no longer change once it
    runs (a reload starts new workers), so each is copied into the instance's
    ``__dict__``, where an attribute read finds it before ``__getattr__``.
    """
    settings = getattr(cfg, "settings", None)
    if not isinstance(settings, dict):
        return
    vars(cfg).update({name: setting.get() for name, setting in settings.items()})


def _in_threadpool(call: Callable[[], T]) -> T:
    """Run a blocking call (SQLite, fsync) in the worker's thread pool; wait cooperatively.

    The greenlet waits, the other connections go on. The call runs in a copy
    of this greenlet's context, so Flask's app context and ``g`` are there.
    """
    if threading.get_ident() != _hub_thread:
        return call()  # already in a pool thread
    context = contextvars.copy_context()
    result: T = gevent.get_hub().threadpool.apply(context.run, (call,))
    return result


def _here_unless_waiting(call: Callable[[], T]) -> T:
    """Run an SQLite call in the event loop; in the thread pool if it would wait for a lock.

    Most calls find the database free and take well under a millisecond; handing
    each to a pool thread and back cost about a fifth of the server's CPU per
    round trip (docs/benchmarks.rst). One that finds a lock held raises WouldWait
    before it changes anything, and waits for the lock in the pool, where the
    other connections go on.
    """
    if threading.get_ident() != _hub_thread:
        return call()  # already in a pool thread
    try:
        with without_waiting():
            return call()
    except WouldWait:
        return _in_threadpool(call)


#: ``synchronous`` levels at which a commit does not fsync (in WAL mode), so it may run in
#: the event loop; at FULL and EXTRA every commit fsyncs, and every SQLite call goes to the pool.
_NO_FSYNC_PER_COMMIT = ("OFF", "NORMAL")


def _linger(sock: socket.socket) -> None:
    """Close a connection whose answer is sent, ``LINGER_S`` from now, and send nothing more.

    Closing a socket whose peer is still sending makes the kernel answer with a
    reset, which can destroy the answer before the client reads it; a duplicate
    of the socket keeps the connection open a moment after gunicorn closes its
    own, at the cost of a file descriptor, never a thread.
    """
    try:
        held = socket.socket(fileno=os.dup(sock.fileno()))
    except OSError:
        return
    try:
        held.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    gevent.spawn_later(LINGER_S, held.close)


def _body_unread(environ: dict[str, Any]) -> bool:
    """Whether the request declared a body that the app left (partly) unread."""
    if environ.get(TRANSFER_ENCODING_KEY):
        return True  # a chunked body: gunicorn would read it to its end
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return True
    if length <= 0:
        return False
    left = getattr(getattr(environ.get("wsgi.input"), "reader", None), "length", None)
    return not isinstance(left, int) or left > 0


class _Closing:
    """A response body that, once sent, hands its connection to ``_linger``."""

    def __init__(self, body: Iterable[bytes], sock: socket.socket) -> None:
        self.body = body
        self.sock = sock

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.body)

    def close(self) -> None:
        close = getattr(self.body, "close", None)
        try:
            if callable(close):
                close()
        finally:
            _linger(self.sock)


def _closing_app(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """Wrap the WSGI app: close, never drain, a connection whose body was not read.

    A call that the app marks with ``CLOSE_KEY`` (a refusal before its body, a
    body read straight from the socket) and one whose declared body the app
    did not read (``/api/v1/health`` or an unknown path with a body) are
    answered with ``Connection: close``; gunicorn then closes the connection
    instead of reading the rest of the body, and ``_Closing`` keeps it open
    ``LINGER_S`` for the client to read the answer.
    """

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if environ.get(CLOSE_KEY) or _body_unread(environ):
                environ[CLOSE_KEY] = True
                # Say "Connection: close", so that the client does not send its next call
                # on a connection that is about to go (gunicorn's Response.force_close).
                force_close = getattr(getattr(start_response, "__self__", None), "force_close",
                                      None)
                if callable(force_close):
                    force_close()
            return start_response(status, headers, exc_info)

        body = app(environ, start)
        sock = environ.get("gunicorn.socket")
        if environ.get(CLOSE_KEY) and isinstance(sock, socket.socket):
            return _Closing(body, sock)
        return body

    return wsgi


class _Application(BaseApplication):  # type: ignore[misc]
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        super().__init__()

    def load_config(self) -> None:
        args = self.args
        options: dict[str, Any] = {
            "bind": [f"fd://{args.fd}"],
            "workers": args.workers,
            "worker_class": "sheepdog.server.child.Worker",
            "worker_connections": WORKER_CONNECTIONS,
            # The control socket (~/.gunicorn/gunicorn.ctl) would be shared by every
            # gunicorn of the user, and sheepdog needs none.
            "control_socket_disable": True,
            "keepalive": HEADERS_WITHIN_S,
            # Above SQLite's 30 s busy timeout, so a waiting request is not killed.
            "timeout": 120,
            "graceful_timeout": 5,
            "preload_app": True,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": args.log_level,
            "proc_name": "sheepdog-server",
        }
        if args.certfile:
            options["certfile"] = args.certfile
        if args.keyfile:
            options["keyfile"] = args.keyfile
        if args.parent_pid:
            parent = args.parent_pid

            def when_ready(server: Any) -> None:
                threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()

            options["when_ready"] = when_ready
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return _closing_app(create_app(
            self.args.dbfile,
            max_body_bytes=self.args.max_body_bytes,
            max_blob_bytes=self.args.max_blob_bytes,
            max_clock_skew_s=self.args.max_clock_skew_s,
            synchronous=self.args.synchronous,
            body_base_s=self.args.body_base_s,
            offload=_in_threadpool,
            offload_sqlite=(_here_unless_waiting
                            if self.args.synchronous.upper() in _NO_FSYNC_PER_COMMIT
                            else _in_threadpool),
        ))


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and run gunicorn until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m sheepdog.server.child")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--dbfile", required=True)
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--max-body-bytes", type=int, required=True)
    parser.add_argument("--max-blob-bytes", type=int, required=True)
    parser.add_argument("--max-clock-skew-s", type=float, required=True)
    parser.add_argument("--synchronous", default="NORMAL")
    parser.add_argument("--body-base-s", type=float, required=True)
    parser.add_argument("--parent-pid", type=int, default=0)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--certfile")
    parser.add_argument("--keyfile")
    args = parser.parse_args(argv)
    global _threadpool_size
    _threadpool_size = args.threads
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    _Application(args).run()
    sys.exit(0)


if __name__ == "__main__":
    # Run the imported module, not __main__: gunicorn loads Worker as
    # sheepdog.server.child.Worker, and it must share _threadpool_size and _hub_thread with
    # what main() sets.
    from sheepdog.server import child

    child.main()
