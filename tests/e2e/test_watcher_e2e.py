"""The watcher and the cluster's leftovers, on a real cluster (issue 12, items 4 and 5).

Each test first makes the situation that fooled sheepdog 0.3 (a login user from
~/.ssh/config, a qstat or squeue that fails, one job in Eqw, jobs that died while another
process waits, Ctrl-C between qsub or sbatch and its answer, a timeout, a script that
exits after map_async) and then checks that no running work is taken for lost and no
job is left behind. Every wait is bounded. They run on Grid Engine and on Slurm, but
for Eqw, which only Grid Engine has.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster_fixture import (
    STATUS_COMMAND,
    STATUS_DOWN_MESSAGE,
    delete_job,
    job_deleted,
    job_listed,
    label_of,
    map_in_thread,
    open_cluster_remote,
    scheduler_of,
)

import sheepdog
from sheepdog import cli
from sheepdog.poll import poll_until
from sheepdog.remote import Remote

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def sleepy_for(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _user_jobs(remote: Remote) -> list[str]:
    """The lines of Grid Engine's qstat for the login user's jobs (none: the cluster is free)."""
    listing = remote.run('qstat -u "$(id -un)"').stdout
    return [line for line in listing.splitlines()[2:] if line.strip()]


def _listed(remote: Remote, job_id: str) -> bool:
    """True while Grid Engine's qstat lists the job (for the Grid Engine-only test)."""
    listing = remote.run('qstat -u "$(id -un)"').stdout
    return any(line.split()[:1] == [job_id] for line in listing.splitlines())


def _wait_deleted(cluster: dict[str, Any], job_id: str, timeout_s: float) -> None:
    """Wait until the job has left the queue or is being deleted (see job_deleted)."""
    _wait_until(lambda: job_deleted(cluster, job_id), f"job {job_id} deleted", timeout_s)


def _wait_until(condition: Callable[[], bool], what: str, timeout_s: float) -> None:
    """Wait for ``condition`` (the one poll helper), failing with ``what`` after ``timeout_s``."""
    assert poll_until(condition, timeout_s=timeout_s, interval_s=0.5), (
        f"not within {timeout_s:g} s: {what}"
    )


def _last_request(dbfile: str) -> int:
    with sheepdog.Storage(dbfile) as storage:
        return max(r["id"] for r in storage.list_requests())


def _counts(dbfile: str, request_id: int) -> dict[str, int]:
    with sheepdog.Storage(dbfile) as storage:
        return storage.task_counts(request_id)


def _leased_in_request_1(dbfile: str) -> bool:
    """True once request 1 exists (map runs in a thread) and has a leased task."""
    if not os.path.exists(dbfile):
        return False
    with sheepdog.Storage(dbfile) as storage:
        if not storage.list_requests():
            return False
        return storage.task_counts(1).get("leased", 0) > 0


def _job_ids(dbfile: str, request_id: int) -> list[str]:
    with sheepdog.Storage(dbfile) as storage:
        return [job.job_id for job in storage.get_jobs(request_id)]


@pytest.fixture
def head(config: dict[str, Any]) -> Iterator[Remote]:
    with open_cluster_remote(config) as remote:
        yield remote


# --- 4. running work is never taken for lost -----------------------------------------------


def test_a_login_user_from_ssh_config_does_not_make_jobs_look_gone(
    config: dict[str, Any], tmp_path: Path
) -> None:
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(f"Host {config['host']}\n    User {config['ssh_user']}\n")
    # The config names another user; ~/.ssh/config's User wins, as our SSH docs show.
    cfg = dict(config, ssh_user="not-sheep", ssh_config=str(ssh_config), retries=0,
               workers=2, timeout_s=240)
    results = sheepdog.map(sleepy_for, [12, 12], cfg, verbose=False)
    assert results == [12, 12], sheepdog.get_errors(_last_request(cfg["dbfile"]), cfg["dbfile"])


