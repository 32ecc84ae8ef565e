"""Child-process entry point that runs the worker API under gunicorn.

``Server`` runs ``python -m sheepdog._serve --fd N ...`` with an already bound,
listening socket as file descriptor N. Not for direct use.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import ThreadWorker

from sheepdog.server import CLOSE_KEY, create_app

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

_closing = threading.local()


class _Linger:
    """Closes sockets ``LINGER_S`` after they were handed over, from one thread.

    Closing a socket whose peer is still sending makes the kernel answer with a
    reset, which can destroy the answer before the client reads it; so the
    close waits a moment, without holding a request thread for it.
    """

    def __init__(self) -> None:
        self._queue: collections.deque[tuple[float, socket.socket]] = collections.deque()
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, sock: socket.socket) -> None:
        with self._ready:
            self._queue.append((time.monotonic() + LINGER_S, sock))
            # Started here, in the forked gunicorn worker: threads do not survive a fork.
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="sheepdog-linger", daemon=True
                )
                self._thread.start()
            self._ready.notify()

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue:
                    self._ready.wait()
                deadline, sock = self._queue[0]
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._ready.wait(remaining)
                    continue
                self._queue.popleft()
            sock.close()


_linger = _Linger()


class Worker(ThreadWorker):  # type: ignore[misc]
    """gunicorn's gthread worker, but a call refused with its body unread is closed at once.

    gunicorn drains an unread body (up to 5 s in the worker thread) before it
    reuses a connection, and lingers up to 2 s in its main loop when it closes
    one: a few clients that send headers and then a body that never comes
    would hold every thread, and /api/v1/health with them. Here the answer is
    sent, our side is shut so that gunicorn's close returns at once, and a
    duplicate of the socket keeps the connection open for ``LINGER_S`` so that
    the client can read the answer.
    """

    def handle_request(self, req: Any, conn: Any) -> bool:
        _closing.flag = False
        keepalive = bool(super().handle_request(req, conn))
        if not _closing.flag:
            return keepalive
        try:
            held = socket.socket(fileno=os.dup(conn.sock.fileno()))
        except OSError:
            return False
        try:
            held.shutdown(socket.SHUT_WR)
            held.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        _linger.add(held)
        return False


def _closing_app(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """Wrap the WSGI app to tell ``Worker`` which calls must close their connection."""

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if environ.get(CLOSE_KEY):
                # Say "Connection: close", so that the client does not send its next call
                # on a connection that is about to go (gunicorn's Response.force_close).
                force_close = getattr(getattr(start_response, "__self__", None), "force_close",
                                      None)
                if callable(force_close):
                    force_close()
            return start_response(status, headers, exc_info)

        try:
            return app(environ, start)
        finally:
            _closing.flag = bool(environ.get(CLOSE_KEY))

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
            "threads": args.threads,
            "worker_class": "sheepdog._serve.Worker",
            # The control socket (~/.gunicorn/gunicorn.ctl) would be shared by every
            # gunicorn of the user, and sheepdog needs none.
            "control_socket_disable": True,
            "keepalive": 30,
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
            max_clock_skew_s=self.args.max_clock_skew_s,
            synchronous=self.args.synchronous,
            body_base_s=self.args.body_base_s,
        ))


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and run gunicorn until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m sheepdog._serve")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--dbfile", required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--max-body-bytes", type=int, required=True)
    parser.add_argument("--max-clock-skew-s", type=float, required=True)
    parser.add_argument("--synchronous", default="NORMAL")
    parser.add_argument("--body-base-s", type=float, required=True)
    parser.add_argument("--parent-pid", type=int, default=0)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--certfile")
    parser.add_argument("--keyfile")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    _Application(args).run()
    sys.exit(0)


if __name__ == "__main__":
    # Run the imported module, not __main__: gunicorn loads Worker as sheepdog._serve.Worker,
    # and it must share _closing with the app that main() loads.
    from sheepdog import _serve

    _serve.main()
