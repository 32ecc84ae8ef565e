"""Build the worker-facing WSGI app of docs/protocol.rst: :func:`create_app`.

Wiring only: the routes are the Blueprint of :mod:`.routes`, the rules they
share are :mod:`.calls`, and the workers' ``lease``, ``heartbeat`` and
``results`` calls are answered by the WSGI hot path in front of Flask
(:mod:`.hot_path`). Every call under ``/api/v1/requests/<id>/`` is
authenticated with that request's secret before its body is read, and each
``POST`` is carried out once per nonce.
"""

from __future__ import annotations

import functools
import sqlite3
from pathlib import Path
from typing import Any, Callable

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from sheepdog.store import DEFAULT_DBFILE, Storage

from .calls import EXTENSION, AppState, Connections, answer_for, return_storage, run_here
from .hot_path import HotPath
from .protocol import (
    BODY_BASE_S,
    DEFAULT_MAX_BLOB_BYTES,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CLOCK_SKEW_S,
    ApiError,
    _Replayed,
)
from .routes import bp, error_response, flask_response

__all__ = [
    "create_app",
]


def create_app(
    dbfile: str | Path = DEFAULT_DBFILE,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_clock_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_S,
    synchronous: str = "NORMAL",
    body_base_s: float = BODY_BASE_S,
    max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
    offload: Callable[[Callable[[], Any]], Any] = run_here,
    offload_sqlite: Callable[[Callable[[], Any]], Any] = run_here,
) -> Flask:
    """Build the worker-facing WSGI app on ``dbfile`` (created or migrated now).

    A signed call's body must arrive within ``body_base_s`` plus its length at
    ``BODY_MIN_BYTES_PER_S``, or the call gets a 408 and its connection is closed.
    A JSON body may hold ``max_body_bytes``; an uploaded blob ``max_blob_bytes``.
    ``offload`` runs each fsync and blocking file call, ``offload_sqlite`` each
    SQLite call (default: where it is called; the gevent worker passes its
    thread pool, and for SQLite its event loop unless the call would wait for a
    lock, so that no connection waits on another's call).
    """
    dbfile = str(dbfile)
    with Storage(dbfile, synchronous=synchronous) as db:
        if db.blobs is not None:
            db.blobs.remove_stale_uploads()  # left by a server that died mid-upload
    app = Flask("sheepdog.server")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    open_storage = functools.partial(Storage, dbfile, init=False, synchronous=synchronous)
    app.extensions[EXTENSION] = AppState(
        max_body_bytes=max_body_bytes,
        max_blob_bytes=max_blob_bytes,
        max_clock_skew_s=max_clock_skew_s,
        body_base_s=body_base_s,
        connections=Connections(open_storage),
        offload=offload,
        offload_sqlite=offload_sqlite,
    )
    app.teardown_appcontext(return_storage)
    app.register_blueprint(bp)
    for handled in (ApiError, _Replayed, sqlite3.OperationalError, Exception):
        app.register_error_handler(handled, _answer_error)
    app.register_error_handler(HTTPException, _http_error)
    app.wsgi_app = HotPath(app, app.wsgi_app)  # type: ignore[method-assign]
    return app


def _answer_error(exc: Exception) -> Response:
    """Answer a failed call as the hot path would (:func:`.calls.answer_for`)."""
    return flask_response(answer_for(exc, request.environ))


def _http_error(exc: HTTPException) -> Response:
    """Flask's own refusals (404, 405, 413...) as the protocol's JSON error."""
    status = exc.code or 400
    code = (exc.name or "error").lower().replace(" ", "_")
    response = error_response(status, code, exc.description or code)
    for name, value in exc.get_headers():
        if name.lower() == "allow":
            response.headers[name] = value
    return response
