"""CLI tests on a real database (no cluster): every command, its --help, its errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from sheepdog.cli import main
from sheepdog.job_file import stub_source
from sheepdog.poll import poll_until
from sheepdog.serialisation import serialise_args, serialise_function, serialise_value
from sheepdog.storage import Storage

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ["requests", "status", "results", "errors", "logs", "cancel", "rerun", "serve",
            "worker-stub", "jobfile", "dashboard"]
WAIT_S = 60.0


def double(x: int) -> int:
    return 2 * x


@pytest.fixture
def db(tmp_path: Path) -> tuple[str, int]:
    """A database with one request of 3 tasks: 1 done with output, 2 failed, 3 pending."""
    dbfile = str(tmp_path / "sheepdog.sqlite")
    with Storage(dbfile) as storage:
        rid = storage.new_request(serialise_function(double), b"", serialise_args([1, 2, 3]))
        storage.complete(rid, [
            {"index": 1, "ok": True, "value": serialise_value(2), "stdout": "hello out\n",
             "stderr": "hello err\n"},
            {"index": 2, "ok": False, "stdout": "", "stderr": "",
             "error": {"type": "ZeroDivisionError", "message": "division by zero",
                       "traceback": "Traceback (most recent call last):\n  boom\n",
                       "host": "node1"}},
        ])
    return dbfile, rid


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        status = main(list(argv))
    except SystemExit as exc:
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


def test_every_command_has_help() -> None:
    for command in COMMANDS:
        done = subprocess.run(
            [sys.executable, "-m", "sheepdog", command, "--help"],
            capture_output=True, text=True, timeout=WAIT_S, check=False,
        )
        assert done.returncode == 0, done.stderr
        assert f"sheepdog {command}" in done.stdout


def test_requests(db: tuple[str, int], capsys: pytest.CaptureFixture[str]) -> None:
    dbfile, rid = db
    status, out, _ = run(capsys, "requests", "--dbfile", dbfile)
    assert status == 0
    header, line = out.splitlines()
    assert header.split() == ["ID", "CREATED", "STATE", "TASKS", "DONE", "FAILED", "CANCELLED",
                              "RUNNING", "PENDING", "LABEL"]
    # id, date, time, state, tasks, done, failed, cancelled, running, pending
    assert line.split()[0] == str(rid)
    assert line.split()[3:10] == ["running", "3", "1", "1", "0", "0", "1"]


def test_requests_shows_a_whole_label_in_80_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dbfile = str(tmp_path / "labels.sqlite")
    with Storage(dbfile) as storage:
        storage.new_request(serialise_function(double), b"", serialise_args([1, 2]),
                            label="Executor")
    status, out, _ = run(capsys, "requests", "--dbfile", dbfile)
    assert status == 0
    assert out.splitlines()[1].split()[-1] == "Executor", out
    assert max(len(line) for line in out.splitlines()) <= 80, out


def test_status(db: tuple[str, int], capsys: pytest.CaptureFixture[str]) -> None:
    dbfile, rid = db
    status, out, _ = run(capsys, "status", str(rid), "--dbfile", dbfile)
    assert status == 0
    # The same word as `requests` uses (it said "open" here, "running" there).
    assert out.startswith(f"request {rid}: running, 1/3 done, 1 failed, 0 running, 1 pending")


def test_status_and_requests_say_when_no_server_serves_an_open_request(
    db: tuple[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    dbfile, rid = db
    port = _free_port()  # nothing listens there
    with Storage(dbfile) as storage:
        storage.add_job(rid, "42", 1, info={"url": f"http://cluster-only.invalid:{port}/",
                                            "port": port, "listen_address": "127.0.0.1"})
    for argv in (["status", str(rid)], ["requests"]):
        status, table, out = run(capsys, *argv, "--dbfile", dbfile)
        assert status == 0 and "no server" not in table  # on stderr, apart from the table
        said = " ".join(out.split())  # folded to 80 columns
        assert f"request {rid} has open tasks but no server is serving it" in said, out
        assert f"sheepdog serve --dbfile {dbfile}" in said, out


def test_results_text_and_json(db: tuple[str, int], capsys: pytest.CaptureFixture[str]) -> None:
    dbfile, rid = db
    status, out, _ = run(capsys, "results", str(rid), "--dbfile", dbfile)
    assert status == 0
    assert out.splitlines() == [
        "TASK  STATE      ARGS  RESULT",
        "   1  done       1     2",
        "   2  failed     2     ZeroDivisionError: division by zero",
        "   3  pending    3     -",
    ]
    status, out, _ = run(capsys, "results", str(rid), "--json", "--dbfile", dbfile)
    assert json.loads(out) == [
        {"index": 1, "state": "done", "args": 1, "result": 2, "error": None},
        {"index": 2, "state": "failed", "args": 2, "result": None,
         "error": "ZeroDivisionError: division by zero"},
        {"index": 3, "state": "pending", "args": 3, "result": None, "error": None},
    ]


def test_results_wait_times_out_with_one_line(
    db: tuple[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    dbfile, rid = db
    status, _, err = run(capsys, "results", str(rid), "--wait", "--timeout", "0.3",
                         "--dbfile", dbfile)
    assert status == 1
    last = err.splitlines()[-1]
    assert last.startswith(f"sheepdog: error: request {rid}: 2 of 3 tasks finished")
    assert "Traceback" not in err


def test_errors(db: tuple[str, int], capsys: pytest.CaptureFixture[str]) -> None:
    dbfile, rid = db
    status, out, _ = run(capsys, "errors", str(rid), "--dbfile", dbfile)
    assert status == 0
    assert "--- task 2 (exception), args 2" in out
    assert "ZeroDivisionError: division by zero" in out
    assert "on node1" in out
    assert "  boom" in out


def test_logs(db: tuple[str, int], capsys: pytest.CaptureFixture[str]) -> None:
    dbfile, rid = db
    status, out, _ = run(capsys, "logs", str(rid), "1", "--dbfile", dbfile)
    assert status == 0
    assert out == (f"--- stdout of request {rid} task 1\nhello out\n"
                   f"--- stderr of request {rid} task 1\nhello err\n")
    status, out, _ = run(capsys, "logs", str(rid), "1", "--stream", "stderr", "--dbfile", dbfile)
    assert out == "hello err\n"


def test_unknown_request_and_task_and_database(
    db: tuple[str, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dbfile, rid = db
    for argv in (["status", "99"], ["results", "99"], ["errors", "99"], ["logs", str(rid), "9"]):
        status, _, err = run(capsys, *argv, "--dbfile", dbfile)
        assert status == 1, argv
        assert err.startswith("sheepdog: error: ") and err.count("\n") == 1, err
    status, _, err = run(capsys, "requests", "--dbfile", str(tmp_path / "none.sqlite"))
    assert status == 1
    assert "no sheepdog database at" in err
    assert not (tmp_path / "none.sqlite").exists()


def test_bad_command_line_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "status", "not-a-number")
    assert status == 2
    assert "invalid int value" in err


def test_cancel_needs_a_valid_config(
    db: tuple[str, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dbfile, rid = db
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"host": "h", "bogus": 1}), encoding="utf-8")
    status, _, err = run(capsys, "cancel", str(rid), "--config", str(config), "--dbfile", dbfile)
    assert status == 1
    assert "unknown config key 'bogus'" in err


def test_worker_stub(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "worker-stub")
    assert status == 0
    assert out == stub_source()


def test_jobfile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "host": "head", "localhost": "me.example.org", "port": 5123, "mem_gb": 2,
        "queue": "all.q", "prologue": ["export A=1"],
    }), encoding="utf-8")
    status, out, err = run(capsys, "jobfile", "test_cli:double", "--args", "[1, 2, 3]",
                           "--config", str(config))
    assert status == 0, err
    assert out.startswith("#!/bin/sh\n#$ -S /bin/sh\n#$ -t 1-3\n#$ -l h_vmem=2G\n#$ -q all.q\n")
    assert "export A=1\n" in out
    assert "http://me.example.org:5123/" in out
    compile(out, "job", "exec")
    assert "3 tasks, 3 array tasks" in err
    status, _, err = run(capsys, "jobfile", "test_cli:nothing_here")
    assert status == 1 and "has no 'nothing_here'" in err
    status, _, err = run(capsys, "jobfile", "test_cli:double", "--args", "{")
    assert status == 1 and "not valid JSON" in err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health", timeout=2) as r:
            return bool(json.load(r)["ok"])
    except OSError:
        return False


def _wait_for(condition: Callable[[], object], what: str) -> None:
    assert poll_until(lambda: bool(condition()), timeout_s=WAIT_S, interval_s=0.1), (
        f"timed out waiting for {what}"
    )


def _serve_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_serve_reuses_the_submitted_port_and_stops_when_done(db: tuple[str, int]) -> None:
    dbfile, rid = db
    port = _free_port()
    with Storage(dbfile) as storage:
        storage.add_job(rid, "42", 1, info={"url": f"http://127.0.0.1:{port}/", "port": port})
    proc = subprocess.Popen(
        [sys.executable, "-m", "sheepdog", "serve", "--dbfile", dbfile, "--timeout", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_serve_env(),
    )
    try:
        _wait_for(lambda: _healthy(port), f"the server on port {port}")
        with Storage(dbfile) as storage:
            storage.complete(rid, [{"index": 3, "ok": True, "value": serialise_value(6)}])
        out, err = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert f"serving requests {rid} on port {port}" in out
    assert "every served request is finished" in out
    assert not _healthy(port)


def test_serve_listens_where_the_request_was_served_or_where_asked(
    db: tuple[str, int]
) -> None:
    dbfile, rid = db
    port = _free_port()
    with Storage(dbfile) as storage:
        storage.add_job(rid, "42", 1, info={"url": f"http://localhost:{port}/", "port": port,
                                            "listen_address": "127.0.0.1"})
    for extra, address in (([], "127.0.0.1"), (["--listen-address", "0.0.0.0"], "0.0.0.0")):
        done = subprocess.run(
            [sys.executable, "-m", "sheepdog", "serve", "--dbfile", dbfile, "--timeout", "2",
             *extra],
            capture_output=True, text=True, timeout=WAIT_S, env=_serve_env(), check=False,
        )
        assert f"serving requests {rid} on port {port} (http, listening on {address})" in (
            done.stdout), done.stdout + done.stderr


def test_serve_detached(db: tuple[str, int]) -> None:
    dbfile, rid = db
    port = _free_port()
    with Storage(dbfile) as storage:
        storage.add_job(rid, "42", 1, info={"url": f"http://127.0.0.1:{port}/", "port": port})
    done = subprocess.run(
        [sys.executable, "-m", "sheepdog", "serve", "--dbfile", dbfile, "--detach"],
        capture_output=True, text=True, timeout=WAIT_S, env=_serve_env(), check=False,
    )
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout.split("pid ")[1].split()[0])
    try:
        _wait_for(lambda: _healthy(port), f"the detached server on port {port}")
    finally:
        os.kill(pid, signal.SIGTERM)
    _wait_for(lambda: not _healthy(port), "the detached server to stop")


def test_serve_with_nothing_open(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dbfile = str(tmp_path / "s.sqlite")
    Storage(dbfile).close()
    status, out, _ = run(capsys, "serve", "--dbfile", dbfile)
    assert status == 0
    assert "nothing to serve" in out


def test_every_command_help_has_a_description_and_an_example() -> None:
    for command in COMMANDS:
        done = subprocess.run(
            [sys.executable, "-m", "sheepdog", command, "--help"],
            capture_output=True, text=True, timeout=WAIT_S, check=False,
            env={**os.environ, "COLUMNS": "80"},
        )
        text = done.stdout
        usage, description = text.split("\n\n")[:2]
        assert not description.startswith(("positional", "options")), (command, text)
        assert "example" in text and f"  sheepdog {command}" in text.split("example")[-1], text
        assert "ci/cluster" not in text, text
        assert max(map(len, text.splitlines())) <= 80, text


@pytest.fixture
def mixed(tmp_path: Path) -> tuple[str, int]:
    """A request whose tasks returned None, failed, were cancelled and are pending."""
    dbfile = str(tmp_path / "mixed.sqlite")
    with Storage(dbfile) as storage:
        rid = storage.new_request(serialise_function(double), b"", serialise_args([1, 2, 3]))
        storage.complete(rid, [
            {"index": 1, "ok": True, "value": serialise_value(None), "stdout": "", "stderr": ""},
            {"index": 2, "ok": False, "stdout": "", "stderr": "",
             "error": {"type": "ValueError", "message": "bad seed\nsecond line",
                       "traceback": "", "host": "node1"}},
        ])
        storage.cancel(rid, "cancelled by the test")
    return dbfile, rid


def test_results_tell_a_real_none_from_failed_and_cancelled(
    mixed: tuple[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    dbfile, rid = mixed
    status, out, _ = run(capsys, "results", str(rid), "--dbfile", dbfile)
    assert status == 0
    assert out.splitlines() == [
        "TASK  STATE      ARGS  RESULT",
        "   1  done       1     None",
        "   2  failed     2     ValueError: bad seed",
        "   3  cancelled  3     Cancelled: cancelled by the test",
    ]
    status, out, _ = run(capsys, "requests", "--dbfile", dbfile)
    assert out.splitlines()[1].split()[3:10] == ["cancelled", "3", "1", "1", "1", "0", "0"]
    status, out, _ = run(capsys, "status", str(rid), "--dbfile", dbfile)
    assert out.startswith(
        f"request {rid}: cancelled, 1/3 done, 1 failed, 1 cancelled, 0 running, 0 pending"
    )


def test_results_fit_80_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dbfile = str(tmp_path / "wide.sqlite")
    values = [("x" * 100, i) for i in range(12)]
    with Storage(dbfile) as storage:
        rid = storage.new_request(serialise_function(double), b"", serialise_args(values))
        storage.complete(rid, [
            {"index": 1, "ok": True, "value": serialise_value("y" * 300), "stdout": "",
             "stderr": ""},
            {"index": 2, "ok": False, "stdout": "", "stderr": "",
             "error": {"type": "RuntimeError", "message": "z" * 300, "traceback": ""}},
        ])
    for command in ("results", "requests", "status", "errors"):
        argv = [command] + ([] if command == "requests" else [str(rid)])
        status, out, _ = run(capsys, *argv, "--dbfile", dbfile)
        assert status == 0
        if command != "errors":  # a remote message is folded only on a terminal
            assert max(map(len, out.splitlines())) <= 80, out
    status, out, _ = run(capsys, "results", str(rid), "--dbfile", dbfile)
    assert "   1  done       ('xxx" in out and "  'yyy" in out and "yyy..." in out


def test_dbfile_comes_from_the_environment(
    db: tuple[str, int], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    dbfile, rid = db
    monkeypatch.setenv("SHEEPDOG_DBFILE", dbfile)
    status, out, _ = run(capsys, "status", str(rid))
    assert status == 0 and out.startswith(f"request {rid}: running")
    # --dbfile still wins over the environment.
    status, _, err = run(capsys, "status", str(rid), "--dbfile", dbfile + ".nope")
    assert status == 1 and "no sheepdog database at" in err and "SHEEPDOG_DBFILE" in err


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    dbfile = str(tmp_path / "many.sqlite")
    with Storage(dbfile) as storage:
        rid = storage.new_request(
            serialise_function(double), b"", serialise_args(list(range(20000)))
        )
    done = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m sheepdog results {rid} --dbfile {dbfile} | head -3"],
        capture_output=True, text=True, timeout=WAIT_S, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0
    assert len(done.stdout.splitlines()) == 3
    assert done.stderr == "", done.stderr


def test_reading_a_database_that_does_not_exist_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sheepdog import StorageError, get_errors, get_output, get_results

    nope = tmp_path / "nope.sqlite"
    for call in (
        lambda: get_results(1, str(nope)),
        lambda: get_results(1, str(nope), block=False),
        lambda: get_errors(1, str(nope)),
        lambda: get_output(1, 1, str(nope)),
    ):
        with pytest.raises(StorageError, match=r"no sheepdog database at .*nope\.sqlite: "
                                               r"the file does not exist"):
            call()
    for argv in (["requests"], ["status", "1"], ["results", "1"], ["errors", "1"],
                 ["logs", "1", "1"], ["serve"]):
        status, _, err = run(capsys, *argv, "--dbfile", str(nope))
        assert status == 1, argv
        assert f"no sheepdog database at {nope}: the file does not exist" in err
    assert list(tmp_path.iterdir()) == []


def test_rerun_needs_a_config_and_a_known_request(
    db: tuple[str, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dbfile, rid = db
    status, _, err = run(capsys, "rerun", str(rid), "--dbfile", dbfile)
    assert status == 1
    assert f"request {rid} has no stored config (an older request): pass --config FILE" in err
    status, _, err = run(capsys, "rerun", str(rid + 5), "--dbfile", dbfile)
    assert status == 1
    assert f"request {rid + 5}" in err
    # Nothing of the chosen kind: nothing submitted (the head node is never asked).
    config = tmp_path / "cluster.json"
    config.write_text(json.dumps({"host": "headnode.invalid"}))
    status, out, _ = run(capsys, "rerun", str(rid), "--cancelled", "--lost", "--config",
                         str(config), "--dbfile", dbfile)
    assert (status, out) == (0, f"request {rid}: no lost/cancelled tasks to run again\n")
    with Storage(dbfile) as storage:
        assert storage.task_states(rid) == ["done", "error", "pending"]


def test_a_remote_traceback_is_folded_between_words(monkeypatch: pytest.MonkeyPatch) -> None:
    """``errors`` folds a long line where a space is, never inside a date or a name."""
    from sheepdog import cli

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setenv("COLUMNS", "80")
    line = "RuntimeError: the run of 2026-12-07 02:15:42 on exec1 gave up after 3 tries; " * 4
    path = "/home/you/" + "very-long-directory-name/" * 6 + "data.csv"
    folded = cli._fold(f"{line}\n  File {path}, line 3")
    lines = folded.splitlines()
    assert max(len(one) for one in lines) <= 80, lines
    # Every word of the line is whole; the path, longer than a line, is cut where it must be.
    assert " ".join(folded.split()).startswith(" ".join(line.split())), lines
    assert "".join(folded.split()).endswith(f"File{path},line3"), lines
    assert all(one.strip() for one in lines), lines


def test_rerun_offers_a_flag_for_each_choice_the_store_knows() -> None:
    """``sheepdog rerun``'s flags are the store's RERUN_CHOICES, and all of them by default."""
    from sheepdog.api import RERUN_DEFAULT
    from sheepdog.cli import build_parser
    from sheepdog.store import RERUN_CHOICES

    args = build_parser().parse_args(["rerun", "1"])
    assert {choice for choice in RERUN_CHOICES if hasattr(args, choice)} == set(RERUN_CHOICES)
    assert tuple(RERUN_DEFAULT) == tuple(RERUN_CHOICES)
