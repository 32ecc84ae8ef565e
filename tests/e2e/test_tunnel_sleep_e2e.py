"""The laptop sleeps in tunnel mode (issue #15), on the firewalled cluster.

The execution nodes there have no route to this machine (test_tunnel_e2e proves it), so
every result that arrives after the lid "closes" came through a tunnel opened afterwards:
by ``sheepdog attach`` in a new process, by ``attach`` here, or by ``sheepdog serve``.

Closing the lid is done as a laptop would: the server stops and the SSH connection that
holds the tunnel (map_async keeps it open, see ``tunnel.hold_open``) closes, so the relay
on the head node sees EOF and exits. Nothing is slept on: every wait is a bounded poll.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cluster_fixture import relays_on_head

import sheepdog
from sheepdog import Config, tunnel
from sheepdog.job_file import address_file_name
from sheepdog.poll import poll_until
from sheepdog.scheduler import Scheduler, open_scheduler
from sheepdog.spool import spool_directory
from sheepdog.storage import Storage
from sheepdog.stored_request import StoredRequest

pytestmark = [pytest.mark.e2e, pytest.mark.firewalled]

WAIT_S = 300.0
REPO = Path(__file__).resolve().parents[2]


def slow_square(x: int) -> int:
    import time

    time.sleep(1.0)
    return x * x


def _close_the_lid(storage: Storage, rid: int, cluster: dict[str, Any]) -> None:
    """Stop the request's server and close every SSH connection held for a tunnel."""
    server = StoredRequest(storage, rid).own_server()
    assert server is not None, "map_async left no server running"
    server.stop()
    held = list(tunnel._held)
    assert held, "map_async held no SSH connection open for its tunnel"
    tunnel._held.clear()
    for remote in held:
        remote.close()
    # The relay reads its stdin until the SSH channel closes: then it must be gone.
    assert poll_until(lambda: relays_on_head(cluster) == 0, timeout_s=60, interval_s=0.5), (
        "the relay on the head node outlived its SSH connection"
    )


def _jobs_gone(scheduler: Scheduler, job_ids: list[str]) -> bool:
    listing = scheduler.status(job_ids)
    return listing is not None and not any(job in listing for job in job_ids)


def _address_file(storage: Storage, cfg: Config, scheduler: Scheduler, rid: int) -> str:
    """The request's address file on the cluster, as host:port."""
    path = (f"{scheduler.host.absolute(cfg.ssh_dir).rstrip('/')}/"
            f"{address_file_name(rid, storage.get_secret(rid))}")
    return scheduler.host.read_bytes(path).decode().strip()


def _start(
    walled: dict[str, Any], n: int, worker_retry_s: float, lease_s: float
) -> tuple[Config, int]:
    """map_async ``slow_square`` over 1..n through the tunnel; return once results come in."""
    cfg = Config.from_mapping(dict(walled, connect="tunnel", workers=2, batch=2,
                                   worker_retry_s=worker_retry_s, lease_s=lease_s))
    rid = sheepdog.map_async(slow_square, list(range(1, n + 1)), cfg)
    with Storage(cfg.dbfile) as storage:
        assert poll_until(lambda: storage.count_results(rid) >= 2, timeout_s=WAIT_S), (
            "no result came in through the tunnel"
        )
        assert storage.get_jobs(rid)[-1].connect == "tunnel"
    return cfg, rid


def _check_all_in_once(cfg: Config, rid: int, n: int) -> None:
    with Storage(cfg.dbfile) as storage:
        counts = {k: v for k, v in storage.task_counts(rid).items() if v}
        assert counts == {"done": n}
        assert storage.count_results(rid) == n


