"""The pieces of connect="tunnel" that run without a cluster: the key, the address file, the relay.

The tunnel itself (a remote forward over real SSH to a real head node) is tested end to end
in tests/e2e/test_tunnel_e2e.py, on a cluster whose nodes cannot reach this machine.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sheepdog import Config
from sheepdog.client import stub
from sheepdog.errors import ConfigError
from sheepdog.poll import poll_until
from sheepdog.programs import program_source
from sheepdog.tunnel import PROBE_SOURCE, RELAY_SOURCE, choose_mode


def test_connect_defaults_to_auto_and_takes_the_three_modes() -> None:
    assert Config(host="h").connect == "auto"
    for mode in ("direct", "tunnel", "auto"):
        assert Config(host="h", connect=mode).connect == mode


def test_a_bad_connect_mode_names_the_value_and_the_choices() -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_mapping({"host": "h", "connect": "ssh"})
    message = str(caught.value)
    assert "connect" in message and "'ssh'" in message
    assert "'direct', 'tunnel', 'auto'" in message


def test_a_local_scheduler_always_connects_directly() -> None:
    # Its workers run on this machine; there is no SSH connection to tunnel over.
    assert choose_mode("tunnel", object(), "localhost", 1234) == "direct"
    assert choose_mode("auto", object(), "localhost", 1234) == "direct"


def _connection(tmp_path: Path, text: str | None) -> object:
    path = tmp_path / "job.addr"
    if text is not None:
        path.write_text(text)
    return stub.Connection("http://job-host:1111/", "00" * 16, 1, address_file=str(path))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("head:40000\n", ("head", 40000)),
        ("10.0.0.5:8080", ("10.0.0.5", 8080)),
        ("[fd00::1]:9000\n", ("fd00::1", 9000)),
        (None, ("job-host", 1111)),  # no file (yet): the job file's address
        ("", ("job-host", 1111)),  # being rewritten: the job file's address
        ("head 40000", ("job-host", 1111)),
        ("head:40000; rm -rf ~", ("job-host", 1111)),
    ],
)
def test_workers_read_the_address_file_at_every_connection(
    tmp_path: Path, text: str | None, expected: tuple[str, int]
) -> None:
    conn = _connection(tmp_path, text)
    assert conn.current_address() == expected  # type: ignore[attr-defined]


def test_a_moved_address_is_found_at_the_next_connection(tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        port = listener.getsockname()[1]
        conn = _connection(tmp_path, "127.0.0.1:1\n")
        (tmp_path / "job.addr").write_text(f"127.0.0.1:{port}\n")
        conn.connect().close()  # type: ignore[attr-defined]
        assert conn.address == ("127.0.0.1", port)  # type: ignore[attr-defined]
    finally:
        listener.close()


@pytest.fixture
def echo_server() -> Iterator[int]:
    """A TCP server on this machine that sends back what it gets, one connection at a time."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


def test_the_relay_pipes_connections_and_exits_at_eof_on_stdin(echo_server: int) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", RELAY_SOURCE, "127.0.0.1", "0", str(echo_server), "16", "60"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    ) as relay:
        try:
            assert relay.stdout is not None and relay.stdin is not None
            host, port, bound = relay.stdout.readline().decode().split()
            assert host == socket.gethostname() and bound == "127.0.0.1"
            for _ in range(3):  # several connections, each piped both ways
                with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as conn:
                    conn.sendall(b"x" * 200_000)
                    conn.shutdown(socket.SHUT_WR)
                    got = b""
                    while data := conn.recv(65536):
                        got += data
                assert got == b"x" * 200_000
            relay.stdin.close()  # what sshd does when sheepdog's channel or connection closes
            assert relay.wait(timeout=10) == 0
        finally:
            if relay.poll() is None:  # never wait on a relay that did not exit
                relay.kill()


