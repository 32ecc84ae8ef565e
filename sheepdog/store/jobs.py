"""The scheduler jobs submitted for a request, each read as a frozen :class:`JobRecord`.

Part of :class:`~sheepdog.store.records.Records`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..connect import ConnectMode
from ..errors import StorageError
from .db import Database
from .states import JobState

__all__ = ["JobRecord", "Jobs"]

#: The ``connect`` values a job records (``auto`` is resolved before it is submitted).
_JOB_CONNECT = {mode.value: mode for mode in (ConnectMode.DIRECT, ConnectMode.TUNNEL)}


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _number(value: Any) -> int | None:
    return None if value is None else int(value)


def _job_state(state: JobState | str) -> str:
    """The stored word for ``state``; a ValueError naming it when it is no job state."""
    try:
        return JobState(state).value
    except ValueError:
        words = ", ".join(member.value for member in JobState)
        raise ValueError(f"job state {state!r} is not one of {words}") from None


@dataclass(frozen=True)
class JobRecord:
    """One scheduler job recorded for a request, with what its submission recorded.

    The facts live in the job row's ``info`` JSON, which keeps its format: a field
    that a job written by an older sheepdog lacks reads as None (or its default).
    Read with :meth:`Jobs.get_jobs` and :meth:`Jobs.latest_job`.
    """

    job_id: str
    array_size: int
    submitted: float
    state: JobState
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
            state=JobState(str(state)),
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


class Jobs(Database):
    """Record the jobs submitted for a request, their state, and read them back."""

    def add_job(
        self,
        request_id: int,
        job_id: str,
        array_size: int,
        *,
        submitted: float | None = None,
        state: JobState = JobState.SUBMITTED,
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
                    _job_state(state),
                    json.dumps(info or {}),
                ),
            )

    def set_job_state(
        self, request_id: int, job_id: str, state: JobState, info: dict[str, Any] | None = None
    ) -> None:
        """Update a recorded job's state (and replace its info when given)."""
        with self._write() as conn:
            if info is None:
                cursor = conn.execute(
                    "UPDATE jobs SET state = ? WHERE request_id = ? AND job_id = ?",
                    (_job_state(state), request_id, job_id),
                )
            else:
                cursor = conn.execute(
                    "UPDATE jobs SET state = ?, info = ? WHERE request_id = ? AND job_id = ?",
                    (_job_state(state), json.dumps(info), request_id, job_id),
                )
        if cursor.rowcount == 0:
            raise StorageError(f"request {request_id} has no job {job_id!r}")
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