def test_workers_spool_and_attach_in_a_new_process_tunnels_again(
    walled: dict[str, Any],
) -> None:
    n = 16
    cfg, rid = _start(walled, n, worker_retry_s=5, lease_s=10)
    with Storage(cfg.dbfile) as storage, open_scheduler(cfg) as scheduler:
        _close_the_lid(storage, rid, walled)
        job_ids = [job.job_id for job in storage.get_jobs(rid)]
        assert poll_until(lambda: _jobs_gone(scheduler, job_ids), timeout_s=WAIT_S,
                          interval_s=1.0, max_interval_s=5.0), "the workers did not give up"
        directory = spool_directory(storage, cfg, scheduler.host, rid)
        spooled = [name for name in scheduler.host.list_dir(directory) or []
                   if name.endswith(".json")]
        assert spooled, f"no worker spooled a result in {directory}"
        before = storage.count_results(rid)
        n_jobs = len(storage.get_jobs(rid))
    # Work is left that neither the server nor the spool has: only a new tunnel brings it.
    assert before + len(spooled) < n, (before, spooled)
    # A new process, named only the database: the request's stored config does the rest.
    done = subprocess.run(
        [sys.executable, "-m", "sheepdog", "attach", str(rid), "--dbfile", cfg.dbfile,
         "--json", "--timeout", str(WAIT_S)],
        capture_output=True, text=True, timeout=WAIT_S + 60, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert [(r["args"], r["result"]) for r in results] == [(x, x * x) for x in range(1, n + 1)]
    # attach started the tunnel before anything else, not at its watcher's first check.
    assert f"request {rid}: the tunnel is up again" in done.stderr, done.stderr
    # Every spool file collected: stored, or already stored if the server had committed it
    # just before the lid closed (its answer lost).
    told = re.search(r"(\d+) spooled results stored, (\d+) already stored", done.stderr)
    assert told is not None, done.stderr
    assert int(told.group(1)) + int(told.group(2)) == len(spooled), done.stderr
    _check_all_in_once(cfg, rid, n)
    with Storage(cfg.dbfile) as storage, open_scheduler(cfg) as scheduler:
        jobs = storage.get_jobs(rid)
        assert len(jobs) > n_jobs, "attach finished without resubmitting the open work"
        assert jobs[-1].connect == "tunnel"
        # The address file names the new relay, where the resubmitted job file points too.
        relay = jobs[-1].url.split("//", 1)[1].rstrip("/")
        assert _address_file(storage, cfg, scheduler, rid) == relay
        assert scheduler.host.list_dir(directory) == []  # collected, then deleted
    # attach's process has exited: its SSH connection, and so its relay, went with it.
    assert poll_until(lambda: relays_on_head(walled) == 0, timeout_s=60, interval_s=0.5)


def test_attach_brings_the_tunnel_back_to_workers_still_retrying(
    walled: dict[str, Any],
) -> None:
    n = 16
    # The workers retry far longer than the lid stays closed: none spools, none exits. Their
    # leases outlast it too, so that attach's watcher finds no stalled work to resubmit.
    cfg, rid = _start(walled, n, worker_retry_s=WAIT_S, lease_s=60)
    with Storage(cfg.dbfile) as storage, open_scheduler(cfg) as scheduler:
        _close_the_lid(storage, rid, walled)
        n_jobs = len(storage.get_jobs(rid))
        assert storage.count_results(rid) < n
    results = sheepdog.attach(rid, {"dbfile": cfg.dbfile, "host": cfg.host}, verbose=False,
                              timeout_s=WAIT_S)
    assert results == [(x, x * x) for x in range(1, n + 1)]
    _check_all_in_once(cfg, rid, n)
    with Storage(cfg.dbfile) as storage, open_scheduler(cfg) as scheduler:
        # The same jobs' workers finished it: they found the new relay in the address file.
        assert len(storage.get_jobs(rid)) == n_jobs
        assert scheduler.host.list_dir(spool_directory(storage, cfg, scheduler.host, rid)) \
            in (None, [])


def test_serve_brings_the_tunnel_back_to_workers_still_retrying(
    walled: dict[str, Any],
) -> None:
    n = 16
    cfg, rid = _start(walled, n, worker_retry_s=WAIT_S, lease_s=60)
    with Storage(cfg.dbfile) as storage:
        _close_the_lid(storage, rid, walled)
        n_jobs = len(storage.get_jobs(rid))
    done = subprocess.run(
        [sys.executable, "-m", "sheepdog", "serve", "--dbfile", cfg.dbfile,
         "--timeout", str(WAIT_S)],
        capture_output=True, text=True, timeout=WAIT_S + 60, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every served request is finished" in done.stdout, done.stdout
    assert f"request {rid}: the tunnel is up" in done.stdout, done.stdout
    _check_all_in_once(cfg, rid, n)
    with Storage(cfg.dbfile) as storage:
        assert len(storage.get_jobs(rid)) == n_jobs  # serve resubmits nothing
    assert poll_until(lambda: relays_on_head(walled) == 0, timeout_s=60, interval_s=0.5)
