"""The dashboard: its guard, its aggregates at 100,000 tasks, its SVG marks, its server."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from test_docs_blocks import REPO, block

from benchmarks.dashboard import populate
from sheepdog import status
from sheepdog.dashboard import serve
from sheepdog.dashboard.data import MAX_LANES, TIME_BINS, timeline
from sheepdog.dashboard.views import create_app
from sheepdog.errors import StorageError
from sheepdog.store import Storage

TOKEN = "k" * 32
LOCAL = {"REMOTE_ADDR": "127.0.0.1"}


@pytest.fixture
def dbfile(tmp_path: Path) -> str:
    return str(tmp_path / "sheepdog.sqlite")


@pytest.fixture
def small(dbfile: str) -> int:
    """50 tasks on 7 nodes: 2 lost (20, 40), 7 failed (every 7th)."""
    with Storage(dbfile) as storage:
        return populate(storage, 50, fail_every=7, lost_every=20)


def client(dbfile: str) -> FlaskClient:
    return create_app(dbfile, TOKEN).test_client()


def get(dbfile: str, path: str, **environ: str) -> tuple[int, str]:
    with client(dbfile).get(path, environ_base={**LOCAL, **environ}) as response:
        return response.status_code, response.get_data(as_text=True)


# --- the guard -------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/requests/1", "/requests/1/progress",
                                  "/requests/1/charts", "/static/dashboard.js"])
def test_every_page_refuses_a_missing_or_wrong_token(dbfile: str, small: int, path: str) -> None:
    assert get(dbfile, path)[0] == 403
    assert get(dbfile, f"{path}?token={'x' * 32}")[0] == 403
    assert get(dbfile, f"{path}?token={TOKEN}")[0] == 200


def test_another_address_is_refused_even_with_the_token(dbfile: str, small: int) -> None:
    code, body = get(dbfile, f"/?token={TOKEN}", REMOTE_ADDR="192.168.1.20")
    assert code == 403
    assert "192.168.1.20" in json.loads(body)["message"]


def test_another_host_name_is_refused(dbfile: str, small: int) -> None:
    """A page of another site that rebinds its name to 127.0.0.1 gets nothing."""
    response = client(dbfile).get(f"/?token={TOKEN}", environ_base=LOCAL,
                                  headers={"Host": "attacker.example:80"})
    assert response.status_code == 403


def test_pages_forbid_outside_assets_and_referrers(dbfile: str, small: int) -> None:
    response = client(dbfile).get(f"/requests/{small}?token={TOKEN}", environ_base=LOCAL)
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert not re.search(r"(src|href)=\"https?://", response.get_data(as_text=True))


def test_a_reader_never_creates_the_database(dbfile: str) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        create_app(dbfile, TOKEN)
    assert not Path(dbfile).exists()
    done = subprocess.run([sys.executable, "-m", "sheepdog", "dashboard", "--dbfile", dbfile,
                           "--no-browser"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 1
    assert "no sheepdog database" in done.stderr
    assert not Path(dbfile).exists()


def test_the_dashboard_writes_nothing(dbfile: str, small: int) -> None:
    before = Path(dbfile).read_bytes()
    for path in ("/", f"/requests/{small}", f"/requests/{small}/progress"):
        assert get(dbfile, f"{path}?token={TOKEN}")[0] == 200
    with Storage(dbfile, create=False) as storage:
        storage.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert Path(dbfile).read_bytes() == before


def test_an_unknown_request_is_a_404(dbfile: str, small: int) -> None:
    code, body = get(dbfile, f"/requests/99?token={TOKEN}")
    assert code == 404
    assert "99" in body


# --- the pages -------------------------------------------------------------------------


def test_the_requests_page_lists_function_state_and_counts(dbfile: str, small: int) -> None:
    code, body = get(dbfile, f"/?token={TOKEN}")
    assert code == 200
    row = re.search(r'<tr class="request" data-request="1">(.*?)</tr>', body, re.S)
    assert row is not None
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row.group(1), re.S)
    text = [re.sub(r"<[^>]+>", "", c).strip() for c in cells]
    assert text[1] == "bench.simulate"
    assert text[3] == "finished"
    # tasks, done, failed (lost included), running, pending, cancelled
    assert text[4:10] == ["50", "41", "9", "0", "0", "0"]


def test_one_mark_per_task_failures_and_lost_tasks_marked(dbfile: str, small: int) -> None:
    code, body = get(dbfile, f"/requests/{small}?token={TOKEN}")
    assert code == 200
    marks = re.findall(r'<rect class="task (\w+)" data-task="(\d+)"', body)
    assert sorted(int(i) for _, i in marks) == list(range(1, 51))
    looks = dict((int(i), look) for look, i in marks)
    assert [i for i, look in looks.items() if look == "lost"] == [20, 40]
    assert sorted(i for i, look in looks.items() if look == "failed") == [7, 14, 21, 28, 35,
                                                                           42, 49]
    # 50 tasks over 50 workers: more than MAX_LANES, so one lane per node.
    lanes = re.findall(r'<text class="lane"[^>]*>([^<]+)</text>', body)
    assert lanes == [f"node{n:02d}" for n in range(7)]


def test_failures_grouped_with_traceback_and_output(dbfile: str, small: int) -> None:
    body = get(dbfile, f"/requests/{small}?token={TOKEN}")[1]
    groups = re.findall(r'<div class="failure (\w+)" data-type="(\w+)">', body)
    assert groups == [("exception", "ValueError"), ("lost", "WorkerLost")]
    assert "ValueError: bad input 7" in body  # the traceback
    assert "task 7 says hello" in body  # its stdout
    assert f"sheepdog rerun {small} --failed --wait --dbfile {dbfile}" in body
    assert f"sheepdog attach {small} --dbfile {dbfile}" in body


def test_the_progress_json_is_small_and_counts(dbfile: str, small: int) -> None:
    code, body = get(dbfile, f"/requests/{small}/progress?token={TOKEN}")
    assert code == 200
    data = json.loads(body)
    assert data["counts"] == {"pending": 0, "leased": 0, "done": 41, "error": 9,
                              "cancelled": 0}
    assert data["state"] == "finished"
    assert len(body) < 400


def test_a_real_lease_and_result_are_drawn_on_the_worker_that_ran_them(dbfile: str) -> None:
    """Through the store's own lease and results: the lease time and worker are recorded."""
    with Storage(dbfile) as storage:
        rid = storage.new_request(b"f", None, [b"a", b"b", b"c"])
        leases = storage.lease(rid, worker="n1:10:1", host="n1", max_tasks=2, lease_s=60)
        storage.complete(rid, [
            {"index": leases[0].index, "ok": True, "value": b"1"},
            {"index": leases[1].index, "ok": False,
             "error": {"type": "KeyError", "message": "k", "traceback": "KeyError: 'k'"}},
        ])
        storage.lease(rid, worker="n2:11:2", host="n2", max_tasks=1, lease_s=60)
    body = get(dbfile, f"/requests/{rid}?token={TOKEN}")[1]
    marks = re.findall(r'<rect class="task (\w+)" data-task="(\d+)"[^>]*><title>([^<]*)', body)
    assert [(look, i) for look, i, _ in marks] == [("done", "1"), ("failed", "2"),
                                                   ("running", "3")]
    assert "on n1:10:1" in marks[0][2] and "on n2:11:2" in marks[2][2]
    assert re.findall(r'<text class="lane"[^>]*>([^<]+)</text>', body) == ["n1:10:1",
                                                                            "n2:11:2"]


