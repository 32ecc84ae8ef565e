"""Tests for Server and get_server: a real gunicorn child process."""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from sheepdog.errors import ServerError
from sheepdog.poll import poll_until
from sheepdog.server import Server, get_server
from sheepdog.server import process as server_module
from sheepdog.server.auth import SIGNATURE_HEADER, sign_response, signed_headers
from sheepdog.storage import Storage

ROOT = Path(__file__).resolve().parents[2]


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie nobody reaped counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def wait_gone(pid: int, timeout_s: float = 20.0) -> bool:
    return poll_until(lambda: gone(pid), timeout_s=timeout_s, interval_s=0.05)


@pytest.fixture
def dbfile(tmp_path: Path) -> str:
    return str(tmp_path / "proc.sqlite")


@pytest.fixture
def registry() -> Iterator[None]:
    """Leave get_server's registry as it was, stopping what the test started."""
    shared = server_module.registry.shared
    before = dict(shared)
    yield
    for key, server in list(shared.items()):
        if before.get(key) is not server:
            server.stop()
    shared.clear()
    shared.update(before)


def signed_post(base: str, secret: str, path: str, payload: object) -> requests.Response:
    body = json.dumps(payload).encode()
    headers = signed_headers(secret, "POST", path, body)
    signature = headers[SIGNATURE_HEADER]
    response = requests.post(base + path, data=body, headers=headers, timeout=30)
    if response.ok:
        assert response.headers[SIGNATURE_HEADER] == sign_response(
            secret, signature, response.content
        )
    return response


