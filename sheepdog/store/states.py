"""The store's vocabulary: a task's, a request's and a job's states and a failed task's kind.

The store owns these words (its schema's ``CHECK`` constraints and the error
records it writes use them); the layers above compare with these enums instead
of repeating the strings. Each member is a ``str`` equal to the text the
database, the JSON of the wire protocol and users' code hold, so rows read back
as plain strings still compare equal, and ``json.dumps`` and f-strings write
the plain text.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["OPEN_STATES", "FailureKind", "JobState", "RequestState", "StoreWord", "TaskState"]


class StoreWord(str, Enum):
    """A ``str`` enum that formats as its value: the word as stored."""

    def __str__(self) -> str:
        # Messages name the word as stored (state done), on every Python: 3.12
        # formats a mixed-in Enum with str(), older ones with the value.
        return str(self.value)


class TaskState(StoreWord):
    """A task's ``state``: ``pending``, ``leased``, then ``done`` or ``error``; or ``cancelled``."""

    PENDING = "pending"
    LEASED = "leased"
    DONE = "done"
    ERROR = "error"
    CANCELLED = "cancelled"


class RequestState(StoreWord):
    """A request's ``state`` column: ``open`` until cancelled."""

    OPEN = "open"
    CANCELLED = "cancelled"


class JobState(StoreWord):
    """A recorded job's ``state`` column: ``submitted``, or ``error`` once deleted in one."""

    SUBMITTED = "submitted"
    #: The watcher deleted it while the scheduler listed it in an error state.
    ERROR = "error"


class FailureKind(StoreWord):
    """The ``kind`` of a failed or cancelled task's error record.

    The worker stub writes ``exception`` and ``load`` with its own strings (it
    imports nothing of the library); the store and the watcher write the others.
    """

    #: The task raised (a task timeout too: its type says ``TaskTimeout``).
    EXCEPTION = "exception"
    #: The worker could not load the function or its arguments.
    LOAD = "load"
    #: Its worker stopped renewing the lease ``max_attempts`` times.
    LOST = "lost"
    #: Its job left the scheduler's queue with the task still open.
    JOB_LOST = "job_lost"
    #: Its job went into the scheduler's error state.
    JOB_ERROR = "job_error"
    #: Cancelled (``cancel``, Ctrl-C, a timeout): not a failure of the task.
    CANCELLED = "cancelled"
    #: Open in a Sheepdog 0.2.3 database when it was migrated.
    MIGRATED = "migrated"


#: Task states that may still change; the others are final.
OPEN_STATES = (TaskState.PENDING, TaskState.LEASED)
