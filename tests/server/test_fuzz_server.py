"""Fuzzing the worker API: random methods, paths, headers and bodies, signed and not.

Properties: never a 500; every 4xx is a JSON error body; unauthenticated calls
leave the database exactly as it was; a real gunicorn server fed garbage over
raw sockets stays up. The number of calls per endpoint and their statuses are
printed at the end (``pytest -s``) and written to
``$TMPDIR/sheepdog-fuzz-summary.json``.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import pickle
import random
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import register_profiles

from sheepdog.server import MAX_TASKS_PER_CALL, Server, create_app
from sheepdog.server.auth import (
    BODY_HASH_HEADER,
    NONCE_HEADER,
    SIGNATURE_HEADER,
    TIME_HEADER,
    sign_response,
    signed_headers,
)
from sheepdog.storage import Storage

ENDPOINTS = ("health", "function", "lease", "heartbeat", "results")
SUMMARY = Path(tempfile.gettempdir()) / "sheepdog-fuzz-summary.json"
#: (endpoint, "unsigned" | "signed" | "raw socket") -> status -> count
OUTCOMES: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
N_TASKS = 6
register_profiles()
PROFILE = os.environ.get("SHEEPDOG_HYPOTHESIS_PROFILE", "dev")
# The profile's example counts; fixtures live as long as the module on purpose.
FUZZ = settings(settings.get_profile(PROFILE),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Target:
    """A Flask test client on a database with two requests; remembers their secrets."""

    def __init__(self, tmp: Path) -> None:
        self.dbfile = str(tmp / "fuzz.sqlite")
        self.client: FlaskClient = create_app(self.dbfile, max_body_bytes=64 * 1024).test_client()
        with Storage(self.dbfile) as db:
            values = [pickle.dumps(i) for i in range(N_TASKS)]
            self.rids = [db.new_request(b"F", None, values, settings={"lease_s": 30.0})
                         for _ in range(2)]
            self.secrets = {rid: db.get_secret(rid) for rid in self.rids}

    def dump(self) -> list[Any]:
        with Storage(self.dbfile) as db:
            return [
                db.conn.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
                for table in ("requests", "tasks", "jobs")
            ]


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    yield Target(tmp_path_factory.mktemp("fuzz"))
    totals = {f"{key}": dict(sorted(counts.items())) for key, counts in sorted(OUTCOMES.items())}
    SUMMARY.write_text(json.dumps(totals, indent=1))
    print(f"\nfuzzed calls per endpoint and mode -> statuses (profile {PROFILE}):")
    for key, counts in totals.items():
        print(f"  {key:32} {sum(counts.values()):6}  {counts}")
    print(f"(written to {SUMMARY})")


# -- strategies ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
good_b64 = base64.b64encode(pickle.dumps({"x": 1})).decode()
bad_b64 = ["", "***", "YQ", base64.b64encode(b"garbage.").decode(),
           base64.b64encode(b"\x80\x04\xff.").decode()]
b64_fields = st.just(good_b64) | st.sampled_from(bad_b64) | json_values
ints = (
    st.integers(min_value=1, max_value=N_TASKS)
    | st.integers(min_value=-3, max_value=N_TASKS + 2)
    | st.sampled_from([0, 2**31, 2**63, -(2**63), 10**30, MAX_TASKS_PER_CALL + 1])
    | json_values
)
texts = st.text(max_size=30) | json_values


def _maybe(field: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field that is usually right-typed, sometimes missing (a sentinel) or wrong."""
    return st.one_of(field, field, field, st.just(_MISSING), json_values)


_MISSING = object()


def _obj(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({k: _maybe(v) for k, v in fields.items()}).map(
        lambda d: {k: v for k, v in d.items() if v is not _MISSING}
    )


result_items = _obj(
    index=ints, lease=st.text(max_size=16) | st.none(), ok=st.booleans(), value=b64_fields,
    stdout=texts, stderr=texts, duration_s=st.floats() | st.integers(),
    error=_obj(type=texts, message=texts, traceback=texts, host=texts, python=texts),
)
wrong_but_structured = {
    "lease": _obj(worker=texts, host=texts, max_tasks=ints),
    "heartbeat": _obj(worker=texts, leases=st.lists(texts, max_size=4) | json_values),
    "results": _obj(worker=texts, host=texts, max_tasks=ints,
                    results=st.lists(result_items, max_size=4) | json_values),
}


def bodies(endpoint: str) -> st.SearchStrategy[bytes]:
    structured = wrong_but_structured.get(endpoint, json_values)
    return st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        structured.map(lambda v: json.dumps(v).encode()),
        st.sampled_from([b"", b"{", b"[" * 5000, b"\xff\xfe", b"x" * (70 * 1024)]),
    )


methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE"])
header_names = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,24}", fullmatch=True) | st.sampled_from(
    [TIME_HEADER, NONCE_HEADER, BODY_HASH_HEADER, SIGNATURE_HEADER, "Content-Type",
     "Transfer-Encoding", "Expect"])
header_values = st.text(st.characters(min_codepoint=32, max_codepoint=255,
                                      blacklist_characters="\x7f"), max_size=80)
headers = st.dictionaries(header_names, header_values, max_size=5)
request_ids = st.one_of(
    st.sampled_from(["1", "2"]),
    st.integers().map(str),
    st.sampled_from(["0", "-1", "01", "1.0", "abc", "%00", "1%2F..", str(2**64), "9" * 40]),
)


def path_for(endpoint: str, rid: str) -> str:
    return "/api/v1/health" if endpoint == "health" else f"/api/v1/requests/{rid}/{endpoint}"


path_prefixes = st.sampled_from(
    ["/", "/api/", "/api/v1/", "/api/v1/requests/", "/api/v1/requests/1/"])
#: Paths Werkzeug's test client can send as they are. A path that starts with "//" is read by
#: the test client as a host name (and "//\x80" cannot be encoded at all), so those, and raw
#: bytes that are not UTF-8, go to the real server over a socket (``raw_paths`` below).
any_paths = st.tuples(
    path_prefixes,
    st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF, blacklist_characters="#?%"),
            max_size=60),
).map(lambda parts: "/" + "".join(parts).lstrip("/"))
#: Any request target a real client could put on the request line: any bytes but the
#: separators of the line itself (space, CR, LF), including "//..." and invalid UTF-8.
raw_paths = st.tuples(
    path_prefixes.map(str.encode) | st.sampled_from([b"//", b"///api/v1/health", b"/%"]),
    st.binary(max_size=60).map(lambda b: bytes(c for c in b if c not in b" \r\n")),
).map(b"".join)


# -- properties -------------------------------------------------------------------------------


def check_answer(response: Any, method: str) -> None:
    status = response.status_code
    assert status < 500, (status, response.get_data()[:300])
    if status >= 400 and method != "HEAD":
        assert response.mimetype == "application/json", response.get_data()[:300]
        body = response.get_json()
        assert set(body) == {"error"} and body["error"]["message"], body
        assert b"<html" not in response.get_data().lower()


@FUZZ
@pytest.mark.parametrize("endpoint", ENDPOINTS)
@given(method=methods, rid=request_ids, extra=headers, data=st.data())
def test_unsigned_calls_change_nothing(
    target: Target, endpoint: str, method: str, rid: str, extra: dict[str, str], data: Any
) -> None:
    body = data.draw(bodies(endpoint), label="body")
    path = path_for(endpoint, rid)
    before = target.dump()
    response = target.client.open(path, method=method, data=body, headers=extra)
    OUTCOMES[f"{endpoint} unsigned"][str(response.status_code)] += 1
    check_answer(response, method)
    if endpoint != "health" and response.status_code < 300:
        # Only Flask's automatic OPTIONS answer succeeds without a signature; it holds no data.
        assert method == "OPTIONS" and response.get_data() == b"", response.get_data()[:300]
    assert target.dump() == before


@FUZZ
@pytest.mark.parametrize("endpoint", ENDPOINTS)
@given(method=methods, rid=st.sampled_from(["1", "1", "1", "2"]) | request_ids, extra=headers,
       data=st.data(), skew=st.sampled_from([0, 0, 0, -5, 60, 10_000]))
