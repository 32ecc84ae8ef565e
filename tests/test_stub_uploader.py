"""The worker stub's background uploader: a large result goes up while the next task runs.

The stub's Client runs against stand-in connections (no server): the main one answers
``lease`` and ``results`` from a queue of tasks, the uploader's own connections record
what they upload and post, and can be told to fail.
"""

from __future__ import annotations

import base64
import hashlib
import json
import pickle
import threading
from pathlib import Path
from typing import Any

import pytest

from sheepdog.client import stub

SECRET = "5e" * 32
#: Bound on every wait in these tests; none is reached when the stub works.
WAIT_S = 20.0


def task(index: int) -> dict[str, Any]:
    args = base64.b64encode(pickle.dumps(index)).decode()
    return {"index": index, "attempt": 1, "lease": f"lease-{index}", "args": args}


class Calls:
    """What the stand-in connections saw: results posted (by task index) and uploads."""

    def __init__(self, n_tasks: int) -> None:
        self.lock = threading.Lock()
        self.todo = [task(i) for i in range(1, n_tasks + 1)]
        self.posted: dict[int, dict[str, Any]] = {}
        self.posted_by: dict[int, str] = {}
        self.uploaded: dict[str, bytes] = {}
        self.upload_failures: list[stub.ProtocolFailure] = []  # raised by the next uploads
        self.upload_started = threading.Event()
        self.block_uploads: threading.Event | None = None
        self.beat_until: set[str] = {"never"}  # a heartbeat with these leases sets block_uploads
        self.on_beat: Any = lambda: None

    def lease(self, n: int) -> list[dict[str, Any]]:
        with self.lock:
            leased, self.todo = self.todo[:n], self.todo[n:]
        return leased

    def post(self, results: list[dict[str, Any]], by: str) -> None:
        with self.lock:
            for result in results:
                assert result["index"] not in self.posted, "posted twice"
                self.posted[result["index"]] = result
                self.posted_by[result["index"]] = by


class MainConn:
    """The worker's own connection: leases tasks and takes results."""

    def __init__(self, calls: Calls, unreachable: bool = False) -> None:
        self.calls, self.unreachable = calls, unreachable

    def call(self, method: str, name: str, body: Any = None, **_: Any) -> dict[str, Any]:
        if self.unreachable:
            raise stub.ProtocolFailure("cannot reach the server", unreachable=True)
        if name == "results":
            self.calls.post(body["results"], "worker")
        return {"tasks": self.calls.lease(body.get("max_tasks", 0))}

    def upload(self, data: bytes, retry_s: float | None = None) -> dict[str, Any]:
        if self.unreachable:
            raise stub.ProtocolFailure("cannot reach the server", unreachable=True)
        digest = stub.sha256_hex(data)  # bytes, or the pieces the pickler wrote
        self.calls.uploaded[digest] = stub.as_bytes(data)
        return {"sha256": digest, "size": len(data)}


class UploaderConn(MainConn):
    """A connection the uploader (or the heartbeat) opens: uploads, and posts one result."""

    def call(self, method: str, name: str, body: Any = None, **_: Any) -> dict[str, Any]:
        assert name in ("results", "heartbeat"), name
        if name == "results":
            assert body["max_tasks"] == 0  # it posts; leasing is the worker's
            self.calls.post(body["results"], "uploader")
        elif set(body["leases"]) >= self.calls.beat_until:
            self.calls.block_uploads.set()  # type: ignore[union-attr]
            self.calls.on_beat()
        return {"accepted": [], "duplicates": [], "renewed": [], "lost": []}

    def upload(self, data: bytes, retry_s: float | None = None) -> dict[str, Any]:
        self.calls.upload_started.set()
        if self.calls.block_uploads is not None:
            assert self.calls.block_uploads.wait(WAIT_S), "the next task never ran meanwhile"
        if self.calls.upload_failures:
            raise self.calls.upload_failures.pop(0)
        return super().upload(data, retry_s)


def make_client(calls: Calls, f: Any, **options: Any) -> Any:
    client = stub.Client("http://127.0.0.1:9/", SECRET, 3, 1, **options)
    client.conn = MainConn(calls)
    client.connect = lambda: UploaderConn(calls)
    client.uploader.connect = client.connect
    client.function, client.protocol = f, pickle.HIGHEST_PROTOCOL
    client.settings = {"inline_max_bytes": 100, "batch": 1, "heartbeat_s": 3600}
    return client


def value_of(index: int) -> bytes:
    return bytes([index]) * 1000  # larger than inline_max_bytes: uploaded as a blob


def posted_values(calls: Calls) -> dict[int, object]:
    values = {}
    for index, result in calls.posted.items():
        assert result["ok"], result
        data = calls.uploaded[result["blob"]["sha256"]]
        values[index] = pickle.loads(data)
    return values


