"""Tests for the worker API (sheepdog.server.create_app) through Flask's test client."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from server_helpers import Api, error_of, lease_body

from sheepdog.server import create_app
from sheepdog.server.auth import (
    BODY_HASH_HEADER,
    NONCE_HEADER,
    SIGNATURE_HEADER,
    TIME_HEADER,
    request_message,
    sign_request,
    signed_headers,
    verify,
)
from sheepdog.storage import Storage

VALUE = pickle.dumps({"answer": 42})
B64_VALUE = base64.b64encode(VALUE).decode()


@pytest.fixture
def dbfile(tmp_path: Path) -> str:
    return str(tmp_path / "server.sqlite")


@pytest.fixture
def app(dbfile: str) -> Flask:
    return create_app(dbfile, max_body_bytes=64 * 1024)


@pytest.fixture
def db(dbfile: str, app: Flask) -> Iterator[Storage]:
    with Storage(dbfile) as storage:
        yield storage


@pytest.fixture
def api(app: Flask, db: Storage) -> Api:
    rid = db.new_request(
        b"FUNCTION", None, [pickle.dumps(i) for i in range(1, 6)], settings={"lease_s": 30.0}
    )
    return Api(app.test_client(), rid, db.get_secret(rid))


def snapshot(db: Storage) -> list[tuple[Any, ...]]:
    return db.conn.execute("SELECT * FROM tasks ORDER BY request_id, idx").fetchall()


def result(index: int, lease: str = "", **extra: Any) -> dict[str, Any]:
    item = {
        "index": index,
        "lease": lease,
        "ok": True,
        "value": B64_VALUE,
        "stdout": "out",
        "stderr": "err",
        "duration_s": 0.5,
    }
    item.update(extra)
    return item


def results_body(items: list[Any], max_tasks: int = 0) -> dict[str, Any]:
    return {"worker": "w1", "host": "node1", "max_tasks": max_tasks, "results": items}


# -- the signing helpers -------------------------------------------------------------


def test_signature_covers_the_documented_message() -> None:
    body = b'{"a": 1}'
    digest = hashlib.sha256(body).hexdigest()
    nonce = "ab" * 16
    assert request_message("post", "/p", 12, nonce, len(body), digest) == (
        b"POST\n/p\n12\n" + nonce.encode() + b"\n8\n" + digest.encode()
    )
    secret = "11" * 32
    signature = sign_request(secret, "POST", "/p", 12, nonce, 8, digest)
    assert signature != sign_request(secret, "POST", "/p", 13, nonce, 8, digest)
    assert signature != sign_request("22" * 32, "POST", "/p", 12, nonce, 8, digest)
    assert signature != sign_request(secret, "POST", "/p", 12, "cd" * 16, 8, digest)
    assert signature != sign_request(secret, "POST", "/p", 12, nonce, 9, digest)
    headers = signed_headers(secret, "POST", "/p", body, time_s=12, nonce=nonce)
    assert headers == {TIME_HEADER: "12", NONCE_HEADER: nonce, BODY_HASH_HEADER: digest,
                       SIGNATURE_HEADER: signature}
    assert verify("ab", "ab") and not verify("ab", "ac") and not verify("ab", "\xff\u20ac")


# -- happy paths ---------------------------------------------------------------------


def test_health(app: Flask) -> None:
    response = app.test_client().get("/api/v1/health")
    assert response.status_code == 200
    body = response.get_json()
    assert body["ok"] is True and isinstance(body["version"], str)


def test_function(api: Api) -> None:
    response = api.call("GET", "function")
    assert response.status_code == 200
    body = response.get_json()
    assert base64.b64decode(body["payload"]) == b"FUNCTION"
    assert body["settings"] == {
        "lease_s": 30.0,
        "heartbeat_s": 30.0,
        "task_timeout_s": None,
        "batch": 1,
        "capture_bytes": 65536,
        "tasks_per_worker": None,
        "inline_max_bytes": 65536,
    }


def test_lease_heartbeat_results_round_trip(api: Api, db: Storage) -> None:
    response = api.call("POST", "lease", lease_body(2))
    assert response.status_code == 200
    body = response.get_json()
    assert body["state"] == "open" and body["lease_s"] == 30.0
    assert [(t["index"], t["attempt"]) for t in body["tasks"]] == [(1, 1), (2, 1)]
    assert [pickle.loads(base64.b64decode(t["args"])) for t in body["tasks"]] == [1, 2]
    leases = [t["lease"] for t in body["tasks"]]

    response = api.call("POST", "heartbeat", {"worker": "w1", "leases": [*leases, "gone"]})
    assert response.get_json() == {"renewed": leases, "lost": ["gone"], "cancelled": False}

    error = {"type": "ZeroDivisionError", "message": "division by zero", "traceback": "TB",
             "host": "node1", "python": "3.11.7"}
    items = [result(1, leases[0]), {**result(2, leases[1]), "ok": False, "error": error}]
    del items[1]["value"]
    response = api.call("POST", "results", results_body(items, max_tasks=3))
    body = response.get_json()
    assert (body["accepted"], body["duplicates"], body["state"]) == ([1, 2], [], "open")
    assert [t["index"] for t in body["tasks"]] == [3, 4, 5]

    assert db.get_results(api.rid) == [(pickle.dumps(1), VALUE)]
    [(index, _, stored)] = db.get_task_errors(api.rid)
    assert index == 2
    assert stored["type"] == "ZeroDivisionError"
    assert (stored["traceback"], stored["kind"]) == ("TB", "exception")
    task = db.get_task(api.rid, 1)
    assert (task["stdout"], task["stderr"], task["duration_s"]) == ("out", "err", 0.5)
    assert task["host"] == "node1"

    # Duplicates are acknowledged, not stored; max_tasks 0 means no lease part.
    response = api.call("POST", "results", results_body([result(1), result(3)]))
    assert response.get_json() == {"accepted": [3], "duplicates": [1]}
    assert db.count_results_and_errors(api.rid) == 3


def test_drained_and_cancelled_states(api: Api, db: Storage) -> None:
    assert len(api.call("POST", "lease", lease_body(10)).get_json()["tasks"]) == 5
    body = api.call("POST", "lease", lease_body(1)).get_json()
    assert (body["tasks"], body["state"]) == ([], "drained")
    db.cancel(api.rid, "stop")
    body = api.call("POST", "lease", lease_body(1)).get_json()
    assert (body["tasks"], body["state"]) == ([], "cancelled")
    assert api.call("POST", "heartbeat", {"worker": "w", "leases": []}).get_json()["cancelled"]


def test_a_retried_call_gets_back_the_leases_its_lost_answer_held(
    api: Api, db: Storage
) -> None:
    first = api.call("POST", "lease", lease_body(2)).get_json()["tasks"]
    # The answer above never reached the worker (the server died after the commit).
    again = api.call("POST", "lease", dict(lease_body(2), retry=True)).get_json()["tasks"]
    assert [t["index"] for t in again] == [t["index"] for t in first] == [1, 2]
    done = [result(t["index"], t["lease"]) for t in again]
    body = api.call("POST", "results", results_body(done, max_tasks=1)).get_json()
    (lost,) = body["tasks"]
    body = api.call("POST", "results", dict(results_body(done, max_tasks=1), retry=True))
    assert body.get_json()["duplicates"] == [1, 2]
    assert [t["index"] for t in body.get_json()["tasks"]] == [lost["index"]]
    assert db.task_counts(api.rid)["leased"] == 1


def test_retry_must_be_a_boolean(api: Api, db: Storage) -> None:
    response = api.call("POST", "lease", dict(lease_body(1), retry="yes"))
    assert error_of(response, 400)["code"] == "bad_field"
    assert "'retry'" in error_of(response, 400)["message"]


def test_lease_zero_tasks(api: Api, db: Storage) -> None:
    body = api.call("POST", "lease", lease_body(0)).get_json()
    assert body["tasks"] == []
    assert db.task_counts(api.rid)["pending"] == 5


def test_lone_surrogates_are_stored_not_crashed_on(api: Api, db: Storage) -> None:
    raw = json.dumps(results_body([result(1, stdout="a\ud800b")])).encode()
    assert b"\\ud800" in raw
    assert api.call("POST", "results", raw).status_code == 200
    assert db.get_task(api.rid, 1)["stdout"] == "a?b"


# -- authentication ------------------------------------------------------------------


def test_missing_signature(api: Api, db: Storage) -> None:
    before = snapshot(db)
    response = api.client.post(api.path("lease"), data=json.dumps(lease_body()))
    assert error_of(response, 401)["code"] == "unauthorised"
    response = api.client.post(
        api.path("lease"), data=json.dumps(lease_body()), headers={SIGNATURE_HEADER: "00" * 32}
    )
    error_of(response, 401)
    assert snapshot(db) == before


@pytest.mark.parametrize(
    "headers",
    [
        {SIGNATURE_HEADER: "00" * 32},
        {SIGNATURE_HEADER: "not hex at all"},
        {SIGNATURE_HEADER: "\xff\xfe"},
        {TIME_HEADER: "-5"},
        {TIME_HEADER: "12.5"},
        {TIME_HEADER: "soon"},
        {TIME_HEADER: "9" * 40},
    ],
)
def test_bad_signature_or_time(api: Api, db: Storage, headers: dict[str, str]) -> None:
    before = snapshot(db)
    response = api.call("POST", "lease", lease_body(), headers=headers)
    error_of(response, 401)
    assert snapshot(db) == before


def test_stale_time(api: Api, db: Storage) -> None:
    before = snapshot(db)
    for offset in (-1000, 1000):
        response = api.call("POST", "lease", lease_body(), time_s=int(time.time()) + offset)
        assert "clock" in error_of(response, 401)["message"]
    assert snapshot(db) == before


def test_one_requests_secret_cannot_use_another(api: Api, db: Storage) -> None:
    other = db.new_request(b"F", None, [b"x"])
    before = snapshot(db)
    # Signed correctly, with our secret, for the other request's path.
    path = f"/api/v1/requests/{other}/lease"
    response = api.call("POST", "lease", lease_body(), path=path)
    error_of(response, 401)
    response = api.call("GET", "function", path=f"/api/v1/requests/{other}/function")
    error_of(response, 401)
    assert snapshot(db) == before


def test_signature_binds_method_path_and_body(api: Api, db: Storage) -> None:
    before = snapshot(db)
    raw = json.dumps(lease_body()).encode()
    headers = signed_headers(api.secret, "POST", api.path("lease"), raw)
    tampered = json.dumps(lease_body(5)).encode()
    error_of(api.client.post(api.path("lease"), data=tampered, headers=headers), 401)
    error_of(api.client.post(api.path("heartbeat"), data=raw, headers=headers), 401)
    assert snapshot(db) == before
    assert api.client.post(api.path("lease"), data=raw, headers=headers).status_code == 200


# -- replay and retries -----------------------------------------------------------------


def test_a_replayed_lease_gets_the_recorded_answer_and_leases_nothing_more(
    api: Api, db: Storage
) -> None:
    raw = json.dumps(lease_body(2)).encode()
    headers = signed_headers(api.secret, "POST", api.path("lease"), raw)
    first = api.client.post(api.path("lease"), data=raw, headers=headers)
    assert first.status_code == 200 and len(first.get_json()["tasks"]) == 2
    after_first = snapshot(db)
    for _ in range(3):  # a recording sent again within the clock window, or a worker's retry
        again = api.client.post(api.path("lease"), data=raw, headers=headers)
        assert again.status_code == 200
        assert again.get_data() == first.get_data()
        assert again.headers[SIGNATURE_HEADER] == first.headers[SIGNATURE_HEADER]
    assert snapshot(db) == after_first
    assert db.task_counts(api.rid)["leased"] == 2


def test_a_retried_results_call_keeps_its_result_and_its_next_lease(
    api: Api, db: Storage
) -> None:
    [task] = api.call("POST", "lease", lease_body()).get_json()["tasks"]
    raw = json.dumps(results_body([result(task["index"], task["lease"])], max_tasks=1)).encode()
    headers = signed_headers(api.secret, "POST", api.path("results"), raw)
    first = api.client.post(api.path("results"), data=raw, headers=headers)
    assert first.get_json()["accepted"] == [task["index"]]
    # The answer was lost on the way: the worker sends the same call again.
    retry = api.client.post(api.path("results"), data=raw, headers=headers)
    assert retry.get_data() == first.get_data()
    assert db.task_counts(api.rid)["done"] == 1
    assert db.task_counts(api.rid)["leased"] == 1  # the lease in the answer, not a second one


def test_a_replayed_heartbeat_renews_nothing(api: Api, db: Storage) -> None:
    [task] = api.call("POST", "lease", lease_body()).get_json()["tasks"]
    raw = json.dumps({"worker": "w1", "leases": [task["lease"]]}).encode()
    headers = signed_headers(api.secret, "POST", api.path("heartbeat"), raw)
    assert api.client.post(api.path("heartbeat"), data=raw, headers=headers).status_code == 200
    before = snapshot(db)
    assert api.client.post(api.path("heartbeat"), data=raw, headers=headers).status_code == 200
    assert snapshot(db) == before


def test_a_nonce_used_by_another_call_is_refused(api: Api, db: Storage) -> None:
    nonce = "ab" * 16
    assert api.call("POST", "lease", lease_body(), nonce=nonce).status_code == 200
    before = snapshot(db)
    response = api.call("POST", "lease", lease_body(3), nonce=nonce)
    assert error_of(response, 409)["code"] == "nonce_reused"
    assert snapshot(db) == before


def test_a_refused_call_records_no_nonce(api: Api, db: Storage) -> None:
    nonce = "cd" * 16
    error_of(api.call("POST", "lease", {"worker": 5}, nonce=nonce), 400)
    assert api.call("POST", "lease", lease_body(), nonce=nonce).status_code == 200


def test_nonces_older_than_the_clock_window_are_forgotten(api: Api, db: Storage) -> None:
    old = int(time.time()) - 800
    assert api.call("POST", "lease", lease_body(), time_s=old).status_code == 200
    assert api.call("POST", "lease", lease_body()).status_code == 200
    assert db.conn.execute("SELECT count(*) FROM nonces").fetchone()[0] == 2
    app = create_app(db.dbfile, max_clock_skew_s=600)
    Api(app.test_client(), api.rid, api.secret).call("POST", "lease", lease_body())
    stamps = [row[0] for row in db.conn.execute("SELECT stamp FROM nonces")]
    assert len(stamps) == 2 and min(stamps) > old


# -- bodies are read only for signed calls ------------------------------------------------


class CountingStream(io.BytesIO):
    """A request body of ``size`` bytes that counts how many of them were read."""

    def __init__(self, size: int) -> None:
        super().__init__(b"x" * size)
        self.read_bytes = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.read_bytes += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        n = super().readinto(buffer)
        self.read_bytes += n
        return n

    def readline(self, size: int | None = -1) -> bytes:
        data = super().readline(size)
        self.read_bytes += len(data)
        return data


@pytest.mark.parametrize("signed", ["no", "forged", "stale"])
def test_an_unauthenticated_body_is_never_read(api: Api, db: Storage, signed: str) -> None:
    size = 60 * 1024  # under max_body_bytes: only the signature stops it
    body = CountingStream(size)
    headers = {"Content-Length": str(size), "Content-Type": "application/json"}
    if signed != "no":
        fake = signed_headers(api.secret, "POST", api.path("lease"), b"x" * size,
                              time_s=int(time.time()) - (5000 if signed == "stale" else 0))
        if signed == "forged":
            fake[SIGNATURE_HEADER] = "00" * 32
        headers.update(fake)
    response = api.client.post(api.path("lease"), input_stream=body, headers=headers)
    error_of(response, 401)
    assert body.read_bytes == 0


def test_a_body_that_does_not_match_its_signed_hash_is_refused(api: Api, db: Storage) -> None:
    raw = json.dumps(lease_body()).encode()
    headers = signed_headers(api.secret, "POST", api.path("lease"), raw)
    other = raw.replace(b'"w1"', b'"w2"')
    assert len(other) == len(raw)
    before = snapshot(db)
    assert "SHA-256" in error_of(
        api.client.post(api.path("lease"), data=other, headers=headers), 401
    )["message"]
    assert snapshot(db) == before


def test_chunked_bodies_are_refused_unread(api: Api) -> None:
    headers = signed_headers(api.secret, "POST", api.path("lease"), b"")
    response = api.client.post(
        api.path("lease"), input_stream=CountingStream(10),
        headers={**headers, "Transfer-Encoding": "chunked"},
    )
    assert error_of(response, 411)["code"] == "length_required"


def test_failed_auth_is_logged_without_the_secret(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sheepdog.server"):
        api.call("POST", "lease", lease_body(), secret="33" * 32)
    [record] = [r for r in caplog.records if r.name == "sheepdog.server"]
    text = record.getMessage()
    assert f"/requests/{api.rid}/lease" in text and "127.0.0.1" in text and "bad signature" in text
    assert api.secret not in text


# -- bad input -----------------------------------------------------------------------


def test_unknown_request_is_404(api: Api, db: Storage) -> None:
    before = snapshot(db)
    for rid in (999, 2**63 - 1, 2**63, 10**30):
        response = api.call("POST", "lease", lease_body(), path=f"/api/v1/requests/{rid}/lease")
        assert error_of(response, 404)["code"] in {"unknown_request", "not_found"}
    assert snapshot(db) == before


def test_unknown_route_and_wrong_method(api: Api) -> None:
    assert error_of(api.client.get("/nope"), 404)["code"] == "not_found"
    assert error_of(api.client.get("/api/v1/requests/abc/lease"), 404)
    response = api.client.get(api.path("lease"))
    assert error_of(response, 405)["code"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"]
    error_of(api.client.post("/api/v1/health"), 405)
    error_of(api.client.delete(api.path("function")), 405)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", "bad_json"),
        (b"{", "bad_json"),
        (b"\xff\xfe", "bad_json"),
        (b"[1, 2]", "bad_json"),
        (b"null", "bad_json"),
        (b"[" * 100_00 + b"]" * 100_00, "bad_json"),
        (b'{"worker": "w", "host": "h"}', "bad_field"),
        (b'{"worker": 1, "host": "h", "max_tasks": 1}', "bad_field"),
        (b'{"worker": "w", "host": null, "max_tasks": 1}', "bad_field"),
        (b'{"worker": "w", "host": "h", "max_tasks": "1"}', "bad_field"),
        (b'{"worker": "w", "host": "h", "max_tasks": true}', "bad_field"),
        (b'{"worker": "w", "host": "h", "max_tasks": 1.5}', "bad_field"),
        (b'{"worker": "w", "host": "h", "max_tasks": -1}', "bad_field"),
        (b'{"worker": "w", "host": "h", "max_tasks": 99999999999999999999}', "bad_field"),
    ],
)
def test_bad_lease_bodies(api: Api, db: Storage, body: bytes, code: str) -> None:
    before = snapshot(db)
    assert error_of(api.call("POST", "lease", body), 400)["code"] == code
    assert snapshot(db) == before


@pytest.mark.parametrize(
    "body",
    [
        {"worker": "w"},
        {"worker": "w", "leases": "abc"},
        {"worker": "w", "leases": [1]},
        {"leases": []},
    ],
)
def test_bad_heartbeat_bodies(api: Api, body: dict[str, Any]) -> None:
    error_of(api.call("POST", "heartbeat", body), 400)


@pytest.mark.parametrize(
    ("items", "status", "code"),
    [
        ("nope", 400, "bad_field"),
        ([1], 400, "bad_field"),
        ([{"index": "1"}], 400, "bad_field"),
        ([result(1, ok="yes")], 400, "bad_field"),
        ([result(1, value="***")], 400, "bad_base64"),
        ([result(1, value="YQ")], 400, "bad_base64"),
        ([result(1, value="é")], 400, "bad_base64"),
        ([result(1, value=5)], 400, "bad_field"),
        ([result(1, value=base64.b64encode(b"garbage").decode())], 400, "bad_pickle"),
        ([result(1, value=base64.b64encode(b"\x80\x04\xff.").decode())], 400, "bad_pickle"),
        ([result(1, stdout=5)], 400, "bad_field"),
        ([result(1, duration_s="1s")], 400, "bad_field"),
        ([result(1, lease=7)], 400, "bad_field"),
        ([{**result(1), "ok": False, "error": "boom"}], 400, "bad_field"),
        ([{**result(1), "ok": False, "error": {"type": "E"}}], 400, "bad_field"),
        ([result(1), result(0)], 404, "unknown_task"),
        ([result(1), result(6)], 404, "unknown_task"),
        ([result(2**70)], 404, "unknown_task"),
    ],
)
def test_bad_results_store_nothing(
    api: Api, db: Storage, items: Any, status: int, code: str
) -> None:
    before = snapshot(db)
    response = api.call("POST", "results", results_body(items))
    assert error_of(response, status)["code"] == code
    assert snapshot(db) == before


def test_too_large_is_413(api: Api, db: Storage) -> None:
    before = snapshot(db)
    big = results_body([result(1, stdout="x" * 70_000)])
    assert error_of(api.call("POST", "results", big), 413)["code"] == "request_entity_too_large"
    assert snapshot(db) == before


def test_unsigned_garbage_never_500s(api: Api, db: Storage) -> None:
    before = snapshot(db)
    client = api.client
    for method in ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"):
        for path in (
            "/",
            "/api/v1/health",
            api.path("lease"),
            api.path("function"),
            api.path("results"),
            api.path("heartbeat"),
            "/api/v1/requests/-1/lease",
            "/api/v1/requests/1/../../etc/passwd",
            "/api/v1/requests/%00/lease",
        ):
            response = client.open(path, method=method, data=b"\x00\xff{garbage")
            assert response.status_code < 500, (method, path, response.status_code)
    assert snapshot(db) == before


def test_bug_gives_json_500(app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    @app.get("/boom")
    def boom() -> str:
        raise RuntimeError("a bug")

    with caplog.at_level(logging.ERROR, logger="sheepdog.server"):
        response = app.test_client().get("/boom")
    assert error_of(response, 500)["code"] == "internal"
    assert "a bug" not in response.get_data(as_text=True)
    assert any("internal error" in r.getMessage() for r in caplog.records)


# -- the cost of a round trip ------------------------------------------------------------


def test_a_results_round_trip_reads_the_request_row_once(
    dbfile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One task per lease: the request row is read once, and every statement is needed."""
    import sheepdog.server.app

    statements: list[str] = []

    class Traced(Storage):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.conn.set_trace_callback(statements.append)

    monkeypatch.setattr(sheepdog.server.app, "Storage", Traced)
    app = create_app(dbfile)
    with Storage(dbfile) as db:
        rid = db.new_request(b"F", None, [pickle.dumps(i) for i in range(50)])
        db.complete(rid, [{"index": i, "ok": True, "value": VALUE} for i in range(1, 40)])
        api = Api(app.test_client(), rid, db.get_secret(rid))
        [task] = api.call("POST", "lease", lease_body()).get_json()["tasks"]
        statements.clear()
        body = results_body([result(task["index"], task["lease"])], max_tasks=1)
        answer = api.call("POST", "results", body).get_json()
        assert answer["accepted"] == [task["index"]] and len(answer["tasks"]) == 1
        # SQLite traces a statement again for each trigger program it runs.
        executed = [s for i, s in enumerate(statements) if i == 0 or s != statements[i - 1]]
        reads = [s for s in executed if " FROM requests" in s]
        assert len(reads) == 1, executed
        # Read the request row and the nonce; BEGIN; store the result; expire overdue
        # leases; find the next pending task; lease it; record the answer; COMMIT.
        assert len(executed) <= 8, "\n".join(executed)
        [scan] = [s for s in executed if "state = 'pending'" in s]
        plan = " ".join(str(row[3]) for row in db.conn.execute(f"EXPLAIN QUERY PLAN {scan}"))
        # Walking the primary key would visit every finished task on every lease.
        assert "tasks_by_state" in plan and "TEMP B-TREE" not in plan, plan


