"""Migrate a Sheepdog 0.2.3 database into sheepdog's schema, in place.

Both versions default to ``./sheepdog.sqlite``, so a 0.2.3 user's first
``map()`` after upgrading opens their old database. :class:`~sheepdog.Storage`
then copies it beside itself (:func:`backup`), and the schema-1 migration step
moves the old rows into our tables (:func:`set_aside` before the schema is
created, :func:`copy_into_schema` after), keeping every request id:

* each 0.2.3 request becomes a request of ours (label ``"Sheepdog 0.2.3"``)
  with a fresh secret; its function and namespace blobs are kept as they were
  (no worker of ours can run them);
* 0.2.3 stored arguments and results base64-encoded
  (``serialisation.serialise_pickle``); they are decoded to the plain pickles
  we store, so ``get_results`` reads them;
* a task with a result is ``done``; one with an error is ``error``, its text
  (the remote traceback) kept whole; a task with neither never finished under
  0.2.3 and cannot run now, so it becomes an ``error`` of kind ``migrated``.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import json
import os
import re
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Any

from .states import FailureKind

__all__ = ["LABEL", "backup", "copy_into_schema", "is_original", "set_aside"]

#: The label migrated requests get (``sheepdog requests`` shows it).
LABEL = "Sheepdog 0.2.3"

_TABLES = ("requests", "tasks", "results", "errors")
_OLD = "sheepdog02_"
_REQUEST_COLUMNS = {"id", "function", "namespace", "date_submitted"}
_TYPE_LINE = re.compile(r"^([A-Za-z_][\w.]*)(?::\s?(.*))?$")


def is_original(conn: sqlite3.Connection) -> bool:
    """Whether the database has Sheepdog 0.2.3's tables (and so needs migrating)."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not set(_TABLES) <= tables:
        return False
    columns = {r[1] for r in conn.execute("PRAGMA table_info(requests)")}
    return _REQUEST_COLUMNS <= columns


def backup(conn: sqlite3.Connection, dbfile: str) -> Path:
    """Copy the database to a new file beside it (never over an old copy); return its path."""
    base = f"{dbfile}.sheepdog-0.2.3-backup"
    path, n = Path(base), 1
    while True:
        try:
            # Created empty and private first (O_EXCL: never over another copy), as the
            # copy holds the user's arguments and results.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            break
        except FileExistsError:
            path, n = Path(f"{base}.{n}"), n + 1
    target = sqlite3.connect(str(path))
    try:
        conn.backup(target)
    finally:
        target.close()
    return path


def set_aside(conn: sqlite3.Connection) -> None:
    """Rename 0.2.3's tables out of the way of ours (inside the migration's transaction)."""
    for table in _TABLES:
        conn.execute(f"ALTER TABLE {table} RENAME TO {_OLD}{table}")


def copy_into_schema(conn: sqlite3.Connection, default_settings: dict[str, Any]) -> int:
    """Copy the set-aside 0.2.3 rows into our tables, drop the old ones; return the requests."""
    settings = json.dumps(default_settings)
    # 0.2.3 had no indices: without these the lookups below scan whole tables per task.
    conn.execute(f"CREATE INDEX {_OLD}results_by_task ON {_OLD}results (task_id, id)")
    conn.execute(f"CREATE INDEX {_OLD}errors_by_task ON {_OLD}errors (task_id, id)")
    conn.execute(f"CREATE INDEX {_OLD}tasks_by_index ON {_OLD}tasks (request_id, job_index, id)")
    requests = conn.execute(
        f"SELECT id, function, namespace, date_submitted FROM {_OLD}requests ORDER BY id"  # noqa: S608 - fixed SQL, bound values
    ).fetchall()
    for request_id, function, namespace, submitted in requests:
        tasks = conn.execute(
            f"SELECT t.job_index, t.args,"  # noqa: S608 - fixed SQL, bound values
            f" (SELECT r.result FROM {_OLD}results r WHERE r.task_id = t.id ORDER BY r.id LIMIT 1),"
            f" (SELECT e.error FROM {_OLD}errors e WHERE e.task_id = t.id ORDER BY e.id LIMIT 1)"
            f" FROM {_OLD}tasks t WHERE t.request_id = ? AND t.job_index >= 1"
            # 0.2.3 never wrote two tasks with one index; if a hand did, the first wins.
            f" AND t.id = (SELECT min(u.id) FROM {_OLD}tasks u"
            f" WHERE u.request_id = t.request_id AND u.job_index = t.job_index)"
            " ORDER BY t.job_index",
            (request_id,),
        ).fetchall()
        n_tasks = max((int(t[0]) for t in tasks), default=0)
        conn.execute(
            "INSERT INTO requests (id, created, func, ns, secret, n_tasks, settings, label)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (request_id, _created(submitted), _blob(function), _blob(namespace),
             secrets.token_hex(32), n_tasks, settings, LABEL),
        )
        for job_index, args, result, error in tasks:
            if result is not None:
                state, value, text = "done", _decoded(result), None
            elif error is not None:
                state, value, text = "error", None, json.dumps(error_dict(str(error)))
            else:
                state, value, text = "error", None, json.dumps(_never_finished(job_index))
            conn.execute(
                "INSERT INTO tasks (request_id, idx, args, state, result, error, finished)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (request_id, job_index, _decoded(args), state, value, text,
                 _created(submitted)),
            )
    # Children first: the old tables reference each other.
    for table in reversed(_TABLES):
        conn.execute(f"DROP TABLE {_OLD}{table}")
    return len(requests)


def error_dict(text: str) -> dict[str, Any]:
    """Our error dict for 0.2.3's error text (a traceback), the text kept whole."""
    last = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")
    match = _TYPE_LINE.match(last)
    if match and (match.group(2) is not None or "." not in last):
        type_name, message = match.group(1), match.group(2) or ""
    else:
        type_name, message = "Error", last
    return {"type": type_name, "message": message, "traceback": text, "kind": FailureKind.EXCEPTION}


def _never_finished(job_index: int) -> dict[str, Any]:
    return {
        "type": "NotRun",
        "message": (
            f"task {job_index} had no result when this Sheepdog 0.2.3 database was upgraded; "
            "its function cannot run on this sheepdog's workers: map it again"
        ),
        "traceback": "",
        "kind": FailureKind.MIGRATED,
    }


def _blob(value: object) -> bytes:
    if value is None:
        return b""
    if isinstance(value, str):  # a TEXT value, stored by hand
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return str(value).encode("utf-8")  # an INTEGER or REAL where a blob belonged


def _decoded(value: object) -> bytes:
    """0.2.3's base64 blob as the plain bytes we store; anything else as it is."""
    raw = _blob(value)
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        return raw  # stored through Storage by hand, not by serialise_pickle


def _created(date: object) -> float:
    """0.2.3's ``date('now')`` (UTC, a day) as unix time; now if it is missing or odd."""
    try:
        return float(calendar.timegm(time.strptime(str(date), "%Y-%m-%d")))
    except ValueError:
        return time.time()
