"""The Watcher against a fake head node: what it does on each answer qstat can give.

Grid Engine's head node is faked here (a scripted host for the real GridEngine
scheduler class); tests/e2e/test_faults.py
runs the same situations on a real cluster.
"""

from __future__ import annotations

import base64
import logging
import os
import pickle
import time
from pathlib import Path
from typing import Any

import pytest

import sheepdog._submit
from sheepdog._submit import request_settings
from sheepdog.client import stub
from sheepdog.config import Config
from sheepdog.errors import StorageError
from sheepdog.remote import CommandResult, under_home
from sheepdog.scheduler.gridengine import QSTAT_COMMAND, GridEngine
from sheepdog.scheduler.local import LocalHost
from sheepdog.spool import spool_directory
from sheepdog.storage import Storage
from sheepdog.watch import Watcher, wait_for_request

HEADER = (
    "job-ID  prior   name       user         state submit/start at     queue"
    "                          slots ja-task-ID\n" + "-" * 100 + "\n"
)


def qstat_line(job: str, state: str, user: str = "sheep") -> str:
    return (
        f"{job:>7} 0.50000 sheepdog_1 {user:<12} {state:<5} 11/25/2026 20:43:18 "
        "all.q@exec1  1 1\n"
    )


class FakeHead:
    """A head node stand-in (a Remote): answers commands from a script and records them."""

    host = "head"

    def __init__(self, answers: dict[str, CommandResult]) -> None:
        self.answers = answers
        self.commands: list[str] = []
        self.closed = False

    def run(self, command: str, **_: Any) -> CommandResult:
        self.commands.append(command)
        for prefix, result in self.answers.items():
            if command.startswith(prefix):
                return result
        return CommandResult(command, 0, "", "")

    def absolute(self, directory: str) -> str:
        return under_home(directory, "/home/sheep")

    def list_dir(self, directory: str) -> list[str] | None:
        self.commands.append(f"list {directory}")
        return None  # no worker spooled anything

    def close(self) -> None:
        self.closed = True


def ok(stdout: str) -> CommandResult:
    return CommandResult("", 0, stdout, "")


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Storage, Config, int]:
    # The config's ssh_user is not who the SSH session logs in as (~/.ssh/config's User).
    config = Config(host="head", ssh_user="not-the-login-user", retries=0,
                    dbfile=str(tmp_path / "db.sqlite"))
    storage = Storage(config.dbfile)
    # Leases may expire twice more; retries=0: no resubmission.
    settings = {**request_settings(config, 3), "max_attempts": 3}
    rid = storage.new_request(b"f", None, [b"a", b"b", b"c"], settings=settings)
    storage.add_job(rid, "41", 3)
    storage.lease(rid, worker="w", host="exec1", max_tasks=2, lease_s=600)
    return storage, config, rid


def test_jobs_running_as_the_login_user_are_not_lost(setup: Any) -> None:
    storage, config, rid = setup
    head = FakeHead({"qstat -u": ok(HEADER + qstat_line("41", "r", user="sheep"))})
    Watcher(config, rid, GridEngine(head))._check(storage)  # type: ignore[arg-type]
    assert head.commands[0] == QSTAT_COMMAND
    assert "not-the-login-user" not in " ".join(head.commands)
    assert storage.task_counts(rid)["leased"] == 2
    assert storage.task_counts(rid)["error"] == 0


@pytest.mark.parametrize(
    "answer",
    [
        CommandResult("", 1, "", "error: unable to contact qmaster using port 6444 on host head"),
        CommandResult("", 2, HEADER, ""),
    ],
)
def test_a_failed_qstat_is_unknown_not_gone(
    setup: Any, answer: CommandResult, caplog: pytest.LogCaptureFixture
) -> None:
    storage, config, rid = setup
    head = FakeHead({"qstat -u": answer})
    with caplog.at_level(logging.WARNING, logger="sheepdog.watch"):
        Watcher(config, rid, GridEngine(head))._check(storage)  # type: ignore[arg-type]
    assert storage.task_counts(rid) == {**storage.task_counts(rid), "leased": 2, "error": 0}
    assert head.commands == [QSTAT_COMMAND]  # no qacct, no qdel, no qsub
    assert "the cluster did not answer" in caplog.text


def test_one_job_in_eqw_is_deleted_alone(setup: Any) -> None:
    storage, config, rid = setup
    storage.add_job(rid, "42", 3)
    head = FakeHead({
        "qstat -u": ok(HEADER + qstat_line("41", "r") + qstat_line("42", "Eqw")),
        "qstat -j 42": ok("error reason    1:   can't chdir to /nowhere\n"),
    })
    Watcher(config, rid, GridEngine(head))._check(storage)  # type: ignore[arg-type]
    assert "qdel 42" in head.commands
    assert not any(c.startswith("qdel") and "41" in c for c in head.commands)
    counts = storage.task_counts(rid)
    assert counts["leased"] == 2 and counts["pending"] == 1 and counts["error"] == 0
    (job,) = [j for j in storage.get_jobs(rid) if j["job_id"] == "42"]
    assert job["state"] == "error"
    assert "can't chdir to /nowhere" in job["info"]["reason"]


