"""The real server while another process holds SQLite's write lock.

Calls that find the database free run in the gevent worker's event loop; one that
would wait for the lock must wait in the thread pool, never in the loop, so the
other connections (``/api/v1/health`` here) go on, and nothing is lost or refused.
"""

from __future__ import annotations

import http.client
import json
import pickle
import sqlite3
import threading
from pathlib import Path

from test_server_hardening import health_s

from sheepdog.poll import poll_until
from sheepdog.server import Server
from sheepdog.server.auth import signed_headers
from sheepdog.storage import Storage

#: More calls than the two workers' pools have threads (2 x 4): all wait on the lock at once.
N_CALLS = 12
HEALTH_WITHIN_S = 2.0


def lease(port: int, secret: str, rid: int, n: int) -> tuple[int, dict[str, object]]:
    path = f"/api/v1/requests/{rid}/lease"
    data = json.dumps({"worker": f"w{n}", "host": "test", "max_tasks": 1}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, body=data, headers={
            "Content-Type": "application/json", **signed_headers(secret, "POST", path, data)})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_calls_waiting_for_another_writer_leave_the_server_answering(tmp_path: Path) -> None:
    dbfile = str(tmp_path / "db.sqlite")
    with Storage(dbfile) as db:
        rid = db.new_request(b"F", None, [pickle.dumps(i) for i in range(N_CALLS)])
        secret = db.get_secret(rid)
    with Server(None, None, dbfile, host="127.0.0.1") as server:
        assert server.port is not None
        port = server.port
        # Another process's writer (a map storing its results, say) holds the write lock.
        other = sqlite3.connect(dbfile, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        answers: list[tuple[int, dict[str, object]]] = []
        callers = [
            threading.Thread(target=lambda n=n: answers.append(lease(port, secret, rid, n)))
            for n in range(N_CALLS)
        ]
        try:
            for caller in callers:
                caller.start()
            # Every lease is in and waiting: none can be answered while the lock is held.
            assert not poll_until(lambda: bool(answers), timeout_s=1.0), answers
            for _ in range(5):
                assert health_s(port) < HEALTH_WITHIN_S
            assert answers == []
        finally:
            other.execute("COMMIT")
            other.close()
        for caller in callers:
            caller.join(60)
        statuses = sorted(status for status, _ in answers)
        assert statuses == [200] * N_CALLS, answers
        leased = [t["index"] for _, body in answers for t in body["tasks"]]  # type: ignore[attr-defined]
        assert len(leased) == len(set(leased)) == N_CALLS  # each task once