def test_signed_calls_never_500(
    target: Target, endpoint: str, method: str, rid: str, extra: dict[str, str], data: Any,
    skew: int,
) -> None:
    body = data.draw(bodies(endpoint), label="body")
    # Mostly the right method, so the handlers' validation is what gets exercised.
    method = data.draw(st.sampled_from([method] + ["GET" if endpoint in ("health", "function")
                                                   else "POST"] * 3), label="method")
    path = path_for(endpoint, rid)
    secret = target.secrets.get(int(rid) if rid in ("1", "2") else target.rids[0],
                                target.secrets[target.rids[0]])
    signed = signed_headers(secret, method, path, body, time_s=int(time.time()) + skew)
    signature = signed[SIGNATURE_HEADER]
    sent = {**extra, **signed}
    before = target.dump()
    response = target.client.open(path, method=method, data=body, headers=sent)
    OUTCOMES[f"{endpoint} signed"][str(response.status_code)] += 1
    check_answer(response, method)
    if response.status_code < 300 and method == "OPTIONS":
        assert response.get_data() == b""  # Flask's automatic answer: the Allow header only
    elif 200 <= response.status_code < 300 and endpoint != "health" and method != "HEAD":
        assert response.headers[SIGNATURE_HEADER] == sign_response(
            secret, signature, response.get_data())
        assert isinstance(response.get_json(), dict)
    if response.status_code >= 400:
        # A refused call stores nothing (results are all-or-nothing).
        assert target.dump() == before


@FUZZ
@given(method=methods, path=any_paths, extra=headers, body=bodies("other"))
def test_any_path_never_500(
    target: Target, method: str, path: str, extra: dict[str, str], body: bytes
) -> None:
    before = target.dump()
    response = target.client.open(path, method=method, data=body, headers=extra)
    OUTCOMES["any path unsigned"][str(response.status_code)] += 1
    check_answer(response, method)
    assert target.dump() == before


# -- a real gunicorn server and raw sockets -------------------------------------------------


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Target]]:
    """A real gunicorn server on a database with one request, for raw-socket properties."""
    dbfile = str(tmp_path_factory.mktemp("raw-paths") / "raw.sqlite")
    with Storage(dbfile) as db:
        db.new_request(b"F", None, [b"x"], settings={"lease_s": 30.0})
    target = Target.__new__(Target)
    target.dbfile = dbfile
    with Server(None, None, dbfile, host="127.0.0.1", workers=1, threads=4,
                max_body_bytes=64 * 1024) as server:
        yield server, target