# --- 100,000 tasks ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, int]:
    dbfile = str(tmp_path_factory.mktemp("big") / "sheepdog.sqlite")
    with Storage(dbfile) as storage:
        return dbfile, populate(storage, 100_000)


def test_100k_tasks_are_binned_not_sent(big: tuple[str, int]) -> None:
    dbfile, rid = big
    code, body = get(dbfile, f"/requests/{rid}?token={TOKEN}")
    assert code == 200
    assert 'data-binned="true"' in body and 'data-tasks="100000"' in body
    assert "data-task=" not in body  # no per-task marks
    assert len(body) < 512 * 1024
    assert body.count("<rect") < 12 * MAX_LANES * 10


def test_100k_aggregates_add_up(big: tuple[str, int]) -> None:
    dbfile, rid = big
    with Storage(dbfile, create=False) as storage:
        tl = timeline(storage, rid)
    assert len(tl.lanes) == MAX_LANES  # 50 nodes: the busiest 47 and "(other)"
    assert tl.lanes[-1].name == "(other)"
    finished = {look: sum(counts) for look, counts in tl.throughput.items()}
    lost = 100_000 // 1009
    failed = 100_000 // 97 - 100_000 // (97 * 1009)
    assert finished == {"done": 100_000 - lost - failed, "failed": failed, "lost": lost}
    assert sum(sum(lane.failures.get("lost", [])) for lane in tl.lanes) == lost
    # 400 workers, each running one task at a time: never more running than that.
    peak = [max(lane.busy) for lane in tl.lanes]
    assert all(p >= 1 for p in peak)
    assert all(len(lane.busy) == TIME_BINS for lane in tl.lanes)


