"""Session: one object owns a map's database, scheduler, server and job directory.

Real parts: ``scheduler="local"`` runs the array tasks as local processes against
the real server (see test_executor.py's ``local_config``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_docs_blocks import REPO, block
from test_executor import LocalJobs, add, local_config

import sheepdog
from sheepdog import storage as storage_module
from sheepdog.errors import StorageError
from sheepdog.scheduler import LocalHost, open_scheduler
from sheepdog.session import Session

WAIT_S = 120.0


def count_storages(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the database of every Storage opened in this process from now on."""
    opened: list[str] = []
    real = storage_module.Storage.__init__

    def counting(self: storage_module.Storage, dbfile: Any = "./sheepdog.sqlite",
                 **kwargs: Any) -> None:
        opened.append(str(dbfile))
        real(self, dbfile, **kwargs)

    monkeypatch.setattr(storage_module.Storage, "__init__", counting)
    return opened


def test_one_storage_per_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``sheepdog.map`` opens its database once: submit, watch, delete, read the results."""
    jobs = LocalJobs(monkeypatch)
    config = local_config(tmp_path, timeout_s=WAIT_S)
    try:
        # The first map starts the database's server, which checks the file once (it starts
        # once per process and database); the next maps find it running.
        assert sheepdog.map(add, [(1, 2)], config, verbose=False) == [3]
        opened = count_storages(monkeypatch)
        assert sheepdog.map(add, [(i, i) for i in range(5)], config, verbose=False) == [
            0, 2, 4, 6, 8
        ]
        assert opened == [config["dbfile"]]
        # A cancel, a rerun and a read are one each too.
        del opened[:]
        rid = sheepdog.map_async(add, [(1, 1)], config)
        assert sheepdog.get_results(rid, config["dbfile"], timeout_s=WAIT_S) == [((1, 1), 2)]
        assert opened == [config["dbfile"]] * 2
    finally:
        jobs.close()
    assert jobs.submitted == 3


def test_job_directory_resolved_once_per_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A map resolves ``ssh_dir`` on the scheduler's host once (over SSH, a round trip)."""
    monkeypatch.setenv("HOME", str(tmp_path))  # a relative ssh_dir is under the home
    jobs = LocalJobs(monkeypatch)
    config = sheepdog.Config.from_mapping(local_config(tmp_path, ssh_dir="jobs", workers=2))
    resolved: list[str] = []
    real = LocalHost.absolute

    def counting(host: LocalHost, directory: str) -> str:
        if not os.path.isabs(directory):
            resolved.append(directory)
        return real(host, directory)

    try:
        with open_scheduler(config) as scheduler:  # the scheduler's own directory aside
            monkeypatch.setattr(LocalHost, "absolute", counting)
            with Session(config, scheduler=scheduler) as session:
                results = session.map(add, [(i, 1) for i in range(6)], verbose=False,
                                      timeout_s=WAIT_S)
                assert results == [1, 2, 3, 4, 5, 6]
                assert resolved == ["jobs"]
                assert session.jobdir == str(tmp_path / "jobs")
    finally:
        jobs.close()
    assert (tmp_path / "jobs").is_dir()


def test_constructing_a_session_touches_nothing(tmp_path: Path) -> None:
    dbfile = tmp_path / "db.sqlite"
    session = Session(local_config(tmp_path, dbfile=str(dbfile)))
    assert not dbfile.exists()
    with pytest.raises(RuntimeError, match="not started"):
        session.storage  # noqa: B018
    with session:
        assert dbfile.exists()
        assert session.start() is session  # starting again is a no-op while open
    session.close()  # safe twice
    with pytest.raises(RuntimeError, match="was closed; make a new Session"):
        session.start()


def test_a_session_that_fails_to_start_is_closed(tmp_path: Path) -> None:
    session = Session(dbfile=str(tmp_path / "missing.sqlite"), create=False)
    with pytest.raises(StorageError, match="missing.sqlite"):
        with session:
            pass
    assert not (tmp_path / "missing.sqlite").exists()
    with pytest.raises(RuntimeError, match="was closed"):
        session.start()


def test_a_reading_session_cannot_submit(tmp_path: Path) -> None:
    dbfile = str(tmp_path / "db.sqlite")
    with Session(local_config(tmp_path, dbfile=dbfile)):
        pass
    with Session(dbfile=dbfile) as session:
        with pytest.raises(RuntimeError, match="dbfile only"):
            session.submit(add, [(1, 2)])


def test_the_api_page_session_runs_as_shown(tmp_path: Path) -> None:
    """The Session example of the API page, in a fresh Python, from an empty home."""
    source = "\n".join(block("api.rst", "import sys").lines)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", source], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[((2, 5), 32), ((3, 2), 9)]\n"


def test_a_scheduler_given_to_a_session_still_has_its_options_checked(tmp_path: Path) -> None:
    from sheepdog.config import Config
    from sheepdog.errors import ConfigError

    dbfile = tmp_path / "db.sqlite"
    config = Config(host="login", scheduler="slurm", ge_opts=["-l h_rt=1:00:00"],
                    dbfile=str(dbfile))
    given = open_scheduler(Config.from_mapping(local_config(tmp_path, dbfile=str(dbfile))))
    with pytest.raises(ConfigError, match="ge_opts.*Slurm"):
        Session(config, scheduler=given).start()
    assert not dbfile.exists()  # refused before the database was made


def test_the_head_node_is_reached_while_the_arguments_are_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resolving the job directory (over SSH on a cluster) overlaps storing the arguments."""
    import threading

    from sheepdog.store.db import Database

    reached = threading.Event()
    real_absolute, real_store = LocalHost.absolute, Database.store_values

    def absolute(host: LocalHost, directory: str) -> str:
        reached.set()
        return real_absolute(host, directory)

    def store_values(db: Database, *args: Any) -> Any:
        assert reached.wait(WAIT_S), "the head node was not reached during the store"
        return real_store(db, *args)

    jobs = LocalJobs(monkeypatch)
    try:
        with Session(local_config(tmp_path)) as session:  # the scheduler's own directory aside
            monkeypatch.setattr(LocalHost, "absolute", absolute)
            monkeypatch.setattr(Database, "store_values", store_values)
            rid = session.submit(add, [(1, 2)])
            session.watch(rid, timeout_s=WAIT_S)
            assert session.values(rid) == [3]
    finally:
        jobs.close()


def test_a_failure_getting_ready_fails_the_submission_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sheepdog.errors import SSHError

    tries: list[str] = []

    def unreachable(host: LocalHost, directory: str) -> str:
        tries.append(directory)
        raise SSHError("cannot reach the head node: no route to host")

    with Session(local_config(tmp_path)) as session:  # the scheduler's own directory aside
        monkeypatch.setattr(LocalHost, "absolute", unreachable)
        with pytest.raises(SSHError, match="no route to host"):
            session.submit(add, [(1, 2), (3, 4)])
        (_, _, error), _second = session.storage.get_task_errors(1)
    assert len(tries) == 1  # not tried again: a login may ask for a one-time code
    assert "the job was never submitted: cannot reach the head node" in error["message"]
