"""Executor tests without Grid Engine: real storage, real server, real job files.

No stand-in: ``scheduler="local"`` writes the job file locally and starts each
array task as a process running it with ``SGE_TASK_ID`` set, as SGE would. The
worker Python runs without the caller's ``PYTHONPATH`` and with
``PYTHONNOUSERSITE``, so this checkout of sheepdog is not importable there.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, as_completed, wait
from pathlib import Path
from typing import Any

import pytest
from stubrunner import WORKER_PYTHON, StubProcess

import sheepdog
import sheepdog.executor
import sheepdog.stored_request
import sheepdog.submit_jobs
from sheepdog.errors import RemoteError, SerialisationError
from sheepdog.executor import Executor, chunk_applier, kwargs_applier
from sheepdog.poll import poll_until
from sheepdog.scheduler import local as local_jobs
from sheepdog.scheduler.local import LocalScheduler
from sheepdog.serialisation import deserialise_value, serialise_function, serialise_value
from sheepdog.storage import Storage

WAIT_S = 120.0


class LocalJobs:
    """Counts the array jobs that ``scheduler="local"`` starts, and stops them at the end."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.submitted = 0
        self.job_ids: list[str] = []
        real = LocalScheduler.submit

        def counting(scheduler: LocalScheduler, *args: Any, **kwargs: Any) -> str:
            job_id = real(scheduler, *args, **kwargs)
            self.submitted += 1
            self.job_ids.append(job_id)
            return job_id

        monkeypatch.setattr(LocalScheduler, "submit", counting)

    def close(self) -> None:
        for job_id in self.job_ids:
            for proc in local_jobs._STARTED[job_id].procs:
                try:
                    proc.wait(timeout=WAIT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def local_config(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    """A config whose array tasks run as local processes (no host, no SSH)."""
    return {
        "scheduler": "local",
        "ssh_dir": str(tmp_path / "jobs"),
        "dbfile": str(tmp_path / "sheepdog.sqlite"),
        "localhost": "127.0.0.1",
        "shell": WORKER_PYTHON,
        **extra,
    }


@pytest.fixture
def local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A config whose jobs run as local processes, and what counts them."""
    jobs = LocalJobs(monkeypatch)
    yield {"config": local_config(tmp_path), "jobs": jobs}
    jobs.close()


def add(a: int, b: int) -> int:
    return a + b


def shout(x: int) -> int:
    print(f"out {x}")
    print(f"err {x}", file=sys.stderr)
    return x


def fails(x: int) -> int:
    if x == 2:
        raise ValueError(f"no twos: {x}")
    return x


def power(base: int, exponent: int = 2, *, offset: int = 0) -> int:
    return base**exponent + offset


def test_submit_and_as_completed(local: dict[str, Any]) -> None:
    with Executor(local["config"]) as pool:
        futures = {pool.submit(add, i, i): i for i in range(20)}
        got = {futures[f]: f.result() for f in as_completed(futures, timeout=WAIT_S)}
    assert got == {i: 2 * i for i in range(20)}
    # Twenty submits in a quick loop are one request, one qsub.
    assert local["jobs"].submitted == 1
    assert len(pool.request_ids) == 1


def test_wait_returns_done_futures(local: dict[str, Any]) -> None:
    with Executor(local["config"]) as pool:
        futures = [pool.submit(add, 1, i) for i in range(3)]
        done, _ = wait(futures, timeout=WAIT_S, return_when=FIRST_COMPLETED)
        assert done
        done, not_done = wait(futures, timeout=WAIT_S)
    assert not not_done
    assert sorted(f.result() for f in done) == [1, 2, 3]


def test_a_failed_call_raises_remote_error_with_the_remote_traceback(
    local: dict[str, Any],
) -> None:
    with Executor(local["config"]) as pool:
        futures = [pool.submit(fails, i) for i in range(1, 4)]
        assert futures[0].result(WAIT_S) == 1
        with pytest.raises(RemoteError) as info:
            futures[1].result(WAIT_S)
        assert futures[2].result(WAIT_S) == 3
    error = info.value
    assert error.type_name == "ValueError"
    assert error.message == "no twos: 2"
    assert "raise ValueError" in error.traceback
    assert error.host
    assert error.task_index == 2
    assert "Remote traceback" in str(error)


def test_kwargs_and_a_tuple_argument(local: dict[str, Any]) -> None:
    with Executor(local["config"]) as pool:
        a = pool.submit(power, 3, exponent=3, offset=1)
        b = pool.submit(power, 4)
        c = pool.submit(len, (1, 2, 3))  # one tuple argument stays one argument
        assert (a.result(WAIT_S), b.result(WAIT_S), c.result(WAIT_S)) == (28, 16, 3)


def test_map_in_order_with_chunks_and_timeout(local: dict[str, Any]) -> None:
    with Executor(local["config"]) as pool:
        assert list(pool.map(add, range(10), range(10), timeout=WAIT_S)) == [
            2 * i for i in range(10)
        ]
        assert list(pool.map(add, range(11), [1] * 11, chunksize=4, timeout=WAIT_S)) == [
            i + 1 for i in range(11)
        ]
        with pytest.raises(ValueError, match="chunksize"):
            pool.map(add, [1], [1], chunksize=0)


def test_map_timeout_raises_futures_timeout(local: dict[str, Any]) -> None:
    import concurrent.futures

    with Executor(local["config"]) as pool:
        results = pool.map(time.sleep, [5], timeout=0.01)
        with pytest.raises(concurrent.futures.TimeoutError):
            list(results)


def test_submit_after_shutdown_and_unpicklable_values(local: dict[str, Any]) -> None:
    pool = Executor(local["config"])
    with pytest.raises(SerialisationError):
        pool.submit(add, threading.Lock(), 1)
    pool.shutdown()
    pool.shutdown()  # twice is fine
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(add, 1, 2)


def test_cancel_futures_on_shutdown_before_they_are_sent(local: dict[str, Any]) -> None:
    pool = Executor(local["config"], flush_delay_s=30, max_hold_s=30)
    future = pool.submit(add, 1, 2)
    pool.shutdown(wait=True, cancel_futures=True)
    assert future.cancelled()
    assert local["jobs"].submitted == 0


def test_captured_output_is_stored_for_successful_tasks(local: dict[str, Any]) -> None:
    with Executor(local["config"]) as pool:
        assert pool.submit(shout, 7).result(WAIT_S) == 7
    request_id = pool.request_ids[0]
    assert sheepdog.get_output(request_id, 1, local["config"]["dbfile"]) == ("out 7\n", "err 7\n")


def test_a_submit_failure_fails_the_futures(
    local: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> str:
        raise sheepdog.SubmitError("qsub", 1, "", "Unable to run job: denied")

    monkeypatch.setattr(LocalScheduler, "submit", refuse)
    with Executor(local["config"]) as pool:
        future = pool.submit(add, 1, 2)
        with pytest.raises(sheepdog.SubmitError, match="denied"):
            future.result(WAIT_S)


def test_futures_resolve_from_results_stored_by_another_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Results written into SQLite by someone else (a server) resolve the futures."""
    submitted: list[int] = []

    def fake_submit(jobs: sheepdog.stored_request.RequestJobs, **_: Any) -> str:
        submitted.append(jobs.request_id)
        return "1"

    # The one submit path: the Session's (the Executor's) and the watcher's.
    monkeypatch.setattr(sheepdog.submit_jobs, "submit_request", fake_submit)
    dbfile = str(tmp_path / "db.sqlite")
    with Executor(local_config(tmp_path, dbfile=dbfile), poll_s=0.05) as pool:
        futures = [pool.submit(add, i, 1) for i in range(3)]
        assert poll_until(lambda: bool(submitted), timeout_s=WAIT_S, interval_s=0.01)
        with Storage(dbfile) as storage:
            storage.complete(
                submitted[0],
                [
                    {"index": 2, "ok": True, "value": serialise_value("two")},
                    {
                        "index": 3,
                        "ok": False,
                        "error": {"type": "KeyError", "message": "'k'", "traceback": "TB"},
                    },
                ],
            )
            assert futures[1].result(WAIT_S) == "two"
            with pytest.raises(RemoteError, match="KeyError"):
                futures[2].result(WAIT_S)
            assert not futures[0].done()
            storage.complete(submitted[0], [{"index": 1, "ok": True, "value": serialise_value(1)}])
        assert futures[0].result(WAIT_S) == 1


def test_appliers_load_in_a_bare_python_without_sheepdog() -> None:
    """The kwargs and chunk appliers ship by value: a worker has no sheepdog to import."""
    stub = StubProcess()  # runs with -I from an empty directory: sheepdog is not importable
    try:
        for mode in ("bytecode", "source"):
            kw = serialise_function(kwargs_applier(power), mode=mode)
            out = stub.call(kw, [serialise_value(((3,), {"exponent": 3, "offset": 1}))])
            assert out[0][0] == "ok", out
            assert deserialise_value(out[0][1]) == 28
            chunk = serialise_function(chunk_applier(add), mode=mode)
            out = stub.call(chunk, [serialise_value(([(1, 2), (3, 4)],))])
            assert out[0][0] == "ok", out
            assert deserialise_value(out[0][1]) == [3, 7]
    finally:
        stub.close()


def test_a_ctrl_c_that_waits_on_the_cluster_says_so(
    local: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The background thread stands for one whose scheduler does not answer.
    monkeypatch.setattr(sheepdog.executor, "STOP_NOTE_AFTER_S", 0.05)
    monkeypatch.setattr(sheepdog.executor, "STOP_WAIT_S", 0.2)
    pool = Executor(local["config"])
    release = threading.Event()
    stuck = threading.Thread(target=release.wait)
    stuck.start()
    pool._thread = stuck
    try:
        pool._interrupt()
    finally:
        release.set()
        stuck.join()
    said = capsys.readouterr().err
    assert "sheepdog: interrupted: cancelling the open tasks and deleting their jobs; " \
           "waiting up to 0.15 s more for the cluster to answer" in said
    assert "did not stop within 0.2 s" in caplog.text