def _exchange(port: int, data: bytes) -> bytes:
    """Send one whole request on a new connection and return the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@FUZZ
@given(method=methods, path=raw_paths)
def test_any_raw_path_never_500(
    real_server: tuple[Server, Target], method: str, path: bytes
) -> None:
    server, target = real_server
    assert server.port is not None
    before = target.dump()
    answer = _exchange(server.port, method.encode() + b" " + path + b" HTTP/1.1\r\n"
                       b"Host: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    assert len(status_line) >= 2 and status_line[1].isdigit(), answer[:300]
    status = int(status_line[1])
    OUTCOMES["any path raw socket"][str(status)] += 1
    assert status < 500, answer[:300]
    if status >= 400 and method != "HEAD" and b"application/json" in head.lower():
        assert json.loads(body)["error"]["message"], answer[:300]
    elif status >= 400 and method != "HEAD":
        # gunicorn itself refuses a request line it cannot parse, before our app sees it:
        # a plain 400 from the HTTP layer, never a traceback.
        assert status == 400 and b"Traceback" not in body, answer[:300]
    assert target.dump() == before


def _garbage(rng: random.Random, port: int, rid: int) -> list[tuple[str, bytes, float]]:
    """(kind, bytes to send, seconds to dawdle before closing) for each connection."""
    path = f"/api/v1/requests/{rid}/results".encode()
    host = f"Host: 127.0.0.1:{port}\r\n".encode()
    fixed: list[tuple[str, bytes, float]] = [
        ("empty", b"", 0.0),
        ("truncated request line", b"POST /api/v1/requ", 0.0),
        ("no version", b"GET /api/v1/health\r\n\r\n", 0.0),
        ("http/0.9", b"GET /\r\n", 0.0),
        ("bad version", b"GET / HTTP/9.9\r\n" + host + b"\r\n", 0.0),
        ("binary request line", bytes(range(256)) + b"\r\n\r\n", 0.0),
        ("huge header", b"GET /api/v1/health HTTP/1.1\r\n" + host + b"X-Big: "
         + b"a" * 200_000 + b"\r\n\r\n", 0.0),
        ("many headers", b"GET /api/v1/health HTTP/1.1\r\n" + host
         + b"".join(b"X-%d: y\r\n" % i for i in range(500)) + b"\r\n", 0.0),
        ("huge request line", b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n" + host + b"\r\n", 0.0),
        ("body shorter than length", b"POST " + path + b" HTTP/1.1\r\n" + host
         + b"Content-Length: 1000\r\n\r\n{\"worker\":", 0.3),
        ("slow body", b"POST " + path + b" HTTP/1.1\r\n" + host
         + b"Content-Length: 100000\r\n\r\n" + b"x" * 10, 1.0),
        ("negative length", b"POST " + path + b" HTTP/1.1\r\n" + host
         + b"Content-Length: -5\r\n\r\n", 0.0),
        ("bad chunk", b"POST " + path + b" HTTP/1.1\r\n" + host
         + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 0.0),
        ("length and chunked", b"POST " + path + b" HTTP/1.1\r\n" + host
         + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 0.0),
        ("huge declared length", b"POST " + path + b" HTTP/1.1\r\n" + host
         + b"Content-Length: 99999999999999\r\n\r\nabc", 0.0),
        ("header without colon", b"GET /api/v1/health HTTP/1.1\r\n" + host
         + b"garbage\r\n\r\n", 0.0),
        ("pipelined garbage", b"GET /api/v1/health HTTP/1.1\r\n" + host + b"\r\n"
         + b"\x00\x01\x02 nonsense\r\n\r\n", 0.0),
    ]
    out = list(fixed)
    while len(out) < 300:
        kind = rng.choice(["random bytes", "random request", "cut request"])
        if kind == "random bytes":
            data = rng.randbytes(rng.randint(1, 2000))
        else:
            method = rng.choice([b"GET", b"POST", b"PUT", b"\xff\xfe", b"G E T"])
            body = rng.randbytes(rng.randint(0, 500))
            data = (method + b" " + rng.choice([path, b"/api/v1/health", b"/"]) + b" HTTP/1.1\r\n"
                    + host + b"Content-Length: %d\r\n" % len(body) + TIME_HEADER.encode()
                    + b": " + str(int(time.time())).encode() + b"\r\n\r\n" + body)
            if kind == "cut request":
                data = data[: rng.randint(1, len(data))]
        out.append((kind, data, 0.0))
    return out


def _send(port: int, data: bytes, dawdle_s: float) -> str:
    """Send ``data`` on a new connection; return the answer's status, or what happened."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(data)
            time.sleep(dawdle_s)
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:  # the server closed first: it does not wait for a body it refused
                pass
            answer = b""
            while len(answer) < 65536:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except ConnectionResetError:
            return "reset"
        except BrokenPipeError:
            return "broken pipe"
        except TimeoutError:
            return "no answer in 5 s"
    if not answer:
        return "closed"
    first = answer.split(b"\r\n", 1)[0].split()
    return first[1].decode() if len(first) >= 2 and first[1].isdigit() else "garbled"


@pytest.mark.slow
def test_real_server_survives_raw_garbage(tmp_path: Path) -> None:
    dbfile = str(tmp_path / "raw.sqlite")
    with Storage(dbfile) as db:
        rid = db.new_request(b"F", None, [b"x"], settings={"lease_s": 30.0})
    target = Target.__new__(Target)
    target.dbfile = dbfile
    before = target.dump()
    with Server(None, None, dbfile, host="127.0.0.1", workers=1, threads=4,
                max_body_bytes=64 * 1024) as server:
        assert server.port is not None
        rng = random.Random(int(os.environ.get("SHEEPDOG_FUZZ_SEED", "7")))
        for kind, data, dawdle in _garbage(rng, server.port, rid):
            outcome = _send(server.port, data, dawdle)
            OUTCOMES["raw socket"][outcome] += 1
            assert not outcome.startswith("5"), (kind, data[:200], outcome)
        assert server.alive
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert b'"ok":true' in answer
    assert target.dump() == before
    print(f"\nraw socket outcomes: {dict(OUTCOMES['raw socket'])}")
