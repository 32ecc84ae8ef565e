"""Local integration: real job files run as plain subprocesses against the real gunicorn server.

No Grid Engine: each "array task" is ``/usr/bin/python3 <job file>`` with
``SGE_TASK_ID`` set, as SGE would start it.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from stubrunner import write_job

from sheepdog.job_file import key_file_name
from sheepdog.poll import poll_until
from sheepdog.serialisation import deserialise_value, serialise_args, serialise_function
from sheepdog.server import Server
from sheepdog.storage import Storage

pytestmark = pytest.mark.slow

def _python_minor(path: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run(
            [path, "-c", "import sys; print(*sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return int(out[0]), int(out[1])


# The worker Python: the system one, as on a cluster node, if it has the library's minor
# version (bytecode payloads need it); else this interpreter.
WORKER_PYTHON = (
    "/usr/bin/python3"
    if _python_minor("/usr/bin/python3") == sys.version_info[:2]
    else sys.executable
)
WAIT_S = 120.0  # bound on every wait below


def square(i: int, marker: str | None = None) -> int:
    """The task: i*i; with a marker path, the first run to get there hangs until killed."""
    if marker is not None and not os.path.exists(marker):
        with open(marker + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(marker + ".tmp", marker)
        time.sleep(600)
    print(f"squaring {i}")
    return i * i


def sleep_for(seconds: float) -> str:
    time.sleep(seconds)
    return "woke up"


def uninterruptible(seconds: float) -> None:
    # As C code that blocks signals (or never returns to the interpreter) would:
    # SIGALRM's Python-level handler cannot run.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(seconds)


class Setup:
    """A database, a running server, and a way to render and run job files."""

    def __init__(self, tmp_path: Path, **server_options: Any) -> None:
        self.tmp_path = tmp_path
        self.dbfile = tmp_path / "sheepdog.sqlite"
        self.storage = Storage(str(self.dbfile))
        self.server = Server(None, None, str(self.dbfile), host="127.0.0.1", **server_options)

    def request(self, f: Callable[..., Any], args: list[Any], **settings: Any) -> int:
        return self.storage.new_request(
            serialise_function(f), None, serialise_args(args), settings=settings
        )

    def job(self, request_id: int, n_args: int, **client_options: Any) -> Path:
        return write_job(
            self.tmp_path / "jobs",
            self.server.url_for("127.0.0.1"),
            self.storage.get_secret(request_id),
            request_id,
            n_args,
            ["-l h_rt=0:10:0,h_vmem=4G", "-r y"],
            client_options={"retry_s": 20.0, **client_options},
        )

    def start(self, job: Path, task_id: int) -> subprocess.Popen[str]:
        env = {**os.environ, "SGE_TASK_ID": str(task_id)}
        env.pop("PYTHONPATH", None)  # like a worker node: no sheepdog importable
        return subprocess.Popen(
            [WORKER_PYTHON, str(job)],
            env=env,
            cwd=self.tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def results(self, request_id: int) -> list[object]:
        return [
            None if value is None else deserialise_value(value)
            for _args, value in self.storage.get_tasks_with_results(request_id)
        ]

    def close(self) -> None:
        self.server.stop()
        self.storage.close()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path)
    try:
        yield s
    finally:
        s.close()


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"worker {proc.pid} did not finish in {WAIT_S} s\n{out}\n{err}")
    return proc.returncode, out, err


def wait_for(condition: Callable[[], bool], what: str) -> None:
    if not poll_until(condition, timeout_s=WAIT_S, interval_s=0.05):
        pytest.fail(f"gave up after {WAIT_S} s waiting for {what}")


def test_every_result_comes_back(setup: Setup) -> None:
    n, workers = 24, 4
    rid = setup.request(square, list(range(1, n + 1)), batch=2)
    job = setup.job(rid, n)
    started = time.perf_counter()
    procs = [setup.start(job, i) for i in range(1, workers + 1)]
    outcomes = [finish(p) for p in procs]
    elapsed = time.perf_counter() - started
    for code, out, err in outcomes:
        assert code == 0, f"worker failed:\n{out}\n{err}"
        assert "no tasks left" in out
    assert setup.results(rid) == [i * i for i in range(1, n + 1)]
    assert setup.storage.count_results(rid) == n
    assert setup.storage.get_task(rid, 5)["stdout"] == "squaring 5\n"
    printed = "".join(out for _code, out, _err in outcomes)
    reported = re.findall(r"sheepdog: task (\d+) ok: (\d+)", printed)
    assert sorted(reported, key=lambda m: int(m[0])) == [
        (str(i), str(i * i)) for i in range(1, n + 1)
    ]
    print(f"\n{n} tasks on {workers} local workers: {elapsed:.2f} s wall time")


def test_a_killed_workers_task_is_leased_again_and_stored_once(setup: Setup) -> None:
    n = 6
    marker = str(setup.tmp_path / "hang-once")
    args = [(i, marker if i == 3 else None) for i in range(1, n + 1)]
    rid = setup.request(square, args, lease_s=2.0, heartbeat_s=0.5, batch=1)
    job = setup.job(rid, n)
    procs = [setup.start(job, i) for i in range(1, 4)]
    wait_for(lambda: os.path.exists(marker), "task 3 to start")
    victim_pid = int(Path(marker).read_text())
    victim = next(p for p in procs if p.pid == victim_pid)
    first_lease = setup.storage.get_task(rid, 3)
    assert first_lease["state"] == "leased"
    os.kill(victim_pid, signal.SIGKILL)
    assert finish(victim)[0] == -signal.SIGKILL
    for proc in procs:
        if proc is not victim:
            code, out, err = finish(proc)
            assert code == 0, f"{out}\n{err}"
    # Every other task is done; task 3's lease runs out without heartbeats.
    assert setup.storage.open_task_indices(rid) == [3]
    wait_for(
        lambda: setup.storage.get_task(rid, 3)["lease_expires"] < time.time(),
        "task 3's lease to expire",
    )
    # The library would now resubmit an array task for the open work; do that by hand.
    code, out, err = finish(setup.start(job, 4))
    assert code == 0, f"{out}\n{err}"
    assert "sheepdog: task 3 ok: 9" in out
    task = setup.storage.get_task(rid, 3)
    assert task["state"] == "done"
    assert task["attempts"] == 1  # raised once, when the lost lease expired
    assert task["lease"] != first_lease["lease"]
    assert setup.results(rid) == [i * i for i in range(1, n + 1)]
    assert setup.storage.count_results_and_errors(rid) == n


def test_a_task_over_its_timeout_is_an_error(setup: Setup) -> None:
    rid = setup.request(sleep_for, [0.0, 60.0], task_timeout_s=1.0, heartbeat_s=0.5)
    code, out, err = finish(setup.start(setup.job(rid, 2), 1))
    assert code == 0, f"{out}\n{err}"
    assert setup.results(rid) == ["woke up", None]
    (index, _args, error), = setup.storage.get_task_errors(rid)
    assert index == 2
    assert error["type"] == "TaskTimeout"
    assert error["message"] == "timed out after 1 s"
    assert "sleep_for" in error["traceback"]


def test_an_uninterruptible_task_is_reported_and_the_worker_exits(setup: Setup) -> None:
    rid = setup.request(uninterruptible, [600.0], task_timeout_s=1.0, heartbeat_s=0.5)
    code, out, err = finish(setup.start(setup.job(rid, 1, stuck_grace_s=1.0), 1))
    assert code == 6, f"{out}\n{err}"  # EXIT_STUCK
    (index, _args, error), = setup.storage.get_task_errors(rid)
    assert index == 1
    assert error["type"] == "TaskTimeout"
    assert error["message"].startswith("timed out after 1 s (stuck")
    assert "in uninterruptible" in error["traceback"]  # where it was stuck


def test_a_wrong_secret_exits_with_the_auth_status(setup: Setup) -> None:
    rid = setup.request(square, [1])
    job = write_job(setup.tmp_path / "jobs", setup.server.url_for("127.0.0.1"), "ab" * 32, rid, 1,
                    client_options={"retry_s": 5.0})
    code, out, err = finish(setup.start(job, 1))
    assert code == 4, f"{out}\n{err}"  # EXIT_AUTH
    assert f"the job file's secret does not match request {rid}" in err
    assert setup.storage.open_task_indices(rid) == [1]


def test_a_missing_key_file_says_the_nodes_must_share_ssh_dir(setup: Setup) -> None:
    # As on a cluster whose execution nodes do not mount the head node's ssh_dir.
    rid = setup.request(square, [1])
    secret = setup.storage.get_secret(rid)
    job = write_job(setup.tmp_path / "jobs", setup.server.url_for("127.0.0.1"), secret, rid, 1,
                    client_options={"retry_s": 5.0})
    key = job.parent / key_file_name(rid, secret)
    key.unlink()
    code, out, err = finish(setup.start(job, 1))
    assert code == 7, f"{out}\n{err}"  # EXIT_SECRET
    assert f"the request's secret file {key} does not exist on" in err
    assert "the execution nodes must see ssh_dir at the same path" in err
    assert "Traceback" not in err
    assert setup.storage.open_task_indices(rid) == [1]


def raise_unprintable(x: int) -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no words for this")

    raise Unprintable(x)


def test_an_exception_whose_str_raises_is_reported_as_the_tasks_error(setup: Setup) -> None:
    # Before, describe() raised inside go(): an uncaught traceback ended in the job file's
    # Client(...) line in the .e file, and the task was never reported.
    rid = setup.request(raise_unprintable, [1, 2])
    code, out, err = finish(setup.start(setup.job(rid, 2), 1))
    assert code == 0, f"{out}\n{err}"
    errors = setup.storage.get_task_errors(rid)
    assert [index for index, _args, _error in errors] == [1, 2]
    for _index, _args, error in errors:
        assert error["type"].endswith("Unprintable")
        assert error["message"] == "<unprintable Unprintable: str() raised RuntimeError>"
        assert "raise Unprintable(x)" in error["traceback"]
    assert "Client(" not in err and "Client(" not in out
    assert "worker" in out and "no tasks left" in out


@pytest.fixture
def tls_setup(tmp_path: Path) -> Iterator[tuple[Setup, str]]:
    """A server on HTTPS with a fresh self-signed certificate, and its SHA-256 fingerprint."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=sheepdog-test", "-keyout", str(key), "-out", str(cert)],
        capture_output=True, check=True, timeout=60,
    )
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    s = Setup(tmp_path, certfile=cert, keyfile=key)
    try:
        yield s, ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
    finally:
        s.close()


