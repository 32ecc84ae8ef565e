"""What the library reads and records: requests, their tasks' results and errors, jobs.

:class:`Records` is these together, one concern a module: :mod:`.requests` (new
requests and the result cache, the request row as the server reads it:
:class:`CallAuth`), :mod:`.tasks` (task counts, results and errors as the library
returns them, what finished since a mark for the Executor), :mod:`.spans` (a
request's timeline), :mod:`.jobs` (the scheduler jobs submitted for a request,
each a :class:`JobRecord`) and :mod:`.environments` (what its workers reported).
"""

from __future__ import annotations

from .environments import WorkerEnvironments
from .jobs import JobRecord, Jobs
from .requests import CallAuth, Requests, content_digest
from .spans import Spans
from .tasks import ERROR_GROUP_INDICES, TaskReads, error_text

__all__ = [
    "ERROR_GROUP_INDICES",
    "CallAuth",
    "JobRecord",
    "Records",
    "content_digest",
    "error_text",
]


class Records(Requests, TaskReads, Spans, Jobs, WorkerEnvironments):
    """Requests, tasks' outcomes and jobs, as the library stores and reads them."""
