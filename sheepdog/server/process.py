"""The server process: :class:`Server` runs the app under gunicorn in a child process.

The socket is bound here and handed to the child, so a random port has no
bind-then-close race. :func:`get_server` keeps one server per port, as the
original did; every server still running is stopped at exit.
"""

from __future__ import annotations

import atexit
import enum
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from sheepdog.errors import ServerError
from sheepdog.net import HEALTH_PATH, health_problem, host_port, loopback_for
from sheepdog.server.tls import hold_while_serving
from sheepdog.store import DEFAULT_DBFILE, RequestState, Storage

from .protocol import (
    BODY_BASE_S,
    DEFAULT_MAX_BLOB_BYTES,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CLOCK_SKEW_S,
)

__all__ = [
    "BIND_RETRY_S",
    "Server",
    "get_server",
    "listen_address",
    "registry",
    "resume_port",
]

# The server package logs under one name, the one it had as a module.
logger = logging.getLogger("sheepdog.server")


#: How long a server on a fixed port waits for the port to become free.
BIND_RETRY_S = 10.0


#: gunicorn worker processes. One: its event loop carries every connection, and runs each
#: SQLite call that finds the database free at once; with two, each took turns at the write
#: lock with the other and handed 16 % of its calls to a thread (docs/benchmarks.rst: 0.40
#: against 0.59 ms of server CPU per round trip, and a quarter more tasks/s batched).
DEFAULT_WORKERS = 1


