"""The worker API's routes (docs/protocol.rst) as a Flask Blueprint, ``bp``.

The workers' ``lease``, ``heartbeat`` and ``results`` calls are nearly always
answered by the hot path in front of Flask (:mod:`.hot_path`); their routes
here answer the same calls, with the same :func:`.calls.carry_out`, when they
come another way (a path Flask normalises, or a method that gets Flask's 405).
"""

from __future__ import annotations

import base64
import logging
import time

from flask import Blueprint, Response, request, send_file

from sheepdog.blobs import INLINE_MAX_BYTES, parse_ref
from sheepdog.server.auth import (
    BODY_HASH_HEADER,
    SIGNATURE_HEADER,
    sign_response,
    sign_response_digest,
)
from sheepdog.version import __version__

from .body import refuse_unread, stream_body
from .calls import ACTIONS, _once, authenticate, blocking, carry_out, sqlite, state, storage
from .protocol import (
    _BLOB_CHUNK,
    _SETTINGS_SENT,
    _SHA256_RE,
    ApiError,
    _Answer,
    _answer,
    _error_answer,
    _json_bytes,
    _signed_answer,
)

__all__ = ["bp", "error_response", "flask_response"]

# The server package logs under one name, the one it had as a module.
logger = logging.getLogger("sheepdog.server")

bp = Blueprint("api", __name__, url_prefix="/api/v1")


def flask_response(answer: _Answer) -> Response:
    """A Flask response carrying an answer as the hot path sends it."""
    status, headers, body = answer
    return Response(body, status=status, headers=headers)


def error_response(status: int, code: str, message: str) -> Response:
    """The JSON error answer ``{"error": {"code", "message"}}`` as a Flask response."""
    return flask_response(_error_answer(status, code, message))


@bp.get("/health")
def health() -> Response:
    """Say the server is up, and its version; unsigned."""
    return flask_response(_answer(200, _json_bytes({"ok": True, "version": __version__})))


@bp.get("/requests/<int:request_id>/function")
def function(request_id: int) -> Response:
    """Send the request's pickled function and the settings the worker runs with."""
    call = authenticate(request.environ, request.path, request_id)
    db = storage()
    func, _ns = sqlite(lambda: db.get_function(request_id))
    settings = {key: call.auth.settings.get(key) for key in _SETTINGS_SENT}
    settings["inline_max_bytes"] = INLINE_MAX_BYTES  # larger results go as blobs
    payload = {"payload": base64.b64encode(func).decode("ascii"), "settings": settings}
    body = _json_bytes(payload)
    return flask_response(_signed_answer(call.auth.secret, call.signature, body))


for _action in ACTIONS:

    def _route(request_id: int, action: str = _action) -> Response:
        return flask_response(carry_out(request.environ, request.path, request_id, action))

    bp.add_url_rule(
        f"/requests/<int:request_id>/{_action}", _action, _route, methods=["POST"]
    )


@bp.put("/requests/<int:request_id>/blobs/<digest>")
def put_blob(request_id: int, digest: str) -> Response:
    """Store a large value streamed as the body, named by its SHA-256 (idempotent)."""
    if not _SHA256_RE.fullmatch(digest):
        raise refuse_unread(request.environ, ApiError(
            400, "bad_digest", "the path must end in the body's SHA-256 (64 lowercase hex)"
        ))
    call = authenticate(
        request.environ, request.path, request_id, read=False, limit=state().max_blob_bytes
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
                _BLOB_CHUNK, direct=True, body_base_s=state().body_base_s)
            received = time.monotonic()
            blocking(lambda: blobs.commit(f, digest))  # fsyncs
    except OSError as exc:
        logger.error("cannot store blob %s in %s: %s", digest, blobs.directory, exc)
        response = error_response(
            507, "insufficient_storage", f"the server cannot store the blob: {exc}; retry"
        )
        response.headers["Retry-After"] = "5"
        return response
    logger.info("stored blob %s (%d bytes) for request %d: %.3f s to receive, %.3f s to "
                "make durable", digest, call.length, request_id, received - started,
                time.monotonic() - received)
    # Recorded with its nonce, as every POST: a replay of the upload is answered from the
    # record without its body being read, and the connection is closed.
    return flask_response(_once(call, lambda conn: {"sha256": digest, "size": call.length}))


@bp.get("/requests/<int:request_id>/tasks/<int:index>/args")
def task_args(request_id: int, index: int) -> Response:
    """Stream a task's pickled argument; its SHA-256 came in the signed lease."""
    call = authenticate(request.environ, request.path, request_id)
    n_tasks = call.auth.n_tasks
    if not 1 <= index <= n_tasks:
        raise ApiError(404, "unknown_task", f"this request has tasks 1..{n_tasks}, not {index}")
    db = storage()
    stored = sqlite(lambda: db.task_args(request_id, index))
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