@pytest.fixture
def failing_qstat(config: dict[str, Any], head: Remote) -> Iterator[None]:
    """Make the scheduler's status command (qstat, squeue) fail as when its daemon is down.

    A shim directory goes first on PATH through ~/.bashrc, which bash reads for
    commands run over SSH; it is removed afterwards.
    """
    command = STATUS_COMMAND[scheduler_of(config)]
    message = STATUS_DOWN_MESSAGE[scheduler_of(config)]
    shim = f"#!/bin/sh\necho {_quote(message)} >&2\nexit 1\n"
    head.run(
        f"mkdir -p ~/status-shim && printf %s {_quote(shim)} > ~/status-shim/{command} && "
        f"chmod +x ~/status-shim/{command} && touch ~/.bashrc && "
        "{ echo 'export PATH=$HOME/status-shim:$PATH # sheepdog-test'; cat ~/.bashrc; } "
        "> ~/.bashrc.new && mv ~/.bashrc.new ~/.bashrc"
    )
    try:
        probe = head.run(command, check=False)
        assert probe.exit_status != 0 and message in probe.stderr, probe
        yield
    finally:
        head.run("sed -i '/# sheepdog-test$/d' ~/.bashrc; rm -rf ~/status-shim")


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def test_a_failing_qstat_expires_and_resubmits_nothing(
    config: dict[str, Any], failing_qstat: None, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = dict(config, retries=0, workers=2, timeout_s=240)
    with caplog.at_level(logging.WARNING, logger="sheepdog.watch"):
        results = sheepdog.map(sleepy_for, [12, 12], cfg, verbose=False)
    assert results == [12, 12], sheepdog.get_errors(_last_request(cfg["dbfile"]), cfg["dbfile"])
    assert "the cluster did not answer" in caplog.text
    assert len(_job_ids(cfg["dbfile"], _last_request(cfg["dbfile"]))) == 1  # none resubmitted


@pytest.mark.gridengine("Eqw, a job Grid Engine cannot start, is Grid Engine's own state")
def test_one_job_in_eqw_is_deleted_and_the_others_go_on(
    config: dict[str, Any], head: Remote
) -> None:
    cfg = dict(config, retries=0, workers=2, timeout_s=300)
    # The extra job must find a free slot while the map runs, or it waits in qw until the
    # map is over and never reaches Eqw (ci-11, native: 4 slots, still held by the array
    # tasks of the previous test's deleted job). Wait until earlier tests' jobs have left.
    left: list[str] = []

    def cluster_free() -> bool:
        left[:] = _user_jobs(head)
        return not left

    assert poll_until(cluster_free, timeout_s=120, interval_s=0.5), (
        "not within 120 s: earlier tests' jobs have left the cluster; still listed:\n"
        + "\n".join(left)
    )

    thread, outcome = map_in_thread(sleepy_for, [40, 40], cfg)
    try:
        dbfile = cfg["dbfile"]
        _wait_until(lambda: _leased_in_request_1(dbfile), "a task is leased", 180)
        # A second job of the request that Grid Engine cannot start: its directory is missing.
        bad = head.run(
            "qsub -terse -b y -wd /nonexistent/sheepdog-eqw -N sheepdog_eqw /bin/true"
        ).stdout.strip()
        with sheepdog.Storage(dbfile) as storage:
            storage.add_job(1, bad, 1)

        def in_eqw() -> bool:
            listing = head.run('qstat -u "$(id -un)"').stdout
            rows = [line.split() for line in listing.splitlines()]
            return any(row[:1] == [bad] and "E" in row[4] for row in rows if len(row) > 4)

        _wait_until(lambda: in_eqw() or not _listed(head, bad), "the extra job errs", 120)
        thread.join(timeout=300)
        assert not thread.is_alive(), "map did not return"
    finally:
        thread.join(timeout=300)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["results"] == [40, 40]
    with sheepdog.Storage(cfg["dbfile"]) as storage:
        (job,) = [j for j in storage.get_jobs(1) if j.job_id == bad]
    assert job.state == "error"
    assert "/nonexistent/sheepdog-eqw" in job.reason
    assert not _listed(head, bad)


def test_status_wait_in_another_process_ends_when_the_jobs_died(
    config: dict[str, Any],
) -> None:
    cfg = dict(config, workers=1, timeout_s=300)
    request_id = sheepdog.map_async(sleepy_for, [3, 3], cfg)
    dbfile = cfg["dbfile"]
    _wait_until(lambda: _counts(dbfile, request_id).get("leased", 0) > 0, "a task is leased",
                180)
    (job_id,) = _job_ids(dbfile, request_id)
    delete_job(config, job_id)
    _wait_until(lambda: not job_listed(config, job_id), "the job is gone", 60)
    # This process serves the request but watches nothing (map_async); the waiting
    # process must notice the dead job and get the work done.
    proc = subprocess.run(
        [sys.executable, "-m", "sheepdog", "status", str(request_id), "--wait",
         "--timeout", "240", "--dbfile", dbfile],
        capture_output=True, text=True, timeout=300, env=_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert _counts(dbfile, request_id).get("done", 0) == 2
    assert len(_job_ids(dbfile, request_id)) == 2  # the other process resubmitted once


def test_get_results_after_map_async_in_one_process_resubmits_dead_jobs(
    config: dict[str, Any],
) -> None:
    cfg = dict(config, workers=1)
    request_id = sheepdog.map_async(sleepy_for, [3, 3], cfg)
    dbfile = cfg["dbfile"]
    _wait_until(lambda: _counts(dbfile, request_id).get("leased", 0) > 0, "a task is leased",
                180)
    (job_id,) = _job_ids(dbfile, request_id)
    delete_job(config, job_id)
    # This process serves the request, so its wait acts at once, as map's would.
    results = sheepdog.get_results(request_id, dbfile, block=True, timeout_s=150)
    assert results == [(3, 3), (3, 3)]
    assert len(_job_ids(dbfile, request_id)) == 2


# --- 5. nothing left behind ----------------------------------------------------------------


def add(a: int, b: int) -> int:
    return a + b


def test_get_results_deletes_the_array_tasks_a_finished_request_left(
    config: dict[str, Any],
) -> None:
    # Array tasks 2 and 3 are held before their worker starts, as queued or slow-starting
    # tasks are; task 1 does the work. Left alone, each would start after the script has
    # ended and hold its slot for worker_retry_s, waiting for a server that has gone
    # (ci-15: a docs example's map_async + get_results held a slot this way).
    hold = '[ "${SGE_TASK_ID:-$SLURM_ARRAY_TASK_ID}" = 1 ] || sleep 300'
    cfg = dict(config, workers=3, prologue=[hold])
    request_id = sheepdog.map_async(add, [(1, 1), (1, 2), (2, 2)], cfg)
    assert sheepdog.get_results(request_id, cfg["dbfile"], timeout_s=180) == [
        ((1, 1), 2), ((1, 2), 3), ((2, 2), 4)
    ]
    (job_id,) = _job_ids(cfg["dbfile"], request_id)
    _wait_deleted(config, job_id, 60)


def test_ctrl_c_between_qsub_and_its_answer_leaves_no_job(
    config: dict[str, Any], tmp_path: Path
) -> None:
    script = tmp_path / "interrupted_submit.py"
    # The interrupt lands after qsub (sbatch) went through but before its answer was read,
    # as a Ctrl-C 1.6 s into a map did on the Docker cluster.
    script.write_text(
        "import json, sys, sheepdog\n"
        "from sheepdog.scheduler import scheduler_class\n"
        f"cls = scheduler_class({scheduler_of(config)!r})\n"
        "real = cls.submit\n"
        "def submit(self, *args, **kwargs):\n"
        "    real(self, *args, **kwargs)\n"
        "    raise KeyboardInterrupt\n"
        "cls.submit = submit\n"
        "def slow(x):\n"
        "    import time\n"
        "    time.sleep(60)\n"
        "sheepdog.map(slow, range(3), json.loads(sys.argv[1]), verbose=False)\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(config)],
        capture_output=True, text=True, timeout=180, env=_env(),
    )
    assert proc.returncode != 0
    lines = [
        line for line in proc.stderr.splitlines() if line.startswith("sheepdog: interrupted")
    ]
    assert len(lines) == 1, proc.stderr
    label = label_of(config)
    assert "deleted" in lines[0] and f"{label} job" in lines[0], lines[0]
    job_id = lines[0].split(f"{label} job ")[1].split(",")[0].split()[0]
    errors = sheepdog.get_errors(1, config["dbfile"])
    assert len(errors) == 3
    assert all(job_id in error.message and "interrupted" in error.message for _, error in errors)
    _wait_deleted(config, job_id, 60)


def test_cancel_finds_a_job_whose_id_was_never_recorded(
    config: dict[str, Any], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    request_id = sheepdog.map_async(sleepy_for, [60, 60], config)
    dbfile = config["dbfile"]
    (job_id,) = _job_ids(dbfile, request_id)
    with sheepdog.Storage(dbfile) as storage:  # as if qsub's answer had been lost
        storage.conn.execute("DELETE FROM jobs")
    config_file = tmp_path / "cluster.json"
    config_file.write_text(json.dumps(config))
    assert cli.main(["cancel", str(request_id), "--config", str(config_file),
                     "--dbfile", dbfile]) == 0
    out = capsys.readouterr().out
    assert f"deleted {label_of(config)} job {job_id}" in out, out
    _wait_deleted(config, job_id, 60)


def test_map_timeout_deletes_the_jobs_and_says_so(config: dict[str, Any]) -> None:
    with pytest.raises(sheepdog.TimeoutError) as info:
        sheepdog.map(sleepy_for, [120, 120], config, verbose=False, timeout_s=20)
    request_id = _last_request(config["dbfile"])
    (job_id,) = _job_ids(config["dbfile"], request_id)
    message = str(info.value)
    assert "0 of 2 tasks finished within 20 s" in message
    assert "cancelled 2 open tasks" in message
    assert f"deleted {label_of(config)} job {job_id}" in message
    assert _counts(config["dbfile"], request_id).get("cancelled", 0) == 2
    _wait_deleted(config, job_id, 60)


def test_map_async_then_exit_warns_and_serve_cleans_up(
    config: dict[str, Any], tmp_path: Path
) -> None:
    script = tmp_path / "fire_and_forget.py"
    script.write_text(
        "import json, sys, sheepdog\n"
        "print(sheepdog.map_async(abs, [-1, -2], json.loads(sys.argv[1])))\n"
    )
    # Held (qsub -h, sbatch --hold) until the notes below are read: the cluster runs a job within
    # a second, which finished both tasks while the script was exiting, so no note was due.
    # Then one array task at a time (-tc 1, %1): the first does both tasks; the other waits.
    hold, release = (("--hold", "scontrol release") if scheduler_of(config) == "slurm"
                     else ("-h", "qrls"))
    cfg = dict(config, workers=3, max_running=1, scheduler_opts=[hold])
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(cfg)],
        capture_output=True, text=True, timeout=180, env=_env(),
    )
    assert proc.returncode == 0, proc.stderr
    request_id = int(proc.stdout.strip())
    said = " ".join(proc.stderr.split())  # folded to 80 columns between words
    assert f"request {request_id} still has 2 open tasks" in said, proc.stderr
    assert "was its only server" in said and "sheepdog serve" in said, proc.stderr
    dbfile = cfg["dbfile"]
    status = subprocess.run(
        [sys.executable, "-m", "sheepdog", "status", str(request_id), "--dbfile", dbfile],
        capture_output=True, text=True, timeout=60, env=_env(),
    )
    # The note is folded to fit 80 columns, wherever the database's path puts the breaks; it
    # goes to stderr, so that `| tail -1` gets the command's own output.
    said = " ".join(status.stderr.split())
    assert "no server is serving it" in said and "sheepdog serve" in said, status.stderr
    requests = subprocess.run(
        [sys.executable, "-m", "sheepdog", "requests", "--dbfile", dbfile],
        capture_output=True, text=True, timeout=60, env=_env(),
    )
    said = " ".join(requests.stderr.split())
    assert f"request {request_id} has open tasks but no server" in said, requests.stderr
    (job_id,) = _job_ids(dbfile, request_id)
    with open_cluster_remote(config) as remote:
        remote.run(f"{release} {job_id}")
    serve = subprocess.run(
        [sys.executable, "-m", "sheepdog", "serve", "--dbfile", dbfile, "--timeout", "240"],
        capture_output=True, text=True, timeout=300, env=_env(),
    )
    assert serve.returncode == 0, serve.stderr
    assert sheepdog.get_results(request_id, dbfile, block=False) == [(-1, 1), (-2, 2)]
    assert f"request {request_id} is finished" in serve.stdout, serve.stdout
    # Without the deletion, the queued array tasks start after serve has gone and wait.
    _wait_deleted(config, job_id, 20)
