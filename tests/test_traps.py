"""The traps a new user fell into (issue 26), each as the user met it: in a terminal.

Every CLI case runs on a pseudo-terminal of 80 columns (tests/terminal.py), with
``scheduler="local"``: real job files, real worker processes, the real server.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from stubrunner import WORKER_PYTHON
from terminal import ANSI, REPO, run_in_terminal, too_wide

import sheepdog
from sheepdog.job_file import stub_file_name
from sheepdog.poll import poll_until
from sheepdog.progress import started
from sheepdog.serialisation import serialise_args, serialise_function, serialise_value
from sheepdog.storage import Storage

pytestmark = pytest.mark.slow

MISSING_PYTHON = "/usr/bin/python9"
#: Bound on every wait for local jobs.
WAIT_S = 120.0


def write_config(tmp_path: Path, **extra: Any) -> Path:
    """A local config file (jobs under tmp_path, not the home directory); return its path."""
    path = tmp_path / "local.json"
    path.write_text(json.dumps({
        "scheduler": "local", "ssh_dir": str(tmp_path / "jobs"), "localhost": "127.0.0.1",
        "dbfile": str(tmp_path / "sheepdog.sqlite"), "shell": WORKER_PYTHON, **extra,
    }), encoding="utf-8")
    return path


def sheepdog_cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "sheepdog", *argv]


def script(tmp_path: Path, text: str) -> list[str]:
    (tmp_path / "job.py").write_text(text, encoding="utf-8")
    return [sys.executable, "job.py"]


def text_of(output: str) -> str:
    """The terminal output without escape sequences, words joined across lines."""
    return " ".join(ANSI.sub("", output).split())


# --- 1. a wrong shell names shell and its path -------------------------------------------


def test_doctor_checks_the_shell_of_a_local_config(tmp_path: Path) -> None:
    bad = write_config(tmp_path, shell=MISSING_PYTHON)
    status, output = run_in_terminal(sheepdog_cli("doctor", str(bad)), tmp_path)
    assert status == 1, output
    assert "FAIL  shell" in output and MISSING_PYTHON in output, output
    assert "1 blocker" in output and not too_wide(output), output

    good = write_config(tmp_path)
    status, output = run_in_terminal(sheepdog_cli("doctor", str(good)), tmp_path)
    assert status == 0, output
    for check in ("ok    shell", "ok    probe job", "ok    worker Python", "ok    direct"):
        assert check in output, output
    assert "checking localhost" in output and "ready, no blockers" in output, output


def test_a_map_with_a_missing_shell_names_shell_not_the_job_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, shell=MISSING_PYTHON)
    argv = script(tmp_path, f"import sheepdog\nsheepdog.map(abs, [1, 2], {str(config)!r})\n")
    status, output = run_in_terminal(argv, tmp_path)
    text = text_of(output)
    assert status == 1, output
    assert f"the config's shell, {MISSING_PYTHON}, does not exist" in text, text
    assert "No such file or directory" not in text, text


# --- 2. a public way to ask whether a request is finished --------------------------------


def test_is_finished_counts_a_failed_task_as_finished(tmp_path: Path) -> None:
    config = json.loads(write_config(tmp_path).read_text())
    request_id = sheepdog.map_async(int, ["1", "x", "3"], config)
    assert isinstance(sheepdog.is_finished(request_id, config["dbfile"]), bool)
    assert poll_until(lambda: sheepdog.is_finished(request_id, config["dbfile"]),
                      timeout_s=WAIT_S, interval_s=0.2)
    results = sheepdog.get_results(request_id, config["dbfile"], block=False)
    assert results == [("1", 1), ("x", None), ("3", 3)]
    assert [arg for arg, _ in sheepdog.get_errors(request_id, config["dbfile"])] == ["x"]


def test_the_async_map_example_ends_when_a_task_fails(tmp_path: Path) -> None:
    example = REPO / "docs" / "examples" / "async_map.py"
    write_config(tmp_path).rename(tmp_path / "cluster.json")
    status, output = run_in_terminal([sys.executable, str(example)], tmp_path)
    printed = ANSI.sub("", output).replace("\r", "").splitlines()
    expected = [line.split("# prints:", 1)[1].strip()
                for line in example.read_text().splitlines() if "# prints:" in line]
    assert status == 0 and expected == printed[-len(expected):], output


# --- 3. Ctrl-C in an Executor stops its work; a future is cancellable until it runs ------

EXECUTOR_SCRIPT = """
import json
import time

