"""Reruns and the Executor's incremental reads, without Grid Engine.

Storage tests use a real SQLite file; the end-to-end rerun runs real job files
as local processes against the real server (``scheduler="local"``; its jobs
are counted by :class:`LocalJobs`, from test_executor).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_executor import WAIT_S, LocalJobs, add, local_config

import sheepdog
import sheepdog.executor
import sheepdog.stored_request
import sheepdog.submit_jobs
from sheepdog.config import Config
from sheepdog.errors import UnknownRequestError
from sheepdog.executor import Executor
from sheepdog.poll import poll_until
from sheepdog.scheduler import open_scheduler
from sheepdog.serialisation import serialise_value
from sheepdog.storage import Storage
from sheepdog.store.db import MIGRATIONS


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Storage]:
    with Storage(str(tmp_path / "sheepdog.sqlite")) as storage:
        yield storage


def fail(db: Storage, rid: int, index: int, message: str = "boom") -> None:
    db.complete(rid, [{"index": index, "ok": False,
                       "error": {"type": "ValueError", "message": message, "traceback": "TB"}}])


def test_rerun_chooses_failed_lost_and_cancelled_and_keeps_history(db: Storage) -> None:
    rid = db.new_request(b"F", b"", [b"a"] * 8)
    db.complete(rid, [{"index": 1, "ok": True, "value": b"R1"}])
    fail(db, rid, 2)
    db.fail_tasks(rid, [3], "lost", "the worker died")
    db.fail_tasks(rid, [6], "job_lost", "the job left the queue")
    db.fail_tasks(rid, [7], "job_error", "the job sat in Eqw")
    db.fail_tasks(rid, [8], "submit", "the job was never submitted")
    db.cancel(rid)  # 4 and 5 become cancelled, the request too
    assert db.task_states(rid) == ["done", "error", "error", "cancelled", "cancelled"] + [
        "error"] * 3

    # "lost" picks only the lost ones; "failed" every failed task, lost ones included.
    assert db.rerun_tasks(rid, ["lost"]) == [3, 6, 7]
    assert db.get_request_state(rid) == "open"  # reopened: workers may lease again
    assert db.task_states(rid)[:5] == ["done", "error", "pending", "cancelled", "cancelled"]
    db.fail_tasks(rid, [3], "lost", "the worker died again")
    assert db.rerun_tasks(rid, ["failed", "cancelled"]) == [2, 3, 4, 5, 8]
    assert db.task_states(rid) == ["done"] + ["pending"] * 7
    assert db.rerun_tasks(rid, ["failed", "lost", "cancelled"]) == []  # nothing ended
    assert db.get_results(rid) == [(b"a", b"R1")]  # a result is never rerun

    fail(db, rid, 2, "boom again")
    assert db.rerun_tasks(rid, ["failed"]) == [2]
    history = db.get_task_history(rid, 2)
    assert [h["run"] for h in history] == [1, 2]
    assert [h["error"]["message"] for h in history] == ["boom", "boom again"]
    assert db.get_task_history(rid, 3)[0]["error"]["kind"] == "lost"
    assert db.get_task_history(rid, 4)[0]["state"] == "cancelled"
    assert db.get_task_history(rid, 1) == []


def test_rerun_refuses_unknown_choices_and_requests(db: Storage) -> None:
    rid = db.new_request(b"F", b"", [b"a"])
    with pytest.raises(ValueError, match="'broken'.*failed, lost, cancelled"):
        db.rerun_tasks(rid, ["broken"])
    with pytest.raises(ValueError, match="choose one or more"):
        db.rerun_tasks(rid, [])
    with pytest.raises(UnknownRequestError):
        db.rerun_tasks(rid + 1, ["failed"])


def test_tasks_finished_before_the_finish_log_are_in_it(tmp_path: Path) -> None:
    path = str(tmp_path / "v2.sqlite")
    conn = sqlite3.connect(path, isolation_level=None)
    for step in MIGRATIONS[:2]:
        step(conn)
    conn.execute("PRAGMA user_version = 2")
    conn.execute("INSERT INTO requests (id, created, func, secret, n_tasks) VALUES"
                 " (1, 0, x'00', 'S', 2)")
    conn.execute("INSERT INTO tasks (request_id, idx, args, state, result, finished) VALUES"
                 " (1, 1, x'00', 'pending', NULL, NULL), (1, 2, x'00', 'done', x'52', 5)")
    conn.close()
    with Storage(path) as db:
        _, rows = db.finished_since(1)
        assert [(i, s, r) for i, s, r, _ in rows] == [(2, "done", b"R")]


def test_finished_since_gives_each_finished_task_once(db: Storage) -> None:
    rid = db.new_request(b"F", b"", [b"a"] * 4)
    other = db.new_request(b"F", b"", [b"a"] * 2)
    assert db.finished_since(rid) == (0, [])
    # Two tasks finish in one call, so in the same second: both come, each once.
    db.complete(rid, [{"index": 3, "ok": True, "value": b"R3"},
                      {"index": 1, "ok": True, "value": b"R1"}])
    db.complete(other, [{"index": 1, "ok": True, "value": b"X"}])
    mark, rows = db.finished_since(rid)
    assert [(i, s, r) for i, s, r, _ in rows] == [(3, "done", b"R3"), (1, "done", b"R1")]
    assert db.finished_since(rid, mark) == (mark, [])
    fail(db, rid, 2)
    mark2, rows = db.finished_since(rid, mark)
    assert [(i, s, r, e["message"] if e else None) for i, s, r, e in rows] == [
        (2, "error", None, "boom")
    ]
    # A rerun task is read again once it finishes again, and not before.
    db.rerun_tasks(rid, ["failed"])
    assert db.finished_since(rid, mark2) == (mark2, [])
    db.complete(rid, [{"index": 2, "ok": True, "value": b"R2"}])
    _, rows = db.finished_since(rid, mark2)
    assert [(i, r) for i, _, r, _ in rows] == [(2, b"R2")]


def test_the_executor_reads_each_result_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finishing N tasks one by one reads N rows and N results, not N²/2."""
    n = 40
    submitted: list[int] = []
    read = {"rows": 0, "bytes": 0, "full_reads": 0}
    real_since = Storage.finished_since

    def counting_since(self: Storage, request_id: int, after: int = 0) -> Any:
        mark, rows = real_since(self, request_id, after)
        read["rows"] += len(rows)
        read["bytes"] += sum(len(r or b"") for _, _, r, _ in rows)
        return mark, rows

    def full_read(self: Storage, request_id: int) -> Any:
        read["full_reads"] += 1
        raise AssertionError("the Executor must not re-read every task")

    def fake_submit(jobs: sheepdog.stored_request.RequestJobs, **_: Any) -> str:
        submitted.append(jobs.request_id)
        return "1"

    monkeypatch.setattr(Storage, "finished_since", counting_since)
    monkeypatch.setattr(Storage, "get_tasks_with_results", full_read)
    # The one submit path: the Session's (the Executor's) and the watcher's.
    monkeypatch.setattr(sheepdog.submit_jobs, "submit_request", fake_submit)
    dbfile = str(tmp_path / "db.sqlite")
    value = serialise_value("x" * 1000)
    with Executor(local_config(tmp_path, dbfile=dbfile), poll_s=0.01) as pool:
        futures = [pool.submit(add, i, 1) for i in range(n)]
        assert poll_until(lambda: bool(submitted), timeout_s=WAIT_S, interval_s=0.01)
        with Storage(dbfile) as storage:
            for index in range(1, n + 1):
                storage.complete(submitted[0], [{"index": index, "ok": True, "value": value}])
                # Let the Executor look between finishes: the worst case for re-reading.
                assert futures[index - 1].result(WAIT_S) == "x" * 1000
    assert read == {"rows": n, "bytes": n * len(value), "full_reads": 0}


