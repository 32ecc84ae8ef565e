"""What each worker of a request reported of its Python and modules.

Part of :class:`~sheepdog.store.records.Records`.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from .db import Database

__all__ = ["WorkerEnvironments"]


class WorkerEnvironments(Database):
    """Keep each worker's report of its environment, and read a request's reports."""

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