import sheepdog


def work(x):
    time.sleep(120)
    return x


with sheepdog.Executor(json.load(open("local.json"))) as pool:
    print(sum(pool.map(work, range(40))))
"""


def task_counts(dbfile: Path, request_id: int = 1) -> dict[str, int]:
    """The request's task counts; all zero before the database and the request exist."""
    if not dbfile.exists():
        return {}
    with Storage(str(dbfile)) as storage:
        if not any(r["id"] == request_id for r in storage.list_requests()):
            return {}
        return storage.task_counts(request_id)


def local_pids(jobdir: Path) -> list[int]:
    """The pids of every local array task started under ``jobdir``."""
    return [int(pid) for state in jobdir.glob(".local-job-*.json")
            for pid, _ in json.loads(state.read_text())["tasks"]]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_ctrl_c_in_an_executor_cancels_its_tasks_and_stops_its_workers(tmp_path: Path) -> None:
    write_config(tmp_path, workers=2, batch=1)
    db = tmp_path / "sheepdog.sqlite"
    argv = script(tmp_path, EXECUTOR_SCRIPT)
    # One Ctrl-C, once both workers hold a task: the program must end by itself.
    status, output = run_in_terminal(
        argv, tmp_path, interrupt_when=lambda _: task_counts(db).get("leased", 0) == 2)
    text = ANSI.sub("", output)
    assert status != 0, output
    lines = [line for line in text.splitlines() if "sheepdog: interrupted" in line]
    assert len(lines) == 1 and "request 1: cancelled 40 open tasks" in lines[0], output
    assert "Exception in thread" not in text and "threading.py" not in text, output
    counts = task_counts(db)
    assert counts["cancelled"] == 40 and counts["pending"] == counts["leased"] == 0, counts
    pids = local_pids(tmp_path / "jobs")
    assert len(pids) == 2
    assert poll_until(lambda: not any(alive(pid) for pid in pids), timeout_s=WAIT_S), pids


def test_a_future_is_cancellable_until_a_worker_leases_its_task(tmp_path: Path) -> None:
    config = json.loads(write_config(tmp_path, workers=1, batch=1).read_text())
    db = tmp_path / "sheepdog.sqlite"
    pool = sheepdog.Executor(config)
    try:
        first = pool.submit(time.sleep, 60)
        second = pool.submit(time.sleep, 60)
        assert poll_until(lambda: task_counts(db).get("leased") == 1, timeout_s=WAIT_S)
        # The one worker runs the first; the second waits for it, not yet started.
        assert poll_until(first.running, timeout_s=WAIT_S)
        assert not second.running() and second.cancel() and second.cancelled()
        assert not first.cancel()
        assert poll_until(lambda: task_counts(db).get("cancelled") == 1, timeout_s=WAIT_S)
    finally:
        pool.shutdown(wait=False)
        sheepdog.cancel(pool.request_ids[0], config)
    assert poll_until(first.done, timeout_s=WAIT_S)


# --- 4. rerun without --wait leaves its tasks served ------------------------------------


def fails_until(flag: str, x: int) -> int:
    """Fails for x == 2 until the file ``flag`` exists: a cause fixed between runs."""
    import os

    if x == 2 and not os.path.exists(flag):
        raise RuntimeError(f"no {flag} yet")
    return x