def flaky(x: int, flag: str) -> int:
    """Fails for odd x until the flag file exists."""
    if x % 2 and not os.path.exists(flag):
        raise RuntimeError(f"no flag for {x}")
    return x * 10


def test_rerun_failed_runs_only_the_failed_tasks_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployer = LocalJobs(monkeypatch)
    config = local_config(tmp_path, retries=0)
    flag = str(tmp_path / "flag")
    try:
        rid = sheepdog.map_async(flaky, [(x, flag) for x in range(6)], config)
        first = sheepdog.get_results(rid, config["dbfile"], timeout_s=WAIT_S)
        assert [r for _, r in first] == [0, None, 20, None, 40, None]
        Path(flag).touch()
        assert sheepdog.rerun(rid, config, ["failed"]) == [2, 4, 6]
        assert deployer.submitted == 2  # one new array job for the request
        again = sheepdog.get_results(rid, config["dbfile"], timeout_s=WAIT_S)
        assert [r for _, r in again] == [0, 10, 20, 30, 40, 50]
        assert sheepdog.rerun(rid, config) == []  # nothing left: nothing submitted
        assert deployer.submitted == 2
        with Storage(config["dbfile"]) as storage:
            history = storage.get_task_history(rid, 2)
            assert [h["error"]["message"] for h in history] == ["no flag for 1"]
            assert storage.get_task_history(rid, 1) == []
    finally:
        deployer.close()