def test_the_relay_and_the_probe_run_on_python_3_6(tmp_path: Path) -> None:
    # They run on the head node's python3, which may be old: checked as the stub is.
    for name, source in (("relay.py", RELAY_SOURCE), ("probe.py", PROBE_SOURCE),
                         ("node_probe.py", program_source("node_probe")),
                         ("appliers.py", program_source("appliers"))):
        (tmp_path / name).write_text(source)
        done = subprocess.run(
            ["vermin", "-t=3.6-", "--no-tips", "--violations", str(tmp_path / name)],
            capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr


class Relay:
    """The relay's code run here, as on the head node, against a listener that holds
    every connection it gets and counts them."""

    def __init__(self, bind: str, max_connections: int, idle_s: float) -> None:
        self.target = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.upstream: list[socket.socket] = []
        threading.Thread(target=self._hold, daemon=True).start()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RELAY_SOURCE, bind, "0",
             str(self.target.getsockname()[1]), str(max_connections), str(idle_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        self.host, port, self.bound = self.proc.stdout.readline().decode().split()
        self.port = int(port)

    def _hold(self) -> None:
        while True:
            try:
                self.upstream.append(self.target.accept()[0])
            except OSError:
                return

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def open_files(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def close(self) -> None:
        self.target.close()
        for sock in self.upstream:
            sock.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def closed_by_peer(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the other end closes ``sock`` within ``timeout_s`` (it sends nothing)."""
    sock.settimeout(timeout_s)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_the_relay_caps_connections_in_one_thread() -> None:
    relay = Relay("127.0.0.1", 16, 60)
    clients = []
    try:
        for _ in range(300):
            clients.append(socket.create_connection(("127.0.0.1", relay.port), timeout=10))
        # Beyond the cap, connections are closed at once; the first 16 stay, piped.
        assert all(closed_by_peer(sock, 10) for sock in clients[16:])
        assert poll_until(lambda: len(relay.upstream) == 16, timeout_s=10), relay.upstream
        assert relay.threads() == 1
        print(f"relay with 300 clients: {relay.threads()} thread, "
              f"{relay.open_files()} open files, {len(relay.upstream)} upstream")
        assert relay.open_files() < 16 * 2 + 16
        assert not any(closed_by_peer(sock, 0.1) for sock in clients[:16])
        # "allow N" on stdin raises the cap.
        assert relay.proc.stdin is not None
        relay.proc.stdin.write(b"allow 20\n")
        relay.proc.stdin.flush()
        more = [socket.create_connection(("127.0.0.1", relay.port), timeout=10)
                for _ in range(4)]
        clients += more
        assert poll_until(lambda: len(relay.upstream) == 20, timeout_s=10), relay.upstream
        # Full, with connections idle 5 s: a new one closes the one idle longest.
        clients[0].sendall(b"x")  # the first is busy now; the second is idle longest

        def admitted() -> bool:
            clients.append(socket.create_connection(("127.0.0.1", relay.port), timeout=10))
            return poll_until(lambda: len(relay.upstream) == 21, timeout_s=1)

        assert poll_until(admitted, timeout_s=20, interval_s=1), relay.upstream
        assert closed_by_peer(clients[1], 10)
        assert not closed_by_peer(clients[0], 0.1)
    finally:
        for sock in clients:
            sock.close()
        relay.close()


def test_the_relay_closes_idle_connections() -> None:
    relay = Relay("127.0.0.1", 16, 1.0)
    try:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as idle:
            assert closed_by_peer(idle, 10)
        assert poll_until(lambda: len(relay.upstream) == 1, timeout_s=10)
        assert closed_by_peer(relay.upstream[0], 10)
    finally:
        relay.close()


def test_the_relay_listens_where_the_head_nodes_name_resolves() -> None:
    names = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None,
                                                       socket.AF_INET)}
    outside = sorted(a for a in names if not a.startswith("127."))
    relay = Relay("", 16, 60)
    try:
        assert relay.bound != "127.0.0.1"
        assert relay.bound in outside if outside else relay.bound == "0.0.0.0"
        assert relay.host == socket.gethostname()
    finally:
        relay.close()