def test_rerun_without_wait_hands_its_tasks_to_a_server(tmp_path: Path) -> None:
    config = json.loads(write_config(tmp_path).read_text())
    flag = str(tmp_path / "fixed")
    args = [(flag, x) for x in (1, 2, 3)]
    assert sheepdog.map(fails_until, args, config, verbose=False) == [1, None, 3]
    Path(flag).touch()
    status, output = run_in_terminal(
        sheepdog_cli("rerun", "1", "--dbfile", config["dbfile"]), tmp_path)
    text = text_of(output)
    assert status == 0, output
    assert "request 1: running 1 tasks again" in text, text
    assert "in the background: pid" in text and "sheepdog status 1 --wait" in text, text
    assert not too_wide(output), too_wide(output)
    # Nothing stranded: the task runs again and finishes after this command has exited.
    assert poll_until(lambda: sheepdog.is_finished(1, config["dbfile"]), timeout_s=WAIT_S)
    assert [r for _, r in sheepdog.get_results(1, config["dbfile"], block=False)] == [1, 2, 3]
    pid = int(text.split("in the background: pid ")[1].split()[0])
    assert poll_until(lambda: not alive(pid), timeout_s=WAIT_S), "the server did not stop"


# --- 5. status --wait says when nothing serves the request ------------------------------


def unserved_request(tmp_path: Path) -> str:
    """A database whose request 1 has 2 open tasks and a job whose server is gone."""
    tmp_path.mkdir(exist_ok=True)
    dbfile = str(tmp_path / "sheepdog.sqlite")
    with socket.socket() as sock:  # a port nothing listens on once it is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with Storage(dbfile) as storage:
        rid = storage.new_request(serialise_function(abs), b"", serialise_args([1, 2]))
        storage.add_job(rid, "42", 1, info={"url": f"http://127.0.0.1:{port}/", "port": port,
                                            "listen_address": "127.0.0.1"})
    return dbfile


def test_status_wait_says_that_no_server_serves_the_request(tmp_path: Path) -> None:
    dbfile = unserved_request(tmp_path)
    status, output = run_in_terminal(
        sheepdog_cli("status", "1", "--wait", "--timeout", "2", "--dbfile", dbfile), tmp_path)
    text = text_of(output)
    assert status == 1, output  # the bounded wait ran out
    assert "no server is serving it, so this wait may never end" in text, text
    assert "sheepdog attach 1" in text, text
    note = output.split("beside this wait")[0]
    assert not too_wide(note), too_wide(note)


# --- 6. attach after Ctrl-C points to rerun --cancelled ---------------------------------


