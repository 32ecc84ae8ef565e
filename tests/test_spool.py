"""The spool: results a worker keeps when the server is gone, and how sheepdog collects them.

Unit tests write spool files with the worker stub's own functions and collect
them with :mod:`sheepdog.spool` over this machine's host; the integration tests
run real job files (and ``scheduler="local"`` jobs) against the real server,
stop it mid-map for longer than the workers' retry time, and collect.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from stubrunner import write_job
from test_executor import LocalJobs, local_config
from test_integration_local import Setup, finish, wait_for

import sheepdog
from sheepdog.blobs import INLINE_MAX_BYTES
from sheepdog.client import stub
from sheepdog.poll import poll_until
from sheepdog.scheduler import local as local_jobs
from sheepdog.scheduler.local import LocalHost
from sheepdog.serialisation import deserialise_value, serialise_args, serialise_function
from sheepdog.spool import (
    REJECTED_SUFFIX,
    SpoolFileError,
    collect_spool,
    read_spool_file,
    spool_signature,
)
from sheepdog.storage import Storage
from sheepdog.stored_request import StoredRequest

WAIT_S = 120.0


def square(x: int) -> int:
    return x * x


def slow_square(x: int) -> int:
    time.sleep(0.4)
    return x * x


def big(x: int, go: str = "") -> bytes:
    """A value too large to go inline; with ``go``, made once that file exists (60 s at most)."""
    if go:
        # Its answer is ignored: the wait is a cap, not a check.
        poll_until(lambda: os.path.exists(go), timeout_s=60, interval_s=0.05)
    return bytes([x]) * (INLINE_MAX_BYTES + 1000)


class Spool:
    """A database with one request, and its spool directory here."""

    def __init__(self, tmp_path: Path, n_tasks: int = 4) -> None:
        self.storage = Storage(str(tmp_path / "sheepdog.sqlite"))
        self.rid = self.storage.new_request(
            serialise_function(square), None, serialise_args(list(range(1, n_tasks + 1)))
        )
        self.secret = self.storage.get_secret(self.rid)
        self.directory = str(tmp_path / "spool")

    def result(self, index: int, value: Any, **extra: Any) -> dict[str, Any]:
        """A result as the stub posts it (inline value)."""
        import base64
        import pickle

        return {"index": index, "lease": "L", "ok": True, "stdout": "out", "stderr": "",
                "duration_s": 0.1, "worker": "node:1:1", "host": "node",
                "value": base64.b64encode(pickle.dumps(value)).decode(), **extra}

    def write(self, results: list[dict[str, Any]], payloads: dict[int, bytes] | None = None,
              secret: str | None = None) -> None:
        stub.spool_results(self.directory, secret or self.secret, self.rid, results,
                           payloads or {})

    def collect(self) -> Any:
        return collect_spool(self.storage, LocalHost(), self.directory, self.rid)

    def files(self) -> list[str]:
        return sorted(os.listdir(self.directory)) if os.path.isdir(self.directory) else []

    def value(self, index: int) -> Any:
        stored = self.storage.get_tasks_with_stored_results(self.rid)[index - 1][1]
        if stored is None:
            return None
        with self.storage.open_value(stored) as f:
            return deserialise_value(f.read())


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path)
    yield s
    s.storage.close()


def test_the_stub_and_the_library_sign_a_spooled_result_alike() -> None:
    secret = "ab" * 32
    text = '{"index": 3, "ok": true}'
    assert stub.spool_signature(secret, 7, 3, text) == spool_signature(secret, 7, 3, text)
    assert spool_signature(secret, 7, 3, text) != spool_signature(secret, 7, 4, text)
    assert spool_signature(secret, 7, 3, text) != spool_signature(secret, 8, 3, text)
    assert spool_signature(secret, 7, 3, text) != spool_signature(secret, 7, 3, text + " ")
    assert spool_signature(secret, 7, 3, text) != spool_signature("cd" * 32, 7, 3, text)


def test_spool_files_are_private_whole_and_verified(spool: Spool) -> None:
    spool.write([spool.result(1, 1), spool.result(2, 4)])
    names = spool.files()
    assert len(names) == 2 and all(n.endswith(".json") for n in names)  # no temporary left
    assert stat.S_IMODE(os.stat(spool.directory).st_mode) == 0o700
    for name in names:
        path = os.path.join(spool.directory, name)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        index, result, blob = read_spool_file(Path(path).read_bytes(), spool.secret, spool.rid)
        assert result["index"] == index and blob is None


def test_collected_results_are_stored_once_and_the_files_deleted(spool: Spool) -> None:
    spool.write([spool.result(1, 1), spool.result(3, 9)])
    done = spool.collect()
    assert sorted(done.stored) == [1, 3] and not done.duplicates and not done.rejected
    assert spool.files() == []
    assert [spool.value(i) for i in (1, 2, 3, 4)] == [1, None, 9, None]
    task = spool.storage.get_task(spool.rid, 1)
    assert task["stdout"] == "out" and task["host"] == "node"
    assert sorted(spool.storage.open_task_indices(spool.rid)) == [2, 4]
    # A second worker spooled task 3 as well (its lease had run out): not stored twice.
    spool.write([spool.result(3, "another run")])
    again = spool.collect()
    assert again.stored == [] and again.duplicates == [3] and not again.rejected
    assert spool.value(3) == 9 and spool.files() == []


def test_a_result_the_server_already_stored_is_a_duplicate_not_an_error(spool: Spool) -> None:
    import pickle

    spool.storage.complete(spool.rid, [{"index": 2, "ok": True, "value": pickle.dumps(4)}])
    spool.write([spool.result(2, "from the spool"), spool.result(4, 16)])
    done = spool.collect()
    assert done.stored == [4] and done.duplicates == [2]
    assert spool.value(2) == 4 and spool.files() == []


def test_a_bad_signature_is_rejected_reported_and_left_aside(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    spool.write([spool.result(1, 1)])
    spool.write([spool.result(2, 4)], secret="cd" * 32)  # another request's secret
    (name_1,) = [n for n in spool.files() if n.startswith("1-")]
    path_1 = os.path.join(spool.directory, name_1)
    data = Path(path_1).read_bytes()
    assert b'"stdout": "out"' in data
    Path(path_1).write_bytes(data.replace(b'"stdout": "out"', b'"stdout": "OUT"'))
    with caplog.at_level(logging.ERROR, logger="sheepdog.spool"):
        done = spool.collect()
    assert done.stored == [] and len(done.rejected) == 2
    assert all("signature does not match" in why for _, why in done.rejected)
    assert "rejected" in caplog.text and "signature" in done.describe()
    assert spool.files() == sorted(n for n in spool.files() if n.endswith(REJECTED_SUFFIX))
    assert len(spool.files()) == 2
    assert sorted(spool.storage.open_task_indices(spool.rid)) == [1, 2, 3, 4]
    assert spool.collect().rejected == []  # a rejected file is not read again


def test_a_file_that_is_not_a_spool_file_says_so(spool: Spool) -> None:
    with pytest.raises(SpoolFileError, match="not a sheepdog spool file"):
        read_spool_file(b"hello\nworld\n", spool.secret, spool.rid)
    spool.write([spool.result(1, 1)])
    (name,) = spool.files()
    data = Path(spool.directory, name).read_bytes()
    with pytest.raises(SpoolFileError, match="result of request 1, not 999"):
        read_spool_file(data, spool.secret, 999)


def test_a_large_value_is_spooled_as_a_blob_file_and_collected(spool: Spool) -> None:
    import pickle

    payload = pickle.dumps(b"x" * (INLINE_MAX_BYTES + 10))
    result = spool.result(2, None)
    del result["value"]
    result["blob"] = {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    spool.write([result], {2: payload})
    names = spool.files()
    assert len(names) == 2 and any(n.endswith(".blob") for n in names)
    assert all(stat.S_IMODE(os.stat(os.path.join(spool.directory, n)).st_mode) == 0o600
               for n in names)
    done = spool.collect()
    assert done.stored == [2] and spool.files() == []
    assert spool.value(2) == b"x" * (INLINE_MAX_BYTES + 10)
    stored = spool.storage.get_tasks_with_stored_results(spool.rid)[1][1]
    assert isinstance(stored, str)  # kept as a blob file beside the database


def test_a_changed_blob_file_is_rejected(spool: Spool) -> None:
    import pickle

    payload = pickle.dumps(b"y" * (INLINE_MAX_BYTES + 10))
    result = spool.result(1, None)
    del result["value"]
    result["blob"] = {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    spool.write([result], {1: payload})
    (blob,) = [n for n in spool.files() if n.endswith(".blob")]
    path = os.path.join(spool.directory, blob)
    Path(path).write_bytes(payload[:-2] + b"z.")
    done = spool.collect()
    assert done.stored == [] and "not the value its signed result names" in done.rejected[0][1]
    assert spool.storage.open_task_indices(spool.rid) == [1, 2, 3, 4]


def test_no_spool_directory_collects_nothing(spool: Spool) -> None:
    done = spool.collect()
    assert (done.stored, done.duplicates, done.rejected) == ([], [], [])


# --- a real worker and the real server -------------------------------------------------


def test_a_worker_that_cannot_reach_the_server_spools_and_exits_8(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    try:
        rid = setup.request(slow_square, list(range(1, 9)), batch=3)
        directory = str(tmp_path / "jobs" / "spool")
        job = write_job(
            tmp_path / "jobs", setup.server.url_for("127.0.0.1"),
            setup.storage.get_secret(rid), rid, 8,
            client_options={"retry_s": 1.0, "spool_dir": directory},
        )
        proc = setup.start(job, 1)
        wait_for(lambda: setup.storage.count_results(rid) >= 3, "the first batch")
        setup.server.stop()  # the laptop sleeps: nothing answers for longer than retry_s
        code, out, err = finish(proc)
        assert code == stub.EXIT_SPOOLED == 8, f"{out}\n{err}"
        found = re.search(r"spooled (\d+) finished results to (\S+), where", err)
        assert found and found.group(2) == directory, err[-600:]
        names = os.listdir(directory)
        assert len(names) == int(found.group(1)) >= 1
        assert all(stat.S_IMODE(os.stat(os.path.join(directory, n)).st_mode) == 0o600
                   for n in names)
        open_before = set(setup.storage.open_task_indices(rid))
        done = collect_spool(setup.storage, LocalHost(), directory, rid)
        assert len(done.stored) == len(names) and set(done.stored) <= open_before
        assert os.listdir(directory) == []
        results = setup.results(rid)
        for index in range(1, 9):
            assert results[index - 1] == (None if index in open_before - set(done.stored)
                                          else index * index)
    finally:
        setup.close()


def test_a_large_result_spools_when_its_upload_finds_no_server(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    try:
        go = str(tmp_path / "go")
        rid = setup.request(big, [(1, go), (2, go)], batch=1)
        directory = str(tmp_path / "jobs" / "spool")
        job = write_job(
            tmp_path / "jobs", setup.server.url_for("127.0.0.1"),
            setup.storage.get_secret(rid), rid, 2,
            client_options={"retry_s": 1.0, "spool_dir": directory},
        )
        proc = setup.start(job, 1)
        wait_for(lambda: setup.storage.task_counts(rid).get("leased", 0) >= 1, "a lease")
        setup.server.stop()  # gone before the task ends: its upload finds no server
        Path(go).touch()
        code, out, err = finish(proc)
        assert code == stub.EXIT_SPOOLED, f"{out}\n{err}"
        assert "gave up on PUT" in err  # the upload, not the post of the results
        names = sorted(os.listdir(directory))
        assert len(names) == 2 and names[0].endswith(".blob") and names[1].endswith(".json")
        open_before = setup.storage.open_task_indices(rid)
        done = collect_spool(setup.storage, LocalHost(), directory, rid)
        assert len(done.stored) == 1 and done.stored[0] in open_before
        assert os.listdir(directory) == []
        assert setup.results(rid)[done.stored[0] - 1] == big(done.stored[0])
    finally:
        setup.close()


@pytest.fixture
def jobs(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalJobs]:
    counted = LocalJobs(monkeypatch)
    yield counted
    counted.close()


def test_the_laptop_sleeps_then_attach_brings_every_result_back(
    tmp_path: Path, jobs: LocalJobs, caplog: pytest.LogCaptureFixture
) -> None:
    """The server is gone mid-map for longer than the workers retry; attach finishes it."""
    n = 16
    config = local_config(tmp_path, workers=2, batch=2, worker_retry_s=2, lease_s=5)
    rid = sheepdog.map_async(slow_square, list(range(1, n + 1)), config)
    with Storage(config["dbfile"]) as storage:
        wait_for(lambda: storage.count_results(rid) >= 2, "the first results")
        server = StoredRequest(storage, rid).own_server()
        assert server is not None
        server.stop()  # the laptop sleeps: no server, no watcher
        procs = [p for job in jobs.job_ids for p in local_jobs._STARTED[job].procs]
        wait_for(lambda: all(p.poll() is not None for p in procs), "the workers to give up")
        assert stub.EXIT_SPOOLED in [p.returncode for p in procs]
        spool_dir = next(Path(config["ssh_dir"]).glob("*.spool"))
        spooled = [p.name for p in spool_dir.iterdir() if p.suffix == ".json"]
        assert spooled, "no worker spooled a result"
        before = storage.count_results(rid)
    with caplog.at_level(logging.INFO, logger="sheepdog.spool"):
        results = sheepdog.attach(rid, config, verbose=False, timeout_s=WAIT_S)
    assert [result for _, result in results] == [x * x for x in range(1, n + 1)]
    assert [arg for arg, _ in results] == list(range(1, n + 1))
    assert f"{len(spooled)} spooled results stored, 0 already stored" in caplog.text
    assert list(spool_dir.iterdir()) == []
    assert jobs.submitted >= 2 or before + len(spooled) == n
    with Storage(config["dbfile"]) as storage:
        assert {k: v for k, v in storage.task_counts(rid).items() if v} == {"done": n}


def test_attach_on_a_finished_request_returns_its_results(tmp_path: Path, jobs: LocalJobs) -> None:
    config = local_config(tmp_path)
    assert sheepdog.map(square, [1, 2, 3], config, verbose=False) == [1, 4, 9]
    assert sheepdog.attach(1, config, verbose=False) == [(1, 1), (2, 4), (3, 9)]


def test_attach_from_the_cli_prints_the_results(tmp_path: Path, jobs: LocalJobs) -> None:
    config = local_config(tmp_path)
    sheepdog.map(square, [5, 6], config, verbose=False)
    proc = subprocess.run(
        ["python3", "-m", "sheepdog", "attach", "1", "--dbfile", config["dbfile"], "--json"],
        capture_output=True, text=True, timeout=WAIT_S, check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.returncode == 0, proc.stderr
    assert '"result": 25' in proc.stdout and '"result": 36' in proc.stdout


def test_bad_files_are_set_aside_and_the_rest_collected(spool: Spool) -> None:
    spool.write([spool.result(1, 1), spool.result(4, 16)])
    d = Path(spool.directory)
    (d / "2-dir.json").mkdir()
    os.mkfifo(d / "2-fifo.json")
    (d / "3-zero.json").symlink_to("/dev/zero")
    (d / "3-deep.json").write_bytes(b"[" * 200_000 + b"\n" + b"]" * 200_000 + b"\n")
    with open(d / "3-huge.json", "wb") as f:
        f.truncate(512 * 1024 * 1024)  # sparse: costs no disk
    done = spool.collect()
    assert sorted(done.stored) == [1, 4]
    rejected = {os.path.basename(path): why for path, why in done.rejected}
    assert set(rejected) == {"2-dir.json", "2-fifo.json", "3-zero.json", "3-deep.json",
                             "3-huge.json"}
    assert "not a regular file" in rejected["2-fifo.json"]
    assert "more than" in rejected["3-huge.json"]
    assert all(name.endswith(REJECTED_SUFFIX) for name in spool.files())
    assert sorted(spool.storage.open_task_indices(spool.rid)) == [2, 3]


def test_a_blob_name_cannot_point_at_another_spool_file(spool: Spool) -> None:
    import pickle

    spool.write([spool.result(4, 16)])
    (victim,) = spool.files()  # collected after the files that name it
    spool.write([spool.result(3, 9)])
    payload = pickle.dumps(b"y" * (INLINE_MAX_BYTES + 10))
    result = spool.result(1, None)
    del result["value"]
    result["blob"] = {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    spool.write([result], {1: payload})

    def point_at_victim(prefix: str) -> None:
        (name,) = [n for n in spool.files() if n.startswith(prefix) and n.endswith(".json")]
        path = Path(spool.directory, name)
        head, rest = path.read_bytes().split(b"\n", 1)
        header = json.loads(head)
        header["blob"] = victim  # unsigned: anyone who can write there could change it
        path.write_bytes(json.dumps(header).encode() + b"\n" + rest)

    point_at_victim("1-")  # a large value's blob
    point_at_victim("3-")  # an inline value: it has no blob to delete
    done = spool.collect()
    assert sorted(done.stored) == [3, 4] and "not one of task 1's" in done.rejected[0][1]
    assert spool.value(4) == 16  # the victim was collected, not deleted unread


def test_a_spool_file_of_the_run_before_a_rerun_is_not_taken(spool: Spool) -> None:
    (lease,) = spool.storage.lease(spool.rid, worker="w", host="node", max_tasks=1, lease_s=60)
    spool.write([spool.result(lease.index, "old run", lease=lease.lease)])
    # The file was kept (or put back) while the task was lost and rerun.
    spool.storage.fail_tasks(spool.rid, [lease.index], "lost", "its worker went quiet")
    assert spool.storage.rerun_tasks(spool.rid, ["lost"]) == [lease.index]
    done = spool.collect()
    assert done.stored == [] and done.duplicates == [lease.index]
    assert spool.value(lease.index) is None
    assert lease.index in spool.storage.open_task_indices(spool.rid)