def test_the_last_job_in_eqw_fails_the_work_with_its_reason(setup: Any) -> None:
    storage, config, rid = setup
    head = FakeHead({
        "qstat -u": ok(HEADER + qstat_line("41", "Eqw")),
        "qstat -j 41": ok("error reason    1:   can't chdir to /nowhere\n"),
    })
    Watcher(config, rid, GridEngine(head))._check(storage)  # type: ignore[arg-type]  # retries=0
    errors = storage.get_task_errors(rid)
    assert len(errors) == 3
    assert all(e["kind"] == "job_error" and "/nowhere" in e["message"] for _, _, e in errors)


def test_tasks_lost_with_their_jobs_finish_now_not_in_ten_years(setup: Any) -> None:
    storage, config, rid = setup
    storage.conn.execute(  # the tasks are on their last attempt
        "UPDATE requests SET settings = json_set(settings, '$.max_attempts', 1)"
    )
    head = FakeHead({"qstat -u": ok(HEADER), "qacct": CommandResult("", 1, "", "")})
    before = time.time()
    Watcher(config, rid, GridEngine(head))._check(storage)  # type: ignore[arg-type]
    finished = storage.conn.execute(
        "SELECT finished FROM tasks WHERE request_id = ? AND state = 'error'", (rid,)
    ).fetchall()
    assert len(finished) == 3
    assert all(before - 1 <= f <= time.time() + 1 for (f,) in finished)


def test_a_passive_watcher_waits_for_the_serving_process_then_takes_over(setup: Any) -> None:
    storage, config, rid = setup
    head = FakeHead({"qstat -u": ok(HEADER), "qacct": CommandResult("", 1, "", "")})
    watcher = Watcher(config, rid, GridEngine(head), passive=True,  # type: ignore[arg-type]
                      takeover_s=0.0)
    watcher._check(storage)
    assert storage.task_counts(rid)["error"] == 0, "acted before giving the server its chance"
    watcher._check(storage)
    errors = storage.get_task_errors(rid)
    assert len(errors) == 3 and all(e["kind"] == "job_lost" for _, _, e in errors)


def test_waiting_on_a_missing_database_does_not_create_it(tmp_path: Path) -> None:
    missing = tmp_path / "typo.sqlite"
    with pytest.raises(StorageError, match="no sheepdog database at"):
        wait_for_request(str(missing), 1, timeout_s=1)
    assert list(tmp_path.iterdir()) == []


def test_the_request_stores_its_config_without_secrets(setup: Any) -> None:
    storage, config, rid = setup
    from sheepdog._submit import job_name, stored_config

    assert stored_config(storage, rid) == config
    name = job_name(storage, rid)
    assert name.startswith(f"sheepdog_{rid:03d}_") and name.endswith(".py")
    assert storage.get_secret(rid) not in str(storage.get_settings(rid))


def test_status_wait_on_a_mistyped_dbfile_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sheepdog import cli

    missing = tmp_path / "typo.sqlite"
    with pytest.raises(SystemExit) as info:
        cli.main(["status", "1", "--wait", "--dbfile", str(missing)])
    assert info.value.code == 1
    assert f"no sheepdog database at {missing}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_served_asks_where_the_server_listens_not_the_workers_name(tmp_path: Path) -> None:
    """The callback URL's host may resolve only on the cluster (host.docker.internal)."""
    from sheepdog.api import served
    from sheepdog.server import Server

    dbfile = str(tmp_path / "db.sqlite")
    with Storage(dbfile) as storage:
        rid = storage.new_request(b"F", None, [b"x"], settings={"lease_s": 30.0})
        with Server(None, None, dbfile, host="127.0.0.1", workers=1, threads=2) as server:
            storage.add_job(rid, "1", 1, info={
                "url": f"http://cluster-only-name.invalid:{server.port}/",
                "port": server.port, "listen_address": "127.0.0.1"})
            assert served(storage, rid) is True
        assert served(storage, rid) is False


def _gone_after(storage: Storage, rid: int, finished_before: int) -> None:
    """Job 41 was submitted when ``finished_before`` tasks were done; now it has left."""
    storage.conn.execute(
        "UPDATE jobs SET info = json_object('finished_before', ?) WHERE job_id = '41'",
        (finished_before,),
    )


