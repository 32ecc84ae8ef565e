"""The worker protocol's wire format: its limits, parsing and validation, its answers.

What docs/protocol.rst says a call may hold and what it gets back: the
fields of a call's JSON body checked one by one (a bad one is a 4xx
:class:`ApiError` naming the field and what it must be), pickles checked
without unpickling, and the JSON answers the app sends. No Flask here.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import pickletools
import re
import sqlite3
from dataclasses import dataclass
from typing import Any

from sheepdog.blobs import parse_ref
from sheepdog.server.auth import (
    SIGNATURE_HEADER,
    sign_response,
)
from sheepdog.store import CallAuth, FailureKind, Lease, RequestState

__all__ = [
    "BODY_BASE_S",
    "BODY_MIN_BYTES_PER_S",
    "CLOSE_KEY",
    "DEFAULT_MAX_BLOB_BYTES",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_CLOCK_SKEW_S",
    "MAX_TASKS_PER_CALL",
    "MAX_MODULES",
    "ApiError",
    "parse_environment",
    "parse_result",
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
#: WSGI environ key asking the gunicorn worker (:mod:`.child`) to close the connection
#: without draining it.
CLOSE_KEY = "sheepdog.close_connection"

_SETTINGS_SENT = ("lease_s", "heartbeat_s", "task_timeout_s", "batch", "capture_bytes",
                  "tasks_per_worker")


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


#: At most this many modules in a worker's ``environment`` (the stub's MAX_MODULES).
MAX_MODULES = 100
_NAME_MAX = 200


def parse_environment(body: dict[str, Any], where: str) -> dict[str, Any] | None:
    """A lease's optional ``environment``: the worker's Python and its modules' versions.

    ``{"python": str, "modules": {name: [imports (bool), version or why not (str or
    null)]}}``; None when the call has none.
    """
    env = body.get("environment")
    if env is None:
        return None
    bad = ApiError(400, "bad_field", f"{where}: 'environment' must be {{'python': str, "
                   f"'modules': {{name: [bool, str or null]}}}} with at most {MAX_MODULES} "
                   f"modules and strings of at most {_NAME_MAX} characters")
    if not isinstance(env, dict) or not isinstance(env.get("modules"), dict):
        raise bad
    python, modules = env.get("python"), env["modules"]
    if not isinstance(python, str) or len(python) > _NAME_MAX or len(modules) > MAX_MODULES:
        raise bad
    parsed: dict[str, list[Any]] = {}
    for name, value in modules.items():
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], bool)
                and (value[1] is None or isinstance(value[1], str))
                and len(name) <= _NAME_MAX and len(value[1] or "") <= _NAME_MAX):
            raise bad
        parsed[_text(name)] = [value[0], None if value[1] is None else _text(value[1])]
    return {"python": _text(python), "modules": parsed}


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


def parse_result(item: object, n_tasks: int, worker: str, host: str) -> dict[str, Any]:
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
        # Its run is checked against the task's (a result of an earlier run is not taken).
        "lease": lease,
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
            "kind": _get_str(error, "kind", where, FailureKind.EXCEPTION),
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


def _lease_payload(leases: list[Lease], lease_s: float, request_state: str) -> dict[str, Any]:
    if request_state == RequestState.CANCELLED:
        state = "cancelled"
    else:
        state = "open" if leases else "drained"
    return {
        "tasks": [_task_payload(lease) for lease in leases],
        "lease_s": lease_s,
        "state": state,
    }