def test_tls_with_a_pinned_fingerprint(tls_setup: tuple[Setup, str]) -> None:
    setup, fingerprint = tls_setup
    assert setup.server.url_for("127.0.0.1").startswith("https://")
    rid = setup.request(square, [1, 2, 3])
    good = write_job(setup.tmp_path / "ok", setup.server.url_for("127.0.0.1"),
                     setup.storage.get_secret(rid), rid, 3, tls_fingerprint=fingerprint)
    code, out, err = finish(setup.start(good, 1))
    assert code == 0, f"{out}\n{err}"
    assert setup.results(rid) == [1, 4, 9]


def test_tls_with_another_fingerprint_is_refused(tls_setup: tuple[Setup, str]) -> None:
    setup, _fingerprint = tls_setup
    rid = setup.request(square, [1])
    bad = write_job(setup.tmp_path / "bad", setup.server.url_for("127.0.0.1"),
                    setup.storage.get_secret(rid), rid, 1, tls_fingerprint="00" * 32)
    code, out, err = finish(setup.start(bad, 1))
    assert code == 4, f"{out}\n{err}"  # EXIT_AUTH
    assert "the job file pins " + "00" * 32 in err
    assert setup.storage.open_task_indices(rid) == [1]


def test_a_function_that_cannot_load_fails_every_task_with_the_reason(setup: Setup) -> None:
    payload = serialise_function(square)
    magic, header, rest = payload.split(b"\n", 2)
    header = header.replace(b'"python_minor": [3, 11]', b'"python_minor": [3, 6]').replace(
        b'"python_minor":[3,11]', b'"python_minor":[3,6]'
    )
    assert b"3, 6" in header or b"3,6" in header, header
    rid = setup.storage.new_request(
        magic + b"\n" + header + b"\n" + rest, None, serialise_args([1, 2, 3]),
        settings={"batch": 2},
    )
    code, out, err = finish(setup.start(setup.job(rid, 3), 1))
    assert code == 5, f"{out}\n{err}"
    errors = setup.storage.get_task_errors(rid)
    assert [index for index, _args, _error in errors] == [1, 2, 3]
    for _index, _args, error in errors:
        assert error["kind"] == "load"
        assert "cannot load the function" in error["message"]
        assert "mode=\"source\"" in error["message"] or "`shell`" in error["message"]