def test_start_round_trip_and_graceful_stop(dbfile: str) -> None:
    with Storage(dbfile) as db:
        rid = db.new_request(b"F", None, [pickle.dumps(1), pickle.dumps(2)])
        secret = db.get_secret(rid)
    server = Server(dbfile=dbfile, host="127.0.0.1")
    try:
        assert server.alive and server.pid is not None and server.port
        base = server.url_for("127.0.0.1")
        assert base == f"http://127.0.0.1:{server.port}"
        health = requests.get(base + "/api/v1/health", timeout=10)
        assert health.json()["ok"] is True

        path = f"/api/v1/requests/{rid}/lease"
        lease = signed_post(base, secret, path, {"worker": "w", "host": "h", "max_tasks": 2})
        assert lease.status_code == 200
        tasks = lease.json()["tasks"]
        results = [
            {"index": t["index"], "lease": t["lease"], "ok": True,
             "value": base64.b64encode(pickle.dumps(t["index"] * 10)).decode()}
            for t in tasks
        ]
        path = f"/api/v1/requests/{rid}/results"
        answer = signed_post(
            base, secret, path, {"worker": "w", "host": "h", "max_tasks": 0, "results": results}
        )
        assert answer.json() == {"accepted": [1, 2], "duplicates": []}
        bad = signed_post(base, "44" * 32, path, {"worker": "w"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "unauthorised"
        assert "bad signature" in server.output()
    finally:
        proc = server._proc
        server.stop()
    assert proc is not None and proc.returncode == 0  # gunicorn exited on SIGTERM by itself
    assert not server.alive and server.stopped
    server.stop()  # idempotent
    with Storage(dbfile) as db:
        assert [pickle.loads(r) for _, r in db.get_results(rid)] == [10, 20]
    with pytest.raises(requests.ConnectionError):
        requests.get(base + "/api/v1/health", timeout=5)


def test_sigkill_when_sigterm_is_not_enough(dbfile: str) -> None:
    server = Server(dbfile=dbfile, host="127.0.0.1")
    proc = server._proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM
    server.stop(timeout_s=0.5)
    assert proc.returncode == -signal.SIGKILL
    assert gone(proc.pid)


def test_context_manager_and_refusal_to_restart(dbfile: str) -> None:
    with Server(dbfile=dbfile, host="127.0.0.1") as server:
        pid = server.pid
        assert pid is not None and server.alive
    assert wait_gone(pid)
    with pytest.raises(ServerError, match="was stopped"):
        server.restart()


def test_random_ports_differ_and_taken_port_fails_cleanly(dbfile: str) -> None:
    with Server(dbfile=dbfile, host="127.0.0.1") as a, Server(dbfile=dbfile, host="127.0.0.1") as b:
        assert a.port != b.port
        with pytest.raises(ServerError, match="choose another port"):
            Server(a.port, dbfile=dbfile, host="127.0.0.1")


def test_random_port_is_bound_before_the_child_starts(dbfile: str) -> None:
    # The socket the parent bound is the one gunicorn serves: nobody else can
    # take the port between "found a free one" and "listening on it".
    server = Server(dbfile=dbfile, host="127.0.0.1")
    try:
        assert server.port is not None
        probe = socket.socket()
        with pytest.raises(OSError):
            probe.bind(("127.0.0.1", server.port))
        probe.close()
    finally:
        server.stop()


def test_start_failure_reports_child_output(dbfile: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-cert.pem"
    before = set(server_module.registry.running)  # other tests' servers may still be registered
    with pytest.raises(ServerError) as info:
        Server(dbfile=dbfile, host="127.0.0.1", certfile=missing, start_timeout_s=20)
    message = str(info.value)
    assert "exited with status" in message
    assert "no-such-cert.pem" in message and "does not exist" in message
    assert set(server_module.registry.running) <= before, "the failed server is still registered"


def test_unusable_dbfile_fails_before_forking(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="cannot open the database"):
        Server(dbfile=tmp_path / "missing-dir" / "x.sqlite")


def test_get_server_registry(dbfile: str, tmp_path: Path, registry: None) -> None:
    first = get_server(None, "pw", dbfile, host="127.0.0.1")
    assert get_server(None, "pw", dbfile) is first
    assert get_server(first.port, "pw", dbfile) is first
    with pytest.raises(RuntimeError, match="uses"):
        get_server(first.port, "pw", str(tmp_path / "other.sqlite"))
    with pytest.raises(RuntimeError, match="password"):
        get_server(first.port, "other", dbfile)

    # A dead child is restarted on the same port, as the same object.
    old_pid = first.pid
    assert old_pid is not None
    os.killpg(old_pid, signal.SIGKILL)
    assert first._proc is not None
    first._proc.wait(10)
    assert not first.alive
    again = get_server(None, "pw", dbfile)
    assert again is first and again.alive and again.pid != old_pid
    assert requests.get(again.url_for("127.0.0.1") + "/api/v1/health", timeout=10).ok

    # A stopped server is replaced by a new one on the same port.
    port = first.port
    first.stop()
    fresh = get_server(port, "pw", dbfile, host="127.0.0.1")
    assert fresh is not first and fresh.port == port and fresh.alive


def test_seed_restart_recipe(tmp_path: Path) -> None:
    """The seed's "Restarting the server": Server() and Storage() with their defaults."""
    script = textwrap.dedent(
        """
        import sheepdog.server, sheepdog.storage
        storage = sheepdog.storage.Storage()
        rid = storage.new_request(b"F", None, [b"a"])
        storage.store_result(rid, 1, b"r")
        server = sheepdog.server.Server()
        import urllib.request, json
        url = server.url_for("127.0.0.1") + "/api/v1/health"
        print(json.load(urllib.request.urlopen(url, timeout=10))["ok"])
        print(sheepdog.storage.Storage().count_results(rid))
        print(server.pid, flush=True)
        """
    )
    proc = run_script(script, tmp_path)
    ok, count, pid = proc.stdout.split()
    assert (ok, count) == ("True", "1")
    assert (tmp_path / "sheepdog.sqlite").exists()
    assert wait_gone(int(pid))  # stopped at interpreter exit


def run_script(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def test_server_stops_when_its_parent_is_killed(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import os, signal, sheepdog.server
        server = sheepdog.server.Server(host="127.0.0.1")
        print(server.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no atexit, no stop()
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pid = int(proc.stdout.split()[0])
    assert wait_gone(pid, 30), "the orphaned server did not notice its parent died"
