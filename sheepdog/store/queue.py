"""The lease state machine: lease, renew, complete, expire, cancel, fail and rerun tasks.

A task is ``pending`` until a worker leases it (``leased``, with a token and an
expiry), then ``done`` or ``error`` when its result comes, or ``cancelled``.
A lease that is not renewed in time returns its task to ``pending``, and after
``max_attempts`` makes it ``error`` (kind ``lost``). The ``*_in`` methods run
inside the caller's write transaction, so that the server carries out a signed
call's effect and records its answer together (:meth:`Queue.answer_once`).
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

from ..blobs import is_ref
from ..errors import StorageError, UnknownRequestError, UnknownTaskError
from .db import DEFAULT_SETTINGS, OPEN_STATES_SQL, Database

__all__ = [
    "LOST_KINDS",
    "RENEW_SQL",
    "RERUN_CHOICES",
    "Lease",
    "NonceReusedError",
    "Queue",
]

logger = logging.getLogger(__name__)

#: One lease's heartbeat; found through the tasks_by_lease index, one row per token.
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


RENEW_SQL = (
    "UPDATE tasks SET lease_expires = ?, worker = ? WHERE request_id = ?"
    " AND lease = ? AND state = 'leased'"
)

#: A connection forgets nonces that left the clock window at most this often: forgetting
#: them on every call cost a statement per call, and keeping them longer only keeps more.
NONCE_PRUNE_EVERY_S = 10.0

#: Error kinds of tasks whose worker or job went away: a worker that stopped renewing
#: its lease, a job that left the queue with work undone, a job in Grid Engine's error
#: state.
LOST_KINDS = ("lost", "job_lost", "job_error")
_LOST_SQL = ", ".join(f"'{kind}'" for kind in LOST_KINDS)

#: What :meth:`Queue.rerun_tasks` may choose, each as a condition on a task's row:
#: ``failed`` is every task that ended in an error, as every display counts them (the
#: function raised, a timeout, a job never submitted, and lost tasks); ``lost`` only
#: the tasks whose worker or job went away.
RERUN_CHOICES: dict[str, str] = {
    "failed": "state = 'error'",
    "lost": f"(state = 'error' AND json_extract(error, '$.kind') IN ({_LOST_SQL}))",
    "cancelled": "state = 'cancelled'",
}


class NonceReusedError(StorageError):
    """A nonce already recorded for another call of the same request."""


class _NonceRecorded(Exception):
    """Raised inside ``answer_once``'s transaction to roll it back: the nonce has an answer."""


@dataclass(frozen=True)
class Lease:
    """One task handed to a worker until ``expires`` (unix time)."""

    index: int
    attempt: int
    lease: str
    #: The pickled argument, or a blob reference (``sha256:<hex>:<size>``) when it is large.
    args: bytes | str
    expires: float


class Queue(Database):
    """The task queue's transitions, each in one write transaction."""

    #: When this connection last forgot nonces that left the clock window.
    _nonces_pruned_at = 0.0

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
                    "kind": "lost",
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
            # A worker asks for work only after it has reported every task it held, so on a
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
                state, error = "done", None
            else:
                state, value = "error", None
                error = json.dumps({"kind": "exception", **r["error"]})
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

    def answer_once(
        self,
        request_id: int,
        nonce: str,
        stamp: int,
        signature: str,
        window_s: float,
        effect: Callable[[sqlite3.Connection], bytes],
    ) -> tuple[bytes, bool]:
        """Run a signed call's ``effect`` once per nonce; return ``(answer, replayed)``.

        In one write transaction: run ``effect`` and record its answer with the
        nonce, so that the effect and its answer are committed together. A nonce
        recorded already (a retry or a replay racing its first call past the
        caller's ``CallAuth.seen`` check) rolls the effect back and returns the
        recorded answer (``replayed`` True: changing nothing). If ``effect`` raises,
        nothing is recorded. The same nonce with another signature raises
        NonceReusedError. Every ``NONCE_PRUNE_EVERY_S`` the transaction also forgets
        nonces whose time left the clock window (the server refuses those calls anyway).
        """
        try:
            with self._write() as conn:
                now = time.time()
                if now - self._nonces_pruned_at >= NONCE_PRUNE_EVERY_S:
                    conn.execute("DELETE FROM nonces WHERE stamp < ?", (now - window_s,))
                    self._nonces_pruned_at = now
                answer = effect(conn)
                try:
                    conn.execute(
                        "INSERT INTO nonces (request_id, nonce, stamp, signature, answer)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (request_id, nonce, stamp, signature, answer),
                    )
                except sqlite3.IntegrityError as exc:
                    if "UNIQUE" not in str(exc):
                        raise
                    raise _NonceRecorded from None  # _write rolls the effect back
                return answer, False
        except _NonceRecorded:
            pass
        with self._lock:
            row = self.conn.execute(
                "SELECT signature, answer FROM nonces WHERE request_id = ? AND nonce = ?",
                (request_id, nonce),
            ).fetchone()
        if row is None or str(row[0]) != signature:
            raise NonceReusedError(
                f"nonce {nonce} was already used by another call of request {request_id}"
            )
        return bytes(row[1]), True

    def cancel(self, request_id: int, reason: str = "cancelled by the user") -> int:
        """Cancel the request: no more leases, open tasks become cancelled; return how many."""
        error = json.dumps(
            {"type": "Cancelled", "message": reason, "traceback": "", "kind": "cancelled"}
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
        error = {"type": "Cancelled", "message": reason, "traceback": "", "kind": "cancelled"}
        return self._end_tasks(request_id, indices, "cancelled", error)

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
        return self._end_tasks(request_id, indices, "error", error)

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
