"""A request's timeline: each task drawn from its lease to its result, and counted in bins.

Part of :class:`~sheepdog.store.records.Records`.
"""

from __future__ import annotations

from .db import OPEN_STATES_SQL, Database
from .tasks import ERROR_KIND_SQL

__all__ = ["Spans"]

# A timeline's view of a task's row (named parameter :now): drawn unless pending or never
# leased nor finished; from its lease (else its finish) to its finish (to now while open).
_DRAWN = "state != 'pending' AND coalesce(started, finished) IS NOT NULL"
_BEGIN = "coalesce(started, finished)"
_END = (f"max(coalesce(started, finished), CASE WHEN state IN {OPEN_STATES_SQL} THEN :now"
        " ELSE coalesce(finished, :now) END)")


class Spans(Database):
    """Read the spans of a request's tasks for a timeline: each one, their extent, in bins."""

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
                f"SELECT idx, state, host, worker, {_BEGIN}, {_END}, {ERROR_KIND_SQL}"  # noqa: S608 - fixed SQL, bound values
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
                f" {bin_of(_BEGIN)} AS b, {bin_of(_END)} AS e, state, {ERROR_KIND_SQL} AS kind"
                f" FROM tasks WHERE request_id = :rid AND {_DRAWN})"
                " GROUP BY lane, b, e, state, kind",
                {"rid": request_id, "now": now, "start": start, "bin_s": bin_s,
                 "last": bins - 1},
            ).fetchall()
        return [(lane_name, int(b), int(e), str(st), kind, int(n))
                for lane_name, b, e, st, kind, n in rows]
