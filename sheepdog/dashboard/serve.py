"""The dashboard's server: one thread, one selector, a deadline on every connection.

Why not a thread per connection (``ThreadingHTTPServer``), or gunicorn as the
workers' server: the dashboard has one reader, a person's browser, and must
not be stalled by connections that send nothing or trickle. Here a
connection costs a file descriptor and a bounded buffer, never a thread: its
request head (at most ``MAX_HEAD_BYTES``) must arrive within ``HEAD_TIMEOUT_S``
and its answer be taken within ``WRITE_TIMEOUT_S``, or it is closed; at most
``MAX_CONNECTIONS`` are open, and the next ones are closed at once. Only
complete ``GET`` heads reach the app, which answers in well under a second
(the pages are aggregated on the server), one at a time; each answer closes
its connection. It listens on 127.0.0.1 only.
"""

from __future__ import annotations

import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote

__all__ = ["HEAD_TIMEOUT_S", "MAX_CONNECTIONS", "MAX_HEAD_BYTES", "LoopbackServer"]

#: A request's head (request line and headers) must arrive within this long.
HEAD_TIMEOUT_S = 10.0
#: The answer must be taken by the browser within this long.
WRITE_TIMEOUT_S = 30.0
#: A longer request head is refused (431), as are headers beyond it.
MAX_HEAD_BYTES = 16384
#: Connections open at once; more are closed as soon as they are accepted.
MAX_CONNECTIONS = 64
LOOPBACK = "127.0.0.1"

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _Conn:
    def __init__(self, sock: socket.socket, peer: tuple[Any, ...]) -> None:
        self.sock = sock
        self.peer = peer
        self.inbox = bytearray()
        self.outbox = b""
        self.deadline = time.monotonic() + HEAD_TIMEOUT_S


def _status_page(status: str, text: str) -> bytes:
    body = text.encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


class LoopbackServer:
    """Serve a WSGI app on 127.0.0.1:``port`` (0: a free one) until :meth:`stop`."""

    def __init__(self, app: WsgiApp, port: int = 0) -> None:
        self.app = app
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((LOOPBACK, port))
        except OSError:
            self._listener.close()
            raise
        self._listener.listen(MAX_CONNECTIONS)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._conns: dict[int, _Conn] = {}
        self._stop = threading.Event()
        # Wakes select() when stop() is called from another thread.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")

    def stop(self) -> None:
        """Make :meth:`serve_forever` return; safe from any thread."""
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def serve_forever(self) -> None:
        """Answer connections until :meth:`stop`; then close every socket."""
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                wait = min([c.deadline for c in self._conns.values()], default=now + 1.0) - now
                for key, events in self._selector.select(timeout=max(0.0, min(wait, 1.0))):
                    if key.data is None:
                        self._accept()
                    elif key.data != "wake":
                        self._serve(key.data, events)
                now = time.monotonic()
                for conn in [c for c in self._conns.values() if c.deadline < now]:
                    self._close(conn)
        finally:
            for conn in list(self._conns.values()):
                self._close(conn)
            self._selector.close()
            for sock in (self._listener, self._wake_r, self._wake_w):
                sock.close()

    def _accept(self) -> None:
        for _ in range(MAX_CONNECTIONS):
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # out of descriptors: the kernel keeps the rest waiting
            if len(self._conns) >= MAX_CONNECTIONS:
                sock.close()
                continue
            sock.setblocking(False)
            conn = _Conn(sock, peer)
            self._conns[sock.fileno()] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _close(self, conn: _Conn) -> None:
        self._conns.pop(conn.sock.fileno(), None)
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def _serve(self, conn: _Conn, events: int) -> None:
        try:
            if events & selectors.EVENT_READ and not conn.outbox:
                data = conn.sock.recv(65536)
                if not data:
                    self._close(conn)
                    return
                conn.inbox += data
                end = conn.inbox.find(b"\r\n\r\n")
                if end < 0:
                    if len(conn.inbox) > MAX_HEAD_BYTES:
                        self._answer(conn, _status_page("431 Request Header Fields Too Large",
                                                        "request head too large\n"))
                    return
                if end > MAX_HEAD_BYTES:
                    self._answer(conn, _status_page("431 Request Header Fields Too Large",
                                                    "request head too large\n"))
                    return
                self._answer(conn, self._respond(bytes(conn.inbox[:end]), conn.peer))
            elif events & selectors.EVENT_WRITE and conn.outbox:
                sent = conn.sock.send(conn.outbox)
                conn.outbox = conn.outbox[sent:]
                if not conn.outbox:
                    self._close(conn)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)

    def _answer(self, conn: _Conn, response: bytes) -> None:
        conn.outbox = response
        conn.deadline = time.monotonic() + WRITE_TIMEOUT_S
        self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)

    def _respond(self, head: bytes, peer: tuple[Any, ...]) -> bytes:
        """Run the app on one request head; return the whole HTTP answer."""
        try:
            lines = head.decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ")
            headers = [line.split(":", 1) for line in lines[1:] if line]
            if not version.startswith("HTTP/1.") or any(len(h) != 2 for h in headers):
                raise ValueError(lines[0])
        except ValueError:
            return _status_page("400 Bad Request", "malformed request\n")
        if method not in ("GET", "HEAD"):
            return _status_page("405 Method Not Allowed", "the dashboard is read-only\n")
        path, _, query = target.partition("?")
        environ: dict[str, Any] = {
            "REQUEST_METHOD": method, "SCRIPT_NAME": "", "PATH_INFO": unquote(path),
            "QUERY_STRING": query, "SERVER_NAME": LOOPBACK, "SERVER_PORT": str(self.port),
            "SERVER_PROTOCOL": version, "REMOTE_ADDR": str(peer[0]),
            "REMOTE_PORT": str(peer[1]), "CONTENT_LENGTH": "0", "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http", "wsgi.input": _EMPTY, "wsgi.errors": sys.stderr,
            "wsgi.multithread": False, "wsgi.multiprocess": False, "wsgi.run_once": False,
        }
        for name, value in headers:
            key = name.strip().upper().replace("-", "_")
            if key in ("CONTENT_LENGTH", "CONTENT_TYPE"):
                continue  # a GET's body is never read
            environ[f"HTTP_{key}"] = value.strip()
        answer: list[str] = []
        extra: list[tuple[str, str]] = []

        def start_response(status: str, response_headers: list[tuple[str, str]],
                           exc_info: Any = None) -> Callable[[bytes], None]:
            answer[:] = [status]
            extra[:] = response_headers
            return lambda _: None

        chunks = self.app(environ, start_response)
        try:
            body = b"".join(chunks)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        kept = [(k, v) for k, v in extra if k.lower() not in ("content-length", "connection")]
        head_out = "".join(f"{k}: {v}\r\n" for k, v in kept)
        out = (f"HTTP/1.1 {answer[0]}\r\n{head_out}Content-Length: {len(body)}\r\n"
               "Connection: close\r\n\r\n").encode("latin-1")
        return out if method == "HEAD" else out + body


class _Empty:
    def read(self, *_: Any) -> bytes:
        return b""

    def readline(self, *_: Any) -> bytes:
        return b""


_EMPTY = _Empty()
