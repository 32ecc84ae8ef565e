"""Ending or restarting tasks from outside their workers: cancel, fail and rerun.

The user cancels a request or some of its tasks; the watcher fails the tasks of a job
that left the queue or is in error; ``rerun`` makes ended tasks pending again, keeping
what they ended with in their history. Part of :class:`~sheepdog.store.queue.Queue`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from ..errors import UnknownRequestError
from .db import OPEN_STATES_SQL, Database
from .states import FailureKind, TaskState

__all__ = ["LOST_KINDS", "RERUN_CHOICES", "Interventions"]

#: Error kinds of tasks whose worker or job went away: a worker that stopped renewing
#: its lease, a job that left the queue with work undone, a job in Grid Engine's error
#: state.
LOST_KINDS = (FailureKind.LOST, FailureKind.JOB_LOST, FailureKind.JOB_ERROR)
_LOST_SQL = ", ".join(f"'{kind.value}'" for kind in LOST_KINDS)

#: What :meth:`Interventions.rerun_tasks` may choose, each as a condition on a task's row:
#: ``failed`` is every task that ended in an error, as every display counts them (the
#: function raised, a timeout, a job never submitted, and lost tasks); ``lost`` only
#: the tasks whose worker or job went away.
RERUN_CHOICES: dict[str, str] = {
    "failed": "state = 'error'",
    "lost": f"(state = 'error' AND json_extract(error, '$.kind') IN ({_LOST_SQL}))",
    "cancelled": "state = 'cancelled'",
}


class Interventions(Database):
    """Cancel or fail open tasks, and rerun ended ones."""

    def cancel(self, request_id: int, reason: str = "cancelled by the user") -> int:
        """Cancel the request: no more leases, open tasks become cancelled; return how many."""
        error = json.dumps(
            {"type": "Cancelled", "message": reason, "traceback": "", "kind": FailureKind.CANCELLED}
        )
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE requests SET state = 'cancelled' WHERE id = ?", (request_id,)
            )
            if cursor.rowcount == 0:
                raise UnknownRequestError(request_id, self.dbfile)
            cursor = conn.execute(
                "UPDATE tasks SET state = 'cancelled', error = ?, finished = ?, lease = NULL,"  # noqa: S608 - fixed SQL, bound values
                f" lease_expires = NULL WHERE request_id = ? AND state IN {OPEN_STATES_SQL}",
                (error, time.time(), request_id),
            )
        return cursor.rowcount

    def cancel_tasks(self, request_id: int, indices: Iterable[int], reason: str) -> list[int]:
        """Cancel the given open tasks only (the request stays open); return those changed."""
        error = {
            "type": "Cancelled", "message": reason, "traceback": "", "kind": FailureKind.CANCELLED,
        }
        return self._end_tasks(request_id, indices, TaskState.CANCELLED, error)

    def fail_tasks(
        self,
        request_id: int,
        indices: Iterable[int],
        kind: str,
        message: str,
        *,
        type_name: str = "TaskFailed",
        host: str | None = None,
        traceback: str = "",
        extra: dict[str, Any] | None = None,
    ) -> list[int]:
        """Turn the given open tasks into errors of ``kind``; return the indices changed."""
        error = {
            "type": type_name,
            "message": message,
            "traceback": traceback,
            "host": host,
            "kind": kind,
            **(extra or {}),
        }
        return self._end_tasks(request_id, indices, TaskState.ERROR, error)

    def _end_tasks(
        self, request_id: int, indices: Iterable[int], state: str, error: dict[str, Any]
    ) -> list[int]:
        """End the given open tasks in ``state`` with ``error``; return the indices changed."""
        encoded = json.dumps(error)
        changed = []
        now = time.time()
        self._request_row(request_id, "id")
        with self._write() as conn:
            for idx in indices:
                cursor = conn.execute(
                    "UPDATE tasks SET state = ?, error = ?, finished = ?, lease = NULL,"  # noqa: S608 - fixed SQL, bound values
                    " lease_expires = NULL WHERE request_id = ? AND idx = ?"
                    f" AND state IN {OPEN_STATES_SQL}",
                    (state, encoded, now, request_id, idx),
                )
                if cursor.rowcount:
                    changed.append(int(idx))
        return changed

    def rerun_tasks(self, request_id: int, which: Iterable[str]) -> list[int]:
        """Make the request's tasks in the chosen end states pending again; return their indices.

        ``which`` holds names from :data:`RERUN_CHOICES`. What each task ended
        with is kept in its history (:meth:`get_task_history`); a task with a
        result is never chosen. The request is reopened (a cancelled request
        takes leases again).
        """
        chosen = list(dict.fromkeys(which))
        unknown = [w for w in chosen if w not in RERUN_CHOICES]
        if unknown or not chosen:
            raise ValueError(
                f"cannot rerun {unknown or chosen!r}: choose one or more of "
                f"{', '.join(RERUN_CHOICES)}"
            )
        where = " OR ".join(RERUN_CHOICES[w] for w in chosen)
        with self._write() as conn:
            found = conn.execute("SELECT 1 FROM requests WHERE id = ?", (request_id,)).fetchone()
            if found is None:
                raise UnknownRequestError(request_id, self.dbfile)
            rows = conn.execute(
                f"SELECT idx FROM tasks WHERE request_id = ? AND ({where}) ORDER BY idx",  # noqa: S608 - fixed conditions
                (request_id,),
            ).fetchall()
            indices = [int(r[0]) for r in rows]
            for idx in indices:
                conn.execute(
                    "INSERT INTO task_history (request_id, idx, run, state, error, host, stdout,"
                    " stderr, attempts, finished) SELECT request_id, idx, 1 + (SELECT count(*)"
                    " FROM task_history h WHERE h.request_id = t.request_id AND h.idx = t.idx),"
                    " state, error, host, stdout, stderr, attempts, finished FROM tasks t"
                    " WHERE request_id = ? AND idx = ?",
                    (request_id, idx),
                )
                conn.execute(
                    "UPDATE tasks SET state = 'pending', attempts = 0, lease = NULL,"
                    " lease_expires = NULL, error = NULL, result = NULL, finished = NULL,"
                    " started = NULL, stdout = NULL, stderr = NULL, duration_s = NULL"
                    " WHERE request_id = ? AND idx = ?",
                    (request_id, idx),
                )
            if indices:
                conn.execute("UPDATE requests SET state = 'open' WHERE id = ?", (request_id,))
                # The watcher counts resubmissions from the rerun's job on.
                conn.execute(
                    "UPDATE jobs SET info = json_set(info, '$.before_rerun', json('true'))"
                    " WHERE request_id = ?",
                    (request_id,),
                )
        return indices
