"""Large values as files beside the database: the store, the server's routes, the stub's side."""

from __future__ import annotations

import hashlib
import os
import pickle
import ssl
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_helpers import Api, error_of, lease_body

from sheepdog.blobs import INLINE_MAX_BYTES, STALE_UPLOAD_S, BlobStore, make_ref, parse_ref
from sheepdog.client import stub
from sheepdog.errors import StorageError
from sheepdog.server import Server, create_app
from sheepdog.server.tls import certificate_for
from sheepdog.storage import Storage

BIG = pickle.dumps(b"x" * (INLINE_MAX_BYTES + 1000) + os.urandom(64))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def stored_files(store: BlobStore) -> list[str]:
    return sorted(os.listdir(store.directory)) if store.directory.exists() else []


# ---- the store ----


def test_put_writes_one_private_file_named_by_its_sha256(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "db.blobs")
    ref = store.put(BIG)
    digest = hashlib.sha256(BIG).hexdigest()
    assert ref == make_ref(digest, len(BIG)) == f"sha256:{digest}:{len(BIG)}"
    assert stored_files(store) == [digest]
    assert mode(store.directory) == 0o700
    assert mode(store.path(digest)) == 0o600
    assert store.read(ref) == BIG
    assert store.put(BIG) == ref  # idempotent: the same bytes are the same file
    assert stored_files(store) == [digest]


def test_a_writer_without_commit_leaves_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "db.blobs")
    with pytest.raises(RuntimeError), store.writer() as f:
        f.write(b"half a value")
        raise RuntimeError("the upload broke off")
    with store.writer() as f:
        f.write(b"never committed")
    assert stored_files(store) == []