def test_attach_to_a_cancelled_request_says_how_to_run_it_again(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    dbfile = unserved_request(tmp_path)
    with Storage(dbfile) as storage:
        storage.cancel(1, "cancelled by Ctrl-C")
    status, output = run_in_terminal(
        sheepdog_cli("attach", "1", "--config", str(config), "--dbfile", dbfile), tmp_path)
    text = text_of(output)
    assert status == 1, output
    assert "2 tasks were cancelled" in text, text
    assert "sheepdog rerun 1 --cancelled --wait" in text and not too_wide(output), output


# --- 7. map's summary names the request, the exit status and the whole cause ------------

EXITS_SCRIPT = """
import json
import os

import sheepdog


def f(x):
    if x == 2:
        os._exit(42)
    import no_such_module_here  # noqa: F401


print(sheepdog.map(f, [1, 2], json.load(open("local.json"))))
"""


def test_map_summary_shows_the_request_the_exit_status_and_the_module(tmp_path: Path) -> None:
    write_config(tmp_path, retries=0)
    status, output = run_in_terminal(script(tmp_path, EXITS_SCRIPT), tmp_path)
    text = text_of(output)
    assert status == 0, output
    assert ("sheepdog: request 1: 2 of 2 tasks failed; task 1: ModuleNotFoundError: No "
            "module named 'no_such_module_here'") in text, text
    assert "get_errors(1," in text, text


def test_a_lost_tasks_summary_gives_the_exit_status(tmp_path: Path) -> None:
    write_config(tmp_path, retries=0)
    source = EXITS_SCRIPT.replace("[1, 2]", "[2]")
    status, output = run_in_terminal(script(tmp_path, source), tmp_path)
    text = text_of(output)
    assert status == 0, output
    assert "sheepdog: request 1: 1 of 1 tasks failed; task 1: LostTask:" in text, text
    assert "exited with status 42" in text and " ..." not in text, text


# --- 8. one vocabulary: a lost task is a failed one; running means running --------------


def test_a_lost_task_is_failed_everywhere_and_rerun_failed_finds_it(tmp_path: Path) -> None:
    config = write_config(tmp_path, retries=0)
    dbfile = str(tmp_path / "sheepdog.sqlite")
    status, output = run_in_terminal(
        script(tmp_path, EXITS_SCRIPT.replace("[1, 2]", "[2]")), tmp_path)
    assert status == 0, output
    status, output = run_in_terminal(sheepdog_cli("results", "1", "--dbfile", dbfile), tmp_path)
    assert "failed" in output and "LostTask" in output, output
    status, output = run_in_terminal(sheepdog_cli("errors", "1", "--dbfile", dbfile), tmp_path)
    assert "LostTask" in output, output
    # The task fails again (it always exits), but --failed finds it.
    status, output = run_in_terminal(
        sheepdog_cli("rerun", "1", "--failed", "--wait", "--config", str(config),
                     "--dbfile", dbfile), tmp_path)
    assert "request 1: running 1 tasks again (failed)" in text_of(output), output
    assert status == 1, output


def test_running_counts_one_task_per_worker_not_every_lease(tmp_path: Path) -> None:
    with Storage(str(tmp_path / "db.sqlite")) as storage:
        rid = storage.new_request(serialise_function(abs), b"", serialise_args(range(40)))
        for worker in ("w1", "w2"):
            assert len(storage.lease(rid, worker=worker, host="node", max_tasks=5,
                                     lease_s=60)) == 5
        counts = storage.task_counts(rid)
        assert counts["leased"] == 10
        assert storage.running_indices(rid) == {1, 6}
        shown = started(counts, len(storage.running_indices(rid)))
        assert (shown["leased"], shown["pending"]) == (2, 38)
    status, output = run_in_terminal(
        sheepdog_cli("status", "1", "--dbfile", str(tmp_path / "db.sqlite")), tmp_path)
    assert "0/40 done, 0 failed, 2 running, 38 pending" in output, output


def test_get_errors_leaves_out_cancelled_tasks(tmp_path: Path) -> None:
    dbfile = unserved_request(tmp_path)
    with Storage(dbfile) as storage:
        storage.cancel(1, "cancelled by Ctrl-C")
    assert sheepdog.get_errors(1, dbfile) == []
    status, output = run_in_terminal(sheepdog_cli("results", "1", "--dbfile", dbfile), tmp_path)
    assert output.count("cancelled") >= 2 and "Cancelled: cancelled by Ctrl-C" in output, output


# --- 10. logs of a running task shows its output so far --------------------------------


def talks_then_sleeps(x: int) -> int:
    print(f"hello from task {x}", flush=True)
    time.sleep(120)
    return x


def test_logs_of_a_running_task_shows_its_output_so_far(tmp_path: Path) -> None:
    config = json.loads(write_config(tmp_path, workers=1).read_text())
    request_id = sheepdog.map_async(talks_then_sleeps, [1], config)
    try:
        argv = sheepdog_cli("logs", str(request_id), "1", "--dbfile", config["dbfile"])
        outputs: list[str] = []

        def shows_it() -> bool:
            outputs[:] = [run_in_terminal(argv, tmp_path)[1]]
            return "hello from task 1" in outputs[0]

        assert poll_until(shows_it, timeout_s=WAIT_S, interval_s=0.5), outputs
        text = text_of(outputs[0])
        assert f"request {request_id} task 1 is still running on" in text, text
        assert not too_wide(outputs[0].split("---")[0]), outputs
    finally:
        sheepdog.cancel(request_id, config)


# --- 11. 80 columns, and warnings apart from the table ----------------------------------


def test_a_local_map_fits_80_columns_and_warnings_go_to_stderr(tmp_path: Path) -> None:
    write_config(tmp_path, dbfile="./sheepdog.sqlite")
    status, output = run_in_terminal(script(tmp_path, EXITS_SCRIPT), tmp_path)
    assert status == 0, output
    assert re.search(r"submitted job \d{12} for request 1", text_of(output)), output
    assert not too_wide(output), too_wide(output)
    dbfile = unserved_request(tmp_path / "unserved")
    for argv in (["requests"], ["status", "1"]):
        done = subprocess.run(sheepdog_cli(*argv, "--dbfile", dbfile), capture_output=True,
                              text=True, timeout=WAIT_S, check=True, cwd=tmp_path)
        assert "no server is serving it" not in done.stdout, done.stdout
        assert "no server is serving it" in done.stderr, done.stderr


# --- 12. leftovers: sheepdog clean, and no request for an empty map -----------------------


def test_clean_lists_then_deletes_only_finished_requests_files(tmp_path: Path) -> None:
    config = json.loads(write_config(tmp_path).read_text())
    jobs = tmp_path / "jobs"
    assert sheepdog.map(abs, [-1, -2], config, verbose=False) == [1, 2]
    # The worker stub beside the job files belongs to no request: every job file runs it.
    finished = sorted(p.name for p in jobs.iterdir() if p.name != stub_file_name())
    assert any(".o" in name for name in finished) and any(n.endswith(".key") for n in finished)
    slow = sheepdog.map_async(time.sleep, [60], config)  # open: its files stay
    (jobs / "notes.txt").write_text("mine")
    try:
        argv = sheepdog_cli("clean", "--dbfile", config["dbfile"])
        status, output = run_in_terminal(argv, tmp_path)
        text = text_of(output)
        assert status == 0 and f"in localhost:{jobs}" in text, text
        assert f"request 1 (finished): {len(finished)} files" in text, text
        assert "run again with --yes" in text, text
        assert not too_wide(output.replace(str(jobs), "")), output
        assert sorted(p.name for p in jobs.iterdir() if p.name in finished) == finished
        status, output = run_in_terminal([*argv, "--yes"], tmp_path)
        assert status == 0 and f"deleted {len(finished)} files" in text_of(output), output
        left = {p.name for p in jobs.iterdir()}
        assert not left & set(finished) and "notes.txt" in left, left
        assert stub_file_name() in left, left
        assert any(name.startswith(f"sheepdog_{slow:03d}_") for name in left), left
    finally:
        sheepdog.cancel(slow, config)


def test_an_empty_map_creates_no_request(tmp_path: Path) -> None:
    config = json.loads(write_config(tmp_path).read_text())
    assert sheepdog.map(abs, [], config) == []
    assert not Path(config["dbfile"]).exists() or not Storage(config["dbfile"]).list_requests()


# --- 9. results of large values; --json says each task's state and error ------------------


def test_results_json_has_state_and_error_and_a_large_result_prints_short(
    tmp_path: Path,
) -> None:
    dbfile = str(tmp_path / "sheepdog.sqlite")
    with Storage(dbfile) as storage:
        rid = storage.new_request(serialise_function(abs), b"", serialise_args([1, 2, 3, 4]))
        storage.complete(rid, [
            {"index": 1, "ok": True, "value": serialise_value(None)},
            {"index": 2, "ok": False, "error": {"type": "ValueError", "message": "bad 2",
                                                "traceback": "TB"}},
            {"index": 3, "ok": True, "value": serialise_value(b"x" * 20_000_000)},
        ])
    done = subprocess.run(sheepdog_cli("results", "1", "--json", "--dbfile", dbfile),
                          capture_output=True, text=True, timeout=WAIT_S, check=True)
    rows = json.loads(done.stdout)
    assert [(r["state"], r["result"], r["error"]) for r in rows[:2]] == [
        ("done", None, None), ("failed", None, "ValueError: bad 2")]
    assert rows[2]["state"] == "done" and rows[2]["result"]["repr"].startswith("b'xxx")
    assert len(rows[2]["result"]["repr"]) <= 1000 and rows[3]["state"] == "pending"
    status, output = run_in_terminal(sheepdog_cli("results", "1", "--dbfile", dbfile), tmp_path)
    assert status == 0 and "b'xxxx" in output and not too_wide(output), output
    assert len(output) < 2000, len(output)