def test_requests_borrow_one_connection_and_give_it_back_clean(
    dbfile: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Each request (hot path or Flask) borrows the app's connection on g and returns it at
    teardown, without a transaction a bug left open."""
    import sheepdog.server.app
    from sheepdog.server.calls import storage

    opened: list[Storage] = []

    class Counted(Storage):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            opened.append(self)

    monkeypatch.setattr(sheepdog.server.app, "Storage", Counted)
    app = create_app(dbfile)

    @app.get("/left-open")
    def left_open() -> str:
        storage().conn.execute("BEGIN IMMEDIATE")
        raise RuntimeError("a bug inside a transaction")

    opened.clear()  # create_app's own, closed already
    with Storage(dbfile) as db:
        rid = db.new_request(b"F", None, [pickle.dumps(i) for i in range(3)])
        api = Api(app.test_client(), rid, db.get_secret(rid))
        [task] = api.call("POST", "lease", lease_body()).get_json()["tasks"]  # the hot path
        with caplog.at_level(logging.CRITICAL, logger="sheepdog.server"):
            error_of(app.test_client().get("/left-open"), 500)
        assert len(opened) == 1 and not opened[0].conn.in_transaction
        path = f"/api/v1/requests/0{rid}/lease"  # Flask's route
        assert api.call("POST", "lease", lease_body(), path=path).status_code == 200
        answer = api.call("POST", "results", results_body([result(task["index"], task["lease"])]))
        assert answer.get_json()["accepted"] == [task["index"]]
    assert len(opened) == 1 and not opened[0].conn.in_transaction


def test_the_workers_calls_skip_flask_and_other_paths_still_reach_it(
    app: Flask, api: Api
) -> None:
    """lease, heartbeat and results are answered without Flask's request machinery."""
    from flask import request_started

    seen: list[str] = []

    def started(sender: Flask, **extra: Any) -> None:
        from flask import request

        seen.append(request.path)

    request_started.connect(started, app)
    try:
        [task] = api.call("POST", "lease", lease_body()).get_json()["tasks"]
        body = {"worker": "w1", "leases": [task["lease"]]}
        assert api.call("POST", "heartbeat", body).get_json()["renewed"] == [task["lease"]]
        answer = api.call("POST", "results", results_body([result(task["index"], task["lease"])]))
        assert answer.get_json()["accepted"] == [task["index"]]
        assert seen == []
        # A path the hot path does not take (a leading zero) gets the same call from Flask.
        path = f"/api/v1/requests/0{api.rid}/lease"
        leased = api.call("POST", "lease", lease_body(), path=path)
        assert leased.status_code == 200 and len(leased.get_json()["tasks"]) == 1
        assert seen == [path]
        error_of(api.call("POST", "lease", {"worker": 5}, path=path), 400)
    finally:
        request_started.disconnect(started, app)
