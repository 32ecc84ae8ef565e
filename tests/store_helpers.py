"""The store with the two methods only tests use: the schema version, and a task reset.

Nothing in the library asks for them; tests that check a migration or put
tasks back to pending by hand import this ``Storage`` instead.
"""

from __future__ import annotations

from collections.abc import Iterable

from sheepdog.store import Storage as LibraryStorage
from sheepdog.store.db import OPEN_STATES

__all__ = ["Storage"]


class Storage(LibraryStorage):
    """:class:`sheepdog.store.Storage`, plus what tests ask of it directly."""

    def schema_version(self) -> int:
        """Return the database's ``PRAGMA user_version``."""
        with self._lock:
            return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def reset_tasks(self, request_id: int, indices: Iterable[int]) -> list[int]:
        """Make unfinished-or-failed tasks pending again, attempts from 0, for resubmission.

        Tasks with a result are left alone; so is a cancelled request's work
        unless the request is reopened. Returns the indices changed.
        """
        changed = []
        self._request_row(request_id, "id")
        with self._write() as conn:
            for idx in indices:
                cursor = conn.execute(
                    "UPDATE tasks SET state = 'pending', attempts = 0, lease = NULL,"
                    " lease_expires = NULL, error = NULL, finished = NULL"
                    " WHERE request_id = ? AND idx = ?"
                    f" AND state IN ({', '.join(repr(str(s)) for s in (*OPEN_STATES, 'error'))})",
                    (request_id, idx),
                )
                if cursor.rowcount:
                    changed.append(int(idx))
        return changed
