"""The worker-facing WSGI app: :func:`create_app` and the routes of docs/protocol.rst.

Every call under ``/api/v1/requests/<id>/`` is authenticated with that
request's secret before its body is read, and each ``POST`` is carried out
once per nonce. The workers' ``lease``, ``heartbeat`` and ``results`` calls
are answered by a plain WSGI function in front of Flask (``hot_path``).
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable

from flask import Flask, Response, request, send_file
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES

from sheepdog._version import __version__
from sheepdog.blobs import INLINE_MAX_BYTES, parse_ref
from sheepdog.errors import StorageError, UnknownRequestError
from sheepdog.server.auth import (
    BODY_HASH_HEADER,
    NONCE_HEADER,
    SIGNATURE_HEADER,
    TIME_HEADER,
    sign_request,
    sign_response,
    sign_response_digest,
    verify,
)
from sheepdog.store import NonceReusedError, Storage

from .protocol import (
    _BLOB_CHUNK,
    _BODY_CHUNK,
    _LENGTH_RE,
    _MAX_SQLITE_INT,
    _NONCE_RE,
    _SETTINGS_SENT,
    _SHA256_RE,
    _TIME_RE,
    BODY_BASE_S,
    BODY_MIN_BYTES_PER_S,
    CLOSE_KEY,
    DEFAULT_MAX_BLOB_BYTES,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CLOCK_SKEW_S,
    MAX_TASKS_PER_CALL,
    ApiError,
    _Answer,
    _answer,
    _bug_answer,
    _busy_answer,
    _Call,
    _error_answer,
    _get_int,
    _get_retry,
    _get_str,
    _json_bytes,
    _lease_payload,
    _parse_body,
    _Replayed,
    _signed_answer,
    _text,
    parse_result,
)

__all__ = [
    "create_app",
]

# The server package logs under one name, the one it had as a module.
logger = logging.getLogger("sheepdog.server")


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


def _flask_response(answer: _Answer) -> Response:
    status, headers, body = answer
    return Response(body, status=status, headers=headers)


def _json_response(payload: object, status: int = 200) -> Response:
    return _flask_response(_answer(status, _json_bytes(payload)))


def _error_response(status: int, code: str, message: str) -> Response:
    return _flask_response(_error_answer(status, code, message))


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
        parsed = [parse_result(item, call.auth.n_tasks, worker, host) for item in items]
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
