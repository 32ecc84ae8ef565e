"""Tasks as the library reads them: counts, states, results and errors, and what finished.

Part of :class:`~sheepdog.store.records.Records`.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import UnknownTaskError
from .db import OPEN_STATES_SQL, Database
from .states import OPEN_STATES, FailureKind, TaskState

__all__ = ["ERROR_GROUP_INDICES", "ERROR_KIND_SQL", "TaskReads", "error_text"]

#: How many task indices :meth:`TaskReads.error_groups` names per group.
ERROR_GROUP_INDICES = 50

#: A failed or cancelled task's error kind; NULL for the others (SQL over a ``tasks`` row).
ERROR_KIND_SQL = (
    "CASE WHEN state IN ('error', 'cancelled') THEN CASE WHEN json_valid(error) THEN"
    " coalesce(json_extract(error, '$.kind'), 'exception') ELSE 'exception' END END"
)


def _load_error(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {"type": "Error", "message": text, "traceback": ""}
    return value if isinstance(value, dict) else {"type": "Error", "message": str(value)}


def error_text(error: dict[str, Any]) -> str:
    """The text of a stored error dict: its traceback, else ``"Type: message"``."""
    traceback = str(error.get("traceback") or "")
    if traceback.strip():
        return traceback
    return f"{error.get('type') or 'Error'}: {error.get('message') or ''}"


class TaskReads(Database):
    """Read a request's tasks: counts, states, arguments, results, errors and history."""

    def task_args(self, request_id: int, job_index: int) -> bytes | str:
        """Return task ``job_index``'s stored argument: inline bytes or a blob reference."""
        with self._lock:
            row = self.conn.execute(
                "SELECT args FROM tasks WHERE request_id = ? AND idx = ?", (request_id, job_index)
            ).fetchone()
        if row is None:
            self._check_task(request_id, job_index)
        stored: bytes | str = row[0]
        return stored

    def _count(self, request_id: int, states: tuple[str, ...]) -> int:
        marks = ", ".join("?" * len(states))
        with self._lock:
            (count,) = self.conn.execute(
                f"SELECT count(*) FROM tasks WHERE request_id = ? AND state IN ({marks})",  # noqa: S608 - fixed SQL, bound values
                (request_id, *states),
            ).fetchone()
        if count == 0:
            self._request_row(request_id, "id")
        return int(count)

    def count_tasks(self, request_id: int) -> int:
        """Return the number of tasks in the request."""
        return int(self._request_row(request_id, "n_tasks")[0])

    def task_counts(self, request_id: int) -> dict[str, int]:
        """Return the number of tasks in each state, every state present."""
        self._request_row(request_id, "id")
        # Keyed by the plain words, as the rows give them (and repr and pickle show them).
        counts = dict.fromkeys((state.value for state in TaskState), 0)
        with self._lock:
            for state, count in self.conn.execute(
                "SELECT state, count(*) FROM tasks WHERE request_id = ? GROUP BY state",
                (request_id,),
            ):
                counts[state] = int(count)
        return counts

    def running_indices(self, request_id: int) -> set[int]:
        """The tasks that workers run now: one per worker holding leases.

        A worker leases a batch and runs it in index order, so its lowest leased task
        is the one it runs (or has just finished, its result not yet posted); the
        rest of its batch waits, as pending tasks do.
        """
        with self._lock:
            rows = self.conn.execute(
                "SELECT min(idx) FROM tasks WHERE request_id = ? AND state = 'leased'"
                " GROUP BY worker, host",
                (request_id,),
            ).fetchall()
        return {int(idx) for (idx,) in rows}

    def get_task_errors(self, request_id: int) -> list[tuple[int, bytes, dict[str, Any]]]:
        """Return ``(index, args, error dict)`` for every failed or cancelled task.

        The dict holds the worker's ``type``, ``message``, ``traceback``, ``host``,
        ``python`` and ``kind`` (``exception``, ``lost``, ``cancelled``...), plus the
        task's captured ``stdout`` and ``stderr``.
        """
        self._request_row(request_id, "id")
        with self._lock:
            rows = self.conn.execute(
                "SELECT idx, args, error, stdout, stderr FROM tasks WHERE request_id = ?"
                " AND state IN ('error', 'cancelled') ORDER BY idx",
                (request_id,),
            ).fetchall()
        out = []
        for idx, args, error, stdout, stderr in rows:
            data = _load_error(error)
            data.setdefault("kind", FailureKind.EXCEPTION)
            data.setdefault("stdout", stdout or "")
            data.setdefault("stderr", stderr or "")
            out.append((int(idx), self.load_value(args), data))
        return out

    def get_tasks_with_stored_results(
        self, request_id: int
    ) -> list[tuple[bytes | str, bytes | str | None]]:
        """As :meth:`get_tasks_with_results`, with large values as blob references.

        Read each with :meth:`open_value`, so that only one is in memory at a time.
        """
        self._request_row(request_id, "id")
        with self._lock:
            rows = self.conn.execute(
                "SELECT args, CASE WHEN state = 'done' THEN result END FROM tasks"
                " WHERE request_id = ? ORDER BY idx",
                (request_id,),
            ).fetchall()
        return [(a, r) for a, r in rows]

    def finished_since(
        self, request_id: int, after: int = 0
    ) -> tuple[int, list[tuple[int, str, bytes | None, dict[str, Any] | None]]]:
        """Return the tasks that finished after mark ``after``, and the mark to pass next.

        Each task comes as ``(index, state, result or None, error dict or None)``,
        in the order they finished, read once: a caller polling with the mark it
        got back reads every finished task's result once over a request (a task
        rerun and finished again comes again). Start with ``after=0``.
        """
        self._request_row(request_id, "id")
        with self._lock:
            marks = self.conn.execute(
                "SELECT seq, idx FROM finished_log WHERE request_id = ? AND seq > ?"
                " ORDER BY seq",
                (request_id, after),
            ).fetchall()
            if not marks:
                return after, []
            rows = []
            for _, idx in marks:
                rows.append(self.conn.execute(
                    "SELECT idx, state, CASE WHEN state = 'done' THEN result END, error,"
                    " stdout, stderr FROM tasks WHERE request_id = ? AND idx = ?",
                    (request_id, idx),
                ).fetchone())
        out: list[tuple[int, str, bytes | None, dict[str, Any] | None]] = []
        for idx, state, result, error, stdout, stderr in rows:
            if state in OPEN_STATES:  # rerun since it finished: it will come again
                continue
            data = None
            if state != "done":
                data = _load_error(error)
                data.setdefault("kind", FailureKind.EXCEPTION)
                data.setdefault("stdout", stdout or "")
                data.setdefault("stderr", stderr or "")
            value = None if result is None else self.load_value(result)
            out.append((int(idx), str(state), value, data))
        return int(marks[-1][0]), out

    def error_groups(self, request_id: int) -> list[tuple[str, str, int, list[int]]]:
        """Return the failed and cancelled tasks grouped by ``(kind, error type)``.

        Each group comes as ``(kind, type, count, first indices)`` (at most
        ``ERROR_GROUP_INDICES`` indices), the largest group first; read a task's
        traceback and output with :meth:`get_task`.
        """
        self._request_row(request_id, "id")
        with self._lock:
            rows = self.conn.execute(
                "SELECT kind, type, count(*), group_concat(idx) FROM (SELECT idx,"  # noqa: S608 - fixed SQL, bound values
                f" {ERROR_KIND_SQL} AS kind, CASE WHEN json_valid(error) THEN"
                " coalesce(json_extract(error, '$.type'), 'Error') ELSE 'Error' END AS type"
                " FROM tasks WHERE request_id = ? AND state IN ('error', 'cancelled')"
                " ORDER BY idx) GROUP BY kind, type ORDER BY count(*) DESC, min(idx)",
                (request_id,),
            ).fetchall()
        return [
            (str(kind), str(kind_type), int(count),
             [int(i) for i in str(indices).split(",")[:ERROR_GROUP_INDICES]])
            for kind, kind_type, count, indices in rows
        ]

    def last_finished(self, request_id: int) -> float | None:
        """Return when the request's last task finished (unix time), or None if none has."""
        self._request_row(request_id, "id")
        with self._lock:
            (finished,) = self.conn.execute(
                "SELECT max(finished) FROM tasks WHERE request_id = ?", (request_id,)
            ).fetchone()
        return None if finished is None else float(finished)

    def task_states(self, request_id: int) -> list[str]:
        """Return every task's state (``pending``, ``leased``, ``done``...), in index order."""
        self._request_row(request_id, "id")
        with self._lock:
            rows = self.conn.execute(
                "SELECT state FROM tasks WHERE request_id = ? ORDER BY idx", (request_id,)
            ).fetchall()
        return [str(state) for (state,) in rows]

    def get_task(self, request_id: int, idx: int) -> dict[str, Any]:
        """Return every column of one task as a dict (``error`` decoded)."""
        with self._lock:
            cursor = self.conn.execute(
                "SELECT * FROM tasks WHERE request_id = ? AND idx = ?", (request_id, idx)
            )
            row = cursor.fetchone()
            names = [d[0] for d in cursor.description]
        if row is None:
            self._check_task(request_id, idx)
        task = dict(zip(names, row))
        task["error"] = _load_error(task["error"]) if task["error"] is not None else None
        return task

    def has_open_tasks(self, request_id: int) -> bool:
        """Whether any task of the request is still pending or leased (one index probe)."""
        with self._lock:
            row = self.conn.execute(
                f"SELECT 1 FROM tasks WHERE request_id = ? AND state IN {OPEN_STATES_SQL}"  # noqa: S608 - fixed SQL, bound values
                " LIMIT 1",
                (request_id,),
            ).fetchone()
        return row is not None

    def changes_elsewhere(self) -> int:
        """A number that changes whenever another connection (the server) commits.

        SQLite's ``PRAGMA data_version``: a read of a counter, no table is touched, so
        a wait may ask it often. This connection's own commits do not change it.
        """
        with self._lock:
            return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    def open_task_indices(self, request_id: int) -> list[int]:
        """Return the indices of tasks still pending or leased."""
        self._request_row(request_id, "id")
        with self._lock:
            rows = self.conn.execute(
                f"SELECT idx FROM tasks WHERE request_id = ? AND state IN {OPEN_STATES_SQL}"  # noqa: S608 - fixed SQL, bound values
                " ORDER BY idx",
                (request_id,),
            ).fetchall()
        return [int(r[0]) for r in rows]

    def get_task_history(self, request_id: int, idx: int) -> list[dict[str, Any]]:
        """Return how the task's earlier runs ended, oldest first (``error`` decoded)."""
        (n_tasks,) = self._request_row(request_id, "n_tasks")
        if not 1 <= idx <= int(n_tasks):
            raise UnknownTaskError(request_id, idx, int(n_tasks))
        with self._lock:
            cursor = self.conn.execute(
                "SELECT * FROM task_history WHERE request_id = ? AND idx = ? ORDER BY run",
                (request_id, idx),
            )
            names = [d[0] for d in cursor.description]
            rows = cursor.fetchall()
        out = []
        for row in rows:
            entry = dict(zip(names, row))
            entry["error"] = _load_error(entry["error"]) if entry["error"] is not None else None
            out.append(entry)
        return out
