"""The HTTP server that workers call back to: a Flask app run by gunicorn in a child process.

``create_app`` builds the WSGI app for docs/protocol.rst. ``Server`` runs it
under gunicorn (gthread workers) in a child process on a socket that this
process binds first, so a random port has no bind-then-close race.
``get_server`` keeps one server per port, as the original did.

Authentication is per request: every call under ``/api/v1/requests/<id>/`` is
signed with that request's secret (see ``sheepdog._signing``), in headers that
cover the body's length and SHA-256, so no body is read before its call is
authenticated. Each ``POST`` is carried out once per nonce: a call sent again
(a worker's retry, or a replay) gets the answer recorded with its nonce. The
``password`` argument of ``Server`` and ``get_server`` is kept for the
original's signatures and registry checks only; it protects nothing.

Body size: ``DEFAULT_MAX_BODY_BYTES`` (256 MiB) bounds one JSON call's body;
larger bodies get a 413. Values longer than ``sheepdog.blobs.INLINE_MAX_BYTES``
do not travel in JSON: results are uploaded with ``PUT .../blobs/<sha256>`` and
streamed to a file beside the database (up to ``DEFAULT_MAX_BLOB_BYTES``),
arguments are sent from their file with ``GET .../tasks/<index>/args``; see
"Payloads" in docs/protocol.rst.
"""

from __future__ import annotations

import atexit
import base64
import binascii
import errno
import hashlib
import http.client
import io
import json
import logging
import os
import pickletools
import re
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Callable

from flask import Flask, Response, request, send_file
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES

from sheepdog._signing import (
    BODY_HASH_HEADER,
    NONCE_HEADER,
    SIGNATURE_HEADER,
    TIME_HEADER,
    sign_request,
    sign_response,
    sign_response_digest,
    verify,
)
from sheepdog._tls import hold_while_serving
from sheepdog._version import __version__
from sheepdog.blobs import INLINE_MAX_BYTES, parse_ref
from sheepdog.errors import ServerError, StorageError, UnknownRequestError
from sheepdog.store import CallAuth, Lease, NonceReusedError, Storage

__all__ = [
    "BODY_BASE_S",
    "BODY_MIN_BYTES_PER_S",
    "DEFAULT_MAX_BLOB_BYTES",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_CLOCK_SKEW_S",
    "Server",
    "create_app",
    "get_server",
    "listen_address",
]

# The server package logs under one name, the one it had as a module.
logger = logging.getLogger("sheepdog.server")