def test_a_large_result_goes_up_while_the_next_task_runs() -> None:
    calls = Calls(3)
    calls.block_uploads = threading.Event()  # task 1's upload waits until task 2 runs

    def f(index: int) -> bytes:
        if index == 2:
            calls.block_uploads.set()  # type: ignore[union-attr]
        return value_of(index)

    make_client(calls, f).run()
    assert posted_values(calls) == {i: value_of(i) for i in (1, 2, 3)}
    assert set(calls.posted_by.values()) == {"uploader"}


def test_small_results_still_go_with_the_next_lease() -> None:
    calls = Calls(2)
    make_client(calls, lambda index: index).run()
    assert calls.posted_by == {1: "worker", 2: "worker"}
    assert calls.uploaded == {}


def test_a_failed_background_upload_is_sent_again_by_the_worker_not_lost() -> None:
    calls = Calls(3)
    calls.upload_failures = [stub.ProtocolFailure("the server refused PUT with HTTP 400")]
    make_client(calls, value_of).run()
    # Task 1's result failed in the background; the worker uploaded and posted it itself.
    assert posted_values(calls) == {i: value_of(i) for i in (1, 2, 3)}
    assert calls.posted_by[1] == "worker"


def test_the_last_result_is_waited_for_before_the_worker_ends() -> None:
    calls = Calls(1)
    release = threading.Event()
    calls.block_uploads = release
    client = make_client(calls, value_of)
    ended = threading.Event()

    def run() -> None:
        client.run()
        ended.set()

    threading.Thread(target=run, daemon=True).start()
    assert calls.upload_started.wait(WAIT_S)
    assert not ended.wait(0.2)  # run() has not returned while the upload is held
    release.set()
    assert ended.wait(WAIT_S)
    assert posted_values(calls) == {1: value_of(1)}


def test_an_unreachable_server_spools_the_result_being_uploaded(tmp_path: Path) -> None:
    calls = Calls(2)
    unreachable = stub.ProtocolFailure("cannot reach the server", unreachable=True)
    calls.upload_failures = [unreachable, unreachable]
    spool = tmp_path / "spool"
    client = make_client(calls, value_of, spool_dir=str(spool))

    def gone(index: int) -> bytes:
        client.conn.unreachable = index == 2  # the server goes away during task 2
        return value_of(index)

    client.function = gone
    with pytest.raises(stub.ProtocolFailure) as caught:
        client.run()
    assert caught.value.exit_status == stub.EXIT_SPOOLED
    assert calls.posted == {}
    spooled = {}
    for path in spool.glob("*.json"):
        head, text = path.read_text().splitlines()
        result = json.loads(text)
        blob = (spool / json.loads(head)["blob"]).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == result["blob"]["sha256"]
        spooled[result["index"]] = pickle.loads(blob)
    assert spooled == {1: value_of(1), 2: value_of(2)}


def test_the_heartbeat_renews_the_lease_of_a_result_going_up() -> None:
    calls = Calls(2)
    calls.block_uploads = threading.Event()  # task 1's upload waits for a heartbeat for it
    calls.beat_until = {"lease-1", "lease-2"}  # while task 2 runs
    release = threading.Event()

    def f(index: int) -> bytes:
        if index == 2:
            assert release.wait(WAIT_S)
        return value_of(index)

    client = make_client(calls, f)
    client.settings["heartbeat_s"] = 0.01
    calls.on_beat = release.set
    client.run()
    assert posted_values(calls) == {1: value_of(1), 2: value_of(2)}


def test_under_a_tight_memory_limit_a_large_result_goes_up_before_the_next_task() -> None:
    calls = Calls(2)
    client = make_client(calls, value_of, mem_limit_bytes=3000)  # values of ~1000 bytes
    assert client.room_to_hand_over(750) and not client.room_to_hand_over(1000)
    client.run()
    assert posted_values(calls) == {1: value_of(1), 2: value_of(2)}
    assert calls.posted_by == {1: "worker", 2: "worker"}


def test_a_pickle_kept_in_pieces_is_the_same_pickle_without_a_copy_of_a_large_value() -> None:
    big = bytes(1_000_000)
    for value in (big, ("x", big, bytearray(b"y" * 100_000)), list(range(1000))):
        pickled = stub.Pickled(value, pickle.HIGHEST_PROTOCOL)
        whole = pickled.join()
        assert pickle.loads(whole) == value
        assert len(pickled) == len(whole)
        assert stub.sha256_hex(pickled) == hashlib.sha256(whole).hexdigest()
    pieces = stub.Pickled(("x", big), pickle.HIGHEST_PROTOCOL).parts
    assert any(piece is big for piece in pieces)  # handed over as it is (Python 3.8+)


def test_a_result_the_next_task_changes_goes_up_as_it_was_returned() -> None:
    """A task that returns a buffer it reuses: the result is the value at its return."""
    calls = Calls(2)
    calls.block_uploads = threading.Event()  # task 1's upload waits until task 2 ran
    buffer = bytearray(1000)

    def f(index: int) -> bytearray:
        buffer[:] = value_of(index)
        if index == 2:
            calls.block_uploads.set()  # type: ignore[union-attr]
        return buffer

    make_client(calls, f).run()
    assert posted_values(calls) == {1: bytearray(value_of(1)), 2: bytearray(value_of(2))}
