"""Bring a request back under watch from any process: ``sheepdog.attach``.

A map whose process went away (a laptop that slept or shut down, a terminal
closed after ``map_async``) leaves its request in the database with the config
it was submitted with (no secrets: the config holds none). Its workers retried
for ``worker_retry_s``, then spooled what they finished beside the job file and
exited (:mod:`sheepdog.spool`). :func:`attach` picks it up again: the server
back on the port the job files call (and, for ``connect="tunnel"``, the tunnel
started again and its address published), the spool collected, the jobs
checked, the open work resubmitted, and a wait to the end with the progress bar.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from . import worker_address
from .config import ConfigLike, as_config
from .session import Session
from .spool import collect_request_spool
from .store.db import require_database
from .stored_request import RequestJobs

__all__ = ["attach"]

logger = logging.getLogger(__name__)


def attach(
    request_id: int,
    config: ConfigLike,
    *,
    verbose: bool = True,
    timeout_s: float | None = None,
) -> list[tuple[Any, Any]]:
    """Watch a request again from this process until it ends; return ``[(arg, result)]``.

    ``config`` names the database (its ``dbfile``); the request's own stored
    config says where its jobs run (``config`` itself is used for a request
    stored without one). The server is started again on the port the request's
    job files call back to, results that workers spooled while no server
    answered are collected and stored once each, and work whose jobs are gone
    is resubmitted. Ctrl-C acts as in :func:`sheepdog.map` (cancels, unless
    ``keep_jobs_on_interrupt``). Results come back as from
    :func:`sheepdog.get_results`: ``None`` where a task failed.
    """
    cfg = as_config(config)
    require_database(cfg.dbfile)  # before the scheduler opens: the likelier mistake first
    say = _say if verbose else logger.info
    with Session(cfg, create=False) as session:
        storage, request = session.storage, session.request(request_id)
        storage.count_tasks(request_id)  # an unknown id fails here, naming the database
        if request.latest_job() is None:
            # Never submitted (every task from the cache, or a failed submission): nothing runs.
            return session.results(request_id)
        cfg = session.use_stored_config(request_id)
        open_now = storage.open_task_indices(request_id)
        server = session.serve_again(request_id) if open_now else None
        scheduler = session.scheduler
        if server is not None and request.uses_tunnel():
            # The tunnel went with the process (or connection) that held it: workers still
            # retrying find the new relay in the address file; resubmitted jobs use it too.
            where = worker_address.ensure_tunnel(RequestJobs(request, cfg, scheduler, server))
            if where is not None:
                say(f"request {request_id}: the tunnel is up again; workers find the relay "
                    f"at {where[0]}:{where[1]}")
        collected = collect_request_spool(storage, cfg, scheduler.host, request_id)
        if collected.stored or collected.duplicates or collected.rejected:
            say(collected.describe())
        if not storage.open_task_indices(request_id):
            request.delete_leftovers(scheduler)
            return session.results(request_id)
        say(f"attached to request {request_id}: {len(storage.open_task_indices(request_id))}"
            f" tasks open; watching its {scheduler.label} jobs")
        # The session serves the request again (serve_again): its watcher keeps that server up.
        watcher = session.watcher(request_id)
        try:
            session.watch(request_id, verbose=verbose, timeout_s=timeout_s, watcher=watcher)
        except KeyboardInterrupt:
            line = f"request {request_id}: " + session.stop(request_id, "cancelled by Ctrl-C")
            print(f"sheepdog: interrupted: {line}", file=sys.stderr, flush=True)
            raise KeyboardInterrupt(line) from None
        return session.results(request_id)


def _say(message: str) -> None:
    print(f"sheepdog: {message}", file=sys.stderr, flush=True)
