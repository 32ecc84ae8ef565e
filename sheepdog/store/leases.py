"""Leasing tasks to workers: lease, renew and expire leases, and the lease tokens.

A task is ``pending`` until a worker leases it (``leased``, with a token and an
expiry). A lease that is not renewed in time returns its task to ``pending``, and
after ``max_attempts`` makes it ``error`` (kind ``lost``). Part of
:class:`~sheepdog.store.queue.Queue`.
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass

from ..blobs import is_ref
from ..errors import UnknownRequestError
from .db import DEFAULT_SETTINGS, Database
from .states import FailureKind

__all__ = ["RENEW_SQL", "RUN_SQL", "Lease", "Leases", "lease_token", "run_of_token"]

# The name it had before Queue was split: a user's logging configuration may name it.
logger = logging.getLogger("sheepdog.store.queue")

#: A task's run: 1, and one more after each ``rerun`` (its earlier runs are in task_history).
RUN_SQL = ("(SELECT count(*) FROM task_history h"
           " WHERE h.request_id = tasks.request_id AND h.idx = tasks.idx) + 1")


def lease_token(run: int) -> str:
    """A new lease token for a task in its ``run``: the run is part of it (after the first).

    A result carries its lease token, signed (over HTTP and in a spool file), so a result
    of an earlier run, posted late or put back in the spool after a rerun, is told apart.
    """
    token = secrets.token_hex(8)
    return token if run == 1 else f"{run}.{token}"


def run_of_token(token: str) -> int:
    """The run a lease token was issued in (see :func:`lease_token`); 0, no run, if not ours."""
    run, dot, _ = token.rpartition(".")
    if not dot:
        return 1
    return int(run) if run.isdigit() else 0


#: One lease's heartbeat; found through the tasks_by_lease index, one row per token.
RENEW_SQL = (
    "UPDATE tasks SET lease_expires = ?, worker = ? WHERE request_id = ?"
    " AND lease = ? AND state = 'leased'"
)


@dataclass(frozen=True)
class Lease:
    """One task handed to a worker until ``expires`` (unix time)."""

    index: int
    attempt: int
    lease: str
    #: The pickled argument, or a blob reference (``sha256:<hex>:<size>``) when it is large.
    args: bytes | str
    expires: float


class Leases(Database):
    """Lease tasks to workers, renew their leases and expire those not renewed."""

    def _info(self, conn: sqlite3.Connection, request_id: int) -> tuple[str, int, int]:
        """Return the request's ``(state, n_tasks, max_attempts)`` inside a transaction."""
        row = conn.execute(
            "SELECT state, n_tasks, settings FROM requests WHERE id = ?", (request_id,)
        ).fetchone()
        if row is None:
            raise UnknownRequestError(request_id, self.dbfile)
        settings = json.loads(row[2])
        max_attempts = int(settings.get("max_attempts", DEFAULT_SETTINGS["max_attempts"]))
        return str(row[0]), int(row[1]), max_attempts

    def _expire(
        self,
        conn: sqlite3.Connection,
        request_id: int,
        now: float,
        max_attempts: int,
        *,
        every_lease: bool = False,
    ) -> int:
        # ``now`` is also the finish time of a task given up as lost, so it stays the real
        # time; ``every_lease`` expires the leases that have not run out yet as well.
        overdue = conn.execute(
            "SELECT idx, attempts, host, lease_expires FROM tasks WHERE request_id = ?"
            " AND state = 'leased' AND lease_expires < ?",
            (request_id, float("inf") if every_lease else now),
        ).fetchall()
        for idx, attempts, host, expires in overdue:
            expired = min(expires, now)
            if attempts + 1 >= max_attempts:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expired))
                error = {
                    "type": "LostTask",
                    "message": (
                        f"task {idx} was lost {attempts + 1} times; last leased to "
                        f"{host or 'an unknown host'}, lease expired at {when}"
                    ),
                    "traceback": "",
                    "host": host,
                    "kind": FailureKind.LOST,
                    "time": expired,
                }
                conn.execute(
                    "UPDATE tasks SET state = 'error', attempts = attempts + 1, error = ?,"
                    " lease = NULL, lease_expires = NULL, finished = ?"
                    " WHERE request_id = ? AND idx = ?",
                    (json.dumps(error), now, request_id, idx),
                )
                logger.warning("request %d task %d lost on %s", request_id, idx, host)
            else:
                conn.execute(
                    "UPDATE tasks SET state = 'pending', attempts = attempts + 1, lease = NULL,"
                    " lease_expires = NULL WHERE request_id = ? AND idx = ?",
                    (request_id, idx),
                )
        return len(overdue)

    def expire_leases(
        self, request_id: int, *, now: float | None = None, every_lease: bool = False
    ) -> int:
        """Return overdue leased tasks to pending (or make them lost); return how many.

        ``every_lease`` expires all leases, overdue or not: for when no worker is left
        to renew them (every job of the request has left the queue).
        """
        self._request_row(request_id, "id")
        with self._write() as conn:
            _, _, max_attempts = self._info(conn, request_id)
            return self._expire(
                conn, request_id, time.time() if now is None else now, max_attempts,
                every_lease=every_lease,
            )

    def lease(
        self,
        request_id: int,
        *,
        worker: str,
        host: str,
        max_tasks: int,
        lease_s: float,
        now: float | None = None,
        reclaim: bool = False,
    ) -> list[Lease]:
        """Lease up to ``max_tasks`` pending tasks to ``worker`` for ``lease_s`` seconds.

        Overdue leases are expired first. A cancelled request leases nothing. With
        ``reclaim`` (the worker is retrying a call whose answer it never got), tasks still
        leased to this worker on this host come first.
        """
        with self._write() as conn:
            return self.lease_in(
                conn, request_id, worker=worker, host=host, max_tasks=max_tasks, lease_s=lease_s,
                now=now, reclaim=reclaim,
            )

    def lease_in(
        self,
        conn: sqlite3.Connection,
        request_id: int,
        *,
        worker: str,
        host: str,
        max_tasks: int,
        lease_s: float,
        now: float | None = None,
        reclaim: bool = False,
        info: tuple[str, int, int] | None = None,
    ) -> list[Lease]:
        """``lease`` inside the caller's write transaction (see ``answer_once``).

        ``info`` is the request's ``(state, n_tasks, max_attempts)`` when the caller
        has read it already (``CallAuth.info``); else it is read here.
        """
        now = time.time() if now is None else now
        info = self._info(conn, request_id) if info is None else info
        return self._lease(conn, request_id, info, worker, host, max_tasks, lease_s, now, reclaim)

    def _lease(
        self,
        conn: sqlite3.Connection,
        request_id: int,
        info: tuple[str, int, int],
        worker: str,
        host: str,
        max_tasks: int,
        lease_s: float,
        now: float,
        reclaim: bool = False,
    ) -> list[Lease]:
        state, _, max_attempts = info
        self._expire(conn, request_id, now, max_attempts)
        if state != "open" or max_tasks <= 0:
            return []
        rows = []
        if reclaim:
            # A worker asks for work only after it has reported every task it held (but one
            # result its uploader may still post, which it does not run again), so on a
            # retried call a task still leased to it is one whose lease never reached it: the
            # answer was lost (the server died, or the connection dropped, after the commit).
            # Hand such tasks back first; otherwise they sit orphaned until their lease
            # expires, and if every worker has exited by then, nobody runs them.
            rows = conn.execute(
                f"SELECT idx, attempts, args, {RUN_SQL} FROM tasks WHERE request_id = ?"  # noqa: S608 - fixed SQL, bound values
                " AND state = 'leased' AND worker = ? AND host = ? ORDER BY idx LIMIT ?",
                (request_id, worker, host, max_tasks),
            ).fetchall()
        if len(rows) < max_tasks:
            # "lease_expires IS NULL" holds for every pending task (each way into 'pending'
            # clears it); saying so lets SQLite read tasks_by_state in idx order. Without
            # it SQLite walked the primary key from task 1, over every finished task, on
            # every lease: the cost of a lease grew with the request's progress.
            rows += conn.execute(
                f"SELECT idx, attempts, args, {RUN_SQL} FROM tasks WHERE request_id = ?"  # noqa: S608 - fixed SQL, bound values
                " AND state = 'pending' AND lease_expires IS NULL ORDER BY idx LIMIT ?",
                (request_id, max_tasks - len(rows)),
            ).fetchall()
        expires = now + lease_s
        leases = []
        for idx, attempts, args, run in rows:
            token = lease_token(int(run))
            conn.execute(
                "UPDATE tasks SET state = 'leased', lease = ?, lease_expires = ?, worker = ?,"
                " host = ?, started = ? WHERE request_id = ? AND idx = ?",
                (token, expires, worker, host, now, request_id, idx),
            )
            stored = args if is_ref(args) else bytes(args)  # a blob is fetched by the worker
            leases.append(Lease(int(idx), int(attempts) + 1, token, stored, expires))
        return leases

    def renew(
        self,
        request_id: int,
        worker: str,
        leases: Iterable[str],
        lease_s: float,
        *,
        now: float | None = None,
    ) -> tuple[list[str], list[str]]:
        """Extend the given leases by ``lease_s``; return ``(renewed, lost)`` tokens.

        A lease is lost when its task was re-leased, finished or cancelled. A lease
        that expired but whose task nobody took yet is renewed: the work is not lost.
        """
        with self._write() as conn:
            return self.renew_in(conn, request_id, worker, leases, lease_s, now=now)

    def renew_in(
        self,
        conn: sqlite3.Connection,
        request_id: int,
        worker: str,
        leases: Iterable[str],
        lease_s: float,
        *,
        now: float | None = None,
    ) -> tuple[list[str], list[str]]:
        """``renew`` inside the caller's write transaction (see ``answer_once``)."""
        now = time.time() if now is None else now
        renewed: list[str] = []
        lost: list[str] = []
        found = conn.execute("SELECT 1 FROM requests WHERE id = ?", (request_id,)).fetchone()
        if found is None:
            raise UnknownRequestError(request_id, self.dbfile)
        for token in leases:
            cursor = conn.execute(RENEW_SQL, (now + lease_s, worker, request_id, token))
            (renewed if cursor.rowcount else lost).append(token)
        return renewed, lost
