"""What the library reads and records: requests, their tasks' results and errors, jobs.

New requests and the result cache, the request row as the server reads it
(:class:`CallAuth`), task counts, results and errors as the library returns
them, what finished since a mark (the Executor), and the scheduler jobs
submitted for a request.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import Any

from .._connect import ConnectMode
from ..errors import StorageError, UnknownRequestError, UnknownTaskError
from .db import DEFAULT_SETTINGS, OPEN_STATES, OPEN_STATES_SQL, Database

__all__ = [
    "ERROR_GROUP_INDICES",
    "CallAuth",
    "JobRecord",
    "Records",
    "content_digest",
    "error_text",
]

#: How many task indices :meth:`Records.error_groups` names per group.
ERROR_GROUP_INDICES = 50

# A timeline's view of a task's row (named parameter :now): drawn unless pending or never
# leased nor finished; from its lease (else its finish) to its finish (to now while open).
_DRAWN = "state != 'pending' AND coalesce(started, finished) IS NOT NULL"
_BEGIN = "coalesce(started, finished)"
_END = (f"max(coalesce(started, finished), CASE WHEN state IN {OPEN_STATES_SQL} THEN :now"
        " ELSE coalesce(finished, :now) END)")
#: A failed or cancelled task's error kind; NULL for the others.
_KIND = ("CASE WHEN state IN ('error', 'cancelled') THEN CASE WHEN json_valid(error) THEN"
         " coalesce(json_extract(error, '$.kind'), 'exception') ELSE 'exception' END END")


def content_digest(data: bytes) -> str:
    """The digest that identifies a function payload or an argument pickle in the cache."""
    return hashlib.sha256(data).hexdigest()


@lru_cache(maxsize=256)
def _settings(text: str) -> Mapping[str, Any]:
    """A request's stored settings over the defaults, parsed once per distinct text."""
    # Settings never change after new_request, and every call of the server needs them.
    return MappingProxyType({**DEFAULT_SETTINGS, **json.loads(text)})


@dataclass(frozen=True)
class CallAuth:
    """What the server needs to check and carry out one signed call, read in one query."""

    secret: str
    n_tasks: int
    state: str
    settings: Mapping[str, Any]
    #: ``(signature, answer)`` recorded for the call's nonce, or None if unseen.
    seen: tuple[str, bytes] | None

    @property
    def info(self) -> tuple[str, int, int]:
        """``(state, n_tasks, max_attempts)``, as the ``*_in`` methods take it."""
        return self.state, self.n_tasks, int(self.settings["max_attempts"])


#: The ``connect`` values a job records (``auto`` is resolved before it is submitted).
_JOB_CONNECT = {mode.value: mode for mode in (ConnectMode.DIRECT, ConnectMode.TUNNEL)}


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _number(value: Any) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True)
class JobRecord:
    """One scheduler job recorded for a request, with what its submission recorded.

    The facts live in the job row's ``info`` JSON, which keeps its format: a field
    that a job written by an older sheepdog lacks reads as None (or its default).
    Read with :meth:`Records.get_jobs` and :meth:`Records.latest_job`.
    """

    job_id: str
    array_size: int
    submitted: float
    #: ``submitted``, or ``error`` once the watcher deleted it in an error state.
    state: str
    #: The stored facts as they are, for writing them back changed (``set_job_state``).
    info: Mapping[str, Any] = field(hash=False)
    #: The server URL in the job file, which its workers call back to.
    url: str | None = None
    #: That server's port, and the address it listened on (``sheepdog serve`` restarts it).
    port: int | None = None
    listen_address: str | None = None
    #: How its workers reach the server: direct or tunnel (None: not recorded).
    connect: ConnectMode | None = None
    #: Tasks finished before it was submitted: whether it made progress.
    finished_before: int | None = None
    #: Which of the submission's ``parts`` jobs it is (a request split at max_aj_tasks).
    part: int = 1
    parts: int = 1
    #: The scheduler that ``scheduler="auto"`` found.
    scheduler: str | None = None
    #: Why it was resubmitted (None for a first submission), and whether it continues
    #: work that the jobs before it left open after making progress.
    why: str | None = None
    continues: bool = False
    #: Submitted before a rerun of the request: its retries are not the rerun's.
    before_rerun: bool = False
    #: Why it was in an error state.
    reason: str | None = None

    @classmethod
    def from_row(
        cls, job_id: Any, array_size: Any, submitted: Any, state: Any, info: str | None
    ) -> JobRecord:
        """The record of a ``jobs`` row; ``info`` is its JSON text."""
        facts = json.loads(info or "{}")
        if not isinstance(facts, dict):
            facts = {}
        return cls(
            job_id=str(job_id),
            array_size=int(array_size),
            submitted=float(submitted),
            state=str(state),
            info=MappingProxyType(facts),
            url=_text(facts.get("url")),
            port=_number(facts.get("port")),
            listen_address=_text(facts.get("listen_address")),
            connect=_JOB_CONNECT.get(str(facts.get("connect"))),
            finished_before=_number(facts.get("finished_before")),
            part=int(facts.get("part") or 1),
            parts=int(facts.get("parts") or 1),
            scheduler=_text(facts.get("scheduler")),
            why=_text(facts.get("why")),
            continues=bool(facts.get("continues")),
            before_rerun=bool(facts.get("before_rerun")),
            reason=_text(facts.get("reason")),
        )

    def with_info(self, **changes: Any) -> dict[str, Any]:
        """The stored facts with ``changes``, to record with ``set_job_state``."""
        return {**self.info, **changes}


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