class _Registry:
    """Every server this process runs (stopped at exit), and the ones shared by a key.

    The one registry: :func:`get_server` shares a server per port (and one for
    ``port=None``); :func:`server_for` one random-port server per database and
    TLS setting. A stopped server leaves it; a dead one is started again on its
    port when asked for (:meth:`Server.ensure_running`).
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        #: Started and not yet stopped, whoever started them.
        self.running: set[Server] = set()
        #: Key -> server: a port, ``DEFAULT_PORT_KEY``, or ``(database path, tls)``.
        self.shared: dict[object, Server] = {}

    def share(
        self,
        key: object,
        start: Callable[[], Server],
        check: Callable[[Server], None] | None = None,
    ) -> Server:
        """The running server under ``key``: restarted if it died, ``start()``-ed if none."""
        with self.lock:
            server = self.shared.get(key)
            if server is not None and server.stopped:
                server = None
            if server is None:
                server = self.shared[key] = start()
                return server
            if check is not None:
                check(server)
            server.ensure_running()
            return server

    def adopt(self, key: object, server: Server) -> None:
        """Share ``server`` under ``key`` from now on, in place of the one there (if any)."""
        with self.lock:
            self.shared[key] = server

    def servers(self, dbfile: str | Path | None = None) -> list[Server]:
        """The running servers (of one database, if given)."""
        with self.lock:
            found = list(self.running)
        if dbfile is None:
            return found
        return [s for s in found if s.dbfile == os.path.abspath(dbfile)]

    def stop(self, dbfile: str | Path) -> None:
        """Stop every server of a database (a test's, at its end)."""
        for server in self.servers(dbfile):
            server.stop()


#: The key under which :func:`get_server` keeps its ``port=None`` server.
DEFAULT_PORT_KEY = "default"
registry = _Registry()


def _stop_all() -> None:
    for server in registry.servers():
        try:
            server.stop()
        except Exception:  # at exit, stop the rest even if one fails
            logger.exception("could not stop %r at exit", server)


atexit.register(_stop_all)


def listen_address(localhost: str) -> str:
    """Return the address of this machine that ``localhost`` (the workers' name for it) resolves to.

    The server listens there and nowhere else: the workers reach this machine by
    that name, and no other interface needs to hear them. IPv4 is preferred, as
    ``getaddrinfo`` orders it.
    """
    try:
        infos = socket.getaddrinfo(localhost, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise ServerError(
            f"config key 'localhost' is {localhost!r}, which does not resolve on this machine "
            f"({exc}), so sheepdog cannot tell which address to listen on: set "
            "'listen_address' to the address by which the workers reach this machine, or to "
            "'0.0.0.0' to listen on every interface"
        ) from exc
    addresses = [str(info[4][0]) for info in infos]
    ipv4 = [a for a in addresses if ":" not in a]
    return (ipv4 or addresses)[0]


class _Resume(enum.Enum):
    """``Server()`` without a port: the port its database's open requests call."""

    PORT = "the port recorded for the newest request with open tasks"

    def __repr__(self) -> str:
        return "<the port of the newest open request>"  # what the API page shows


def resume_port(storage: Storage) -> int | None:
    """The port that the newest request with open tasks recorded for its server, if any.

    Its job file names that port, so its surviving workers find a server started there.
    """
    for row in reversed(storage.list_requests()):
        if row["state"] != RequestState.OPEN or not storage.open_task_indices(row["id"]):
            continue
        latest = storage.latest_job(row["id"])
        if latest is not None and latest.port is not None:
            return latest.port
    return None


class Server:
    """Serve the worker API from a gunicorn child process; start it now.

    Without a ``port`` (``Server()``, the original's restart recipe) it listens
    on the port that the database's newest request with open tasks was
    submitted with, where that request's surviving workers look for it (a
    free port when there is none). ``port=None`` picks a free port; the socket
    is bound here and handed to the child, so the port cannot be taken in
    between. ``host`` is the address to listen
    on (default: where the database's jobs recorded their server on ``port`` listening,
    else the address this machine's fully qualified name resolves to; "0.0.0.0" for
    every interface). ``password`` is kept for the
    original's signature and for ``get_server``'s checks: authentication is per
    request (each request's secret), not per server. Stop with ``stop()``, a
    ``with`` block, or let interpreter exit do it. The child also stops by
    itself if this process dies.
    """

    def __init__(
        self,
        port: int | None | _Resume = _Resume.PORT,
        password: str | None = None,
        dbfile: str | Path = DEFAULT_DBFILE,
        *,
        host: str | None = None,
        workers: int = DEFAULT_WORKERS,
        threads: int = 4,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
        max_clock_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_S,
        synchronous: str = "NORMAL",
        body_base_s: float = BODY_BASE_S,
        certfile: str | Path | None = None,
        keyfile: str | Path | None = None,
        start_timeout_s: float = 30.0,
        log_level: str = "warning",
    ) -> None:
        self.password = password
        self.dbfile = os.path.abspath(dbfile)
        if port is _Resume.PORT:
            with Storage(self.dbfile, synchronous=synchronous) as db:
                port = resume_port(db)
        self.port: int | None = port
        if host is None:
            # Not every interface unless asked. A server restarted on a port listens where
            # the last one did for the jobs that call it; else where this machine's name
            # resolves.
            with Storage(self.dbfile, synchronous=synchronous) as db:
                recorded = db.listen_address_for_port(port) if port else None
            host = recorded or listen_address(socket.getfqdn())
        self.host = host
        self.workers = workers
        self.threads = threads
        self.max_body_bytes = max_body_bytes
        self.max_blob_bytes = max_blob_bytes
        self.max_clock_skew_s = max_clock_skew_s
        self.synchronous = synchronous
        self.body_base_s = body_base_s
        self.certfile = None if certfile is None else os.path.abspath(certfile)
        self.keyfile = None if keyfile is None else os.path.abspath(keyfile)
        self.start_timeout_s = start_timeout_s
        self.log_level = log_level
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._stopped = False
        self._lock = threading.RLock()
        self._start()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else ("running" if self.alive else "dead")
        return f"<Server port={self.port} dbfile={self.dbfile!r} pid={self.pid} {state}>"

    @property
    def scheme(self) -> str:
        """``https`` when serving TLS, else ``http``."""
        return "https" if self.certfile else "http"

    @property
    def pid(self) -> int | None:
        """The gunicorn master's process id, or None when not running."""
        return None if self._proc is None else self._proc.pid

    @property
    def alive(self) -> bool:
        """True while the child process runs."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def stopped(self) -> bool:
        """True once ``stop()`` was called; a stopped server cannot be restarted."""
        return self._stopped

    def url_for(self, hostname: str) -> str:
        """Return the base URL at which workers reach this server via ``hostname``."""
        return f"{self.scheme}://{host_port(hostname, str(self.port))}"

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # A server restarted on its port right after a kill -9 may find the old gunicorn
        # workers still closing the socket: give them a few seconds.
        deadline = time.monotonic() + (BIND_RETRY_S if self.port else 0.0)
        while True:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.host, self.port or 0))
                sock.listen(1024)
                return sock
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EADDRINUSE and time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                if exc.errno == errno.EADDRINUSE:
                    advice = "choose another port or stop the program that uses it"
                else:
                    advice = (
                        "set the config key 'listen_address' to an address of this machine "
                        "that the workers reach"
                    )
                raise ServerError(
                    f"cannot listen on {self.host}:{self.port or 'a random port'}: {exc}; {advice}"
                ) from exc

    def _command(self, fd: int) -> list[str]:
        command = [
            sys.executable,
            "-m",
            "sheepdog.server.child",
            "--fd",
            str(fd),
            "--dbfile",
            self.dbfile,
            "--workers",
            str(self.workers),
            "--threads",
            str(self.threads),
            "--max-body-bytes",
            str(self.max_body_bytes),
            "--max-blob-bytes",
            str(self.max_blob_bytes),
            "--max-clock-skew-s",
            str(self.max_clock_skew_s),
            "--synchronous",
            self.synchronous,
            "--body-base-s",
            str(self.body_base_s),
            "--parent-pid",
            str(os.getpid()),
            "--log-level",
            self.log_level,
        ]
        if self.certfile:
            command += ["--certfile", self.certfile]
        if self.keyfile:
            command += ["--keyfile", self.keyfile]
        return command

    def _start(self) -> None:
        with self._lock:
            if self._stopped:
                raise ServerError(f"{self!r} was stopped; create a new Server")
            # Fail here, with a StorageError, rather than in the child.
            Storage(self.dbfile, synchronous=self.synchronous).close()
            sock = self._bind()
            self.port = sock.getsockname()[1]
            env = dict(os.environ)
            package_root = str(Path(__file__).resolve().parent.parent)
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (package_root, env.get("PYTHONPATH", "")) if p
            )
            self._log = tempfile.TemporaryFile(prefix="sheepdog-server-")
            # The child (and its gunicorn workers) inherit this shared lock and hold it while
            # they serve, so the certificate that job files pin is not renewed under them.
            in_use = hold_while_serving(self.certfile) if self.certfile else None
            try:
                self._proc = subprocess.Popen(
                    self._command(sock.fileno()),
                    pass_fds=(sock.fileno(),) + (() if in_use is None else (in_use,)),
                    stdin=subprocess.DEVNULL,
                    stdout=self._log,
                    stderr=self._log,
                    env=env,
                    # Its own process group: a terminal's Ctrl-C reaches us, not the
                    # child, and SIGKILL can reach gunicorn's workers too.
                    start_new_session=True,
                )
            except OSError as exc:
                self._log.close()
                self._log = None
                raise ServerError(f"cannot start the server process: {exc}") from exc
            finally:
                sock.close()
                if in_use is not None:
                    os.close(in_use)
            with registry.lock:
                registry.running.add(self)
            try:
                self._wait_healthy()
            except BaseException:
                output = self.output()
                self._kill()
                if isinstance(sys.exc_info()[1], ServerError):
                    raise ServerError(f"{sys.exc_info()[1]}\nserver output:\n{output}") from None
                raise
            logger.info(
                "server for %s listening on port %d (pid %s)", self.dbfile, self.port, self.pid
            )

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        url = self.url_for(loopback_for(self.host))
        last_error = "no answer"
        while True:
            proc = self._proc
            assert proc is not None
            if proc.poll() is not None:
                raise ServerError(
                    f"the server process exited with status {proc.returncode} while starting"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerError(
                    f"the server did not answer {HEALTH_PATH} within {self.start_timeout_s} s "
                    f"({last_error})"
                )
            problem = health_problem(url, timeout_s=min(2.0, max(remaining, 0.1)))
            if problem is None:
                return
            last_error = problem
            time.sleep(0.05)

    def output(self) -> str:
        """Return what the child process wrote to stdout and stderr so far (last 20 kB)."""
        log = self._log
        if log is None or log.closed:
            return ""
        try:
            log.flush()
            size = log.seek(0, os.SEEK_END)
            log.seek(max(0, size - 20_000))
            return log.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        self._release()

    def _release(self) -> None:
        with registry.lock:
            registry.running.discard(self)
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server: SIGTERM, wait up to ``timeout_s``, then SIGKILL; safe twice."""
        with self._lock:
            self._stopped = True
            proc = self._proc
            if proc is None:
                self._release()
                return
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    logger.warning(
                        "server pid %d ignored SIGTERM for %.0f s; killing it", proc.pid, timeout_s
                    )
            # The group also holds gunicorn's workers, should the master be gone.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            self._release()

    def ensure_running(self) -> bool:
        """Start the child again on its port if it died; True if it did (not after ``stop()``).

        Workers retry for minutes, so a server that died (OOM killer, kill -9) is
        simply started again and the map goes on. The one place this rule lives.
        """
        with self._lock:
            if self._stopped or self.alive:
                return False
            self.restart()
            return True

    def restart(self) -> None:
        """Start the child again on the same port after it died; no-op while alive."""
        with self._lock:
            if self.alive:
                return
            if self._proc is not None:
                self._proc.wait()
                logger.warning(
                    "server on port %s died (status %s); restarting it:\n%s",
                    self.port,
                    self._proc.returncode,
                    self.output(),
                )
            self._release()
            self._start()

    def __enter__(self) -> Server:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def get_server(
    port: int | None = None,
    password: str | None = None,
    dbfile: str | Path = DEFAULT_DBFILE,
    **options: Any,
) -> Server:
    """Return the running server on ``port``, starting one if needed.

    One server per port: asking again for the same port reuses it (restarting
    it if its process died), and raises RuntimeError if ``dbfile`` or
    ``password`` differ. ``port=None`` starts a server on a random port the
    first time, and returns that same server on later ``None`` calls.
    ``options`` go to ``Server`` when one is started.
    """

    def check(server: Server) -> None:
        if server.dbfile != os.path.abspath(dbfile):
            raise RuntimeError(
                f"the server on port {server.port} uses {server.dbfile}, not "
                f"{os.path.abspath(dbfile)}; use another port for another database"
            )
        if server.password != password:
            raise RuntimeError(
                f"the server on port {server.port} was started with another password"
            )

    with registry.lock:
        key: object = port
        if port is None:
            # The port=None server, by its port: started again there once it was stopped.
            default = registry.shared.get(DEFAULT_PORT_KEY)
            key = default.port if default is not None else DEFAULT_PORT_KEY

        def start() -> Server:
            server = Server(key if isinstance(key, int) else None, password, dbfile, **options)
            assert server.port is not None
            registry.shared[server.port] = server
            return server

        server = registry.share(key, start, check)
        if port is None:
            registry.shared[DEFAULT_PORT_KEY] = server
        return server
