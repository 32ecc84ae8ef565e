"""The real server under strangers' connections that never finish, while a real map runs.

The stall of issue 25: idle connections, slow bodies to routes that read none,
and slow headers must cost the server a file descriptor each, never a thread,
so ``/api/v1/health`` keeps answering and the map finishes.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from store_helpers import Storage
from test_executor import LocalJobs, local_config
from test_server_hardening import health_s, status_within

import sheepdog
from sheepdog import server_for
from sheepdog.errors import ConfigError
from sheepdog.poll import poll_until
from sheepdog.server import Server
from sheepdog.server.auth import signed_headers

#: The stranger's connections (issue 25's measurement).
N_IDLE = 64
N_SLOW_BODY = 24
N_SLOW_HEADERS = 12
#: How fast /api/v1/health must answer while they are held.
HEALTH_WITHIN_S = 2.0
WAIT_S = 120.0


def quarter_second(i: int) -> int:
    time.sleep(0.25)
    return i


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Stranger:
    """Connections that never finish a request, fed one byte a second from one thread."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[socket.socket] = []
        # Each slow connection with the bytes it still has to send.
        self.slow: list[tuple[socket.socket, bytearray]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._feed, daemon=True)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def hold(self, n_idle: int, n_slow_body: int, n_slow_headers: int) -> None:
        for _ in range(n_idle):
            self.idle.append(self.connect())
        for i in range(n_slow_body):
            # Routes that need no signature and read no body: health and a path that is not.
            method, path = ("GET", "/api/v1/health") if i % 2 else ("POST", f"/nothing/{i}")
            head = (f"{method} {path} HTTP/1.1\r\nHost: x\r\n"
                    "Content-Length: 10000\r\n\r\n").encode()
            sock = self.connect()
            sock.sendall(head)
            self.slow.append((sock, bytearray(b"x" * 10_000)))
        for i in range(n_slow_headers):
            head = f"GET /api/v1/health?{i} HTTP/1.1\r\nHost: x\r\nX-Slow: {'y' * 500}\r\n\r\n"
            self.slow.append((self.connect(), bytearray(head.encode())))
        self._thread.start()

    def _feed(self) -> None:
        while not self._stop.wait(1.0):  # one byte a second, as a stranger would
            for sock, rest in self.slow:
                if rest:
                    try:
                        sock.send(rest[:1])
                    except OSError:
                        rest.clear()  # the server closed it: that is its right
                    del rest[:1]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for sock in self.idle + [s for s, _ in self.slow]:
            sock.close()


@pytest.fixture
def local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    jobs = LocalJobs(monkeypatch)
    yield local_config(tmp_path, workers=2, port=free_port(), timeout_s=WAIT_S)
    jobs.close()


def test_a_map_finishes_while_strangers_hold_connections(local: dict[str, Any]) -> None:
    started = time.monotonic()
    rid = sheepdog.map_async(quarter_second, list(range(60)), local)
    port = local["port"]
    stranger = Stranger(port)
    slowest = [0.0]
    finished: list[Any] = []
    try:
        stranger.hold(N_IDLE, N_SLOW_BODY, N_SLOW_HEADERS)

        def check() -> bool:
            slowest[0] = max(slowest[0], health_s(port, timeout_s=15.0))
            assert slowest[0] < HEALTH_WITHIN_S, f"/health took {slowest[0]:.1f} s"
            finished[:] = sheepdog.get_results(rid, local["dbfile"], block=False)
            return all(value is not None for _arg, value in finished)

        assert poll_until(check, timeout_s=60.0, interval_s=0.5), (
            f"{sum(v is not None for _a, v in finished)} of 60 tasks finished")
    finally:
        stranger.close()
    print(f"60 tasks in {time.monotonic() - started:.1f} s; /health at most "
          f"{slowest[0]:.3f} s")
    assert [value for _arg, value in finished] == list(range(60))


def process_tree(pid: int) -> list[int]:
    """``pid`` and its children (gunicorn's master and workers)."""
    found = [pid]
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        found += process_tree(int(child))
    return found


def sockets(pid: int) -> int:
    """The sockets open in the server's processes."""
    found = 0
    for p in process_tree(pid):
        for fd in os.listdir(f"/proc/{p}/fd"):
            try:
                found += os.readlink(f"/proc/{p}/fd/{fd}").startswith("socket:")
            except FileNotFoundError:
                pass  # closed meanwhile
    return found