def stuck(x: int, flag: str) -> int:
    """Fails until the flag file exists, then takes a minute: a rerun to interrupt."""
    if not os.path.exists(flag):
        raise RuntimeError(f"no flag for {x}")
    time.sleep(60)
    return x


def test_ctrl_c_during_rerun_wait_cancels_the_rerun(tmp_path: Path) -> None:
    config = local_config(tmp_path, retries=0)
    flag = str(tmp_path / "flag")
    rid = sheepdog.map_async(stuck, [(x, flag) for x in range(3)], config)
    assert [r for _, r in sheepdog.get_results(rid, config["dbfile"], timeout_s=WAIT_S)] == [
        None, None, None]
    Path(flag).touch()
    # As in a terminal: a process started in the background by a non-interactive shell (as CI
    # may start this suite) inherits SIGINT ignored, and would never raise KeyboardInterrupt.
    script = ("import signal, sys\n"
              "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
              "from sheepdog.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    root = str(Path(sheepdog.__file__).resolve().parents[1])
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "rerun", str(rid), "--wait", "--dbfile", config["dbfile"]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": root},
    )
    try:
        def task_started() -> bool:
            with Storage(config["dbfile"]) as storage:
                if storage.task_counts(rid).get("leased", 0):
                    return True
            # A rerun that exited will start no task: fail now, with what it printed.
            assert proc.poll() is None, proc.communicate()
            return False

        assert poll_until(task_started, timeout_s=WAIT_S, interval_s=0.1), (
            "no task of the rerun started"
        )
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (out, err)
    said = [line for line in err.splitlines() if line.startswith("sheepdog: interrupted:")]
    assert len(said) == 1, err
    assert said[0].startswith(f"sheepdog: interrupted: request {rid}: cancelled 3 open tasks; "
                              "deleted local job "), said
    with Storage(config["dbfile"]) as storage:
        assert storage.task_counts(rid)["cancelled"] == 3
        job_ids = [job.job_id for job in storage.get_jobs(rid)]
    # The rerun's array tasks are gone, not left sleeping on a server that has gone.
    with open_scheduler(Config.from_mapping(config)) as scheduler:
        assert scheduler.status(job_ids) == {}


def test_a_result_of_the_run_before_a_rerun_is_not_taken(db: Storage) -> None:
    rid = db.new_request(b"F", b"", [b"a", b"b"])
    old = {lease.index: lease.lease for lease in db.lease(rid, worker="w1", host="n1",
                                                             max_tasks=2, lease_s=60)}
    # Task 1 is lost and rerun while its first worker still runs it.
    db.fail_tasks(rid, [1], "lost", "its node stopped answering")
    assert db.rerun_tasks(rid, ["lost"]) == [1]
    # Late, that worker's result comes (or its spool file is put back): not this run's.
    late = {"index": 1, "ok": True, "value": b"OLD", "lease": old[1]}
    assert db.complete(rid, [late]) == ([], [1])
    assert db.task_states(rid) == ["pending", "leased"]
    (new,) = db.lease(rid, worker="w2", host="n2", max_tasks=1, lease_s=60)
    assert new.index == 1 and new.lease.startswith("2.")
    assert db.complete(rid, [late]) == ([], [1])
    assert db.complete(rid, [{"index": 1, "ok": True, "value": b"NEW", "lease": new.lease}]) \
        == ([1], [])
    # Task 2 was never rerun: its first lease still counts; a token not ours does not.
    assert db.complete(rid, [{"index": 2, "ok": True, "value": b"X", "lease": "x.y"}]) \
        == ([], [2])
    assert db.complete(rid, [{"index": 2, "ok": True, "value": b"B", "lease": old[2]}]) \
        == ([2], [])
    assert [value for _, value in db.get_results(rid)] == [b"NEW", b"B"]
