"""Submit a stored request to its scheduler, and the servers its workers call back to.

What :class:`~sheepdog.session.Session` (map, rerun, cancel), the Executor and the Watcher
(which resubmits work whose jobs were lost) share; it imports none of them.
:class:`StoredRequest` answers what the database says about a request and its jobs;
:class:`RequestJobs` adds the config, scheduler and server that submit and reach them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from . import tunnel
from ._connect import ConnectMode
from ._net import host_port, loopback_for
from ._progress import finished_by_workers
from .config import Config
from .errors import ServerError
from .job_file import (
    ADDRESS_FILE_MODE,
    JOB_FILE_MODE,
    KEY_FILE_MODE,
    address_file_name,
    job_file,
    job_file_name,
    key_file_name,
    put_stub,
    spool_dir_name,
)
from .scheduler import SCHEDULERS, Deletion, Scheduler, open_scheduler, scheduler_class
from .server import Server, get_server, listen_address, registry
from .server.tls import certificate_for, fingerprint_sha256
from .store import JobRecord, Storage

__all__ = [
    "RequestJobs",
    "StoredRequest",
    "array_size",
    "batch_size",
    "ensure_tunnel",
    "job_sizes",
    "publish_address",
    "request_settings",
    "server_for",
    "server_key",
    "server_options",
    "submit_request",
    "worker_address",
]

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

    The values that travel together through submitting (:func:`submit_request`),
    publishing the workers' address and keeping their tunnel up (:func:`ensure_tunnel`).
    """

    request: StoredRequest
    #: The config its jobs are submitted with (the one stored with it, for a later process).
    config: Config
    scheduler: Scheduler
    #: The server its workers call back to; None: the config's (:func:`server_for`).
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


def array_size(config: Config, n_tasks: int) -> int:
    """How many array tasks to submit for ``n_tasks`` tasks, over one or several jobs.

    More than the cluster's ``max_aj_tasks`` are split into several jobs by
    :func:`job_sizes`, not capped. Without ``workers``, the scheduler's
    ``default_max_workers`` caps it.
    """
    default = scheduler_class(config.scheduler).default_max_workers
    workers = config.workers if config.workers is not None else min(n_tasks, default)
    return max(1, min(workers, n_tasks))


def job_sizes(n_workers: int, per_job: int) -> list[int]:
    """Split ``n_workers`` array tasks into jobs of at most ``per_job`` each (0: one job)."""
    if per_job <= 0 or n_workers <= per_job:
        return [n_workers]
    full, rest = divmod(n_workers, per_job)
    return [per_job] * full + ([rest] if rest else [])


