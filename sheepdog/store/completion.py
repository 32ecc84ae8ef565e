"""Storing the results workers post, alone or with their next lease in one transaction.

The first result per task wins; a result under a lease of an earlier run of its task
is a duplicate. Part of :class:`~sheepdog.store.queue.Queue`.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from typing import Any

from ..blobs import is_ref
from ..errors import UnknownTaskError
from .db import OPEN_STATES_SQL
from .leases import RUN_SQL, Lease, Leases, run_of_token
from .states import FailureKind, TaskState

__all__ = ["Completion"]


class Completion(Leases):
    """Store the results of leased tasks (``done`` or ``error``), and lease more."""

    def complete(
        self, request_id: int, results: Iterable[dict[str, Any]]
    ) -> tuple[list[int], list[int]]:
        """Store results as the protocol's results endpoint gives them (values as bytes).

        Each dict has ``index`` and ``ok``, then ``value`` (bytes) or ``error`` (dict),
        and optionally ``stdout``, ``stderr``, ``duration_s``, ``worker``, ``host`` and
        ``lease`` (its token: a lease of another run of the task is not taken). The first
        result per task wins; returns ``(accepted, duplicates)`` indices.
        A result for an index outside the request raises StorageError and stores nothing.
        """
        with self._write() as conn:
            _, n_tasks, _ = self._info(conn, request_id)
            return self._complete(conn, request_id, n_tasks, results)

    def complete_and_lease(
        self,
        request_id: int,
        results: Iterable[dict[str, Any]],
        *,
        worker: str,
        host: str,
        max_tasks: int,
        lease_s: float,
        now: float | None = None,
        reclaim: bool = False,
    ) -> tuple[list[int], list[int], list[Lease]]:
        """Do ``complete`` then ``lease`` in one transaction (one disk sync per round trip)."""
        with self._write() as conn:
            return self.complete_and_lease_in(
                conn, request_id, results, worker=worker, host=host, max_tasks=max_tasks,
                lease_s=lease_s, now=now, reclaim=reclaim,
            )

    def complete_and_lease_in(
        self,
        conn: sqlite3.Connection,
        request_id: int,
        results: Iterable[dict[str, Any]],
        *,
        worker: str,
        host: str,
        max_tasks: int,
        lease_s: float,
        now: float | None = None,
        reclaim: bool = False,
        info: tuple[str, int, int] | None = None,
    ) -> tuple[list[int], list[int], list[Lease]]:
        """``complete_and_lease`` inside the caller's write transaction (see ``answer_once``).

        ``info`` as for ``lease_in``.
        """
        now = time.time() if now is None else now
        info = self._info(conn, request_id) if info is None else info
        accepted, duplicates = self._complete(conn, request_id, info[1], results)
        leases = self._lease(conn, request_id, info, worker, host, max_tasks, lease_s, now,
                             reclaim)
        return accepted, duplicates, leases

    def _complete(
        self,
        conn: sqlite3.Connection,
        request_id: int,
        n_tasks: int,
        results: Iterable[dict[str, Any]],
    ) -> tuple[list[int], list[int]]:
        accepted: list[int] = []
        duplicates: list[int] = []
        now = time.time()
        for r in results:
            index = int(r["index"])
            if not 1 <= index <= n_tasks:
                raise UnknownTaskError(request_id, index, n_tasks)
            if r["ok"]:
                # The server names an uploaded blob by its reference; other callers give bytes.
                value = r["value"] if is_ref(r["value"]) else self.store_value(r["value"])
                state, error = TaskState.DONE, None
            else:
                state, value = TaskState.ERROR, None
                error = json.dumps({"kind": FailureKind.EXCEPTION, **r["error"]})
            # A result under a lease of an earlier run (a worker still running when the task
            # was rerun, or its spool file put back) is not this run's: taken as a duplicate.
            token = r.get("lease")
            run = run_of_token(token) if isinstance(token, str) else None
            cursor = conn.execute(
                "UPDATE tasks SET state = ?, result = ?, error = ?, stdout = ?, stderr = ?,"  # noqa: S608 - fixed SQL, bound values
                " duration_s = ?, finished = ?, worker = coalesce(?, worker),"
                " host = coalesce(?, host), lease = NULL, lease_expires = NULL"
                f" WHERE request_id = ? AND idx = ? AND state IN {OPEN_STATES_SQL}"
                f" AND (? IS NULL OR {RUN_SQL} = ?)",
                (
                    state,
                    value,
                    error,
                    r.get("stdout"),
                    r.get("stderr"),
                    r.get("duration_s"),
                    now,
                    r.get("worker"),
                    r.get("host"),
                    request_id,
                    index,
                    run,
                    run,
                ),
            )
            (accepted if cursor.rowcount else duplicates).append(index)
        return accepted, duplicates