DEFAULT_MAX_BODY_BYTES = 256 * 1024 * 1024
#: One uploaded blob (a large pickled result) at most; it streams to disk, never to memory.
DEFAULT_MAX_BLOB_BYTES = 1024**4
DEFAULT_MAX_CLOCK_SKEW_S = 900.0
MAX_TASKS_PER_CALL = 10_000
_PICKLE_WALK_BYTES = 64 * 1024  # walk smaller pickles' opcodes fully; larger ones are spot-checked
_MAX_SQLITE_INT = 2**63 - 1
_TIME_RE = re.compile(r"[0-9]{1,12}")
_NONCE_RE = re.compile(r"[0-9a-f]{32}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_LENGTH_RE = re.compile(r"[0-9]{1,15}")
#: A signed body may take this long, plus its length at BODY_MIN_BYTES_PER_S, to arrive.
BODY_BASE_S = 30.0
BODY_MIN_BYTES_PER_S = 256 * 1024
_BODY_CHUNK = 64 * 1024
_BLOB_CHUNK = 1024 * 1024
#: WSGI environ key asking _serve's worker to close the connection without draining it.
CLOSE_KEY = "sheepdog.close_connection"
#: How long a server on a fixed port waits for the port to become free.
BIND_RETRY_S = 10.0

_SETTINGS_SENT = ("lease_s", "heartbeat_s", "task_timeout_s", "batch", "capture_bytes",
                  "tasks_per_worker")


# -- the WSGI app --------------------------------------------------------------------


class ApiError(Exception):
    """A 4xx answer with a JSON body ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class _Replayed(Exception):
    """A call whose nonce was answered before: send the recorded answer again."""

    def __init__(self, secret: str, signature: str, answer: bytes) -> None:
        super().__init__("replayed call")
        self.secret = secret
        self.signature = signature
        self.answer = answer


@dataclass(frozen=True)
class _Call:
    request_id: int
    auth: CallAuth
    signature: str
    nonce: str
    stamp: int
    body: bytes
    method: str
    path: str
    length: int = 0  # of the body, which is not read yet when it is to be streamed
    digest: str = ""  # the body's signed SHA-256


#: An answer as the hot path sends it: status, headers, body.
_Answer = tuple[int, list[tuple[str, str]], bytes]

#: The worker's state-changing calls, answered without Flask (see create_app's hot_path).
#: Ids with a leading zero or of 20 digits or more take Flask's route, as before.
_HOT_PATH = re.compile(r"/api/v1/requests/([1-9][0-9]{0,18})/(lease|results|heartbeat)")
_STATUS_LINES = {code: f"{code} {phrase}" for code, phrase in HTTP_STATUS_CODES.items()}


def _environ_key(header: str) -> str:
    return "HTTP_" + header.upper().replace("-", "_")


_SIGNATURE_KEY = _environ_key(SIGNATURE_HEADER)
_TIME_KEY = _environ_key(TIME_HEADER)
_NONCE_KEY = _environ_key(NONCE_HEADER)
_BODY_HASH_KEY = _environ_key(BODY_HASH_HEADER)
_TRANSFER_ENCODING = _environ_key("Transfer-Encoding")


def _content_length(environ: dict[str, Any]) -> int | None:
    """The Content-Length header as Werkzeug reads it: None if absent or not a number."""
    try:
        return max(0, int(environ.get("CONTENT_LENGTH") or ""))
    except ValueError:
        return None


def _json_bytes(payload: object) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _answer(status: int, body: bytes, *extra: tuple[str, str]) -> _Answer:
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    return status, headers + list(extra), body


def _error_answer(status: int, code: str, message: str) -> _Answer:
    return _answer(status, _json_bytes({"error": {"code": code, "message": message}}))


def _signed_answer(secret: str, signature: str, body: bytes) -> _Answer:
    return _answer(200, body, (SIGNATURE_HEADER, sign_response(secret, signature, body)))


def _busy_answer(environ: dict[str, Any], exc: sqlite3.OperationalError) -> _Answer:
    method, path = environ.get("REQUEST_METHOD"), environ.get("PATH_INFO")
    logger.error("database error on %s %s: %s", method, path, exc)
    status, headers, body = _error_answer(
        503, "busy", f"the database is unavailable: {exc}; retry"
    )
    return status, headers + [("Retry-After", "1")], body


def _bug_answer(environ: dict[str, Any]) -> _Answer:
    """Log the exception being handled; answer 500."""
    method, path = environ.get("REQUEST_METHOD"), environ.get("PATH_INFO")
    logger.exception("internal error on %s %s", method, path)
    return _error_answer(500, "internal", "internal server error; see the server's log")


def _flask_response(answer: _Answer) -> Response:
    status, headers, body = answer
    return Response(body, status=status, headers=headers)


def _json_response(payload: object, status: int = 200) -> Response:
    return _flask_response(_answer(status, _json_bytes(payload)))


def _error_response(status: int, code: str, message: str) -> Response:
    return _flask_response(_error_answer(status, code, message))


def _text(value: str) -> str:
    # Lone surrogates from JSON "\ud800" escapes cannot be stored as UTF-8 text.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace").decode("utf-8")
    return value


def _get_str(obj: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        kind = type(value).__name__
        problem = "is missing" if key not in obj else f"must be a string, not {kind}"
        raise ApiError(400, "bad_field", f"{where}: {key!r} {problem}")
    return _text(value)


def _get_int(obj: dict[str, Any], key: str, where: str, low: int, high: int) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        problem = "is missing" if key not in obj else f"must be an integer, not {value!r:.40}"
        raise ApiError(400, "bad_field", f"{where}: {key!r} {problem}")
    if not low <= value <= high:
        raise ApiError(400, "bad_field", f"{where}: {key!r} must be in {low}..{high}, not {value}")
    return value


def _get_retry(obj: dict[str, Any], where: str) -> bool:
    """The ``retry`` flag: the worker sends this call again after getting no answer."""
    value = obj.get("retry", False)
    if not isinstance(value, bool):
        raise ApiError(
            400, "bad_field", f"{where}: 'retry' must be true or false, not {value!r:.40}"
        )
    return value


def _b64(value: object, where: str) -> bytes:
    if not isinstance(value, str):
        raise ApiError(400, "bad_field", f"{where} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, "bad_base64", f"{where} is not valid base64: {exc}") from exc


def _check_pickle(value: bytes, where: str) -> None:
    """Reject bytes that cannot be a pickle, without unpickling anything."""
    if not value.endswith(b"."):
        raise ApiError(400, "bad_pickle", f"{where} is not a pickle (no STOP opcode at its end)")
    if len(value) <= _PICKLE_WALK_BYTES:
        try:
            for _ in pickletools.genops(value):
                pass
        except Exception as exc:  # genops raises ValueError, KeyError, struct.error...
            raise ApiError(400, "bad_pickle", f"{where} is not a valid pickle: {exc}") from exc


def _parse_body(call: _Call) -> dict[str, Any]:
    try:
        body = json.loads(call.body)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "bad_json", f"the body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", "the body must be a JSON object")
    return body


def _parse_result(item: object, n_tasks: int, worker: str, host: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise ApiError(400, "bad_field", "each entry of 'results' must be an object")
    index = item.get("index")
    if isinstance(index, bool) or not isinstance(index, int):
        raise ApiError(400, "bad_field", "result: 'index' must be an integer")
    if not 1 <= index <= n_tasks:
        raise ApiError(404, "unknown_task", f"this request has tasks 1..{n_tasks}, not {index}")
    where = f"result {index}"
    lease = item.get("lease")
    if lease is not None and not isinstance(lease, str):
        raise ApiError(400, "bad_field", f"{where}: 'lease' must be a string")
    ok = item.get("ok")
    if not isinstance(ok, bool):
        raise ApiError(400, "bad_field", f"{where}: 'ok' must be true or false")
    duration = item.get("duration_s")
    if isinstance(duration, bool) or not isinstance(duration, (int, float, type(None))):
        raise ApiError(400, "bad_field", f"{where}: 'duration_s' must be a number")
    parsed: dict[str, Any] = {
        "index": index,
        "ok": ok,
        "stdout": _get_str(item, "stdout", where, ""),
        "stderr": _get_str(item, "stderr", where, ""),
        "duration_s": None if duration is None else float(duration),
        "worker": worker,
        "host": host,
    }
    if ok and "blob" in item:
        parsed["blob"] = _parse_blob(item.get("blob"), f"{where}: 'blob'")
    elif ok:
        value = _b64(item.get("value"), f"{where}: 'value'")
        _check_pickle(value, f"{where}: 'value'")
        parsed["value"] = value
    else:
        error = item.get("error")
        if not isinstance(error, dict):
            raise ApiError(400, "bad_field", f"{where}: 'error' must be an object")
        where = f"{where}: 'error'"
        parsed["error"] = {
            "type": _get_str(error, "type", where),
            "message": _get_str(error, "message", where),
            "traceback": _get_str(error, "traceback", where, ""),
            "host": _get_str(error, "host", where, host),
            "python": _get_str(error, "python", where, ""),
            "kind": _get_str(error, "kind", where, "exception"),
        }
    return parsed


def _parse_blob(value: object, where: str) -> tuple[str, int]:
    """Return ``(sha256, size)`` of a ``{"sha256": hex, "size": int}`` blob reference."""
    if not isinstance(value, dict):
        raise ApiError(400, "bad_field", f"{where} must be an object with 'sha256' and 'size'")
    digest = value.get("sha256")
    if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
        raise ApiError(400, "bad_field", f"{where}: 'sha256' must be 64 lowercase hex characters")
    return digest, _get_int(value, "size", where, 0, _MAX_SQLITE_INT)


def _task_payload(lease: Lease) -> dict[str, Any]:
    task: dict[str, Any] = {"index": lease.index, "attempt": lease.attempt, "lease": lease.lease}
    if isinstance(lease.args, str):  # a blob: the worker GETs it from .../tasks/<index>/args
        digest, size = parse_ref(lease.args)
        task["args_blob"] = {"sha256": digest, "size": size}
    else:
        task["args"] = base64.b64encode(lease.args).decode("ascii")
    return task


def _socket_reader(environ: dict[str, Any]) -> Callable[[int], bytes | memoryview] | None:
    """Return a reader of the body straight from gunicorn's socket, or None where there is none.

    gunicorn's own body reader copies every byte several times through its buffers,
    which cost about as much CPU as hashing and storing a large upload (measured:
    0.27 s against 0.04 s for 200 MiB). This reader hands out the bytes gunicorn already
    holds, then ``recv_into`` one reused buffer. gunicorn no longer knows where the body
    ends, so the connection is closed after the answer (``CLOSE_KEY``).
    """
    sock = environ.get("gunicorn.socket")
    body = environ.get("wsgi.input")
    unreader = getattr(getattr(body, "reader", None), "unreader", None)
    held_by_body = getattr(body, "buf", None)
    if (
        not isinstance(sock, socket.socket)
        or not hasattr(unreader, "take_buffered")
        or not isinstance(held_by_body, io.BytesIO)
        or held_by_body.tell()
    ):
        return None
    environ[CLOSE_KEY] = True
    held_first: bytes = unreader.take_buffered()  # type: ignore[union-attr]
    pending = [held_first]
    buffer = memoryview(bytearray(_BLOB_CHUNK))

    def read(size: int) -> bytes | memoryview:
        if pending and pending[0]:
            held = pending.pop()
            if len(held) > size:
                pending.append(held[size:])
            return held[:size]
        got = sock.recv_into(buffer[:size])
        return buffer[:got]

    return read


def _lease_payload(leases: list[Lease], lease_s: float, request_state: str) -> dict[str, Any]:
    if request_state == "cancelled":
        state = "cancelled"
    else:
        state = "open" if leases else "drained"
    return {
        "tasks": [_task_payload(lease) for lease in leases],
        "lease_s": lease_s,
        "state": state,
    }


def create_app(
    dbfile: str | Path = "./sheepdog.sqlite",
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_clock_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_S,
    synchronous: str = "NORMAL",
    body_base_s: float = BODY_BASE_S,
    max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
) -> Flask:
    """Build the worker-facing WSGI app on ``dbfile`` (created or migrated now).

    A signed call's body must arrive within ``body_base_s`` plus its length at
    ``BODY_MIN_BYTES_PER_S``, or the call gets a 408 and its connection is closed.
    A JSON body may hold ``max_body_bytes``; an uploaded blob ``max_blob_bytes``.
    """
    dbfile = str(dbfile)
    Storage(dbfile, synchronous=synchronous).close()
    app = Flask("sheepdog.server")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    version = __version__

    # One connection per thread, for the thread's life. flaskr opens one per request;
    # reusing it keeps SQLite's prepared statements and measured about a third faster
    # per round trip. Every write is its own committed transaction, so nothing carries
    # over between requests.
    connections = threading.local()

    def storage() -> Storage:
        db: Storage | None = getattr(connections, "storage", None)
        if db is None:
            db = connections.storage = Storage(dbfile, init=False, synchronous=synchronous)
        return db

    def no_open_transaction() -> None:
        db: Storage | None = getattr(connections, "storage", None)
        if db is not None and db.conn.in_transaction:
            # Only a bug can get here; never let a later request inherit its transaction.
            db.conn.rollback()

    @app.teardown_appcontext
    def return_storage(exc: BaseException | None) -> None:
        no_open_transaction()

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError) -> Response:
        return _error_response(exc.status, exc.code, exc.message)

    @app.errorhandler(_Replayed)
    def replayed(exc: _Replayed) -> Response:
        return _flask_response(_signed_answer(exc.secret, exc.signature, exc.answer))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status = exc.code or 400
        code = (exc.name or "error").lower().replace(" ", "_")
        response = _error_response(status, code, exc.description or code)
        for name, value in exc.get_headers():
            if name.lower() == "allow":
                response.headers[name] = value
        return response

    @app.errorhandler(sqlite3.OperationalError)
    def busy(exc: sqlite3.OperationalError) -> Response:
        return _flask_response(_busy_answer(request.environ, exc))

    @app.errorhandler(Exception)
    def bug(exc: Exception) -> Response:
        return _flask_response(_bug_answer(request.environ))

    def refuse_unread(environ: dict[str, Any], exc: ApiError) -> ApiError:
        """Mark the connection for closing when a refused call's body was never read."""
        if _content_length(environ) or environ.get(_TRANSFER_ENCODING):
            # Draining an unread body would let an unsigned client hold a thread for as
            # long as it likes; close instead (see _serve's worker).
            environ[CLOSE_KEY] = True
        return exc

    def authenticate(
        environ: dict[str, Any], path: str, request_id: int, *, read: bool = True,
        limit: int = max_body_bytes,
    ) -> _Call:
        """Check the call's signed headers, then read and check its body (unless ``read`` is off).

        Nothing is read from the body before the headers' signature checks out,
        and a call whose nonce was seen before is answered without reading it.
        With ``read=False`` the caller streams the body with ``stream_body``.
        """
        method = environ["REQUEST_METHOD"]
        signature = environ.get(_SIGNATURE_KEY)
        stamp = environ.get(_TIME_KEY)
        nonce = environ.get(_NONCE_KEY)
        digest = environ.get(_BODY_HASH_KEY)

        def refuse(reason: str) -> ApiError:
            logger.warning(
                "refused %s %s from %s: %s", method, path, environ.get("REMOTE_ADDR"), reason
            )
            return refuse_unread(environ, ApiError(401, "unauthorised", reason))

        if not signature or stamp is None or nonce is None or digest is None:
            raise refuse(
                f"missing {SIGNATURE_HEADER}, {TIME_HEADER}, {NONCE_HEADER} or "
                f"{BODY_HASH_HEADER} header"
            )
        if not _TIME_RE.fullmatch(stamp):
            raise refuse(f"{TIME_HEADER} must be unix seconds")
        if not _NONCE_RE.fullmatch(nonce):
            raise refuse(f"{NONCE_HEADER} must be 32 lowercase hex characters")
        if not _SHA256_RE.fullmatch(digest):
            raise refuse(f"{BODY_HASH_HEADER} must be 64 lowercase hex characters")
        skew = abs(time.time() - int(stamp))
        if skew > max_clock_skew_s:
            raise refuse(
                f"{TIME_HEADER} is {skew:.0f} s away from the server's clock "
                f"(at most {max_clock_skew_s:.0f} s allowed); check the clocks"
            )
        if environ.get(_TRANSFER_ENCODING):
            raise refuse_unread(environ, ApiError(
                411, "length_required", "send the body with a Content-Length, not chunked"
            ))
        length_text = environ.get("CONTENT_LENGTH", "0")
        if not _LENGTH_RE.fullmatch(length_text):
            raise refuse_unread(
                environ, ApiError(400, "bad_length", "Content-Length must be a number")
            )
        length = int(length_text)
        if length > limit:
            kind = "max_body_bytes" if limit == max_body_bytes else "max_blob_bytes"
            raise refuse_unread(environ, ApiError(
                413, "request_entity_too_large",
                f"the body is {length} bytes, more than the server's {kind} "
                f"({limit}); raise it for larger results",
            ))
        if request_id > _MAX_SQLITE_INT:
            raise refuse_unread(
                environ, ApiError(404, "unknown_request", f"no request {request_id}")
            )
        try:
            # The request row, and the answer recorded for this nonce, in one query.
            auth = storage().call_auth(request_id, None if method == "GET" else nonce)
        except UnknownRequestError:
            raise refuse_unread(
                environ, ApiError(404, "unknown_request", f"no request {request_id}")
            ) from None
        secret = auth.secret
        expected = sign_request(secret, method, path, stamp, nonce, length, digest)
        if not verify(expected, signature):
            raise refuse("bad signature")
        if method != "GET":
            seen = auth.seen
            if seen is not None:
                if not verify(seen[0], signature):
                    raise refuse_unread(environ, nonce_reused(request_id, nonce))
                # A retry of a call whose answer was lost, or a replay: the body is
                # bound to the signature, so it need not be read to know the answer.
                logger.info("answering %s %s again from its recorded answer", method, path)
                if length:
                    environ[CLOSE_KEY] = True
                raise _Replayed(secret, signature, seen[1])
        body = read_body(environ, length, digest, refuse) if read else b""
        return _Call(
            request_id, auth, signature, nonce, int(stamp), body, method, path, length, digest
        )

    def nonce_reused(request_id: int, nonce: str) -> ApiError:
        return ApiError(
            409, "nonce_reused",
            f"{NONCE_HEADER} {nonce} was already used by another call of request "
            f"{request_id}; use a fresh nonce for every call",
        )

    def read_body(
        environ: dict[str, Any], length: int, digest: str, refuse: Callable[[str], ApiError]
    ) -> bytes:
        """Read a signed call's body within its time bound, hashing it as it streams."""
        chunks: list[bytes] = []
        stream_body(environ, length, digest, refuse, chunks.append)
        return b"".join(chunks) if len(chunks) != 1 else chunks[0]

    def stream_body(
        environ: dict[str, Any],
        length: int,
        digest: str,
        refuse: Callable[[str], ApiError],
        write: Callable[[Any], object],
        chunk_bytes: int = _BODY_CHUNK,
        direct: bool = False,
    ) -> None:
        """Pass a signed call's body to ``write`` as it arrives; raise unless its hash is signed.

        ``direct``: read from the socket itself where the server allows it (see
        ``_socket_reader``); the connection is then closed after the answer.
        """
        deadline = time.monotonic() + body_base_s + length / BODY_MIN_BYTES_PER_S
        sock = environ.get("gunicorn.socket")
        stream = environ["wsgi.input"]
        read: Callable[[int], bytes | memoryview] = stream.read
        if direct:
            read = _socket_reader(environ) or read
        hasher = hashlib.sha256()
        got = 0
        try:
            while got < length:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                if isinstance(sock, socket.socket):
                    sock.settimeout(remaining)
                chunk = read(min(chunk_bytes, length - got))
                if not chunk:
                    break
                hasher.update(chunk)
                write(chunk)
                got += len(chunk)
        except (TimeoutError, socket.timeout):
            environ[CLOSE_KEY] = True
            raise ApiError(
                408, "body_timeout",
                f"the body did not arrive within {body_base_s:g} s plus "
                f"{BODY_MIN_BYTES_PER_S} bytes a second ({got} of {length} bytes came)",
            ) from None
        finally:
            if isinstance(sock, socket.socket):
                sock.settimeout(None)
        if got < length:
            environ[CLOSE_KEY] = True
            raise ApiError(400, "short_body", f"the body ended after {got} of {length} bytes")
        if not verify(hasher.hexdigest(), digest):
            # The signature covers the hash: a body that does not match is not authenticated.
            raise refuse(f"the body's SHA-256 is not the signed {BODY_HASH_HEADER}")

    def once(call: _Call, effect: Callable[[sqlite3.Connection], object]) -> _Answer:
        """Run a call's effect at most once per nonce, in the transaction that records it."""

        def run(conn: sqlite3.Connection) -> bytes:
            return _json_bytes(effect(conn))

        try:
            answer, replayed = storage().answer_once(
                call.request_id, call.nonce, call.stamp, call.signature, max_clock_skew_s, run
            )
        except NonceReusedError:
            raise nonce_reused(call.request_id, call.nonce) from None
        if replayed:
            logger.info("answering %s %s again from its recorded answer", call.method, call.path)
        return _signed_answer(call.auth.secret, call.signature, answer)

    def lease(call: _Call) -> _Answer:
        body = _parse_body(call)
        worker = _get_str(body, "worker", "lease")
        host = _get_str(body, "host", "lease")
        max_tasks = _get_int(body, "max_tasks", "lease", 0, MAX_TASKS_PER_CALL)
        reclaim = _get_retry(body, "lease")
        lease_s = float(call.auth.settings["lease_s"])

        def effect(conn: sqlite3.Connection) -> object:
            leases = storage().lease_in(
                conn, call.request_id, worker=worker, host=host, max_tasks=max_tasks,
                lease_s=lease_s, reclaim=reclaim, info=call.auth.info,
            )
            return _lease_payload(leases, lease_s, call.auth.state)

        return once(call, effect)

    def heartbeat(call: _Call) -> _Answer:
        body = _parse_body(call)
        worker = _get_str(body, "worker", "heartbeat")
        tokens = body.get("leases")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ApiError(400, "bad_field", "heartbeat: 'leases' must be a list of strings")
        if len(tokens) > MAX_TASKS_PER_CALL:
            raise ApiError(400, "bad_field", f"heartbeat: at most {MAX_TASKS_PER_CALL} leases")

        def effect(conn: sqlite3.Connection) -> object:
            renewed, lost = storage().renew_in(
                conn, call.request_id, _text(worker), [_text(t) for t in tokens],
                float(call.auth.settings["lease_s"]),
            )
            # Read again in the transaction: a heartbeat is how running workers hear
            # of a cancel.
            (state,) = conn.execute(
                "SELECT state FROM requests WHERE id = ?", (call.request_id,)
            ).fetchone()
            return {"renewed": renewed, "lost": lost, "cancelled": state == "cancelled"}

        return once(call, effect)

    def results(call: _Call) -> _Answer:
        body = _parse_body(call)
        worker = _get_str(body, "worker", "results")
        host = _get_str(body, "host", "results")
        max_tasks = _get_int(body, "max_tasks", "results", 0, MAX_TASKS_PER_CALL)
        reclaim = _get_retry(body, "results")
        items = body.get("results")
        if not isinstance(items, list):
            raise ApiError(400, "bad_field", "results: 'results' must be a list")
        if len(items) > MAX_TASKS_PER_CALL:
            raise ApiError(400, "bad_field", f"results: at most {MAX_TASKS_PER_CALL} per call")
        parsed = [_parse_result(item, call.auth.n_tasks, worker, host) for item in items]
        for item in parsed:
            if "blob" in item:
                digest, size = item.pop("blob")
                item["value"] = stored_blob(digest, size, f"result {item['index']}")
        lease_s = float(call.auth.settings["lease_s"])

        def effect(conn: sqlite3.Connection) -> object:
            try:
                accepted, duplicates, leases = storage().complete_and_lease_in(
                    conn, call.request_id, parsed, worker=worker, host=host,
                    max_tasks=max_tasks, lease_s=lease_s, reclaim=reclaim, info=call.auth.info,
                )
            except UnknownRequestError:
                raise ApiError(404, "unknown_request", f"no request {call.request_id}") from None
            except StorageError as exc:
                raise ApiError(404, "unknown_task", str(exc)) from None
            payload: dict[str, Any] = {"accepted": accepted, "duplicates": duplicates}
            if max_tasks > 0:
                payload.update(_lease_payload(leases, lease_s, call.auth.state))
            return payload

        return once(call, effect)

    actions: dict[str, Callable[[_Call], _Answer]] = {
        "lease": lease, "heartbeat": heartbeat, "results": results,
    }

    def carry_out(environ: dict[str, Any], path: str, request_id: int, action: str) -> _Answer:
        """Authenticate one signed POST and carry out ``action``; every failure as its answer.

        The answers are those of the Flask error handlers above, which the hot path
        does not pass through.
        """
        try:
            return actions[action](authenticate(environ, path, request_id))
        except ApiError as exc:
            return _error_answer(exc.status, exc.code, exc.message)
        except _Replayed as exc:
            return _signed_answer(exc.secret, exc.signature, exc.answer)
        except sqlite3.OperationalError as exc:
            return _busy_answer(environ, exc)
        except Exception:
            return _bug_answer(environ)
        finally:
            no_open_transaction()

    @app.get("/api/v1/health")
    def health() -> Response:
        return _json_response({"ok": True, "version": version})

    @app.get("/api/v1/requests/<int:request_id>/function")
    def function(request_id: int) -> Response:
        call = authenticate(request.environ, request.path, request_id)
        func, _ns = storage().get_function(request_id)
        settings = {key: call.auth.settings.get(key) for key in _SETTINGS_SENT}
        settings["inline_max_bytes"] = INLINE_MAX_BYTES  # larger results go as blobs
        payload = {"payload": base64.b64encode(func).decode("ascii"), "settings": settings}
        body = _json_bytes(payload)
        return _flask_response(_signed_answer(call.auth.secret, call.signature, body))

    # The worker's calls that change state. The hot path below takes them without
    # Flask; these routes answer the same calls when they come another way (a path
    # Flask normalises, or a method that gets Flask's 405).
    for action in actions:

        def route(request_id: int, action: str = action) -> Response:
            return _flask_response(carry_out(request.environ, request.path, request_id, action))

        app.add_url_rule(
            f"/api/v1/requests/<int:request_id>/{action}", action, route, methods=["POST"]
        )

    def stored_blob(digest: str, size: int, where: str) -> str:
        """Return the reference of an uploaded blob that is a pickle; 400 if it is not there."""
        try:
            ref = storage().blob_ref(digest, size)
        except StorageError as exc:
            raise ApiError(400, "missing_blob", f"{where}: {exc}") from None
        blobs = storage().blobs
        assert blobs is not None  # blob_ref found it
        with open(blobs.path(digest), "rb") as f:
            f.seek(max(size - 1, 0))
            last = f.read(1)
        if last != b".":
            raise ApiError(400, "bad_pickle", f"{where}: blob {digest} is not a pickle "
                                              "(no STOP opcode at its end)")
        return ref

    @app.put("/api/v1/requests/<int:request_id>/blobs/<digest>")
    def put_blob(request_id: int, digest: str) -> Response:
        """Store a large value streamed as the body, named by its SHA-256 (idempotent)."""
        if not _SHA256_RE.fullmatch(digest):
            raise refuse_unread(request.environ, ApiError(
                400, "bad_digest", "the path must end in the body's SHA-256 (64 lowercase hex)"
            ))
        call = authenticate(
            request.environ, request.path, request_id, read=False, limit=max_blob_bytes
        )
        if call.digest != digest:
            raise refuse_unread(request.environ, ApiError(
                400, "bad_digest", f"the signed {BODY_HASH_HEADER} is not the path's SHA-256"
            ))
        blobs = storage().blobs
        assert blobs is not None  # the server never serves an in-memory database
        started = time.monotonic()
        try:
            with blobs.writer() as f:
                stream_body(request.environ, call.length, digest, lambda reason: ApiError(
                    400, "bad_digest", f"{reason}; nothing was stored"), f.write,
                    _BLOB_CHUNK, direct=True)
                received = time.monotonic()
                blobs.commit(f, digest)
        except OSError as exc:
            logger.error("cannot store blob %s in %s: %s", digest, blobs.directory, exc)
            response = _error_response(
                507, "insufficient_storage", f"the server cannot store the blob: {exc}; retry"
            )
            response.headers["Retry-After"] = "5"
            return response
        logger.info("stored blob %s (%d bytes) for request %d: %.3f s to receive, %.3f s to "
                    "make durable", digest, call.length, request_id, received - started,
                    time.monotonic() - received)
        body = _json_bytes({"sha256": digest, "size": call.length})
        return _flask_response(_signed_answer(call.auth.secret, call.signature, body))

    @app.get("/api/v1/requests/<int:request_id>/tasks/<int:index>/args")
    def task_args(request_id: int, index: int) -> Response:
        """Stream a task's pickled argument; its SHA-256 came in the signed lease."""
        call = authenticate(request.environ, request.path, request_id)
        n_tasks = call.auth.n_tasks
        if not 1 <= index <= n_tasks:
            raise ApiError(404, "unknown_task", f"this request has tasks 1..{n_tasks}, not {index}")
        stored = storage().task_args(request_id, index)
        if not isinstance(stored, str):
            response = Response(bytes(stored), mimetype="application/octet-stream")
            response.headers[SIGNATURE_HEADER] = sign_response(
                call.auth.secret, call.signature, response.get_data()
            )
            return response
        blobs = storage().blobs
        assert blobs is not None
        digest, _size = parse_ref(stored)
        # send_file streams the file (with sendfile(2) under gunicorn, over plain HTTP); its
        # name is its SHA-256, so the answer is signed without reading it.
        response = send_file(blobs.path(digest), mimetype="application/octet-stream",
                             conditional=False, etag=False)
        response.headers[SIGNATURE_HEADER] = sign_response_digest(
            call.auth.secret, call.signature, digest
        )
        return response

    flask_app = app.wsgi_app

    def hot_path(
        environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        """Answer the workers' POSTs without Flask; everything else goes to Flask.

        Flask's request context, routing, and request and response objects cost
        about as much server CPU as the rest of a round trip's Python together
        (docs/benchmarks.rst); these three calls are nearly every round trip.
        """
        match = _HOT_PATH.fullmatch(environ.get("PATH_INFO", ""))
        if match is None or environ.get("REQUEST_METHOD") != "POST":
            return flask_app(environ, start_response)
        status, headers, body = carry_out(
            environ, match[0], int(match[1]), match[2]
        )
        start_response(_STATUS_LINES[status], headers)
        return [body]

    app.wsgi_app = hot_path  # type: ignore[method-assign]
    return app


# -- running it under gunicorn ---------------------------------------------------------

_running: set[Server] = set()
_running_lock = threading.Lock()


def _stop_all() -> None:
    with _running_lock:
        servers = list(_running)
    for server in servers:
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


def _local_address(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


class Server:
    """Serve the worker API from a gunicorn child process; start it now.

    ``port=None`` picks a free port; the socket is bound here and handed to the
    child, so the port cannot be taken in between. ``host`` is the address to listen
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
        port: int | None = None,
        password: str | None = None,
        dbfile: str | Path = "./sheepdog.sqlite",
        *,
        host: str | None = None,
        workers: int = 2,
        threads: int = 4,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_clock_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_S,
        synchronous: str = "NORMAL",
        body_base_s: float = BODY_BASE_S,
        certfile: str | Path | None = None,
        keyfile: str | Path | None = None,
        start_timeout_s: float = 30.0,
        log_level: str = "warning",
    ) -> None:
        self.port = port
        self.password = password
        self.dbfile = os.path.abspath(dbfile)
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
        if ":" in hostname and not hostname.startswith("["):
            hostname = f"[{hostname}]"
        return f"{self.scheme}://{hostname}:{self.port}"

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
            "sheepdog._serve",
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
            with _running_lock:
                _running.add(self)
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
        address = _local_address(self.host)
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
                    f"the server did not answer /api/v1/health within {self.start_timeout_s} s "
                    f"({last_error})"
                )
            conn: http.client.HTTPConnection
            timeout = min(2.0, max(remaining, 0.1))
            if self.certfile:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE  # only our own child is asked, locally
                conn = http.client.HTTPSConnection(
                    address, self.port, timeout=timeout, context=context
                )
            else:
                conn = http.client.HTTPConnection(address, self.port, timeout=timeout)
            try:
                conn.request("GET", "/api/v1/health")
                response = conn.getresponse()
                body = response.read()
                if response.status == 200 and json.loads(body).get("ok") is True:
                    return
                last_error = f"status {response.status}"
            except (OSError, ValueError, http.client.HTTPException) as exc:
                last_error = str(exc) or type(exc).__name__
            finally:
                conn.close()
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
        with _running_lock:
            _running.discard(self)
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


_registry: dict[int, Server] = {}
_default_port: int | None = None
_registry_lock = threading.Lock()


def get_server(
    port: int | None = None,
    password: str | None = None,
    dbfile: str | Path = "./sheepdog.sqlite",
    **options: Any,
) -> Server:
    """Return the running server on ``port``, starting one if needed.

    One server per port: asking again for the same port reuses it (restarting
    it if its process died), and raises RuntimeError if ``dbfile`` or
    ``password`` differ. ``port=None`` starts a server on a random port the
    first time, and returns that same server on later ``None`` calls.
    ``options`` go to ``Server`` when one is started.
    """
    global _default_port
    with _registry_lock:
        key = _default_port if port is None else port
        server = None if key is None else _registry.get(key)
        if server is not None and server.stopped:
            _registry.pop(server.port or 0, None)
            server = None
        if server is not None:
            if server.dbfile != os.path.abspath(dbfile):
                raise RuntimeError(
                    f"the server on port {server.port} uses {server.dbfile}, not "
                    f"{os.path.abspath(dbfile)}; use another port for another database"
                )
            if server.password != password:
                raise RuntimeError(
                    f"the server on port {server.port} was started with another password"
                )
            if not server.alive:
                server.restart()
            return server
        server = Server(key, password, dbfile, **options)
        assert server.port is not None
        _registry[server.port] = server
        if port is None:
            _default_port = server.port
        return server


def _servers() -> dict[int, Server]:
    """Return the registry (for tests)."""
    return _registry

