"""The real gunicorn server against someone who is not a worker: raw sockets, bounded waits."""

from __future__ import annotations

import http.client
import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from store_helpers import Storage

from sheepdog import server_for
from sheepdog.config import Config
from sheepdog.errors import ConfigError, ServerError
from sheepdog.poll import poll_until
from sheepdog.server import Server, listen_address
from sheepdog.server.auth import signed_headers
from sheepdog.store.db import SCHEMA_VERSION, _migrate_to_1
from sheepdog.store.queue import RENEW_SQL


@pytest.fixture
def dbfile(tmp_path: Path) -> str:
    return str(tmp_path / "hard.sqlite")


@pytest.fixture
def rid(dbfile: str) -> int:
    with Storage(dbfile) as db:
        return db.new_request(b"F", None, [b"x"] * 3, settings={"lease_s": 30.0})


@pytest.fixture
def server(dbfile: str, rid: int) -> Iterator[Server]:
    # The defaults that map() uses: 2 gunicorn workers of 4 threads each.
    with Server(None, None, dbfile, host="127.0.0.1", body_base_s=2.0) as running:
        yield running


def headers_only(port: int, rid: int, length: int, extra: dict[str, str] | None = None) -> bytes:
    lines = [f"POST /api/v1/requests/{rid}/results HTTP/1.1", f"Host: 127.0.0.1:{port}",
             "Content-Type: application/json", f"Content-Length: {length}"]
    lines += [f"{name}: {value}" for name, value in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def forged() -> dict[str, str]:
    """Headers that look signed, with a current time, but are not: the body is not awaited."""
    return {"X-Sheepdog-Time": str(int(time.time())), "X-Sheepdog-Nonce": "ab" * 16,
            "X-Sheepdog-Body-SHA256": "cd" * 32, "X-Sheepdog-Signature": "00" * 32}


def status_within(sock: socket.socket, timeout_s: float) -> str:
    """Read the answer's status line, waiting at most ``timeout_s``; never send more."""
    sock.settimeout(timeout_s)
    answer = b""
    try:
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    except TimeoutError:
        return "no answer"
    return answer.split(b"\r\n", 1)[0].decode("latin-1")


def health_s(port: int, timeout_s: float = 20.0) -> float:
    """Seconds /api/v1/health takes to answer (it must answer within ``timeout_s``)."""
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", "/api/v1/health")
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["ok"] is True
    finally:
        conn.close()
    return time.monotonic() - start


def test_an_unsigned_64_mib_post_is_refused_before_its_body_is_sent(
    server: Server, rid: int
) -> None:
    assert server.port is not None
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(headers_only(server.port, rid, 64 * 1024 * 1024, forged()) + b'{"wor')
        # Only the headers and 5 bytes went out: a 4xx now means the body was not awaited.
        assert status_within(sock, 5.0).startswith("HTTP/1.1 401")


def test_slow_unsigned_bodies_do_not_starve_health(server: Server, rid: int) -> None:
    assert server.port is not None
    slow = []
    try:
        for _ in range(24):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            slow.append(sock)
            sock.sendall(headers_only(server.port, rid, 100_000, forged()) + b"x" * 10)
        # Every slow client is still connected, its body unfinished.
        assert health_s(server.port) < 3.0
        for sock in slow:
            assert status_within(sock, 5.0).startswith("HTTP/1.1 401")
    finally:
        for sock in slow:
            sock.close()


def test_a_signed_body_that_stalls_gets_408_and_frees_its_thread(
    server: Server, dbfile: str, rid: int
) -> None:
    assert server.port is not None
    path = f"/api/v1/requests/{rid}/results"
    body = json.dumps({"worker": "w", "host": "h", "max_tasks": 0, "results": []}).encode()
    signed = signed_headers(Storage(dbfile).get_secret(rid), "POST", path, body)
    stalled = []
    try:
        for _ in range(8):  # as many as the server has threads
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            stalled.append(sock)
            sock.sendall(headers_only(server.port, rid, len(body), signed) + body[:5])
        start = time.monotonic()
        for sock in stalled:
            assert status_within(sock, 10.0).startswith("HTTP/1.1 408")
        # body_base_s is 2 s here (30 s by default); the length adds next to nothing.
        assert time.monotonic() - start < 8.0
        assert health_s(server.port) < 3.0
    finally:
        for sock in stalled:
            sock.close()


def test_no_gunicorn_control_socket(
    dbfile: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    with Server(None, None, dbfile, host="127.0.0.1", log_level="debug") as server:
        # gunicorn sets its control socket up after the workers, when it says so at debug.
        assert poll_until(lambda: "Control socket" in server.output(), timeout_s=20,
                          interval_s=0.05), server.output()
        assert not (home / ".gunicorn").exists(), list((home / ".gunicorn").iterdir())
        assert "Control socket disabled" in server.output()


# -- where the server listens -----------------------------------------------------------


def listening_on(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def test_the_server_listens_where_localhost_resolves_not_everywhere(dbfile: str) -> None:
    config = Config(host="head", localhost="localhost", dbfile=dbfile)
    server = server_for.server_for(config)
    try:
        assert server.port is not None
        assert server.host == "127.0.0.1" == listen_address("localhost")
        assert listening_on(server.port) == {"127.0.0.1"}
    finally:
        server.stop()


def test_a_server_without_a_host_does_not_listen_everywhere(dbfile: str) -> None:
    with Server(None, None, dbfile) as server:
        assert server.port is not None
        assert server.host == listen_address(socket.getfqdn()) != "0.0.0.0"
        assert "0.0.0.0" not in listening_on(server.port)


def test_listen_address_chooses_another_and_0000_only_when_asked(dbfile: str) -> None:
    config = Config(host="head", localhost="localhost", dbfile=dbfile, listen_address="0.0.0.0")
    server = server_for.server_for(config)
    try:
        assert server.port is not None
        assert listening_on(server.port) == {"0.0.0.0"}
    finally:
        server.stop()


def test_a_server_restarted_on_a_port_listens_where_its_jobs_recorded(
    dbfile: str, rid: int
) -> None:
    # The original's recipe, Server(port, None, dbfile), after the first server died.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with Storage(dbfile) as db:
        db.add_job(rid, "7", 1, info={"url": f"http://gateway:{port}/", "port": port,
                                      "listen_address": "0.0.0.0"})
    with Server(port, None, dbfile) as server:
        assert server.host == "0.0.0.0"
        assert listening_on(port) == {"0.0.0.0"}


def test_an_unresolvable_localhost_says_to_set_listen_address(dbfile: str) -> None:
    config = Config(host="head", localhost="no-such-host.invalid", dbfile=dbfile)
    with pytest.raises(ServerError, match="listen_address"):
        server_for.server_for(config)


@pytest.mark.parametrize("bad", ["", "a b", "x;y", "0.0.0.0\n", 5])
def test_listen_address_is_validated(bad: object) -> None:
    with pytest.raises(ConfigError, match="listen_address"):
        Config(host="head", listen_address=bad)  # type: ignore[arg-type]


# -- heartbeats use an index ------------------------------------------------------------


def test_renew_finds_leases_through_the_index(dbfile: str) -> None:
    with Storage(dbfile) as db:
        plan = db.conn.execute("EXPLAIN QUERY PLAN " + RENEW_SQL, (1.0, "w", 1, "t")).fetchall()
    detail = " ".join(str(row[-1]) for row in plan)
    assert "tasks_by_lease" in detail, detail


def test_a_version_1_database_gets_the_lease_index_and_nonces(tmp_path: Path) -> None:
    path = str(tmp_path / "v1.sqlite")
    conn = sqlite3.connect(path, isolation_level=None)
    _migrate_to_1(conn)
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    with Storage(path) as db:
        # 3: reruns' task history, the finish log and the cache's digests came after;
        # 4: the workers' environment reports.
        assert db.schema_version() == SCHEMA_VERSION == 4
        names = {row[0] for row in db.conn.execute("SELECT name FROM sqlite_master")}
    assert {"tasks_by_lease", "nonces"} <= names
    assert {"task_history", "finished_log", "tasks_finished", "tasks_by_args_digest",
            "worker_envs"} <= names


def renew_steps(dbfile: str, n_leased: int) -> int:
    """SQLite VM instructions (in hundreds) that a heartbeat of 64 leases costs among n_leased."""
    with Storage(dbfile, synchronous="OFF") as db:
        rid = db.new_request(b"F", None, [b"x"] * n_leased)
        leases = db.lease(rid, worker="w", host="h", max_tasks=n_leased, lease_s=60.0)
        steps = []
        db.conn.set_progress_handler(lambda: steps.append(1) and 0, 100)
        renewed, lost = db.renew(rid, "w", [lease.lease for lease in leases[:64]], 60.0)
        db.conn.set_progress_handler(None, 100)
    assert len(renewed) == 64 and not lost
    return len(steps)


def test_a_heartbeat_of_64_leases_is_o_64(tmp_path: Path) -> None:
    # Counted, not timed: 1,500 leases among 3,000 took 1.5 s with a scan per lease.
    few = renew_steps(str(tmp_path / "few.sqlite"), 100)
    many = renew_steps(str(tmp_path / "many.sqlite"), 3000)
    assert many < 2 * few + 10, (few, many)


def test_bodies_are_hashed_not_trusted(server: Server, dbfile: str, rid: int) -> None:
    assert server.port is not None
    path = f"/api/v1/requests/{rid}/lease"
    body = b'{"worker": "w", "host": "h", "max_tasks": 1}'
    signed = signed_headers(Storage(dbfile).get_secret(rid), "POST", path, body)
    forged = body.replace(b'"max_tasks": 1', b'"max_tasks": 3')
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("POST", path, body=forged, headers=signed)
        assert conn.getresponse().status == 401
    finally:
        conn.close()
    with Storage(dbfile) as db:
        assert db.task_counts(rid)["leased"] == 0
    assert os.path.exists(dbfile)


def test_a_retried_call_gets_the_same_answer_from_the_real_server(
    server: Server, dbfile: str, rid: int
) -> None:
    assert server.port is not None
    path = f"/api/v1/requests/{rid}/lease"
    body = b'{"worker": "w", "host": "h", "max_tasks": 1}'
    signed = signed_headers(Storage(dbfile).get_secret(rid), "POST", path, body)
    answers = []
    for _ in range(2):  # the first answer "lost"; the worker sends the same call again
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            conn.request("POST", path, body=body, headers=signed)
            response = conn.getresponse()
            answers.append((response.status, response.read(), response.getheader("Connection")))
        finally:
            conn.close()
    (status, first, _), (again_status, again, connection) = answers
    assert status == again_status == 200 and again == first
    assert len(json.loads(first)["tasks"]) == 1
    # The retry's body was not read (the signature fixes it): its connection closes.
    assert connection == "close"
    with Storage(dbfile) as db:
        assert db.task_counts(rid)["leased"] == 1
