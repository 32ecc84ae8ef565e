"""A request's jobs as typed records: :class:`JobRecord`, ``get_jobs`` and ``latest_job``."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from sheepdog.config import CONNECT_MODES, Config
from sheepdog.connect import ConnectMode
from sheepdog.errors import UnknownRequestError
from sheepdog.store import JobRecord, Storage

#: What submit_request records with a job (see sheepdog/submit_jobs.py), resubmitted once.
SUBMITTED = {
    "url": "https://laptop.example:8443/", "port": 8443, "listen_address": "0.0.0.0",
    "connect": "tunnel", "finished_before": 5, "parts": 2, "scheduler": "slurm",
    "why": "job 41 left the queue", "continues": True, "part": 2,
}


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Storage]:
    with Storage(str(tmp_path / "db.sqlite")) as storage:
        yield storage


def new(db: Storage) -> int:
    return db.new_request(b"FUNC", b"", [b"a", b"b"])


def test_a_job_reads_as_a_typed_record(db: Storage) -> None:
    rid = new(db)
    db.add_job(rid, "42", 7, submitted=10.0, info=SUBMITTED)
    (job,) = db.get_jobs(rid)
    assert (job.job_id, job.array_size, job.submitted, job.state) == ("42", 7, 10.0, "submitted")
    assert (job.url, job.port, job.listen_address) == ("https://laptop.example:8443/", 8443,
                                                       "0.0.0.0")
    assert job.connect is ConnectMode.TUNNEL
    assert (job.finished_before, job.part, job.parts, job.scheduler) == (5, 2, 2, "slurm")
    assert (job.why, job.continues, job.before_rerun, job.reason) == (
        "job 41 left the queue", True, False, None)
    assert job.info == SUBMITTED
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.state = "error"  # type: ignore[misc]
    with pytest.raises(TypeError):
        job.info["port"] = 1  # type: ignore[index]


def test_a_job_written_by_an_older_sheepdog_reads_with_defaults(db: Storage) -> None:
    """Rows from before a fact was recorded (no connect, no part...) and bare rows load."""
    rid = new(db)
    with db._write() as conn:
        conn.execute(
            "INSERT INTO jobs (request_id, job_id, array_size, submitted, state, info)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (rid, 7, 3, 1, "submitted", json.dumps({"url": "http://h:9/", "port": "9"})),
        )
        conn.execute(
            "INSERT INTO jobs (request_id, job_id, array_size, submitted, state, info)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (rid, "8", 3, 2.0, "submitted", "{}"),
        )
    old, bare = db.get_jobs(rid)
    assert (old.job_id, old.url, old.port, old.listen_address) == ("7", "http://h:9/", 9, None)
    assert (old.connect, old.finished_before, old.scheduler, old.why) == (None, None, None, None)
    assert (old.part, old.parts, old.continues, old.before_rerun) == (1, 1, False, False)
    assert bare.job_id == "8" and bare.info == {} and bare.port is None and bare.url is None


def test_a_record_without_a_known_connect_mode_has_none() -> None:
    for value in ("auto", "carrier-pigeon", None, 3):
        job = JobRecord.from_row("1", 1, 0.0, "submitted", json.dumps({"connect": value}))
        assert job.connect is None, value
    job = JobRecord.from_row("1", 1, 0.0, "submitted", '{"connect": "direct"}')
    assert job.connect is ConnectMode.DIRECT


def test_changed_facts_are_written_back_in_the_stored_format(db: Storage) -> None:
    rid = new(db)
    db.add_job(rid, "42", 2, info={"connect": "direct", "port": 9, "future_key": [1]})
    (job,) = db.get_jobs(rid)
    db.set_job_state(rid, job.job_id, job.state, job.with_info(connect=ConnectMode.TUNNEL))
    with db._lock:
        (text,) = db.conn.execute("SELECT info FROM jobs WHERE job_id = '42'").fetchone()
    assert json.loads(text) == {"connect": "tunnel", "port": 9, "future_key": [1]}
    latest = db.latest_job(rid)
    assert latest is not None and latest.connect is ConnectMode.TUNNEL


def test_the_latest_job_is_the_last_of_get_jobs(db: Storage) -> None:
    rid, other = new(db), new(db)
    assert db.latest_job(rid) is None
    db.add_job(rid, "100", 1, submitted=5.0)
    db.add_job(rid, "99", 1, submitted=20.0, info={"part": 1})
    db.add_job(rid, "98", 1, submitted=20.0, info={"part": 2})  # same time: by job id
    db.add_job(other, "200", 1, submitted=30.0)
    latest = db.latest_job(rid)
    assert latest == db.get_jobs(rid)[-1]
    assert latest is not None and latest.job_id == "99" and latest.part == 1
    assert len({latest, db.get_jobs(rid)[-1]}) == 1  # frozen: a record is a value
    with pytest.raises(UnknownRequestError):
        db.latest_job(99)


def test_connect_modes_are_the_text_users_write_and_the_database_stores() -> None:
    assert CONNECT_MODES == ("direct", "tunnel", "auto")
    assert ConnectMode("tunnel") is ConnectMode.TUNNEL
    assert ConnectMode.TUNNEL == "tunnel" and f"connect={ConnectMode.AUTO}" == "connect=auto"
    assert json.dumps({"connect": ConnectMode.DIRECT}) == '{"connect": "direct"}'
    assert Config(host="h", connect="tunnel").connect == ConnectMode.TUNNEL