def test_status_shows_progress_and_timeline_in_a_notebook(dbfile: str, small: int) -> None:
    shown = status(small, dbfile)
    assert str(shown) == f"request {small}: finished, 41/50 done, 9 failed, 0 running, 0 pending"
    html = shown._repr_html_()
    assert 'class="progress"' in html and "<svg" in html
    assert html.count('<rect class="task ') == 50


def test_the_notebook_example_of_the_docs_runs_as_shown(tmp_path: Path) -> None:
    """docs/watching.rst's example, on a request of 200 tasks of which 8 failed."""
    with Storage(str(tmp_path / "sheepdog.sqlite")) as storage:
        populate(storage, 200, fail_every=25, lost_every=10_000)
    source = "\n".join(block("watching.rst", "import sheepdog").lines)
    done = subprocess.run([sys.executable, "-c", source], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=False, env={"PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    said = source.split("# prints: ")[1].strip()
    assert done.stdout == said + "\n"


def test_status_never_creates_a_database(dbfile: str) -> None:
    with pytest.raises(StorageError):
        status(1, dbfile)
    assert not Path(dbfile).exists()


# --- the server ------------------------------------------------------------------------


@pytest.fixture
def running(dbfile: str, small: int, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setattr(serve, "HEAD_TIMEOUT_S", 1.0)
    server = serve.LoopbackServer(create_app(dbfile, TOKEN), 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.port
    server.stop()
    thread.join(10)
    assert not thread.is_alive()


def _fetch(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_idle_and_trickling_connections_do_not_stall_the_server(running: int) -> None:
    idle = socket.create_connection(("127.0.0.1", running))
    trickle = socket.create_connection(("127.0.0.1", running))
    trickle.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    try:
        assert _fetch(running, f"/?token={TOKEN}")[0] == 200
        assert _fetch(running, "/")[0] == 403
        for sock in (idle, trickle):  # closed at their head's deadline
            sock.settimeout(10)
            assert sock.recv(1) == b""
    finally:
        idle.close()
        trickle.close()


def test_the_server_refuses_what_is_not_a_get(running: int) -> None:
    with socket.create_connection(("127.0.0.1", running)) as sock:
        sock.sendall(b"POST /?token=" + TOKEN.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(10)
        assert sock.recv(100).startswith(b"HTTP/1.1 405")
    with socket.create_connection(("127.0.0.1", running)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nX: " + b"a" * (serve.MAX_HEAD_BYTES + 10))
        sock.settimeout(10)
        assert sock.recv(100).startswith(b"HTTP/1.1 431")


def test_the_command_prints_a_url_that_fits_and_serves(dbfile: str, small: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sheepdog", "dashboard", "--dbfile", dbfile, "--no-browser"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        assert all(len(line.rstrip("\n")) <= 80 for line in lines), lines
        url = next(line.strip() for line in lines if "token=" in line)
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert b"bench.simulate" in answer.read()
    finally:
        proc.terminate()
        status_code = proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert status_code == 0  # SIGTERM stops it cleanly


def test_a_port_in_use_is_a_clear_error(dbfile: str, small: int) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "sheepdog", "dashboard", "--dbfile", dbfile, "--port",
             str(port), "--no-browser"], capture_output=True, text=True, timeout=60,
            check=False)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "--port 0" in done.stderr
