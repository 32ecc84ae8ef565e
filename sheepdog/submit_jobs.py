"""Submit a stored request's jobs: render the job file, copy it with its key, submit, record.

What :class:`~sheepdog.session.Session` (map, rerun) and the Watcher (which resubmits
work whose jobs were lost) share; it imports neither.
"""

from __future__ import annotations

import logging
from typing import Any

from . import tunnel
from .job_file import (
    ADDRESS_FILE_MODE,
    JOB_FILE_MODE,
    KEY_FILE_MODE,
    address_file_name,
    job_file,
    key_file_name,
    put_stub,
    spool_dir_name,
)
from .progress import finished_by_workers
from .server.tls import fingerprint_sha256
from .sizing import job_sizes
from .stored_request import RequestJobs
from .worker_address import address_line, server_port, worker_address

__all__ = ["submit_request"]

logger = logging.getLogger(__name__)


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
    mode = tunnel.choose_mode(
        config.connect, scheduler.host, config.localhost, server_port(server))
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
        (address_name, address_line(host, port), ADDRESS_FILE_MODE),
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