def test_a_missing_blob_is_a_storage_error_naming_the_file(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "db.blobs")
    ref = store.put(BIG)
    store.path(parse_ref(ref)[0]).unlink()
    with pytest.raises(StorageError, match="db.blobs"):
        store.read(ref)
    with pytest.raises(StorageError, match="not a blob reference"):
        parse_ref("sha256:nothex:12")


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(0, 3 * INLINE_MAX_BYTES), seed=st.binary(min_size=1, max_size=8))
def test_values_round_trip_inline_or_as_blobs(tmp_path: Path, size: int, seed: bytes) -> None:
    value = (seed * (size // len(seed) + 1))[:size]
    with Storage(tmp_path / "rt.sqlite") as db:
        stored = db.store_value(value)
        assert isinstance(stored, str) == (size > INLINE_MAX_BYTES)
        assert db.load_value(stored) == value


def test_large_arguments_and_results_live_beside_the_database(tmp_path: Path) -> None:
    dbfile = tmp_path / "db.sqlite"
    with Storage(dbfile) as db:
        rid = db.new_request(b"F", None, [BIG, pickle.dumps(1)])
        row = db.conn.execute("SELECT args FROM tasks WHERE request_id = ? AND idx = 1", (rid,))
        (stored,) = row.fetchone()
        assert stored == make_ref(hashlib.sha256(BIG).hexdigest(), len(BIG))
        assert db.get_details(rid, 1)[2] == BIG
        (lease,) = db.lease(rid, worker="w", host="h", max_tasks=1, lease_s=60.0)
        assert lease.args == stored  # the worker fetches it; the server does not read it
        db.store_result(rid, 1, BIG)
        db.store_result(rid, 2, pickle.dumps(2))
        assert db.get_results(rid) == [(BIG, BIG), (pickle.dumps(1), pickle.dumps(2))]
        assert db.finished_since(rid)[1][0][2] == BIG
        huge = pickle.dumps(os.urandom(2_000_000))
        db.new_request(b"F", None, [huge] * 3)
    assert mode(Path(f"{dbfile}.blobs")) == 0o700
    assert dbfile.stat().st_size < len(huge)  # three copies of it are one file beside it


def test_get_results_reads_blob_values_back(tmp_path: Path) -> None:
    import sheepdog

    dbfile = tmp_path / "db.sqlite"
    value = list(range(50_000))
    with Storage(dbfile) as db:
        rid = db.new_request(b"F", None, [pickle.dumps((value,))])
        db.store_result(rid, 1, pickle.dumps(value))
    assert sheepdog.get_results(rid, str(dbfile)) == [((value,), value)]


def test_map_reads_back_the_results_without_the_arguments(tmp_path: Path) -> None:
    from sheepdog.session import Session

    dbfile = tmp_path / "db.sqlite"
    with Storage(dbfile) as db:
        rid = db.new_request(b"F", None, [BIG, pickle.dumps(2)])
        db.store_result(rid, 1, pickle.dumps(b"r" * (INLINE_MAX_BYTES + 10)))
        assert db.blobs is not None
        os.unlink(db.blobs.path(hashlib.sha256(BIG).hexdigest()))  # gone: never read
        db.store_result(rid, 2, pickle.dumps(3))
    with Session(dbfile=str(dbfile), create=False) as session:
        assert session.values(rid) == [b"r" * (INLINE_MAX_BYTES + 10), 3]
        with pytest.raises(StorageError):
            session.results(rid)  # get_results returns the arguments too


def test_arguments_hashed_as_they_are_stored_take_results_from_the_cache(
    tmp_path: Path,
) -> None:
    from sheepdog.store import content_digest

    small = pickle.dumps(2)
    with Storage(tmp_path / "db.sqlite") as db:
        first = db.new_request(b"F", None, [BIG, small], func_digest=content_digest(b"F"),
                               args_digests=[content_digest(BIG), content_digest(small)])
        db.store_result(first, 1, pickle.dumps("one"))
        db.store_result(first, 2, pickle.dumps("two"))
        again = db.new_request(b"F", None, [small, BIG, BIG + b"!"],
                               func_digest=content_digest(b"F"), digest_args=True)
        assert db.fill_from_cache(again) == 2
        assert db.task_states(again) == ["done", "done", "pending"]


# ---- the server ----


@pytest.fixture
def app(tmp_path: Path) -> Flask:
    return create_app(tmp_path / "server.sqlite", max_body_bytes=64 * 1024,
                      max_blob_bytes=4 * 1024 * 1024)


@pytest.fixture
def db(tmp_path: Path, app: Flask) -> Iterator[Storage]:
    with Storage(tmp_path / "server.sqlite") as storage:
        yield storage


@pytest.fixture
def api(app: Flask, db: Storage) -> Api:
    rid = db.new_request(b"FUNCTION", None, [BIG, pickle.dumps(2)], settings={"lease_s": 30.0})
    return Api(app.test_client(), rid, db.get_secret(rid))


def upload(api: Api, data: bytes, **options: Any) -> Any:
    digest = hashlib.sha256(data).hexdigest()
    return api.call("PUT", f"blobs/{digest}", data, **options)


def test_a_signed_upload_is_stored_and_named_in_a_result(api: Api, db: Storage) -> None:
    assert db.blobs is not None
    result = pickle.dumps(b"r" * 200_000)
    response = upload(api, result)
    assert response.status_code == 200
    digest = hashlib.sha256(result).hexdigest()
    assert response.get_json() == {"sha256": digest, "size": len(result)}
    assert mode(db.blobs.path(digest)) == 0o600
    item = {"index": 1, "lease": "", "ok": True, "blob": {"sha256": digest, "size": len(result)},
            "stdout": "", "stderr": "", "duration_s": 0.1}
    body = {"worker": "w", "host": "h", "max_tasks": 0, "results": [item]}
    response = api.call("POST", "results", body)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["accepted"] == [1]
    assert db.get_results(api.rid) == [(BIG, result)]


def test_a_result_naming_a_blob_not_uploaded_is_refused(api: Api, db: Storage) -> None:
    item = {"index": 1, "lease": "", "ok": True, "blob": {"sha256": "a" * 64, "size": 10},
            "stdout": "", "stderr": "", "duration_s": 0.1}
    body = {"worker": "w", "host": "h", "max_tasks": 0, "results": [item]}
    assert error_of(api.call("POST", "results", body), 400)["code"] == "missing_blob"
    not_a_pickle = b"n" * 100_000
    assert upload(api, not_a_pickle).status_code == 200
    item["blob"] = {"sha256": hashlib.sha256(not_a_pickle).hexdigest(), "size": 100_000}
    assert error_of(api.call("POST", "results", body), 400)["code"] == "bad_pickle"
    assert db.task_states(api.rid) == ["pending", "pending"]


def test_an_upload_named_for_other_bytes_is_refused_unread(api: Api, db: Storage) -> None:
    assert db.blobs is not None
    data = b"d" * 100_000
    before = stored_files(db.blobs)  # the request's large argument
    wrong = hashlib.sha256(b"something else").hexdigest()
    # Signed for the body it carries, but named as another blob: refused before reading.
    assert error_of(api.call("PUT", f"blobs/{wrong}", data), 400)["code"] == "bad_digest"
    assert error_of(api.call("PUT", "blobs/XYZ", data), 400)["code"] == "bad_digest"
    assert stored_files(db.blobs) == before


def test_tampered_body_under_a_valid_signature_is_refused_and_nothing_written(
    app: Flask, api: Api, db: Storage
) -> None:
    from sheepdog.server.auth import signed_headers

    assert db.blobs is not None
    before = stored_files(db.blobs)
    data = b"t" * 300_000
    digest = hashlib.sha256(data).hexdigest()
    path = api.path(f"blobs/{digest}")
    headers = signed_headers(api.secret, "PUT", path, data)
    tampered = data[:-1] + b"!"
    response = app.test_client().put(path, data=tampered, headers=headers)
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "bad_digest"
    assert stored_files(db.blobs) == before


def test_unauthenticated_and_oversize_uploads_are_refused_unread(
    app: Flask, api: Api, db: Storage
) -> None:
    assert db.blobs is not None
    before = stored_files(db.blobs)
    data = b"u" * 100_000
    digest = hashlib.sha256(data).hexdigest()
    stranger = app.test_client().put(f"/api/v1/requests/{api.rid}/blobs/{digest}", data=data)
    assert error_of(stranger, 401)["code"] == "unauthorised"
    wrong_key = upload(api, data, secret="ab" * 32)
    assert error_of(wrong_key, 401)["code"] == "unauthorised"
    too_big = b"o" * (4 * 1024 * 1024 + 1)
    response = upload(api, too_big)
    assert error_of(response, 413)["code"] == "request_entity_too_large"
    assert "max_blob_bytes" in response.get_json()["error"]["message"]
    assert stored_files(db.blobs) == before


def test_a_lease_names_a_large_argument_and_the_worker_gets_it_signed(api: Api) -> None:
    tasks = api.call("POST", "lease", lease_body(2)).get_json()["tasks"]
    first, second = tasks
    assert "args" not in first
    assert first["args_blob"] == {"sha256": hashlib.sha256(BIG).hexdigest(), "size": len(BIG)}
    assert pickle.loads(__import__("base64").b64decode(second["args"])) == 2
    response = api.call("GET", "tasks/1/args")  # Api.call checks the answer's signature
    assert response.status_code == 200
    assert response.get_data() == BIG
    response.close()  # send_file's open file
    small = api.call("GET", "tasks/2/args")
    assert small.status_code == 200 and small.get_data() == pickle.dumps(2)
    assert error_of(api.call("GET", "tasks/3/args"), 404)["code"] == "unknown_task"


# ---- the stub, against a real server ----


@pytest.fixture(params=["http", "https"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Server, Storage]]:
    # Over TLS an upload is read from the SSL socket past gunicorn's reader: test both.
    dbfile = tmp_path / "served.sqlite"
    tls = certificate_for(dbfile) if request.param == "https" else None
    files = {"certfile": tls.certfile, "keyfile": tls.keyfile} if tls else {}
    with Storage(dbfile) as db, Server(None, None, dbfile, host="127.0.0.1", **files) as server:
        server.fingerprint = tls.fingerprint if tls else None  # type: ignore[attr-defined]
        yield server, db


def test_the_stub_uploads_and_downloads_blobs(served: tuple[Server, Storage]) -> None:
    server, db = served
    rid = db.new_request(b"F", None, [BIG])
    conn = stub.Connection(
        server.url_for("127.0.0.1"), db.get_secret(rid), rid, retry_s=10.0,
        tls_fingerprint=server.fingerprint,  # type: ignore[attr-defined]
    )
    result = pickle.dumps(os.urandom(300_000))
    named = conn.upload(result)
    assert named == {"sha256": hashlib.sha256(result).hexdigest(), "size": len(result)}
    assert db.blobs is not None and db.blobs.has(named["sha256"], len(result))
    fetched = conn.download("tasks/1/args", hashlib.sha256(BIG).hexdigest(), len(BIG))
    assert bytes(fetched) == BIG
    # A blob changed on disk is not the one the signed lease named: the worker stops.
    digest = hashlib.sha256(BIG).hexdigest()
    path = db.blobs.path(digest)
    path.write_bytes(b"Z" + BIG[1:])
    with pytest.raises(stub.ProtocolFailure) as caught:
        conn.download("tasks/1/args", digest, len(BIG))
    assert caught.value.exit_status == stub.EXIT_AUTH


def test_the_stub_hashes_an_upload_once(
    served: tuple[Server, Storage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upload's name and its signed body hash are one SHA-256 (20 ms per 20 MB)."""
    server, db = served
    rid = db.new_request(b"F", None, [b"x"])
    conn = stub.Connection(
        server.url_for("127.0.0.1"), db.get_secret(rid), rid, retry_s=10.0,
        tls_fingerprint=server.fingerprint,  # type: ignore[attr-defined]
    )
    value = pickle.dumps(os.urandom(300_000))
    hashed: list[int] = []

    class Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(hashlib, name)

        @staticmethod
        def sha256(data: bytes = b"") -> Any:
            hashed.append(len(data))
            return hashlib.sha256(data)

    monkeypatch.setattr(stub, "hashlib", Counting())
    assert conn.upload(value)["sha256"] == hashlib.sha256(value).hexdigest()
    assert hashed.count(len(value)) == 1
    assert db.blobs is not None and db.blobs.has(hashlib.sha256(value).hexdigest(), len(value))


def test_the_stub_inlines_small_results_and_uploads_large_ones() -> None:
    class Recorder:
        uploaded: list[bytes] = []

        def upload(self, data: bytes) -> dict[str, Any]:
            self.uploaded.append(data)
            return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    client = stub.Client("http://127.0.0.1:9/", "ab" * 32, 3, 1)
    client.conn = Recorder()
    client.settings = {"inline_max_bytes": 10}
    assert client.encode_value(b"0123456789") == {"value": "MDEyMzQ1Njc4OQ=="}
    assert client.encode_value(b"0123456789!")["blob"]["size"] == 11
    client.settings = {}  # a server that does not say: everything inline, as before
    assert "value" in client.encode_value(b"x" * 100_000)


def test_the_real_server_refuses_a_tampered_upload_and_keeps_nothing(
    served: tuple[Server, Storage],
) -> None:
    import http.client

    from sheepdog.server.auth import signed_headers

    server, db = served
    rid = db.new_request(b"F", None, [b"x"])
    data = os.urandom(3 * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    path = f"/api/v1/requests/{rid}/blobs/{digest}"
    headers = signed_headers(db.get_secret(rid), "PUT", path, data)

    def connect() -> http.client.HTTPConnection:
        if server.scheme == "http":
            return http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        # The test checks the server's handling of the body, not its certificate.
        context = ssl._create_unverified_context()
        return http.client.HTTPSConnection("127.0.0.1", server.port, timeout=30, context=context)

    conn = connect()
    try:
        # Read from the socket itself (past gunicorn's reader): still hashed, still refused.
        conn.request("PUT", path, body=data[:-1] + b"!", headers=headers)
        response = conn.getresponse()
        assert response.status == 400, response.read()
        assert b"bad_digest" in response.read()
    finally:
        conn.close()
    assert db.blobs is not None
    assert stored_files(db.blobs) == []
    conn = connect()
    try:
        conn.request("PUT", path, body=data, headers=signed_headers(
            db.get_secret(rid), "PUT", path, data))
        response = conn.getresponse()
        assert response.status == 200, response.read()
        assert response.getheader("Connection", "").lower() == "close"
    finally:
        conn.close()
    assert db.blobs.read(make_ref(digest, len(data))) == data


def test_a_new_server_removes_uploads_a_dead_one_left(tmp_path: Path) -> None:
    dbfile = tmp_path / "db.sqlite"
    create_app(dbfile)
    blob_dir = Path(str(dbfile) + ".blobs")
    blob_dir.mkdir(exist_ok=True)
    stale, fresh = blob_dir / ".incoming-dead", blob_dir / ".incoming-live"
    stale.write_bytes(b"x" * 100)
    fresh.write_bytes(b"y")
    hours_ago = time.time() - 2 * STALE_UPLOAD_S
    os.utime(stale, (hours_ago, hours_ago))
    create_app(dbfile)
    assert not stale.exists() and fresh.exists()
