"""A request's state as one object: :func:`status`, which a notebook shows as HTML.

Its ``_repr_html_`` is the dashboard's progress bar and timeline, drawn on the
server side as SVG, so a notebook shows them inline with no script and no
server; printed, it is the one line ``sheepdog status`` prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

from ..progress import format_counts
from ..store import DEFAULT_DBFILE, Storage
from .data import RequestSummary, Timeline, request_summary, timeline
from .svg import progress_html, timeline_svg

__all__ = ["RequestStatus", "status"]


@dataclass(frozen=True)
class RequestStatus:
    """A request's state, task counts and timeline, as read at one moment."""

    summary: RequestSummary
    timeline: Timeline
    dbfile: str

    @property
    def id(self) -> int:
        """The request id."""
        return self.summary.id

    @property
    def state(self) -> str:
        """``running``, ``finished`` or ``cancelled``."""
        return self.summary.state

    @property
    def counts(self) -> dict[str, int]:
        """Tasks in each stored state (``pending``, ``leased``, ``done``, ``error``...)."""
        return dict(self.summary.counts)

    def __str__(self) -> str:
        s = self.summary
        return f"request {s.id}: {s.state}, {format_counts(s.counts, s.n_tasks)}"

    def __repr__(self) -> str:
        return f"<RequestStatus {self}>"

    def _repr_html_(self) -> str:
        s = self.summary
        return (f'<div class="sheepdog-status"><p style="font-family:sans-serif">'
                f"<b>request {s.id}</b>: {escape(s.function)} on {escape(s.scheduler)}, "
                f"<b>{escape(s.state)}</b></p>"
                + progress_html(s.counts, s.n_tasks) + timeline_svg(self.timeline) + "</div>")


def status(request_id: int, dbfile: str = DEFAULT_DBFILE) -> RequestStatus:
    """Read a request's state, counts and timeline; in a notebook it shows as a chart.

    Call it again to see it move; the database is only read (never created).
    """
    with Storage(dbfile, create=False) as storage:
        summary = request_summary(storage, request_id)
        return RequestStatus(summary, timeline(storage, request_id), dbfile)
