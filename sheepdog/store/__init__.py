"""The SQLite store of requests, their tasks, results, errors and scheduler jobs.

One concern per module: :mod:`.db` (the connection, WAL, migrations, the
write queue, blobs), :mod:`.queue` (the lease state machine, made of
:mod:`.leases`, :mod:`.completion`, :mod:`.nonces` and :mod:`.interventions`),
:mod:`.states` (the words a task's and a request's state and a failed task's
kind are stored as), :mod:`.records` (requests, results and jobs as the library reads them, made of
:mod:`.requests`, :mod:`.tasks`, :mod:`.spans`, :mod:`.jobs` and :mod:`.environments`),
:mod:`.upgrade02` (a Sheepdog 0.2.3 database migrated in place) and
:mod:`.compat` (:class:`Storage`, all of it under the name and with the per-task
API of Sheepdog 0.2, still importable as ``sheepdog.storage``).
"""

from __future__ import annotations

from .compat import Storage
from .db import DB_FILE_MODE, DEFAULT_DBFILE, DEFAULT_SETTINGS, SCHEMA_VERSION
from .queue import RERUN_CHOICES, Lease, NonceReusedError
from .records import CallAuth, JobRecord, content_digest
from .states import OPEN_STATES, FailureKind, JobState, RequestState, TaskState

__all__ = [
    "DB_FILE_MODE",
    "DEFAULT_DBFILE",
    "DEFAULT_SETTINGS",
    "OPEN_STATES",
    "RERUN_CHOICES",
    "SCHEMA_VERSION",
    "CallAuth",
    "FailureKind",
    "JobRecord",
    "JobState",
    "Lease",
    "NonceReusedError",
    "RequestState",
    "Storage",
    "TaskState",
    "content_digest",
]
