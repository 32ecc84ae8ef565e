"""sheepdog.net: addresses with a port, loopback for a wildcard, and the health check."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator

import pytest

from sheepdog.net import HEALTH_PATH, bracketed, health_problem, host_port, loopback_for


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("node1.cluster", "node1.cluster"),
        ("::1", "[::1]"),
        ("fe80::1%eth0", "[fe80::1%eth0]"),
        ("[::1]", "[::1]"),  # already bracketed: not twice
    ],
)
def test_bracketed_puts_only_ipv6_addresses_in_brackets(host: str, expected: str) -> None:
    assert bracketed(host) == expected


def test_host_port_brackets_ipv6_before_the_port() -> None:
    assert host_port("::1", 8080) == "[::1]:8080"
    assert host_port("10.0.0.5", "443") == "10.0.0.5:443"


@pytest.mark.parametrize(
    ("host", "expected"),
    [("0.0.0.0", "127.0.0.1"), ("", "127.0.0.1"), ("::", "::1"), ("10.0.0.5", "10.0.0.5"),
     ("::1", "::1")],
)
def test_loopback_for_a_wildcard_is_of_the_same_family(host: str, expected: str) -> None:
    assert loopback_for(host) == expected


class _Handler(http.server.BaseHTTPRequestHandler):
    answers: dict[str, tuple[int, bytes]] = {
        "/ok" + HEALTH_PATH: (200, json.dumps({"ok": True}).encode()),
        "/busy" + HEALTH_PATH: (503, b"busy"),
        "/stranger" + HEALTH_PATH: (200, b"<html>hello</html>"),
    }

    def do_GET(self) -> None:  # http.server's name
        status, body = self.answers.get(self.path, (404, b"{}"))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def base_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_health_problem_is_none_when_the_server_says_ok(base_url: str) -> None:
    assert health_problem(base_url + "/ok/", timeout_s=5) is None


def test_health_problem_says_why_a_server_is_not_healthy(base_url: str) -> None:
    assert health_problem(base_url + "/busy", timeout_s=5) == "status 503"
    assert "not a sheepdog server's answer" in str(
        health_problem(base_url + "/stranger", timeout_s=5))


def test_health_problem_when_nothing_listens() -> None:
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    problem = health_problem(f"http://{host_port('127.0.0.1', port)}", timeout_s=2)
    assert problem is not None and problem