def test_jobs_that_made_progress_are_continued_not_counted_as_retries(
    setup: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, config, rid = setup  # retries=0
    storage.conn.execute(  # one task done by job 41's workers
        "UPDATE tasks SET state = 'done', lease = NULL WHERE request_id = ? AND idx = 1",
        (rid,),
    )
    _gone_after(storage, rid, 0)
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(
        sheepdog._submit, "submit_request", lambda *args, **kwargs: calls.append(kwargs) or "43"
    )
    head = FakeHead({"qstat -u": ok(HEADER), "qacct": CommandResult("", 1, "", "")})
    Watcher(config, rid, GridEngine(head))._check(storage)  # type: ignore[arg-type]
    assert len(calls) == 1
    assert calls[0]["continues"] is True
    assert "job 41 left the queue" in calls[0]["why"]
    assert storage.task_counts(rid)["error"] == 0


def test_jobs_that_made_no_progress_count_against_retries(
    setup: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, config, rid = setup  # retries=0
    _gone_after(storage, rid, 0)
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(
        sheepdog._submit, "submit_request", lambda *args, **kwargs: calls.append(kwargs) or "43"
    )
    head = FakeHead({"qstat -u": ok(HEADER), "qacct": CommandResult("", 1, "", "")})
    Watcher(config, rid, GridEngine(head))._check(storage)  # type: ignore[arg-type]
    assert calls == []
    assert storage.task_counts(rid)["error"] == 3


def test_a_rerun_gets_its_own_resubmissions(
    setup: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, config, rid = setup
    config = config.replace(retries=1)
    storage.add_job(rid, "42", 3)  # request's one resubmission is used up
    storage.conn.execute(
        "UPDATE tasks SET state = 'error', lease = NULL, error = '{\"kind\": \"job_lost\"}'"
        " WHERE request_id = ?", (rid,)
    )
    assert storage.rerun_tasks(rid, ["lost"]) == [1, 2, 3]
    storage.add_job(rid, "43", 3)  # the rerun's job, which then leaves the queue
    resubmitted: list[int] = []
    monkeypatch.setattr(sheepdog._submit, "submit_request",
                        lambda storage, config, rid, deployer, **_: resubmitted.append(rid))
    head = FakeHead({"qstat -u": ok(HEADER), "qacct": CommandResult("", 1, "", "")})
    Watcher(config, rid, GridEngine(head))._check(storage)  # type: ignore[arg-type]
    assert resubmitted == [rid]
    assert storage.task_states(rid) == ["pending"] * 3


def test_a_job_in_a_state_the_module_does_not_know_is_not_gone(setup: Any) -> None:
    storage, config, rid = setup  # retries=0: a job taken for gone would fail the work
    head = FakeHead({"qstat -u": ok(HEADER + qstat_line("41", "t")), "qacct": ok("")})
    Watcher(config, rid, GridEngine(head))._check(storage)  # type: ignore[arg-type]
    assert storage.task_counts(rid)["leased"] == 2
    assert storage.task_counts(rid)["error"] == 0
    assert not any(c.startswith(("qacct", "qdel", "qsub")) for c in head.commands)


class SpoolingHead(FakeHead):
    """A head node whose files are this machine's (in a test's directory): it has a spool."""

    def list_dir(self, directory: str) -> list[str] | None:
        self.commands.append(f"list {directory}")
        return LocalHost().list_dir(directory)

    def read_bytes(self, path: str, max_bytes: int | None = None) -> bytes:
        return LocalHost().read_bytes(path, max_bytes)

    def remove(self, path: str) -> None:
        LocalHost().remove(path)

    def rename(self, source: str, target: str) -> None:
        LocalHost().rename(source, target)


def test_the_watcher_collects_the_spool_before_it_resubmits(
    setup: Any, tmp_path: Path
) -> None:
    """The laptop woke up: the jobs are gone, and what the workers spooled is stored first."""
    storage, config, rid = setup
    config = config.replace(ssh_dir=str(tmp_path / "jobs"))
    head = SpoolingHead({"qstat -u": ok(HEADER), "qacct": CommandResult("", 1, "", "")})
    directory = spool_directory(storage, config, head, rid)  # type: ignore[arg-type]
    value = base64.b64encode(pickle.dumps("spooled")).decode()
    stub.spool_results(directory, storage.get_secret(rid), rid, [
        {"index": 2, "lease": "L", "ok": True, "value": value, "stdout": "", "stderr": "",
         "duration_s": 0.1},
    ], {})
    Watcher(config, rid, GridEngine(head))._check(storage)  # type: ignore[arg-type]
    assert f"list {directory}" in head.commands
    assert storage.get_task(rid, 2)["state"] == "done"
    assert pickle.loads(storage.get_results(rid)[0][1]) == "spooled"
    assert os.listdir(directory) == []
    # retries=0: the rest is failed, not resubmitted; the spooled task is not among them.
    assert sorted(index for index, _, _ in storage.get_task_errors(rid)) == [1, 3]
