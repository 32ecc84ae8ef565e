"""A request as its database records it, and with what submits and reaches its jobs.

:class:`StoredRequest` answers what the database says about a request and its jobs;
:class:`RequestJobs` adds the config, scheduler and server that submit and reach them.
Shared by :class:`~sheepdog.session.Session`, the Executor, the Watcher, ``attach``,
``sheepdog serve`` and the CLI; it imports none of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .config import Config
from .connect import ConnectMode
from .job_file import job_file_name
from .scheduler import SCHEDULERS, Deletion, Scheduler, open_scheduler
from .server import Server, registry
from .server_for import server_for
from .store import JobRecord, Storage

__all__ = ["RequestJobs", "StoredRequest"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredRequest:
    """A request in a database, as any process finds it: its jobs' name, config and jobs.

    What a process that did not submit the request (``attach``, ``sheepdog serve``, a
    later wait, the CLI) learns from the database alone, and what it does with the
    jobs recorded there.
    """

    storage: Storage
    request_id: int

    def jobs(self) -> list[JobRecord]:
        """The request's recorded jobs, oldest first."""
        return self.storage.get_jobs(self.request_id)

    def latest_job(self) -> JobRecord | None:
        """The request's latest recorded job, or None if it never had one."""
        return self.storage.latest_job(self.request_id)

    def job_name(self) -> str:
        """The name of the request's jobs (``qsub -N``, ``sbatch --job-name``): its job file's.

        That is Grid Engine's own default, so output files keep their usual names; given
        explicitly, it names jobs that a request submitted from another script too. Unique
        per request and database (see :func:`~sheepdog.job_file.job_stem`) and known before
        qsub runs, so the jobs can be found and deleted even when qsub's answer (the job
        id) never arrived.
        """
        return job_file_name(self.request_id, self.storage.get_secret(self.request_id))

    def stored_config(self) -> Config | None:
        """The config the request was submitted with (for its database), or None if not stored.

        ``scheduler="auto"`` becomes the scheduler its jobs were submitted to, so a process
        that watches or cancels them later need not ask the head node again.
        """
        storage = self.storage
        mapping = storage.get_settings(self.request_id).get("config")
        if not isinstance(mapping, dict):
            return None
        values = {**mapping, "dbfile": storage.dbfile}
        if values.get("scheduler", "auto") == "auto":
            latest = self.latest_job()
            if latest is not None and latest.scheduler in SCHEDULERS:
                values["scheduler"] = latest.scheduler
        return Config.from_mapping(values)

    def stored_scheduler(self) -> tuple[Config, Scheduler] | None:
        """The request's stored config and a scheduler opened from it; None if none is stored.

        For a process that did not submit the request (``sheepdog serve``, a later
        wait, a tunnel kept up): the scheduler connects on first use, and the caller
        closes it.
        """
        config = self.stored_config()
        return None if config is None else (config, open_scheduler(config))

    def uses_tunnel(self) -> bool:
        """Whether the request's latest jobs reach their server through the tunnel."""
        latest = self.latest_job()
        return latest is not None and latest.connect is ConnectMode.TUNNEL

    def own_server(self) -> Server | None:
        """This process's running server for the request's latest job, if it has one."""
        latest = self.latest_job()
        port = None if latest is None else latest.port
        return next(
            (s for s in registry.servers(self.storage.dbfile) if s.alive and s.port == port),
            None,
        )

    def delete_jobs(self, scheduler: Scheduler) -> Deletion:
        """Delete the request's jobs, by the ids recorded and by its job name; say what went.

        Jobs that already ended are fine. The name finds a job whose id was never
        recorded (qsub's answer lost to Ctrl-C or a dropped connection).
        """
        return scheduler.delete([job.job_id for job in self.jobs()] + [self.job_name()])

    def delete_leftovers(self, scheduler: Scheduler) -> Deletion | None:
        """Delete a finished request's jobs still on the cluster; say what went.

        Array tasks still queued or starting would find nothing to do, and once the
        server is gone each would hold its slot for the workers' retry time
        (``worker_retry_s``) first. A deletion that fails is logged as a warning.
        None when the request never had a job (every task from the cache).
        """
        if self.latest_job() is None:
            return None
        deletion = self.delete_jobs(scheduler)
        if deletion.error is not None:
            logger.warning("request %d is finished, but %s", self.request_id,
                           deletion.describe())
        return deletion


@dataclass(frozen=True)
class RequestJobs:
    """A stored request with what submits its jobs and reaches them: config, scheduler, server.

    The values that travel together through submitting
    (:func:`~sheepdog.submit_jobs.submit_request`), publishing the workers' address and
    keeping their tunnel up (:func:`~sheepdog.worker_address.ensure_tunnel`).
    """

    request: StoredRequest
    #: The config its jobs are submitted with (the one stored with it, for a later process).
    config: Config
    scheduler: Scheduler
    #: The server its workers call back to; None: the config's
    #: (:func:`~sheepdog.server_for.server_for`).
    server: Server | None = None

    @property
    def storage(self) -> Storage:
        """The request's database."""
        return self.request.storage

    @property
    def request_id(self) -> int:
        """The request's id in its database."""
        return self.request.request_id

    def running_server(self) -> Server:
        """:attr:`server`, or the config's (started if need be)."""
        return self.server if self.server is not None else server_for(self.config)
