"""Unit tests for the worker stub's protocol client (worker_stub/sheepdog_worker.py)."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import pickle
import re
import reprlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sheepdog.client import stub
from sheepdog.job_file import stub_path
from sheepdog.server import auth as _signing

SECRET = "5e" * 32
GiB, MiB = 1024**3, 1024**2


# ---- run-time limits ----
# The limits themselves come from the job file, which the scheduler's class reads
# (tests/scheduler/test_worker_limits.py).


def test_without_a_limit_every_wanted_task_is_leased() -> None:
    assert stub.tasks_to_lease(8, None, elapsed_s=10**6, longest_s=10**6) == 8


def test_before_any_task_one_is_leased_to_learn_how_long_they_take() -> None:
    assert stub.tasks_to_lease(8, 60, elapsed_s=1, longest_s=0.0, margin_s=5) == 1
    assert stub.tasks_to_lease(8, 60, elapsed_s=56, longest_s=0.0, margin_s=5) == 0


def test_no_lease_when_the_time_left_is_shorter_than_the_longest_task() -> None:
    # 60 s limit, 40 s gone, 5 s margin: 15 s left.
    assert stub.tasks_to_lease(8, 60, elapsed_s=40, longest_s=16, margin_s=5) == 0
    assert stub.tasks_to_lease(8, 60, elapsed_s=40, longest_s=15, margin_s=5) == 1
    assert stub.tasks_to_lease(8, 60, elapsed_s=40, longest_s=5, margin_s=5) == 3
    assert stub.tasks_to_lease(2, 60, elapsed_s=40, longest_s=1, margin_s=5) == 2


@given(
    wanted=st.integers(0, 100),
    limit_s=st.integers(1, 10**5),
    elapsed_s=st.floats(0, 10**5),
    longest_s=st.floats(0.001, 10**4),
    margin_s=st.floats(0, 60),
)
def test_leased_tasks_fit_in_the_time_left(
    wanted: int, limit_s: int, elapsed_s: float, longest_s: float, margin_s: float
) -> None:
    n = stub.tasks_to_lease(wanted, limit_s, elapsed_s, longest_s, margin_s)
    left_s = limit_s - elapsed_s - margin_s
    assert 0 <= n <= wanted
    assert n * longest_s <= max(left_s, 0.0)  # at the longest pace, all end before the margin
    if left_s < longest_s:
        assert n == 0
    elif wanted:
        assert n >= 1


def test_set_memlimit_turns_a_big_allocation_into_memory_error(tmp_path: Path) -> None:
    """In a child process, since an address-space limit cannot be lifted again."""
    job = tmp_path / "job.py"
    job.write_text(
        "#!/usr/bin/python3\n#$ -l h_rt=0:10:0,mem_grab=300M\n"
        f"import runpy\nstub = runpy.run_path({str(stub_path())!r}, run_name='stub')\n"
        "client = stub['Client']('http://localhost:9/', '00' * 32, 1, 1,"
        f" mem_limit_bytes={300 * MiB})\n"
        "print(client.set_memlimit())\n"
        "try:\n    block = bytearray(400 * 1024 * 1024)\nexcept MemoryError:\n"
        "    print('MemoryError')\n"
    )
    done = subprocess.run(
        [sys.executable, str(job)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(300 * MiB), "MemoryError"]


# ---- backoff ----


def test_backoff_upper_bound_doubles_up_to_the_cap() -> None:
    bounds = [stub.backoff_delay(n, base_s=0.5, cap_s=30.0, rand=lambda: 1.0) for n in range(9)]
    assert bounds == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert stub.backoff_delay(3, rand=lambda: 0.0) == 0.0


@given(st.integers(min_value=0, max_value=10**9))
def test_backoff_is_within_zero_and_the_cap(attempt: int) -> None:
    delay = stub.backoff_delay(attempt)
    assert 0.0 <= delay <= min(30.0, 0.5 * 2.0 ** min(attempt, 64))


# ---- signing ----


@given(
    secret=st.binary(min_size=16, max_size=64).map(bytes.hex),
    method=st.sampled_from(["GET", "POST", "put"]),
    path=st.text(min_size=1, max_size=80),
    time_s=st.integers(min_value=0, max_value=2**40),
    body=st.binary(max_size=300),
    nonce=st.binary(min_size=16, max_size=16).map(bytes.hex),
)
def test_request_signature_matches_the_library(
    secret: str, method: str, path: str, time_s: int, body: bytes, nonce: str
) -> None:
    expected = _signing.signed_headers(secret, method, path, body, time_s=time_s, nonce=nonce)
    assert stub.signed_headers(secret, method, path, body, time_s, nonce) == expected
    fresh = stub.signed_headers(secret, method, path, body)
    assert re.fullmatch("[0-9a-f]{32}", fresh["X-Sheepdog-Nonce"])
    assert fresh["X-Sheepdog-Nonce"] != stub.signed_headers(secret, method, path, body)[
        "X-Sheepdog-Nonce"]


@given(
    secret=st.binary(min_size=16, max_size=64).map(bytes.hex),
    signature=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    body=st.binary(max_size=300),
)
def test_response_signature_matches_the_library(secret: str, signature: str, body: bytes) -> None:
    expected = _signing.sign_response(secret, signature, body)
    assert stub.sign_response(secret, signature, body) == expected


# ---- output capture ----


class Sink:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_capture_keeps_the_first_bytes_and_passes_everything_on() -> None:
    sink = Sink()
    capture = stub.Capture(sink, 10)
    assert capture.write("hello ") == 6
    capture.writelines(["world", "!" * 20])
    capture.flush()
    assert "".join(sink.parts) == "hello world" + "!" * 20
    notice = "[sheepdog: 21 more bytes not kept; see the SGE output files]"
    assert capture.text() == "hello worl\n" + notice


def test_capture_under_the_limit_is_exact_and_cuts_between_characters() -> None:
    capture = stub.Capture(Sink(), 100)
    capture.write("résumé\n")
    assert capture.text() == "résumé\n"
    cut = stub.Capture(Sink(), 2)
    cut.write("aé")  # 'é' is two bytes: the cut falls inside it
    assert cut.text().startswith("a\n[sheepdog: 1 more bytes")  # half of 'é' is silently lost


# ---- running one task ----


def make_client(**settings: Any) -> Any:
    client = stub.Client("http://127.0.0.1:9/", SECRET, 3, 1)
    client.settings = {"capture_bytes": 1000, "task_timeout_s": None, **settings}
    return client


def task(value: object, index: int = 1) -> dict[str, Any]:
    args = base64.b64encode(pickle.dumps(value)).decode()
    return {"index": index, "attempt": 1, "lease": f"lease-{index}", "args": args}


def test_run_task_calls_with_tuple_list_or_single_value_and_captures_output(
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = make_client()

    def f(*args: object) -> object:
        print("computing", args)
        return args

    client.function = f
    result = client.run_task(task((1, "b")))
    assert result["ok"] is True
    assert pickle.loads(base64.b64decode(result["value"])) == (1, "b")
    assert result["stdout"] == "computing (1, 'b')\n"
    assert result["stderr"] == ""
    assert result["lease"] == "lease-1"
    # A list is unpacked too, as Sheepdog 0.2's f(*arg) did (issue 13); anything else is
    # the single argument.
    unpacked = client.run_task(task([1, 2], index=2))
    assert pickle.loads(base64.b64decode(unpacked["value"])) == (1, 2)
    single = client.run_task(task("ab", index=3))
    assert pickle.loads(base64.b64decode(single["value"])) == ("ab",)
    out = capsys.readouterr().out
    assert "computing (1, 'b')" in out  # teed to the real stream too
    assert "sheepdog: task 1 ok: (1, 'b')" in out


def test_run_task_reports_an_exception_as_data(capsys: pytest.CaptureFixture[str]) -> None:
    client = make_client()

    def f(x: int) -> None:
        raise ValueError(f"bad {x}")

    client.function = f
    result = client.run_task(task(7))
    assert result["ok"] is False
    error = result["error"]
    assert (error["type"], error["message"]) == ("ValueError", "bad 7")
    assert "raise ValueError" in error["traceback"]
    assert error["host"] == client.host
    assert error["python"] == sys.version.split()[0]
    assert "sheepdog: task 1 error: ValueError: bad 7" in capsys.readouterr().out


def test_run_task_times_out_with_sigalrm() -> None:
    client = make_client(task_timeout_s=0.2)

    def f(x: float) -> None:
        try:
            time.sleep(x)
        except Exception:  # noqa: BLE001 - the timeout must get through a broad except in the task
            pass
        time.sleep(x)

    client.function = f
    result = client.run_task(task(30.0))
    assert result["ok"] is False
    assert result["error"]["type"] == "TaskTimeout"
    assert result["error"]["message"] == "timed out after 0.2 s"
    assert client.armed is False
    ok = client.run_task(task(0.0, index=2))  # the alarm is disarmed after a task
    assert ok["ok"] is True


# ---- talking to a server ----


class FakeServer(http.server.ThreadingHTTPServer):
    """Answers each call with the next scripted (status, body, signed) and records the calls."""

    script: list[tuple[int, dict[str, Any], bool]]
    calls: list[tuple[str, str, bytes, bool]]
    nonces: list[str]


class Handler(http.server.BaseHTTPRequestHandler):
    server: FakeServer

    def do_GET(self) -> None:
        self.answer()

    def do_POST(self) -> None:
        self.answer()

    def answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        signature = self.headers.get("X-Sheepdog-Signature", "")
        expected = _signing.sign_request(
            SECRET, self.command, self.path, self.headers.get("X-Sheepdog-Time", ""),
            self.headers.get("X-Sheepdog-Nonce", ""), len(body),
            hashlib.sha256(body).hexdigest(),
        )
        self.server.calls.append((self.command, self.path, body, signature == expected))
        self.server.nonces.append(self.headers.get("X-Sheepdog-Nonce", ""))
        status, answer, signed = self.server.script.pop(0)
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if signed:
            answer_signature = _signing.sign_response(SECRET, signature, data)
            self.send_header("X-Sheepdog-Signature", answer_signature)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    server = FakeServer(("127.0.0.1", 0), Handler)
    server.script, server.calls, server.nonces = [], [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def connection(server: FakeServer, retry_s: float = 5.0) -> Any:
    url = f"http://127.0.0.1:{server.server_address[1]}/base/"
    return stub.Connection(url, SECRET, 3, retry_s=retry_s, timeout_s=10.0)


def test_call_is_signed_and_its_signed_answer_returned(fake_server: FakeServer) -> None:
    fake_server.script = [(200, {"tasks": []}, True), (200, {"renewed": []}, True)]
    conn = connection(fake_server)
    assert conn.call("POST", "lease", {"worker": "w"}) == {"tasks": []}
    assert conn.call("GET", "function") == {"renewed": []}
    assert fake_server.calls == [
        ("POST", "/base/api/v1/requests/3/lease", b'{"worker": "w"}', True),
        ("GET", "/base/api/v1/requests/3/function", b"", True),
    ]


def test_5xx_is_retried_then_succeeds(fake_server: FakeServer) -> None:
    fake_server.script = [(503, {}, False), (500, {}, False), (200, {"ok": 1}, True)]
    assert connection(fake_server).call("GET", "function") == {"ok": 1}
    assert len(fake_server.calls) == 3


def test_a_retry_resends_the_same_call_and_a_new_call_gets_a_new_nonce(
    fake_server: FakeServer,
) -> None:
    # The server answers a nonce it has seen from its record: a retry after a lost
    # answer must carry the same nonce, or its effect (a lease) would happen twice.
    fake_server.script = [(503, {}, False), (200, {"tasks": []}, True), (200, {"tasks": []}, True)]
    conn = connection(fake_server)
    conn.call("POST", "lease", {"worker": "w"})
    conn.call("POST", "lease", {"worker": "w"})
    first, retry, second = fake_server.nonces
    assert first == retry and second != first
    assert fake_server.calls[0] == fake_server.calls[1]  # the very same call, body and all
    assert all(ok for *_, ok in fake_server.calls)


def test_a_call_retried_past_resign_after_s_is_signed_anew(
    fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stub, "RESIGN_AFTER_S", 0.0)
    fake_server.script = [(503, {}, False), (200, {"tasks": []}, True)]
    connection(fake_server).call("POST", "lease", {"worker": "w", "max_tasks": 1})
    first, retry = fake_server.nonces
    assert first != retry
    assert all(ok for *_, ok in fake_server.calls)
    # A new call: "retry" has the server hand back what a lost answer had leased to us.
    bodies = [json.loads(body) for _, _, body, _ in fake_server.calls]
    assert bodies == [{"worker": "w", "max_tasks": 1},
                      {"worker": "w", "max_tasks": 1, "retry": True}]


def test_401_is_not_retried_and_says_the_secret_does_not_match(fake_server: FakeServer) -> None:
    error = {"error": {"code": "bad_signature", "message": "signature does not match"}}
    fake_server.script = [(401, error, False)]
    with pytest.raises(stub.ProtocolFailure, match="secret does not match request 3") as info:
        connection(fake_server).call("GET", "function")
    assert info.value.exit_status == stub.EXIT_AUTH
    assert "bad_signature: signature does not match" in str(info.value)
    assert len(fake_server.calls) == 1


def test_404_says_the_request_is_unknown(fake_server: FakeServer) -> None:
    fake_server.script = [(404, {"error": {"code": "unknown_request", "message": "no"}}, False)]
    with pytest.raises(stub.ProtocolFailure, match="does not know request 3") as info:
        connection(fake_server).call("GET", "function")
    assert info.value.exit_status == stub.EXIT_PROTOCOL


def test_an_unsigned_answer_is_refused(fake_server: FakeServer) -> None:
    fake_server.script = [(200, {"payload": "x"}, False)]
    with pytest.raises(stub.ProtocolFailure, match="not signed with request 3's secret") as info:
        connection(fake_server).call("GET", "function")
    assert info.value.exit_status == stub.EXIT_AUTH


def test_an_unreachable_server_is_retried_until_retry_s() -> None:
    conn = stub.Connection("http://127.0.0.1:9/", SECRET, 3, retry_s=1.0, timeout_s=1.0)
    with pytest.raises(stub.ProtocolFailure, match="cannot reach the server .* after retrying"):
        conn.call("GET", "function")


def test_go_exits_with_the_auth_status_and_a_message(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_server.script = [(401, {"error": {"code": "bad_signature", "message": "no"}}, False)]
    url = f"http://127.0.0.1:{fake_server.server_address[1]}"
    client = stub.Client(url, SECRET, 3, 1, mem_limit_bytes=0)
    with pytest.raises(SystemExit) as info:
        client.go()
    assert info.value.code == stub.EXIT_AUTH
    assert "the server rejected our signature" in capsys.readouterr().err


def test_a_non_http_url_is_refused() -> None:
    with pytest.raises(stub.ProtocolFailure, match="not an http"):
        stub.Connection("ftp://x/", SECRET, 3)


# ---- exceptions that fight back, and the key file ----


class StrRaises(Exception):
    def __str__(self) -> str:
        raise ValueError("no")


class StrNotAString(Exception):
    def __str__(self) -> Any:
        return 42


class StrExits(Exception):
    def __str__(self) -> str:
        raise SystemExit(9)


@pytest.mark.parametrize("exc", [StrRaises(), StrNotAString(), StrExits()])
def test_describe_survives_any_exception_object(exc: BaseException) -> None:
    error = make_client().describe(exc, "Traceback ...")
    assert error["type"].endswith(type(exc).__name__)
    assert error["message"].startswith(f"<unprintable {type(exc).__name__}: str() raised ")
    assert error["traceback"] == "Traceback ..."


def test_a_task_raising_an_unprintable_exception_is_reported() -> None:
    def bad(x: int) -> None:
        raise StrRaises()

    client = make_client()
    client.function, client.protocol = bad, 4
    result = client.run_task(task(1))
    assert result["ok"] is False
    assert result["error"]["message"] == "<unprintable StrRaises: str() raised ValueError>"
    assert "raise StrRaises()" in result["error"]["traceback"]


def test_read_secret_says_what_is_wrong(tmp_path: Path) -> None:
    key = tmp_path / "sheepdog_001_x.key"
    key.write_text(SECRET + "\n")
    assert stub.read_secret(str(key)) == SECRET
    with pytest.raises(stub.ProtocolFailure, match="does not exist on") as missing:
        stub.read_secret(str(tmp_path / "nope.key"))
    assert missing.value.exit_status == stub.EXIT_SECRET == 7
    assert "the execution nodes must see ssh_dir at the same path" in str(missing.value)
    key.write_text("not a secret\n")
    with pytest.raises(stub.ProtocolFailure, match="does not hold a secret") as bad:
        stub.read_secret(str(key))
    assert bad.value.exit_status == stub.EXIT_SECRET
    assert "not a secret" not in str(bad.value)


def test_a_large_bytes_result_is_summarised_without_repr_of_all_of_it() -> None:
    big = b"ab" * 10_000_000
    assert stub.short_repr(big) == "b'abababababababab'... (20000000 bytes)"
    assert stub.short_repr(b"small") == "b'small'"
    assert stub.short_repr(list(range(100))) == reprlib.repr(list(range(100)))