def batch_size(config: Config, n_tasks: int, workers: int) -> int:
    """How many tasks an array task leases at once.

    Enough that tiny tasks do not pay a round trip each, small enough that
    every array task gets a share and a lost worker loses little.
    """
    if config.batch is not None:
        return config.batch
    return max(1, min(64, n_tasks // (workers * 4)))


def request_settings(config: Config, n_tasks: int) -> dict[str, Any]:
    """The settings stored with a request: what the server hands to every worker, and more.

    ``config`` (the config, which holds no secret) lets any process watch the
    request's jobs.
    """
    workers = array_size(config, n_tasks)
    return {
        "config": config.as_dict(),
        "lease_s": float(config.lease_s),
        "heartbeat_s": max(0.5, config.lease_s / 4),
        "task_timeout_s": config.task_timeout_s,
        "batch": batch_size(config, n_tasks, workers),
        "capture_bytes": config.capture_bytes,
        "max_attempts": config.retries + 1,
        "tasks_per_worker": config.tasks_per_worker,
        "workers": workers,
    }


def server_options(config: Config, host: str | None = None) -> dict[str, Any]:
    """How the config's server listens: on ``host`` (default: where the config says), with
    its certificate under ``tls``."""
    options: dict[str, Any] = {}
    if config.tls:
        files = certificate_for(config.dbfile)
        options = {"certfile": files.certfile, "keyfile": files.keyfile}
    options["host"] = host or config.listen_address or listen_address(config.localhost)
    if config.max_blob_bytes is not None:
        options["max_blob_bytes"] = config.max_blob_bytes
    return options


def server_key(config: Config) -> tuple[str, bool]:
    """The registry's key of the config's random-port server: one per database and TLS setting.

    HTTP and HTTPS servers on one database may run side by side.
    """
    return (os.path.abspath(config.dbfile), config.tls)


def server_for(config: Config) -> Server:
    """The running server for the config: its fixed port, or one random-port server per dbfile.

    The original's ``get_server(None, ...)`` keeps one server for every
    ``port=None`` call and refuses another database; maps with different
    dbfiles in one process must just work, so each database gets its own
    (kept in :data:`sheepdog.server.registry`, the one registry).
    """
    options = server_options(config)
    if config.port is not None:
        fixed = get_server(config.port, None, config.dbfile, **options)
        if (fixed.scheme == "https") != config.tls:
            raise ServerError(
                f"the server on port {config.port} serves {fixed.scheme}, but this config has "
                f"tls={config.tls}; use another port or the same tls setting"
            )
        return fixed
    return registry.share(server_key(config), lambda: Server(None, None, config.dbfile, **options))


def submit_request(
    jobs: RequestJobs,
    *,
    n_workers: int,
    why: str | None = None,
    continues: bool = False,
    jobdir: str | None = None,
) -> str:
    """Render, copy and submit the job file for a stored request; record and return the job ids.

    ``n_workers`` array tasks go into as many jobs as the cluster's ``max_aj_tasks`` and
    ``max_aj_instances`` need (read once per connection); the ids come back comma-separated.
    A resubmission records ``why`` with its jobs, and whether it ``continues`` work that
    the last jobs left open after making progress (workers that stopped before their
    run-time limit), which does not count against ``retries``. A
    :class:`~sheepdog.session.Session` passes the ``jobdir`` it resolved (the absolute
    ``ssh_dir``) and its server, so that a map asks for each once.
    """
    storage, config, request_id, scheduler = (
        jobs.storage, jobs.config, jobs.request_id, jobs.scheduler)
    sizes = job_sizes(n_workers, scheduler.array_limits().per_job)
    server = jobs.running_server()
    mode = tunnel.choose_mode(config.connect, scheduler.host, config.localhost, _port(server))
    host, port = worker_address(config, scheduler, server, mode, tasks=n_workers)
    url = server.url_for(host).rsplit(":", 1)[0] + f":{port}/"
    fingerprint = None
    if server.certfile is not None:
        with open(server.certfile, encoding="ascii") as cert:
            fingerprint = fingerprint_sha256(cert.read())
    secret = storage.get_secret(request_id)
    kind = scheduler.kind  # for "auto", asks the head node (once per login)
    options = config.job_options(kind)
    # The job file names the key file beside it; the secret itself never goes into a job
    # script, which Grid Engine copies world-readable onto the execution nodes.
    jobdir = (jobdir or scheduler.host.absolute(config.ssh_dir)).rstrip("/") + "/"
    key_name = key_file_name(request_id, secret)
    name = jobs.request.job_name()
    # Workers that cannot reach the server for worker_retry_s spool their results beside
    # the job file (see sheepdog/spool.py).
    client_options = {"retry_s": float(config.worker_retry_s),
                      "spool_dir": jobdir + spool_dir_name(request_id, secret)}
    address_name = address_file_name(request_id, secret)
    client_options["address_file"] = jobdir + address_name
    text = job_file(
        url, jobdir + key_name, request_id,
        storage.count_tasks(request_id), config.shell, options,
        array_size=sizes[0], tls_fingerprint=fingerprint, prologue=config.prologue,
        scheduler=kind, max_running=config.max_running, client_options=client_options,
    )
    # The job file runs the worker stub beside it: written once per version, before any job.
    put_stub(scheduler.host, jobdir)
    # The key file first, made 0600 before the secret is written; both never on a command line.
    scheduler.host.put(jobdir.rstrip("/") or "/", [
        (key_name, secret + "\n", KEY_FILE_MODE),
        (address_name, _address_line(host, port), ADDRESS_FILE_MODE),
        (name, text, JOB_FILE_MODE),
    ])
    logger.info("deployed job file for request %d to %s:%s", request_id,
                scheduler.host.host, jobdir + name)
    # The original's defaults: the jobs run and write their output in ssh_dir, resolved on
    # the head node, unless the raw options say otherwise (then only what they leave out).
    workdir = jobdir
    counts = storage.task_counts(request_id)
    info: dict[str, Any] = {
        "url": url, "port": server.port, "listen_address": server.host, "connect": mode,
        # Tasks finished before these jobs: the watcher sees whether they made progress.
        "finished_before": finished_by_workers(counts),
        "parts": len(sizes),
        # What "auto" found: later processes watch and cancel the jobs without asking again.
        "scheduler": scheduler.name,
    }
    if why is not None:
        info.update(why=why, continues=continues)
    job_ids: list[str] = []
    for part, size in enumerate(sizes, 1):
        job_id = scheduler.submit(
            jobdir + name, name=name, array_size=size, workdir=workdir, split=len(sizes) > 1,
            max_running=config.max_running, raw_options=config.raw_options or (),
        )
        logger.info("request %d submitted as %s job %s", request_id, scheduler.label, job_id)
        # `sheepdog serve` restarts the server on this port: the job file holds this URL.
        storage.add_job(request_id, job_id, size, info=dict(info, part=part))
        job_ids.append(job_id)
    return ", ".join(job_ids)


def _address_line(host: str, port: int) -> str:
    """The address file's text: ``host:port``, an IPv6 address in brackets."""
    return host_port(host, port) + "\n"


def _local_target(server: Server) -> tuple[str, int]:
    """Where this process reaches its own server (for the tunnel's forwarded connections)."""
    return loopback_for(server.host or ""), _port(server)


def _port(server: Server) -> int:
    """The running server's port (a started server always has one)."""
    if server.port is None:
        raise ServerError("the server has no port: it was never started")
    return server.port


def worker_address(
    config: Config, scheduler: Scheduler, server: Server, mode: ConnectMode, *, tasks: int = 0
) -> tuple[str, int]:
    """Where workers reach ``server`` in ``mode``: ``localhost``:port, or the tunnel's relay.

    ``tasks``: the array tasks about to be submitted, for the relay's connection cap.
    """
    return tunnel.worker_address(
        mode, scheduler.host, _port(server), lambda: _local_target(server),
        (config.localhost, _port(server)), relay_address=config.relay_address,
        connections_per_task=config.relay_connections_per_task, tasks=tasks,
    )


def publish_address(jobs: RequestJobs, mode: ConnectMode) -> tuple[str, int]:
    """Write where workers reach the server now (``mode``) into the request's address file.

    Workers read it at every reconnection, so moving to the tunnel, or a relay started
    again on another port, costs them one retry. Returns the address written.
    """
    config, scheduler = jobs.config, jobs.scheduler
    host, port = worker_address(config, scheduler, jobs.running_server(), mode)
    name = address_file_name(jobs.request_id, jobs.storage.get_secret(jobs.request_id))
    scheduler.host.put(config.ssh_dir, [(name, _address_line(host, port), ADDRESS_FILE_MODE)])
    return host, port


def ensure_tunnel(jobs: RequestJobs) -> tuple[str, int] | None:
    """Start the tunnel to ``server`` if it is down, and publish the relay's address.

    For a request whose workers go through the tunnel and whose tunnel went with an SSH
    connection (dropped, or closed with the process that held it: a laptop that slept).
    Workers read the address file at their next retry. Returns the address published,
    or None when the tunnel was up. Raises SSHError when it cannot start.
    """
    if tunnel.is_up(jobs.scheduler.host, _port(jobs.running_server())):
        return None
    return publish_address(jobs, ConnectMode.TUNNEL)