class Records(Database):
    """Requests, tasks' outcomes and jobs, as the library stores and reads them."""

    def new_request(
        self,
        serialised_function: bytes,
        serialised_namespace: bytes | None,
        args_list: Sequence[bytes],
        *,
        secret: str | None = None,
        settings: dict[str, Any] | None = None,
        label: str | None = None,
        func_digest: str | None = None,
        args_digests: Sequence[str] | None = None,
    ) -> int:
        """Store a request and one pending task per serialised argument; return its id.

        Task indices count from 1. ``secret`` (64 hex characters) is generated when
        not given. ``settings`` are merged over ``DEFAULT_SETTINGS``. The digests
        (of the function's payload, and of each argument) let later requests take
        these results from the cache (:meth:`fill_from_cache`).
        """
        if secret is None:
            secret = secrets.token_hex(32)
        elif len(secret) < 32:
            raise ValueError("a request secret needs at least 128 bits (32 hex characters)")
        else:
            bytes.fromhex(secret)  # fail here, not when the first worker calls
        merged = {**DEFAULT_SETTINGS, **(settings or {})}
        values = list(args_list)
        digests = list(args_digests) if args_digests is not None else [None] * len(values)
        if len(digests) != len(values):
            raise ValueError(f"{len(digests)} argument digests for {len(values)} arguments")
        # Blobs first: a row never names a blob that is not durable yet.
        args = self.store_values(values, digests)
        with self._write() as conn:
            cursor = conn.execute(
                "INSERT INTO requests (created, func, ns, secret, n_tasks, settings, label,"
                " func_digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    time.time(),
                    serialised_function,
                    serialised_namespace,
                    secret,
                    len(args),
                    json.dumps(merged),
                    label,
                    func_digest,
                ),
            )
            request_id = cursor.lastrowid
            assert request_id is not None
            conn.executemany(
                "INSERT INTO tasks (request_id, idx, args, args_digest) VALUES (?, ?, ?, ?)",
                ((request_id, i, a, d) for i, (a, d) in enumerate(zip(args, digests), start=1)),
            )
        return int(request_id)

    def fill_from_cache(self, request_id: int) -> int:
        """Finish the request's pending tasks whose result is already stored; return how many.

        A task matches an earlier task with a result (never a failure) of a
        request whose function has the same payload digest, and the same
        argument digest. Such tasks are done at once, marked ``cached``.
        """
        now = time.time()
        filled = 0
        with self._write() as conn:
            row = conn.execute(
                "SELECT func_digest FROM requests WHERE id = ?", (request_id,)
            ).fetchone()
            if row is None:
                raise UnknownRequestError(request_id, self.dbfile)
            if row[0] is None:
                return 0
            pending = conn.execute(
                "SELECT idx, args_digest FROM tasks WHERE request_id = ? AND state = 'pending'"
                " AND args_digest IS NOT NULL ORDER BY idx",
                (request_id,),
            ).fetchall()
            for idx, digest in pending:
                found = conn.execute(
                    "SELECT t.result FROM tasks t JOIN requests r ON r.id = t.request_id"
                    " WHERE t.args_digest = ? AND t.state = 'done' AND r.func_digest = ?"
                    " AND t.request_id != ? LIMIT 1",
                    (digest, row[0], request_id),
                ).fetchone()
                if found is None:
                    continue
                conn.execute(
                    "UPDATE tasks SET state = 'done', result = ?, cached = 1, finished = ?"
                    " WHERE request_id = ? AND idx = ?",
                    (found[0], now, request_id, idx),
                )
                filled += 1
        return filled

    def count_cached(self, request_id: int) -> int:
        """Return how many of the request's tasks took their result from the cache."""
        self._request_row(request_id, "id")
        with self._lock:
            row = self.conn.execute(
                "SELECT count(*) FROM tasks WHERE request_id = ? AND cached = 1", (request_id,)
            ).fetchone()
        return int(row[0])

    def get_secret(self, request_id: int) -> str:
        """Return the request's secret (64 hex characters)."""
        return str(self._request_row(request_id, "secret")[0])

    def get_settings(self, request_id: int) -> dict[str, Any]:
        """Return the request's settings, defaults filled in."""
        (text,) = self._request_row(request_id, "settings")
        return {**DEFAULT_SETTINGS, **json.loads(text)}

    def call_auth(self, request_id: int, nonce: str | None = None) -> CallAuth:
        """Read the request's secret, size, state and settings, and what ``nonce`` got, at once.

        One query per call: the server reads the request row here and nowhere else
        (the ``*_in`` methods take ``CallAuth.info``).
        """
        with self._lock:
            row = self.conn.execute(
                "SELECT r.secret, r.n_tasks, r.state, r.settings, n.signature, n.answer"
                " FROM requests r LEFT JOIN nonces n ON n.request_id = r.id AND n.nonce = ?"
                " WHERE r.id = ?",
                (nonce, request_id),
            ).fetchone()
        if row is None:
            raise UnknownRequestError(request_id, self.dbfile)
        secret, n_tasks, state, text, signature, answer = row
        seen = None if signature is None else (str(signature), bytes(answer))
        return CallAuth(str(secret), int(n_tasks), str(state), _settings(text), seen)

    def get_function(self, request_id: int) -> tuple[bytes, bytes | None]:
        """Return the request's serialised function and namespace."""
        func, ns = self._request_row(request_id, "func, ns")
        return bytes(func), (None if ns is None else bytes(ns))

    def get_request_state(self, request_id: int) -> str:
        """Return ``"open"`` or ``"cancelled"``."""
        return str(self._request_row(request_id, "state")[0])

    def list_requests(self) -> list[dict[str, Any]]:
        """Return every request's id, created time, task count, state and label."""
        with self._lock:
            rows = self.conn.execute(
                "SELECT id, created, n_tasks, state, label FROM requests ORDER BY id"
            ).fetchall()
        keys = ("id", "created", "n_tasks", "state", "label")
        return [dict(zip(keys, row)) for row in rows]

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
        counts = dict.fromkeys(("pending", "leased", "done", "error", "cancelled"), 0)
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
            data.setdefault("kind", "exception")
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
                data.setdefault("kind", "exception")
                data.setdefault("stdout", stdout or "")
                data.setdefault("stderr", stderr or "")
            value = None if result is None else self.load_value(result)
            out.append((int(idx), str(state), value, data))
        return int(marks[-1][0]), out

    def task_spans(
        self, request_id: int, *, now: float
    ) -> list[tuple[int, str, str | None, str | None, float, float, str | None]]:
        """Return ``(index, state, host, worker, begin, end, error kind)`` per drawn task.

        A task is drawn from its lease to its result (to ``now`` while it runs); one
        that finished without a lease is a point at its finish; pending tasks are left
        out. The error kind (``exception``, ``lost``, ``cancelled``...) is None unless
        the task failed. For a timeline of one mark per task; see :meth:`span_bins`.
        """
        self._request_row(request_id, "id")
        with self._lock:
            rows = self.conn.execute(
                f"SELECT idx, state, host, worker, {_BEGIN}, {_END}, {_KIND}"  # noqa: S608 - fixed SQL, bound values
                f" FROM tasks WHERE request_id = :rid AND {_DRAWN} ORDER BY idx",
                {"rid": request_id, "now": now},
            ).fetchall()
        return [tuple(row) for row in rows]

    def span_extent(self, request_id: int, *, now: float) -> tuple[int, float, float, int, int]:
        """Return ``(tasks drawn, first begin, last end, workers, nodes)`` of a timeline."""
        self._request_row(request_id, "id")
        with self._lock:
            n, begin, end, workers, hosts = self.conn.execute(
                f"SELECT count(*), min({_BEGIN}), max({_END}), count(DISTINCT worker),"  # noqa: S608 - fixed SQL, bound values
                f" count(DISTINCT host) FROM tasks WHERE request_id = :rid AND {_DRAWN}",
                {"rid": request_id, "now": now},
            ).fetchone()
        return int(n), float(begin or now), float(end or now), int(workers), int(hosts)

    def span_bins(
        self, request_id: int, *, by_worker: bool, start: float, bin_s: float, bins: int,
        now: float,
    ) -> list[tuple[str | None, int, int, str, str | None, int]]:
        """Count drawn tasks by ``(lane, begin bin, end bin, state, error kind)``.

        The lane is the task's worker (``by_worker``) or node; bins are ``bin_s``
        seconds from ``start``, clamped to ``0 .. bins - 1``. Counted by SQLite in
        one pass, so a request of 100,000 tasks comes back as a few thousand rows.
        """
        lane = "coalesce(worker, host)" if by_worker else "host"

        def bin_of(t: str) -> str:
            return f"min(:last, max(0, CAST(({t} - :start) / :bin_s AS INTEGER)))"

        self._request_row(request_id, "id")
        with self._lock:
            rows = self.conn.execute(
                f"SELECT lane, b, e, state, kind, count(*) FROM (SELECT {lane} AS lane,"  # noqa: S608 - fixed SQL, bound values
                f" {bin_of(_BEGIN)} AS b, {bin_of(_END)} AS e, state, {_KIND} AS kind"
                f" FROM tasks WHERE request_id = :rid AND {_DRAWN})"
                " GROUP BY lane, b, e, state, kind",
                {"rid": request_id, "now": now, "start": start, "bin_s": bin_s,
                 "last": bins - 1},
            ).fetchall()
        return [(lane_name, int(b), int(e), str(st), kind, int(n))
                for lane_name, b, e, st, kind, n in rows]

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
                f" {_KIND} AS kind, CASE WHEN json_valid(error) THEN"
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

    def add_job(
        self,
        request_id: int,
        job_id: str,
        array_size: int,
        *,
        submitted: float | None = None,
        state: str = "submitted",
        info: dict[str, Any] | None = None,
    ) -> None:
        """Record a job (Grid Engine or Slurm) submitted for the request."""
        self._request_row(request_id, "id")
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO jobs (request_id, job_id, array_size, submitted, state,"
                " info) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    request_id,
                    job_id,
                    array_size,
                    time.time() if submitted is None else submitted,
                    state,
                    json.dumps(info or {}),
                ),
            )

    def set_job_state(
        self, request_id: int, job_id: str, state: str, info: dict[str, Any] | None = None
    ) -> None:
        """Update a recorded job's state (and replace its info when given)."""
        with self._write() as conn:
            if info is None:
                cursor = conn.execute(
                    "UPDATE jobs SET state = ? WHERE request_id = ? AND job_id = ?",
                    (state, request_id, job_id),
                )
            else:
                cursor = conn.execute(
                    "UPDATE jobs SET state = ?, info = ? WHERE request_id = ? AND job_id = ?",
                    (state, json.dumps(info), request_id, job_id),
                )
        if cursor.rowcount == 0:
            raise StorageError(f"request {request_id} has no job {job_id!r}")

    def record_environment_in(
        self, conn: sqlite3.Connection, request_id: int, worker: str, host: str,
        environment: dict[str, Any],
    ) -> None:
        """Keep a worker's report of its Python and modules (in the caller's transaction)."""
        conn.execute(
            "INSERT OR REPLACE INTO worker_envs (request_id, worker, host, python, modules,"
            " reported) VALUES (?, ?, ?, ?, ?, ?)",
            (request_id, worker, host, environment["python"],
             json.dumps(environment["modules"]), time.time()),
        )

    def worker_environments(self, request_id: int) -> list[dict[str, Any]]:
        """What the request's workers reported: host, python and modules (name: [imports,
        version or why not]), oldest first."""
        with self._lock:
            rows = self.conn.execute(
                "SELECT worker, host, python, modules FROM worker_envs WHERE request_id = ?"
                " ORDER BY reported, worker", (request_id,),
            ).fetchall()
        return [{"worker": w, "host": h, "python": p, "modules": json.loads(m)}
                for w, h, p, m in rows]

    def listen_address_for_port(self, port: int) -> str | None:
        """Return where the last server on ``port`` listened for submitted jobs, if recorded."""
        with self._lock:
            rows = self.conn.execute(
                "SELECT info FROM jobs ORDER BY submitted DESC, rowid DESC"
            ).fetchall()
        for (text,) in rows:
            info = json.loads(text)
            if info.get("port") == port and isinstance(info.get("listen_address"), str):
                return str(info["listen_address"])
        return None

    def get_jobs(self, request_id: int) -> list[JobRecord]:
        """Return the request's recorded jobs, oldest first."""
        self._request_row(request_id, "id")
        with self._lock:
            rows = self.conn.execute(
                "SELECT job_id, array_size, submitted, state, info FROM jobs"
                " WHERE request_id = ? ORDER BY submitted, job_id",
                (request_id,),
            ).fetchall()
        return [JobRecord.from_row(*row) for row in rows]

    def latest_job(self, request_id: int) -> JobRecord | None:
        """Return the request's latest recorded job (the last of :meth:`get_jobs`), or None."""
        self._request_row(request_id, "id")
        with self._lock:
            row = self.conn.execute(
                "SELECT job_id, array_size, submitted, state, info FROM jobs"
                " WHERE request_id = ? ORDER BY submitted DESC, job_id DESC LIMIT 1",
                (request_id,),
            ).fetchone()
        return None if row is None else JobRecord.from_row(*row)
