"""Storage: the whole store, under the name and with the per-task API of Sheepdog 0.2.

Sheepdog 0.2 documented ``sheepdog.storage.Storage(dbfile)`` with
``initdb``, ``new_request``, ``get_details``, ``store_result``,
``store_error``, the ``count_*`` methods, ``get_results``, ``get_errors`` and
``get_tasks_with_results``. Those not in :mod:`.db` or :mod:`.records` are
here, each a few lines over them; everything else a :class:`Storage` does
comes from :class:`~sheepdog.store.queue.Queue` and
:class:`~sheepdog.store.records.Records`.
"""

from __future__ import annotations

import json
import time

from .db import OPEN_STATES_SQL
from .queue import Queue
from .records import Records, error_text

__all__ = ["Storage"]


def _error_json(error: object) -> str:
    if isinstance(error, dict):
        return json.dumps(error)
    text = error.decode("utf-8", "replace") if isinstance(error, bytes) else str(error)
    return json.dumps({"type": "Error", "message": text, "traceback": text})


class Storage(Queue, Records):
    """One connection to a sheepdog SQLite database; usable as a context manager.

    ``Storage()`` opens ``./sheepdog.sqlite`` as the original did, creating and
    migrating the schema. ``init=False`` skips that for callers (the server)
    that know the schema is current. ``create=False`` is for readers: a file
    that does not exist is a :class:`StorageError` saying so, and nothing is
    created. The object may be shared between threads: calls are serialised on
    one lock.
    """

    def get_details(self, request_id: int, job_index: int) -> tuple[bytes, bytes | None, bytes]:
        """Return ``(function, namespace, args)`` for task ``job_index`` (from 1)."""
        with self._lock:
            row = self.conn.execute(
                "SELECT r.func, r.ns, t.args FROM requests r JOIN tasks t ON t.request_id = r.id"
                " WHERE r.id = ? AND t.idx = ?",
                (request_id, job_index),
            ).fetchone()
        if row is None:
            self._check_task(request_id, job_index)
        func, ns, args = row
        return bytes(func), (None if ns is None else bytes(ns)), self.load_value(args)

    def store_result(self, request_id: int, job_index: int, result: bytes) -> bool:
        """Store a pickled result unless the task is already finished; True if stored."""
        stored = self.store_value(result)  # a blob is durable before the row names it
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE tasks SET state = 'done', result = ?, finished = ?, lease = NULL,"  # noqa: S608 - fixed SQL, bound values
                " lease_expires = NULL WHERE request_id = ? AND idx = ?"
                f" AND state IN {OPEN_STATES_SQL}",
                (stored, time.time(), request_id, job_index),
            )
        if cursor.rowcount == 0:
            self._raise_if_missing(request_id, job_index)
        return cursor.rowcount == 1

    def store_error(self, request_id: int, job_index: int, error: object) -> bool:
        """Store an error (a dict, or text) unless the task is finished; True if stored."""
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE tasks SET state = 'error', error = ?, finished = ?, lease = NULL,"  # noqa: S608 - fixed SQL, bound values
                " lease_expires = NULL WHERE request_id = ? AND idx = ?"
                f" AND state IN {OPEN_STATES_SQL}",
                (_error_json(error), time.time(), request_id, job_index),
            )
        if cursor.rowcount == 0:
            self._raise_if_missing(request_id, job_index)
        return cursor.rowcount == 1

    def count_results(self, request_id: int) -> int:
        """Return how many tasks have a result."""
        return self._count(request_id, ("done",))

    def count_errors(self, request_id: int) -> int:
        """Return how many tasks ended in an error (``lost`` and ``cancelled`` included)."""
        return self._count(request_id, ("error", "cancelled"))

    def count_results_and_errors(self, request_id: int) -> int:
        """Return how many tasks are finished, whatever the outcome."""
        return self._count(request_id, ("done", "error", "cancelled"))

    def get_results(self, request_id: int) -> list[tuple[bytes, bytes]]:
        """Return ``(args, result)`` for every task with a result, in index order."""
        self._request_row(request_id, "id")
        with self._lock:
            rows = self.conn.execute(
                "SELECT args, result FROM tasks WHERE request_id = ? AND state = 'done'"
                " ORDER BY idx",
                (request_id,),
            ).fetchall()
        return [(self.load_value(a), self.load_value(r)) for a, r in rows]

    def get_errors(self, request_id: int) -> list[tuple[bytes, str]]:
        """Return ``(args, error text)`` for every failed or cancelled task, in index order.

        The text is the remote traceback, as Sheepdog 0.2 returned it (or
        ``"Type: message"`` for an error without one, such as a lost task).
        :meth:`get_task_errors` gives the index and every detail as a dict.
        """
        return [(args, error_text(error)) for _, args, error in self.get_task_errors(request_id)]

    def get_tasks_with_results(self, request_id: int) -> list[tuple[bytes, bytes | None]]:
        """Return ``(args, result or None)`` for every task, in index order."""
        return [
            (self.load_value(a), None if r is None else self.load_value(r))
            for a, r in self.get_tasks_with_stored_results(request_id)
        ]
