"""Carry out the workers' signed calls: authenticate, read the body, apply the effect once.

The rules of docs/protocol.rst written once, for both ways a call arrives: the
Blueprint's routes (:mod:`.routes`) and the WSGI hot path in front of Flask
(:mod:`.hot_path`). The settings are the :class:`AppState` registered on the
app (:func:`state`), and the SQLite connection is the request's own
(:func:`storage`): a route finds both through Flask's app context (the
connection on ``flask.g``), the hot path through the :class:`Scope` it opens,
which costs a fraction of an app context.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from flask import current_app, g

from sheepdog.errors import StorageError, UnknownRequestError
from sheepdog.server.auth import (
    BODY_HASH_HEADER,
    NONCE_HEADER,
    SIGNATURE_HEADER,
    TIME_HEADER,
    sign_request,
    verify,
)
from sheepdog.store import NonceReusedError, RequestState, Storage

from .body import TRANSFER_ENCODING_KEY, Environ, environ_key, read_body, refuse_unread
from .protocol import (
    _LENGTH_RE,
    _MAX_SQLITE_INT,
    _NONCE_RE,
    _SHA256_RE,
    _TIME_RE,
    CLOSE_KEY,
    MAX_TASKS_PER_CALL,
    ApiError,
    _Answer,
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
    parse_environment,
    parse_result,
)

__all__ = [
    "ACTIONS",
    "EXTENSION",
    "AppState",
    "Connections",
    "Scope",
    "answer_for",
    "authenticate",
    "blocking",
    "carry_out",
    "return_storage",
    "run_here",
    "scope",
    "state",
    "storage",
    "stored_blob",
]

# The server package logs under one name, the one it had as a module.
logger = logging.getLogger("sheepdog.server")

_SIGNATURE_KEY = environ_key(SIGNATURE_HEADER)
_TIME_KEY = environ_key(TIME_HEADER)
_NONCE_KEY = environ_key(NONCE_HEADER)
_BODY_HASH_KEY = environ_key(BODY_HASH_HEADER)

T = TypeVar("T")

#: The key of the app's :class:`AppState` in ``app.extensions``.
EXTENSION = "sheepdog"


class Connections:
    """Open Storage connections to one database, each lent to one request at a time.

    A connection goes back to the pool when its request ends and is lent again.
    flaskr opens one per request, but opening a Storage costs about 0.34 ms (its
    pragmas, the write queue's file) against about 0.8 ms of server CPU for a whole
    round trip, and a kept connection keeps SQLite's prepared statements (measured
    about a third faster per round trip). Every write is its own committed
    transaction, so nothing carries over between requests.
    """

    def __init__(self, open_storage: Callable[[], Storage]) -> None:
        self._open = open_storage
        # A list: append and pop are atomic, and the most recently used comes first.
        self._idle: list[Storage] = []

    def borrow(self) -> Storage:
        """An idle connection, or a new one if every one is lent."""
        db = self.borrow_idle()
        return self._open() if db is None else db

    def borrow_idle(self) -> Storage | None:
        """An idle connection, or None if every one is lent (no SQLite call: it never waits)."""
        try:
            return self._idle.pop()
        except IndexError:
            return None

    def give_back(self, db: Storage) -> None:
        """Take back a lent connection, without any transaction it left open."""
        if db.conn.in_transaction:
            # Only a bug can get here; never let a later request inherit its transaction.
            db.conn.rollback()
        self._idle.append(db)


def run_here(call: Callable[[], T]) -> T:
    """Run ``call`` now, in this thread: the offload of an app not under gevent."""
    return call()


@dataclass(frozen=True)
class AppState:
    """What create_app was given, as the calls read it: limits, timings and the database."""

    max_body_bytes: int
    max_blob_bytes: int
    max_clock_skew_s: float
    body_base_s: float
    connections: Connections
    #: Runs a blocking call (SQLite, fsync) where it holds up no other connection:
    #: the gevent worker's thread pool (``sheepdog.server.child``); by default, right here.
    offload: Callable[[Callable[[], Any]], Any] = run_here
    #: Runs an SQLite call: the gevent worker runs it in its event loop unless it would
    #: wait for a lock, and only then in the pool (``sheepdog.server.child``).
    offload_sqlite: Callable[[Callable[[], Any]], Any] = run_here


def blocking(call: Callable[[], T]) -> T:
    """Run ``call`` (a file's fsync, disk I/O) through the app's ``offload``; return its result."""
    result: T = state().offload(call)
    return result


def sqlite(call: Callable[[], T]) -> T:
    """Run ``call``, SQLite calls only, through the app's ``offload_sqlite``; return its result."""
    result: T = state().offload_sqlite(call)
    return result


class Scope:
    """One hot-path call's settings and, once borrowed, its Storage: its app context's part."""

    __slots__ = ("db", "settings")

    def __init__(self, settings: AppState) -> None:
        self.settings = settings
        self.db: Storage | None = None


#: The hot path's call in this greenlet (or thread), if any: see :func:`scope`.
_SCOPE: ContextVar[Scope | None] = ContextVar("sheepdog_server_scope", default=None)


@contextmanager
def scope(settings: AppState) -> Iterator[Scope]:
    """Carry out one call here with ``settings``, without Flask's app context.

    :func:`state` and :func:`storage` find what they need in the scope; its
    Storage goes back to the connections when the block ends. A blocking call
    handed to a pool thread runs in a copy of this context, so finds it too.
    """
    here = Scope(settings)
    token = _SCOPE.set(here)
    try:
        yield here
    finally:
        _SCOPE.reset(token)
        if here.db is not None:
            db, here.db = here.db, None
            settings.connections.give_back(db)


def state() -> AppState:
    """The current call's :class:`AppState`: its scope's, else the current app's."""
    here = _SCOPE.get()
    if here is not None:
        return here.settings
    found: AppState = current_app.extensions[EXTENSION]
    return found


def storage() -> Storage:
    """This call's Storage, borrowed on first use and given back when the call ends.

    On the hot path it is kept on the call's :class:`Scope`, on a route on
    ``g`` (given back at teardown).
    """
    here = _SCOPE.get()
    if here is not None:
        if here.db is None:
            here.db = _borrow(here.settings.connections)
        return here.db
    db: Storage | None = g.get("storage")
    if db is None:
        db = g.storage = _borrow(state().connections)
    return db


def _borrow(connections: Connections) -> Storage:
    """An idle connection as it is; a new one through ``sqlite`` (its pragmas may wait)."""
    idle = connections.borrow_idle()
    return sqlite(connections.borrow) if idle is None else idle


def return_storage(exc: BaseException | None) -> None:
    """Give the request's Storage back to the app's connections (a teardown function)."""
    db: Storage | None = g.pop("storage", None)
    if db is not None:
        state().connections.give_back(db)


def authenticate(
    environ: Environ, path: str, request_id: int, *, read: bool = True,
    limit: int | None = None,
) -> _Call:
    """Check the call's signed headers, then read and check its body (unless ``read`` is off).

    Nothing is read from the body before the headers' signature checks out,
    and a call whose nonce was seen before is answered without reading it.
    With ``read=False`` the caller streams the body with ``body.stream_body``.
    ``limit`` bounds the body's length (default: the app's ``max_body_bytes``).
    """
    settings = state()
    if limit is None:
        limit = settings.max_body_bytes
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
    max_clock_skew_s = settings.max_clock_skew_s
    if skew > max_clock_skew_s:
        raise refuse(
            f"{TIME_HEADER} is {skew:.0f} s away from the server's clock "
            f"(at most {max_clock_skew_s:.0f} s allowed); check the clocks"
        )
    if environ.get(TRANSFER_ENCODING_KEY):
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
        kind = "max_body_bytes" if limit == settings.max_body_bytes else "max_blob_bytes"
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
        db = storage()
        auth = sqlite(lambda: db.call_auth(request_id, None if method == "GET" else nonce))
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
                raise refuse_unread(environ, _nonce_reused(request_id, nonce))
            # A retry of a call whose answer was lost, or a replay: the body is
            # bound to the signature, so it need not be read to know the answer.
            logger.info("answering %s %s again from its recorded answer", method, path)
            if length:
                environ[CLOSE_KEY] = True
            raise _Replayed(secret, signature, seen[1])
    body = b""
    if read:
        body = read_body(environ, length, digest, refuse, body_base_s=settings.body_base_s)
    return _Call(
        request_id, auth, signature, nonce, int(stamp), body, method, path, length, digest
    )


def _nonce_reused(request_id: int, nonce: str) -> ApiError:
    return ApiError(
        409, "nonce_reused",
        f"{NONCE_HEADER} {nonce} was already used by another call of request "
        f"{request_id}; use a fresh nonce for every call",
    )


def _once(call: _Call, effect: Callable[[sqlite3.Connection], object]) -> _Answer:
    """Run a call's effect at most once per nonce, in the transaction that records it."""

    def run(conn: sqlite3.Connection) -> bytes:
        return _json_bytes(effect(conn))

    db = storage()
    max_clock_skew_s = state().max_clock_skew_s
    try:
        # The transaction and its commit (durable before the answer goes) in the pool.
        answer, replayed = sqlite(lambda: db.answer_once(
            call.request_id, call.nonce, call.stamp, call.signature, max_clock_skew_s, run,
        ))
    except NonceReusedError:
        raise _nonce_reused(call.request_id, call.nonce) from None
    if replayed:
        logger.info("answering %s %s again from its recorded answer", call.method, call.path)
    return _signed_answer(call.auth.secret, call.signature, answer)


def _lease(call: _Call) -> _Answer:
    body = _parse_body(call)
    worker = _get_str(body, "worker", "lease")
    host = _get_str(body, "host", "lease")
    max_tasks = _get_int(body, "max_tasks", "lease", 0, MAX_TASKS_PER_CALL)
    reclaim = _get_retry(body, "lease")
    environment = parse_environment(body, "lease")
    lease_s = float(call.auth.settings["lease_s"])

    def effect(conn: sqlite3.Connection) -> object:
        if environment is not None:
            storage().record_environment_in(conn, call.request_id, worker, host, environment)
        leases = storage().lease_in(
            conn, call.request_id, worker=worker, host=host, max_tasks=max_tasks,
            lease_s=lease_s, reclaim=reclaim, info=call.auth.info,
        )
        return _lease_payload(leases, lease_s, call.auth.state)

    return _once(call, effect)


def _heartbeat(call: _Call) -> _Answer:
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
        (request_state,) = conn.execute(
            "SELECT state FROM requests WHERE id = ?", (call.request_id,)
        ).fetchone()
        cancelled = request_state == RequestState.CANCELLED
        return {"renewed": renewed, "lost": lost, "cancelled": cancelled}

    return _once(call, effect)


def _results(call: _Call) -> _Answer:
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

    return _once(call, effect)


#: The workers' calls that change state, by the last segment of their path.
ACTIONS: dict[str, Callable[[_Call], _Answer]] = {
    "lease": _lease, "heartbeat": _heartbeat, "results": _results,
}


def answer_for(exc: Exception, environ: Environ) -> _Answer:
    """The answer to a call that raised ``exc``, for the hot path and Flask's error handlers.

    Call it while ``exc`` is being handled: a bug's traceback is logged from there.
    """
    if isinstance(exc, ApiError):
        return _error_answer(exc.status, exc.code, exc.message)
    if isinstance(exc, _Replayed):
        return _signed_answer(exc.secret, exc.signature, exc.answer)
    if isinstance(exc, sqlite3.OperationalError):
        return _busy_answer(environ, exc)
    return _bug_answer(environ)


def carry_out(environ: Environ, path: str, request_id: int, action: str) -> _Answer:
    """Authenticate one signed POST and carry out ``action``; every failure as its answer."""
    try:
        return ACTIONS[action](authenticate(environ, path, request_id))
    except Exception as exc:  # noqa: BLE001 - every failure becomes an answer
        return answer_for(exc, environ)


def stored_blob(digest: str, size: int, where: str) -> str:
    """Return the reference of an uploaded blob that is a pickle; 400 if it is not there."""
    storage()  # borrowed here, for the pool thread to find on g or the scope
    return blocking(lambda: _stored_blob(digest, size, where))


def _stored_blob(digest: str, size: int, where: str) -> str:
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