def threads(pid: int) -> dict[int, int]:
    """The threads of each of the server's processes, by process id."""
    return {p: len(os.listdir(f"/proc/{p}/task")) for p in process_tree(pid)}


def test_idle_connections_cost_a_file_descriptor_never_a_thread(tmp_path: Path) -> None:
    n = 400
    with Server(None, None, str(tmp_path / "db.sqlite"), host="127.0.0.1") as server:
        assert server.port is not None and server.pid is not None
        pid = server.pid
        assert health_s(server.port) < HEALTH_WITHIN_S
        # The server answers as soon as one worker does; gunicorn may still be forking the
        # next (ci stop 29: "threads 3 -> 4" was that worker's arrival, not a connection's cost).
        assert poll_until(lambda: len(process_tree(pid)) == 1 + server.workers, timeout_s=20), \
            process_tree(pid)
        # ... and until the health call's connection, which lingers a moment, is closed:
        # then each process holds the listener and nothing else.
        assert poll_until(lambda: sockets(pid) == 1 + server.workers, timeout_s=20), sockets(pid)
        threads_before, sockets_before = threads(pid), sockets(pid)
        stranger = Stranger(server.port)
        try:
            stranger.hold(n, 0, 0)
            # Wait until the server has taken every one of them.
            assert poll_until(lambda: sockets(pid) >= sockets_before + n, timeout_s=20), \
                sockets(pid)
            threads_after, sockets_after = threads(pid), sockets(pid)
            print(f"{n} idle connections: threads {threads_before} -> {threads_after}, "
                  f"sockets {sockets_before} -> {sockets_after}")
            assert threads_after == threads_before
            assert sockets_after - sockets_before <= n + 10
            assert health_s(server.port) < HEALTH_WITHIN_S
        finally:
            stranger.close()


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/api/v1/health", 200), ("POST", "/nothing", 404),
])
def test_a_body_that_is_not_read_is_not_drained_the_connection_is_closed(
    tmp_path: Path, method: str, path: str, status: int
) -> None:
    with Server(None, None, str(tmp_path / "db.sqlite"), host="127.0.0.1") as server:
        assert server.port is not None
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n"
                         "Content-Length: 10000\r\n\r\nxx".encode())
            answer = b""
            sock.settimeout(5.0)
            while True:  # until the server closes; within 5 s, or the recv times out
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
        assert head.startswith(f"http/1.1 {status}") and "connection: close" in head, head


def test_a_replayed_blob_upload_is_answered_from_its_record_without_its_body(
    tmp_path: Path
) -> None:
    dbfile = str(tmp_path / "db.sqlite")
    with Storage(dbfile) as db:
        rid = db.new_request(b"F", None, [b"x"], settings={"lease_s": 30.0})
        secret = db.get_secret(rid)
    data = b"blob" * 50_000
    digest = hashlib.sha256(data).hexdigest()
    path = f"/api/v1/requests/{rid}/blobs/{digest}"
    headers = signed_headers(secret, "PUT", path, data)
    with Server(None, None, dbfile, host="127.0.0.1") as server:
        assert server.port is not None
        head = (f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(head + data)
            assert status_within(sock, 10.0).startswith("HTTP/1.1 200")
        # The replay sends only the headers: its answer comes from the nonce's record.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(head)
            assert status_within(sock, 5.0).startswith("HTTP/1.1 200")


def test_max_blob_bytes_is_the_servers_and_the_configs(tmp_path: Path) -> None:
    dbfile = str(tmp_path / "db.sqlite")
    with Storage(dbfile) as db:
        rid = db.new_request(b"F", None, [b"x"], settings={"lease_s": 30.0})
        secret = db.get_secret(rid)
    data = b"b" * 2000
    path = f"/api/v1/requests/{rid}/blobs/{hashlib.sha256(data).hexdigest()}"
    config = sheepdog.Config(scheduler="local", max_blob_bytes=1000)
    options = server_for.server_options(config, host="127.0.0.1")
    with Server(None, None, dbfile, **options) as server:
        assert server.port is not None
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("PUT", path, data, signed_headers(secret, "PUT", path, data))
        response = conn.getresponse()
        message = json.loads(response.read())["error"]["message"]
        conn.close()
    assert response.status == 413 and "max_blob_bytes (1000)" in message
    with pytest.raises(ConfigError, match="max_blob_bytes"):
        sheepdog.Config(scheduler="local", max_blob_bytes=0)