def divide_by_zero(x: int) -> float:
    return x / 0  # the line the remote traceback must show


def test_remote_tracebacks_show_the_source_lines(setup: Setup) -> None:
    rid = setup.request(divide_by_zero, [1])
    code, out, err = finish(setup.start(setup.job(rid, 1), 1))
    assert code == 0, f"{out}\n{err}"
    ((_index, _args, error),) = setup.storage.get_task_errors(rid)
    assert error["type"] == "ZeroDivisionError"
    assert "return x / 0  # the line the remote traceback must show" in error["traceback"]


def test_tasks_per_worker_limits_each_array_task(setup: Setup) -> None:
    rid = setup.request(square, [1, 2, 3, 4, 5], batch=4, tasks_per_worker=2)
    job = setup.job(rid, 5)
    code, out, err = finish(setup.start(job, 1))
    assert code == 0, f"{out}\n{err}"
    assert setup.storage.count_results(rid) == 2  # this array task stopped after two
    for i in (2, 3):
        assert finish(setup.start(job, i))[0] == 0
    assert setup.results(rid) == [1, 4, 9, 16, 25]


def test_a_worker_stops_leasing_before_its_run_time_limit(setup: Setup) -> None:
    """h_rt of 9 s, tasks of 1 s, the stub's 5 s margin: a worker runs a few and exits 0."""
    n = 8
    rid = setup.request(sleep_for, [1.0] * n, batch=4)
    job = write_job(
        setup.tmp_path / "jobs", setup.server.url_for("127.0.0.1"),
        setup.storage.get_secret(rid), rid, n, ["-l h_rt=0:0:9"],
        client_options={"retry_s": 20.0},
    )
    runs = 0
    while setup.storage.open_task_indices(rid):
        runs += 1
        assert runs <= n, "workers kept stopping without doing any task"
        started = time.monotonic()
        code, out, err = finish(setup.start(job, runs))
        took_s = time.monotonic() - started
        assert code == 0, f"{out}\n{err}"
        assert took_s < 9, f"the worker ran {took_s:.1f} s, past its h_rt of 9 s"
        done = len(re.findall(r"sheepdog: task \d+ ok", out))
        assert 1 <= done < n, out
        if setup.storage.open_task_indices(rid):
            assert "stops leasing: its run-time limit (h_rt) of 9 s is near" in out, out
        counts = setup.storage.task_counts(rid)
        assert counts["leased"] == 0  # a clean exit leaves no lease to expire
    assert runs >= 2
    assert setup.results(rid) == ["woke up"] * n
    assert all(setup.storage.get_task(rid, i)["attempts"] == 0 for i in range(1, n + 1))


def reversed_bytes(data: bytes, factor: int) -> bytes:
    return data[::-1] * factor


def test_large_arguments_and_results_travel_as_blobs(setup: Setup) -> None:
    # Above the inline threshold: the lease names the argument's blob, the worker fetches
    # it, and uploads its result before naming it in /results (in the background, while
    # the next task runs: one worker runs all three).
    values = [os.urandom(300_000), b"small", os.urandom(200_000)]
    rid = setup.request(reversed_bytes, [(values[0], 3), (values[1], 1), (values[2], 1)])
    code, out, err = finish(setup.start(setup.job(rid, 3), 1))
    assert code == 0, f"worker failed:\n{out}\n{err}"
    assert setup.results(rid) == [values[0][::-1] * 3, b"llams", values[2][::-1]]
    blobs = Path(f"{setup.dbfile}.blobs")
    assert len(os.listdir(blobs)) == 4  # the large arguments and the large results
    assert all((blobs / name).stat().st_mode & 0o777 == 0o600 for name in os.listdir(blobs))
